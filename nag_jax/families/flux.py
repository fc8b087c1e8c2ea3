"""The Flux family: FLUX.1-schnell and FLUX.1-dev (and checkpoints of the same architecture).

Mirrors diffusers' `FluxPipeline`: the CLIP text encoder gives only its pooled output (the
state at the end-of-text token, `pooler_output`), T5 gives the token context
(`max_sequence_length` tokens, default 512, or the T5 tokenizer's `model_max_length` when that
is smaller: Flux has no text mask, so a model trained on short contexts must not see hundreds of
pad tokens it never saw); latents are 2x2-packed into tokens [B, N, 64]
with position ids (0, row, column) per token and zero ids for the text tokens; the timestep
reaches the model as t / 1000 = sigma; the schedule is flow-matching Euler on the sigmas
linspace(1, 1/n, n), shifted statically (schnell) or by the resolution-dependent mu (dev).

Guidance, as in diffusers:
- `guidance_scale` is dev's *distilled* guidance: a per-image input of the transformer when it
  has guidance embeddings (ignored by schnell). It never switches CFG on.
- `true_cfg_scale` with a `negative_prompt` is real CFG (uncond rows from the negative prompt).
- NAG: the pooled embedding and the T5 context are both text-stream conditioning, so the
  negative prompt's rows of both are appended; the model conditions text row j on pooled row j.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from convert.checkpoint import parse_dtype
from convert.clip import load_clip
from convert.flux import load_flux_transformer
from convert.t5 import load_t5
from convert.vae import load_vae
from models.vae import model_to_latents
from nag_jax.intercept import NAG_MODES
from nag_jax.pipeline import Family, check_argument, component_folder, read_json
from nag_jax.sampler import Conditioning
from nag_jax.schedulers import flux_mu, flux_sigmas, make_schedule
from nag_jax.tokenize import load_tokenizer, tokenize

# nag-semantics.md section 5 (Flux row); steps and guidance as diffusers documents the models:
# dev 28 steps with distilled guidance 3.5 (FluxPipeline's defaults), schnell 4 steps without guidance.
# true_cfg_scale: the scale to use where true CFG is asked for (demo, efficacy), as nag_scale is NAG's;
# the call's own default stays 1.0 (off). diffusers documents no such value for FLUX.1; 4.0 is ours.
_FLUX_NAG = {"nag_scale": 5.0, "nag_tau": 2.5, "nag_alpha": 0.25, "true_cfg_scale": 4.0}
DEV_DEFAULTS = {"guidance_scale": 3.5, "num_inference_steps": 28, **_FLUX_NAG}
SCHNELL_DEFAULTS = {"guidance_scale": 0.0, "num_inference_steps": 4, **_FLUX_NAG}
# latent pixels per side (diffusers' default_sample_size: 1024x1024 images with FLUX.1's VAE), unless
# transformer/config.json says "sample_size" (the embedded flux-shapes model: 16, 64x64 images)
DEFAULT_SAMPLE_SIZE = 128
MAX_SEQUENCE_LENGTH = 512  # T5 tokens, diffusers' default and limit


def pack_latents(latents):
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: each 2x2 patch becomes one token (diffusers' layout)."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens, height: int, width: int):
    """The inverse of `pack_latents` for latents of `height` x `width`."""
    b, _, channels = tokens.shape
    patches = tokens.reshape(b, height // 2, width // 2, channels // 4, 2, 2)
    return patches.transpose(0, 3, 1, 4, 2, 5).reshape(b, channels // 4, height, width)


def image_ids(height: int, width: int) -> np.ndarray:
    """Position ids [(height)(width), 3] of the packed tokens: (0, row, column)."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([np.zeros_like(rows), rows, cols], axis=-1).reshape(-1, 3).astype(np.float32)


