"""LoRA files (diffusers / PEFT) on a tiny SD3.5-Large-like pipeline: our images equal diffusers'.

Transformer attention (image and text streams), feed-forward and both CLIP text encoders, at
scale 1 and 0.7, stacked, and with NAG (the reference of torch_sd3_nag.py). Images within 1e-3;
each LoRA moves the image by far more; unloading restores it bit for bit.
"""

import numpy as np
import pytest
from diffusers import StableDiffusion3Pipeline

import nag_jax
from lora_files import assert_matches_diffusers, reference_images, save_peft_lora
from test_pipeline_sd3 import generate, reference
from tiny_sd3_pipeline import make_sd3_pipeline

LATENTS = np.random.default_rng(3).standard_normal((1, 16, 16, 16)).astype(np.float32)
NAG = dict(nag_negative_prompt="the dog", nag_scale=8.0, nag_tau=2.5, nag_alpha=0.5)
MOVES = 1e-2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = make_sd3_pipeline(tmp_path_factory.mktemp("sd35_large"))
    theirs = StableDiffusion3Pipeline.from_pretrained(folder)
    files = tmp_path_factory.mktemp("loras")
    loras = {
        "peft": save_peft_lora(theirs, files / "peft.safetensors", {
            "transformer": ["to_q", "to_k", "to_v", "add_q_proj", "to_add_out", "ff.net.2"],
            "text_encoder": ["q_proj", "out_proj"], "text_encoder_2": ["v_proj", "fc2"]}),
        "second": save_peft_lora(theirs, files / "second.safetensors",
                                 {"transformer": ["to_out.0", "ff_context.net.0.proj"]}, rank=2, alpha=4.0, seed=1),
    }
    return nag_jax.NAGPipeline.from_pretrained(folder), theirs, loras


@pytest.fixture(scope="module")
def base_image(setup):
    return generate(setup[0], LATENTS, 1.0)


@pytest.mark.parametrize("loras", [[("peft", 1.0)], [("peft", 0.7)], [("peft", 1.0), ("second", 0.7)]])
def test_lora_matches_diffusers_and_unloads_exactly(setup, base_image, loras):
    ours, theirs, files = setup
    assert_matches_diffusers(ours, theirs, [(files[name], scale) for name, scale in loras],
                             lambda: generate(ours, LATENTS, 1.0), lambda: reference(theirs, LATENTS, 1.0), base_image)


def test_lora_with_nag_matches_reference(setup):
    ours, theirs, files = setup
    ours.load_lora_weights(files["peft"], 0.7)
    image, plain = generate(ours, LATENTS, 1.0, nag=NAG), generate(ours, LATENTS, 1.0)
    ours.unload_lora_weights()
    want = reference_images(theirs, [(files["peft"], 0.7)], lambda: reference(theirs, LATENTS, 1.0, nag=NAG))
    np.testing.assert_allclose(image, want, atol=1e-3)
    assert np.abs(image - plain).max() > MOVES
