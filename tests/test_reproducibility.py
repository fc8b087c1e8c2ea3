"""What is promised about randomness: image i is a function of (seed, i, its prompt, settings).

Image i's starting noise and per-step noise come from the key fold_in(key(seed), i), where i
is its position in the call's output (prompt-major, as diffusers orders num_images_per_prompt).
Promised and tested:
- the same call (seed, prompts, settings) gives bit-identical images, run after run;
- with batch_invariant=True, the same rows grouped differently (one prompt with
  num_images_per_prompt=2, or the prompt listed twice), or image 0 alone instead of within a
  larger batch, give bit-identical images: prompts are encoded, images denoised and decoded
  one at a time by programs compiled for one image (Flux: test_pipeline_flux.py). Across
  device counts and parallel modes (1 device, 8 sharded, pmap, padded batches) likewise, for
  SD1.5 and Flux-dev: test_multidevice.py;
- by default (batched, faster) the regrouped rows get the same noise, so the same image up to
  float32 rounding: XLA compiles another program for another batch shape, whose sums may round
  differently.
CFG, NAG and a stochastic scheduler (Euler ancestral, so the per-step noise counts) are on.
"""

import numpy as np
import pytest

import nag_jax
from tiny_pipelines import make_sd_pipeline

SETTINGS = dict(nag_scale=3.0, nag_negative_prompt="blurry", guidance_scale=7.5, num_inference_steps=2,
                output_type="np")
INVARIANT = dict(SETTINGS, batch_invariant=True)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = make_sd_pipeline(tmp_path_factory.mktemp("sd15"), "sd15")
    return nag_jax.NAGPipeline.from_pretrained(folder, scheduler="euler_ancestral")


@pytest.fixture(scope="module")
def invariant(pipe):
    """batch_invariant=True images of the same rows in different batches (3 compiled loops)."""
    return {
        "grouped": pipe("a cat", num_images_per_prompt=2, seed=7, **INVARIANT).images,
        "listed": pipe(["a cat", "a cat"], seed=7, **INVARIANT).images,
        "batch": pipe(["a cat", "a dog", "a bird"], seed=7, **INVARIANT).images,
        "alone": pipe("a cat", seed=7, **INVARIANT).images,
    }


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


def test_batch_invariant_grouping_is_bit_identical(invariant):
    grouped, listed = invariant["grouped"], invariant["listed"]
    assert np.isfinite(grouped).all() and np.abs(grouped[0] - grouped[1]).max() > 0.01
    assert np.array_equal(grouped, listed)
    assert np.array_equal(grouped[0], invariant["batch"][0])  # image 0 of "a cat" in every batch


def test_batch_invariant_image_alone_is_bit_identical_to_it_in_a_batch(invariant):
    batch, alone = invariant["batch"], invariant["alone"]
    assert np.abs(batch[0] - batch[1]).max() > 0.01
    assert np.array_equal(alone[0], batch[0])


def test_batch_invariant_changes_no_image_beyond_rounding(pipe, invariant):
    batched = pipe(["a cat", "a dog"], seed=7, **SETTINGS).images  # the program of the first test
    np.testing.assert_allclose(invariant["batch"][:2], batched, rtol=0, atol=1e-5)


def test_image_does_not_depend_on_the_rest_of_the_batch(pipe):
    latent = dict(SETTINGS, output_type="latent")
    batch = pipe(["a cat", "a dog"], seed=7, **latent).images
    alone = pipe("a cat", seed=7, **latent).images
    scale = np.abs(batch[0]).max()
    assert scale > 0.1 and np.abs(batch[0] - batch[1]).max() > 0.1 * scale
    np.testing.assert_allclose(batch[0], alone[0], rtol=0, atol=1e-5 * scale)
