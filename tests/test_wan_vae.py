"""Wan VAE: encode (posterior mean) and chunked decode parity with diffusers' AutoencoderKLWan on
tiny random models saved in the diffusers layout (Wan2.1, and Wan2.2's residual, patchified one
with the published TI2V-5B config keys); the original / ComfyUI single files (safetensors,
.pth, scaled fp8) give the folder's parameters; the decode's working memory does not grow with
the number of frames."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.torch import save_file

from convert.checkpoint import CheckpointError
from convert.wan_vae import load_wan_vae
from models.wan_vae import AutoencoderKLWan, WanVAEConfig, decode_video, encode_video
from tests.tiny_components import assert_close
from tests.tiny_wan import save_tiny_wan22_vae, tiny_wan22_vae_config

# Four stages and two resnets per stage: the shape diffusers' single-file converter assumes.
TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from diffusers import AutoencoderKLWan as TorchWanVAE

    torch.manual_seed(0)
    reference = TorchWanVAE(**TINY).eval()
    with torch.no_grad():  # gammas are ones and biases zeros at init: move every parameter
        for parameter in reference.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    folder = tmp_path_factory.mktemp("wan_vae")
    reference.save_pretrained(folder)
    return folder, reference


def test_encode_and_chunked_decode_match_diffusers(tiny):
    folder, reference = tiny
    rng = np.random.default_rng(0)
    video = rng.uniform(-1, 1, (2, 3, 9, 32, 32)).astype(np.float32)  # first frame + 2 chunks of 4
    latents = rng.normal(size=(1, 4, 4, 4, 4)).astype(np.float32)  # first latent frame + 3 chunks
    with torch.no_grad():
        reference_mean = reference.encode(torch.from_numpy(video)).latent_dist.mean
        reference_video = reference.decode(torch.from_numpy(latents)).sample

    module, params = load_wan_vae(folder)
    mean = jax.jit(lambda p, x: encode_video(module, p, x))(params, video)
    decoded = jax.jit(lambda p, z: decode_video(module, p, z))(params, latents)
    assert mean.shape == (2, 4, 3, 4, 4) and decoded.shape == (1, 3, 13, 32, 32)
    assert_close(mean, reference_mean)
    assert_close(decoded, reference_video)
    assert 0.05 < float(jnp.abs(decoded).mean()) < 0.95  # not all clipped, not all zero

    # bfloat16 parameters and compute, float32 latents in: as close to float32 as diffusers' own
    # bfloat16 model gets on this random model (mean 0.009, max 0.10 off).
    module16, params16 = load_wan_vae(folder, dtype="bfloat16")
    decoded16 = jax.jit(lambda p, z: decode_video(module16, p, z))(params16, latents)
    assert decoded16.dtype == jnp.bfloat16
    error = np.abs(np.asarray(decoded16, np.float32) - reference_video.numpy())
    assert error.mean() < 0.02 and error.max() < 0.15


def test_frame_count_and_shape_errors():
    module = AutoencoderKLWan(WanVAEConfig.from_dict(TINY))
    with pytest.raises(ValueError, match=r"\[B, 3, 1 \+ 4 \* k, H, W\]"):
        encode_video(module, {}, jnp.zeros((1, 3, 6, 32, 32)))
    with pytest.raises(ValueError, match="multiples of 8"):
        encode_video(module, {}, jnp.zeros((1, 3, 5, 36, 32)))
    with pytest.raises(ValueError, match=r"\[B, 4, T, h, w\]"):
        decode_video(module, {}, jnp.zeros((1, 16, 2, 4, 4)))
    with pytest.raises(ValueError, match="attn_scales"):
        WanVAEConfig.from_dict({**TINY, "attn_scales": [0.5]})


def test_wan22_encode_and_chunked_decode_match_diffusers(tmp_path):
    """The residual stages (average-down / duplicate-up shortcuts), 2x2 patchification: 16x."""
    reference = save_tiny_wan22_vae(tmp_path)
    module, params = load_wan_vae(tmp_path)
    assert module.config.is_residual and module.config.spatial_factor == 16
    rng = np.random.default_rng(2)
    video = rng.uniform(-1, 1, (1, 3, 9, 32, 48)).astype(np.float32)
    latents = rng.normal(size=(1, 6, 3, 2, 3)).astype(np.float32)
    with torch.no_grad():
        reference_mean = reference.encode(torch.from_numpy(video)).latent_dist.mean
        reference_video = reference.decode(torch.from_numpy(latents)).sample
    mean = jax.jit(lambda p, x: encode_video(module, p, x))(params, video)
    decoded = jax.jit(lambda p, z: decode_video(module, p, z))(params, latents)
    assert mean.shape == (1, 6, 3, 2, 3) and decoded.shape == (1, 3, 9, 32, 48)
    assert_close(mean, reference_mean)
    assert_close(decoded, reference_video)
    assert 0.05 < float(jnp.abs(decoded).mean()) < 0.95
    with pytest.raises(ValueError, match="multiples of 16"):
        encode_video(module, params, video[..., :40])

    # The original release's single file (vae2_2.py naming) gives the folder's parameters.
    state = {to_original22(k): v.contiguous() for k, v in reference.state_dict().items()}
    assert not any(re.search(r"blocks|sampler\.|resnets|mid_block|conv_in|norm_out|quant", k) for k in state)
    save_file(state, str(tmp_path / "wan2.2_vae.safetensors"))
    _, single = load_wan_vae(tmp_path / "wan2.2_vae.safetensors", config=tiny_wan22_vae_config())
    assert flat(single).keys() == flat(params).keys()
    for name, value in flat(single).items():
        np.testing.assert_array_equal(value, flat(params)[name], err_msg=name)


# The original release's names (wan/modules/vae.py), written out here independently of
# convert/wan_vae.py and checked against diffusers' own converter below.
_RESNET_TO_ORIGINAL = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
                       "conv_shortcut": "shortcut"}


def to_original(key):
    key = re.sub(r"\.(norm1|conv1|norm2|conv2|conv_shortcut)\.", lambda m: f".{_RESNET_TO_ORIGINAL[m[1]]}.", key)
    key = re.sub(r"^quant_conv\.", "conv1.", key)
    key = re.sub(r"^post_quant_conv\.", "conv2.", key)
    key = re.sub(r"\.conv_in\.", ".conv1.", key)
    key = key.replace(".norm_out.", ".head.0.").replace(".conv_out.", ".head.2.")
    key = key.replace("mid_block.resnets.0.", "middle.0.").replace("mid_block.attentions.0.", "middle.1.")
    key = key.replace("mid_block.resnets.1.", "middle.2.").replace("down_blocks.", "downsamples.")
    up = re.match(r"decoder\.up_blocks\.(\d)\.(resnets\.(\d)|upsamplers\.0)\.(.+)", key)
    if up:  # four stages of 3 resnets + 1 resampler, flattened
        stage, _, resnet, rest = up.groups()
        key = f"decoder.upsamples.{4 * int(stage) + (int(resnet) if resnet else 3)}.{rest}"
    return key


def to_original22(key):
    """Wan2.2's original names: each stage nests its resnets, then its resampler (two resnets per
    encoder stage, three per decoder stage here), the rest as Wan2.1's."""
    key = re.sub(r"down_blocks\.(\d)\.resnets\.(\d)\.", r"down_blocks.\1.downsamples.\2.", key)
    key = re.sub(r"down_blocks\.(\d)\.downsampler\.", r"down_blocks.\1.downsamples.2.", key)
    key = re.sub(r"up_blocks\.(\d)\.resnets\.(\d)\.", r"upsamples.\1.upsamples.\2.", key)
    key = re.sub(r"up_blocks\.(\d)\.upsampler\.", r"upsamples.\1.upsamples.3.", key)
    return to_original(key)


