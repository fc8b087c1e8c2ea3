"""SD3 / SD3.5 transformer: parity with diffusers, both checkpoint layouts, strict errors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from flax import traverse_util
from safetensors.torch import save_file

from convert.mapping import ConversionError
from convert.sd3 import infer_single_file_config, load_sd3_transformer, single_file_transformer
from convert.checkpoint import CheckpointError, open_checkpoint
from models.sd3 import SD3Transformer, sincos_position_table
from tests.tiny_sd3 import (
    BASE_CONFIG,
    VARIANTS,
    build_model,
    sample_inputs,
    save_diffusers,
    save_single_file,
    single_file_state_dict,
)

SHARDED = {"sd3": False, "sd35_large": True, "sd35_medium": True}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant -> (diffusers model, transformer folder, single file path), built once."""
    out = {}
    for variant in VARIANTS:
        model = build_model(variant, seed=len(out))
        folder = tmp_path_factory.mktemp(variant) / "transformer"
        save_diffusers(model, folder, sharded=SHARDED[variant])
        single = folder.parent / f"{variant}.safetensors"
        save_single_file(model, single)
        out[variant] = (model, folder, single)
    return out


def torch_forward(model, latents, text, pooled, timestep):
    with torch.no_grad():
        args = (torch.from_numpy(a) for a in (latents, text, pooled, timestep))
        return model(*args).sample.numpy()


def relative_error(got, want):
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_diffusers(saved, variant):
    model, folder, _ = saved[variant]
    if SHARDED[variant]:  # the fixture is laid out as published repositories are
        assert len(json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())["weight_map"])
    module, params = load_sd3_transformer(folder.parent)  # the repository root finds transformer/
    inputs = sample_inputs(batch=2)
    want = torch_forward(model, *inputs)
    got = module.apply({"params": params}, *inputs)
    assert got.shape == want.shape == (2, 4, 12, 8)
    assert relative_error(got, want) <= 1e-4


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_single_file_loads_same_parameters(saved, variant):
    model, folder, single = saved[variant]
    _, params = load_sd3_transformer(folder)
    # Without QK-norm the head width is not in the weights: SD3's is 64, the tiny model's 16.
    config = None
    if VARIANTS[variant]["qk_norm"] is None:
        with pytest.raises(CheckpointError, match="pass config="):
            load_sd3_transformer(single)
        config = dict(model.config)
    module, single_params = load_sd3_transformer(single, config=config)
    flat, single_flat = (traverse_util.flatten_dict(p, sep="/") for p in (params, single_params))
    assert flat.keys() == single_flat.keys()
    for path in flat:
        np.testing.assert_array_equal(single_flat[path], flat[path], err_msg=path)
    assert module.dual_attention_layers == tuple(VARIANTS[variant]["dual_attention_layers"])
    assert module.qk_norm == VARIANTS[variant]["qk_norm"]


def test_single_file_config_is_read_off_the_shapes(saved):
    _, _, single = saved["sd35_medium"]
    inferred = infer_single_file_config(single_file_transformer(open_checkpoint(single)))
    expected = {**BASE_CONFIG, **VARIANTS["sd35_medium"], "sample_size": 128}
    assert inferred == {**expected, "dual_attention_layers": list(expected["dual_attention_layers"])}


def test_single_file_fixture_is_what_diffusers_reads(saved):
    """The inverse renaming used to write the single file round-trips through diffusers' own
    single-file converter, so the fixture has the published naming."""
    model = saved["sd35_medium"][0]
    converted = convert_sd3_transformer_checkpoint_to_diffusers(
        {k: v for k, v in single_file_state_dict(model).items() if k.startswith("model.diffusion_model.")}
    )
    original = model.state_dict()
    assert converted.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(converted[key], value), key


def test_position_table_matches_diffusers():
    model = build_model("sd3")
    table = sincos_position_table(32, BASE_CONFIG["pos_embed_max_size"], 16 // 2)
    np.testing.assert_allclose(table[None], model.pos_embed.pos_embed.numpy(), rtol=0, atol=1e-6)


def test_conversion_errors_name_every_mismatch(saved, tmp_path):
    model = saved["sd35_large"][0]
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    del state["transformer_blocks.1.attn.add_k_proj.bias"]
    state["transformer_blocks.0.attn.extra.weight"] = torch.zeros(2)
    state["context_embedder.weight"] = torch.zeros(32, 7)
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(dict(model.config)))
    with pytest.raises(ConversionError) as caught:
        load_sd3_transformer(tmp_path)
    error = caught.value
    assert error.missing == ["blocks_1/txt_qkv/k/bias"]
    assert error.unexpected == ["transformer_blocks.0.attn.extra.weight"]
    assert [m[0] for m in error.misshaped] == ["context_embedder.weight -> context_embedder/kernel"]


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="qk_norm"):
        SD3Transformer.from_config({**BASE_CONFIG, "qk_norm": "layer_norm"})
    with pytest.raises(ValueError, match="caption_projection_dim"):
        SD3Transformer.from_config({**BASE_CONFIG, "caption_projection_dim": 48})
    module = SD3Transformer.from_config({**BASE_CONFIG, **VARIANTS["sd3"]})
    latents, text, pooled, timestep = sample_inputs(batch=1)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        jax.eval_shape(module.init, jax.random.key(0), latents[:, :, :11], text, pooled, timestep)
    with pytest.raises(ValueError, match="pooled_projections"):
        jax.eval_shape(module.init, jax.random.key(0), latents, text, np.concatenate([pooled, pooled]), timestep)
    # Extra text rows are negative-prompt rows: only meaningful under nag_jax.guided.
    latents, text, pooled, timestep = sample_inputs(batch=1, text_rows=2)
    with pytest.raises(ValueError, match="guided"):
        jax.eval_shape(module.init, jax.random.key(0), latents, text, pooled, timestep)
