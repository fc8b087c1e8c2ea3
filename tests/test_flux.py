"""Flux transformer: parity with diffusers on the same saved files, both checkpoint layouts, bf16.

Models run eagerly (no jit): on tiny models op-by-op dispatch reuses compiled ops across
tests and is faster than compiling each variant.
"""

from __future__ import annotations

import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.torch import save_file

import tiny_flux
from convert.checkpoint import open_checkpoint
from convert.flux import infer_bfl_config, load_flux_transformer, strip_bfl_prefix
from convert.mapping import ConversionError
from models.flux import FluxTransformer2DModel

VARIANTS = {"schnell": False, "dev": True}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant -> (torch model, its diffusers transformer/ folder)."""
    out = {}
    for variant, guidance in VARIANTS.items():
        model = tiny_flux.build_model(guidance_embeds=guidance)
        folder = tmp_path_factory.mktemp(variant) / "transformer"
        tiny_flux.save_sharded(model, folder)
        out[variant] = model, folder
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_diffusers_from_sharded_folder(saved, variant):
    torch_model, folder = saved[variant]
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "the fixture should be sharded as published repos are"
    module, params = load_flux_transformer(folder.parent)  # the repository root works as well
    assert module.guidance_embeds == VARIANTS[variant]
    inputs = tiny_flux.make_inputs(rows=2, guidance=VARIANTS[variant])
    ours = module.apply({"params": params}, **inputs)
    ref = tiny_flux.torch_forward(torch_model, inputs)
    assert ours.shape == ref.shape == (2, tiny_flux.GRID**2, tiny_flux.TINY_CONFIG["in_channels"])
    assert tiny_flux.relative_error(ours, ref) <= 1e-4


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_bfl_single_file_loads_the_same_parameters(saved, tmp_path, prefix):
    torch_model, folder = saved["dev"]
    path = tmp_path / "flux1-tiny.safetensors"
    save_file(tiny_flux.bfl_state_dict(torch_model, prefix), str(path))
    rope = {"axes_dims_rope": list(tiny_flux.TINY_CONFIG["axes_dims_rope"])}
    module, params = load_flux_transformer(path, config=rope)
    reference_module, reference_params = load_flux_transformer(folder)
    assert module == reference_module  # the config read off the shapes is the diffusers config
    flat, reference_flat = (traverse_util.flatten_dict(p, sep="/") for p in (params, reference_params))
    assert flat.keys() == reference_flat.keys()
    for key, value in reference_flat.items():
        np.testing.assert_array_equal(flat[key], value, err_msg=key)


def test_bfl_single_file_with_unknown_head_size_needs_rope_axes(saved, tmp_path):
    torch_model, _ = saved["schnell"]
    path = tmp_path / "flux1-tiny.safetensors"
    save_file(tiny_flux.bfl_state_dict(torch_model), str(path))
    config = infer_bfl_config(strip_bfl_prefix(open_checkpoint(path)))
    assert config["num_layers"] == 2 and config["num_single_layers"] == 2 and config["num_attention_heads"] == 2
    with pytest.raises(ValueError, match="axes_dims_rope"):
        load_flux_transformer(path)


def test_bfloat16_matches_diffusers_in_bfloat16(saved):
    """bf16 params and activations: as close to diffusers run in bf16 as bf16 allows. Both are far
    from float32 on this random model (diffusers rounds t and guidance to bf16 before x1000)."""
    _, folder = saved["dev"]
    inputs = tiny_flux.make_inputs(rows=2, guidance=True)
    module16, params16 = load_flux_transformer(folder, dtype="bfloat16")
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(params16))
    out16 = module16.apply({"params": params16}, **inputs)
    assert out16.dtype == jnp.bfloat16
    out32 = tiny_flux.torch_forward(diffusers.FluxTransformer2DModel.from_pretrained(folder), inputs)
    torch16 = diffusers.FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    with torch.no_grad():
        ref16 = torch16(**{k: torch.from_numpy(v).to(torch.bfloat16) for k, v in inputs.items()}, return_dict=False)[0]
    ref16 = ref16.float().numpy()
    assert np.all(np.isfinite(np.asarray(out16, np.float32)))
    assert tiny_flux.relative_error(out16, ref16) < 0.03
    assert tiny_flux.relative_error(out16, out32) < 1.5 * tiny_flux.relative_error(ref16, out32) + 0.01


def test_conversion_is_strict(saved, tmp_path):
    torch_model, folder = saved["schnell"]
    state = {k: v.clone() for k, v in torch_model.state_dict().items()}
    del state["transformer_blocks.1.attn.norm_added_k.weight"]
    state["transformer_blocks.0.attn.to_q.weight"] = torch.zeros(3, 3)
    state["pos_embed.freqs"] = torch.zeros(4)
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match="needs config="):
        load_flux_transformer(path)  # a loose diffusers-named file says nothing of its config
    with pytest.raises(ConversionError) as error:
        load_flux_transformer(path, config=json.loads((folder / "config.json").read_text()))
    assert error.value.missing == ["transformer_blocks_1/attn_context/norm_k/scale"]
    assert error.value.unexpected == ["pos_embed.freqs"]
    assert [m[0] for m in error.value.misshaped] == ["transformer_blocks.0.attn.to_q.weight -> transformer_blocks_0/attn/q/kernel"]


def test_bad_inputs_are_refused_with_a_clear_error(saved):
    _, folder = saved["dev"]
    module, params = load_flux_transformer(folder)
    inputs = tiny_flux.make_inputs(rows=1, text_rows=3, guidance=True)
    with pytest.raises(ValueError, match="encoder_hidden_states has 3 rows for 1 image rows"):
        module.apply({"params": params}, **inputs)
    inputs = tiny_flux.make_inputs(rows=1, guidance=True)
    inputs["pooled_projections"] = np.concatenate([inputs["pooled_projections"]] * 2)
    with pytest.raises(ValueError, match="pooled_projections has 2 rows"):
        module.apply({"params": params}, **inputs)
    with pytest.raises(ValueError, match="guidance is required"):
        module.apply({"params": params}, **tiny_flux.make_inputs(rows=1))


def test_config_with_inconsistent_rope_axes_is_refused():
    with pytest.raises(ValueError, match="must sum to attention_head_dim"):
        FluxTransformer2DModel.from_config({**tiny_flux.TINY_CONFIG, "axes_dims_rope": [4, 4, 4]})
