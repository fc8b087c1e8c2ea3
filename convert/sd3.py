"""SD3 / SD3.5 transformer checkpoints -> `models.sd3.SD3Transformer` parameters.

Two layouts, each a key map declared as data:
- diffusers (`transformer/` folder: `config.json` plus one safetensors file or shards with an
  index), keys like `transformer_blocks.3.attn.add_k_proj.weight`;
- Stability's single files (`sd3.5_large.safetensors`, ...), keys under
  `model.diffusion_model.` like `joint_blocks.3.context_block.attn.qkv.weight` (q, k, v fused)
  and the last block's text adaLN and `final_layer.adaLN_modulation.1` in [shift; scale]
  order, the reverse of diffusers' [scale; shift].

The single-file map restates what diffusers'
`single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers` knows, as Rules rather
than by calling it: that function needs torch and the whole state dict in memory, whereas
the Rules read one tensor at a time without torch. The test builds a single file from
diffusers weights by the inverse renaming and checks both layouts give identical parameters.
Single files carry no config; it is read off the tensor shapes (`infer_single_file_config`).
Both maps name each block's weights per layer (`blocks_3/...`, as the unrolled model would);
`map_checkpoint` stacks them as the model's `layer_stacks` say.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax.numpy as jnp

from convert.checkpoint import Checkpoint, CheckpointError, open_checkpoint, parse_dtype
from convert.mapping import Rule, map_checkpoint, param_location, target_shapes
from models.sd3 import SD3Transformer

SINGLE_FILE_PREFIX = "model.diffusion_model."

# Linear layers: (checkpoint module regex, Flax module template); weight -> kernel, bias -> bias.
_DIFFUSERS_LINEARS = [
    (r"time_text_embed\.timestep_embedder\.linear_1", "time_embedder/linear_1"),
    (r"time_text_embed\.timestep_embedder\.linear_2", "time_embedder/linear_2"),
    (r"time_text_embed\.text_embedder\.linear_1", "pooled_embedder/linear_1"),
    (r"time_text_embed\.text_embedder\.linear_2", "pooled_embedder/linear_2"),
    (r"context_embedder", "context_embedder"),
    (r"transformer_blocks\.(\d+)\.norm1\.linear", r"blocks_\1/img_mod/linear"),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear", r"blocks_\1/txt_mod/linear"),
    (r"transformer_blocks\.(\d+)\.attn\.to_([qkv])", r"blocks_\1/img_qkv/\2"),
    (r"transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj", r"blocks_\1/txt_qkv/\2"),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", r"blocks_\1/img_attn_out"),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", r"blocks_\1/txt_attn_out"),
    (r"transformer_blocks\.(\d+)\.attn2\.to_([qkv])", r"blocks_\1/img_qkv2/\2"),
    (r"transformer_blocks\.(\d+)\.attn2\.to_out\.0", r"blocks_\1/img_attn2_out"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", r"blocks_\1/img_ff/proj_in"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2", r"blocks_\1/img_ff/proj_out"),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", r"blocks_\1/txt_ff/proj_in"),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2", r"blocks_\1/txt_ff/proj_out"),
    (r"norm_out\.linear", "norm_out/linear"),
    (r"proj_out", "proj_out"),
]

# Everything else: (checkpoint key regex, Flax path template, layout).
_DIFFUSERS_OTHERS = [
    (r"pos_embed\.pos_embed", "pos_embed", "as_is"),
    (r"pos_embed\.proj\.weight", "patch_embed/kernel", "conv"),
    (r"pos_embed\.proj\.bias", "patch_embed/bias", "as_is"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_([qk])\.weight", r"blocks_\1/img_qkv/norm_\2/scale", "as_is"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_([qk])\.weight", r"blocks_\1/txt_qkv/norm_\2/scale", "as_is"),
    (r"transformer_blocks\.(\d+)\.attn2\.norm_([qk])\.weight", r"blocks_\1/img_qkv2/norm_\2/scale", "as_is"),
]

# Single files (prefix removed): x_block is the image stream, context_block the text stream.
_SINGLE_FILE_FUSED_QKV = [
    (r"joint_blocks\.(\d+)\.x_block\.attn\.qkv", r"blocks_\1/img_qkv"),
    (r"joint_blocks\.(\d+)\.context_block\.attn\.qkv", r"blocks_\1/txt_qkv"),
    (r"joint_blocks\.(\d+)\.x_block\.attn2\.qkv", r"blocks_\1/img_qkv2"),
]
_SINGLE_FILE_LINEARS = [
    (r"t_embedder\.mlp\.0", "time_embedder/linear_1"),
    (r"t_embedder\.mlp\.2", "time_embedder/linear_2"),
    (r"y_embedder\.mlp\.0", "pooled_embedder/linear_1"),
    (r"y_embedder\.mlp\.2", "pooled_embedder/linear_2"),
    (r"context_embedder", "context_embedder"),
    (r"joint_blocks\.(\d+)\.x_block\.adaLN_modulation\.1", r"blocks_\1/img_mod/linear"),
    (r"joint_blocks\.(\d+)\.context_block\.adaLN_modulation\.1", r"blocks_\1/txt_mod/linear"),
    (r"joint_blocks\.(\d+)\.x_block\.attn\.proj", r"blocks_\1/img_attn_out"),
    (r"joint_blocks\.(\d+)\.context_block\.attn\.proj", r"blocks_\1/txt_attn_out"),
    (r"joint_blocks\.(\d+)\.x_block\.attn2\.proj", r"blocks_\1/img_attn2_out"),
    (r"joint_blocks\.(\d+)\.x_block\.mlp\.fc1", r"blocks_\1/img_ff/proj_in"),
    (r"joint_blocks\.(\d+)\.x_block\.mlp\.fc2", r"blocks_\1/img_ff/proj_out"),
    (r"joint_blocks\.(\d+)\.context_block\.mlp\.fc1", r"blocks_\1/txt_ff/proj_in"),
    (r"joint_blocks\.(\d+)\.context_block\.mlp\.fc2", r"blocks_\1/txt_ff/proj_out"),
    (r"final_layer\.linear", "proj_out"),
]
_SINGLE_FILE_OTHERS = [
    (r"pos_embed", "pos_embed", "as_is"),
    (r"x_embedder\.proj\.weight", "patch_embed/kernel", "conv"),
    (r"x_embedder\.proj\.bias", "patch_embed/bias", "as_is"),
    (r"joint_blocks\.(\d+)\.x_block\.attn\.ln_([qk])\.weight", r"blocks_\1/img_qkv/norm_\2/scale", "as_is"),
    (r"joint_blocks\.(\d+)\.context_block\.attn\.ln_([qk])\.weight", r"blocks_\1/txt_qkv/norm_\2/scale", "as_is"),
    (r"joint_blocks\.(\d+)\.x_block\.attn2\.ln_([qk])\.weight", r"blocks_\1/img_qkv2/norm_\2/scale", "as_is"),
]


def _linear_rules(table, weight_layout="linear", bias_layout="as_is"):
    return [
        rule
        for source, target in table
        for rule in (Rule(source + r"\.weight", target + "/kernel", weight_layout), Rule(source + r"\.bias", target + "/bias", bias_layout))
    ]


def _fused_qkv_rules(table):
    return [
        rule
        for source, target in table
        for rule in (
            Rule(source + r"\.weight", tuple(f"{target}/{part}/kernel" for part in "qkv"), "fused_qkv_linear"),
            Rule(source + r"\.bias", tuple(f"{target}/{part}/bias" for part in "qkv"), "fused_qkv_bias"),
        )
    ]


def _other_rules(table):
    return [Rule(source, target, layout) for source, target, layout in table]


def diffusers_rules() -> list[Rule]:
    """Key map of diffusers' SD3Transformer2DModel state dict."""
    return _linear_rules(_DIFFUSERS_LINEARS) + _other_rules(_DIFFUSERS_OTHERS)


