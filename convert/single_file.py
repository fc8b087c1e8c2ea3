"""Single-file SD1.5 / SDXL checkpoints (original LDM names) -> the per-component converters.

A single file holds every component under its LDM prefix:

    model.diffusion_model.*                        UNet           -> "unet"
    first_stage_model.*                            VAE            -> "vae"
    cond_stage_model.transformer.text_model.*      CLIP-L (SD1.5) -> "text_encoder"
    conditioner.embedders.0.transformer.*          CLIP-L (SDXL)  -> "text_encoder"
    conditioner.embedders.1.model.*                OpenCLIP bigG  -> "text_encoder_2"

Everything else (EMA copies, the scheduler's alphas_cumprod, ...) is not part of a component.
`split_single_file` renames each component's keys to the diffusers / transformers names and
the usual converters (convert.unet, convert.vae, convert.clip) take it from there, so a single
file and a diffusers folder go through the same strict key maps.

Why a renaming table here rather than calling diffusers' `loaders.single_file_utils`: that code
knows these mappings, but it works on a fully loaded dict of torch tensors (a 7 GB SDXL file
read into memory twice) and makes torch a run-time dependency of conversion, which nag-jax keeps
to numpy + safetensors. The renaming below is a lazy view (each tensor is read, reshaped or
split when the converter asks for it), and the tests check it against diffusers' own
conversion functions on a tiny LDM file, so the knowledge still comes from the library.
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

from convert.checkpoint import Checkpoint, open_checkpoint

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIXES = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
SD2_OPEN_CLIP_PREFIX = "cond_stage_model.model."

# A renamer maps one LDM key (prefix removed) to [(new key, tensor transform name)], or None to drop it.
_TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    # name: (array -> array, shape -> shape)
    "same": (lambda a: a, lambda s: s),
    "conv1x1_to_linear": (lambda a: a.reshape(a.shape[:2]), lambda s: s[:2]),  # VAE mid attention
    "transpose": (lambda a: a.T, lambda s: s[::-1]),  # OpenCLIP text_projection is x @ P
    **{
        f"qkv_{i}": (lambda a, i=i: np.split(a, 3)[i], lambda s: (s[0] // 3, *s[1:]))  # fused in_proj
        for i in range(3)
    },
}

# ---------------------------------------------------------------------------------- UNet

_UNET_FIXED = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_MIDDLE = {"0": "mid_block.resnets.0", "1": "mid_block.attentions.0", "2": "mid_block.resnets.1"}


def _resnet(name: str) -> str:
    module, _, leaf = name.rpartition(".")
    return f"{_UNET_RESNET.get(module, module)}.{leaf}"


def unet_layers_per_block(ldm_keys) -> int:
    """LDM numbers input blocks consecutively: each down block's L resnets, then its downsampler
    (`input_blocks.N.0.op`), so the first downsampler sits at N = L + 1."""
    ops = [int(m.group(1)) for k in ldm_keys if (m := re.fullmatch(r"input_blocks\.(\d+)\.0\.op\.weight", k))]
    if not ops:
        raise ValueError("single-file UNet: no downsampler (input_blocks.N.0.op) found, cannot number the blocks")
    return min(ops) - 1


def unet_renamer(layers_per_block: int):
    per_block = layers_per_block + 1  # LDM slots per down/up block

    def rename(key):
        for old, new in _UNET_FIXED.items():
            if key.startswith(old + "."):
                return [(new + key[len(old):], "same")]
        if m := re.fullmatch(r"input_blocks\.(\d+)\.(\d)\.(.+)", key):
            slot, part, rest = int(m.group(1)) - 1, m.group(2), m.group(3)
            block, layer = divmod(slot, per_block)
            if rest.startswith("op."):
                return [(f"down_blocks.{block}.downsamplers.0.conv.{rest[3:]}", "same")]
            if part == "0":
                return [(f"down_blocks.{block}.resnets.{layer}.{_resnet(rest)}", "same")]
            return [(f"down_blocks.{block}.attentions.{layer}.{rest}", "same")]
        if m := re.fullmatch(r"middle_block\.(\d)\.(.+)", key):
            part, rest = m.groups()
            return [(f"{_MIDDLE[part]}.{_resnet(rest) if part != '1' else rest}", "same")]
        if m := re.fullmatch(r"output_blocks\.(\d+)\.(\d)\.(.+)", key):
            slot, part, rest = int(m.group(1)), m.group(2), m.group(3)
            block, layer = divmod(slot, per_block)
            if rest.startswith("conv."):  # the upsampler: slot part 1 without attention, else 2
                return [(f"up_blocks.{block}.upsamplers.0.{rest}", "same")]
            if part == "0":
                return [(f"up_blocks.{block}.resnets.{layer}.{_resnet(rest)}", "same")]
            return [(f"up_blocks.{block}.attentions.{layer}.{rest}", "same")]
        return [("ldm." + key, "same")]  # unknown: the strict UNet map reports it

    return rename


# ----------------------------------------------------------------------------------- VAE

_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _vae_renamer(up_blocks: int):
    def rename(key):
        if m := re.fullmatch(r"(encoder|decoder)\.(down|up)\.(\d+)\.block\.(\d+)\.(.+)", key):
            half, direction, block, layer, rest = m.groups()
            block = int(block) if direction == "down" else up_blocks - 1 - int(block)  # LDM counts up from the bottom
            return [(f"{half}.{direction}_blocks.{block}.resnets.{layer}.{rest.replace('nin_shortcut', 'conv_shortcut')}",
                     "same")]
        if m := re.fullmatch(r"(encoder|decoder)\.(down|up)\.(\d+)\.(downsample|upsample)\.(.+)", key):
            half, direction, block, sampler, rest = m.groups()
            block = int(block) if direction == "down" else up_blocks - 1 - int(block)
            return [(f"{half}.{direction}_blocks.{block}.{sampler}rs.0.{rest}", "same")]
        if m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(.+)", key):
            half, number, rest = m.groups()
            return [(f"{half}.mid_block.resnets.{int(number) - 1}.{rest.replace('nin_shortcut', 'conv_shortcut')}",
                     "same")]
        if m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", key):
            half, module, leaf = m.groups()
            transform = "conv1x1_to_linear" if module != "norm" and leaf == "weight" else "same"
            return [(f"{half}.mid_block.attentions.0.{_VAE_ATTENTION[module]}.{leaf}", transform)]
        if m := re.fullmatch(r"(encoder|decoder)\.norm_out\.(.+)", key):
            return [(f"{m.group(1)}.conv_norm_out.{m.group(2)}", "same")]
        return [(key, "same")]  # conv_in, conv_out, quant_conv, post_quant_conv keep their names

    return rename


# ---------------------------------------------------------------------------------- CLIP

def _clip_rename(key):
    """CLIP-L in LDM files is transformers' CLIPTextModel under a prefix (transformers 4 names)."""
    return [(key, "same")]


