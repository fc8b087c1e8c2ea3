"""NAGPipeline on tiny Wan2.1 folders equals diffusers' WanPipeline / WanImageToVideoPipeline
(same latents; CFG off and on), and NAG equals the reference semantics of torch_wan_nag.py run
inside diffusers' own pipeline (alone, with CFG, with nag_end < 1)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from nag_jax.pipeline import NAGPipeline
from nag_jax.families.wan import prompt_clean
from tests.tiny_wan import build_tiny_wan_pipeline
from torch_wan_nag import install_nag, with_nag_rows

PROMPT, NEGATIVE, NAG_NEGATIVE = "a red cat  &amp;amp; a dog", "blurry", "a photo of a dog"
NAG = dict(nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25)
CALL = dict(height=32, width=32, num_frames=5, num_inference_steps=2)


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan_t2v")
    reference = build_tiny_wan_pipeline(folder)
    latents = np.random.default_rng(0).standard_normal((1, 4, 2, 4, 4)).astype(np.float32)
    return reference, NAGPipeline.from_pretrained(folder), latents


def diffusers_latents(pipe, latents, **kwargs):
    with torch.no_grad():
        out = pipe(prompt=PROMPT, latents=torch.from_numpy(latents), output_type="latent", **CALL, **kwargs)
    return out.frames.numpy()


def reference_nag(pipe, latents, guidance_scale, nag_end=1.0, **kwargs):
    pipe = copy.deepcopy(pipe)
    negative = pipe.encode_prompt(NAG_NEGATIVE, do_classifier_free_guidance=False, max_sequence_length=512)[0]
    install_nag(pipe.transformer, NAG["nag_scale"], NAG["nag_tau"], NAG["nag_alpha"])
    with_nag_rows(pipe.transformer, negative, cfg=guidance_scale > 1, nag_end=nag_end)
    return diffusers_latents(pipe, latents, guidance_scale=guidance_scale, **kwargs)


def ours(pipe, latents, **kwargs):
    return pipe(PROMPT, latents=latents, output_type="latent", **CALL, **kwargs).frames


def assert_close(got, want, tol=1e-4):
    assert np.abs(got - want).max() <= tol * max(1.0, np.abs(want).max())


def test_prompt_clean_as_diffusers():
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean as diffusers_clean

    for text in (PROMPT, "  tabs\tand\nnewlines ", "&lt;b&gt; bold", "cafÃ© at night"):
        assert prompt_clean(text) == diffusers_clean(text)


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0], ids=["no-cfg", "cfg"])
def test_t2v_frames_match_diffusers(t2v, guidance_scale):
    reference, pipe, latents = t2v
    with torch.no_grad():
        want = reference(PROMPT, negative_prompt=NEGATIVE, latents=torch.from_numpy(latents), output_type="np",
                         guidance_scale=guidance_scale, **CALL).frames
    out = pipe(PROMPT, negative_prompt=NEGATIVE, latents=latents, output_type="np", guidance_scale=guidance_scale,
               **CALL)
    assert out.images is None and out.frames.dtype == np.float32 and out.frames.shape == (1, 5, 32, 32, 3)
    assert np.abs(out.frames - want).max() <= 1e-3
    assert np.abs(want - want.mean()).max() > 0.05  # the frames are not flat: the comparison sees content


@pytest.mark.parametrize("guidance_scale, nag_end", [(1.0, 1.0), (5.0, 1.0), (1.0, 0.5)],
                         ids=["nag", "nag+cfg", "nag_end"])
def test_t2v_nag_matches_reference(t2v, guidance_scale, nag_end):
    reference, pipe, latents = t2v
    want = reference_nag(reference, latents, guidance_scale, nag_end)
    got = ours(pipe, latents, guidance_scale=guidance_scale, nag_negative_prompt=NAG_NEGATIVE, nag_end=nag_end, **NAG)
    assert_close(got, want)
    plain = ours(pipe, latents, guidance_scale=guidance_scale)
    assert np.abs(plain - want).max() > 1e-2 * max(1.0, np.abs(want).max())  # NAG moved the result


def test_t2v_nag_with_the_prompt_as_negative_is_nag_off(t2v):
    _, pipe, latents = t2v
    same = ours(pipe, latents, guidance_scale=1.0, nag_negative_prompt=PROMPT, **NAG)
    assert_close(same, ours(pipe, latents, guidance_scale=1.0), tol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_frames": 6}, "num_frames"), ({"height": 40}, "height"), ({"max_sequence_length": 600}, "max_sequence_length"),
    ({"image": np.zeros((32, 32, 3))}, "image"),
])
def test_bad_arguments(t2v, kwargs, match):
    _, pipe, _ = t2v
    with pytest.raises(ValueError, match=match):
        pipe(PROMPT, **{**CALL, **kwargs}, output_type="latent")


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("wan_i2v")
    reference = build_tiny_wan_pipeline(folder, image_to_video=True)
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))  # resized by both pipelines
    latents = rng.standard_normal((1, 4, 2, 4, 4)).astype(np.float32)
    return reference, NAGPipeline.from_pretrained(folder), latents, image


def test_i2v_frames_match_diffusers(i2v):
    """First-frame conditioning (CLIP tokens of the image, VAE latents behind the mask channels), CFG on."""
    reference, pipe, latents, image = i2v
    with torch.no_grad():
        want = reference(image=image, prompt=PROMPT, negative_prompt=NEGATIVE, latents=torch.from_numpy(latents),
                         output_type="np", guidance_scale=5.0, **CALL).frames
    got = pipe(PROMPT, image=image, negative_prompt=NEGATIVE, latents=latents, output_type="np", guidance_scale=5.0,
               **CALL).frames
    assert got.shape == (1, 5, 32, 32, 3)
    assert np.abs(got - want).max() <= 1e-3
    other = pipe(PROMPT, image=np.zeros((32, 32, 3)), negative_prompt=NEGATIVE, latents=latents, output_type="np",
                 guidance_scale=5.0, **CALL).frames
    assert np.abs(other - want).max() > 1e-2  # the image conditions the video


def test_i2v_nag_with_cfg_matches_reference(i2v):
    reference, pipe, latents, image = i2v
    want = reference_nag(reference, latents, 5.0, image=image)
    got = ours(pipe, latents, image=image, guidance_scale=5.0, nag_negative_prompt=NAG_NEGATIVE, **NAG)
    assert_close(got, want)
    plain = ours(pipe, latents, image=image, guidance_scale=5.0)
    assert np.abs(plain - want).max() > 1e-2 * max(1.0, np.abs(want).max())


def test_converted_folder_gives_the_same_videos(t2v, tmp_path):
    """`nag-jax convert` of a Wan folder (stacked Flax parameters written once) samples the same."""
    from nag_jax.converted import convert_pipeline

    from convert.checkpoint import FLAX_PARAMS_FILE

    _, pipe, latents = t2v
    folder = convert_pipeline(pipe.family.path, tmp_path / "converted", progress=False)
    assert all((folder / name / FLAX_PARAMS_FILE).exists() for name in ("transformer", "text_encoder", "vae"))
    converted = NAGPipeline.from_pretrained(folder)
    np.testing.assert_array_equal(ours(converted, latents, guidance_scale=5.0, nag_negative_prompt=NAG_NEGATIVE, **NAG),
                                  ours(pipe, latents, guidance_scale=5.0, nag_negative_prompt=NAG_NEGATIVE, **NAG))


def test_flow_euler_with_the_folder_shift_matches_diffusers(t2v):
    """scheduler="flow_euler" (few-step recipes): flow-match Euler with the folder's flow_shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    reference, pipe, latents = t2v
    euler = copy.copy(reference)
    euler.scheduler = FlowMatchEulerDiscreteScheduler(shift=reference.scheduler.config.flow_shift)
    swapped = NAGPipeline.from_pretrained(pipe.family.path, scheduler="flow_euler")
    assert_close(ours(swapped, latents, guidance_scale=1.0), diffusers_latents(euler, latents, guidance_scale=1.0))
