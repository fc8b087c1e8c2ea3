"""`NAGPipeline`: one entry point for every family, diffusers-style arguments.

`NAGPipeline.from_pretrained(path)` reads `model_index.json` and hands the folder to the
family that owns its pipeline class. The call validates its arguments, encodes the prompts
into row groups (cond, uncond for CFG, nag_negative for NAG), draws each image's noise from
its own key (seed, image index), runs the one sampler and decodes.

Families implement the small interface of `Family` below; everything else is shared.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import re
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nag_jax.attention import check_backend, with_attention_backend
from nag_jax.guidance import check_nag_norm, nag_step_split
from nag_jax.intercept import guidance_of, layer_paths, track_layers
from nag_jax.sampler import Conditioning, GuidancePlan, Sampler, Scales, resolve_parallel

# diffusers pipeline class (model_index.json "_class_name") -> "module:Family"
FAMILIES = {
    "StableDiffusionPipeline": "nag_jax.families.unet:StableDiffusionFamily",
    "StableDiffusionXLPipeline": "nag_jax.families.unet:StableDiffusionFamily",
    "FluxPipeline": "nag_jax.families.flux:FluxFamily",
    "FluxKontextPipeline": "nag_jax.families.flux_kontext:FluxKontextFamily",
    "ChromaPipeline": "nag_jax.families.chroma:ChromaFamily",
    "StableDiffusion3Pipeline": "nag_jax.families.sd3:SD3Family",
    "PixArtSigmaPipeline": "nag_jax.families.pixart:PixArtSigmaFamily",
    "SanaPipeline": "nag_jax.families.sana:SanaFamily",
    "SanaSprintPipeline": "nag_jax.families.sana:SanaSprintFamily",
    "WanPipeline": "nag_jax.families.wan:WanFamily",
    "WanImageToVideoPipeline": "nag_jax.families.wan:WanFamily",
}
OUTPUT_TYPES = ("pil", "np", "latent")


class Family:
    """What a model family provides to the shared pipeline (see families/unet.py for one).

    Attributes: `name`, `defaults` (dict with guidance_scale, num_inference_steps, nag_tau,
    nag_alpha; its nag_scale and `cfg_argument` entries are the scales to use when NAG or CFG is
    wanted), `cfg_argument` (the call argument that sets the CFG scale), `height`, `width`
    (defaults), `size_multiple` (height/width must divide by it), `dtype` (of latents and
    activations), `params` (every parameter `denoise` needs), `options` (names of the family's
    own call arguments), and for PAG `pag_layer_names` (regular expressions over our attention
    cores' module paths, "/"-joined, each with the diffusers module name it stands for, so
    `pag_applied_layers` means what it does in diffusers) and `pag_applied_layers` (the default;
    none: the family has no PAG), `stacked_params` ('/'-joined paths in `params` of blocks run
    under scan, stacked along a leading layer axis, which model parallelism never splits).
    """

    options: tuple[str, ...] = ()
    pag_layer_names: tuple[tuple[str, str], ...] = ()
    pag_applied_layers: tuple[str, ...] = ()
    stacked_params: tuple[str, ...] = ()
    option_defaults: dict = {}  # values of the family's own options when the call leaves them out (read-only)
    cfg_argument = "guidance_scale"  # Flux: its own true_cfg_scale (its guidance_scale is distilled guidance)
    video = False  # outputs are videos: `decode` gives [B, F, H, W, 3] and the output's `frames` holds them
    name: str
    defaults: dict
    height: int
    width: int
    size_multiple: int
    dtype: Any
    params: Any

    def uses_cfg(self, guidance_scale: float, options: dict) -> bool:
        raise NotImplementedError

    def cfg_scale(self, guidance_scale: float, options: dict) -> float:
        """The CFG scale used when `uses_cfg` holds: the call argument `cfg_argument` names (one of
        the family's own options where guidance_scale means something else, Flux's true_cfg_scale)."""
        return guidance_scale if self.cfg_argument == "guidance_scale" else options[self.cfg_argument]

    def encode(self, prompts: list[str], options: dict) -> Conditioning:
        """One row per prompt; `options` carries the call's family options (and guidance_scale)."""
        raise NotImplementedError

    def encode_uncond(self, negatives: list[str] | None, count: int, options: dict) -> Conditioning:
        """The CFG uncond rows: the negative prompts, or "" when none were given."""
        return self.encode(negatives or [""] * count, options)

    def make_schedule(self, num_inference_steps: int, height: int, width: int, options: dict):
        raise NotImplementedError

    def output_size(self, height: int, width: int, options: dict) -> tuple[int, int]:
        """The size actually generated for the asked one (Flux Kontext fits it to max_area)."""
        return height, width

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """One image's latents in the diffusers pipeline's layout."""
        raise NotImplementedError

    def latent_shape_of_call(self, height: int, width: int, options: dict) -> tuple[int, ...]:
        """`latent_shape` for this call's options (video families read num_frames there)."""
        return self.latent_shape(height, width)

    def prepare(self, params, conditioning: Conditioning) -> Conditioning:
        """Pure: the denoiser's work that no step changes (PixArt/SANA: the caption's keys and
        values), run once per sampling run outside the step loop; `denoise` gets its result."""
        return conditioning

    def denoise(self, params, model_input, timestep, conditioning: Conditioning):
        """Pure: the model's output for model_input at the scalar `timestep` (traced), given
        `prepare`'s conditioning."""
        raise NotImplementedError

    def experts(self) -> tuple:
        """The denoiser's experts in step order, (denoise, params) each: one for most families; Wan2.2
        A14B's high- and low-noise transformers (a folder's missing one: params None)."""
        return ((self.denoise, self.params),)

    def expert_split(self, schedule, options: dict) -> tuple[int | None, float | None]:
        """With two experts: (leading steps the first runs, the second's CFG scale); else (None, None)."""
        return None, None

    def final_latents(self, latents, conditioning: Conditioning):
        """The sampled latents as the call returns and decodes them (`conditioning`: the cond
        rows; Wan TI2V puts the given first frame back)."""
        return latents

    def decode(self, latents, height: int, width: int) -> np.ndarray:
        """Final latents -> float32 images [B, H, W, 3] in [0, 1]."""
        raise NotImplementedError


