"""LoRA files on a tiny FLUX.1-schnell-like pipeline: our merged images equal diffusers'.

Files: PEFT (diffusers names: separate q/k/v, single-block proj_mlp, CLIP text encoder), kohya on
BFL's fused layout (`double_blocks_0_img_attn_qkv`, ..., CLIP; `single_blocks_0_linear1` = q, k,
v and the MLP input, which diffusers splits only at FLUX.1's widths, and the final adaLN in
[shift; scale] order, which diffusers 0.42 drops, against their documented renaming written as
a PEFT file), the same BFL names as ComfyUI writes
them (`diffusion_model.` prefix) and XLabs' processor names. Images within 1e-3 of diffusers'
`load_lora_weights` + `set_adapters`; every LoRA moves the image by far more; unloading restores it.
"""

import numpy as np
import pytest
from diffusers import FluxPipeline
from safetensors.numpy import load_file, save_file

import nag_jax
from lora_files import KOHYA, PEFT, XLABS, assert_matches_diffusers, reference_images, save_factors, save_peft_lora
from test_pipeline_flux import NAG, SIZE, diffusers_images, ours
from tiny_flux_pipeline import MAX_SEQUENCE_LENGTH, make_flux_pipeline

DIM, MLP, CLIP = 32, 128, 16  # the tiny transformer's width and MLP width, the CLIP encoder's width
MOVES = 1e-2


def bfl_layers(prefix: str, factors):
    linear = lambda i, o, alpha=2.0: ((4, i), (o, 4), alpha, factors)  # noqa: E731
    return {
        f"{prefix}double_blocks_0_img_attn_qkv": linear(DIM, 3 * DIM),
        f"{prefix}double_blocks_0_txt_mlp_0": linear(DIM, MLP, 8.0),
        f"{prefix}double_blocks_0_img_mod_lin": linear(DIM, 6 * DIM),
        f"{prefix}single_blocks_0_linear2": linear(DIM + MLP, DIM, None),
    }


def comfyui_layers():
    """ComfyUI's names: dotted BFL module paths under `diffusion_model.`, kohya's factor names."""
    linear = lambda i, o: ((4, i), (o, 4), 4.0, KOHYA)  # noqa: E731
    return {"diffusion_model.double_blocks.0.txt_attn.qkv": linear(DIM, 3 * DIM),
            "diffusion_model.double_blocks.0.img_mlp.2": linear(MLP, DIM),
            "diffusion_model.single_blocks.0.linear2": linear(DIM + MLP, DIM)}


