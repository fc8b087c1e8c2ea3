"""Wan2.1 components: UMT5 vs transformers' UMT5EncoderModel, the transformer vs diffusers'
WanTransformer3DModel (T2V and I2V), and the single-file namings vs the diffusers folder."""

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util

from convert.t5 import load_t5
from convert.wan import load_wan_transformer
from tests.tiny_components import assert_close
from tests.tiny_wan import IMAGE_TOKENS, TEXT_TOKENS, save_original_single_file, save_tiny_umt5, save_tiny_wan_transformer

IDS = np.array([[3, 31, 35, 5, 13, 9, 18, 3, 23, 10, 5, 4, 44, 7, 46, 6, 10, 21, 22, 40, 41, 3, 5, 8, 9, 12, 1, 0, 0, 0],
                [4, 5, 6, 1] + [0] * 26], dtype=np.int32)


def test_umt5_matches_transformers(tmp_path):
    reference_model = save_tiny_umt5(tmp_path)
    mask = (IDS != 0).astype(np.int32)
    mask[:, 0] = 1
    with torch.no_grad():
        reference = reference_model(torch.from_numpy(IDS).long(), torch.from_numpy(mask).long()).last_hidden_state
        # A T5 reading (block 0's table for every block) must differ, or the test proves nothing.
        shared_table = reference_model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        reference_model.encoder.block[1].layer[0].SelfAttention.relative_attention_bias.weight.copy_(shared_table)
        as_t5 = reference_model(torch.from_numpy(IDS).long(), torch.from_numpy(mask).long()).last_hidden_state
    module, params = load_t5(tmp_path)
    assert module.config.bias_per_layer
    assert_close(jax.jit(module.apply)({"params": params}, IDS, mask), reference)
    assert float((reference - as_t5).abs().max()) > 1e-2


def _inputs(image_to_video: bool, rows: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    channels = 12 if image_to_video else 4
    latents = rng.standard_normal((rows, channels, 2, 4, 4)).astype(np.float32)
    context = rng.standard_normal((rows, TEXT_TOKENS if image_to_video else 16, 24)).astype(np.float32)
    image = rng.standard_normal((rows, IMAGE_TOKENS, 20)).astype(np.float32) if image_to_video else None
    return latents, np.array([999.0, 437.5], np.float32)[:rows], context, image


def _reference(model, latents, timestep, context, image):
    with torch.no_grad():
        return model(torch.from_numpy(latents), torch.from_numpy(timestep), torch.from_numpy(context),
                     None if image is None else torch.from_numpy(image), return_dict=False)[0]


@pytest.mark.parametrize("image_to_video", [False, True], ids=["t2v", "i2v"])
def test_wan_transformer_matches_diffusers(tmp_path, image_to_video):
    reference_model = save_tiny_wan_transformer(tmp_path / "transformer", image_to_video)
    inputs = _inputs(image_to_video)
    reference = _reference(reference_model, *inputs)
    module, params = load_wan_transformer(tmp_path)
    ours = jax.jit(module.apply)({"params": params}, *inputs)
    assert_close(ours, reference)
    if image_to_video:  # the image tokens must matter
        moved = _reference(reference_model, *inputs[:3], np.zeros_like(inputs[3]))
        assert float((moved - reference).abs().max()) > 1e-2

    # Single files: the original release naming and ComfyUI's prefixed repackage give the same parameters.
    folder_params = traverse_util.flatten_dict(params, sep="/")
    for prefix in ("", "model.diffusion_model."):
        path = tmp_path / f"single{prefix or '-original'}.safetensors"
        state = save_original_single_file(reference_model, path, prefix)
        if not prefix:  # our test's naming is the one diffusers' own converter reads
            from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

            assert set(convert_wan_transformer_to_diffusers(dict(state))) == set(reference_model.state_dict())
        # A single file has no config.json; the head size (128 in every Wan2.1) is the one thing not read off shapes.
        single_module, single_params = load_wan_transformer(
            path, config={"num_attention_heads": 2, "attention_head_dim": 16, "rope_max_seq_len": 64})
        assert single_module.config == module.config
        flat = traverse_util.flatten_dict(single_params, sep="/")
        assert flat.keys() == folder_params.keys()
        for key, value in flat.items():
            np.testing.assert_array_equal(value, folder_params[key], err_msg=key)


def test_comfyui_scaled_fp8_single_file_equals_the_folder(tmp_path):
    """ComfyUI's `wan2.1_..._fp8_scaled.safetensors`: prefixed original naming, every matrix in
    fp8 e4m3 with a per-tensor scale_weight. It loads to the parameters of a diffusers folder
    holding the same (dequantised) weights."""
    from safetensors.torch import save_file

    from tests.tiny_wan import to_original_name

    model = save_tiny_wan_transformer(tmp_path / "unused", seed=3)
    stored = {"model.diffusion_model.scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    with torch.no_grad():
        for key, value in model.state_dict().items():
            name = "model.diffusion_model." + to_original_name(key)
            if key.endswith(".weight") and value.ndim == 2:
                scale = value.abs().max() / 448.0  # e4m3fn's largest finite value
                stored[name] = (value / scale).to(torch.float8_e4m3fn)
                stored[name.replace(".weight", ".scale_weight")] = scale.reshape(1)
                value.copy_(stored[name].float() * scale)  # the folder holds the dequantised weights
            else:
                stored[name] = value.clone()
    save_file(stored, str(tmp_path / "wan2.1_t2v_tiny_fp8_scaled.safetensors"))
    model.save_pretrained(str(tmp_path / "transformer"))
    _, folder_params = load_wan_transformer(tmp_path)
    _, file_params = load_wan_transformer(tmp_path / "wan2.1_t2v_tiny_fp8_scaled.safetensors",
                                          config={"num_attention_heads": 2, "attention_head_dim": 16})
    folder_flat, file_flat = (traverse_util.flatten_dict(p, sep="/") for p in (folder_params, file_params))
    assert folder_flat.keys() == file_flat.keys()
    for key, value in file_flat.items():
        np.testing.assert_array_equal(value, folder_flat[key], err_msg=key)


def test_comfyui_scaled_fp8_umt5_file_equals_the_folder(tmp_path):
    """ComfyUI's `umt5_xxl_fp8_e4m3fn_scaled.safetensors` (transformers' names, fp8 matrices with
    scale_weight) read with the text_encoder config gives the folder's parameters."""
    import json

    from safetensors.torch import save_file

    from convert.checkpoint import open_checkpoint

    model = save_tiny_umt5(tmp_path / "built", seed=4)
    stored = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key == "encoder.embed_tokens.weight":  # tied to shared.weight
                continue
            if key.endswith(".weight") and value.ndim == 2 and "relative_attention_bias" not in key:
                scale = value.abs().max() / 448.0
                stored[key] = (value / scale).to(torch.float8_e4m3fn)
                stored[key.replace(".weight", ".scale_weight")] = scale.reshape(1)
                value.copy_(stored[key].float() * scale)
            else:
                stored[key] = value.clone()
    save_file(stored, str(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"))
    model.save_pretrained(str(tmp_path / "text_encoder"))
    config = json.loads((tmp_path / "text_encoder" / "config.json").read_text())
    _, folder_params = load_t5(tmp_path / "text_encoder")
    _, file_params = load_t5(open_checkpoint(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"), config)
    folder_flat, file_flat = (traverse_util.flatten_dict(p, sep="/") for p in (folder_params, file_params))
    assert folder_flat.keys() == file_flat.keys()
    for key, value in file_flat.items():
        np.testing.assert_array_equal(value, folder_flat[key], err_msg=key)