_OPEN_CLIP_FIXED = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPEN_CLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def _open_clip_rename(key):
    """open_clip's text tower -> transformers' CLIPTextModelWithProjection names."""
    if key in _OPEN_CLIP_FIXED:
        return [(_OPEN_CLIP_FIXED[key], "same")]
    if key == "text_projection":
        return [("text_projection.weight", "transpose")]
    if key == "logit_scale":  # the image-text contrastive temperature, unused for text encoding
        return None
    if m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key):
        layer, leaf = m.groups()
        return [(f"text_model.encoder.layers.{layer}.self_attn.{p}_proj.{leaf}", f"qkv_{i}")
                for i, p in enumerate("qkv")]
    if m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key):
        layer, module, leaf = m.groups()
        return [(f"text_model.encoder.layers.{layer}.{_OPEN_CLIP_LAYER.get(module, module)}.{leaf}", "same")]
    return [("open_clip." + key, "same")]  # unknown: the strict CLIP map reports it


# ------------------------------------------------------------------------------- splitting

def _component(checkpoint: Checkpoint, prefix: str, rename, name: str) -> Checkpoint:
    """The keys under `prefix`, renamed, as a lazy Checkpoint (tensors transformed on load)."""
    tensors = {}
    for key in checkpoint.keys():
        if not key.startswith(prefix):
            continue
        for new, transform in rename(key[len(prefix):]) or ():
            array_fn, shape_fn = _TRANSFORMS[transform]
            tensors[new] = (lambda key=key, fn=array_fn: fn(checkpoint.load(key)), shape_fn(checkpoint.shape(key)))
    return Checkpoint(tensors, f"{checkpoint.description} [{name}]")


def _keys_under(checkpoint: Checkpoint, prefix: str) -> list[str]:
    return [k[len(prefix):] for k in checkpoint.keys() if k.startswith(prefix)]


