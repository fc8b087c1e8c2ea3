"""NAGPipeline on tiny FLUX.1-schnell-like and -dev-like folders equals diffusers' FluxPipeline.

NAG off: diffusers' FluxPipeline with the same packed `latents` (distilled guidance, dynamic
shift, true CFG). NAG on, `reference` mode: the same pipeline whose transformer runs the
PyTorch reference NAG (torch_flux_nag.py) with the negative prompt's rows appended. Images in
[0, 1] must agree within 1e-3. `shared-image` equals `reference` when the pooled embeddings
agree; otherwise their difference is measured and printed.
"""

import time

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

import nag_jax
from nag_jax.families.flux import FluxFamily, pack_latents, unpack_latents
from tiny_flux_pipeline import MAX_SEQUENCE_LENGTH, make_flux_pipeline
from torch_flux_nag import with_nag_negatives

PROMPT, SIZE, STEPS = "a photo of a cat", 32, 2
TOKENS, CHANNELS = (SIZE // 4) ** 2, 64  # 8x8 packed tokens of 2x2 patches of 16 latent channels
NAG = dict(nag_negative_prompt="a dog", nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """schnell's folder says its image size and T5 length (as the embedded flux-shapes model does);
    dev's, like FLUX.1's, does not."""
    return {"schnell": make_flux_pipeline(tmp_path_factory.mktemp("schnell"), "schnell", sample_size=SIZE // 2,
                                          t5_model_max_length=MAX_SEQUENCE_LENGTH),
            "dev": make_flux_pipeline(tmp_path_factory.mktemp("dev"), "dev")}


@pytest.fixture(scope="module")
def pipelines(folders):
    """Loaded once per kind: (ours, diffusers')."""
    return {kind: (nag_jax.NAGPipeline.from_pretrained(folder), FluxPipeline.from_pretrained(folder))
            for kind, folder in folders.items()}


def start_latents(seed=3):
    return np.random.default_rng(seed).standard_normal((1, TOKENS, CHANNELS)).astype(np.float32)


def ours(pipe, **kwargs):
    return pipe(PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, latents=start_latents(),
                output_type="np", max_sequence_length=MAX_SEQUENCE_LENGTH, **kwargs).images


def diffusers_images(pipe, nag=None, **kwargs):
    """diffusers' images; `nag`: NAG arguments, run by the reference transformer wrapper."""
    transformer = pipe.transformer
    if nag is not None:
        encode = lambda p: pipe.encode_prompt(p, device="cpu", max_sequence_length=MAX_SEQUENCE_LENGTH)  # noqa: E731
        positive, negative = encode(PROMPT), encode(nag["nag_negative_prompt"])
        with_nag_negatives(transformer, positive[0], negative[0], negative[1], nag["nag_scale"], nag["nag_tau"],
                           nag["nag_alpha"], nag.get("nag_norm", "l1"))
    try:
        with torch.no_grad():
            return pipe(PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                        latents=torch.from_numpy(start_latents()), output_type="np",
                        max_sequence_length=MAX_SEQUENCE_LENGTH, **kwargs).images
    finally:
        transformer.__dict__.pop("forward", None)


@pytest.mark.parametrize(
    "kind,arguments",
    [
        ("schnell", dict(guidance_scale=0.0)),
        # distilled guidance, dynamic shift, real CFG (every test compiles its own loop: keep them few)
        ("dev", dict(guidance_scale=2.0, true_cfg_scale=4.0, negative_prompt="blurry")),
    ],
    ids=["schnell", "dev-true-cfg"],
)
def test_pipeline_matches_diffusers_without_nag(pipelines, kind, arguments):
    our_pipe, their_pipe = pipelines[kind]
    images, reference = ours(our_pipe, **arguments), diffusers_images(their_pipe, **arguments)
    assert images.shape == reference.shape == (1, SIZE, SIZE, 3)
    np.testing.assert_allclose(images, reference, atol=1e-3)


@pytest.mark.parametrize(
    "kind,arguments",
    [("schnell", dict(nag_norm="l2")), ("dev", dict(true_cfg_scale=4.0, negative_prompt="blurry"))],
    ids=["schnell-l2", "dev-true-cfg"],
)
def test_reference_mode_matches_the_pytorch_reference(pipelines, kind, arguments):
    """nag_mode defaults to "reference"; with CFG the uncond rows stay plain. With nag_norm="l2"
    this is the reference's own Flux pipeline."""
    our_pipe, their_pipe = pipelines[kind]
    images = ours(our_pipe, **arguments, **NAG)
    np.testing.assert_allclose(images, diffusers_images(their_pipe, nag=dict(NAG, **arguments), **{
        k: v for k, v in arguments.items() if k != "nag_norm"}), atol=1e-3)
    assert np.abs(images - ours(our_pipe, **arguments)).max() > 1e-2  # NAG changed the image


def test_shared_image_equals_reference_when_the_pooled_embeddings_agree(pipelines, monkeypatch):
    our_pipe, _ = pipelines["schnell"]
    family = our_pipe.family
    started = time.process_time()
    reference, shared = (ours(our_pipe, nag_mode=mode, **NAG) for mode in ("reference", "shared-image"))
    plain = ours(our_pipe)
    mode_gap, nag_effect = float(np.abs(shared - reference).max()), float(np.abs(reference - plain).max())
    print(f"\nFlux pipeline, {STEPS} steps: shared-image vs reference images differ by max {mode_gap:.4f} "
          f"(NAG itself moves them by {nag_effect:.4f}); {time.process_time() - started:.1f} s CPU")
    assert 1e-5 < mode_gap < nag_effect

    pooled = family.pooled_embeddings
    monkeypatch.setattr(family, "pooled_embeddings", lambda prompts: pooled([PROMPT] * len(prompts)))
    reference, shared = (ours(our_pipe, nag_mode=mode, **NAG) for mode in ("reference", "shared-image"))
    assert np.abs(reference - plain).max() > 1e-2  # the negative T5 context still guides
    np.testing.assert_allclose(shared, reference, atol=1e-5)


def test_bfloat16_stays_close_to_float32(folders, pipelines):
    """schnell with NAG. (The tiny dev model is far more sensitive: diffusers' own bfloat16 images
    differ from its float32 ones by 0.17 there, ours by as much.)"""
    float32 = ours(pipelines["schnell"][0], **NAG)
    bfloat16 = ours(nag_jax.NAGPipeline.from_pretrained(folders["schnell"], dtype="bfloat16"), **NAG)
    error = float(np.abs(bfloat16 - float32).max())
    print(f"\nFlux pipeline bfloat16 vs float32 images: max |diff| = {error:.4f}")
    assert np.isfinite(bfloat16).all() and error < 0.05


def test_default_size_and_text_length_come_from_the_folder(pipelines):
    """Without height/width/max_sequence_length: transformer/config.json's sample_size times the
    VAE scale, and the T5 tokenizer's model_max_length when below 512; else diffusers' defaults."""
    (schnell, their_schnell), dev = pipelines["schnell"], pipelines["dev"][0].family
    family = schnell.family
    assert (family.height, family.width, family.option_defaults["max_sequence_length"]) == (SIZE, SIZE,
                                                                                          MAX_SEQUENCE_LENGTH)
    assert (dev.height, dev.width, dev.option_defaults["max_sequence_length"]) == (128 * 2, 128 * 2, 512)
    images = schnell(PROMPT, num_inference_steps=STEPS, latents=start_latents(), output_type="np").images
    np.testing.assert_array_equal(images, ours(schnell))
    np.testing.assert_allclose(images, diffusers_images(their_schnell), atol=1e-3)


def test_packing_matches_diffusers():
    latents = torch.randn(2, 16, 8, 12)
    packed = FluxPipeline._pack_latents(latents, 2, 16, 8, 12)
    np.testing.assert_array_equal(pack_latents(latents.numpy()), packed.numpy())
    np.testing.assert_array_equal(unpack_latents(packed.numpy(), 8, 12), latents.numpy())


def test_defaults_and_bad_options(pipelines):
    schnell, dev = pipelines["schnell"][0].family, pipelines["dev"][0].family
    assert isinstance(dev, FluxFamily) and dev.defaults["num_inference_steps"] == 28 and dev.defaults["guidance_scale"] == 3.5
    assert schnell.defaults["num_inference_steps"] == 4 and FluxFamily.option_defaults["nag_mode"] == "reference"
    with pytest.raises(ValueError, match="nag_mode must be one of"):
        ours(pipelines["dev"][0], nag_mode="two-images", **NAG)
    with pytest.raises(ValueError, match="max_sequence_length must be"):
        pipelines["dev"][0](PROMPT, max_sequence_length=513)
    with pytest.raises(ValueError, match="height must be a positive multiple of 4"):
        pipelines["dev"][0](PROMPT, height=30)


def test_batch_invariant_image_alone_is_bit_identical_to_it_in_a_batch(pipelines):
    """Flux-dev with true CFG and reference-mode NAG: with batch_invariant=True image 0 comes out
    the same alone as within a batch (test_reproducibility.py covers the UNet family)."""
    pipe = pipelines["dev"][0]
    args = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="np", seed=3, true_cfg_scale=2.0,
                negative_prompt="ugly", max_sequence_length=MAX_SEQUENCE_LENGTH, batch_invariant=True, **NAG)
    batch = pipe([PROMPT, "a red car"], **args).images
    alone = pipe(PROMPT, **args).images
    assert np.abs(batch[0] - batch[1]).max() > 0.01
    assert np.array_equal(alone[0], batch[0])