@dataclasses.dataclass
class PipelineOutput:
    images: Any  # list of PIL images, or float32 [B, H, W, 3] for "np", or latents for "latent"
    frames: Any = None  # video families instead: lists of PIL frames, float32 [B, F, H, W, 3], or latents


def read_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path.parent}: missing {path.name}; is this a complete diffusers pipeline folder?")
    return json.loads(path.read_text())


def component_folder(path: Path, name: str) -> Path:
    """A pipeline's component folder (unet/, vae/, ...), or an error naming the missing one."""
    folder = Path(path) / name
    if not folder.is_dir():
        raise FileNotFoundError(f"{path}: the pipeline needs the component folder {name}/, which is missing")
    return folder


def _as_list(value, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value) and value:
        return list(value)
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {value!r}")


def _broadcast(values: list[str], count: int, name: str) -> list[str]:
    if len(values) == count:
        return values
    if len(values) == 1:
        return values * count
    raise ValueError(f"{name} has {len(values)} entries for {count} prompts; give one, or one per prompt")


# The numeric call arguments' allowed ranges (low, high, low_open), shared with the CLI's flag checks.
ARGUMENT_RANGES = {"nag_scale": (0.0, math.inf, False), "nag_tau": (0.0, math.inf, True),
                   "nag_alpha": (0.0, 1.0, False), "nag_end": (0.0, 1.0, True),
                   "guidance_scale": (0.0, math.inf, False), "guidance_scale_2": (0.0, math.inf, False),
                   "true_cfg_scale": (0.0, math.inf, False),
                   "pag_scale": (0.0, math.inf, False), "pag_adaptive_scale": (0.0, math.inf, False)}


def check_argument(name: str, value) -> float:
    low, high, low_open = ARGUMENT_RANGES[name]
    return check_range(name, value, low, high, low_open=low_open)


def one_at_a_time(function, items, enabled: bool):
    """`function(items)`; when `enabled` (batch_invariant), `function` of each item alone with the
    rows concatenated, so every row comes from the program compiled for one item."""
    if not enabled:
        return function(items)
    return jax.tree.map(lambda *rows: jnp.concatenate(rows), *[function(items[i:i + 1]) for i in range(len(items))])


def diffusers_layer_name(path: str, layer_names) -> str | None:
    """The diffusers module name of our module at `path` by the family's table, or None."""
    for pattern, name in layer_names:
        match = re.fullmatch(pattern, path)
        if match:
            return match.expand(name)
    return None


