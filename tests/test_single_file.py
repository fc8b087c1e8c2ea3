"""Single-file (LDM-named) SD1.5 / SDXL checkpoints load to the same parameters as the
diffusers-format folders they were written from.

The LDM file is written here from the diffusers components by the inverse renaming; diffusers'
own single-file conversion functions confirm that file is what the published LDM files look
like (they turn it back into the diffusers state dicts exactly).
"""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import save_file

from convert.checkpoint import Checkpoint, open_checkpoint
from convert.clip import load_clip
from convert.mapping import ConversionError
from convert.single_file import infer_unet_config, load_single_file, split_single_file
from convert.unet import load_unet
from convert.vae import load_vae
from tests.tiny_components import save_tiny_clip, save_tiny_vae
from tests.tiny_unet import make_unet

# ------------------------------------------------------------- diffusers -> LDM, for the fixture

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _ldm_resnet(rest):
    module, leaf = rest.rsplit(".", 1)
    return f"{_RESNET[module]}.{leaf}"


def ldm_unet_key(key, layers, up_attention):
    slots = layers + 1
    module, leaf = key.rsplit(".", 1)
    if module in _UNET_FIXED:
        return f"{_UNET_FIXED[module]}.{leaf}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        slot = 1 + block * slots + layer
        return f"input_blocks.{slot}.0.{_ldm_resnet(rest)}" if kind == "resnets" else f"input_blocks.{slot}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * slots}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", key):
        if m[1] == "attentions":
            return f"middle_block.1.{m[3]}"
        return f"middle_block.{2 * int(m[2])}.{_ldm_resnet(m[3])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        slot = block * slots + layer
        return f"output_blocks.{slot}.0.{_ldm_resnet(rest)}" if kind == "resnets" else f"output_blocks.{slot}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        return f"output_blocks.{block * slots + layers}.{2 if up_attention[block] else 1}.conv.{m[2]}"
    raise AssertionError(f"no LDM name for {key}")


