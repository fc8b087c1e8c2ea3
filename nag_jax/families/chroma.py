"""The Chroma family (lodestones/Chroma1-HD and other `ChromaPipeline` folders).

Mirrors diffusers' `ChromaPipeline`, on Flux's latents, packing, schedule and VAE
(families/flux.py): T5 is the only text encoder and runs with its padding masked; the
transformer then masks the padding in every joint attention except the first pad token (the
official Chroma code and ComfyUI). diffusers 0.42 passes that mask as a float 0/1 tensor that
its attention ADDS to the scores, so stock diffusers does not mask the padding there (its issues
11724, 12116, 13619): nag-jax's images differ from stock diffusers' by that, and equal diffusers'
with the mask made boolean. `guidance_scale` is real CFG (on when > 1; uncond rows from
`negative_prompt`, or "").

NAG as Flux's joint attention: the negative prompt's T5 rows, with their own mask, run through
every block; image rows get NAG. Chroma's modulation depends on the timestep alone, so the
negative text rows are modulated exactly as the positive ones, and the two `nag_mode`s of Flux
coincide: Chroma has one.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from convert.checkpoint import parse_dtype
from convert.chroma import load_chroma_transformer
from convert.t5 import load_t5
from convert.vae import load_vae
from nag_jax.families.flux import DEFAULT_SAMPLE_SIZE, MAX_SEQUENCE_LENGTH, FluxFamily, image_ids
from nag_jax.pipeline import component_folder, read_json
from nag_jax.sampler import Conditioning
from nag_jax.tokenize import load_tokenizer, tokenize

# diffusers' ChromaPipeline call defaults (real CFG 5.0, 35 steps); NAG as Flux (nag-semantics.md section 5)
CHROMA_DEFAULTS = {"guidance_scale": 5.0, "num_inference_steps": 35, "nag_scale": 5.0, "nag_tau": 2.5,
                   "nag_alpha": 0.25}


def transformer_text_mask(tokens_attended: np.ndarray) -> np.ndarray:
    """T5's padding mask [B, T] -> the transformer's: the real tokens and the first pad token."""
    lengths = tokens_attended.sum(axis=1, keepdims=True)
    return (np.arange(tokens_attended.shape[1])[None] <= lengths).astype(np.float32)


class ChromaFamily(FluxFamily):
    """ChromaPipeline folders. Own option: `max_sequence_length` (T5 tokens, default 512)."""

    options = ("max_sequence_length",)
    cfg_argument = "guidance_scale"
    option_defaults = {"max_sequence_length": MAX_SEQUENCE_LENGTH}
    name = "Chroma"
    defaults = CHROMA_DEFAULTS
    has_guidance = False

    def __init__(self, transformer, vae, t5, tokenizer, params, scheduler_config, dtype):
        self.transformer, self.vae, self.tokenizer = transformer, vae, tokenizer
        self.params, self.t5_params, self.vae_params = params["transformer"], params["t5"], params["vae"]
        self.stacked_params = tuple(stack.path for stack in transformer.layer_stacks)
        self.scheduler_config, self.dtype = scheduler_config, dtype
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.size_multiple = 2 * self.vae_scale
        self.height = self.width = DEFAULT_SAMPLE_SIZE * self.vae_scale
        self._t5_text = jax.jit(lambda p, ids, mask: t5.apply({"params": p}, ids, mask))
        self._decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))

    @classmethod
    def load(cls, path: Path, index: dict, dtype="float32"):
        dtype = jnp.dtype(parse_dtype(dtype))
        transformer, transformer_params = load_chroma_transformer(component_folder(path, "transformer"), dtype)
        vae, vae_params = load_vae(component_folder(path, "vae"), dtype=dtype)
        t5, t5_params = load_t5(component_folder(path, "text_encoder"), dtype=dtype)
        tokenizer = load_tokenizer(component_folder(path, "tokenizer"))
        scheduler_config = read_json(component_folder(path, "scheduler") / "scheduler_config.json")
        params = {"transformer": transformer_params, "vae": vae_params, "t5": t5_params}
        return cls(transformer, vae, t5, tokenizer, params, scheduler_config, dtype)

    def uses_cfg(self, guidance_scale, options):
        length = options["max_sequence_length"]
        if not isinstance(length, int) or isinstance(length, bool) or not 2 <= length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(f"max_sequence_length must be an integer in [2, {MAX_SEQUENCE_LENGTH}], got {length!r}")
        return guidance_scale > 1.0

    def encode(self, prompts, options):
        ids = tokenize(self.tokenizer, prompts, max_length=options["max_sequence_length"])
        attended = (ids != self.tokenizer.pad_token_id).astype(np.int32)  # T5 pads on the right with pad_token_id
        text = {"context": self._t5_text(self.t5_params, ids, attended).astype(self.dtype),
                "mask": jnp.asarray(transformer_text_mask(attended))}
        tokens = image_ids(*self._latent_grid(options["height"], options["width"]))
        return Conditioning(text=text, image={"img_ids": jnp.tile(tokens[None], (len(prompts), 1, 1))})

    def denoise(self, params, model_input, timestep, conditioning):
        text, image = conditioning.text, conditioning.image
        sigma = jnp.broadcast_to(timestep, (model_input.shape[0],)).astype(model_input.dtype) / 1000
        txt_ids = jnp.zeros((text["context"].shape[1], 3), jnp.float32)
        return self.transformer.apply({"params": params}, model_input, text["context"], sigma, image["img_ids"][0],
                                      txt_ids, attention_mask=text["mask"])
