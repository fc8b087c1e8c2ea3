"""LoRA files on a tiny SDXL pipeline: our merged images equal diffusers' `load_lora_weights`.

Files: PEFT (UNet attention + resnet convs, both text encoders, written by diffusers'
`save_lora_weights`), a second PEFT file to stack, a kohya file under SDXL's LDM names with
LoCon (conv) layers and both text encoders, and one under diffusers' module names. Images in [0, 1] agree within 1e-3; each LoRA moves
the image by far more. Unloading gives back the image from before, bit for bit.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline, TCDScheduler

import nag_jax
from convert.checkpoint import CheckpointError
from convert.lora import LoraError
from lora_files import KOHYA, assert_matches_diffusers, reference_images, save_factors, save_peft_lora
from test_pipeline_unet import our_step_noise
from tiny_pipelines import make_sd_pipeline
from torch_nag import install_nag, with_nag_context

PROMPT, STEPS = "a photo of a cat", 2
NAG = dict(nag_negative_prompt="a dog", nag_scale=3.0, nag_alpha=0.5, nag_tau=2.5)
LATENTS = np.random.default_rng(3).standard_normal((1, 4, 16, 16)).astype(np.float32)
MOVES = 1e-2  # NAG must move the image by more than this (10x the tolerance), as each LoRA must


def kohya_layers():
    """SDXL kohya names are the LDM UNet's: layers_per_block 2, so input_blocks 4-5 are down block 1
    (attention at slot 1), output_blocks 0-2 up block 0; in_layers.2 / out_layers.3 are resnet convs."""
    linear = lambda i, o, alpha=2.0: ((4, i), (o, 4), alpha, KOHYA)  # noqa: E731
    conv = lambda i, o: ((4, i, 3, 3), (o, 4, 1, 1), 4.0, KOHYA)  # noqa: E731
    return {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": linear(64, 64),
        "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k": linear(48, 64),
        "lora_unet_middle_block_1_proj_in": linear(64, 64),
        "lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_0_proj": linear(64, 512),
        "lora_unet_output_blocks_1_1_transformer_blocks_1_attn1_to_out_0": linear(64, 64, None),
        "lora_unet_input_blocks_1_0_in_layers_2": conv(32, 32),
        "lora_unet_output_blocks_4_0_out_layers_3": conv(32, 32),
        # diffusers tells its text-encoder naming by an out_proj layer, so each encoder has one
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": linear(32, 32, 8.0),
        "lora_te1_text_model_encoder_layers_2_self_attn_out_proj": linear(32, 32, 8.0),  # one alpha per encoder:
        # diffusers gives other alphas by module names transformers 5 no longer has for CLIPTextModel
        "lora_te2_text_model_encoder_layers_1_self_attn_out_proj": linear(16, 16),
        "lora_te2_text_model_encoder_layers_1_mlp_fc1": linear(16, 37),
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = make_sd_pipeline(tmp_path_factory.mktemp("sdxl"), "sdxl", scheduler="euler_trailing")
    theirs = StableDiffusionXLPipeline.from_pretrained(folder)
    files = tmp_path_factory.mktemp("loras")
    loras = {
        "peft": save_peft_lora(theirs, files / "peft.safetensors", {
            "unet": ["to_q", "to_k", "to_v", "to_out.0", "conv1"],
            "text_encoder": ["q_proj", "v_proj", "fc1"], "text_encoder_2": ["k_proj", "out_proj"]}),
        "peft_second": save_peft_lora(theirs, files / "second.safetensors", {"unet": ["ff.net.0.proj", "proj_out"]},
                                      rank=2, alpha=2.0, seed=1),
        "kohya": save_factors(files / "kohya.safetensors", kohya_layers()),
        # kohya's names on a diffusers-layout UNet (as it writes SD1.5 LoRAs), LoCon on a resnet too
        "kohya_diffusers_names": save_factors(files / "kohya_names.safetensors", {
            "lora_unet_down_blocks_1_attentions_1_transformer_blocks_1_attn2_to_v": ((4, 48), (64, 4), 2.0, KOHYA),
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2": ((4, 256), (64, 4), 2.0, KOHYA),
            "lora_unet_up_blocks_1_resnets_2_conv1": ((4, 64, 3, 3), (32, 4, 1, 1), 4.0, KOHYA)}, seed=5, gain=1.0),
    }
    ours = nag_jax.NAGPipeline.from_pretrained(folder)
    return ours, theirs, loras, files


def ours_image(pipe, **nag):
    return pipe(PROMPT, guidance_scale=1.0, num_inference_steps=STEPS, latents=LATENTS, output_type="np",
                **nag).images


def theirs_image(pipe):
    return pipe(PROMPT, guidance_scale=1.0, num_inference_steps=STEPS, latents=torch.from_numpy(LATENTS),
                output_type="np").images


@pytest.fixture(scope="module")
def base_image(setup):
    return ours_image(setup[0])


@pytest.mark.parametrize("loras", [[("peft", 1.0)], [("peft", 0.7)], [("kohya", 0.7)], [("kohya_diffusers_names", 1.0)],
                                   [("peft", 1.0), ("peft_second", 0.7)]])
def test_lora_matches_diffusers_and_unloads_exactly(setup, base_image, loras):
    ours, theirs, files, _ = setup
    assert_matches_diffusers(ours, theirs, [(files[name], scale) for name, scale in loras], lambda: ours_image(ours),
                             lambda: theirs_image(theirs), base_image)


def test_text_encoder_part_alone_changes_the_image(setup, base_image, tmp_path):
    """The kohya file's text-encoder layers on their own: the prompt encoding changes the image."""
    ours, theirs, _, _ = setup
    path = save_factors(tmp_path / "te.safetensors", {k: v for k, v in kohya_layers().items() if "_te" in k}, gain=3.0)
    assert_matches_diffusers(ours, theirs, [(path, 1.0)], lambda: ours_image(ours), lambda: theirs_image(theirs),
                             base_image)


