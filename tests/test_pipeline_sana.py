"""NAGPipeline on tiny SANA and SANA-Sprint folders against diffusers' SanaPipeline / SanaSprintPipeline.

Prompt encoding (instruction prefix, token selection, mask) against `encode_prompt`; images
without NAG (SANA: CFG on and off; Sprint at 1 and 2 steps, its per-step noise fed to diffusers'
scheduler from our draws); with NAG (alone, with CFG, nag_end < 1; Sprint at 2 steps) against
the same pipelines with the reference NAG of torch_dit_nag.py (negative rows encoded as prompts).
Images in [0, 1] must agree within 1e-3.
"""

import copy
import json
from unittest import mock

import jax
import numpy as np
import pytest
import torch
from diffusers import SanaPipeline, SanaSprintPipeline
from diffusers.schedulers import scheduling_scm
from PIL import Image

import nag_jax
from nag_jax.cli import main
from nag_jax.families.sana import COMPLEX_HUMAN_INSTRUCTION
from tiny_components import assert_close
from tiny_sana import make_sana_pipeline
from torch_dit_nag import with_nag_negatives

PROMPT = "A photo of a cat"
TOKENS = 40  # max_sequence_length: short, so the tiny Gemma runs fast
STEPS = 3
SEED = 0


@pytest.fixture(scope="module")
def sana(tmp_path_factory):
    folder = make_sana_pipeline(tmp_path_factory.mktemp("sana"))
    return nag_jax.NAGPipeline.from_pretrained(folder), SanaPipeline.from_pretrained(folder), folder


@pytest.fixture(scope="module")
def sprint(tmp_path_factory):
    folder = make_sana_pipeline(tmp_path_factory.mktemp("sana_sprint"), sprint=True)
    return nag_jax.NAGPipeline.from_pretrained(folder), SanaSprintPipeline.from_pretrained(folder), folder


@pytest.fixture(scope="module")
def latents():
    return np.random.default_rng(3).standard_normal((1, 8, 8, 8)).astype(np.float32)


def encode_reference(pipe, prompt):
    """diffusers' (embeddings, mask) of the prompt path (SanaPipeline also returns the CFG negatives)."""
    cfg_off = {} if isinstance(pipe, SanaSprintPipeline) else {"do_classifier_free_guidance": False}
    with torch.no_grad():
        encoded = pipe.encode_prompt(prompt, device="cpu", max_sequence_length=TOKENS,
                                     complex_human_instruction=list(COMPLEX_HUMAN_INSTRUCTION), **cfg_off)
    return encoded[0], encoded[1]


def test_prompt_encoding_matches_diffusers(sana):
    ours, pipe, _ = sana
    got = ours.family.encode([PROMPT, "blurry, low quality"], {"max_sequence_length": TOKENS})
    embeds, mask = encode_reference(pipe, [PROMPT, "blurry, low quality"])
    assert got.text["context"].shape == (2, TOKENS, 32)
    np.testing.assert_array_equal(got.text["mask"], mask.numpy())
    assert_close(got.text["context"], embeds)


def our_step_noises(shape, steps):
    """The sampler's per-step noise of image 0 (pipeline.py and sampler.py: key (seed, image), split, fold_in step)."""
    image_key = jax.random.fold_in(jax.random.key(SEED), 0)
    step_key = jax.random.split(image_key)[1]
    draws = [jax.random.normal(jax.random.fold_in(step_key, s), shape) for s in range(steps)]
    return [torch.from_numpy(np.asarray(draw)) for draw in draws]


def reference(pipe, latents, nag=None, **call):
    """diffusers' images; `nag`: NAG arguments (with nag_negative_prompt) or None."""
    steps = call["num_inference_steps"]
    sprint = isinstance(pipe, SanaSprintPipeline)
    if nag is not None:
        pipe = type(pipe)(**dict(pipe.components, transformer=copy.deepcopy(pipe.transformer)))
        embeds, mask = encode_reference(pipe, nag["nag_negative_prompt"])
        transformer = pipe.transformer
        cut = (1 - nag.get("nag_end", 1.0)) * (1.0 if sprint else 1000.0)  # Sprint's model sees s, not 1000 s
        with_nag_negatives(transformer, lambda e: transformer.caption_norm(transformer.caption_projection(e)), embeds,
                           mask, nag["nag_scale"], nag.get("nag_tau", 2.5), nag.get("nag_alpha", 0.375), cut)
    if sprint and steps == 1:
        call["intermediate_timesteps"] = None  # diffusers allows it only at 2 steps
    noises = iter(our_step_noises(latents.shape[1:], steps) if sprint else [])
    with torch.no_grad(), mock.patch.object(scheduling_scm, "randn_tensor", lambda *a, **k: next(noises)[None]):
        return pipe(PROMPT, latents=torch.from_numpy(latents), output_type="np", use_resolution_binning=False,
                    max_sequence_length=TOKENS, **call).images


