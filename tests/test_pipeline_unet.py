"""NAGPipeline on tiny SD1.5-like and SDXL-like folders equals diffusers' pipelines.

NAG off: diffusers' StableDiffusion(XL)Pipeline with the same `latents`. NAG on: the same
pipelines with the reference NAG attention processor of torch_nag.py. Images in [0, 1]
must agree within 1e-3. Stochastic schedulers get the same per-step noise on both sides.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

import nag_jax
from tiny_pipelines import make_sd_pipeline, write_scheduler
from torch_nag import install_nag, with_nag_context

DIFFUSERS = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline, "lcm": StableDiffusionPipeline}
PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {kind: make_sd_pipeline(tmp_path_factory.mktemp(kind), kind) for kind in DIFFUSERS}


def start_latents(batch, seed=3):
    return np.random.default_rng(seed).standard_normal((batch, 4, 16, 16)).astype(np.float32)


def our_step_noise(seed, images, shape):
    """The noise our sampler draws at each step (key per image from (seed, index))."""
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(images))
    _, step_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
    return lambda step: np.asarray(jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), shape))(step_keys))


def run_pair(folder, kind, scheduler, *, steps, guidance_scale, negative_prompt=None, nag=None, seed=0,
             monkeypatch=None, with_plain=False):
    """(ours, diffusers) images for the same latents; `nag`: dict of NAG arguments or None.
    `with_plain` adds diffusers' image without NAG (cheap: eager PyTorch on a tiny model)."""
    write_scheduler(folder, scheduler)
    latents = start_latents(1)
    ours = nag_jax.NAGPipeline.from_pretrained(folder)(
        PROMPT, negative_prompt=negative_prompt, guidance_scale=guidance_scale, num_inference_steps=steps,
        latents=latents, output_type="np", seed=seed, **(nag or {}),
    ).images
    pipe = DIFFUSERS[kind].from_pretrained(folder)
    if scheduler in ("lcm", "euler_ancestral") and monkeypatch is not None:
        noise, calls = our_step_noise(seed, 1, latents.shape[1:]), []

        def same_noise(shape, generator=None, device=None, dtype=None, layout=None):
            calls.append(None)
            return torch.from_numpy(noise(len(calls) - 1)).to(dtype)

        module = {"lcm": "scheduling_lcm", "euler_ancestral": "scheduling_euler_ancestral_discrete"}[scheduler]
        monkeypatch.setattr(f"diffusers.schedulers.{module}.randn_tensor", same_noise)

    def generate():
        with torch.no_grad():
            return pipe(PROMPT, negative_prompt=negative_prompt, guidance_scale=guidance_scale,
                        num_inference_steps=steps, latents=torch.from_numpy(latents), output_type="np").images

    plain = generate() if with_plain else None
    if nag is not None:
        install_nag(pipe.unet, nag["nag_scale"], nag.get("nag_tau", 2.5), nag["nag_alpha"])
        negative_embeds = pipe.encode_prompt(nag["nag_negative_prompt"], device="cpu", num_images_per_prompt=1,
                                             do_classifier_free_guidance=False)[0]
        with_nag_context(pipe.unet, negative_embeds, nag.get("nag_end", 1.0))
    reference = generate()
    return (ours, reference, plain) if with_plain else (ours, reference)


@pytest.mark.parametrize(
    "kind,scheduler,steps,guidance_scale",
    [
        ("sd15", "euler", 3, 7.5),  # CFG on
        ("sd15", "ddim", 3, 1.0),  # CFG off
        ("sd15", "dpmpp_2m_karras", 4, 7.5),
        ("sd15", "euler_ancestral", 2, 7.5),  # fresh noise per step: the same noise fed to diffusers
        ("sdxl", "euler_trailing", 2, 1.0),  # Lightning/Turbo-style
        ("sdxl", "euler", 2, 5.0),  # CFG with no negative prompt: zero embeddings (force_zeros_for_empty_prompt)
        ("lcm", "lcm", 3, 8.0),  # guidance embedded through time_cond_proj_dim, CFG off, fresh noise per step
    ],
)
def test_pipeline_matches_diffusers_without_nag(folders, monkeypatch, kind, scheduler, steps, guidance_scale):
    ours, reference = run_pair(folders[kind], kind, scheduler, steps=steps, guidance_scale=guidance_scale,
                               monkeypatch=monkeypatch)
    assert ours.shape == reference.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(ours, reference, atol=1e-3)


@pytest.mark.parametrize(
    "kind,guidance_scale,negative_prompt,nag",
    [
        ("sd15", 1.0, None, dict(nag_negative_prompt="a dog", nag_scale=3.0, nag_alpha=0.375)),
        ("sd15", 7.5, "blurry", dict(nag_negative_prompt="a dog", nag_scale=3.0, nag_alpha=0.375)),
        ("sdxl", 1.0, None, dict(nag_negative_prompt="a dog", nag_scale=5.0, nag_alpha=0.5, nag_tau=1.5)),
        ("sdxl", 5.0, "blurry", dict(nag_negative_prompt="the dog", nag_scale=3.0, nag_alpha=0.5)),
    ],
)
def test_nag_matches_reference_processor(folders, kind, guidance_scale, negative_prompt, nag):
    ours, reference, plain = run_pair(folders[kind], kind, "euler", steps=3, guidance_scale=guidance_scale,
                                      negative_prompt=negative_prompt, nag=nag, with_plain=True)
    np.testing.assert_allclose(ours, reference, atol=1e-3)
    assert np.abs(ours - plain).max() > 1e-2  # NAG changed the image


def test_nag_end_switches_off_at_the_reference_step(folders):
    nag = dict(nag_negative_prompt="a dog", nag_scale=4.0, nag_alpha=0.5, nag_end=0.5)
    ours, reference, plain = run_pair(folders["sd15"], "sd15", "euler", steps=4, guidance_scale=1.0, nag=nag,
                                      with_plain=True)
    np.testing.assert_allclose(ours, reference, atol=1e-3)
    assert np.abs(ours - plain).max() > 1e-3  # the first steps ran with NAG
    # which step the cut falls on is checked against the reference rule above; that the steps
    # after it build no negative branch at all is tests/test_sampler.py's FLOP count