def split_single_file(path_or_checkpoint, *, allow_pickle: bool = False) -> dict[str, Checkpoint]:
    """Component name ("unet", "vae", "text_encoder", "text_encoder_2") -> a lazy Checkpoint with
    the diffusers / transformers key names, for the components the file holds."""
    checkpoint = (path_or_checkpoint if isinstance(path_or_checkpoint, Checkpoint)
                  else open_checkpoint(path_or_checkpoint, allow_pickle=allow_pickle))
    if _keys_under(checkpoint, SD2_OPEN_CLIP_PREFIX):
        raise ValueError(f"{checkpoint.description}: an SD2.x single file (OpenCLIP-H text encoder under "
                         f"{SD2_OPEN_CLIP_PREFIX!r}) is not supported; use the diffusers-format repository")
    components = {}
    unet_keys = _keys_under(checkpoint, UNET_PREFIX)
    if unet_keys:
        rename = unet_renamer(unet_layers_per_block(unet_keys))
        components["unet"] = _component(checkpoint, UNET_PREFIX, rename, "unet")
    vae_keys = _keys_under(checkpoint, VAE_PREFIX)
    if vae_keys:
        ups = {int(m.group(1)) for k in vae_keys if (m := re.match(r"decoder\.up\.(\d+)\.", k))}
        components["vae"] = _component(checkpoint, VAE_PREFIX, _vae_renamer(max(ups) + 1), "vae")
    for prefix in CLIP_PREFIXES:
        if _keys_under(checkpoint, prefix):
            components["text_encoder"] = _component(checkpoint, prefix, _clip_rename, "text_encoder")
    if _keys_under(checkpoint, OPEN_CLIP_PREFIX):
        components["text_encoder_2"] = _component(checkpoint, OPEN_CLIP_PREFIX, _open_clip_rename, "text_encoder_2")
    if not components:
        raise ValueError(f"{checkpoint.description}: no SD1.5/SDXL component found (expected keys under "
                         f"{UNET_PREFIX!r}, {VAE_PREFIX!r}, {CLIP_PREFIXES[0]!r} or {OPEN_CLIP_PREFIX!r})")
    return components


def infer_unet_config(unet: Checkpoint) -> dict:
    """A diffusers UNet config read off the (renamed) tensor shapes of a single-file UNet.

    Head counts are not in the shapes: as in the original LDM configs, linear-projection UNets
    (SD2.x, SDXL) use 64-wide heads and conv-projection ones (SD1.x) 8 heads. SDXL's time-id
    embedding width (256) is likewise the LDM config's constant.
    """
    keys = set(unet.keys())
    blocks = 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"down_blocks\.(\d+)\.", k)))
    channels = [unet.shape(f"down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(blocks)]
    layers = 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k)))

    def depth(prefix):
        found = [int(m.group(1)) for k in keys if (m := re.match(rf"{prefix}\.transformer_blocks\.(\d+)\.", k))]
        return 1 + max(found) if found else 0

    down_depths = [depth(f"down_blocks\\.{i}\\.attentions\\.0") for i in range(blocks)]
    mid_depth = depth(r"mid_block\.attentions\.0")
    to_k = next(k for k in sorted(keys) if k.endswith("attn2.to_k.weight"))
    linear = len(unet.shape(next(k for k in sorted(keys) if k.endswith("proj_in.weight")))) == 2
    config = dict(
        in_channels=unet.shape("conv_in.weight")[1],
        out_channels=unet.shape("conv_out.weight")[0],
        block_out_channels=channels,
        layers_per_block=layers,
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in down_depths],
        up_block_types=["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(down_depths)],
        transformer_layers_per_block=[d or 1 for d in down_depths[:-1]] + [mid_depth or down_depths[-1] or 1],
        cross_attention_dim=unet.shape(to_k)[1],
        use_linear_projection=linear,
        attention_head_dim=[c // 64 for c in channels] if linear else 8,
    )
    if "add_embedding.linear_1.weight" in keys:
        config.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=unet.shape("add_embedding.linear_1.weight")[1])
    if "time_embedding.cond_proj.weight" in keys:
        config["time_cond_proj_dim"] = unet.shape("time_embedding.cond_proj.weight")[1]
    if mid_depth == 0:
        config["mid_block_type"] = None
    return config


def load_single_file(path_or_checkpoint, dtype="float32", configs: dict | None = None, *,
                     allow_pickle: bool = False) -> dict[str, tuple]:
    """Component name -> (module, params) for every component of an SD1.5 / SDXL single file.

    `configs` maps component names to their diffusers / transformers config dicts (the
    config.json files of the matching diffusers repository). The UNet's is read off the shapes
    when not given (`infer_unet_config`); the VAE and text encoders need theirs.
    """
    from convert.clip import load_clip
    from convert.unet import load_unet
    from convert.vae import load_vae

    configs = dict(configs or {})
    loaded = {}
    for name, checkpoint in split_single_file(path_or_checkpoint, allow_pickle=allow_pickle).items():
        if name == "unet":
            loaded[name] = load_unet(checkpoint, dtype, configs.get("unet") or infer_unet_config(checkpoint))
        elif name not in configs:
            raise ValueError(f"configs: the single file holds a {name!r} but configs has no {name!r} entry "
                             "(pass the config.json dict of the matching diffusers repository)")
        elif name == "vae":
            loaded[name] = load_vae(checkpoint, configs[name], dtype)
        else:
            loaded[name] = load_clip(checkpoint, configs[name], dtype)
    return loaded
