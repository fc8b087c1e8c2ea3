"""The PixArt-Sigma family: diffusers' PixArtSigmaPipeline.

T5 prompt encoding with the attention mask (max_sequence_length 300 tokens; prompts lower-cased
and stripped, diffusers' processing without `clean_caption`), the PixArt transformer (its
learned-sigma half of the output dropped, as the pipeline does), DPM-Solver++ from the folder's
scheduler config, SDXL-style VAE decoding. The text mask travels with the text rows, so NAG's
negative rows carry their own mask into every cross-attention (nag-semantics.md section 2). The
caption's projection and every block's cross-attention keys and values are computed once per
sampling run (`prepare`, the transformer's text part), not at every step.
Height and width are used as given (diffusers' `use_resolution_binning=False`).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from convert.checkpoint import parse_dtype
from convert.pixart import load_pixart_transformer
from convert.t5 import load_t5
from convert.vae import load_vae
from models.vae import model_to_latents
from nag_jax.pipeline import Family, component_folder, read_json, with_scheduler
from nag_jax.sampler import Conditioning
from nag_jax.schedulers import make_schedule
from nag_jax.tokenize import load_tokenizer, tokenize

# diffusers' PixArtSigmaPipeline defaults; NAG: nag-semantics.md section 5 (PixArt-Sigma row).
PIXART_DEFAULTS = {"guidance_scale": 4.5, "num_inference_steps": 20, "nag_scale": 5.0, "nag_tau": 2.5,
                   "nag_alpha": 0.375}
MAX_SEQUENCE_LENGTH = 300


def text_mask(tokenizer, ids: np.ndarray) -> np.ndarray:
    """1.0 for the prompt's tokens (its end-of-sequence token included), 0.0 for padding."""
    return (ids != tokenizer.pad_token_id).astype(np.float32)


def use_transformer(family, transformer, vae_scale: int) -> None:
    """What PixArt and SANA families derive alike from their two-part transformer and VAE scale:
    sizes, the learned-sigma cut, the scanned stacks and the text / step parts."""
    config = transformer.config
    family.vae_scale = vae_scale
    family.size_multiple = vae_scale * config.patch_size
    family.height = family.width = config.sample_size * vae_scale
    # diffusers keeps the first half of a learned-sigma output (out_channels = 2 * in_channels)
    family.learned_sigma = config.output_channels // 2 == config.in_channels
    family.stacked_params = tuple(stack.path for stack in transformer.layer_stacks)
    family._text_part, family._step_part = transformer.parts()


def decode_images(family, latents) -> np.ndarray:
    """VAE-decoded latents -> float32 images [B, H, W, 3] in [0, 1] (`family._decode`, `family.vae`)."""
    images = family._decode(family.vae_params, model_to_latents(family.vae.config, latents).astype(family.dtype))
    return np.asarray(jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1))


class PixArtSigmaFamily(Family):
    """PixArtSigmaPipeline folders (PixArt transformer, T5 encoder, AutoencoderKL)."""

    name = "PixArt-Sigma"
    defaults = PIXART_DEFAULTS
    options = ("max_sequence_length", "timesteps")

    def __init__(self, transformer, vae, t5, tokenizer, params, scheduler_config, dtype):
        self.transformer, self.vae, self.t5, self.tokenizer = transformer, vae, t5, tokenizer
        self.params = params["transformer"]
        self.t5_params, self.vae_params = params["t5"], params["vae"]
        self.scheduler_config, self.dtype = scheduler_config, dtype
        config = transformer.config
        if config.additional_conditions:
            raise ValueError("the transformer config asks for resolution/aspect-ratio conditions "
                             "(use_additional_conditions, PixArt-alpha), which PixArtSigmaPipeline does not pass")
        use_transformer(self, transformer, 2 ** (len(vae.config.block_out_channels) - 1))
        self._t5 = jax.jit(lambda p, ids, mask: t5.apply({"params": p}, ids, mask))
        self._decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))

    @classmethod
    def load(cls, path: Path, index: dict, dtype="float32", scheduler: str | None = None):
        dtype = jnp.dtype(parse_dtype(dtype))
        scheduler_config = read_json(component_folder(path, "scheduler") / "scheduler_config.json")
        scheduler_config = with_scheduler(scheduler_config, scheduler)
        transformer, transformer_params = load_pixart_transformer(component_folder(path, "transformer"), dtype)
        vae, vae_params = load_vae(component_folder(path, "vae"), dtype=dtype)
        t5, t5_params = load_t5(component_folder(path, "text_encoder"), dtype=dtype)
        tokenizer = load_tokenizer(component_folder(path, "tokenizer"))
        params = {"transformer": transformer_params, "vae": vae_params, "t5": t5_params}
        return cls(transformer, vae, t5, tokenizer, params, scheduler_config, dtype)

    # -- conditioning ---------------------------------------------------------------------
    def uses_cfg(self, guidance_scale, options):
        return guidance_scale > 1.0

    def encode(self, prompts, options):
        max_sequence_length = options.get("max_sequence_length")
        max_sequence_length = MAX_SEQUENCE_LENGTH if max_sequence_length is None else max_sequence_length
        if not isinstance(max_sequence_length, int) or not 2 <= max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be an integer in [2, 512], got {max_sequence_length!r}")
        ids = tokenize(self.tokenizer, [p.lower().strip() for p in prompts], max_length=max_sequence_length)
        mask = text_mask(self.tokenizer, ids)
        context = self._t5(self.t5_params, ids, mask).astype(self.dtype)
        return Conditioning(text={"context": context, "mask": jnp.asarray(mask)})

    # -- sampling -------------------------------------------------------------------------
    def make_schedule(self, num_inference_steps, height, width, options):
        return make_schedule(self.scheduler_config, num_inference_steps, timesteps=options.get("timesteps"))

    def latent_shape(self, height, width):
        return (self.transformer.config.in_channels, height // self.vae_scale, width // self.vae_scale)

    def prepare(self, params, conditioning):
        text = self._text_part.apply({"params": params}, conditioning.text["context"], conditioning.text["mask"])
        return conditioning.replace(text=text)

    def denoise(self, params, model_input, timestep, conditioning):
        out = self._step_part.apply({"params": params}, model_input, conditioning.text, timestep)
        return out[:, : self.transformer.config.in_channels] if self.learned_sigma else out

    def decode(self, latents, height, width):
        return decode_images(self, latents)
