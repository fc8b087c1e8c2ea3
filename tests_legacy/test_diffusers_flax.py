"""NAG through diffusers' own Flax pipelines (nag_jax.diffusers_flax) equals nag-jax's NAGPipeline.

Tiny random SD-like and SDXL-like folders are written as published repositories (tests/
tiny_pipelines.py) plus the `diffusion_pytorch_model.bin` files that diffusers' Flax loader reads
with `from_pt=True`. diffusers' Flax ResNet and transformer blocks hard-code 32 groups in their
GroupNorms, so the UNets here use norm_num_groups=32. Both sides start from the same latents;
images in [0, 1] must agree within 1e-3. With NAG off the adapter must leave diffusers' output
bit-identical.

Every distinct run compiles a whole pipeline, so runs are cached per folder and shared between
tests, and diffusers' Flax calls use jit=True (one compiled program per pipeline and NAG layout;
guidance_scale and the NAG values are traced).
"""

import jax
import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, FlaxAutoencoderKL, FlaxStableDiffusionPipeline, FlaxStableDiffusionXLPipeline,
                       FlaxUNet2DConditionModel, UNet2DConditionModel)
from flax.jax_utils import replicate

import nag_jax
import tiny_unet
from nag_jax.diffusers_flax import NAGFlaxStableDiffusionPipeline, NAGFlaxStableDiffusionXLPipeline
from tiny_pipelines import make_sd_pipeline

PROMPT = "a photo of a cat"
STEPS = 3  # DDIM timesteps 667, 334, 1
PIPELINES = {  # kind: (diffusers' class, the NAG drop-in, extra from_pretrained arguments)
    "sd15": (FlaxStableDiffusionPipeline, NAGFlaxStableDiffusionPipeline,
             {"safety_checker": None, "feature_extractor": None}),
    "sdxl": (FlaxStableDiffusionXLPipeline, NAGFlaxStableDiffusionXLPipeline, {}),
}
CFG = dict(guidance_scale=5.0, negative_prompt="blurry")
# NAG alone: CFG off. diffusers' Flax pipelines still run the uncond rows, which then cancel; the
# same negative prompt as CFG keeps one input layout, so both cases share one compiled program.
ALONE = dict(guidance_scale=1.0, negative_prompt="blurry")
NAG = dict(nag_negative_prompt="the dog", nag_scale=4.0, nag_alpha=0.4, nag_tau=1.5)


def write_flax_readable_folder(folder, kind):
    """A tiny pipeline folder with 32-group UNet norms and PyTorch .bin weights beside the safetensors."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(tiny_unet.CONFIGS, kind, dict(tiny_unet.CONFIGS[kind], norm_num_groups=32))
        make_sd_pipeline(folder, kind, scheduler="ddim")
    for component, model_class in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        state = model_class.from_pretrained(folder / component).state_dict()
        torch.save(state, folder / component / "diffusion_pytorch_model.bin")
    return folder


def load_flax(pipeline_class, folder, extra):
    """diffusers' from_pt conversion initializes a random model op by op only to read its parameter
    shapes (over a minute of CPU for the tiny UNet and VAE); eval_shape gives the same shapes."""
    with pytest.MonkeyPatch.context() as patch:
        for model_class in (FlaxUNet2DConditionModel, FlaxAutoencoderKL):
            init = model_class.init_weights
            patch.setattr(model_class, "init_weights",
                          lambda self, rng, init=init: jax.eval_shape(lambda key: init(self, key), rng))
        return pipeline_class.from_pretrained(folder, from_pt=True, **extra)


def start_latents():
    return np.random.default_rng(3).standard_normal((1, 4, 16, 16)).astype(np.float32)


class Runs:
    """One tiny folder, its pipelines loaded once, and every image computed once."""

    def __init__(self, kind, folder):
        diffusers_class, nag_class, extra = PIPELINES[kind]
        self.kind, self.folder, self.extra = kind, folder, extra
        self.pipe, self.params = load_flax(nag_class, folder, extra)
        self.nag_jax_pipe = nag_jax.NAGPipeline.from_pretrained(folder)
        # diffusers' own class, sharing the loaded components (a separate instance compiles anew)
        components = {name: getattr(self.pipe, name) for name in self.pipe.components}
        self.diffusers_pipe = diffusers_class(**components)
        self.cache = {}

    def _cached(self, key, compute):
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def flax(self, guidance_scale, negative_prompt, diffusers_class=False, **nag):
        """diffusers' call convention: token ids, params, a PRNG key, each sharded per device (jit=True)."""
        pipe = self.diffusers_pipe if diffusers_class else self.pipe

        def run():
            prompt_ids = pipe.prepare_inputs([PROMPT])[None]  # one CPU device
            neg_ids = pipe.prepare_inputs([negative_prompt])[None]
            images = pipe(prompt_ids, replicate(self.params), jax.random.PRNGKey(0)[None], num_inference_steps=STEPS,
                          height=32, width=32, guidance_scale=guidance_scale, latents=start_latents()[None],
                          neg_prompt_ids=neg_ids, jit=True, **nag).images
            return np.asarray(images).reshape(1, 32, 32, 3)

        return self._cached(("flax", diffusers_class, guidance_scale, negative_prompt, repr(sorted(nag.items()))), run)

    def nag_jax(self, guidance_scale, negative_prompt, **nag):
        def run():
            return self.nag_jax_pipe(PROMPT, negative_prompt=negative_prompt, guidance_scale=guidance_scale,
                                     num_inference_steps=STEPS, latents=start_latents(), output_type="np",
                                     **nag).images

        return self._cached(("nag_jax", guidance_scale, negative_prompt, repr(sorted(nag.items()))), run)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    loaded = {}

    def get(kind):
        if kind not in loaded:
            loaded[kind] = Runs(kind, write_flax_readable_folder(tmp_path_factory.mktemp(kind), kind))
        return loaded[kind]

    return get


