"""LoRA files -> low-rank updates placed on our parameter paths through the converters' key maps.

A LoRA file stores, per adapted layer, `down` [rank, in(, kh, kw)] and `up` [out, rank(, 1, 1)]
factors (and optionally `alpha`) under names in one of these formats, told apart by the keys:

- "diffusers": diffusers / PEFT, `unet.` / `transformer.` / `text_encoder.` / `text_encoder_2.`
  prefixes, `lora_A` / `lora_B` (or the older `lora.down` / `lora.up`), optional `.alpha`, and
  PEFT's `lora_alpha` in the header's `lora_adapter_metadata`;
- "kohya": `lora_unet_` / `lora_te1_` (or `lora_te_`) / `lora_te2_` and the module path with
  underscores for dots, `.lora_down` / `.lora_up` / `.alpha`. The UNet names are diffusers' (SD1.5)
  or the original LDM ones (SDXL: `input_blocks_4_1_...`); Flux names are BFL's fused layout;
- "comfyui": `diffusion_model.` + original (LDM / BFL / Wan) module paths, kohya's factor names (and
  `text_encoders.clip_l.transformer.` + transformers' names for Flux's CLIP); Wan files (CausVid,
  lightx2v) also carry full deltas: `.diff` added to the module's weight, `.diff_b` to its bias;
- "xlabs": XLabs' Flux names (`double_blocks.N.processor.qkv_lora1.down.weight`, ...).

Each layer becomes a `LoraLayer` naming its component (`denoiser`, `text_encoder`,
`text_encoder_2`) and the parameter's checkpoint key in a naming the component's converter reads
(diffusers, transformers, LDM, BFL, original Wan). Placing it is one function per family
(`unet_targets`, `clip_targets`, `flux_targets`, `sd3_targets`, `wan_targets`): the key goes
through the same key map the converter uses, which says which of our parameters it lands on (for
blocks run under scan: the stacked parameter and the layer's index along its leading axis,
`convert.mapping.stacked_location`) and how the torch-layout update is rearranged (transposed,
split in q/k/v, ...). Nothing here touches parameters; nag_jax/lora.py merges.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Callable

import numpy as np

from convert.checkpoint import Checkpoint
from convert.clip import CLIP_RULES
from convert.flux import BFL_RULES, DIFFUSERS_RULES as FLUX_DIFFUSERS_RULES
from convert.mapping import route, stacked_location
from convert.sd3 import diffusers_rules as sd3_diffusers_rules
from convert.single_file import unet_renamer
from convert.unet import UNET_RULES
from convert.wan import DIFFUSERS_RULES as WAN_DIFFUSERS_RULES, original_to_diffusers

FORMATS = ("diffusers", "kohya", "comfyui", "xlabs")
DIFFUSERS_PREFIXES = {"unet": "denoiser", "transformer": "denoiser", "text_encoder": "text_encoder",
                      "text_encoder_2": "text_encoder_2"}
KOHYA_PREFIXES = {"lora_unet": "denoiser", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                  "lora_te2": "text_encoder_2"}
COMFYUI_PREFIXES = {"model.diffusion_model.": "denoiser", "diffusion_model.": "denoiser",
                    "text_encoders.clip_l.transformer.": "text_encoder"}  # the last: Flux's CLIP-L

# (layer name, role) from the end of a key; longer suffixes first.
_FACTOR_SUFFIXES = [
    (r"\.lora_A\.weight", "down"), (r"\.lora_B\.weight", "up"),
    (r"\.lora\.down\.weight", "down"), (r"\.lora\.up\.weight", "up"),
    (r"\.lora_down\.weight", "down"), (r"\.lora_up\.weight", "up"),
    (r"\.down\.weight", "down"), (r"\.up\.weight", "up"),
    (r"\.alpha", "alpha"),
    (r"\.diff", "diff"), (r"\.diff_b", "diff_b"),  # full deltas of a weight / a bias (ComfyUI, Wan)
]
_DELTA_PARAMS = {"diff": "weight", "diff_b": "bias"}

# Module names with underscores inside, to rebuild dotted paths from kohya's underscored ones.
_COMPOUND_NAMES = {
    # diffusers UNet
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in",
    "proj_out", "conv_in", "conv_out", "conv_shortcut", "time_emb_proj", "time_embedding", "linear_1", "linear_2",
    "add_embedding", "conv_norm_out", "cond_proj",
    # LDM UNet (SDXL kohya)
    "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers", "skip_connection",
    "time_embed", "label_emb",
    # CLIP text encoders
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "layer_norm1", "layer_norm2",
    "final_layer_norm", "text_projection",
    # BFL Flux
    "double_blocks", "single_blocks", "img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod", "txt_mod",
    "final_layer", "adaLN_modulation", "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "in_layer",
    "out_layer", "query_norm", "key_norm",
    # original Wan (musubi-tuner's kohya names)
    "cross_attn", "k_img", "v_img", "norm_k_img", "norm_q", "norm_k", "time_embedding", "text_embedding",
    "time_projection", "img_emb",
}
_LONGEST_COMPOUND = max(name.count("_") + 1 for name in _COMPOUND_NAMES)

# XLabs Flux processor names -> BFL module paths (double blocks) or their own handling (single).
_XLABS_DOUBLE = {"qkv_lora1": "img_attn.qkv", "qkv_lora2": "txt_attn.qkv", "proj_lora1": "img_attn.proj",
                 "proj_lora2": "txt_attn.proj"}


class LoraError(ValueError):
    """A LoRA file that cannot be applied to the pipeline's model as a whole."""


