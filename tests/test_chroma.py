"""The Chroma transformer against diffusers' ChromaTransformer2DModel (text mask made boolean),
and NAG on it against the PyTorch reference of the same semantics (tiny_chroma.py)."""

from __future__ import annotations

import contextlib

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.torch import save_file

import tiny_chroma
from convert.chroma import load_chroma_transformer
from nag_jax.intercept import NAGConfig, guided
from tiny_flux import relative_error

SCALE, TAU, ALPHA = 5.0, 2.5, 0.25


@pytest.fixture(scope="module")
def chroma(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chroma") / "transformer"
    tiny_chroma.build_model().save_pretrained(folder, safe_serialization=True, max_shard_size="100KB")
    module, params = load_chroma_transformer(folder)
    return module, params


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_original_single_file_loads_the_same_parameters(chroma, tmp_path, prefix):
    path = tmp_path / "chroma-tiny.safetensors"
    save_file(tiny_chroma.original_state_dict(tiny_chroma.build_model(), prefix), str(path))
    module, params = load_chroma_transformer(path, config={"axes_dims_rope": tiny_chroma.TINY_CONFIG["axes_dims_rope"]})
    assert module == chroma[0]  # the config read off the shapes is the diffusers config
    flat, reference = (traverse_util.flatten_dict(p, sep="/") for p in (params, chroma[1]))
    assert flat.keys() == reference.keys()
    for key, value in reference.items():
        np.testing.assert_array_equal(flat[key], value, err_msg=key)


def run(chroma, inputs, config=None):
    """Our forward, jit-compiled (one program per input shapes and config: far faster than eager)."""
    module, params = chroma

    def forward(params, inputs):
        arguments = {k: v for k, v in inputs.items() if k != "text_mask"}
        with guided(config) if config is not None else contextlib.nullcontext():
            return module.apply({"params": params}, **arguments, attention_mask=inputs["text_mask"])

    return np.asarray(jax.jit(forward)(params, inputs))


def test_blocks_run_under_scan_over_stacked_parameters(chroma):
    """As Flux's: each run of blocks is one scan over parameters stacked on a leading layer axis."""
    module, params = chroma
    for stack in module.layer_stacks:
        subtree = traverse_util.flatten_dict(params, sep="/")
        stacked = [v for k, v in subtree.items() if k.startswith(stack.path + "/")]
        assert stacked and all(v.shape[0] == len(stack.layers) for v in stacked)


def test_matches_diffusers_with_a_boolean_mask(chroma):
    inputs = tiny_chroma.make_inputs(rows=2)
    ours, reference = run(chroma, inputs), tiny_chroma.torch_forward(tiny_chroma.build_model(), inputs)
    assert relative_error(ours, reference) <= 1e-4
    unmasked = dict(inputs, text_mask=np.ones_like(inputs["text_mask"]))
    assert relative_error(run(chroma, unmasked), reference) > 1e-3, "the mask should matter"


def nag_inputs(same_negative=False):
    """One image row, text rows [pos; neg] with different masks."""
    inputs = tiny_chroma.make_inputs(rows=1, text_rows=2, seed=1)
    if same_negative:
        for key in ("encoder_hidden_states", "text_mask"):
            inputs[key][1] = inputs[key][0]
    return inputs


def positive_rows(inputs):
    return {**inputs, **{k: inputs[k][:1] for k in ("encoder_hidden_states", "text_mask")}}


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_nag_matches_the_pytorch_reference(chroma, norm):
    inputs = nag_inputs()
    ours = run(chroma, inputs, NAGConfig(SCALE, TAU, ALPHA, nag_norm=norm))
    reference = tiny_chroma.reference_nag_forward(tiny_chroma.build_model(), SCALE, TAU, ALPHA, inputs, norm)
    assert relative_error(run(chroma, positive_rows(inputs)), reference) > 0.05, "NAG should move the output"
    assert relative_error(ours, reference) <= 1e-4
    # the modulation has no text in it: the reference mode's image copies stay equal to the one stream
    reference_mode = run(chroma, inputs, NAGConfig(SCALE, TAU, ALPHA, nag_mode="reference", nag_norm=norm))
    assert relative_error(reference_mode, ours) <= 1e-5


def test_a_negative_equal_to_the_prompt_changes_nothing(chroma):
    inputs = nag_inputs(same_negative=True)
    assert relative_error(run(chroma, inputs, NAGConfig(SCALE, TAU, ALPHA)), run(chroma, positive_rows(inputs))) <= 1e-5
