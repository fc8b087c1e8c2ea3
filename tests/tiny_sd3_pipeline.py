"""A tiny random SD3.5-Large-like pipeline folder, laid out as the published repositories.

Components: CLIP-L and CLIP-G with projection (`text_model.` prefix), their tokenizers as
vocab.json/merges.txt (tokenizer_2 pads with "!", as SD3's CLIP-G tokenizer), a T5 encoder
with spiece.model + tokenizer.json, the transformer (RMS QK-norm) sharded with an index, a
16-channel VAE with shift_factor, FlowMatchEulerDiscreteScheduler with shift 3.0, and
model_index.json written by hand. The transformer's widths follow the encoders: context width
= T5 d_model (wider than the two CLIP widths together, so the CLIP part is zero-padded),
pooled width = the two CLIP projections together.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from transformers import AutoTokenizer

from tiny_components import (randomize_mmdit, save_sharded, save_tiny_clip, save_tiny_clip_tokenizer, save_tiny_t5,
                             save_tiny_t5_tokenizer, save_tiny_vae)

CLIP_L = dict(hidden_size=8, num_attention_heads=2, projection_dim=8)
CLIP_G = dict(hidden_size=16, num_attention_heads=4, projection_dim=12)
T5_WIDTH = 32
TRANSFORMER = dict(
    sample_size=16,  # default image 32 x 32 with the 2x VAE below
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=2,  # one full joint block, then the context_pre_only last block
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=T5_WIDTH,
    caption_projection_dim=32,
    pooled_projection_dim=CLIP_L["projection_dim"] + CLIP_G["projection_dim"],
    pos_embed_max_size=16,
    qk_norm="rms_norm",
)


def random_transformer(seed: int, qk_norm: str | None = "rms_norm") -> SD3Transformer2DModel:
    """Every parameter redrawn (1/sqrt(fan-in); QK-norm scales near 1) so all of them, the
    modulations included, move the images visibly. qk_norm=None: SD3-Medium-like."""
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**dict(TRANSFORMER, qk_norm=qk_norm)).eval()
    return randomize_mmdit(model, seed + 1)


def make_sd3_pipeline(folder, qk_norm: str | None = "rms_norm") -> Path:
    folder = Path(folder)
    transformer = random_transformer(seed=5, qk_norm=qk_norm)
    transformer.save_config(str(folder / "transformer"))
    state = {k: v.detach().contiguous() for k, v in transformer.state_dict().items()}
    save_sharded(state, folder / "transformer", prefix="diffusion_pytorch_model")
    save_tiny_vae(folder / "vae", latent_channels=16, block_out_channels=(8, 16), norm_num_groups=4)

    save_tiny_clip_tokenizer(folder / "tokenizer")
    save_tiny_clip_tokenizer(folder / "tokenizer_2", pad_token="!")
    vocab = len(AutoTokenizer.from_pretrained(str(folder / "tokenizer")))
    save_tiny_clip(folder / "text_encoder", projection=True, vocab_size=vocab, seed=1, **CLIP_L)
    save_tiny_clip(folder / "text_encoder_2", projection=True, vocab_size=vocab, seed=2, **CLIP_G)
    save_tiny_t5_tokenizer(folder / "tokenizer_3")
    save_tiny_t5(folder / "text_encoder_3", d_model=T5_WIDTH, seed=3)

    scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.42.1",
                 "num_train_timesteps": 1000, "shift": 3.0}
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {
        "_class_name": "StableDiffusion3Pipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": [None, None],
        "feature_extractor": [None, None],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
