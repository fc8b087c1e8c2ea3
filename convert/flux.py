"""Flux transformer checkpoints -> `models.flux.FluxTransformer2DModel` parameters.

Two formats, each a key map as data:
- diffusers' `transformer/` folder (config.json plus sharded safetensors and index), and
- Black Forest Labs' single file (`flux1-dev.safetensors`, ...; optionally every key prefixed
  with `model.diffusion_model.` as UIs repackage it): fused q/k/v, `linear1` fusing q, k, v
  and the MLP input (unequal parts), and the final adaLN in [shift; scale] order, the reverse
  of diffusers' `norm_out`.

A single file has no config: it is read off the tensor shapes (`infer_bfl_config`);
`axes_dims_rope` cannot be, and defaults to FLUX.1's (16, 56, 56) when the head size is 128.
Pass `config=` (a diffusers config dict) to override or complete it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from convert.checkpoint import Checkpoint, open_checkpoint, parse_dtype
from convert.mapping import LAYOUTS, Rule, map_checkpoint, param_location, target_shapes
from models.flux import MLP_RATIO, FluxTransformer2DModel

BFL_PREFIX = "model.diffusion_model."


def _linear1_parts(w):
    """BFL `linear1` [3 dim + MLP_RATIO dim, ...] -> (q, k, v, mlp_in) along the output axis."""
    dim = w.shape[0] // (3 + MLP_RATIO)
    if dim * (3 + MLP_RATIO) != w.shape[0]:
        raise ValueError(f"single-block linear1 has {w.shape[0]} outputs, not a multiple of {3 + MLP_RATIO}")
    return tuple(np.split(w, [dim, 2 * dim, 3 * dim], axis=0))


LAYOUTS.update(
    {
        "flux_linear1_linear": lambda w: tuple(LAYOUTS["linear"](part) for part in _linear1_parts(w)),
        "flux_linear1_bias": _linear1_parts,
    }
)


def _dense(source: str, target: str, layout: str = "linear") -> list[Rule]:
    """A torch Linear (weight, bias) -> a Flax Dense (kernel, bias); `layout` names the weight's
    rearrangement, and the bias follows it (`*_linear` -> `*_bias`)."""
    bias_layout = "as_is" if layout == "linear" else layout.removesuffix("_linear") + "_bias"
    targets = lambda leaf: tuple(f"{t}/{leaf}" for t in target) if isinstance(target, tuple) else f"{target}/{leaf}"  # noqa: E731
    return [Rule(source + r"\.weight", targets("kernel"), layout), Rule(source + r"\.bias", targets("bias"), bias_layout)]


def _scale(source: str, target: str) -> Rule:
    return Rule(source, f"{target}/scale")


D, S = r"transformer_blocks\.(\d+)", r"single_transformer_blocks\.(\d+)"
# Per-layer targets as the unrolled model names them; map_checkpoint stacks them (model.layer_stacks).
DOUBLE, SINGLE = r"transformer_blocks_\1", r"single_transformer_blocks/blocks_\1"

DIFFUSERS_RULES = [
    *_dense(r"x_embedder", "x_embedder"),
    *_dense(r"context_embedder", "context_embedder"),
    *_dense(r"time_text_embed\.(timestep|guidance|text)_embedder\.linear_([12])", r"time_text_embed/\1_embedder/linear_\2"),
    *_dense(D + r"\.norm1\.linear", DOUBLE + "/norm1/linear"),
    *_dense(D + r"\.norm1_context\.linear", DOUBLE + "/norm1_context/linear"),
    *_dense(D + r"\.attn\.to_([qkv])", DOUBLE + r"/attn/\2"),
    *_dense(D + r"\.attn\.add_([qkv])_proj", DOUBLE + r"/attn_context/\2"),
    _scale(D + r"\.attn\.norm_([qk])\.weight", DOUBLE + r"/attn/norm_\2"),
    _scale(D + r"\.attn\.norm_added_([qk])\.weight", DOUBLE + r"/attn_context/norm_\2"),
    *_dense(D + r"\.attn\.to_out\.0", DOUBLE + "/to_out"),
    *_dense(D + r"\.attn\.to_add_out", DOUBLE + "/to_add_out"),
    *_dense(D + r"\.(ff|ff_context)\.net\.0\.proj", DOUBLE + r"/\2/proj_in"),
    *_dense(D + r"\.(ff|ff_context)\.net\.2", DOUBLE + r"/\2/proj_out"),
    *_dense(S + r"\.norm\.linear", SINGLE + "/norm/linear"),
    *_dense(S + r"\.attn\.to_([qkv])", SINGLE + r"/attn/\2"),
    _scale(S + r"\.attn\.norm_([qk])\.weight", SINGLE + r"/attn/norm_\2"),
    *_dense(S + r"\.(proj_mlp|proj_out)", SINGLE + r"/\2"),
    *_dense(r"norm_out\.linear", "norm_out/linear"),
    *_dense(r"proj_out", "proj_out"),
]

BD, BS = r"double_blocks\.(\d+)", r"single_blocks\.(\d+)"
_BFL_EMBEDDERS = {"time_in": "timestep", "vector_in": "text", "guidance_in": "guidance"}

BFL_RULES = [
    *_dense(r"img_in", "x_embedder"),
    *_dense(r"txt_in", "context_embedder"),
    *(
        rule
        for bfl, ours in _BFL_EMBEDDERS.items()
        for layer, index in (("in_layer", 1), ("out_layer", 2))
        for rule in _dense(rf"{bfl}\.{layer}", f"time_text_embed/{ours}_embedder/linear_{index}")
    ),
    *_dense(BD + r"\.img_mod\.lin", DOUBLE + "/norm1/linear"),
    *_dense(BD + r"\.txt_mod\.lin", DOUBLE + "/norm1_context/linear"),
    *_dense(BD + r"\.img_attn\.qkv", tuple(DOUBLE + f"/attn/{x}" for x in "qkv"), "fused_qkv_linear"),
    *_dense(BD + r"\.txt_attn\.qkv", tuple(DOUBLE + f"/attn_context/{x}" for x in "qkv"), "fused_qkv_linear"),
    _scale(BD + r"\.img_attn\.norm\.query_norm\.scale", DOUBLE + "/attn/norm_q"),
    _scale(BD + r"\.img_attn\.norm\.key_norm\.scale", DOUBLE + "/attn/norm_k"),
    _scale(BD + r"\.txt_attn\.norm\.query_norm\.scale", DOUBLE + "/attn_context/norm_q"),
    _scale(BD + r"\.txt_attn\.norm\.key_norm\.scale", DOUBLE + "/attn_context/norm_k"),
    *_dense(BD + r"\.img_attn\.proj", DOUBLE + "/to_out"),
    *_dense(BD + r"\.txt_attn\.proj", DOUBLE + "/to_add_out"),
    *_dense(BD + r"\.img_mlp\.0", DOUBLE + "/ff/proj_in"),
    *_dense(BD + r"\.img_mlp\.2", DOUBLE + "/ff/proj_out"),
    *_dense(BD + r"\.txt_mlp\.0", DOUBLE + "/ff_context/proj_in"),
    *_dense(BD + r"\.txt_mlp\.2", DOUBLE + "/ff_context/proj_out"),
    *_dense(BS + r"\.modulation\.lin", SINGLE + "/norm/linear"),
    *_dense(BS + r"\.linear1", tuple(SINGLE + f"/{x}" for x in ("attn/q", "attn/k", "attn/v", "proj_mlp")), "flux_linear1_linear"),
    _scale(BS + r"\.norm\.query_norm\.scale", SINGLE + "/attn/norm_q"),
    _scale(BS + r"\.norm\.key_norm\.scale", SINGLE + "/attn/norm_k"),
    *_dense(BS + r"\.linear2", SINGLE + "/proj_out"),
    *_dense(r"final_layer\.adaLN_modulation\.1", "norm_out/linear", "swap_halves_linear"),
    *_dense(r"final_layer\.linear", "proj_out"),
]


def is_bfl_checkpoint(checkpoint: Checkpoint) -> bool:
    return any(k.startswith(("double_blocks.", BFL_PREFIX + "double_blocks.")) for k in checkpoint.keys())


def strip_bfl_prefix(checkpoint: Checkpoint) -> Checkpoint:
    return checkpoint.renamed(lambda k: k[len(BFL_PREFIX) :] if k.startswith(BFL_PREFIX) else k)


def _block_count(checkpoint: Checkpoint, pattern: str) -> int:
    indices = {int(m.group(1)) for k in checkpoint.keys() if (m := re.match(pattern, k))}
    return max(indices) + 1 if indices else 0


def infer_bfl_config(checkpoint: Checkpoint) -> dict:
    """A diffusers-style config read off the shapes of a (prefix-stripped) BFL checkpoint."""
    required = ("img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "final_layer.linear.weight",
                "double_blocks.0.img_attn.norm.query_norm.scale")
    checkpoint.require(required, "a Flux (Black Forest Labs) checkpoint")
    dim, in_channels = checkpoint.shape("img_in.weight")
    head_dim = checkpoint.shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
    out_channels = checkpoint.shape("final_layer.linear.weight")[0]
    return dict(
        in_channels=in_channels,
        out_channels=None if out_channels == in_channels else out_channels,  # diffusers' "same as input"
        num_layers=_block_count(checkpoint, r"double_blocks\.(\d+)\."),
        num_single_layers=_block_count(checkpoint, r"single_blocks\.(\d+)\."),
        attention_head_dim=head_dim,
        num_attention_heads=dim // head_dim,
        joint_attention_dim=checkpoint.shape("txt_in.weight")[1],
        pooled_projection_dim=checkpoint.shape("vector_in.in_layer.weight")[1],
        guidance_embeds="guidance_in.in_layer.weight" in checkpoint,
        **({"axes_dims_rope": (16, 56, 56)} if head_dim == 128 else {}),
    )


def _model_inputs(model: FluxTransformer2DModel):
    """Smallest inputs that trace `model`, for the parameter shapes."""
    zeros = np.zeros
    return (
        zeros((1, 1, model.in_channels), np.float32),
        zeros((1, 1, model.joint_attention_dim), np.float32),
        zeros((1, model.pooled_projection_dim), np.float32),
        zeros((1,), np.float32),
        zeros((1, 3), np.float32),
        zeros((1, 3), np.float32),
        zeros((1,), np.float32) if model.guidance_embeds else None,
    )


def flux_params(checkpoint: Checkpoint, model: FluxTransformer2DModel, dtype="float32"):
    """Parameters of `model` from a diffusers-layout or BFL checkpoint (strict: ConversionError)."""
    if is_bfl_checkpoint(checkpoint):
        checkpoint, rules, what = strip_bfl_prefix(checkpoint), BFL_RULES, "Flux transformer (BFL single file)"
    else:
        rules, what = DIFFUSERS_RULES, "Flux transformer (diffusers)"
    shapes = target_shapes(model, *_model_inputs(model))
    return map_checkpoint(checkpoint, rules, shapes, dtype, what=f"{what} {checkpoint.description}",
                          stacks=model.layer_stacks)


def flux_param_location(name: str, model: FluxTransformer2DModel) -> tuple[str, int | None]:
    """A diffusers parameter name (`transformer_blocks.3.attn.to_q.weight`) -> (our parameter path,
    index along its leading layer axis, or None when not stacked); its layout is the rule's."""
    return param_location(name, DIFFUSERS_RULES, model.layer_stacks)


