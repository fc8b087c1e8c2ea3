"""Tiny random FLUX.1-schnell-like and FLUX.1-dev-like pipeline folders, laid out as published.

Components come from the fixture builders: CLIP (`text_model.` keys, vocab.json/merges.txt
tokenizer), T5 (sharded, `tokenizer_2` with spiece.model and tokenizer.json), the transformer
sharded with its index (tiny_flux), a 16-channel VAE with shift_factor. model_index.json and
the scheduler config are written by hand as the published repositories carry them: schnell
with a static shift of 1, dev with use_dynamic_shifting and guidance embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

import tiny_flux
from tiny_components import CLIP_VOCAB_SIZE, save_tiny_clip, save_tiny_clip_tokenizer, save_tiny_t5, save_tiny_t5_tokenizer, save_tiny_vae

LATENT_CHANNELS = 16
VAE_BLOCKS = (8, 16)  # images are 2x the latents: 32x32 images -> 16x16 latents -> 8x8 packed tokens
MAX_SEQUENCE_LENGTH = 16  # T5 tokens in the tests (the pipelines' default is 512)

_SCHEDULER_COMMON = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
                     "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                     "num_train_timesteps": 1000}
SCHEDULERS = {
    "schnell": {**_SCHEDULER_COMMON, "shift": 1.0, "use_dynamic_shifting": False},
    "dev": {**_SCHEDULER_COMMON, "shift": 3.0, "use_dynamic_shifting": True},
}
SCHEDULERS["kontext"] = SCHEDULERS["dev"]  # FLUX.1-Kontext-dev's scheduler config is dev's
PIPELINE_CLASSES = {"schnell": "FluxPipeline", "dev": "FluxPipeline", "kontext": "FluxKontextPipeline"}


def make_flux_pipeline(folder, kind: str = "schnell", sample_size: int | None = None,
                       t5_model_max_length: int = 512) -> Path:
    """kind: "schnell" (no guidance embedding), "dev" (guidance embedding, dynamic shift) or
    "kontext" (dev's layout, a FluxKontextPipeline folder).
    `sample_size` (latent pixels per side) goes into transformer/config.json as the embedded
    flux-shapes model carries it; `t5_model_max_length` into tokenizer_2's tokenizer_config.json."""
    folder = Path(folder)
    # one block of each kind (the pipeline tests compile several sampling loops; each costs per block)
    transformer = tiny_flux.build_model(guidance_embeds=kind != "schnell", in_channels=4 * LATENT_CHANNELS,
                                        num_layers=1, num_single_layers=1)
    if sample_size is not None:
        transformer.register_to_config(sample_size=sample_size)
    tiny_flux.save_sharded(transformer, folder / "transformer")
    save_tiny_vae(folder / "vae", latent_channels=LATENT_CHANNELS, block_out_channels=VAE_BLOCKS, norm_num_groups=4)
    save_tiny_clip_tokenizer(folder / "tokenizer")
    save_tiny_clip(folder / "text_encoder", hidden_size=tiny_flux.TINY_CONFIG["pooled_projection_dim"],
                   num_attention_heads=2, num_hidden_layers=2, vocab_size=CLIP_VOCAB_SIZE, seed=1)
    save_tiny_t5_tokenizer(folder / "tokenizer_2", model_max_length=t5_model_max_length)
    save_tiny_t5(folder / "text_encoder_2", d_model=tiny_flux.TINY_CONFIG["joint_attention_dim"], num_layers=1,
                 sharded=True, seed=2)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULERS[kind], indent=2))
    index = {"_class_name": PIPELINE_CLASSES[kind], "_diffusers_version": "0.30.0.dev0",
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
