"""Model names -> pipeline folders: a local folder, an embedded model's name, or a Hugging Face repo id.

The order is diffusers': an existing local folder wins; then the names of the models shipped in
the package (nag_jax/embedded/); then a repo id ("org/name"), looked up in the Hugging Face
cache (`cache_dir`, else HF_HUB_CACHE, else HF_HOME/hub, read when called) and, unless offline
(`local_files_only` or HF_HUB_OFFLINE=1), downloaded into it. A download fetches only what a
pipeline reads: model_index.json, every used component's configs and tokenizer files, and its
safetensors weights (the `variant`'s, e.g. "fp16", when asked) — never pickled .bin files and
never the components no family loads (safety checker, feature extractor).

A snapshot holding several variants of the same weights is read through a small view folder of
links (next to the snapshots, `nag-jax-views/`) that shows each component one set of weights
under its plain name, since a component folder must hold exactly one checkpoint.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

# folders under nag_jax/embedded/, trained by examples/train_tiny.py (wan-shapes: the video model)
EMBEDDED_MODELS = ("sd-shapes", "flux-shapes", "wan-shapes")
UNUSED_COMPONENTS = ("safety_checker", "feature_extractor")  # listed in model_index.json, loaded by no family
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Weight files: "<stem>[.<variant>][-00001-of-00002].safetensors" and "<stem>.safetensors.index[.<variant>].json".
WEIGHTS = re.compile(r"(?P<stem>[^/.]+)(?:\.(?P<variant>[\w]+))?(?P<shard>-\d+-of-\d+)?\.safetensors")
WEIGHTS_INDEX = re.compile(r"(?P<stem>[^/.]+)\.safetensors\.index(?:\.(?P<variant>[\w]+))?\.json")
COMPONENT_FILES = (".json", ".txt", ".model")  # configs, tokenizer vocabularies, sentencepiece models


def embedded_model(name: str = "sd-shapes") -> Path:
    """The folder of an embedded model shipped inside the package."""
    folder = Path(__file__).parent / "embedded" / name
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(f"the embedded model {name} is missing from {folder.parent}; pass --model PATH, "
                                "or rebuild it with examples/train_tiny.py")
    return folder


def hub_cache(cache_dir=None) -> Path:
    """The Hugging Face hub cache folder, as huggingface_hub finds it (environment read now)."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def offline(local_files_only: bool | None = None) -> bool:
    if local_files_only is not None:
        return local_files_only
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def resolve_model(model=None, revision: str | None = None, variant: str | None = None, cache_dir=None,
                  local_files_only: bool | None = None) -> Path:
    """A pipeline folder for `model`: a local folder, an embedded model name (None: sd-shapes), or a
    Hugging Face repo id at `revision` (default main). See the module docstring."""
    if model is None:
        return embedded_model()
    path = Path(model)
    if path.exists():
        return path
    if str(model) in EMBEDDED_MODELS:
        return embedded_model(str(model))
    if not REPO_ID.fullmatch(str(model)):
        raise FileNotFoundError(f"{model}: no such pipeline folder (with model_index.json), and not an embedded model "
                                f"({', '.join(EMBEDDED_MODELS)}) or a Hugging Face repo id (org/name)")
    return _from_hub(str(model), revision, variant, hub_cache(cache_dir), offline(local_files_only))


def resolve_clip_folder(model, revision: str | None = None, cache_dir=None, local_files_only: bool | None = None):
    """A single-model folder (a CLIPModel: config, tokenizer, preprocessor config and weights at its
    root): a local folder or a Hugging Face repo id, as `resolve_model` finds them."""
    if Path(model).exists():
        return Path(model)
    if not REPO_ID.fullmatch(str(model)):
        raise FileNotFoundError(f"{model}: no such folder, and not a Hugging Face repo id (org/name)")
    return _from_hub(str(model), revision, None, hub_cache(cache_dir), offline(local_files_only), pipeline=False)


