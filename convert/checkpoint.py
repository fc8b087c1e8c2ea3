"""Read safetensors checkpoints (single file or sharded) lazily, one tensor at a time.

safetensors files are memory-mapped and read straight from their header (8-byte length,
JSON table of dtype/shape/offsets), so bfloat16 works without torch and a tensor is read
only when asked for: converting never holds the whole checkpoint twice. Pickle formats can
run code when loaded and are refused unless the caller opts in; then torch's weights-only
loader reads them.

fp8 tensors (safetensors `F8_E4M3` / `F8_E5M2`, torch float8) read as ml_dtypes' float8 types
and upcast when cast. "Scaled" fp8 files (ComfyUI's `*_fp8_e4m3fn_scaled.safetensors`) store
`X.weight` in fp8 next to a float `X.scale_weight`: such a weight reads as float32
`weight * scale_weight`, and the scales, the `X.scale_input` activation scales (for fp8
matmuls, meaningless once upcast) and the `scaled_fp8` marker tensor are not listed as tensors.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
# A component folder converted by nag-jax (nag_jax.converted) holds its parameters in this one
# file under their flat '/'-joined Flax paths; the key maps are then skipped (map_checkpoint).
FLAX_PARAMS_FILE = "nag_jax_params.safetensors"

DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}

_SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
SCALED_FP8_MARKER = "scaled_fp8"  # ComfyUI's marker tensor, possibly under a prefix


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as asked."""


