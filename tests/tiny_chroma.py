"""Tiny random Chroma transformers built with diffusers, saved as users have them, and the
PyTorch NAG reference of nag-semantics.md on Chroma's modules.

The reference follows the reference implementation's Flux structure (torch_flux_nag.py): the
negative text rows run through every block with their own text mask, image rows get NAG in
every joint attention, the single blocks run two copies of the image rows. Chroma's modulation
comes from the timestep alone, so the negative rows' modulation (the table rows of their image
row) equals the positive rows', and the two copies stay equal.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from diffusers import ChromaTransformer2DModel

from tiny_components import randomize_mmdit, save_tiny_t5, save_tiny_t5_tokenizer, save_tiny_vae
from tiny_flux_pipeline import LATENT_CHANNELS, SCHEDULERS, VAE_BLOCKS
from torch_flux_nag import reference_processors
from torch_nag import torch_nag

TINY_CONFIG = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
                   approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=2)
GRID, TEXT_TOKENS = 4, 6


def build_model(seed: int = 0, **config) -> ChromaTransformer2DModel:
    """A float32 diffusers model with every parameter drawn at random; `config` overrides TINY_CONFIG."""
    torch.manual_seed(seed)
    return randomize_mmdit(ChromaTransformer2DModel(**{**TINY_CONFIG, **config}).eval(), seed + 1)


def make_chroma_pipeline(folder) -> Path:
    """A ChromaPipeline folder as lodestones/Chroma1-HD lays it out (T5 in text_encoder/ with its
    tokenizer/, the Flux VAE, dynamic-shift flow-matching scheduler), one block of each kind."""
    folder = Path(folder)
    build_model(in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1).save_pretrained(
        folder / "transformer", safe_serialization=True, max_shard_size="100KB")
    save_tiny_vae(folder / "vae", latent_channels=LATENT_CHANNELS, block_out_channels=VAE_BLOCKS, norm_num_groups=4)
    save_tiny_t5_tokenizer(folder / "tokenizer")
    save_tiny_t5(folder / "text_encoder", d_model=TINY_CONFIG["joint_attention_dim"], num_layers=1, seed=2)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULERS["dev"], indent=2))
    index = {"_class_name": "ChromaPipeline", "_diffusers_version": "0.35.0",
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "ChromaTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def original_state_dict(model, prefix: str = "") -> dict:
    """The weights in the original Chroma single file's naming (chroma-unlocked / Chroma1-HD.safetensors):
    Black Forest Labs' blocks (tiny_flux.bfl_state_dict, which skips the absent modulation layers)
    and the approximator's `layers.N.in_layer/out_layer`, `norms.N.scale`."""
    from tiny_flux import bfl_state_dict

    out = bfl_state_dict(model, prefix)
    renames = ((r"\.linear_1\.", ".in_layer."), (r"\.linear_2\.", ".out_layer."), (r"(norms\.\d+)\.weight$", r"\1.scale"))
    for key, value in model.state_dict().items():
        if key.startswith("distilled_guidance_layer."):
            for pattern, original in renames:
                key = re.sub(pattern, original, key)
            out[prefix + key] = value.detach().clone().contiguous()
    return out


def make_inputs(rows: int, text_rows: int | None = None, seed: int = 0) -> dict:
    """numpy inputs; `text_mask` [text_rows, T] masks a different number of trailing tokens per row
    (Chroma's padding mask: real tokens and the first pad attend)."""
    text_rows = rows if text_rows is None else text_rows
    rng = np.random.default_rng(seed)
    ys, xs = np.meshgrid(np.arange(GRID), np.arange(GRID), indexing="ij")
    attended = [TEXT_TOKENS - 1 - (j % 3) for j in range(text_rows)]
    return dict(
        hidden_states=rng.standard_normal((rows, GRID * GRID, TINY_CONFIG["in_channels"])).astype(np.float32),
        encoder_hidden_states=rng.standard_normal((text_rows, TEXT_TOKENS, TINY_CONFIG["joint_attention_dim"])).astype(np.float32),
        timestep=rng.uniform(0.2, 1.0, rows).astype(np.float32),
        img_ids=np.stack([np.zeros(GRID * GRID), ys.ravel(), xs.ravel()], -1).astype(np.float32),
        txt_ids=np.zeros((TEXT_TOKENS, 3), np.float32),
        text_mask=(np.arange(TEXT_TOKENS)[None] < np.array(attended)[:, None]).astype(np.float32),
    )


def torch_forward(model, inputs: dict) -> np.ndarray:
    """diffusers' forward with the mask BOOLEAN (diffusers 0.42's pipeline passes it as float
    0/1, which its attention adds to the scores instead of masking: diffusers issues 11724, 12116)."""
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    mask = tensors.pop("text_mask").bool()
    rows, tokens = tensors["hidden_states"].shape[:2]
    full_mask = torch.cat([mask, torch.ones(rows, tokens, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        return model(**tensors, attention_mask=full_mask, return_dict=False)[0].numpy()


def reference_nag_forward(model, scale, tau, alpha, inputs: dict, norm="l1") -> np.ndarray:
    """Chroma NAG on numpy inputs with B image rows and text rows [pos (B); neg (B)]."""
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    rows, text_tokens = t["hidden_states"].shape[0], t["encoder_hidden_states"].shape[1]
    key_mask = torch.cat([t["text_mask"].bool(), torch.ones(2 * rows, t["hidden_states"].shape[1], dtype=torch.bool)], 1)
    nag = lambda z_pos, z_neg: torch_nag(z_pos, z_neg, scale, tau, alpha, norm)  # noqa: E731
    singles, doubles = len(model.single_transformer_blocks), len(model.transformer_blocks)
    with reference_processors(model, nag, text_tokens, key_mask), torch.no_grad():
        table = model.distilled_guidance_layer(model.time_text_embed(t["timestep"] * 1000)).tile(2, 1, 1)
        img = model.x_embedder(t["hidden_states"])
        txt = model.context_embedder(t["encoder_hidden_states"])
        rope = model.pos_embed(torch.cat([t["txt_ids"], t["img_ids"]]))
        for i, block in enumerate(model.transformer_blocks):
            image_at, text_at = 3 * singles + 6 * i, 3 * singles + 6 * doubles + 6 * i
            temb = torch.cat([table[:, image_at:image_at + 6], table[:, text_at:text_at + 6]], dim=1)
            txt, img = block(img, txt, temb, rope)
        joined = torch.cat([txt, img.tile(2, 1, 1)], dim=1)
        for i, block in enumerate(model.single_transformer_blocks):
            joined = block(joined, table[:, 3 * i:3 * i + 3], rope)
        return model.proj_out(model.norm_out(joined[:rows, text_tokens:], table[:rows, -2:])).numpy()