def generate(ours, latents, nag=None, **call):
    return ours(PROMPT, latents=latents, output_type="np", seed=SEED, max_sequence_length=TOKENS, **call,
                **(nag or {})).images


@pytest.mark.parametrize("call", [dict(guidance_scale=1.0), dict(guidance_scale=4.5, negative_prompt="blurry")],
                         ids=["cfg_off", "cfg_negative"])
def test_sana_matches_diffusers_without_nag(sana, latents, call):
    call = dict(call, num_inference_steps=STEPS)
    got = generate(sana[0], latents, **call)
    assert got.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(got, reference(sana[1], latents, **call), atol=1e-3)


@pytest.mark.parametrize(
    "call,nag",
    [
        (dict(guidance_scale=1.0), dict(nag_negative_prompt="a dog", nag_scale=5.0)),
        (dict(guidance_scale=4.5, negative_prompt="blurry"),
         dict(nag_negative_prompt="a dog on a red chair", nag_scale=4.0, nag_tau=1.5, nag_alpha=0.5)),
        (dict(guidance_scale=1.0), dict(nag_negative_prompt="a dog", nag_scale=5.0, nag_end=0.3)),
    ],
    ids=["nag_alone", "nag_with_cfg", "nag_end"],
)
def test_sana_nag_matches_reference(sana, latents, call, nag):
    call = dict(call, num_inference_steps=STEPS)
    got = generate(sana[0], latents, nag, **call)
    np.testing.assert_allclose(got, reference(sana[1], latents, nag, **call), atol=1e-3)
    assert np.abs(got - generate(sana[0], latents, **call)).max() > 1e-2  # NAG moved the image far beyond 1e-3
    if "nag_end" in nag:  # flow sigmas ~[1.0, 0.86, 0.6]: 0.3 keeps t >= 700, the first two steps
        assert np.abs(got - generate(sana[0], latents, dict(nag, nag_end=1.0), **call)).max() > 1e-2


@pytest.mark.parametrize("steps", [1, 2])
def test_sprint_matches_diffusers(sprint, latents, steps):
    call = dict(num_inference_steps=steps, guidance_scale=4.5)
    np.testing.assert_allclose(generate(sprint[0], latents, **call), reference(sprint[1], latents, **call), atol=1e-3)


# nag_end 0.1: the model's timesteps s ~ 1.0 and 0.78 (trig times pi/2, 1.3); NAG keeps s >= 0.9, step 0 only
@pytest.mark.parametrize("nag", [dict(nag_scale=5.0), dict(nag_scale=5.0, nag_end=0.1)], ids=["nag", "nag_end"])
def test_sprint_nag_matches_reference(sprint, latents, nag):
    nag = dict(nag, nag_negative_prompt="a dog")
    call = dict(num_inference_steps=2, guidance_scale=4.5)
    got = generate(sprint[0], latents, nag, **call)
    np.testing.assert_allclose(got, reference(sprint[1], latents, nag, **call), atol=1e-3)
    assert np.abs(got - generate(sprint[0], latents, **call)).max() > 1e-2
    if "nag_end" in nag:
        assert np.abs(got - generate(sprint[0], latents, dict(nag, nag_end=1.0), **call)).max() > 1e-2


def test_cli_generate_with_the_family_defaults(sana, tmp_path, capsys):
    folder = sana[2]
    argv = ["generate", "--model", str(folder), "--prompt", PROMPT, "--nag-negative-prompt", "a dog", "--steps", "2",
            "--no-progress", "--output", str(tmp_path)]
    assert main(argv) == 0
    image = Image.open(capsys.readouterr().out.strip())
    record = json.loads(image.text["nag-jax"])
    assert image.size == (32, 32)  # the transformer's sample_size times the DC-AE's 4x
    assert (record["nag_scale"], record["nag_tau"], record["nag_alpha"]) == (5.0, 2.5, 0.375)