def test_scale_zero_is_no_lora(setup, base_image):
    ours, _, files, _ = setup
    assert ours.load_lora_weights(files["kohya"], 0.0) == len(kohya_layers())
    image = ours_image(ours)
    ours.unload_lora_weights()
    assert np.array_equal(image, base_image)


@pytest.mark.parametrize("problem", ["truncated", "wrong shapes", "flux keys", "unknown keys", "not a lora"])
def test_bad_file_is_one_error_and_changes_nothing(setup, problem):
    ours, theirs, files, folder = setup
    path = folder / f"bad_{problem.replace(' ', '_')}.safetensors"
    if problem == "truncated":
        data = files["kohya"].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif problem == "wrong shapes":
        layers = dict(kohya_layers(), lora_unet_middle_block_1_proj_in=((4, 63), (64, 4), None, KOHYA))
        save_factors(path, layers)
    elif problem == "flux keys":
        save_factors(path, {"lora_unet_double_blocks_0_img_attn_qkv": ((4, 64), (192, 4), None, KOHYA)})
    elif problem == "unknown keys":
        save_factors(path, dict(kohya_layers(), lora_unet_not_a_layer=((4, 8), (8, 4), None, KOHYA)))
    else:  # a model's weights, not a LoRA
        shutil.copy(next((Path(theirs.config._name_or_path) / "vae").glob("*.safetensors")), path)
    params = (ours.family.params, ours.family.encoder_params)
    with pytest.raises((LoraError, CheckpointError)) as error:
        ours.load_lora_weights(path)
    print(f"{problem}: {error.value}")
    assert {"truncated": "truncated", "not a lora": "not a LoRA file"}.get(problem, "kohya") in str(error.value)
    assert params[0] is ours.family.params and params[1] is ours.family.encoder_params
    assert not hasattr(ours, "lora_base")


def test_tcd_with_eta_and_a_lora_matches_diffusers(setup, monkeypatch):
    """Hyper-SD's recipe: its LoRA with TCDScheduler and eta > 0 (fresh noise each step, the same on
    both sides), no CFG, 2 steps."""
    ours, theirs, files, _ = setup
    folder = theirs.config._name_or_path
    tcd = nag_jax.NAGPipeline.from_pretrained(folder, scheduler="tcd", loras=[(files["peft"], 0.7)])
    image = tcd(PROMPT, guidance_scale=1.0, num_inference_steps=STEPS, latents=LATENTS, output_type="np",
                eta=0.3).images
    noise, calls = our_step_noise(0, 1, LATENTS.shape[1:]), []

    def same_noise(shape, generator=None, device=None, dtype=None, layout=None):
        calls.append(None)
        return torch.from_numpy(noise(len(calls) - 1)).to(dtype)

    monkeypatch.setattr("diffusers.schedulers.scheduling_tcd.randn_tensor", same_noise)
    default_scheduler = theirs.scheduler
    theirs.scheduler = TCDScheduler.from_config(default_scheduler.config)
    try:
        reference = reference_images(theirs, [(files["peft"], 0.7)], lambda: theirs(
            PROMPT, guidance_scale=1.0, num_inference_steps=STEPS, latents=torch.from_numpy(LATENTS),
            output_type="np", eta=0.3).images)
    finally:
        theirs.scheduler = default_scheduler
    assert len(calls) == STEPS - 1  # the last step adds no noise
    np.testing.assert_allclose(image, reference, atol=1e-3)


def test_lora_with_nag_matches_reference(setup, base_image):
    """Last in the file: the reference NAG processors stay installed on diffusers' UNet."""
    ours, theirs, files, _ = setup
    ours.load_lora_weights(files["peft"], 0.7)
    image = ours_image(ours, **NAG)
    plain = ours_image(ours)
    ours.unload_lora_weights()

    def generate():
        install_nag(theirs.unet, NAG["nag_scale"], NAG["nag_tau"], NAG["nag_alpha"])
        negative = theirs.encode_prompt(NAG["nag_negative_prompt"], device="cpu", num_images_per_prompt=1,
                                        do_classifier_free_guidance=False)[0]
        with_nag_context(theirs.unet, negative, 1.0)
        return theirs_image(theirs)

    reference = reference_images(theirs, [(files["peft"], 0.7)], generate)
    np.testing.assert_allclose(image, reference, atol=1e-3)
    assert np.abs(image - plain).max() > MOVES  # NAG acts on the LoRA'd model
