"""The SANA family: diffusers' SanaPipeline and SanaSprintPipeline.

Gemma-2 prompt encoding as the pipelines do it: prompts lower-cased and stripped, the complex
human instruction (CHI) prepended, tokenized (right padding, with the mask) to the CHI's
length + max_sequence_length - 2, encoded, then the first token and the last
max_sequence_length - 1 kept. CFG's negative prompts are encoded without the CHI (diffusers);
NAG's negative prompts like the prompts (the reference pipelines call encode_prompt on them).
The mask travels with the text rows into every cross-attention. SANA samples with DPM-Solver++
on flow sigmas; SANA-Sprint with the SCM trigflow sampler (nag_jax/scm.py), its guidance_scale
an embedded (distilled) guidance, never CFG. DC-AE decoding. Sizes as given (no resolution binning).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from convert.checkpoint import parse_dtype
from convert.dc_ae import load_dc_ae
from convert.gemma import load_gemma2
from convert.sana import load_sana_transformer
from models.dc_ae import DCAutoencoder
from nag_jax.families.pixart import PixArtSigmaFamily, text_mask, use_transformer
from nag_jax.pipeline import Family, component_folder, read_json
from nag_jax.sampler import Conditioning
from nag_jax.scm import make_scm_schedule
from nag_jax.schedulers import make_schedule
from nag_jax.tokenize import load_tokenizer, tokenize

# diffusers' pipeline defaults; NAG: nag-semantics.md section 5 (SANA row).
SANA_DEFAULTS = {"guidance_scale": 4.5, "num_inference_steps": 20, "nag_scale": 5.0, "nag_tau": 2.5, "nag_alpha": 0.375}
SPRINT_DEFAULTS = dict(SANA_DEFAULTS, num_inference_steps=2)
MAX_SEQUENCE_LENGTH = 300
# SanaPipeline's default `complex_human_instruction` (the prefix the released models were trained with).
COMPLEX_HUMAN_INSTRUCTION = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for "
    "image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
)


class SanaFamily(Family):
    """SanaPipeline folders (SANA transformer, Gemma-2 text encoder, DC-AE)."""

    name = "SANA"
    defaults = SANA_DEFAULTS
    options = ("max_sequence_length", "complex_human_instruction")

    def __init__(self, transformer, vae, text_encoder, tokenizer, params, scheduler_config, dtype):
        self.transformer, self.vae, self.text_encoder, self.tokenizer = transformer, vae, text_encoder, tokenizer
        self.tokenizer.padding_side = "right"
        self.params = params["transformer"]
        self.text_encoder_params, self.vae_params = params["text_encoder"], params["vae"]
        self.scheduler_config, self.dtype = scheduler_config, dtype
        use_transformer(self, transformer, vae.config.spatial_compression_ratio)
        self._encode = jax.jit(lambda p, ids, mask: text_encoder.apply({"params": p}, ids, mask))
        self._decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=DCAutoencoder.decode))

    @classmethod
    def load(cls, path: Path, index: dict, dtype="float32"):
        dtype = jnp.dtype(parse_dtype(dtype))
        scheduler_config = read_json(component_folder(path, "scheduler") / "scheduler_config.json")
        transformer, transformer_params = load_sana_transformer(component_folder(path, "transformer"), dtype)
        vae, vae_params = load_dc_ae(component_folder(path, "vae"), dtype)
        text_encoder, text_encoder_params = load_gemma2(component_folder(path, "text_encoder"), dtype)
        tokenizer = load_tokenizer(component_folder(path, "tokenizer"))
        params = {"transformer": transformer_params, "vae": vae_params, "text_encoder": text_encoder_params}
        return cls(transformer, vae, text_encoder, tokenizer, params, scheduler_config, dtype)

    # -- conditioning ---------------------------------------------------------------------
    def uses_cfg(self, guidance_scale, options):
        return guidance_scale > 1.0

    def _gemma(self, prompts, options, instruction: bool) -> Conditioning:
        max_sequence_length = options.get("max_sequence_length")
        max_sequence_length = MAX_SEQUENCE_LENGTH if max_sequence_length is None else max_sequence_length
        if not isinstance(max_sequence_length, int) or not 2 <= max_sequence_length <= 4096:
            raise ValueError(f"max_sequence_length must be an integer in [2, 4096], got {max_sequence_length!r}")
        prompts = [p.lower().strip() for p in prompts]
        chi = options.get("complex_human_instruction")
        chi = COMPLEX_HUMAN_INSTRUCTION if chi is None else chi
        length = max_sequence_length
        if instruction and chi:
            prefix = "\n".join(chi)
            prompts = [prefix + p for p in prompts]
            length = len(self.tokenizer.encode(prefix)) + max_sequence_length - 2
        ids = tokenize(self.tokenizer, prompts, max_length=length)
        mask = text_mask(self.tokenizer, ids)
        context = self._encode(self.text_encoder_params, ids, mask).astype(self.dtype)
        if instruction:  # the first token and the last max_sequence_length - 1 (SANA paper section 3.1)
            keep = np.concatenate([[0], np.arange(length - max_sequence_length + 1, length)])
            context, mask = context[:, keep], mask[:, keep]
        return Conditioning(text={"context": context, "mask": jnp.asarray(mask)})

    def encode(self, prompts, options):
        return self._gemma(prompts, options, instruction=True)

    def encode_uncond(self, negatives, count, options):
        return self._gemma(negatives or [""] * count, options, instruction=False)

    # -- sampling -------------------------------------------------------------------------
    def make_schedule(self, num_inference_steps, height, width, options):
        return make_schedule(self.scheduler_config, num_inference_steps)

    def latent_shape(self, height, width):
        return (self.transformer.config.in_channels, height // self.vae_scale, width // self.vae_scale)

    def _timestep(self, timestep):
        return timestep * self.transformer.config.timestep_scale

    prepare = PixArtSigmaFamily.prepare  # the transformer's text part, the same two-part layout

    def denoise(self, params, model_input, timestep, conditioning):
        guidance = None if conditioning.image is None else conditioning.image.get("guidance")
        out = self._step_part.apply({"params": params}, model_input, conditioning.text, self._timestep(timestep),
                                    guidance)
        return out[:, : self.transformer.config.in_channels] if self.learned_sigma else out

    def decode(self, latents, height, width):
        images = self._decode(self.vae_params, (latents / self.vae.config.scaling_factor).astype(self.dtype))
        return np.asarray(jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1))


class SanaSprintFamily(SanaFamily):
    """SanaSprintPipeline folders: guidance-embedding transformer, SCM sampling in 1-4 steps."""

    name = "SANA-Sprint"
    defaults = SPRINT_DEFAULTS
    options = ("max_sequence_length", "complex_human_instruction", "max_timesteps", "intermediate_timesteps")
    option_defaults = {"max_timesteps": 1.57080, "intermediate_timesteps": 1.3}

    def uses_cfg(self, guidance_scale, options):
        return False  # guidance_scale is the embedded guidance

    def encode(self, prompts, options):
        encoded = super().encode(prompts, options)
        guidance = options["guidance_scale"] * self.transformer.config.guidance_embeds_scale
        return Conditioning(text=encoded.text, image={"guidance": jnp.full((len(prompts),), guidance, jnp.float32)})

    def make_schedule(self, num_inference_steps, height, width, options):
        return make_scm_schedule(self.scheduler_config, num_inference_steps, options["max_timesteps"],
                                 options["intermediate_timesteps"])

    def _timestep(self, timestep):
        return timestep / 1000.0  # the SCM schedule stores 1000 * s

    def decode(self, latents, height, width):
        return super().decode(latents / self.scheduler_config.get("sigma_data", 0.5), height, width)