def xlabs_layers():
    linear = lambda i, o: ((4, i), (o, 4), None, XLABS)  # noqa: E731
    return {"double_blocks.0.processor.qkv_lora1": linear(DIM, 3 * DIM),
            "double_blocks.0.processor.proj_lora2": linear(DIM, DIM),
            "single_blocks.0.processor.qkv_lora": linear(DIM, 3 * DIM),
            "single_blocks.0.processor.proj_lora": linear(DIM + MLP, DIM)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = make_flux_pipeline(tmp_path_factory.mktemp("schnell"), "schnell", sample_size=SIZE // 2,
                                t5_model_max_length=MAX_SEQUENCE_LENGTH)
    theirs = FluxPipeline.from_pretrained(folder)
    files = tmp_path_factory.mktemp("loras")
    kohya = {**bfl_layers("lora_unet_", KOHYA),
             # diffusers tells its text-encoder naming by an out_proj layer
             "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ((4, CLIP), (CLIP, 4), 4.0, KOHYA),
             "lora_te1_text_model_encoder_layers_1_self_attn_out_proj": ((4, CLIP), (CLIP, 4), 4.0, KOHYA)}
    loras = {
        "peft": save_peft_lora(theirs, files / "peft.safetensors", {
            "transformer": ["to_q", "to_k", "to_v", "add_k_proj", "to_add_out", "proj_mlp", "ff.net.0.proj"],
            "text_encoder": ["q_proj", "out_proj"]}),
        "kohya": save_factors(files / "kohya.safetensors", kohya, seed=1),
        "comfyui": save_factors(files / "comfyui.safetensors", comfyui_layers(), seed=2, gain=1.0),
        "xlabs": save_factors(files / "xlabs.safetensors", xlabs_layers(), seed=3, gain=1.0),
    }
    return nag_jax.NAGPipeline.from_pretrained(folder), theirs, loras


@pytest.fixture(scope="module")
def base_image(setup):
    return ours(setup[0])


@pytest.mark.parametrize("loras", [[("peft", 1.0)], [("kohya", 1.0)], [("comfyui", 0.7)], [("xlabs", 1.0)],
                                   [("kohya", 1.0), ("peft", 0.7)]])
def test_lora_matches_diffusers_and_unloads_exactly(setup, base_image, loras):
    our_pipe, their_pipe, files = setup
    assert_matches_diffusers(our_pipe, their_pipe, [(files[name], scale) for name, scale in loras],
                             lambda: ours(our_pipe), lambda: diffusers_images(their_pipe), base_image)


def test_lora_with_nag_matches_reference(setup):
    our_pipe, their_pipe, files = setup
    our_pipe.load_lora_weights(files["kohya"], 0.7)
    image, plain = ours(our_pipe, **NAG), ours(our_pipe)
    our_pipe.unload_lora_weights()
    reference = reference_images(their_pipe, [(files["kohya"], 0.7)], lambda: diffusers_images(their_pipe, nag=NAG))
    np.testing.assert_allclose(image, reference, atol=1e-3)
    assert np.abs(image - plain).max() > MOVES


def test_peft_names_of_another_family_are_refused(setup, tmp_path):
    our_pipe, _, _ = setup
    path = save_factors(tmp_path / "sdxl.safetensors", {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": ((4, DIM), (DIM, 4), None, PEFT)})
    params = our_pipe.family.params
    with pytest.raises(ValueError, match="diffusers LoRA file.*down_blocks"):
        our_pipe.load_lora_weights(path)
    assert our_pipe.family.params is params


def test_fused_linear1_and_swapped_final_adaln_like_diffusers_renaming(setup, base_image, tmp_path):
    """diffusers splits BFL's linear1 LoRA into q, k, v, proj_mlp LoRAs sharing `down`, with `up`
    cut at FLUX.1's widths, and gives the final adaLN's LoRA `up` in swapped halves (but then
    drops it: no `transformer.` prefix). That renaming at the tiny widths, as PEFT, is the reference."""
    our_pipe, their_pipe, _ = setup
    bfl = save_factors(tmp_path / "bfl.safetensors", {
        "lora_unet_single_blocks_0_linear1": ((4, DIM), (3 * DIM + MLP, 4), None, KOHYA),
        "lora_unet_final_layer_adaLN_modulation_1": ((4, DIM), (2 * DIM, 4), None, KOHYA)}, seed=4, gain=1.0)
    factors = load_file(str(bfl))
    down, up = (factors[f"lora_unet_single_blocks_0_linear1.lora_{x}.weight"] for x in ("down", "up"))
    renamed = {}
    for name, part in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), np.split(up, [DIM, 2 * DIM, 3 * DIM])):
        renamed[f"transformer.single_transformer_blocks.0.{name}.lora_A.weight"] = down
        renamed[f"transformer.single_transformer_blocks.0.{name}.lora_B.weight"] = np.ascontiguousarray(part)
    down, up = (factors[f"lora_unet_final_layer_adaLN_modulation_1.lora_{x}.weight"] for x in ("down", "up"))
    renamed["transformer.norm_out.linear.lora_A.weight"] = down
    renamed["transformer.norm_out.linear.lora_B.weight"] = np.concatenate([up[DIM:], up[:DIM]])
    save_file(renamed, str(tmp_path / "renamed.safetensors"))
    our_pipe.load_lora_weights(bfl)
    image = ours(our_pipe)
    our_pipe.unload_lora_weights()
    reference = reference_images(their_pipe, [(tmp_path / "renamed.safetensors", 1.0)],
                                 lambda: diffusers_images(their_pipe))
    np.testing.assert_allclose(image, reference, atol=1e-3)
    assert np.abs(image - base_image).max() > MOVES