def ldm_vae_items(key, tensor, up_blocks):
    half, rest = key.split(".", 1)
    rest = rest.replace("conv_shortcut", "nin_shortcut")
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", rest):
        block = int(m[2]) if m[1] == "down" else up_blocks - 1 - int(m[2])
        inner = f"block.{m[4]}" if m[3] == "resnets" else f"{m[3][:-2]}"
        rest = f"{m[1]}.{block}.{inner}.{m[5]}"
    elif m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", rest):
        rest = f"mid.block_{int(m[1]) + 1}.{m[2]}"
    elif m := re.fullmatch(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", rest):
        name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[m[1]]
        if m[2] == "weight" and name != "norm":
            tensor = tensor[:, :, None, None]  # LDM's VAE attention uses 1x1 convs
        rest = f"mid.attn_1.{name}.{m[2]}"
    elif rest.startswith("conv_norm_out."):
        rest = rest.replace("conv_norm_out", "norm_out")
    return [(f"{half}.{rest}" if half in ("encoder", "decoder") else key, tensor)]


def ldm_open_clip_items(state):
    out = {"token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": state["text_model.final_layer_norm.weight"],
           "ln_final.bias": state["text_model.final_layer_norm.bias"],
           "text_projection": state["text_projection.weight"].T.contiguous(),
           "logit_scale": torch.tensor(4.6)}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    layers = {int(m[1]) for k in state if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
    for n in sorted(layers):
        p = f"text_model.encoder.layers.{n}."
        for leaf in ("weight", "bias"):
            out[f"transformer.resblocks.{n}.attn.in_proj_{leaf}"] = torch.cat(
                [state[f"{p}self_attn.{x}_proj.{leaf}"] for x in "qkv"])
            for new, old in names.items():
                out[f"transformer.resblocks.{n}.{old}.{leaf}"] = state[f"{p}{new}.{leaf}"]
    return out


def _state(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if "position_ids" not in k}


def write_single_file(path, unet, vae, clip, open_clip=None):
    """The LDM single file of SD1.5 (open_clip None) or SDXL layout, plus non-component entries."""
    config = unet.config
    up_attention = [t == "CrossAttnUpBlock2D" for t in config.up_block_types]
    state = {"model.diffusion_model." + ldm_unet_key(k, config.layers_per_block, up_attention): v
             for k, v in _state(unet).items()}
    for key, tensor in _state(vae).items():
        state.update(("first_stage_model." + k, v) for k, v in ldm_vae_items(key, tensor, len(vae.config.up_block_types)))
    clip_prefix = "conditioner.embedders.0.transformer." if open_clip is not None else "cond_stage_model.transformer."
    state.update((clip_prefix + k, v) for k, v in _state(clip).items())
    if open_clip is not None:
        state.update(("conditioner.embedders.1.model." + k, v) for k, v in ldm_open_clip_items(_state(open_clip)).items())
    state["alphas_cumprod"] = torch.linspace(1, 0.01, 10)  # scheduler data, not a component
    save_file(state, str(path))
    return state


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    unet, _ = make_unet("sdxl", root / "unet")
    vae = save_tiny_vae(root / "vae")
    clip = save_tiny_clip(root / "text_encoder")
    open_clip = save_tiny_clip(root / "text_encoder_2", projection=True, seed=1, hidden_act="gelu")
    state = write_single_file(root / "sdxl.safetensors", unet, vae, clip, open_clip)
    return root, state, dict(unet=unet, vae=vae, text_encoder=clip, text_encoder_2=open_clip)


def _configs(root, names):
    return {name: json.loads((root / name / "config.json").read_text()) for name in names}


def _same_params(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_fixture_is_what_diffusers_reads(sdxl):
    _, state, models = sdxl
    unet = convert_ldm_unet_checkpoint(state, models["unet"].config)
    vae = convert_ldm_vae_checkpoint(state, models["vae"].config)
    clip = convert_ldm_clip_checkpoint(state)
    open_clip = convert_open_clip_checkpoint(models["text_encoder_2"], state, prefix="conditioner.embedders.1.model.")
    for converted, name in ((unet, "unet"), (vae, "vae"), (clip, "text_encoder"), (open_clip, "text_encoder_2")):
        expected = _state(models[name])
        assert sorted(converted) == sorted(expected), name
        for key, value in expected.items():
            torch.testing.assert_close(converted[key], value, rtol=0, atol=0, msg=f"{name}: {key}")


def test_sdxl_single_file_loads_the_same_parameters(sdxl):
    root, _, _ = sdxl
    names = ["unet", "vae", "text_encoder", "text_encoder_2"]
    loaded = load_single_file(root / "sdxl.safetensors", configs=_configs(root, names))
    assert sorted(loaded) == sorted(names)
    _same_params(loaded["unet"][1], load_unet(root / "unet")[1])
    _same_params(loaded["vae"][1], load_vae(root / "vae")[1])
    _same_params(loaded["text_encoder"][1], load_clip(root / "text_encoder")[1])
    _same_params(loaded["text_encoder_2"][1], load_clip(root / "text_encoder_2")[1])


def test_unet_config_is_read_off_the_shapes(sdxl):
    root, _, models = sdxl
    inferred = infer_unet_config(split_single_file(root / "sdxl.safetensors")["unet"])
    config = models["unet"].config
    for key in ("in_channels", "out_channels", "layers_per_block", "cross_attention_dim", "use_linear_projection",
                "addition_embed_type", "projection_class_embeddings_input_dim"):
        assert inferred[key] == config[key], key
    for key in ("block_out_channels", "down_block_types", "up_block_types", "transformer_layers_per_block"):
        assert list(inferred[key]) == list(config[key]), key


def test_sd15_single_file_with_one_resnet_per_block(tmp_path):
    unet, _ = make_unet("sd15", tmp_path / "unet")
    vae = save_tiny_vae(tmp_path / "vae")
    clip = save_tiny_clip(tmp_path / "text_encoder")
    state = write_single_file(tmp_path / "sd15.safetensors", unet, vae, clip)
    assert sorted(convert_ldm_unet_checkpoint(state, unet.config)) == sorted(_state(unet))
    components = split_single_file(tmp_path / "sd15.safetensors")
    assert sorted(components) == ["text_encoder", "unet", "vae"]
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    _same_params(load_unet(components["unet"], config=config)[1], load_unet(tmp_path / "unet")[1])
    _same_params(load_clip(components["text_encoder"], _configs(tmp_path, ["text_encoder"])["text_encoder"])[1],
                 load_clip(tmp_path / "text_encoder")[1])


def test_unknown_ldm_unet_keys_are_reported(sdxl):
    root, _, _ = sdxl
    single = open_checkpoint(root / "sdxl.safetensors")
    tensors = {k: (lambda k=k: single.load(k), single.shape(k)) for k in single.keys()}
    tensors["model.diffusion_model.mystery.weight"] = (lambda: np.zeros(3, np.float32), (3,))
    unet = split_single_file(Checkpoint(tensors, "with a stray key"))["unet"]
    config = json.loads((root / "unet" / "config.json").read_text())
    with pytest.raises(ConversionError, match="mystery"):
        load_unet(unet, config=config)


def test_not_a_single_file_is_refused(tmp_path):
    save_file({"something.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="no SD1.5/SDXL component"):
        split_single_file(open_checkpoint(tmp_path / "other.safetensors"))