def check_pag(family: Family, pag_scale, pag_adaptive_scale, pag_applied_layers):
    """The PAG arguments checked: (pag_scale, pag_adaptive_scale, list of layer patterns)."""
    pag_scale = check_argument("pag_scale", pag_scale)
    pag_adaptive_scale = check_argument("pag_adaptive_scale", pag_adaptive_scale)
    if pag_scale > 0.0 and not family.pag_applied_layers:
        raise ValueError(f"pag_scale = {pag_scale!r} asks for PAG, which the {family.name} pipeline does not have "
                         "(PAG: Stable Diffusion, SDXL and SD3 families); use pag_scale = 0")
    if pag_applied_layers is None:
        return pag_scale, pag_adaptive_scale, list(family.pag_applied_layers)
    patterns = _as_list(pag_applied_layers, "pag_applied_layers")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"pag_applied_layers entry {pattern!r} is not a regular expression ({error})") from None
    return pag_scale, pag_adaptive_scale, patterns


def check_range(name: str, value, low, high, low_open=False, high_open=False):
    number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    below = number <= low if low_open else number < low
    above = number >= high if high_open else number > high
    if math.isnan(number) or below or above:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be a number in {left}{low}, {high}{right}, got {value!r}")
    return number


def with_scheduler(scheduler_config: dict, scheduler: str | None) -> dict:
    """The pipeline's scheduler config, its class replaced by `scheduler` (a name or class name
    from nag_jax.schedulers.SCHEDULER_CLASSES) when given; checked at load time."""
    if scheduler is None:
        return scheduler_config
    from nag_jax.schedulers import SCHEDULER_CLASSES

    class_name = SCHEDULER_CLASSES.get(scheduler, scheduler) if isinstance(scheduler, str) else None
    if class_name not in SCHEDULER_CLASSES.values():
        allowed = ", ".join(list(SCHEDULER_CLASSES) + list(SCHEDULER_CLASSES.values()))
        raise ValueError(f"scheduler must be one of {allowed}, got {scheduler!r}")
    return dict(scheduler_config, _class_name=class_name)


def image_keys_of(seed: int, image_seeds, images: int, rows: int):
    """One PRNG key per row: fold_in(key(seed), i) for row i, or from `image_seeds` (one (seed,
    index) pair per image); padding rows repeat the last image's key."""
    if image_seeds is None:
        return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(rows))
    pairs = list(image_seeds)
    if len(pairs) != images or not all(isinstance(s, int) and isinstance(i, int) for s, i in pairs):
        raise ValueError(f"image_seeds must hold {images} (seed, index) pairs of integers, one per image, "
                         f"got {image_seeds!r}")
    pairs += pairs[-1:] * (rows - images)
    order, keys = [], []
    for base in dict.fromkeys(s for s, _ in pairs):  # one vectorised fold per distinct seed
        where = [r for r, (s, _) in enumerate(pairs) if s == base]
        indices = jnp.array([pairs[r][1] for r in where])
        keys.append(jax.vmap(lambda i, base=base: jax.random.fold_in(jax.random.key(base), i))(indices))
        order += where
    return jnp.concatenate(keys)[np.argsort(order)]


