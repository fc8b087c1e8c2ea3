"""models.unet + convert.unet against diffusers' UNet2DConditionModel on the same saved files."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from convert.checkpoint import Checkpoint, open_checkpoint
from convert.mapping import ConversionError
from convert.unet import load_unet, unet_params
from models.unet import UNet2DConditionModel, UNetConfig
from tests.tiny_unet import CONFIGS, make_inputs, make_unet, torch_forward


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (torch model, folder), each tiny UNet built and saved once per module."""
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = make_unet(kind, tmp_path_factory.mktemp(kind))
        return cache[kind]

    return get


def _relative_error(out, ref):
    return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))


# sd15 runs at an odd size: diffusers then upsamples to the skip's size instead of 2x.
@pytest.mark.parametrize(
    "kind, size", [("sd15", (15, 13)), ("sd2", (16, 16)), ("sdxl", (16, 16)), ("lcm", (16, 16))],
    ids=["sd15-odd-size", "sd2", "sdxl", "lcm"],
)
def test_matches_diffusers(kind, size, saved):
    model, folder = saved(kind)
    module, params = load_unet(folder)
    inputs = make_inputs(kind, batch=2)
    inputs["sample"] = inputs["sample"][:, :, : size[0], : size[1]]
    out = np.asarray(jax.jit(module.apply)({"params": params}, **inputs))
    ref = torch_forward(model, inputs)
    assert out.shape == ref.shape == (2, 4, *size)
    assert _relative_error(out, ref) <= 1e-4


def test_sharded_fixture_is_read_through_the_index(saved):
    _, folder = saved("sdxl")
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert len(list(folder.glob("diffusion_pytorch_model-*.safetensors"))) > 1


def test_conversion_errors_name_every_problem_at_once(saved):
    _, folder = saved("sd15")
    checkpoint = open_checkpoint(folder)
    module = UNet2DConditionModel.from_config(dict(CONFIGS["sd15"]))
    renamed = checkpoint.renamed(lambda k: "mystery.weight" if k == "conv_in.bias" else k)
    tensors = {k: (lambda k=k: renamed.load(k), renamed.shape(k)) for k in renamed.keys()}
    bad = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    tensors[bad] = (lambda: np.zeros((32, 31), np.float32), (32, 31))
    with pytest.raises(ConversionError) as error:
        unet_params(Checkpoint(tensors, "broken"), module)
    assert error.value.missing == ["conv_in/bias"]
    assert error.value.unexpected == ["mystery.weight"]
    assert len(error.value.misshaped) == 1 and bad in error.value.misshaped[0][0]
    message = str(error.value)
    assert "conv_in/bias" in message and "mystery.weight" in message and bad in message


@pytest.mark.parametrize(
    "change, named",
    [
        ({"down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]}, "SimpleCrossAttnDownBlock2D"),
        ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type"),
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"addition_embed_type": "text_image"}, "addition_embed_type"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
        ({"layers_per_block": [1, 1, 1]}, "layers_per_block"),
    ],
)
def test_unsupported_config_values_are_named(change, named):
    with pytest.raises(ValueError, match=named):
        UNetConfig.from_diffusers({**CONFIGS["sd15"], **change})


def test_missing_config_keys_take_diffusers_defaults():
    config = UNetConfig.from_diffusers({})
    assert config.block_out_channels == (320, 640, 1280, 1280)
    assert config.heads == (8, 8, 8, 8) and config.cross_attention_dim == 1280
    assert config.flip_sin_to_cos and config.freq_shift == 0


def test_sdxl_needs_added_conditioning(saved):
    _, folder = saved("sdxl")
    module, params = load_unet(folder)
    inputs = make_inputs("sdxl", batch=1)
    del inputs["added_cond_kwargs"]
    with pytest.raises(ValueError, match="text_embeds"):
        module.apply({"params": params}, **inputs)


def test_timestep_cond_needs_an_lcm_unet(saved):
    _, folder = saved("sd15")
    module, params = load_unet(folder)
    inputs = make_inputs("sd15", batch=1)
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        module.apply({"params": params}, **inputs, timestep_cond=np.zeros((1, 16), np.float32))
