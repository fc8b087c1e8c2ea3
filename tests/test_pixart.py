"""PixArt-Sigma: transformer, prompt encoding and NAGPipeline against diffusers.

The transformer (with and without PixArt-alpha's resolution conditions, on a non-square latent
and a padded text mask) against `PixArtTransformer2DModel`; the T5 prompt encoding (mask
included) against `PixArtSigmaPipeline.encode_prompt`; whole pipelines on a tiny folder in the
published layout against `PixArtSigmaPipeline` (CFG on and off) and, with NAG (alone, with
CFG, nag_end < 1), against the same pipeline with the reference NAG of torch_dit_nag.py.
Images in [0, 1] must agree within 1e-3.
"""

import copy
import functools
import json

import jax
import jax.extend

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import PixArtSigmaPipeline
from PIL import Image

import nag_jax
from convert.pixart import load_pixart_transformer
from nag_jax.cli import main
from nag_jax.sampler import denoise_loop, segments
from tiny_components import assert_close
from tiny_pipelines import sampler_call
from tiny_pixart import make_pixart_pipeline, random_transformer
from torch_dit_nag import discrete_cut, with_nag_negatives

PROMPT = "A photo of a cat "
STEPS = 3  # DPM-Solver++: a first-order, a second-order and a first-order final step
# A random model predicts no noise: from t = 999 (alpha 0.006) its x0 would saturate every pixel,
# so the pipelines run from t = 400 (custom timesteps, through diffusers' `timesteps` argument).
TIMESTEPS = [400, 250, 100]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_pixart_pipeline(tmp_path_factory.mktemp("pixart_sigma"))


@pytest.fixture(scope="module")
def ours(folder):
    return nag_jax.NAGPipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def diffusers_pipe(folder):
    return PixArtSigmaPipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def latents():
    return np.random.default_rng(3).standard_normal((1, 4, 16, 16)).astype(np.float32)


@pytest.mark.parametrize("additional_conditions", [False, True], ids=["sigma", "alpha_resolution_conditions"])
def test_transformer_matches_diffusers(tmp_path, additional_conditions):
    # the resolution embedding splits the width in thirds: 3 heads of 16
    model = random_transformer(seed=7, num_attention_heads=3, cross_attention_dim=48,
                               use_additional_conditions=additional_conditions)
    model.save_pretrained(str(tmp_path))
    module, params = load_pixart_transformer(tmp_path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 12)).astype(np.float32)
    context = rng.standard_normal((2, 7, 32)).astype(np.float32)
    mask = np.array([[1] * 4 + [0] * 3, [1] * 7], np.float32)
    t = np.array([500.0, 20.0], np.float32)
    resolution, aspect_ratio = np.array([[64.0, 96.0]] * 2, np.float32), np.array([[1.5]] * 2, np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(context),
                     encoder_attention_mask=torch.from_numpy(mask), timestep=torch.from_numpy(t),
                     added_cond_kwargs={"resolution": torch.from_numpy(resolution),
                                        "aspect_ratio": torch.from_numpy(aspect_ratio)}).sample
    got = module.apply({"params": params}, *map(jnp.asarray, (x, context, mask, t, resolution, aspect_ratio)))
    assert params["text_blocks"]["to_k"]["kernel"].shape == (2, 48, 48)  # stacked for the text part's scan
    assert_close(got, want)


def test_prompt_encoding_with_mask_matches_diffusers(ours, diffusers_pipe):
    got = ours.family.encode([PROMPT, "blurry"], {})
    with torch.no_grad():
        embeds, mask, _, _ = diffusers_pipe.encode_prompt([PROMPT, "blurry"], do_classifier_free_guidance=False,
                                                          device="cpu", clean_caption=False)
    assert got.text["context"].shape == (2, 300, 32)
    np.testing.assert_array_equal(got.text["mask"], mask.numpy())
    assert 0 < mask.numpy().sum() < 20
    assert_close(got.text["context"], embeds)


def reference(pipe, latents, guidance_scale, negative_prompt=None, nag=None):
    """diffusers' images; `nag`: dict of NAG arguments (with nag_negative_prompt) or None."""
    if nag is not None:  # patch a copy of the transformer
        pipe = PixArtSigmaPipeline(**dict(pipe.components, transformer=copy.deepcopy(pipe.transformer)))
        with torch.no_grad():
            embeds, mask, _, _ = pipe.encode_prompt(nag["nag_negative_prompt"], do_classifier_free_guidance=False,
                                                    device="cpu", clean_caption=False)
        with_nag_negatives(pipe.transformer, pipe.transformer.caption_projection, embeds, mask, nag["nag_scale"],
                           nag.get("nag_tau", 2.5), nag.get("nag_alpha", 0.375), discrete_cut(nag.get("nag_end", 1.0)))
    with torch.no_grad():
        return pipe(PROMPT, negative_prompt=negative_prompt or "", guidance_scale=guidance_scale,
                    num_inference_steps=STEPS, timesteps=TIMESTEPS, latents=torch.from_numpy(latents), output_type="np",
                    use_resolution_binning=False, clean_caption=False).images


