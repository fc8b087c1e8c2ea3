"""SANA components against their PyTorch classes: the transformer (SANA with a position table;
SANA-Sprint with guidance embedding and QK norm), Gemma-2 (GQA, soft-capping, sliding window,
padding), DC-AE encode and decode (BatchNorm/ReLU and RMS/SiLU stages, both sampling kinds),
and DPM-Solver++ on flow sigmas against diffusers' scheduler."""

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.dc_ae import load_dc_ae
from convert.gemma import load_gemma2
from convert.sana import load_sana_transformer
from models.dc_ae import DCAutoencoder
from nag_jax.schedulers import make_schedule
from test_schedulers import assert_same_run
from tiny_components import assert_close
from tiny_sana import SANA_SCHEDULER, VAE, random_dc_ae, random_gemma, random_sana_transformer


@pytest.mark.parametrize("sprint", [False, True], ids=["sana", "sprint"])
def test_transformer_matches_diffusers(tmp_path, sprint):
    model = random_sana_transformer(sprint, **({} if sprint else {"interpolation_scale": 1.0}))
    model.save_pretrained(str(tmp_path))
    module, params = load_sana_transformer(tmp_path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 6, 10)).astype(np.float32)  # a non-square latent grid
    context = rng.standard_normal((2, 7, 32)).astype(np.float32)
    mask = np.array([[1] * 4 + [0] * 3, [1] * 7], np.float32)
    t, guidance = np.array([500.0, 20.0], np.float32), np.array([0.45, 0.45], np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(context),
                     encoder_attention_mask=torch.from_numpy(mask), timestep=torch.from_numpy(t),
                     guidance=torch.from_numpy(guidance) if sprint else None).sample
    assert_close(module.apply({"params": params}, *map(jnp.asarray, (x, context, mask, t, guidance))), want)


def test_gemma2_matches_transformers(tmp_path):
    model = random_gemma(vocab_size=64)
    model.save_pretrained(str(tmp_path))
    module, params = load_gemma2(tmp_path)
    ids = np.random.default_rng(1).integers(4, 64, (2, 24))
    ids[0, 0] = ids[1, 0] = 2
    ids[0, 9:] = 0  # right padding: the sliding window (16) and the padding mask both matter
    mask = (ids != 0).astype(np.int64)
    with torch.no_grad():
        want = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    assert_close(module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)), want)


def pixel_shuffle_dc_ae():
    """Pixel (un)shuffle sampling, RMS/SiLU decoder, and a first stage without blocks (sampling conv_in/out)."""
    torch.manual_seed(0)
    return diffusers.AutoencoderDC(**dict(VAE, upsample_block_type="pixel_shuffle",
                                          downsample_block_type="pixel_unshuffle", decoder_norm_types="rms_norm",
                                          decoder_act_fns="silu", encoder_layers_per_block=[0, 1, 1],
                                          decoder_layers_per_block=[0, 1, 1])).eval()


@pytest.mark.parametrize("build", [random_dc_ae, pixel_shuffle_dc_ae], ids=["sana_vae", "pixel_shuffle"])
def test_dc_ae_matches_diffusers(tmp_path, build):
    model = build()
    model.save_pretrained(str(tmp_path))
    module, params = load_dc_ae(tmp_path)
    x = np.random.default_rng(2).uniform(-1, 1, (2, 3, 32, 48)).astype(np.float32)
    with torch.no_grad():
        latents = model.encode(torch.from_numpy(x)).latent
        images = model.decode(latents).sample
    assert latents.shape == (2, 8, 8, 12)
    assert_close(module.apply({"params": params}, jnp.asarray(x), method=DCAutoencoder.encode), latents)
    assert_close(module.apply({"params": params}, jnp.asarray(latents.numpy()), method=DCAutoencoder.decode), images)


@pytest.mark.parametrize("num_steps", [1, 2, 20])
def test_flow_dpm_solver_matches_diffusers(num_steps):
    schedule = make_schedule(SANA_SCHEDULER, num_steps)
    assert schedule.timestep_kind == "flow"
    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(SANA_SCHEDULER)
    assert_same_run(schedule, scheduler, num_steps, num_inference_steps=num_steps)