def single_file_rules(num_layers: int) -> list[Rule]:
    """Key map of Stability's single files (keys without the `model.diffusion_model.` prefix).

    The last block's text adaLN and the final adaLN store [shift; scale]: their rules come
    first so they win over the generic ones.
    """
    last = num_layers - 1
    swapped = [
        (rf"joint_blocks\.({last})\.context_block\.adaLN_modulation\.1", r"blocks_\1/txt_mod/linear"),
        (r"final_layer\.adaLN_modulation\.1", "norm_out/linear"),
    ]
    return (
        _linear_rules(swapped, "swap_halves_linear", "swap_halves_bias")
        + _fused_qkv_rules(_SINGLE_FILE_FUSED_QKV)
        + _linear_rules(_SINGLE_FILE_LINEARS)
        + _other_rules(_SINGLE_FILE_OTHERS)
    )


def single_file_transformer(checkpoint: Checkpoint) -> Checkpoint:
    """The transformer's tensors of a single file, prefix removed (other components dropped)."""
    if any(key.startswith(SINGLE_FILE_PREFIX) for key in checkpoint.keys()):
        return checkpoint.renamed(lambda k: k[len(SINGLE_FILE_PREFIX) :] if k.startswith(SINGLE_FILE_PREFIX) else None)
    return checkpoint


