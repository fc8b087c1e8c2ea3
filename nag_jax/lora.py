"""Merging LoRA files into a pipeline's parameters (`NAGPipeline.load_lora_weights`), and undoing it.

A file is read and placed completely first (convert/lora.py: format, layers, where each lands,
shape checks); only when every key has its place are the updates
`scale * (alpha / rank) * up @ down` added, each layer by one jit-compiled function (compiled once
per shape, outside the sampling loop, so sampling afterwards runs exactly as without a LoRA).
A problem raises one LoraError and leaves the pipeline as it was. The parameters before the first
LoRA are kept, so `unload_lora_weights` restores them bit for bit; repeated loads stack.

Which parameters a family exposes to LoRAs is the table `COMPONENTS` (family class -> LoRA file
component -> family attribute, list index, target function). Full deltas (`diff` / `diff_b` of
Wan's CausVid / lightx2v files: a layer without `down`) are added as they are, times the scale.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from convert.checkpoint import open_checkpoint, safetensors_metadata
from convert.lora import LoraError, LoraLayer, Target, clip_targets, flux_targets, read_lora_layers, sd3_targets, \
    unet_targets, wan_targets
from convert.mapping import LAYOUTS

# family class name -> {component: (family attribute, index in its list or None, family -> target function)}
COMPONENTS = {
    "StableDiffusionFamily": {
        "denoiser": ("params", None, lambda f: unet_targets(f.unet.config.layers_per_block)),
        "text_encoder": ("encoder_params", 0, lambda f: clip_targets),
        "text_encoder_2": ("encoder_params", 1, lambda f: clip_targets),
    },
    "FluxFamily": {
        "denoiser": ("params", None, lambda f: flux_targets(f.transformer)),
        "text_encoder": ("clip_params", None, lambda f: clip_targets),
    },
    "SD3Family": {
        "denoiser": ("params", None, lambda f: sd3_targets(f.transformer)),
        "text_encoder": ("clip_params", 0, lambda f: clip_targets),
        "text_encoder_2": ("clip_params", 1, lambda f: clip_targets),
    },
    "WanFamily": {
        "denoiser": ("params", None, lambda f: wan_targets(f.transformer)),
    },
}
_SHOWN = 5  # unplaced keys named in an error


def _family_components(family) -> dict:
    for cls in type(family).__mro__:
        if cls.__name__ in COMPONENTS:
            table = COMPONENTS[cls.__name__]
            return {name: entry for name, entry in table.items() if _get(family, entry) is not None}
    raise LoraError(f"the {family.name} pipeline does not take LoRA files yet "
                    "(supported: SD1.5/SDXL, Flux, SD3, Wan2.1)")


def _get(family, entry):
    attribute, index, _ = entry
    value = getattr(family, attribute, None)
    if index is None or value is None:
        return value
    return value[index] if index < len(value) else None


def _set(family, entry, params):
    attribute, index, _ = entry
    if index is None:
        setattr(family, attribute, params)
    else:
        values = list(getattr(family, attribute))
        values[index] = params
        setattr(family, attribute, values)


def _torch_shape(layer: LoraLayer) -> tuple[int, ...]:
    return layer.up.shape if layer.down is None else (layer.up.shape[0], *layer.down.shape[1:])


def _part_shapes(layer: LoraLayer, layout: str) -> list[tuple[int, ...]]:
    parts = jax.eval_shape(LAYOUTS[layout], jax.ShapeDtypeStruct(_torch_shape(layer), jnp.float32))
    return [tuple(p.shape) for p in (parts if isinstance(parts, tuple) else (parts,))]


def _plan(layers, components, flat_params, targets_of):
    """[(layer, component, targets)] for every layer, or LoraError listing what has no place."""
    plan, unplaced, misshaped = [], [], []
    for layer in layers:
        if layer.component not in components:
            unplaced.append(f"{layer.source} (the pipeline has no {layer.component})")
            continue
        targets = targets_of[layer.component](layer.key)
        if not targets or any(t.path not in flat_params[layer.component] for t in targets):
            unplaced.append(f"{layer.source} (as {layer.key})")
            continue
        parts = _part_shapes(layer, targets[0].layout)
        for target in targets:
            leaf = flat_params[layer.component][target.path]
            want = tuple(leaf.shape if target.layer is None else leaf.shape[1:])
            if parts[target.part] != want:
                misshaped.append(f"{layer.source} -> {target.path}: update {parts[target.part]}, parameter {want}")
        plan.append((layer, targets))
    return plan, unplaced, misshaped


def _add_update(bases, down, up, coefficient, layout: str, picks: tuple):
    """`bases` with `coefficient` (scale * alpha / rank) times up @ down (`down` None: times `up`) added,
    rearranged by `layout`; `picks` gives each base's (part of the layout's output, index on the
    stacked layer axis or None)."""
    if down is None:
        delta = coefficient * up
    else:
        rank = down.shape[0]
        delta = jnp.matmul(up.reshape(up.shape[0], rank), down.reshape(rank, -1), precision=jax.lax.Precision.HIGHEST)
        delta = (coefficient * delta).reshape(up.shape[0], *down.shape[1:])
    parts = LAYOUTS[layout](delta)
    parts = parts if isinstance(parts, tuple) else (parts,)
    merged = []
    for base, (part, layer) in zip(bases, picks):
        if layer is None:
            merged.append((base.astype(jnp.float32) + parts[part]).astype(base.dtype))
        else:
            merged.append(base.at[layer].set((base[layer].astype(jnp.float32) + parts[part]).astype(base.dtype)))
    return tuple(merged)


# Compiled once per shape. The in-place form reuses the buffers of arrays this load already made
# (a stacked parameter gets one layer at a time: without it each layer would copy the whole stack).
_merged = jax.jit(_add_update, static_argnames=("layout", "picks"))
_merged_in_place = jax.jit(_add_update, static_argnames=("layout", "picks"), donate_argnames="bases")


def merge_layer(flat: dict, layer: LoraLayer, targets: list[Target], scale: float, owned: set | None = None):
    """Add `layer`'s update times `scale` to its `targets` in the flat parameter dict `flat`. Paths in
    `owned` hold arrays nothing else refers to, updated in place; the merged paths are added to it."""
    owned = set() if owned is None else owned
    bases = tuple(flat[t.path] for t in targets)
    coefficient = np.float32(scale * layer.alpha / (1 if layer.down is None else layer.down.shape[0]))
    merge = _merged_in_place if all(t.path in owned for t in targets) else _merged
    shardings = [base.sharding if isinstance(base, jax.Array) else None for base in bases]
    merged = merge(bases, layer.down, layer.up, coefficient, targets[0].layout,
                   tuple((t.part, t.layer) for t in targets))
    for target, sharding, new in zip(targets, shardings, merged):
        # a sharded parameter (model_parallel) keeps its placement
        flat[target.path] = new if sharding is None else jax.device_put(new, sharding)
        owned.add(target.path)


def load_lora_weights(pipeline, path, scale: float = 1.0) -> int:
    """Merge the LoRA file at `path` into `pipeline`'s parameters; returns the number of layers patched."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    family = pipeline.family
    components = _family_components(family)
    if not str(path).endswith(".safetensors"):
        raise LoraError(f"{path}: a LoRA file must be a single .safetensors file")
    checkpoint = open_checkpoint(path)
    fmt, layers, unreadable = read_lora_layers(checkpoint, safetensors_metadata(path))
    flat_params = {name: traverse_util.flatten_dict(_get(family, entry), sep="/") for name, entry in components.items()}
    targets_of = {name: entry[2](family) for name, entry in components.items()}
    plan, unplaced, misshaped = _plan(layers, components, flat_params, targets_of)
    unplaced = unreadable + unplaced
    if unplaced or misshaped or not plan:
        problems = [f"{len(unplaced)} of its layers or keys have no place in the {family.name} model: "
                    + ", ".join(unplaced[:_SHOWN]) + (", ..." if len(unplaced) > _SHOWN else "")] if unplaced else []
        problems += misshaped[:_SHOWN] or ([] if unplaced else ["it holds no LoRA layer"])
        raise LoraError(f"{path}: looks like a {fmt} LoRA file, but " + "; ".join(problems) + "; nothing was loaded")
    if not hasattr(pipeline, "lora_base"):
        pipeline.lora_base = {name: _get(family, entry) for name, entry in components.items()}
    owned = {name: set() for name in components}
    for layer, targets in plan:
        merge_layer(flat_params[layer.component], layer, targets, float(scale), owned[layer.component])
    touched = {layer.component for layer, _ in plan}
    for name in touched:
        _set(family, components[name], traverse_util.unflatten_dict(flat_params[name], sep="/"))
    counts = ", ".join(f"{sum(layer.component == name for layer, _ in plan)} in {name}" for name in sorted(touched))
    print(f"LoRA {Path(path).name} ({fmt} format, scale {scale}): {len(plan)} layers patched ({counts})")
    return len(plan)


def unload_lora_weights(pipeline) -> None:
    """Restore the parameters as they were before the first `load_lora_weights` (no-op without one)."""
    base = getattr(pipeline, "lora_base", None)
    if base is None:
        return
    components = _family_components(pipeline.family)
    for name, params in base.items():
        _set(pipeline.family, components[name], params)
    del pipeline.lora_base
