"""Convert a pipeline once, load it fast: a diffusers-layout folder holding Flax parameters.

`convert_pipeline(src, dst)` writes `dst` with the same layout as a diffusers pipeline folder
(model_index.json, tokenizers, scheduler, each model component's config.json), except that
each model component's weights are one `nag_jax_params.safetensors` of flat '/'-joined Flax
paths, already rearranged and cast. `open_checkpoint` prefers that file and `map_checkpoint`
then skips the key maps, so every family loader reads a converted folder with no change, and
`NAGPipeline.from_pretrained(dst)` works as on the original.

The output is written into a temporary sibling directory and renamed to `dst` only when
complete, so a failed or killed conversion never leaves a `dst` that looks valid; a rerun
removes what a killed run left and starts over.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from flax import traverse_util

from convert.checkpoint import FLAX_PARAMS_FILE, PICKLE_SUFFIXES, parse_dtype

MARKER_FILE = "nag_jax_converted.json"
FORMAT_VERSION = 1
_SAFETENSORS_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _load_unet(folder, dtype):
    from convert.unet import load_unet

    return load_unet(folder, dtype)


def _load_vae(folder, dtype):
    from convert.vae import load_vae

    return load_vae(folder, dtype=dtype)


def _load_clip(projection):
    def load(folder, dtype):
        from convert.clip import load_clip

        return load_clip(folder, dtype=dtype, projection=projection)

    return load


def _load_t5(folder, dtype):
    from convert.t5 import load_t5

    return load_t5(folder, dtype=dtype)


def _load_flux(folder, dtype):
    from convert.flux import load_flux_transformer

    return load_flux_transformer(folder, dtype)


def _load_sd3(folder, dtype):
    from convert.sd3 import load_sd3_transformer

    return load_sd3_transformer(folder, dtype)


def _load_wan(folder, dtype):
    from convert.wan import load_wan_transformer

    return load_wan_transformer(folder, dtype)


def _load_wan_vae(folder, dtype):
    from convert.wan_vae import load_wan_vae

    return load_wan_vae(folder, dtype)


def _load_clip_vision(folder, dtype):
    from convert.clip import load_clip_vision

    return load_clip_vision(folder, dtype)


# model_index.json class name -> loader(folder, dtype) -> (module, params)
COMPONENT_LOADERS = {
    "UNet2DConditionModel": _load_unet,
    "AutoencoderKL": _load_vae,
    "CLIPTextModel": _load_clip(False),
    "CLIPTextModelWithProjection": _load_clip(True),
    "T5EncoderModel": _load_t5,
    "FluxTransformer2DModel": _load_flux,
    "SD3Transformer2DModel": _load_sd3,
    "WanTransformer3DModel": _load_wan,
    "UMT5EncoderModel": _load_t5,
    "AutoencoderKLWan": _load_wan_vae,
    "CLIPVisionModelWithProjection": _load_clip_vision,
}
# Library objects without weights (tokenizers, schedulers, image processors): copied as they are.
_COPIED_LIBRARIES = ("transformers", "diffusers")


def _is_weight_file(path: Path) -> bool:
    name = path.name
    return name.endswith((".safetensors", ".safetensors.index.json", ".msgpack", ".index.json")) or name.endswith(
        PICKLE_SUFFIXES
    )


def save_flat_safetensors(path, params) -> int:
    """Write a nested params dict as one safetensors file keyed by '/'-joined paths; returns the
    tensor count. Written here (not with safetensors' numpy helper) so bfloat16 needs no torch."""
    flat = traverse_util.flatten_dict(params, sep="/")
    header, offset, arrays = {}, 0, []
    for key in sorted(flat):
        array = np.ascontiguousarray(np.asarray(flat[key]))
        header[key] = {"dtype": _SAFETENSORS_NAMES[array.dtype.name], "shape": list(array.shape),
                       "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for array in arrays:
            f.write(array.tobytes())
        f.flush()
        os.fsync(f.fileno())
    return len(arrays)


def _component_plan(src: Path, index: dict):
    """(model components {name: class}, copied folders [name], skipped {name: class})."""
    models, copied, skipped = {}, [], {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            continue
        library, class_name = entry
        if class_name in COMPONENT_LOADERS:
            models[name] = class_name
        elif (src / name).is_dir() and not any(_is_weight_file(p) for p in (src / name).iterdir()) \
                and library in _COPIED_LIBRARIES:
            copied.append(name)
        else:
            skipped[name] = class_name  # e.g. a safety checker: a model nag-jax does not run
    return models, copied, skipped


def _single_file_components(src: Path, template: Path, index: dict, dtype, allow_pickle: bool):
    """name -> (config dict, params) for an SD1.5/SDXL single file, configs from `template`."""
    from convert.single_file import infer_unet_config, load_single_file, split_single_file

    configs = {}
    for name in index:
        config_path = template / name / "config.json"
        if not name.startswith("_") and config_path.exists():
            configs[name] = json.loads(config_path.read_text())
    if "unet" not in configs:
        configs["unet"] = infer_unet_config(split_single_file(src, allow_pickle=allow_pickle)["unet"])
    loaded = load_single_file(src, dtype, configs, allow_pickle=allow_pickle)
    return {name: (configs[name], params) for name, (_, params) in loaded.items()}


def convert_pipeline(src, dst, dtype="float32", allow_pickle: bool = False, progress: bool = True,
                     template=None, overwrite: bool = False) -> Path:
    """Convert the pipeline at `src` into a nag-jax folder at `dst`; returns `dst`.

    `src`: a diffusers pipeline folder, or an SD1.5/SDXL single file (then `template` is the
    diffusers folder of the matching model, for model_index.json, configs, tokenizers and the
    scheduler; its weights are not read). `dtype` ("float32", "bfloat16", "float16") is the
    stored parameter dtype. `allow_pickle` lets a single file be a pickle, read by torch's
    weights-only loader. `dst` must not exist unless `overwrite`.
    """
    src, dst = Path(src), Path(dst)
    dtype_name = parse_dtype(dtype).name
    if not src.exists():
        raise FileNotFoundError(f"src: {src} does not exist")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"dst: {dst} already exists; choose another path or pass overwrite=True")
    layout = src if src.is_dir() else template
    if layout is None:
        raise ValueError(f"template: converting the single file {src} needs the diffusers folder of the matching "
                         "model (template=..., CLI --template) for its configs, tokenizers and scheduler")
    layout = Path(layout)
    index_path = layout / "model_index.json"
    if not index_path.exists():
        which = "src" if src.is_dir() else "template"
        raise FileNotFoundError(f"{which}: {layout} has no model_index.json; expected a diffusers pipeline folder")
    index = json.loads(index_path.read_text())
    models, copied, skipped = _component_plan(layout, index)

    for stale in dst.parent.glob(f".{dst.name}.partial-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    try:
        tensors = _write_components(src, layout, partial, index, models, copied, dtype_name, allow_pickle, progress)
        out_index = dict(index, **{name: [None, None] for name in skipped})
        (partial / "model_index.json").write_text(json.dumps(out_index, indent=2))
        marker = {"format_version": FORMAT_VERSION, "dtype": dtype_name, "source": str(src),
                  "components": sorted(models), "skipped": sorted(skipped), "tensors": tensors}
        (partial / MARKER_FILE).write_text(json.dumps(marker, indent=2))  # last file: the folder is complete
        if dst.exists():  # overwrite: move the old one aside only now that the new one is whole
            old = dst.parent / f".{dst.name}.partial-old-{uuid.uuid4().hex[:8]}"
            os.replace(dst, old)
            os.replace(partial, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, dst)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return dst


def _write_components(src, layout, out, index, models, copied, dtype_name, allow_pickle, progress) -> int:
    from tqdm.auto import tqdm

    single = None if src.is_dir() else _single_file_components(src, layout, index, dtype_name, allow_pickle)
    tensors = 0
    for name in copied:
        shutil.copytree(layout / name, out / name)
    with tqdm(total=len(models), desc="converting", unit="component", disable=not progress) as bar:
        for name, class_name in sorted(models.items()):
            bar.set_postfix_str(name)
            (out / name).mkdir()
            if single is not None:
                if name not in single:
                    raise ValueError(f"src: the single file {src} holds no {name!r} weights "
                                     f"(it has: {', '.join(sorted(single))})")
                config, params = single[name]
                (out / name / "config.json").write_text(json.dumps(config, indent=2))
            else:
                if not (src / name).is_dir():
                    raise FileNotFoundError(f"src: {src} lacks the component folder {name}/ named in model_index.json")
                _, params = COMPONENT_LOADERS[class_name](src / name, dtype_name)
                for path in (src / name).iterdir():
                    if path.is_file() and not _is_weight_file(path):
                        shutil.copy2(path, out / name / path.name)
            tensors += save_flat_safetensors(out / name / FLAX_PARAMS_FILE, params)
            bar.update(1)
    return tensors


def is_converted(path) -> bool:
    """Whether `path` is a complete folder written by convert_pipeline."""
    return (Path(path) / MARKER_FILE).is_file()
