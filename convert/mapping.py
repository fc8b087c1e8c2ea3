"""Strict mapping from checkpoint keys to a Flax parameter tree, driven by key maps as data.

A key map is a list of `Rule`s: a regular expression over checkpoint keys, a target Flax
path template ('/'-separated, regex groups as \\1), and a layout naming how the tensor is
rearranged. The first rule whose pattern matches a key wins. Repeated blocks run under scan
keep their weights stacked along a leading layer axis (`models.layers.LayerStack`): the rules
name each layer's weights as the unrolled model would (`blocks_3/...`), and `map_checkpoint`
stacks them (`stack_layers`; `unstack_layers` is the inverse). The targets' shapes come from
`jax.eval_shape` of the module's init, so nothing is allocated to check them. Every problem
(missing, unexpected, mis-shaped) is collected and reported in one error.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import jax
import numpy as np
from flax import traverse_util

from convert.checkpoint import Checkpoint, parse_dtype


def _linear(w):
    """torch Linear [out, in] -> Flax Dense kernel [in, out]."""
    return w.T


def _conv(w):
    """torch ConvNd [out, in, *window] -> Flax Conv kernel [*window, in, out] (2D: [h, w, in, out])."""
    return w.transpose(*range(2, w.ndim), 1, 0)


def _as_is(w):
    return w


def _split_thirds(w):
    """Fused [q; k; v] along the output axis (BFL / Stability single files) -> (q, k, v)."""
    return tuple(np.split(w, 3, axis=0))


def _swap_halves(w):
    """[shift; scale] along the output axis (BFL / Stability final adaLN) -> diffusers' [scale; shift].
    Indexing rather than concatenation, so it also rearranges traced arrays (LoRA merging)."""
    half = w.shape[0] // 2
    return w[np.r_[half : w.shape[0], 0:half]]


# name -> tensor rearrangement; families add their own (e.g. fused-qkv splits) here.
LAYOUTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "linear": _linear,
    "conv": _conv,
    "as_is": _as_is,
    "flatten": np.ravel,  # per-channel vectors stored with broadcast axes, e.g. Wan's RMS gamma [C, 1, 1, 1]
    "fused_qkv_linear": lambda w: tuple(_linear(part) for part in _split_thirds(w)),
    "fused_qkv_bias": _split_thirds,
    "swap_halves_linear": lambda w: _linear(_swap_halves(w)),
    "swap_halves_bias": _swap_halves,
}


@dataclasses.dataclass(frozen=True)
class Rule:
    """Checkpoint keys matching `pattern` (full match) go to `target` after `layout`.

    `target` may be a tuple of templates when the layout splits one tensor into several
    (then the layout returns a tuple of arrays, in the same order).
    """

    pattern: str
    target: str | tuple[str, ...]
    layout: str = "as_is"


class ConversionError(ValueError):
    """A checkpoint that does not fit the model: lists every mismatch at once."""

    def __init__(self, what: str, missing=(), unexpected=(), misshaped=()):
        self.missing, self.unexpected, self.misshaped = sorted(missing), sorted(unexpected), list(misshaped)
        lines = [f"{what}: the checkpoint does not match the model"]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        for key, got, want in self.misshaped:
            lines.append(f"  wrong shape: {key} is {got}, the model expects {want}")
        super().__init__("\n".join(lines))


def target_shapes(module, *init_args, **init_kwargs) -> dict[str, tuple[int, ...]]:
    """Flat '/'-joined parameter paths -> shapes, without allocating the parameters."""
    variables = jax.eval_shape(module.init, jax.random.key(0), *init_args, **init_kwargs)
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def _stacked_part(path: str, stacks):
    """(stack, global layer index, rest of the path) of an unrolled per-layer `path`, or None."""
    for stack in stacks:
        for index in stack.layers:
            prefix = stack.layer_path(index) + "/"
            if path.startswith(prefix):
                return stack, index, path[len(prefix) :]
    return None


def stack_layers(flat: dict, stacks) -> dict:
    """Flat per-layer arrays -> flat arrays stacked along a new leading axis per `stacks`.
    Empties `flat` as it goes, so at most one stacked parameter exists twice (real sizes)."""
    per_stack = {}
    for path in list(flat):
        found = _stacked_part(path, stacks)
        if found is not None:
            stack, index, rest = found
            per_stack.setdefault(f"{stack.path}/{rest}", {})[index] = path
    out = {}
    for path, layer_paths in per_stack.items():
        out[path] = np.stack([flat.pop(layer_paths[index]) for index in sorted(layer_paths)])
    out.update(flat)
    flat.clear()
    return out


def unstack_layers(flat: dict, stacks, layer=lambda array, i: array[i]) -> dict:
    """Flat arrays with stacked parameters -> flat per-layer (unrolled) arrays; `stack_layers`
    undone. `layer(value, i)` is the i-th layer of a stacked value (for shapes: its shape[1:])."""
    out = {}
    for path, array in flat.items():
        stack = next((s for s in stacks if path.startswith(s.path + "/")), None)
        if stack is None:
            out[path] = array
            continue
        rest = path[len(stack.path) + 1 :]
        out.update((f"{stack.layer_path(index)}/{rest}", layer(array, i)) for i, index in enumerate(stack.layers))
    return out


def param_location(key: str, rules, stacks=()) -> tuple[str, int | None]:
    """Where checkpoint tensor `key` lands: (Flax parameter path, its index along the leading
    layer axis of a stacked parameter, or None for an unstacked one). For code that edits
    converted parameters in place (LoRA). Raises ValueError for a key no rule maps to one tensor."""
    rule, targets = route(rules, key)
    if rule is None or len(targets) != 1:
        raise ValueError(f"{key!r} is not a checkpoint key that maps to one parameter")
    return stacked_location(targets[0], stacks)


def stacked_location(path: str, stacks=()) -> tuple[str, int | None]:
    """An unrolled per-layer parameter `path` (as the rules name it) -> (the stacked parameter's
    path, the layer's index along its leading axis), or (path, None) when not stacked."""
    found = _stacked_part(path, stacks)
    if found is None:
        return path, None
    stack, index, rest = found
    return f"{stack.path}/{rest}", stack.layers.index(index)


def route(rules, key):
    """(the first rule whose pattern matches `key`, its expanded target paths), or (None, ())."""
    for rule in rules:
        match = re.fullmatch(rule.pattern, key)
        if match:
            targets = rule.target if isinstance(rule.target, tuple) else (rule.target,)
            return rule, tuple(match.expand(t) for t in targets)
    return None, ()


# A converted folder's keys are the Flax paths themselves: each goes to itself, unchanged.
FLAX_PATH_RULES = [Rule(r"(.+)", r"\1")]


def map_checkpoint(checkpoint: Checkpoint, rules, shapes: dict, dtype="float32", what: str = "checkpoint", stacks=()):
    """Build the nested Flax `params` dict from `checkpoint` following `rules`.

    Raises ConversionError naming every missing, unexpected and mis-shaped key (per layer for
    stacked parameters). Tensors are read, rearranged and cast one at a time; per-layer tensors
    are stacked per `stacks` (`models.layers.LayerStack`s of the model). A checkpoint holding
    Flax paths (a folder written by nag_jax.converted) skips `rules` and is checked just as
    strictly; it is stacked already unless written before the blocks ran under scan.
    """
    dtype = parse_dtype(dtype)
    if checkpoint.flax_paths:
        rules = FLAX_PATH_RULES
        stacks = stacks if any(_stacked_part(key, stacks) for key in checkpoint.keys()) else ()
    shapes = unstack_layers(shapes, stacks, lambda shape, _: shape[1:])
    routes, unexpected = {}, []
    for key in checkpoint.keys():
        rule, targets = route(rules, key)
        if rule is None or not all(t in shapes for t in targets):
            unexpected.append(key)
        else:
            routes[key] = (rule, targets)
    produced = {t for _, targets in routes.values() for t in targets}
    missing = set(shapes) - produced
    flat, misshaped = {}, []
    for key, (rule, targets) in routes.items():
        arrays = LAYOUTS[rule.layout](checkpoint.load(key))
        arrays = arrays if isinstance(arrays, tuple) else (arrays,)
        for target, array in zip(targets, arrays):
            if tuple(array.shape) != shapes[target]:
                misshaped.append((f"{key} -> {target}", tuple(array.shape), shapes[target]))
            else:
                flat[target] = np.asarray(array, dtype=dtype)
    if missing or unexpected or misshaped:
        raise ConversionError(what, missing, unexpected, misshaped)
    return traverse_util.unflatten_dict(stack_layers(flat, stacks), sep="/")
