"""Checkpoints with one tensor per layer -> Flax parameters stacked on a leading layer axis.

Models that run their repeated blocks under `nn.scan` keep each block parameter as one array
[num_layers, ...] under the scan's name (`blocks/...`). Key maps stay per layer: they route
`transformer_blocks.3.attn1.to_q.weight` to `blocks_3/attn1/to_q/kernel`, checked against the
per-layer shapes, and the layers are stacked afterwards. A converted folder (Flax paths) holds
the stacked arrays themselves and is mapped directly.
"""

from __future__ import annotations

import re

import numpy as np
from flax import traverse_util

from convert.checkpoint import Checkpoint
from convert.mapping import map_checkpoint


def per_layer_shapes(shapes: dict, stacked: str, num_layers: int) -> dict:
    """Flat shapes with each `stacked/...` entry [L, ...] replaced by `stacked_i/...` entries [...]."""
    out = {}
    for path, shape in shapes.items():
        if path.startswith(stacked + "/"):
            rest = path[len(stacked) + 1:]
            out.update({f"{stacked}_{i}/{rest}": shape[1:] for i in range(num_layers)})
        else:
            out[path] = shape
    return out


def stack_layers(params: dict, stacked: str, num_layers: int) -> dict:
    """Nested params with `stacked_i/...` subtrees -> one `stacked/...` subtree of stacked arrays."""
    flat = traverse_util.flatten_dict(params, sep="/")
    layer_of = re.compile(rf"{re.escape(stacked)}_(\d+)/(.+)")
    layers: dict[str, dict[int, np.ndarray]] = {}
    out = {}
    for path, array in flat.items():
        match = layer_of.fullmatch(path)
        if match:
            layers.setdefault(match.group(2), {})[int(match.group(1))] = array
        else:
            out[path] = array
    for rest, arrays in layers.items():
        out[f"{stacked}/{rest}"] = np.stack([arrays[i] for i in range(num_layers)])
    return traverse_util.unflatten_dict(out, sep="/")


def map_stacked_checkpoint(checkpoint: Checkpoint, rules, shapes: dict, stacked: str, num_layers: int,
                           dtype="float32", what: str = "checkpoint"):
    """`map_checkpoint` for a model whose `stacked` subtree is scanned over `num_layers` layers."""
    if checkpoint.flax_paths:
        return map_checkpoint(checkpoint, rules, shapes, dtype, what)
    params = map_checkpoint(checkpoint, rules, per_layer_shapes(shapes, stacked, num_layers), dtype, what)
    return stack_layers(params, stacked, num_layers)