class NAGPipeline:
    """Text-to-image sampling with NAG (and CFG) for any supported family."""

    def __init__(self, family: Family, model_parallel: int = 1, attention_backend: str = "auto",
                 offload_inactive_expert: bool = False):
        self.family = family
        denoisers = tuple(with_attention_backend(denoise, attention_backend) for denoise, _ in family.experts())
        if offload_inactive_expert not in (False, True) or (offload_inactive_expert and len(denoisers) < 2):
            raise ValueError(f"offload_inactive_expert=True is for two-expert models (Wan2.2 A14B); the {family.name} "
                             f"model has one denoiser, got offload_inactive_expert={offload_inactive_expert!r}")
        self.sampler = Sampler(denoisers if len(denoisers) > 1 else denoisers[0], model_parallel, family.stacked_params,
                               family.prepare, offload_inactive_expert)
        self._guided_layers = None  # {module path: guidance its transform implements}, found on first use

    def _layers_with_guidance(self, latents, timestep, conditioning) -> dict[str, frozenset]:
        """Every module call of the denoiser that has a guidance transform: its path ("/"-joined;
        one per layer of scanned blocks, `layer_paths`) and what the transform implements. Found
        once per pipeline by tracing one row's shapes."""
        if self._guided_layers is None:
            seen = {}

            def record(next_fun, args, kwargs, context):
                guidance = guidance_of(type(context.module), context.method_name)
                if guidance:
                    seen.update(dict.fromkeys(layer_paths(context.module), guidance))
                return next_fun(*args, **kwargs)

            one_row = jax.tree.map(lambda leaf: leaf[:1], conditioning)
            denoise, params = next((d, p) for d, p in self.family.experts() if p is not None)  # experts: alike
            with nn.intercept_methods(track_layers(record)):
                jax.eval_shape(lambda p, x, c: denoise(p, x, timestep, self.family.prepare(p, c)), params, latents,
                               one_row)
            self._guided_layers = seen
        return self._guided_layers

    def _check_nag_reaches_attention(self, nag_scale, layers: dict):
        """NAG asked of a model none of whose attention layers has a NAG transform is an error,
        not a silent plain run."""
        if not any("nag" in guidance for guidance in layers.values()):
            raise ValueError(
                f"nag_scale = {nag_scale!r} asks for NAG, but no attention layer of the {self.family.name} model has a "
                "NAG transform (nag_jax.intercept.register_nag); use nag_scale <= 1 (NAG off) with this model"
            )

    def _pag_layers(self, pag_applied_layers: list[str], layers: dict) -> frozenset:
        """Our module paths of the self-attention layers `pag_applied_layers` selects: as in
        diffusers, each entry is a regular expression searched in the diffusers module names."""
        names = {}
        for path, guidance in layers.items():
            name = diffusers_layer_name(path, self.family.pag_layer_names)
            if "pag" in guidance and name is not None:
                names[name] = path
        selected = set()
        for pattern in pag_applied_layers:
            hits = {path for name, path in names.items() if re.search(pattern, name)}
            if not hits:
                raise ValueError(f"pag_applied_layers entry {pattern!r} selects no self-attention layer of the "
                                 f"{self.family.name} model; its layers are named like {', '.join(sorted(names)[:3])}")
            selected |= hits
        return frozenset(selected)

    @classmethod
    def from_pretrained(cls, path, dtype="float32", model_parallel: int = 1, attention_backend: str = "auto",
                        loras=(), offload_inactive_expert: bool = False, revision: str | None = None,
                        variant: str | None = None, cache_dir=None, local_files_only: bool | None = None,
                        **family_options) -> "NAGPipeline":
        """Load a diffusers-format pipeline: a local folder, an embedded model's name ("sd-shapes",
        "flux-shapes") or a Hugging Face repo id at `revision`, from the Hugging Face cache or
        downloaded (`variant`, `cache_dir`, `local_files_only`: nag_jax/resolve.py). `dtype` is
        "float32", "bfloat16" or "float16".

        `model_parallel` > 1 splits the denoiser's parameters over that many devices (a model
        bigger than one device; docs/multi-device.md); the batch is split over the rest.
        `attention_backend` picks the denoiser's attention implementation (docs/attention.md).
        `loras`: (path, scale) pairs merged in order, as `load_lora_weights` does.
        `offload_inactive_expert` (two-expert models, Wan2.2 A14B): keep only the expert whose steps
        run on the devices, the other on the host (docs/multi-device.md)."""
        from nag_jax.resolve import resolve_model

        path = resolve_model(path, revision=revision, variant=variant, cache_dir=cache_dir,
                             local_files_only=local_files_only)
        index_path = path / "model_index.json"
        if not index_path.exists():
            raise FileNotFoundError(f"{path}: no model_index.json; expected a diffusers-format pipeline folder")
        index = json.loads(index_path.read_text())
        class_name = index.get("_class_name")
        if class_name not in FAMILIES:
            raise ValueError(
                f"{path}: pipeline class {class_name!r} is not supported; supported: {', '.join(sorted(FAMILIES))}"
            )
        module_name, family_name = FAMILIES[class_name].split(":")
        family_cls = getattr(importlib.import_module(module_name), family_name)
        check_backend(attention_backend)  # before the slow part
        pipeline = cls(family_cls.load(path, index, dtype=dtype, **family_options), model_parallel,
                       attention_backend, offload_inactive_expert)
        for lora_path, scale in loras:
            pipeline.load_lora_weights(lora_path, scale)
        return pipeline

    def load_lora_weights(self, path, scale: float = 1.0) -> int:
        """Merge a LoRA safetensors file (diffusers/PEFT, kohya, ComfyUI or XLabs names; docs/lora.md)
        into the denoiser and text encoders, times `scale`; calls stack. Returns the layers patched."""
        from nag_jax.lora import load_lora_weights

        return load_lora_weights(self, path, scale)

    def unload_lora_weights(self) -> None:
        """Restore the parameters from before the first `load_lora_weights`, bit for bit."""
        from nag_jax.lora import unload_lora_weights

        unload_lora_weights(self)

    def __call__(
        self,
        prompt,
        nag_negative_prompt=None,
        nag_scale: float = 1.0,
        nag_tau: float | None = None,
        nag_alpha: float | None = None,
        nag_end: float | None = None,
        nag_norm: str = "l1",
        negative_prompt=None,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seed: int = 0,
        latents=None,
        output_type: str = "pil",
        parallel: str = "auto",
        progress: bool = False,
        callback_on_step=None,
        check_finite: bool = False,
        pag_scale: float = 0.0,
        pag_adaptive_scale: float = 0.0,
        pag_applied_layers=None,
        batch_invariant: bool = False,
        image_seeds=None,
        **options,
    ) -> PipelineOutput:
        """Generate images. NAG is on when nag_scale > 1 (reference convention: paper phi + 1);
        `nag_norm` is the norm of NAG's ratio, "l1" (the paper) or "l2" (the reference's Flux processors).

        nag_negative_prompt defaults to negative_prompt when given, else "". CFG is on per the
        family's rule (guidance_scale > 1 for models trained with it). `latents` takes the
        diffusers pipeline's layout and meaning. `progress` shows a per-step bar;
        `callback_on_step(step, timestep, latents)` is called after every step.
        `check_finite` raises instead of returning NaN/Inf images. PAG (perturbed-attention
        guidance, diffusers' PAG pipelines) is on when pag_scale > 0: `pag_applied_layers`
        (regular expressions over diffusers' module names; default: the family's, "mid" for
        the UNets, "blocks.1" for SD3) get the identity attention map in the perturbed rows,
        and pag_adaptive_scale > 0 lowers the scale by that much per unit of (1000 - t).
        `batch_invariant` encodes, denoises and decodes one image at a time, so each image is
        bit-identical whatever the rest of the batch and the device count (slower;
        docs/reproducibility.md). `image_seeds`, one (seed, index) pair per image, replaces
        (seed, image index): images of different calls batched together (nag_jax.batch) each
        draw the noise of their own call. Family options: see the family (e.g. nag_mode and
        true_cfg_scale for Flux, max_sequence_length).
        """
        family = self.family
        defaults = family.defaults
        unknown = sorted(set(options) - set(family.options))
        if unknown:
            allowed = ", ".join(family.options) or "none"
            raise ValueError(f"unknown argument(s) {', '.join(unknown)} for the {family.name} pipeline; "
                             f"its own options are: {allowed}")
        prompts = _as_list(prompt, "prompt")
        nag_scale = check_argument("nag_scale", nag_scale)
        nag_tau = check_argument("nag_tau", defaults["nag_tau"] if nag_tau is None else nag_tau)
        nag_alpha = check_argument("nag_alpha", defaults["nag_alpha"] if nag_alpha is None else nag_alpha)
        nag_end = check_argument("nag_end", defaults.get("nag_end", 1.0) if nag_end is None else nag_end)
        nag_norm = check_nag_norm(nag_norm)
        guidance_scale = check_argument("guidance_scale",
                                        defaults["guidance_scale"] if guidance_scale is None else guidance_scale)
        pag_scale, pag_adaptive_scale, pag_applied_layers = check_pag(family, pag_scale, pag_adaptive_scale,
                                                                      pag_applied_layers)
        do_pag = pag_scale > 0.0
        steps = defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
            raise ValueError(f"num_inference_steps must be a positive integer, got {steps!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt <= 0:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        height, width = height or family.height, width or family.width
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % family.size_multiple:
                raise ValueError(f"{name} must be a positive multiple of {family.size_multiple}, got {value!r}")
        parallel = resolve_parallel(parallel)
        if not isinstance(batch_invariant, bool):
            raise ValueError(f"batch_invariant must be True or False, got {batch_invariant!r}")
        if batch_invariant and self.sampler.model_parallel > 1:
            raise ValueError(f"batch_invariant=True needs model_parallel=1 (parameters split over devices change how "
                             f"sums round), got model_parallel={self.sampler.model_parallel}")

        negatives = None if negative_prompt is None else _broadcast(_as_list(negative_prompt, "negative_prompt"),
                                                                    len(prompts), "negative_prompt")
        options = dict(family.option_defaults, **options, guidance_scale=guidance_scale, negative_prompt=negatives,
                       height=height, width=width)
        do_cfg = family.uses_cfg(guidance_scale, options)
        height, width = family.output_size(height, width, options)
        options.update(height=height, width=width)
        do_nag = nag_scale > 1.0
        if nag_negative_prompt is None:
            nag_negatives = negatives or [""] * len(prompts)
        else:
            nag_negatives = _broadcast(_as_list(nag_negative_prompt, "nag_negative_prompt"), len(prompts),
                                       "nag_negative_prompt")

        # One row per image, prompt-major like diffusers; padded so every device gets equal rows.
        images = len(prompts) * num_images_per_prompt
        rows = -(-images // self.sampler.batch_multiple(parallel)) * self.sampler.batch_multiple(parallel)
        row_prompt = np.minimum(np.arange(rows), images - 1) // num_images_per_prompt

        def per_image(conditioning):
            return jax.tree.map(lambda leaf: leaf[row_prompt], conditioning)

        def encode(texts):
            return one_at_a_time(lambda batch: family.encode(batch, options), texts, batch_invariant)

        groups = {"cond": per_image(encode(prompts))}
        if do_cfg:
            groups["uncond"] = per_image(one_at_a_time(
                lambda batch: family.encode_uncond(batch if negatives else None, len(batch), options),
                negatives or [""] * len(prompts), batch_invariant))
        if do_nag:
            groups["nag_negative"] = per_image(encode(nag_negatives))

        schedule = family.make_schedule(steps, height, width, options)
        # Each image's randomness depends on (seed, image index) only, never on the device layout.
        image_keys = image_keys_of(seed, image_seeds, images, rows)
        start_keys, step_keys = jax.vmap(jax.random.split, out_axes=1)(image_keys)
        latent_shape = family.latent_shape_of_call(height, width, options)
        if latents is None:
            start = jax.vmap(lambda k: jax.random.normal(k, latent_shape, jnp.float32))(start_keys)
        else:
            start = jnp.asarray(latents, jnp.float32)
            if start.shape != (images, *latent_shape):
                raise ValueError(f"latents must have shape {(images, *latent_shape)}, got {tuple(start.shape)}")
            start = start[np.minimum(np.arange(rows), images - 1)]
        start = (start * schedule.init_noise_sigma).astype(family.dtype)
        layers = {}
        if do_nag or do_pag:
            layers = self._layers_with_guidance(start[:1], schedule.timesteps[0], groups["cond"])
        if do_nag:
            self._check_nag_reaches_attention(nag_scale, layers)

        expert_steps, guidance_scale_2 = family.expert_split(schedule, options)
        plan = GuidancePlan(
            cfg=do_cfg,
            nag=do_nag,
            nag_steps=nag_step_split(schedule.timesteps, nag_end, schedule.timestep_kind) if do_nag else 0,
            nag_mode=options.get("nag_mode", "shared-image"),
            nag_norm=nag_norm,
            pag_layers=self._pag_layers(pag_applied_layers, layers) if do_pag else frozenset(),
            per_image=batch_invariant,
            expert_steps=expert_steps,
        )
        scales = Scales(family.cfg_scale(guidance_scale, options), nag_scale, nag_tau, nag_alpha, pag_scale,
                        pag_adaptive_scale, guidance_scale_2)
        reporters, report = [], "none"
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc=f"{family.name} sampling", unit="step")
            reporters.append(lambda step, t, x: bar.update(step + 1 - bar.n))
            report = "steps"
        if callback_on_step is not None:
            reporters.append(lambda step, t, x: callback_on_step(step, t, x[:images]))  # without padding rows
            report = "latents"
        try:
            params = family.params if expert_steps is None else tuple(p for _, p in family.experts())
            final = self.sampler(schedule, plan, params, start, groups, scales, step_keys, parallel, reporters, report)
        finally:
            if progress:
                bar.close()
        final = family.final_latents(final, groups["cond"])[:images]
        output = (lambda value: PipelineOutput(None, value)) if family.video else PipelineOutput
        if output_type == "latent":
            return output(np.asarray(final, np.float32))
        pixels = np.asarray(one_at_a_time(lambda batch: family.decode(batch, height, width), final, batch_invariant))
        if check_finite and not np.isfinite(pixels).all():
            raise FloatingPointError(
                "the generated images contain NaN or Inf (try dtype='float32', or lower nag_scale/guidance_scale)"
            )
        if output_type == "np":
            return output(pixels)
        from PIL import Image

        to_pil = lambda p: Image.fromarray(np.round(np.clip(p, 0, 1) * 255).astype(np.uint8))  # noqa: E731
        return output([[to_pil(f) for f in p] if family.video else to_pil(p) for p in pixels])
