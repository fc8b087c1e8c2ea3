"""Wan2.1 transformer checkpoints -> `models.wan.WanTransformer3DModel` parameters.

Three namings, as data:
- diffusers' `transformer/` folder (config.json plus sharded safetensors): `DIFFUSERS_RULES`;
- the original Wan release (`blocks.N.self_attn.q`, `cross_attn.k_img`, `ffn.0`, `modulation`,
  `head.head`, `img_emb.proj.N`, ...): `ORIGINAL_NAMES` renames each key to its diffusers name
  (the original's `norm3` is the cross-attention norm, diffusers' `norm2`);
- ComfyUI's repackaged single files: the original naming under `model.diffusion_model.`.
A single file has no config.json: the config is read off the tensor shapes (`infer_wan_config`).

The blocks run under scan, so their parameters are stacked on a leading layer axis: the rules
map each block's tensors to `blocks_N/...` (the unrolled names) and `map_checkpoint` stacks them
into `blocks/...` (`WanTransformer3DModel.layer_stacks`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from convert.checkpoint import Checkpoint, open_checkpoint, parse_dtype
from convert.mapping import LAYOUTS, Rule, map_checkpoint, target_shapes
from models.wan import WanTransformer3DModel

COMFY_PREFIX = "model.diffusion_model."

LAYOUTS["conv3d_as_dense"] = lambda w: w.reshape(w.shape[0], -1).T  # [out, in, t, h, w] -> [in*t*h*w, out]


def _dense(source: str, target: str, layout: str = "linear") -> list[Rule]:
    return [Rule(source + r"\.weight", f"{target}/kernel", layout), Rule(source + r"\.bias", f"{target}/bias")]


def _norm(source: str, target: str, affine_bias: bool = False) -> list[Rule]:
    rules = [Rule(source + r"\.weight", f"{target}/scale")]
    return rules + ([Rule(source + r"\.bias", f"{target}/bias")] if affine_bias else [])


B, BLOCK = r"blocks\.(\d+)", r"blocks_\1"
_IMAGE = r"condition_embedder\.image_embedder"

DIFFUSERS_RULES = [
    Rule(r"patch_embedding\.weight", "patch_embedding/kernel", "conv3d_as_dense"),
    Rule(r"patch_embedding\.bias", "patch_embedding/bias"),
    *_dense(r"condition_embedder\.time_embedder\.linear_([12])", r"time_embedder/linear_\1"),
    *_dense(r"condition_embedder\.time_proj", "time_proj"),
    *_dense(r"condition_embedder\.text_embedder\.linear_([12])", r"text_embedder_linear_\1"),
    *_norm(_IMAGE + r"\.(norm[12])", r"image_embedder/\1", affine_bias=True),
    *_dense(_IMAGE + r"\.ff\.net\.0\.proj", "image_embedder/ff_proj_in"),
    *_dense(_IMAGE + r"\.ff\.net\.2", "image_embedder/ff_proj_out"),
    Rule(B + r"\.scale_shift_table", BLOCK + "/scale_shift_table"),
    *_dense(B + r"\.(attn[12])\.(to_[qkv]|add_[kv]_proj)", BLOCK + r"/\2/\3"),
    *_dense(B + r"\.(attn[12])\.to_out\.0", BLOCK + r"/\2/to_out"),
    *_norm(B + r"\.(attn[12])\.(norm_q|norm_k|norm_added_k)", BLOCK + r"/\2/\3"),
    *_norm(B + r"\.norm2", BLOCK + "/norm2", affine_bias=True),
    *_dense(B + r"\.ffn\.net\.0\.proj", BLOCK + "/ffn/proj_in"),
    *_dense(B + r"\.ffn\.net\.2", BLOCK + "/ffn/proj_out"),
    Rule(r"scale_shift_table", "scale_shift_table"),
    *_dense(r"proj_out", "proj_out"),
]

# Original Wan name -> diffusers name: (regular expression, replacement), applied in order.
ORIGINAL_NAMES = [
    (r"time_embedding\.([02])\.", lambda m: f"condition_embedder.time_embedder.linear_{int(m[1]) // 2 + 1}."),
    (r"text_embedding\.([02])\.", lambda m: f"condition_embedder.text_embedder.linear_{int(m[1]) // 2 + 1}."),
    (r"time_projection\.1\.", "condition_embedder.time_proj."),
    (r"img_emb\.proj\.0\.", "condition_embedder.image_embedder.norm1."),
    (r"img_emb\.proj\.1\.", "condition_embedder.image_embedder.ff.net.0.proj."),
    (r"img_emb\.proj\.3\.", "condition_embedder.image_embedder.ff.net.2."),
    (r"img_emb\.proj\.4\.", "condition_embedder.image_embedder.norm2."),
    (r"\.self_attn\.", ".attn1."),
    (r"\.cross_attn\.", ".attn2."),
    (r"\.(attn[12])\.([qkv])\.", r".\1.to_\2."),
    (r"\.(attn[12])\.o\.", r".\1.to_out.0."),
    (r"\.([kv])_img\.", r".add_\1_proj."),
    (r"\.norm_k_img\.", ".norm_added_k."),
    (r"(blocks\.\d+)\.norm3\.", r"\1.norm2."),
    (r"(blocks\.\d+)\.modulation$", r"\1.scale_shift_table"),
    (r"(blocks\.\d+)\.ffn\.0\.", r"\1.ffn.net.0.proj."),
    (r"(blocks\.\d+)\.ffn\.2\.", r"\1.ffn.net.2."),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"^head\.head\.", "proj_out."),
]


def is_original_checkpoint(checkpoint: Checkpoint) -> bool:
    """Original Wan naming (with or without ComfyUI's prefix)."""
    return any(k.removeprefix(COMFY_PREFIX).startswith(("head.head.", "time_embedding.")) for k in checkpoint.keys())


def original_to_diffusers(key: str) -> str:
    key = key.removeprefix(COMFY_PREFIX)
    for pattern, replacement in ORIGINAL_NAMES:
        key = re.sub(pattern, replacement, key)
    return key


def _block_count(checkpoint: Checkpoint) -> int:
    indices = {int(m.group(1)) for k in checkpoint.keys() if (m := re.match(r"blocks\.(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def infer_wan_config(checkpoint: Checkpoint) -> dict:
    """A diffusers-style config read off the shapes of a checkpoint in diffusers naming. The
    head size cannot be read off; every Wan2.1 model has heads of 128."""
    required = ("patch_embedding.weight", "condition_embedder.text_embedder.linear_1.weight",
                "condition_embedder.time_embedder.linear_1.weight", "blocks.0.ffn.net.0.proj.weight", "proj_out.weight")
    checkpoint.require(required, "a Wan transformer checkpoint")
    dim, in_channels, *patch = checkpoint.shape("patch_embedding.weight")
    head_dim = 128 if dim % 128 == 0 else dim
    image = "condition_embedder.image_embedder.norm1.weight"
    return dict(
        patch_size=patch, in_channels=in_channels, num_attention_heads=dim // head_dim, attention_head_dim=head_dim,
        out_channels=checkpoint.shape("proj_out.weight")[0] // int(np.prod(patch)),
        text_dim=checkpoint.shape("condition_embedder.text_embedder.linear_1.weight")[1],
        freq_dim=checkpoint.shape("condition_embedder.time_embedder.linear_1.weight")[1],
        ffn_dim=checkpoint.shape("blocks.0.ffn.net.0.proj.weight")[0], num_layers=_block_count(checkpoint),
        cross_attn_norm="blocks.0.norm2.weight" in checkpoint,
        image_dim=checkpoint.shape(image)[0] if image in checkpoint else None,
        added_kv_proj_dim=dim if "blocks.0.attn2.add_k_proj.weight" in checkpoint else None,
    )


def _model_inputs(model: WanTransformer3DModel):
    """Smallest inputs that trace `model`, for the parameter shapes."""
    cfg = model.config
    pt, ph, pw = cfg.patch_size
    image = None if cfg.image_dim is None else np.zeros((1, 1, cfg.image_dim), np.float32)
    return (np.zeros((1, cfg.in_channels, pt, ph, pw), np.float32), np.zeros((1,), np.float32),
            np.zeros((1, 1, cfg.text_dim), np.float32), image)


def wan_params(checkpoint: Checkpoint, model: WanTransformer3DModel, dtype="float32"):
    """Parameters of `model` from a checkpoint in diffusers or (renamed) original naming (strict)."""
    shapes = target_shapes(model, *_model_inputs(model))
    return map_checkpoint(checkpoint, DIFFUSERS_RULES, shapes, dtype, f"Wan transformer {checkpoint.description}",
                          stacks=model.layer_stacks)


def load_wan_transformer(path, dtype="float32", config: dict | None = None):
    """(module, params) from a diffusers repository, its `transformer/` folder, or a single file
    (original Wan naming, ComfyUI's prefixed repackage, or diffusers naming). `config` entries
    override config.json or the config read off a single file's shapes."""
    path = Path(path)
    if path.is_dir() and (path / "transformer").is_dir():
        path = path / "transformer"
    checkpoint = open_checkpoint(path)
    if is_original_checkpoint(checkpoint):
        checkpoint = checkpoint.renamed(original_to_diffusers)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.exists():
            raise ValueError(f"{path}: a diffusers transformer folder needs config.json")
        full_config = {**json.loads(config_path.read_text()), **(config or {})}
    else:
        full_config = {**infer_wan_config(checkpoint), **(config or {})}
    jnp_dtype = parse_dtype(dtype)
    model = WanTransformer3DModel.from_config(full_config, dtype=jnp_dtype, param_dtype=jnp_dtype)
    return model, wan_params(checkpoint, model, dtype)
