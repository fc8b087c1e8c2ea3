"""What is promised about randomness: image i is a function of (seed, i, its prompt, settings).

Image i's starting noise and per-step noise come from the key fold_in(key(seed), i), where i
is its position in the call's output (prompt-major, as diffusers orders num_images_per_prompt).
Promised and tested:
- the same call (seed, prompts, settings) gives bit-identical images, run after run;
- the same rows grouped differently (one prompt with num_images_per_prompt=2, or the prompt
  listed twice), or image 0 alone instead of within a larger batch, get the same noise, so the
  same image up to float32 rounding: not bit for bit, because XLA compiles another program for
  another batch shape (text encoder and denoiser), whose sums may round differently.
A stochastic scheduler (Euler ancestral) makes the per-step noise count. Device counts are
covered by test_multidevice.py.
"""

import numpy as np
import pytest

import nag_jax
from tiny_pipelines import make_sd_pipeline

SETTINGS = dict(nag_scale=3.0, guidance_scale=1.0, num_inference_steps=2, output_type="np")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = make_sd_pipeline(tmp_path_factory.mktemp("sd15"), "sd15")
    return nag_jax.NAGPipeline.from_pretrained(folder, scheduler="euler_ancestral")


def test_same_seed_and_settings_give_bit_identical_images(pipe):
    first = pipe(["a cat", "a dog"], seed=7, **SETTINGS).images
    again = pipe(["a cat", "a dog"], seed=7, **SETTINGS).images
    other_seed = pipe(["a cat", "a dog"], seed=8, **SETTINGS).images
    assert np.isfinite(first).all() and np.array_equal(first, again)
    assert not np.array_equal(first, other_seed)
    assert not np.array_equal(first[0], first[1])


def test_grouping_of_the_same_rows_gives_the_same_images(pipe):
    grouped = pipe("a cat", num_images_per_prompt=2, seed=7, **SETTINGS).images
    listed = pipe(["a cat", "a cat"], seed=7, **SETTINGS).images
    np.testing.assert_allclose(grouped, listed, rtol=0, atol=1e-5)
    assert np.abs(grouped[0] - grouped[1]).max() > 0.01  # two images of one prompt differ (own keys)


def test_image_does_not_depend_on_the_rest_of_the_batch(pipe):
    latent = dict(SETTINGS, output_type="latent")
    batch = pipe(["a cat", "a dog"], seed=7, **latent).images
    alone = pipe("a cat", seed=7, **latent).images
    scale = np.abs(batch[0]).max()
    assert scale > 0.1 and np.abs(batch[0] - batch[1]).max() > 0.1 * scale
    np.testing.assert_allclose(batch[0], alone[0], rtol=0, atol=1e-5 * scale)