def flat(params):
    return traverse_util.flatten_dict(params, sep="/")


def test_single_files_give_the_folder_parameters(tiny, tmp_path):
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    folder, reference = tiny
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    original = {to_original(k): v for k, v in state.items()}
    assert not any(re.search(r"blocks|mid_block|conv_in|norm_out|quant|\.norm[12]\.", k) for k in original)
    assert convert_wan_vae_to_diffusers(original).keys() == state.keys()  # diffusers agrees on every name

    _, folder_params = load_wan_vae(folder)
    expected = flat(folder_params)
    save_file(original, str(tmp_path / "wan_2.1_vae.safetensors"))
    torch.save(original, tmp_path / "Wan2.1_VAE.pth")
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_wan_vae(tmp_path / "Wan2.1_VAE.pth", config=TINY)
    for name, options in (("wan_2.1_vae.safetensors", {}), ("Wan2.1_VAE.pth", {"allow_pickle": True})):
        _, params = load_wan_vae(tmp_path / name, config=TINY, **options)
        assert flat(params).keys() == expected.keys()
        for path, value in flat(params).items():
            np.testing.assert_array_equal(value, expected[path], err_msg=f"{name}: {path}")

    # A ComfyUI-style scaled fp8 file: conv weights in float8_e4m3fn with a per-tensor scale.
    scaled, upcast = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, {}
    for key, value in original.items():
        if key.endswith(".weight") and value.ndim >= 4:
            scale = value.abs().max() / 448.0
            scaled[key] = (value / scale).to(torch.float8_e4m3fn)
            scaled[key[: -len("weight")] + "scale_weight"] = scale.reshape(1)
            upcast[key] = scaled[key].float() * scale
        else:
            scaled[key] = upcast[key] = value
    save_file(scaled, str(tmp_path / "wan_2.1_vae_fp8_e4m3fn_scaled.safetensors"))
    save_file(upcast, str(tmp_path / "upcast.safetensors"))
    _, fp8_params = load_wan_vae(tmp_path / "wan_2.1_vae_fp8_e4m3fn_scaled.safetensors", config=TINY)
    _, upcast_params = load_wan_vae(tmp_path / "upcast.safetensors", config=TINY)
    for path, value in flat(upcast_params).items():
        np.testing.assert_array_equal(flat(fp8_params)[path], value, err_msg=path)
    fp8_error = max(float(np.abs(flat(fp8_params)[p] - v).max()) for p, v in expected.items())
    assert 0 < fp8_error < 0.05  # really rounded to fp8, and scaled back


@pytest.mark.parametrize("config", [
    WanVAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1, temperal_downsample=(True, True)),
    WanVAEConfig.from_dict({**tiny_wan22_vae_config(z_dim=4), "num_res_blocks": 1}),
], ids=["wan2.1", "wan2.2"])
def test_decode_working_memory_does_not_grow_with_frames(config):
    """XLA's memory analysis of the compiled decode at 3 and 5 latent frames (9 and 17 frames).
    float32: in bfloat16, XLA:CPU adds a float32 copy of the (small) latents, which does grow."""
    module = AutoencoderKLWan(config)
    params = jax.eval_shape(module.init, jax.random.key(0), module.init_input())["params"]

    def memory(latent_frames):
        z = jax.ShapeDtypeStruct((1, 4, latent_frames, 8, 8), jnp.float32)
        return jax.jit(lambda p, z: decode_video(module, p, z)).lower(params, z).compile().memory_analysis()

    short, long = memory(3), memory(5)
    assert long.output_size_in_bytes > short.output_size_in_bytes  # more frames out ...
    assert long.temp_size_in_bytes == short.temp_size_in_bytes  # ... from the same working memory
