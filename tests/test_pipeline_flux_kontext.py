"""NAGPipeline on a tiny FLUX.1-Kontext-dev-like folder equals diffusers' FluxKontextPipeline.

NAG off: diffusers' pipeline with the same packed `latents` and input image (resize, VAE
encode, packing, ids (1, row, column), concatenation, prediction sliced to the generated
tokens), with and without true CFG. NAG on: the same pipeline whose transformer runs the
PyTorch reference NAG (torch_flux_nag.py: the reference Kontext pipeline's processors, which
copy the conditioning-image tokens with the image stream) from the first step while
t >= (1 - nag_end) * 1000. Images in [0, 1] agree within 1e-3.
"""

import json

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from flax import traverse_util
from PIL import Image
from safetensors.torch import save_file

import nag_jax
import tiny_flux
from nag_jax.cli import main
from convert.flux import load_flux_transformer
from nag_jax.families import flux_kontext
from nag_jax.families.flux_kontext import KONTEXT_DEFAULTS, conditioning_image_size, fit_to_area
from tiny_flux_pipeline import MAX_SEQUENCE_LENGTH, make_flux_pipeline
from torch_flux_nag import with_nag_negatives

PROMPT, SIZE, STEPS = "purple sky", 32, 2
TOKENS, CHANNELS = (SIZE // 4) ** 2, 64
NAG = dict(nag_negative_prompt="clouds", nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25)
# small stand-ins for the preferred resolutions (the real ones are 672..1568 pixels per side)
TINY_RESOLUTIONS = ((24, 40), (32, 32), (40, 24))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_flux_pipeline(tmp_path_factory.mktemp("kontext"), "kontext")


@pytest.fixture(scope="module")
def pipelines(folder):
    return nag_jax.NAGPipeline.from_pretrained(folder), FluxKontextPipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def image():
    """An input image whose size is not a multiple of 4 (the tiny VAE's packing unit)."""
    return Image.fromarray(np.random.default_rng(7).integers(0, 256, (30, 50, 3), dtype=np.uint8))


def start_latents():
    return np.random.default_rng(3).standard_normal((1, TOKENS, CHANNELS)).astype(np.float32)


def ours(pipe, image, **kwargs):
    return pipe(PROMPT, image=image, num_inference_steps=STEPS, height=SIZE, width=SIZE, max_area=SIZE * SIZE,
                latents=start_latents(), output_type="np", max_sequence_length=MAX_SEQUENCE_LENGTH, **kwargs).images


def diffusers_images(pipe, image, nag=None, auto_resize=True, **kwargs):
    """diffusers' images; `nag`: NAG arguments (with nag_end, nag_norm), run by the reference wrapper."""
    if nag is not None:
        encode = lambda p: pipe.encode_prompt(p, None, device="cpu", max_sequence_length=MAX_SEQUENCE_LENGTH)  # noqa: E731
        positive, negative = encode(PROMPT), encode(nag["nag_negative_prompt"])
        with_nag_negatives(pipe.transformer, positive[0], negative[0], negative[1], nag["nag_scale"], nag["nag_tau"],
                           nag["nag_alpha"], nag["nag_norm"], nag["nag_end"])
    try:
        with torch.no_grad():
            return pipe(image=image, prompt=PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                        max_area=SIZE * SIZE, _auto_resize=auto_resize, latents=torch.from_numpy(start_latents()),
                        output_type="np", max_sequence_length=MAX_SEQUENCE_LENGTH, **kwargs).images
    finally:
        pipe.transformer.__dict__.pop("forward", None)


def test_matches_diffusers_without_nag(pipelines, image):
    our_pipe, their_pipe = pipelines
    arguments = dict(guidance_scale=2.5)
    images = ours(our_pipe, image, auto_resize=False, **arguments)
    reference = diffusers_images(their_pipe, image, auto_resize=False, **arguments)
    assert images.shape == reference.shape == (1, SIZE, SIZE, 3)
    np.testing.assert_allclose(images, reference, atol=1e-3)
    other_image = Image.fromarray(255 - np.asarray(image))
    assert np.abs(ours(our_pipe, other_image, auto_resize=False, **arguments) - images).max() > 4e-3  # the image matters


def test_true_cfg_and_auto_resize_match_diffusers(pipelines, image, monkeypatch):
    """auto_resize picks the listed resolution nearest the image's aspect ratio (both pipelines
    read the list at call time, so both see the tiny stand-ins)."""
    monkeypatch.setattr(flux_kontext, "PREFERRED_KONTEXT_RESOLUTIONS", TINY_RESOLUTIONS)
    monkeypatch.setattr("diffusers.pipelines.flux.pipeline_flux_kontext.PREFERRED_KONTEXT_RESOLUTIONS",
                        [list(r) for r in TINY_RESOLUTIONS])
    our_pipe, their_pipe = pipelines
    arguments = dict(true_cfg_scale=4.0, negative_prompt="blurry", guidance_scale=2.5)
    images = ours(our_pipe, image, **arguments)
    np.testing.assert_allclose(images, diffusers_images(their_pipe, image, **arguments), atol=1e-3)


@pytest.mark.parametrize("nag_end,nag_norm", [(0.25, "l2"), (1.0, "l1")])
def test_nag_matches_the_reference_kontext_pipeline(pipelines, image, nag_end, nag_norm):
    """nag_mode "reference" (Flux's default); with 2 steps nag_end 0.25 is NAG in the first step only.
    Our guidance_scale default is 2.5; diffusers' call default is 3.5, so it is passed."""
    our_pipe, their_pipe = pipelines
    nag = dict(NAG, nag_end=nag_end, nag_norm=nag_norm)
    images = ours(our_pipe, image, auto_resize=False, **nag)
    reference = diffusers_images(their_pipe, image, nag=nag, auto_resize=False, guidance_scale=2.5)
    np.testing.assert_allclose(images, reference, atol=1e-3)
    assert np.abs(images - ours(our_pipe, image, auto_resize=False)).max() > 1e-2  # NAG changed the image


def test_defaults_and_sizes(pipelines):
    family = pipelines[0].family
    assert family.name == "Flux Kontext" and family.defaults is KONTEXT_DEFAULTS
    assert (KONTEXT_DEFAULTS["guidance_scale"], KONTEXT_DEFAULTS["num_inference_steps"]) == (2.5, 28)
    assert KONTEXT_DEFAULTS["nag_end"] == 0.25
    # published sizes, worked by hand: a 1600x900 photo is floored to 1600x896 (aspect 1.786), nearest
    # listed ratio 1392/752 = 1.851; a 1360x768 request keeps its aspect within 1024**2 pixels
    assert conditioning_image_size(1600, 900, 16, auto_resize=True) == (1392, 752)
    assert conditioning_image_size(1600, 900, 16, auto_resize=False) == (1600, 896)
    assert fit_to_area(768, 1360, 1024**2, 16) == (768, 1360)
    assert fit_to_area(512, 512, 1024**2, 16) == (1024, 1024)
    with pytest.raises(ValueError, match="image must be a PIL image"):
        pipelines[0](PROMPT, image=np.zeros((8, 8, 3)), num_inference_steps=1)
    with pytest.raises(ValueError, match="max_area must be an integer"):
        pipelines[0](PROMPT, max_area=0.5, num_inference_steps=1)


def test_bfl_single_file_loads_through_the_flux_converter(pipelines, tmp_path):
    """flux1-kontext-dev.safetensors has FLUX.1-dev's keys: the Flux converter reads it (as UIs
    repackage it, every key prefixed) to the same parameters as the diffusers folder."""
    our_pipe, their_pipe = pipelines
    path = tmp_path / "flux1-kontext-tiny.safetensors"
    save_file(tiny_flux.bfl_state_dict(their_pipe.transformer, "model.diffusion_model."), str(path))
    module, params = load_flux_transformer(path, config={"axes_dims_rope": tiny_flux.TINY_CONFIG["axes_dims_rope"]})
    assert module == our_pipe.family.transformer
    flat, reference = (traverse_util.flatten_dict(p, sep="/") for p in (params, our_pipe.family.params))
    assert flat.keys() == reference.keys()
    for key, value in reference.items():
        np.testing.assert_array_equal(flat[key], value, err_msg=key)


def test_cli_edits_an_image(folder, image, tmp_path):
    """`nag-jax generate --image`: the edited image, its PNG record naming the input and Kontext's defaults."""
    image.save(tmp_path / "input.png")
    output = tmp_path / "edited.png"
    code = main(["generate", "--model", str(folder), "--prompt", PROMPT, "--image", str(tmp_path / "input.png"),
                 "--nag-negative-prompt", "clouds", "--steps", "2", "--height", str(SIZE), "--width", str(SIZE),
                 "--max-area", str(SIZE * SIZE), "--no-auto-resize", "--no-progress", "--output", str(output)])
    assert code == 0
    edited = Image.open(output)
    record = json.loads(edited.text["nag-jax"])
    assert edited.size == (SIZE, SIZE) and record["image"] == str(tmp_path / "input.png")
    assert record["nag_end"] == 0.25 and record["guidance_scale"] == 2.5 and record["auto_resize"] is False