def files_to_download(repo_files: list[str], model_index: dict, variant: str | None = None) -> list[str]:
    """The repository files a pipeline reads: model_index.json, then per used component its
    configs/tokenizer files and its safetensors weights of `variant` (a component without that
    variant: its plain ones, as diffusers falls back)."""
    used = {name for name, entry in model_index.items()
            if not name.startswith("_") and isinstance(entry, list) and entry[0] is not None
            and name not in UNUSED_COMPONENTS}
    by_component = {}
    for file in repo_files:
        component, _, name = file.partition("/")
        if component in used and "/" not in name:
            by_component.setdefault(component, []).append(name)
    chosen = ["model_index.json"]
    for component, names in by_component.items():
        pick = _variant_to_read({_variant_of(name) for name in names if _is_weights(name)}, variant)
        chosen += [f"{component}/{name}" for name in names
                   if (_variant_of(name) == pick if _is_weights(name) else name.endswith(COMPONENT_FILES))]
    return chosen


def _is_weights(name: str) -> bool:
    return bool(WEIGHTS.fullmatch(name) or WEIGHTS_INDEX.fullmatch(name))


def _variant_of(name: str) -> str | None:
    weights = WEIGHTS.fullmatch(name) or WEIGHTS_INDEX.fullmatch(name)
    return weights["variant"] if weights else None


def _variant_to_read(present: set, variant: str | None) -> str | None:
    """`variant` where the component has it, else its plain weights."""
    return variant if variant in present else None


def _root_files(repo_files: list[str]) -> list[str]:
    """A single model's files: its root-level configs, tokenizer files and plain safetensors weights."""
    return [f for f in repo_files if "/" not in f and (_variant_of(f) is None if _is_weights(f)
                                                        else f.endswith(COMPONENT_FILES))]


def _from_hub(repo_id: str, revision, variant, cache: Path, is_offline: bool, pipeline: bool = True) -> Path:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    where = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    try:
        if is_offline:
            snapshot = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True)
        else:
            try:
                repo_files = HfApi().list_repo_files(repo_id, revision=revision)
                if pipeline:
                    index = json.loads(Path(hf_hub_download(repo_id, "model_index.json", revision=revision,
                                                            cache_dir=cache)).read_text())
                    wanted = files_to_download(repo_files, index, variant)
                else:
                    wanted = _root_files(repo_files)
                snapshot = snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=wanted)
            except LocalEntryNotFoundError:
                raise
            except Exception:  # the Hub unreachable (no network, server error): what the cache holds
                snapshot = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True)
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{where} is not in the Hugging Face cache {cache} and cannot be downloaded now (offline: "
            "HF_HUB_OFFLINE or local_files_only, or the Hub unreachable); download it once online, or point "
            "HF_HUB_CACHE / cache_dir at the cache holding it"
        ) from None
    snapshot = Path(snapshot)
    return _one_variant_view(snapshot, variant) if pipeline else snapshot


def _one_variant_view(snapshot: Path, variant: str | None) -> Path:
    """`snapshot` itself when each component folder holds one set of weights; otherwise a view
    folder of links showing each component the `variant`'s weights (where it has them, else the
    plain ones) under their plain names."""
    present = {folder.name: {_variant_of(f.name) for f in folder.iterdir() if _is_weights(f.name)}
               for folder in snapshot.iterdir() if folder.is_dir()}
    found = set().union(*present.values()) - {None}
    if not found and variant is None:
        return snapshot
    if variant is not None and variant not in found:
        raise FileNotFoundError(f"{snapshot}: no weights of variant {variant!r} (found: "
                                f"{', '.join(sorted(found)) or 'only plain weights'})")
    view = snapshot.parent.parent / "nag-jax-views" / f"{snapshot.name}-{variant or 'plain'}"
    for file in snapshot.rglob("*"):
        relative = file.relative_to(snapshot)
        if file.is_dir() or (_is_weights(file.name) and _variant_of(file.name) != _variant_to_read(
                present.get(relative.parts[0], set()), variant)):
            continue
        name = file.name
        weights = WEIGHTS.fullmatch(name) or WEIGHTS_INDEX.fullmatch(name)
        if weights and weights["variant"] and not weights.groupdict().get("shard"):
            name = name.replace(f".{weights['variant']}", "", 1)  # shards keep their names: the index lists them
        link = view / relative.parent / name
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(file.resolve())
    return view