def open_transformer(path, config: dict | None, infer_single_file, model_name: str):
    """(checkpoint, config) of a diffusers repository, its `transformer/` folder (config.json,
    `config` entries overriding) or a single file in Black Forest Labs' naming (config read off
    its shapes by `infer_single_file`, completed or overridden by `config`; `model_name` says
    whose head size fixes the rotary axes). The config is None for a single file in another naming."""
    path = Path(path)
    if path.is_dir() and (path / "transformer").is_dir():
        path = path / "transformer"
    checkpoint = open_checkpoint(path)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.exists():
            raise ValueError(f"{path}: a diffusers transformer folder needs config.json")
        return checkpoint, {**json.loads(config_path.read_text()), **(config or {})}
    if not is_bfl_checkpoint(checkpoint):
        return checkpoint, None
    full_config = {**infer_single_file(strip_bfl_prefix(checkpoint)), **(config or {})}
    if "axes_dims_rope" not in full_config:
        raise ValueError(
            f"{path}: heads of size {full_config['attention_head_dim']} are not {model_name}'s; pass "
            "config={'axes_dims_rope': [...]} (rotary dimensions per position axis, summing to the head size)"
        )
    return checkpoint, full_config


def load_flux_transformer(path, dtype="float32", config: dict | None = None):
    """(module, params) from a diffusers repository, its `transformer/` folder, or a BFL single file.

    A folder must hold `config.json` (or `transformer/config.json`); `config` entries override it.
    A BFL single file is configured from its shapes (`infer_bfl_config`), completed or
    overridden by `config`; a single file in diffusers' naming needs `config`. The module
    computes and keeps its parameters in `dtype`.
    """
    checkpoint, full_config = open_transformer(path, config, infer_bfl_config, "FLUX.1")
    if full_config is None:
        if config is None:
            raise ValueError(f"{path}: a single file in diffusers' naming needs config= (its transformer/config.json "
                             "as a dict)")
        full_config = config
    jnp_dtype = parse_dtype(dtype)
    model = FluxTransformer2DModel.from_config(full_config, dtype=jnp_dtype, param_dtype=jnp_dtype)
    return model, flux_params(checkpoint, model, dtype)