class FluxFamily(Family):
    """FLUX.1 pipelines (diffusers' FluxPipeline folders).

    Own options: `true_cfg_scale` (real CFG with `negative_prompt`, default 1.0 = off),
    `max_sequence_length` (T5 tokens, at most 512; default 512, or the T5 tokenizer's
    model_max_length when smaller) and `nag_mode`:

    - "reference" (the default): what the PyTorch reference computes, two image copies in the
      single-stream blocks (nag_jax/flux_modes.py). Users compare our images with theirs, and the
      fast mode is not close enough to be the default: on a small random Flux transformer its
      output differed from the reference's by 0.034 of the output scale while NAG itself moved
      it by 0.094; on the tiny pipeline of tests/test_pipeline_flux.py (2 steps) the images
      differ by 0.010 while NAG moves them by 0.023. A third to a half of NAG's own effect is
      not an approximation to impose silently.
    - "shared-image": one image stream everywhere; only the negative text rows are extra. It
      equals "reference" when the positive and negative pooled embeddings are equal, and is
      cheaper: +28% time over plain sampling against +79% for "reference" (reduced CPU
      config). Choose it for speed.
    """

    options = ("nag_mode", "true_cfg_scale", "max_sequence_length")
    cfg_argument = "true_cfg_scale"
    option_defaults = {"nag_mode": "reference", "true_cfg_scale": 1.0, "max_sequence_length": MAX_SEQUENCE_LENGTH}

    def __init__(self, transformer, vae, clip, t5, tokenizers, params, scheduler_config, sample_size, dtype):
        self.transformer, self.vae, self.tokenizers = transformer, vae, tokenizers
        self.params = params["transformer"]
        self.stacked_params = tuple(stack.path for stack in transformer.layer_stacks)
        self.clip_params, self.t5_params, self.vae_params = params["clip"], params["t5"], params["vae"]
        self.scheduler_config, self.dtype = scheduler_config, dtype
        self.has_guidance = transformer.guidance_embeds
        self.name = "Flux dev" if self.has_guidance else "Flux schnell"
        self.defaults = DEV_DEFAULTS if self.has_guidance else SCHNELL_DEFAULTS
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.size_multiple = 2 * self.vae_scale  # latents are packed in 2x2 patches
        self.height = self.width = sample_size * self.vae_scale
        self.option_defaults = dict(self.option_defaults, max_sequence_length=min(
            MAX_SEQUENCE_LENGTH, tokenizers[1].model_max_length))
        self._pooled_text = jax.jit(lambda p, ids: clip.apply({"params": p}, ids).pooled)
        self._t5_text = jax.jit(lambda p, ids: t5.apply({"params": p}, ids))
        self._decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))

    @classmethod
    def load(cls, path: Path, index: dict, dtype="float32"):
        dtype = jnp.dtype(parse_dtype(dtype))
        transformer_folder = component_folder(path, "transformer")
        transformer, transformer_params = load_flux_transformer(transformer_folder, dtype)
        sample_size = read_json(transformer_folder / "config.json").get("sample_size", DEFAULT_SAMPLE_SIZE)
        vae, vae_params = load_vae(component_folder(path, "vae"), dtype=dtype)
        clip, clip_params = load_clip(component_folder(path, "text_encoder"), dtype=dtype)
        t5, t5_params = load_t5(component_folder(path, "text_encoder_2"), dtype=dtype)
        tokenizers = [load_tokenizer(component_folder(path, name)) for name in ("tokenizer", "tokenizer_2")]
        scheduler_config = read_json(component_folder(path, "scheduler") / "scheduler_config.json")
        params = {"transformer": transformer_params, "vae": vae_params, "clip": clip_params, "t5": t5_params}
        return cls(transformer, vae, clip, t5, tokenizers, params, scheduler_config, sample_size, dtype)

    # -- conditioning ---------------------------------------------------------------------
    def uses_cfg(self, guidance_scale, options):
        # the first family hook of every call: check the family's own options here
        if options["nag_mode"] not in NAG_MODES:
            raise ValueError(f"nag_mode must be one of {', '.join(NAG_MODES)}, got {options['nag_mode']!r}")
        length = options["max_sequence_length"]
        if not isinstance(length, int) or isinstance(length, bool) or not 2 <= length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(f"max_sequence_length must be an integer in [2, {MAX_SEQUENCE_LENGTH}], got {length!r}")
        true_cfg_scale = check_argument("true_cfg_scale", options["true_cfg_scale"])
        return true_cfg_scale > 1.0 and options["negative_prompt"] is not None

    def pooled_embeddings(self, prompts):
        """CLIP's pooled output [B, pooled_projection_dim] (diffusers' `pooler_output`)."""
        return self._pooled_text(self.clip_params, tokenize(self.tokenizers[0], prompts))

    def encode(self, prompts, options):
        ids = tokenize(self.tokenizers[1], prompts, max_length=options["max_sequence_length"])
        text = {"context": self._t5_text(self.t5_params, ids).astype(self.dtype),
                "pooled": self.pooled_embeddings(prompts).astype(self.dtype)}
        tokens = image_ids(*self._latent_grid(options["height"], options["width"]))
        # img_ids ride with each image row (the same for all) so a compiled loop never holds stale ones
        image = {"img_ids": jnp.tile(tokens[None], (len(prompts), 1, 1))}
        if self.has_guidance:
            image["guidance"] = jnp.full((len(prompts),), options["guidance_scale"], jnp.float32)
        return Conditioning(text=text, image=image)

    # -- sampling -------------------------------------------------------------------------
    def _latent_grid(self, height, width):
        """Packed tokens per column and per row."""
        return height // self.size_multiple, width // self.size_multiple

    def make_schedule(self, num_inference_steps, height, width, options):
        config = self.scheduler_config
        rows, cols = self._latent_grid(height, width)
        mu = flux_mu(rows * cols, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                     config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        sigmas = None if config.get("use_flow_sigmas") else flux_sigmas(num_inference_steps)
        return make_schedule(config, num_inference_steps, sigmas=sigmas, mu=mu)

    def latent_shape(self, height, width):
        rows, cols = self._latent_grid(height, width)
        return (rows * cols, self.transformer.in_channels)

    def denoise(self, params, model_input, timestep, conditioning):
        text, image = conditioning.text, conditioning.image
        rows = model_input.shape[0]
        sigma = jnp.broadcast_to(timestep, (rows,)).astype(model_input.dtype) / 1000  # as diffusers feeds it
        txt_ids = jnp.zeros((text["context"].shape[1], 3), jnp.float32)
        return self.transformer.apply(
            {"params": params}, model_input, text["context"], text["pooled"], sigma, image["img_ids"][0], txt_ids,
            guidance=image.get("guidance"),
        )

    def decode(self, latents, height, width):
        latents = unpack_latents(latents, height // self.vae_scale, width // self.vae_scale)
        images = self._decode(self.vae_params, model_to_latents(self.vae.config, latents).astype(self.dtype))
        return np.asarray(jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1))