def is_single_file(checkpoint: Checkpoint) -> bool:
    return any(key.startswith("joint_blocks.") for key in single_file_transformer(checkpoint).keys())


def infer_single_file_config(checkpoint: Checkpoint) -> dict:
    """A diffusers-style config read off the tensor shapes of a single file (prefix removed).

    The head width is the QK-norm width where there is one, else 64 (every SD3 model).
    `sample_size` is not in the weights; 128 (all released SD3 models) only seeds the
    position table, which the checkpoint overwrites.
    """
    keys = list(checkpoint.keys())
    blocks = {int(m.group(1)) for k in keys if (m := re.match(r"joint_blocks\.(\d+)\.", k))}
    if not blocks or "x_embedder.proj.weight" not in checkpoint:
        raise CheckpointError(f"{checkpoint.description}: no SD3 transformer (joint_blocks, x_embedder) found")
    inner, in_channels, patch, _ = checkpoint.shape("x_embedder.proj.weight")
    ln_q = "joint_blocks.0.x_block.attn.ln_q.weight"
    head_dim = checkpoint.shape(ln_q)[0] if ln_q in checkpoint else 64
    if inner % head_dim:
        raise CheckpointError(
            f"{checkpoint.description}: width {inner} is not a multiple of the assumed head width {head_dim}; "
            "pass config= (a diffusers transformer config) to load_sd3_transformer"
        )
    positions = checkpoint.shape("pos_embed")[1]
    return {
        "sample_size": 128,
        "patch_size": patch,
        "in_channels": in_channels,
        "num_layers": max(blocks) + 1,
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": checkpoint.shape("context_embedder.weight")[1],
        "caption_projection_dim": inner,
        "pooled_projection_dim": checkpoint.shape("y_embedder.mlp.0.weight")[1],
        "out_channels": checkpoint.shape("final_layer.linear.weight")[0] // patch**2,
        "pos_embed_max_size": round(positions**0.5),
        "dual_attention_layers": sorted({int(k.split(".")[1]) for k in keys if ".x_block.attn2." in k}),
        "qk_norm": "rms_norm" if any(".attn.ln_q." in k for k in keys) else None,
    }


def transformer_param_shapes(module: SD3Transformer) -> dict:
    """Flat Flax parameter shapes of `module`, from a one-patch dummy input (nothing allocated)."""
    p = module.patch_size
    return target_shapes(
        module,
        jnp.zeros((1, module.in_channels, p, p)),
        jnp.zeros((1, 1, module.joint_attention_dim)),
        jnp.zeros((1, module.pooled_projection_dim)),
        jnp.zeros((1,)),
    )


def _read_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{folder}: no config.json next to the weights; pass config= explicitly")
    return json.loads(config_path.read_text())


def load_sd3_transformer(path, dtype="float32", config: dict | None = None):
    """Load an SD3/SD3.5 transformer -> (SD3Transformer module, params).

    `path`: a diffusers repository root (its `transformer/` is used), a `transformer/` folder,
    its safetensors file or index, or a single-file checkpoint (`.safetensors` with
    `model.diffusion_model.joint_blocks...` or unprefixed `joint_blocks...` keys). `config`
    (a diffusers transformer config dict) overrides the one found on disk or inferred from a
    single file. Parameters and compute use `dtype`; use as
    `module.apply({"params": params}, latents, text, pooled, timestep)`.
    """
    path = Path(path)
    if (path / "transformer" / "config.json").exists():
        path = path / "transformer"
    checkpoint = open_checkpoint(path)
    if is_single_file(checkpoint):
        checkpoint = single_file_transformer(checkpoint)
        config = config or infer_single_file_config(checkpoint)
        rules = single_file_rules(config["num_layers"])
    else:
        config = config or _read_config(path if path.is_dir() else path.parent)
        rules = diffusers_rules()
    np_dtype = parse_dtype(dtype)
    module = SD3Transformer.from_config(config, dtype=jnp.dtype(np_dtype), param_dtype=jnp.dtype(np_dtype))
    params = map_checkpoint(checkpoint, rules, transformer_param_shapes(module), np_dtype, f"SD3 transformer {path}",
                            stacks=module.layer_stacks)
    return module, params


def sd3_param_location(name: str, module: SD3Transformer) -> tuple[str, int | None]:
    """A diffusers parameter name (`transformer_blocks.3.attn.to_q.weight`) -> (our parameter path,
    index along its leading layer axis, or None when not stacked); its layout is the rule's."""
    return param_location(name, diffusers_rules(), module.layer_stacks)