@dataclasses.dataclass(frozen=True)
class LoraLayer:
    component: str  # "denoiser", "text_encoder" or "text_encoder_2"
    module: str  # module path in a naming the component's key map reads
    down: np.ndarray | None  # [rank, in] or [rank, in, kh, kw]; None: `up` is the whole update (a diff)
    up: np.ndarray  # [out, rank] or [out, rank, 1, 1], or a diff shaped as the parameter
    alpha: float  # the update is (alpha / rank) up @ down (a diff: up)
    source: str  # the layer's name in the file, for messages
    param: str = "weight"  # the module's parameter it updates ("bias": a `diff_b`)

    @property
    def key(self) -> str:
        """The updated parameter's checkpoint key."""
        return f"{self.module}.{self.param}"


@dataclasses.dataclass(frozen=True)
class Target:
    """Where (part `part` of) a layer's update lands: parameter `path`, at `layer` of its leading
    stacked axis when the model scans over layers (None: not stacked), after `layout`."""

    path: str
    layer: int | None
    layout: str
    part: int


def detect_format(keys, description: str = "LoRA file") -> str:
    """The format (one of FORMATS) the key names follow; LoraError when none."""
    keys = list(keys)
    if any(k.startswith(tuple(p + "_" for p in KOHYA_PREFIXES)) for k in keys):
        return "kohya"
    if any(k.startswith(tuple(p + "." for p in DIFFUSERS_PREFIXES)) for k in keys):
        return "diffusers"
    if any(".processor." in k and re.search(r"(qkv|proj)_lora\d?\.", k) for k in keys):
        return "xlabs"
    if any(k.startswith(tuple(COMFYUI_PREFIXES)) for k in keys):
        return "comfyui"
    raise LoraError(f"{description}: not a LoRA file of a known format ({', '.join(FORMATS)}); its first keys: "
                    + ", ".join(keys[:4]))


def dotted(underscored: str) -> str:
    """kohya's `down_blocks_0_attentions_0_proj_in` -> `down_blocks.0.attentions.0.proj_in`."""
    tokens, parts, i = underscored.split("_"), [], 0
    while i < len(tokens):
        for width in range(min(_LONGEST_COMPOUND, len(tokens) - i), 0, -1):
            name = "_".join(tokens[i:i + width])
            if width == 1 or name in _COMPOUND_NAMES:
                parts.append(name)
                i += width
                break
    return ".".join(parts)


def _split_key(key: str):
    for suffix, role in _FACTOR_SUFFIXES:
        match = re.fullmatch(rf"(.+){suffix}", key)
        if match:
            return match.group(1), role
    return None, None


def _place(fmt: str, name: str):
    """(component, module path) of a layer name in the file, or None when the format has no place for it."""
    if fmt == "diffusers":
        prefix, _, module = name.partition(".")
        return (DIFFUSERS_PREFIXES[prefix], module) if prefix in DIFFUSERS_PREFIXES and module else None
    if fmt == "kohya":
        match = re.fullmatch(r"(lora_unet|lora_te[12]?)_(.+)", name)
        return (KOHYA_PREFIXES[match.group(1)], dotted(match.group(2))) if match else None
    if fmt == "comfyui":
        for prefix, component in COMFYUI_PREFIXES.items():
            if name.startswith(prefix):
                return component, name[len(prefix):]
        return None
    name = name.removeprefix("diffusion_model.")  # xlabs
    if match := re.fullmatch(r"double_blocks\.(\d+)\.processor\.(\w+)", name):
        module = _XLABS_DOUBLE.get(match.group(2))
        return ("denoiser", f"double_blocks.{match.group(1)}.{module}") if module else None
    if match := re.fullmatch(r"single_blocks\.(\d+)\.processor\.proj_lora", name):
        return "denoiser", f"single_blocks.{match.group(1)}.linear2"
    if match := re.fullmatch(r"single_blocks\.(\d+)\.processor\.qkv_lora", name):
        # only the attention part of BFL's fused linear1: diffusers' separate q, k, v (up split in thirds)
        return "denoiser", tuple(f"single_transformer_blocks.{match.group(1)}.attn.to_{x}" for x in "qkv")
    return None