@pytest.mark.parametrize("kind,guidance", [("sd15", ALONE), ("sd15", CFG), ("sdxl", ALONE), ("sdxl", CFG)],
                         ids=["sd15-nag-alone", "sd15-nag-with-cfg", "sdxl-nag-alone", "sdxl-nag-with-cfg"])
def test_adapter_matches_nag_pipeline(runs, kind, guidance):
    run = runs(kind)
    through_diffusers = run.flax(**guidance, **NAG)
    np.testing.assert_allclose(through_diffusers, run.nag_jax(**guidance, **NAG), atol=1e-3)
    assert np.abs(through_diffusers - run.flax(**guidance)).max() > 1e-2  # NAG changed the image


def test_nag_end_switches_off_at_the_same_step(runs):
    run = runs("sd15")
    ending = dict(NAG, nag_end=0.5)  # cut floor(0.5 * 999) = 499: NAG at t = 667 only
    through_diffusers = run.flax(**ALONE, **ending)
    np.testing.assert_allclose(through_diffusers, run.nag_jax(**ALONE, **ending), atol=1e-3)
    assert np.abs(through_diffusers - run.flax(**ALONE, **NAG)).max() > 1e-3  # the later steps ran without NAG


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_nag_off_is_bit_identical_to_diffusers(runs, kind):
    run = runs(kind)
    off = run.flax(**CFG, nag_scale=1.0, nag_negative_prompt="a dog")
    # diffusers' own pipeline, traced with NAG active: the registered transform passes
    # self-attention and ordinary cross-attention through untouched.
    with nag_jax.guided(nag_jax.NAGConfig(nag_scale=3.0)):
        reference = run.flax(diffusers_class=True, **CFG)
    np.testing.assert_array_equal(off, reference)
    assert np.abs(off - run.flax(**CFG, **NAG)).max() > 1e-2  # and NAG on is not the same program


def test_bad_nag_arguments_are_named(runs):
    run = runs("sd15")
    prompt_ids, key = run.pipe.prepare_inputs([PROMPT]), jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="nag_negative_prompt has 3 entries for 1 prompts"):
        run.pipe(prompt_ids, run.params, key, nag_scale=3.0, nag_negative_prompt=["a", "b", "c"])
    with pytest.raises(ValueError, match="nag_end must be a number in \\(0.0, 1.0\\]"):
        run.pipe(prompt_ids, run.params, key, nag_scale=3.0, nag_end=0.0)
    with pytest.raises(ValueError, match="prompt_ids' shape"):
        run.pipe(prompt_ids, run.params, key, nag_scale=3.0, nag_negative_prompt=prompt_ids[None])
