"""Parameter sharding for models bigger than one device (FSDP-style, over a `model` mesh axis).

Each large parameter is split along its largest axis that divides by the `model` axis size;
small ones (norm scales, biases) and ones with no divisible axis are replicated. Parameters of
blocks run under scan are stacked along a leading layer axis, which is never split: each scan
step slices one layer, so a split layer axis would make XLA gather the whole stack. Under `jax.jit`
XLA gathers a layer's weights where that layer runs, so only one layer's full weights live on a
device at a time, besides the 1/model_parallel share of all of them. The sampler uses this for
`parallel="sharded"`; `per_device_bytes` reads the resulting per-device share off XLA's memory
analysis without allocating anything (for real-size configs built with `jax.eval_shape`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Parameters smaller than this (elements) stay replicated: splitting them saves nothing.
MIN_SHARDED_SIZE = 2**16


def partition_spec(shape: tuple[int, ...], parts: int, min_size: int | None = None,
                   axis_name: str = "model", stacked: bool = False) -> PartitionSpec:
    """Split along the largest axis divisible by `parts` (never a `stacked` array's leading layer
    axis); replicate small or indivisible arrays."""
    min_size = MIN_SHARDED_SIZE if min_size is None else min_size
    if parts == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    candidates = [axis for axis, size in enumerate(shape) if size % parts == 0 and axis >= int(stacked)]
    if not candidates:
        return PartitionSpec()
    axis = max(candidates, key=lambda a: shape[a])  # ties: the first such axis
    return PartitionSpec(*([None] * axis + [axis_name]))


def param_shardings(params, mesh: Mesh, axis_name: str = "model", min_size: int | None = None, stacked=()):
    """A NamedSharding per parameter leaf (arrays or ShapeDtypeStructs) for `mesh`; `stacked`:
    '/'-joined paths of the subtrees stacked along a leading layer axis (`Family.stacked_params`)."""
    parts = mesh.shape[axis_name] if axis_name in mesh.shape else 1

    def sharding(path, leaf):
        name = "/".join(str(getattr(key, "key", key)) for key in path)
        in_stack = any(name.startswith(prefix + "/") for prefix in stacked)
        return NamedSharding(mesh, partition_spec(leaf.shape, parts, min_size, axis_name, in_stack))

    return jax.tree_util.tree_map_with_path(sharding, params)


def shard_params(params, mesh: Mesh, axis_name: str = "model", min_size: int | None = None):
    """Place `params` (host numpy arrays, as the converters return them) onto `mesh`'s devices,
    each device receiving only its shards."""
    return jax.device_put(params, param_shardings(params, mesh, axis_name, min_size))


def total_bytes(params) -> int:
    return sum(int(np.prod(leaf.shape, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
               for leaf in jax.tree.leaves(params))


def per_device_bytes(params, mesh: Mesh, axis_name: str = "model", min_size: int | None = None) -> int:
    """Bytes of parameters one device holds under `param_shardings`, from XLA's memory analysis
    of a compiled program taking them as arguments (`params` may be ShapeDtypeStructs)."""
    shardings = param_shardings(params, mesh, axis_name, min_size)
    abstract = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), params, shardings)
    compiled = jax.jit(lambda p: jnp.zeros(()), keep_unused=True).lower(abstract).compile()
    return int(compiled.memory_analysis().argument_size_in_bytes)
