"""Tiny random Flux transformers built with diffusers, saved as users have them.

"schnell" has no guidance embedding, "dev" has one. Weights are redrawn at random (scaled by
1/sqrt(fan-in); QK-norm scales near 1) so every parameter moves the output visibly. The
transformer is saved sharded with an index (as published repositories are), and can be
rewritten in Black Forest Labs' single-file naming by `bfl_state_dict`.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FluxTransformer2DModel

from tiny_components import randomize_mmdit

TINY_CONFIG = dict(
    patch_size=1,
    in_channels=16,  # 4 latent channels packed 2x2
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=16,
    axes_dims_rope=(4, 6, 6),
)
GRID = 4  # packed image tokens per side
TEXT_TOKENS = 6


def build_model(guidance_embeds: bool, seed: int = 0, **config) -> FluxTransformer2DModel:
    """A float32 diffusers model in eval mode with every parameter drawn at random; `config`
    overrides TINY_CONFIG entries (e.g. in_channels=64 for a 16-channel VAE)."""
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**{**TINY_CONFIG, **config}, guidance_embeds=guidance_embeds).eval()
    return randomize_mmdit(model, seed + 1)


def save_sharded(model: FluxTransformer2DModel, folder) -> None:
    """`transformer/` as published: config.json, shards and diffusion_pytorch_model.safetensors.index.json."""
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="100KB")


def make_inputs(rows: int, text_rows: int | None = None, seed: int = 0, guidance: bool = False) -> dict:
    """diffusers-convention inputs as numpy float32; text_rows > rows adds negative-prompt rows."""
    text_rows = rows if text_rows is None else text_rows
    rng = np.random.default_rng(seed)
    ys, xs = np.meshgrid(np.arange(GRID), np.arange(GRID), indexing="ij")
    img_ids = np.stack([np.zeros(GRID * GRID), ys.ravel(), xs.ravel()], axis=-1).astype(np.float32)
    inputs = dict(
        hidden_states=rng.standard_normal((rows, GRID * GRID, TINY_CONFIG["in_channels"])).astype(np.float32),
        encoder_hidden_states=rng.standard_normal((text_rows, TEXT_TOKENS, TINY_CONFIG["joint_attention_dim"])).astype(np.float32),
        pooled_projections=rng.standard_normal((text_rows, TINY_CONFIG["pooled_projection_dim"])).astype(np.float32),
        timestep=rng.uniform(0.2, 1.0, rows).astype(np.float32),
        img_ids=img_ids,
        txt_ids=np.zeros((TEXT_TOKENS, 3), np.float32),
    )
    if guidance:
        inputs["guidance"] = rng.uniform(2.0, 4.0, rows).astype(np.float32)
    return inputs


def torch_forward(model: FluxTransformer2DModel, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, return_dict=False)[0]
    return out.numpy()


def relative_error(ours, ref) -> float:
    """max |ours - ref| over max |ref|: parity is <= 1e-4 in float32."""
    ref = np.asarray(ref, np.float32)
    return float(np.max(np.abs(np.asarray(ours, np.float32) - ref)) / np.max(np.abs(ref)))


def _fuse(*tensors):
    return torch.cat(tensors, dim=0)


def _swap_halves(t):
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def bfl_state_dict(model: FluxTransformer2DModel, prefix: str = "") -> dict:
    """The model's weights under Black Forest Labs' names (fused qkv, fused linear1, the final
    adaLN halves in [shift; scale] order), written independently of the converter under test."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {}

    def both(bfl, diffusers, fn=lambda t: t):
        if f"{diffusers}.weight" not in sd:  # Chroma's blocks have no modulation layers
            return
        for suffix in ("weight", "bias"):
            out[f"{bfl}.{suffix}"] = fn(sd[f"{diffusers}.{suffix}"])

    both("img_in", "x_embedder")
    both("txt_in", "context_embedder")
    for bfl, ours in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"), ("guidance_in", "guidance_embedder")):
        if f"time_text_embed.{ours}.linear_1.weight" in sd:
            both(f"{bfl}.in_layer", f"time_text_embed.{ours}.linear_1")
            both(f"{bfl}.out_layer", f"time_text_embed.{ours}.linear_2")
    for i in range(model.config.num_layers):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        both(f"{b}.img_mod.lin", f"{d}.norm1.linear")
        both(f"{b}.txt_mod.lin", f"{d}.norm1_context.linear")
        for suffix in ("weight", "bias"):
            out[f"{b}.img_attn.qkv.{suffix}"] = _fuse(*(sd[f"{d}.attn.to_{x}.{suffix}"] for x in "qkv"))
            out[f"{b}.txt_attn.qkv.{suffix}"] = _fuse(*(sd[f"{d}.attn.add_{x}_proj.{suffix}"] for x in "qkv"))
        for bfl, ours in (("query_norm", "q"), ("key_norm", "k")):
            out[f"{b}.img_attn.norm.{bfl}.scale"] = sd[f"{d}.attn.norm_{ours}.weight"]
            out[f"{b}.txt_attn.norm.{bfl}.scale"] = sd[f"{d}.attn.norm_added_{ours}.weight"]
        both(f"{b}.img_attn.proj", f"{d}.attn.to_out.0")
        both(f"{b}.txt_attn.proj", f"{d}.attn.to_add_out")
        for stream, ff in (("img", "ff"), ("txt", "ff_context")):
            both(f"{b}.{stream}_mlp.0", f"{d}.{ff}.net.0.proj")
            both(f"{b}.{stream}_mlp.2", f"{d}.{ff}.net.2")
    for i in range(model.config.num_single_layers):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for suffix in ("weight", "bias"):
            out[f"{b}.linear1.{suffix}"] = _fuse(*(sd[f"{d}.attn.to_{x}.{suffix}"] for x in "qkv"), sd[f"{d}.proj_mlp.{suffix}"])
        out[f"{b}.norm.query_norm.scale"] = sd[f"{d}.attn.norm_q.weight"]
        out[f"{b}.norm.key_norm.scale"] = sd[f"{d}.attn.norm_k.weight"]
        both(f"{b}.linear2", f"{d}.proj_out")
        both(f"{b}.modulation.lin", f"{d}.norm.linear")
    both("final_layer.linear", "proj_out")
    both("final_layer.adaLN_modulation.1", "norm_out.linear", _swap_halves)
    return {prefix + k: v.contiguous() for k, v in out.items()}
