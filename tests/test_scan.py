"""Repeated blocks under scan: the compiled program does not grow with depth, the scan computes
what the unrolled loop computes, converted weights land where `*_param_location` says (the map
LoRA uses), and model parallelism never splits a stacked layer axis."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec

from convert.checkpoint import FLAX_PARAMS_FILE
from convert.flux import flux_param_location, load_flux_transformer
from convert.mapping import stack_layers, unstack_layers
from convert.sd3 import load_sd3_transformer, sd3_param_location
from models.flux import FluxTransformer2DModel
from models.layers import unrolled_layers
from models.sd3 import SD3Transformer
from nag_jax.converted import save_flat_safetensors
from nag_jax.sharding import param_shardings, partition_spec
from tiny_flux import TINY_CONFIG, build_model, make_inputs, save_sharded
from tiny_sd3 import build_model as build_sd3, save_diffusers

FLUX_LAYERS = dict(num_layers=2, num_single_layers=3)
SD3_CONFIG = dict(sample_size=8, patch_size=2, in_channels=4, attention_head_dim=8, num_attention_heads=2,
                  joint_attention_dim=16, pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8)


def flux_step(layers: int):
    module = FluxTransformer2DModel.from_config(dict(TINY_CONFIG, num_layers=layers, num_single_layers=layers))
    x = make_inputs(rows=1)
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), **x))
    return lambda p, x: module.apply(p, **x), params, x


def sd3_step(layers: int):
    module = SD3Transformer.from_config(dict(SD3_CONFIG, num_layers=layers, dual_attention_layers=[0, 1]))
    x = (np.zeros((1, 4, 8, 8), np.float32), np.zeros((1, 5, 16), np.float32), np.zeros((1, 8), np.float32),
         np.zeros((1,), np.float32))
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), *x))
    return lambda p, x: module.apply(p, *x), params, x


def program_text(step, unrolled: bool = False) -> str:
    """The compiled HLO of the scanned model; the lowering (cheaper) of the unrolled one."""
    fn, params, x = step
    lower = lambda: jax.jit(lambda p, x: fn(p, x)).lower(params, x)  # noqa: E731 (a fresh trace each time)
    if unrolled:
        with unrolled_layers():
            return lower().as_text()
    return lower().compile().as_text()


@pytest.mark.parametrize("step, depths", [(flux_step, (2, 8)), (sd3_step, (5, 10))], ids=["flux", "sd3"])
def test_compiled_program_does_not_grow_with_depth(step, depths):
    """Flux 2 vs 8 blocks per stream; SD3 5 vs 10 blocks (2 dual-attention blocks, 2 vs 7 uniform
    ones, the last): one while loop per stack (two) and the same program size within 1%, where the unrolled
    lowering grows by > 15% (its text calls one function per layer, so it grows less than the
    compiled program would)."""
    shallow, deep = step(depths[0]), step(depths[1])
    shallow_text, deep_text = program_text(shallow), program_text(deep)
    assert shallow_text.count(" while(") == deep_text.count(" while(") == 2
    assert abs(len(deep_text) - len(shallow_text)) < 0.01 * len(shallow_text)
    assert len(program_text(deep, unrolled=True)) > 1.15 * len(program_text(shallow, unrolled=True))


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux")
    model = build_model(guidance_embeds=False, **FLUX_LAYERS)
    save_sharded(model, folder)
    return model, *load_flux_transformer(folder)


def test_scan_computes_the_unrolled_loop(flux):
    _, module, params = flux
    x = make_inputs(rows=2)
    scanned = jax.jit(lambda p: module.apply({"params": p}, **x))(params)
    with unrolled_layers():
        unrolled = jax.jit(lambda p: module.apply({"params": p}, **x))(params)
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(unrolled), rtol=1e-5, atol=1e-5)


def flat(params):
    return traverse_util.flatten_dict(params, sep="/")


def test_flux_param_location_finds_each_converted_weight(flux):
    model, module, params = flux
    params = flat(params)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    for name in ("transformer_blocks.1.attn.to_q.weight", "single_transformer_blocks.2.proj_out.bias",
                 "single_transformer_blocks.0.attn.norm_k.weight", "x_embedder.weight"):
        path, index = flux_param_location(name, module)
        got = params[path] if index is None else params[path][index]
        want = state[name].T if name.endswith("weight") and state[name].ndim == 2 else state[name]
        np.testing.assert_array_equal(got, want)
    assert flux_param_location("transformer_blocks.1.attn.to_q.weight", module) == ("transformer_blocks/attn/q/kernel", 1)
    assert flux_param_location("x_embedder.weight", module) == ("x_embedder/kernel", None)
    with pytest.raises(ValueError, match="maps to one parameter"):
        flux_param_location("transformer_blocks.1.attn.nowhere.weight", module)


def test_sd3_param_location_across_its_stacks(tmp_path):
    """SD3.5-Medium-like, 3 layers: blocks 0 and 1 dual-attention (stacked), block 2 last (alone)."""
    model = build_sd3("sd35_medium", seed=1)
    save_diffusers(model, tmp_path, sharded=False)
    module, params = load_sd3_transformer(tmp_path)
    params = flat(params)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    expected = {"transformer_blocks.1.attn2.to_q.weight": ("dual_blocks/img_qkv2/q/kernel", 1),
                "transformer_blocks.0.ff_context.net.2.bias": ("dual_blocks/txt_ff/proj_out/bias", 0),
                "transformer_blocks.2.attn.to_k.weight": ("blocks_2/img_qkv/k/kernel", None)}
    for name, location in expected.items():
        assert sd3_param_location(name, module) == location
        path, index = location
        got = params[path] if index is None else params[path][index]
        np.testing.assert_array_equal(got, state[name].T if state[name].ndim == 2 else state[name])
    assert module.layer_stacks[1].layers == range(2, 2)  # no uniform blocks between


def test_stack_and_unstack_are_inverse(flux):
    _, module, params = flux
    stacked = flat(params)
    per_layer = unstack_layers(stacked, module.layer_stacks)
    assert "transformer_blocks_1/attn/q/kernel" in per_layer and "single_transformer_blocks/blocks_2/proj_out/bias" in per_layer
    restacked = stack_layers(dict(per_layer), module.layer_stacks)
    assert restacked.keys() == stacked.keys()
    for key in stacked:
        np.testing.assert_array_equal(restacked[key], stacked[key])


def test_converted_folder_from_before_scan_still_loads(flux, tmp_path):
    """A folder converted while the blocks were unrolled holds per-layer Flax paths: stacked on load."""
    _, module, params = flux
    (tmp_path / "config.json").write_text(json.dumps(dict(TINY_CONFIG, **FLUX_LAYERS)))
    save_flat_safetensors(tmp_path / FLAX_PARAMS_FILE, traverse_util.unflatten_dict(
        unstack_layers(flat(params), module.layer_stacks), sep="/"))
    _, loaded = load_flux_transformer(tmp_path)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_model_parallelism_never_splits_the_layer_axis():
    assert partition_spec((16, 8, 4), 4, min_size=0) == PartitionSpec("model")  # largest axis: 0
    assert partition_spec((16, 8, 4), 4, min_size=0, stacked=True) == PartitionSpec(None, "model")
    mesh = jax.sharding.AbstractMesh((4,), ("model",))
    tree = {"blocks": {"kernel": jax.ShapeDtypeStruct((16, 8), jnp.float32)},
            "other": {"kernel": jax.ShapeDtypeStruct((16, 8), jnp.float32)}}
    specs = {name: sharding["kernel"].spec for name, sharding in param_shardings(tree, mesh, min_size=0, stacked=("blocks",)).items()}
    assert specs == {"blocks": PartitionSpec(None, "model"), "other": PartitionSpec("model")}
