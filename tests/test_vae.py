"""AutoencoderKL: encode and decode parity with diffusers on the same saved files, latent scaling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.vae import load_vae
from models.vae import VAEConfig, latents_to_model, model_to_latents, sample_latents
from tests.tiny_components import save_tiny_vae


def assert_close(ours, reference, tol=1e-4):
    reference = reference.detach().numpy() if isinstance(reference, torch.Tensor) else np.asarray(reference)
    ours = np.asarray(ours, dtype=np.float32)
    assert ours.shape == reference.shape
    scale = max(1.0, float(np.abs(reference).max()))
    assert float(np.abs(ours - reference).max()) <= tol * scale


@pytest.mark.parametrize("latent_channels", [4, 16])
def test_vae_encode_decode_match_diffusers(tmp_path, latent_channels):
    from diffusers import AutoencoderKL

    save_tiny_vae(tmp_path, latent_channels=latent_channels, seed=latent_channels)
    reference_model = AutoencoderKL.from_pretrained(tmp_path).eval()
    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 12)).astype(np.float32)
    with torch.no_grad():
        distribution = reference_model.encode(torch.from_numpy(images)).latent_dist
        model_latents = (distribution.mean - (reference_model.config.shift_factor or 0.0)) * \
            reference_model.config.scaling_factor
        # What the Flux/SD3/SDXL pipelines do before decoding.
        vae_latents = model_latents / reference_model.config.scaling_factor + (reference_model.config.shift_factor or 0.0)
        decoded = reference_model.decode(vae_latents).sample

    module, params = load_vae(tmp_path)
    assert (module.config.shift_factor is not None) == (latent_channels == 16)
    assert module.config.use_quant_conv == (latent_channels == 4)
    mean, logvar = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode"))(params, images)
    assert mean.shape == (2, latent_channels, 8, 6)
    assert_close(mean, distribution.mean)
    assert_close(logvar, distribution.logvar)
    ours_model_latents = latents_to_model(module.config, mean)
    assert_close(ours_model_latents, model_latents)
    ours_vae_latents = model_to_latents(module.config, ours_model_latents)
    decode = jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode"))
    assert_close(decode(params, ours_vae_latents), decoded)


def test_vae_bfloat16_and_sampling(tmp_path):
    save_tiny_vae(tmp_path, latent_channels=16, seed=3)
    module32, params32 = load_vae(tmp_path)
    module16, params16 = load_vae(tmp_path, dtype="bfloat16")
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params16))
    latents = np.random.default_rng(1).standard_normal((1, 16, 4, 4)).astype(np.float32)
    out32 = module32.apply({"params": params32}, latents, method="decode")
    out16 = module16.apply({"params": params16}, latents, method="decode")
    assert out16.dtype == jnp.bfloat16 and out16.shape == (1, 3, 8, 8)
    assert_close(out16, out32, tol=5e-2)

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
