"""AutoencoderKL: encode and decode parity with diffusers on the same saved files, latent scaling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.vae import load_vae
from models.vae import VAEConfig, latents_to_model, model_to_latents, sample_latents
from tests.tiny_components import assert_close, save_tiny_vae


def roundtrip(module):
    """encode -> latents_to_model -> model_to_latents -> decode, one compiled function."""

    def run(params, images):
        mean, logvar = module.apply({"params": params}, images, method="encode")
        model_latents = latents_to_model(module.config, mean)
        decoded = module.apply({"params": params}, model_to_latents(module.config, model_latents), method="decode")
        return mean, logvar, model_latents, decoded

    return jax.jit(run)


@pytest.mark.parametrize("latent_channels", [4, 16])
def test_vae_encode_decode_match_diffusers(tmp_path, latent_channels):
    from diffusers import AutoencoderKL

    save_tiny_vae(tmp_path, latent_channels=latent_channels, seed=latent_channels)
    reference_model = AutoencoderKL.from_pretrained(tmp_path).eval()
    scaling, shift = reference_model.config.scaling_factor, reference_model.config.shift_factor or 0.0
    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 12)).astype(np.float32)
    with torch.no_grad():
        distribution = reference_model.encode(torch.from_numpy(images)).latent_dist
        model_latents = (distribution.mean - shift) * scaling  # image-to-image pipelines
        decoded = reference_model.decode(model_latents / scaling + shift).sample  # before vae.decode

    module, params = load_vae(tmp_path)
    assert (module.config.shift_factor is not None) == (latent_channels == 16)
    assert module.config.use_quant_conv == (latent_channels == 4)
    mean, logvar, ours_model_latents, ours_decoded = roundtrip(module)(params, images)
    assert mean.shape == (2, latent_channels, 8, 6)
    assert_close(mean, distribution.mean)
    assert_close(logvar, distribution.logvar)
    assert_close(ours_model_latents, model_latents)
    assert_close(ours_decoded, decoded)

    # bfloat16 parameters run and stay close to float32.
    module16, params16 = load_vae(tmp_path, dtype="bfloat16")
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params16))
    decoded16 = jax.jit(lambda p, z: module16.apply({"params": p}, z, method="decode"))(params16, mean)
    assert decoded16.dtype == jnp.bfloat16 and decoded16.shape == (2, 3, 16, 12)
    with torch.no_grad():
        decoded32 = reference_model.decode(torch.from_numpy(np.array(mean))).sample
    assert_close(decoded16, decoded32, tol=5e-2)


def test_sample_latents_draws_with_the_encoder_variance():
    mean = jnp.zeros((2, 16, 4, 4))
    draws = sample_latents(mean, jnp.full_like(mean, 2 * np.log(0.5)), jax.random.key(0))
    assert abs(float(draws.std()) - 0.5) < 0.1  # logvar = log(0.25) -> std 0.5


def test_latent_scaling_with_per_channel_statistics():
    """SDXL-style configs with latents_mean/std (the Playground v2.5 pipeline rule)."""
    config = VAEConfig.from_dict({"latent_channels": 4, "scaling_factor": 0.5, "latents_mean": [1, 2, 3, 4],
                                  "latents_std": [2, 2, 4, 4]})
    latents = jnp.ones((1, 4, 2, 2))
    decoded_side = model_to_latents(config, latents)
    np.testing.assert_allclose(np.asarray(decoded_side[0, :, 0, 0]), [1 + 4, 2 + 4, 3 + 8, 4 + 8])
    np.testing.assert_allclose(np.asarray(latents_to_model(config, decoded_side)), np.asarray(latents), rtol=1e-6)


def test_vae_config_rejects_unsupported_blocks():
    with pytest.raises(ValueError, match="down_block_types"):
        VAEConfig.from_dict({"block_out_channels": [8], "down_block_types": ["AttnDownEncoderBlock2D"]})
