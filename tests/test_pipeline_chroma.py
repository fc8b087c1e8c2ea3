"""NAGPipeline on a tiny Chroma folder equals diffusers' ChromaPipeline with its text mask made
boolean (stock diffusers 0.42 adds the float 0/1 mask to the scores instead of masking: the one
line marked below), with and without CFG; NAG invariants at the pipeline level (the transformer's
NAG is compared with the PyTorch reference in test_chroma.py)."""

import numpy as np
import pytest
import torch
from diffusers import ChromaPipeline

import nag_jax
from nag_jax.families.chroma import CHROMA_DEFAULTS, transformer_text_mask
from tiny_chroma import make_chroma_pipeline
from tiny_flux_pipeline import MAX_SEQUENCE_LENGTH

PROMPT, SIZE, STEPS = "a photo of a cat", 32, 2
TOKENS, CHANNELS = (SIZE // 4) ** 2, 64


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    folder = make_chroma_pipeline(tmp_path_factory.mktemp("chroma"))
    return nag_jax.NAGPipeline.from_pretrained(folder), ChromaPipeline.from_pretrained(folder)


def start_latents():
    return np.random.default_rng(3).standard_normal((1, TOKENS, CHANNELS)).astype(np.float32)


def ours(pipe, **kwargs):
    return pipe(PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, latents=start_latents(), output_type="np",
                max_sequence_length=MAX_SEQUENCE_LENGTH, **kwargs).images


def diffusers_images(pipe, monkeypatch, **kwargs):
    prepare = ChromaPipeline._prepare_attention_mask
    # the one line: diffusers' mask made boolean, so its attention masks instead of adding 0/1
    monkeypatch.setattr(ChromaPipeline, "_prepare_attention_mask",
                        lambda self, *a, **k: None if (mask := prepare(self, *a, **k)) is None else mask.bool())
    with torch.no_grad():
        return pipe(PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, latents=torch.from_numpy(start_latents()),
                    output_type="np", max_sequence_length=MAX_SEQUENCE_LENGTH, **kwargs).images


@pytest.mark.parametrize("arguments", [dict(guidance_scale=1.0), dict(negative_prompt="blurry")],
                         ids=["no-cfg", "cfg-default-scale"])
def test_matches_diffusers_with_a_boolean_mask(pipelines, monkeypatch, arguments):
    our_pipe, their_pipe = pipelines
    images = ours(our_pipe, **arguments)
    assert images.shape == (1, SIZE, SIZE, 3)
    np.testing.assert_allclose(images, diffusers_images(their_pipe, monkeypatch, **arguments), atol=1e-3)


def test_nag_invariants(pipelines):
    our_pipe, _ = pipelines
    plain = ours(our_pipe, guidance_scale=1.0)
    same = ours(our_pipe, guidance_scale=1.0, nag_scale=5.0, nag_negative_prompt=PROMPT)
    np.testing.assert_allclose(same, plain, atol=1e-5)  # a negative equal to the prompt changes nothing
    guided = ours(our_pipe, guidance_scale=1.0, nag_scale=5.0, nag_negative_prompt="a dog")
    assert np.abs(guided - plain).max() > 1e-2


def test_defaults_and_mask():
    assert (CHROMA_DEFAULTS["guidance_scale"], CHROMA_DEFAULTS["num_inference_steps"]) == (5.0, 35)
    # tokens 0-2 real: they and the first pad (3) attend; a full row keeps everything
    attended = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(transformer_text_mask(attended), [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
