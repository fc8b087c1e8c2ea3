"""fp8 checkpoints: safetensors F8_E4M3 / F8_E5M2 and torch float8 pickles read and upcast to the
values torch gives; ComfyUI "scaled" files read as weight * scale_weight, their scale and marker
tensors hidden; sharded files too."""

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from convert.checkpoint import CheckpointError, open_checkpoint
from convert.mapping import Rule, map_checkpoint


def weights():
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=generator) * 3 for name, shape in
            (("proj.weight", (8, 4)), ("conv.weight", (6, 4, 3, 3)), ("proj.bias", (8,)))}


def test_fp8_tensors_read_and_upcast_exactly(tmp_path):
    state = weights()
    stored = {"e4m3": state["proj.weight"].to(torch.float8_e4m3fn), "e5m2": state["conv.weight"].to(torch.float8_e5m2),
              "bf16": state["proj.bias"].to(torch.bfloat16)}
    save_file(stored, str(tmp_path / "model.safetensors"))
    torch.save(stored, tmp_path / "model.pth")
    for checkpoint in (open_checkpoint(tmp_path / "model.safetensors"),
                       open_checkpoint(tmp_path / "model.pth", allow_pickle=True)):
        assert checkpoint.load("e4m3").dtype == ml_dtypes.float8_e4m3fn
        assert checkpoint.load("e5m2").dtype == ml_dtypes.float8_e5m2
        assert checkpoint.load("bf16").dtype == ml_dtypes.bfloat16
        for key, tensor in stored.items():
            np.testing.assert_array_equal(checkpoint.load(key, "float32"), tensor.float().numpy(), err_msg=key)


def scaled_file(state):
    """ComfyUI's layout: fp8 weights with a float32 per-tensor scale_weight (and scale_input),
    other tensors unquantised, plus the `scaled_fp8` marker. -> (file dict, expected float32)."""
    stored, expected = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, {}
    for key, value in state.items():
        if key.endswith(".weight"):
            scale = value.abs().max() / 448.0  # e4m3fn's largest finite value
            stored[key] = (value / scale).to(torch.float8_e4m3fn)
            stored[key.replace(".weight", ".scale_weight")] = scale.reshape(1)
            stored[key.replace(".weight", ".scale_input")] = torch.ones(1)
            expected[key] = stored[key].float().numpy() * scale.item()
        else:
            stored[key] = value.to(torch.bfloat16)
            expected[key] = stored[key].float().numpy()
    return stored, expected


def test_scaled_fp8_reads_as_weight_times_scale(tmp_path):
    state = weights()
    stored, expected = scaled_file(state)
    save_file(stored, str(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"))
    checkpoint = open_checkpoint(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    assert sorted(checkpoint.keys()) == sorted(state)  # no scales, no marker
    for key, value in expected.items():
        loaded = checkpoint.load(key, "float32")
        np.testing.assert_allclose(loaded, value, rtol=1e-6, err_msg=key)
        error = np.abs(loaded - state[key].float().numpy()).max()
        assert 0 < error < 0.1 * np.abs(value).max()  # fp8-rounded, scaled back to the weight's range

    # Through a key map into Flax parameters (the path every converter takes), cast to bfloat16.
    rules = [Rule(r"proj\.weight", "proj/kernel", "linear"), Rule(r"proj\.bias", "proj/bias"),
             Rule(r"conv\.weight", "conv/kernel", "conv")]
    shapes = {"proj/kernel": (4, 8), "proj/bias": (8,), "conv/kernel": (3, 3, 4, 6)}
    params = map_checkpoint(checkpoint, rules, shapes, "bfloat16")
    np.testing.assert_array_equal(params["proj"]["kernel"], expected["proj.weight"].T.astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(params["conv"]["kernel"],
                                  expected["conv.weight"].transpose(2, 3, 1, 0).astype(ml_dtypes.bfloat16))


def test_scaled_fp8_across_shards_and_in_pickles(tmp_path):
    stored, expected = scaled_file(weights())
    # Weights in one shard, their scales in the other.
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in stored.items() if "scale" not in k},
              "model-00002-of-00002.safetensors": {k: v for k, v in stored.items() if "scale" in k}}
    for name, part in shards.items():
        save_file(part, str(tmp_path / name))
    index = {"weight_map": {key: name for name, part in shards.items() for key in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    torch.save(stored, tmp_path / "model.pth")
    for checkpoint in (open_checkpoint(tmp_path), open_checkpoint(tmp_path / "model.pth", allow_pickle=True)):
        assert sorted(checkpoint.keys()) == sorted(expected)
        for key, value in expected.items():
            np.testing.assert_allclose(checkpoint.load(key, "float32"), value, rtol=1e-6, err_msg=key)


def test_a_scale_without_its_weight_is_refused(tmp_path):
    save_file({"proj.scale_weight": torch.ones(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="'proj.scale_weight' has no 'proj.weight' to scale"):
        open_checkpoint(tmp_path / "model.safetensors")
