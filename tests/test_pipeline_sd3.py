"""NAGPipeline on a tiny SD3.5-Large-like folder equals diffusers' StableDiffusion3Pipeline.

NAG off: diffusers' pipeline with the same `latents`, CFG on and off. NAG on (alone and with
CFG, and with nag_end < 1): the same pipeline with the reference NAG of torch_sd3_nag.py,
whose transformer gets the negative text rows (context and pooled) appended while the flow
rule t >= (1 - nag_end) * 1000 keeps NAG on. Images in [0, 1] must agree within 1e-3.
"""

import copy
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

import nag_jax
from tiny_components import assert_close
from tiny_sd3_pipeline import make_sd3_pipeline
from torch_sd3_nag import install_nag, with_nag_text

PROMPT = "a photo of a cat"
STEPS = 3  # one length for every test: each compiled loop serves several of them


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_sd3_pipeline(tmp_path_factory.mktemp("sd35_large"))


@pytest.fixture(scope="module")
def ours(folder):
    return nag_jax.NAGPipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def latents():
    return np.random.default_rng(3).standard_normal((1, 16, 16, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def diffusers_pipe(folder):
    return StableDiffusion3Pipeline.from_pretrained(folder)


def reference(pipe, latents, guidance_scale, negative_prompt=None, nag=None):
    """diffusers' images; `nag`: dict of NAG arguments (with nag_negative_prompt) or None."""
    if nag is not None:  # patch a copy of the transformer
        pipe = StableDiffusion3Pipeline(**dict(pipe.components, transformer=copy.deepcopy(pipe.transformer)))
        install_nag(pipe.transformer, nag["nag_scale"], nag.get("nag_tau", 2.5), nag.get("nag_alpha", 0.125))
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(nag["nag_negative_prompt"], None, None, device="cpu",
                                                      do_classifier_free_guidance=False)
        with_nag_text(pipe.transformer, embeds, pooled, nag.get("nag_end", 1.0))
    with torch.no_grad():
        return pipe(PROMPT, negative_prompt=negative_prompt, guidance_scale=guidance_scale, num_inference_steps=STEPS,
                    latents=torch.from_numpy(latents), output_type="np").images


def generate(ours, latents, guidance_scale, negative_prompt=None, nag=None):
    return ours(PROMPT, negative_prompt=negative_prompt, guidance_scale=guidance_scale, num_inference_steps=STEPS,
                latents=latents, output_type="np", **(nag or {})).images


@pytest.mark.parametrize("guidance_scale,negative_prompt", [(1.0, None), (7.0, None), (4.5, "blurry")],
                         ids=["cfg_off", "cfg_empty_negative", "cfg_negative"])
def test_pipeline_matches_diffusers_without_nag(diffusers_pipe, ours, latents, guidance_scale, negative_prompt):
    got = generate(ours, latents, guidance_scale, negative_prompt)
    want = reference(diffusers_pipe, latents, guidance_scale, negative_prompt)
    assert got.shape == want.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(got, want, atol=1e-3)


@pytest.mark.parametrize(
    "guidance_scale,negative_prompt,nag",
    [
        (1.0, None, dict(nag_negative_prompt="a dog", nag_scale=5.0)),  # SD3.5-Large preset tau, alpha
        (4.5, "blurry", dict(nag_negative_prompt="the dog", nag_scale=4.0, nag_tau=1.5, nag_alpha=0.5)),
    ],
    ids=["nag_alone", "nag_with_cfg"],
)
def test_nag_matches_reference(diffusers_pipe, ours, latents, guidance_scale, negative_prompt, nag):
    got = generate(ours, latents, guidance_scale, negative_prompt, nag)
    np.testing.assert_allclose(got, reference(diffusers_pipe, latents, guidance_scale, negative_prompt, nag), atol=1e-3)
    plain = generate(ours, latents, guidance_scale, negative_prompt)
    assert np.abs(got - plain).max() > 4e-3  # NAG changed the image by well over the parity tolerance


def test_nag_end_switches_off_at_the_flow_rule_step(diffusers_pipe, ours, latents):
    # the shift-3 schedule: t = 1000, ~751, ~9; nag_end 0.2 keeps t >= 800: step 0 only
    nag = dict(nag_negative_prompt="a dog", nag_scale=5.0, nag_end=0.2)
    got = generate(ours, latents, 1.0, nag=nag)
    np.testing.assert_allclose(got, reference(diffusers_pipe, latents, 1.0, nag=nag), atol=1e-3)
    full = generate(ours, latents, 1.0, nag=dict(nag, nag_end=1.0))
    plain = generate(ours, latents, 1.0)
    assert np.abs(got - full).max() > 2e-3  # the step at t ~ 751 really ran without NAG
    assert np.abs(got - plain).max() > 2e-3  # and the first step with it


def test_prompt_encoding_without_t5_and_with_clip_skip(folder, diffusers_pipe, tmp_path):
    """A folder whose model_index.json marks text_encoder_3 absent: zeros take the T5 tokens."""
    for component in folder.iterdir():
        if component.is_dir() and not component.name.endswith("_3"):
            (tmp_path / component.name).symlink_to(component)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(text_encoder_3=[None, None], tokenizer_3=[None, None])
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    family = nag_jax.NAGPipeline.from_pretrained(tmp_path).family
    assert family.t5 is None
    got = family.encode([PROMPT], {"clip_skip": 1, "max_sequence_length": 16})

    pipe = StableDiffusion3Pipeline(**dict(diffusers_pipe.components, text_encoder_3=None, tokenizer_3=None))
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt(PROMPT, None, None, device="cpu", do_classifier_free_guidance=False,
                                                   clip_skip=1, max_sequence_length=16)
    assert got.text["context"].shape == (1, 77 + 16, 32)
    assert_close(got.text["context"], context)
    assert_close(got.text["pooled"], pooled)