def parse_dtype(dtype) -> np.dtype:
    """'float32' | 'bfloat16' | 'float16' (or the numpy/jax dtype itself) -> numpy dtype."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    resolved = np.dtype(dtype)
    if resolved not in DTYPES.values():
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return resolved


def _read_safetensors_header(path: Path):
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header overruns the file)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    for key, entry in header.items():
        start, end = entry["data_offsets"]
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {entry['dtype']}")
        expected = int(np.prod(entry["shape"], dtype=np.int64)) * _SAFETENSORS_DTYPES[entry["dtype"]].itemsize
        if end - start != expected or data_start + end > size:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file (tensor {key!r} out of bounds)")
    return header, data_start


class Checkpoint:
    """A read-only mapping from tensor name to numpy array, reading on demand."""

    def __init__(self, tensors: dict[str, tuple], description: str, flax_paths: bool = False):
        # name -> (loader() -> np.ndarray, shape)
        self._tensors = tensors
        self.description = description
        self.flax_paths = flax_paths  # keys are already Flax parameter paths (a converted folder)

    def keys(self):
        return self._tensors.keys()

    def __contains__(self, key):
        return key in self._tensors

    def __len__(self):
        return len(self._tensors)

    def shape(self, key) -> tuple[int, ...]:
        return tuple(self._tensors[key][1])

    def require(self, keys, what: str) -> None:
        """An error naming the missing ones unless every key of `keys` is present: the file is not `what`."""
        absent = [k for k in keys if k not in self]
        if absent:
            raise ValueError(f"{self.description}: not {what}; missing {', '.join(absent)}")

    def load(self, key, dtype=None) -> np.ndarray:
        """The tensor as a numpy array, cast to `dtype` if given (a fresh copy, not a view)."""
        array = self._tensors[key][0]()
        return np.array(array, dtype=parse_dtype(dtype) if dtype is not None else array.dtype)

    def renamed(self, rename) -> "Checkpoint":
        """A view with keys passed through `rename(key) -> key or None` (None drops it)."""
        out = {}
        for key, entry in self._tensors.items():
            new = rename(key)
            if new is not None:
                out[new] = entry
        return Checkpoint(out, self.description, self.flax_paths)


def _safetensors_tensors(path: Path) -> dict[str, tuple]:
    header, data_start = _read_safetensors_header(path)
    memory = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for key, entry in header.items():
        start, end = entry["data_offsets"]
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        shape = tuple(entry["shape"])

        def load(start=start, end=end, dtype=dtype, shape=shape):
            return memory[data_start + start : data_start + end].view(dtype).reshape(shape)

        tensors[key] = (load, shape)
    return tensors


def _sharded_tensors(index_path: Path) -> dict[str, tuple]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index_path}: not a safetensors index file ({e})") from None
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.exists():
            raise CheckpointError(f"{index_path}: shard {shard} is missing")
        shard_tensors = _safetensors_tensors(shard_path)
        for key, name in weight_map.items():
            if name == shard:
                if key not in shard_tensors:
                    raise CheckpointError(f"{shard_path}: tensor {key!r} listed in the index is missing")
                tensors[key] = shard_tensors[key]
    return tensors


def _pickle_tensors(path: Path) -> dict[str, tuple]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading a pickle checkpoint needs torch (pip install torch)") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:  # torch raises UnpicklingError and friends for anything but tensors
        raise CheckpointError(
            f"{path}: the weights-only loader refused this pickle file ({type(e).__name__}); it holds "
            "more than tensors, so it could run code: convert it to safetensors with a tool you trust"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    # numpy has no bfloat16 / float8: reinterpret those tensors' bytes as the ml_dtypes types.
    reinterpret = {torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
                   torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
                   torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2)}
    tensors = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            if value.dtype in reinterpret:
                storage, dtype = reinterpret[value.dtype]
                array = value.contiguous().view(storage).numpy().view(dtype)
            else:
                array = value.numpy()
            tensors[key] = (lambda a=array: a, tuple(array.shape))
    return tensors


def _dequantized_fp8(tensors: dict[str, tuple], description: str) -> dict[str, tuple]:
    """Fold each `X.scale_weight` into `X.weight` (read as float32 weight * scale); drop the
    scales, their `X.scale_input` partners and the `scaled_fp8` marker."""
    out = dict(tensors)
    for key in tensors:
        if key == SCALED_FP8_MARKER or key.endswith("." + SCALED_FP8_MARKER):
            del out[key]
        if not key.endswith(".scale_weight"):
            continue
        stem = key[: -len("scale_weight")]
        if stem + "weight" not in tensors:
            raise CheckpointError(f"{description}: {key!r} has no {stem + 'weight'!r} to scale")
        load_scale, _ = out.pop(key)
        out.pop(stem + "scale_input", None)
        load_weight, shape = tensors[stem + "weight"]

        def load(load_weight=load_weight, load_scale=load_scale):
            return load_weight().astype(np.float32) * load_scale().astype(np.float32)

        out[stem + "weight"] = (load, shape)
    return out


def open_checkpoint(path, *, allow_pickle: bool = False) -> Checkpoint:
    """Open a checkpoint: a .safetensors file, a *.safetensors.index.json, a folder holding
    one of those (diffusers' and transformers' names), or, with allow_pickle, a pickle file.
    A folder converted by nag-jax is read from its FLAX_PARAMS_FILE."""
    path = Path(path)
    if path.is_dir() and (path / FLAX_PARAMS_FILE).exists():
        path = path / FLAX_PARAMS_FILE
    elif path.is_dir():
        candidates = sorted(path.glob("*.safetensors.index.json")) or sorted(path.glob("*.safetensors"))
        if len(candidates) != 1:
            found = ", ".join(p.name for p in candidates) or "none"
            raise CheckpointError(f"{path}: expected one safetensors file or index in the folder, found {found}")
        path = candidates[0]
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    name = path.name
    if name.endswith(".safetensors.index.json"):
        tensors = _sharded_tensors(path)
    elif name.endswith(".safetensors"):
        if name == FLAX_PARAMS_FILE:
            return Checkpoint(_safetensors_tensors(path), str(path), flax_paths=True)
        tensors = _safetensors_tensors(path)
    elif name.endswith(PICKLE_SUFFIXES):
        if not allow_pickle:
            raise CheckpointError(
                f"{path}: pickle checkpoints ({', '.join(PICKLE_SUFFIXES)}) can run code when loaded; "
                "pass allow_pickle=True (CLI: --allow-pickle) to read it with torch's weights-only loader"
            )
        tensors = _pickle_tensors(path)
    else:
        raise CheckpointError(f"{path}: unknown checkpoint format (expected .safetensors or a pickle with opt-in)")
    return Checkpoint(_dequantized_fp8(tensors, str(path)), str(path))


def safetensors_metadata(path) -> dict[str, str]:
    """The free-form `__metadata__` strings in the header of a safetensors file that
    `open_checkpoint` has read (so the header is known to be sound); {} when there are none."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(header_len)).get("__metadata__") or {}