def _peft_alphas(checkpoint: Checkpoint, metadata: dict) -> dict[str, float]:
    """component -> PEFT's `lora_alpha`, from the `lora_adapter_metadata` header diffusers'
    `save_lora_weights` writes (the update is then lora_alpha / r times up @ down); {} without it."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    metadata = json.loads(raw)
    alphas = {}
    for prefix, component in DIFFUSERS_PREFIXES.items():
        config = metadata.get(prefix) if isinstance(metadata.get(prefix), dict) else {
            k[len(prefix) + 1:]: v for k, v in metadata.items() if k.startswith(prefix + ".")}
        if config.get("alpha_pattern") or config.get("rank_pattern"):
            raise LoraError(f"{checkpoint.description}: per-layer alpha_pattern / rank_pattern in the PEFT metadata "
                            "are not supported")
        if "lora_alpha" in config:
            alphas[component] = float(config["lora_alpha"])
    return alphas


def read_lora_layers(checkpoint: Checkpoint, metadata: dict) -> tuple[str, list[LoraLayer], list[str]]:
    """(format, layers, keys it could not read as LoRA layers) of an opened LoRA file and its
    header's `metadata` (convert.checkpoint.safetensors_metadata)."""
    fmt = detect_format(checkpoint.keys(), checkpoint.description)
    peft_alphas = _peft_alphas(checkpoint, metadata) if fmt == "diffusers" else {}
    factors, unplaced = {}, []
    for key in checkpoint.keys():
        name, role = _split_key(key)
        if name is None:
            unplaced.append(key)
        else:
            factors.setdefault(name, {})[role] = key
    layers = []
    for name, roles in factors.items():
        place = _place(fmt, name)
        factored = {"down", "up", "alpha"} & roles.keys()
        if place is None or factored and not {"down", "up"} <= factored:
            unplaced.extend(roles.values())
            continue
        component, module = place
        for role in _DELTA_PARAMS.keys() & roles.keys():  # a module's full deltas: as they are, scaled
            layers.append(LoraLayer(component, module, None, checkpoint.load(roles[role], "float32"), 1.0,
                                    roles[role], _DELTA_PARAMS[role]))
        if not factored:
            continue
        down, up = checkpoint.load(roles["down"], "float32"), checkpoint.load(roles["up"], "float32")
        rank = down.shape[0]
        if up.ndim < 2 or up.shape[1] != rank:
            raise LoraError(f"{checkpoint.description}: {name} has down {down.shape} and up {up.shape}, "
                            "whose ranks differ")
        alpha = float(checkpoint.load(roles["alpha"], "float32")) if "alpha" in roles else peft_alphas.get(
            component, float(rank))
        modules = module if isinstance(module, tuple) else (module,)
        for part, part_up in zip(modules, np.split(up, len(modules))):
            layers.append(LoraLayer(component, part, down, part_up, alpha, name))
    return fmt, layers, unplaced


def _routed(rules, stacks=()) -> Callable[[str], list[Target]]:
    """Targets of a parameter's checkpoint key by a converter's key map and the model's stacked
    layers (`LayerStack`s of blocks run under scan); [] if no rule matches."""

    def targets(key: str) -> list[Target]:
        rule, paths = route(rules, key)
        if rule is None:
            return []
        return [Target(*stacked_location(path, stacks), rule.layout, part) for part, path in enumerate(paths)]

    return targets


_UNET_TARGETS = _routed(UNET_RULES)
_LDM_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "out.", "time_embed.", "label_emb.")


def unet_targets(layers_per_block) -> Callable[[str], list[Target]]:
    """The UNet's: diffusers module paths, or LDM ones (SDXL kohya files) renamed as single files are
    (LDM numbering needs the same `layers_per_block`, an int or one per block, in every block)."""
    rename = unet_renamer(np.max(layers_per_block))

    def targets(key: str) -> list[Target]:
        if key.startswith(_LDM_ROOTS):
            key = rename(key)[0][0]
        return _UNET_TARGETS(key)

    return targets


clip_targets = _routed(CLIP_RULES)


def flux_targets(model) -> Callable[[str], list[Target]]:
    """Flux's: diffusers module paths and BFL's fused ones, onto the model's stacked blocks."""
    return _routed(FLUX_DIFFUSERS_RULES + BFL_RULES, model.layer_stacks)


def sd3_targets(module) -> Callable[[str], list[Target]]:
    """SD3's: diffusers module paths, onto the model's stacked joint blocks."""
    return _routed(sd3_diffusers_rules(), module.layer_stacks)


def wan_targets(model) -> Callable[[str], list[Target]]:
    """Wan2.1's: diffusers module paths, or original Wan ones (ComfyUI / Kijai / musubi files)
    renamed as the converter renames original checkpoints, onto the model's stacked blocks. A
    `diff` names its weight `.weight`; the modulation tables have no such suffix."""
    routed = _routed(WAN_DIFFUSERS_RULES, model.layer_stacks)

    def targets(key: str) -> list[Target]:
        return routed(original_to_diffusers(key)) or routed(original_to_diffusers(key.removesuffix(".weight")))

    return targets
