"""Checkpoint reading (single, sharded, pickle opt-in) and the strict key mapping."""

import json
import pickle

import flax.linen as nn
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from convert import CheckpointError, ConversionError, Rule, map_checkpoint, open_checkpoint, parse_dtype, target_shapes


class TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), name="conv_in")(x)
        x = nn.LayerNorm(name="norm")(x)
        return nn.Dense(5, name="proj")(x)


RULES = [
    Rule(r"conv_in\.weight", "conv_in/kernel", "conv"),
    Rule(r"(conv_in|proj)\.bias", r"\1/bias"),
    Rule(r"norm\.weight", "norm/scale"),
    Rule(r"norm\.bias", "norm/bias"),
    Rule(r"proj\.weight", "proj/kernel", "linear"),
]


def torch_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "conv_in.weight": torch.randn(4, 3, 3, 3, generator=g),
        "conv_in.bias": torch.randn(4, generator=g),
        "norm.weight": torch.randn(4, generator=g),
        "norm.bias": torch.randn(4, generator=g),
        "proj.weight": torch.randn(5, 4, generator=g),
        "proj.bias": torch.randn(5, generator=g),
    }


@pytest.fixture
def shapes():
    return target_shapes(TinyNet(), jnp.zeros((1, 8, 8, 3)))


def save_sharded(state, folder, stem="diffusion_pytorch_model"):
    keys = sorted(state)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map = {}
    for i, shard_keys in enumerate(shards, 1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: state[k].contiguous() for k in shard_keys}, str(folder / name))
        weight_map.update({k: name for k in shard_keys})
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_conversion_matches_torch_layouts(tmp_path, shapes):
    state = torch_state()
    save_file(state, str(tmp_path / "model.safetensors"))
    params = map_checkpoint(open_checkpoint(tmp_path / "model.safetensors"), RULES, shapes)
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
    out = TinyNet().apply({"params": params}, x)
    with torch.no_grad():
        h = torch.nn.functional.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), state["conv_in.weight"], state["conv_in.bias"], padding=1)
        h = torch.nn.functional.layer_norm(h.permute(0, 2, 3, 1), (4,), state["norm.weight"], state["norm.bias"], eps=1e-6)
        expected = torch.nn.functional.linear(h, state["proj.weight"], state["proj.bias"]).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_sharded_bfloat16_checkpoint_reads_and_casts(tmp_path, shapes):
    state = {k: v.to(torch.bfloat16) for k, v in torch_state().items()}
    save_sharded(state, tmp_path)
    checkpoint = open_checkpoint(tmp_path)  # the folder: finds the index
    assert sorted(checkpoint.keys()) == sorted(state)
    assert checkpoint.load("proj.weight").dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(checkpoint.load("proj.weight", "float32"), state["proj.weight"].float().numpy())
    for dtype in ("float32", "bfloat16", "float16"):
        params = map_checkpoint(checkpoint, RULES, shapes, dtype=dtype)
        assert params["proj"]["kernel"].dtype == parse_dtype(dtype)
        np.testing.assert_allclose(
            params["proj"]["kernel"].astype(np.float32), state["proj.weight"].float().numpy().T, rtol=1e-2
        )


def test_strict_mapping_lists_every_problem_at_once(tmp_path, shapes):
    state = torch_state()
    del state["norm.bias"]
    state["proj.weight"] = torch.zeros(6, 4)
    state["extra.weight"] = torch.zeros(3)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError) as info:
        map_checkpoint(open_checkpoint(tmp_path / "model.safetensors"), RULES, shapes, what="tiny")
    error = info.value
    assert error.missing == ["norm/bias"] and error.unexpected == ["extra.weight"]
    assert [m[0] for m in error.misshaped] == ["proj.weight -> proj/kernel"]
    message = str(error)
    assert "tiny" in message and "norm/bias" in message and "extra.weight" in message and "(4, 6)" in message


def test_truncated_and_corrupt_files_are_refused(tmp_path):
    save_file(torch_state(), str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) - 10])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        open_checkpoint(tmp_path / "truncated.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        open_checkpoint(tmp_path / "garbage.safetensors")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        open_checkpoint(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("suffix", [".bin", ".ckpt", ".pt", ".pth"])
def test_pickle_needs_opt_in_then_loads_tensors_only(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save({"state_dict": torch_state()}, path)
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        open_checkpoint(path)
    checkpoint = open_checkpoint(path, allow_pickle=True)
    np.testing.assert_array_equal(checkpoint.load("proj.bias"), torch_state()["proj.bias"].numpy())


class Payload:
    """Unpickling this would run code: the weights-only loader must refuse it."""

    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_pickle_with_code_is_refused_even_with_opt_in(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"weight": Payload()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="weights-only loader refused"):
        open_checkpoint(path, allow_pickle=True)
    assert "pickle code ran" not in capsys.readouterr().out


def test_dtype_names_are_checked():
    assert parse_dtype("bfloat16") == np.dtype(ml_dtypes.bfloat16)
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16, got 'fp8'"):
        parse_dtype("fp8")