def generate(ours, latents, guidance_scale, negative_prompt=None, nag=None):
    return ours(PROMPT, negative_prompt=negative_prompt, guidance_scale=guidance_scale, num_inference_steps=STEPS,
                timesteps=TIMESTEPS, latents=latents, output_type="np", **(nag or {})).images


@pytest.mark.parametrize("guidance_scale,negative_prompt", [(1.0, None), (4.5, None), (4.5, "blurry")],
                         ids=["cfg_off", "cfg_empty_negative", "cfg_negative"])
def test_pipeline_matches_diffusers_without_nag(diffusers_pipe, ours, latents, guidance_scale, negative_prompt):
    got = generate(ours, latents, guidance_scale, negative_prompt)
    want = reference(diffusers_pipe, latents, guidance_scale, negative_prompt)
    assert got.shape == want.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(got, want, atol=1e-3)


@pytest.mark.parametrize(
    "guidance_scale,negative_prompt,nag",
    [
        (1.0, None, dict(nag_negative_prompt="a dog", nag_scale=5.0)),  # PixArt defaults tau 2.5, alpha 0.375
        (4.5, "blurry", dict(nag_negative_prompt="the dog on a red chair", nag_scale=4.0, nag_tau=1.5, nag_alpha=0.5)),
        (1.0, None, dict(nag_negative_prompt="a dog", nag_scale=5.0, nag_end=0.7)),  # t >= 299: 400 only
    ],
    ids=["nag_alone", "nag_with_cfg", "nag_end"],
)
def test_nag_matches_reference(diffusers_pipe, ours, latents, guidance_scale, negative_prompt, nag):
    got = generate(ours, latents, guidance_scale, negative_prompt, nag)
    np.testing.assert_allclose(got, reference(diffusers_pipe, latents, guidance_scale, negative_prompt, nag), atol=1e-3)
    plain = generate(ours, latents, guidance_scale, negative_prompt)
    assert np.abs(got - plain).max() > 5e-3  # NAG changed the image by far more than the parity tolerance
    if nag.get("nag_end", 1.0) < 1.0:
        full = generate(ours, latents, guidance_scale, negative_prompt, dict(nag, nag_end=1.0))
        assert np.abs(got - full).max() > 5e-3  # the last steps really ran without NAG


def test_cli_generate_with_the_family_defaults(folder, tmp_path, capsys):
    argv = ["generate", "--model", str(folder), "--prompt", PROMPT, "--nag-negative-prompt", "a dog", "--steps", "2",
            "--no-progress", "--output", str(tmp_path)]
    assert main(argv) == 0
    image = Image.open(capsys.readouterr().out.strip())
    record = json.loads(image.text["nag-jax"])
    assert image.size == (32, 32)
    assert [record[k] for k in ("nag_scale", "nag_tau", "nag_alpha", "guidance_scale")] == [5.0, 2.5, 0.375, 4.5]


def scans(jaxpr, nested_in=0):
    """(depth, scan equation) of every scan in `jaxpr`; depth counts the scans around it."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            yield nested_in, eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from scans(sub, nested_in + (eqn.primitive.name == "scan"))


def test_caption_keys_values_are_computed_once_per_sampling_run(ours, latents):
    """The sampling loop runs the transformer's text part (the caption projection and every
    block's cross-attention keys and values) before each step scan, not inside it: the step
    body holds one scan over the blocks, the text part's own scan stays outside."""
    captured = sampler_call(lambda: generate(ours, latents, 4.5, "blurry",
                                             dict(nag_negative_prompt="a dog", nag_scale=5.0, nag_end=0.7)))
    family, plan = ours.family, captured["plan"]
    loop = functools.partial(denoise_loop, family.denoise, captured["schedule"], plan, "none", prepare=family.prepare)
    found = list(scans(jax.make_jaxpr(loop)(*captured["args"]).jaxpr))
    phases = len(segments(plan, STEPS))
    assert plan.nag and plan.cfg and phases == 2  # a NAG scan with negative rows, then a plain one
    layers = family.transformer.config.num_layers
    outside = [eqn.params["length"] for depth, eqn in found if depth == 0]
    inside = [eqn.params["length"] for depth, eqn in found if depth == 1]
    assert sorted(outside) == sorted([layers] * phases + [1, 2])  # per phase: the text part, then its steps
    assert inside == [layers] * phases  # each step: the blocks only
