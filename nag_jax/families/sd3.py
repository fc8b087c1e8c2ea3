"""The SD3 / SD3.5 family: SD3-Medium, SD3.5-Large, SD3.5-Large-Turbo, SD3.5-Medium.

Mirrors diffusers' StableDiffusion3Pipeline: three text encoders. CLIP-L and CLIP-G (both
with projection) give their penultimate hidden states (earlier with `clip_skip`),
concatenated on features and zero-padded to T5's width; T5 gives `max_sequence_length`
tokens (zeros when the pipeline has no text_encoder_3). The context is [CLIP; T5] along
tokens; the pooled embedding is the two CLIP projections side by side. Both are text-stream
conditioning: the MM-DiT modulates text row j by pooled row j, so the NAG negative rows carry
their own pooled embedding. CFG (guidance_scale > 1) encodes "" when no negative prompt is
given. Flow-matching Euler schedule, timestep 1000 * sigma, 16-channel VAE with shift.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from convert.checkpoint import parse_dtype
from convert.clip import load_clip
from convert.sd3 import load_sd3_transformer
from convert.t5 import load_t5
from convert.vae import load_vae
from models.vae import model_to_latents
from nag_jax.pipeline import Family, component_folder, read_json
from nag_jax.sampler import Conditioning
from nag_jax.schedulers import flux_mu, make_schedule
from nag_jax.tokenize import load_tokenizer, tokenize

# diffusers' StableDiffusion3Pipeline defaults; NAG: nag-semantics.md section 5, SD3.5-Large.
SD3_DEFAULTS = {"guidance_scale": 7.0, "num_inference_steps": 28, "nag_scale": 5.0, "nag_tau": 2.5, "nag_alpha": 0.125}
MAX_SEQUENCE_LENGTH = 256


def _present(path: Path, index: dict, name: str) -> bool:
    """Whether model_index.json names the component (published repos mark absent ones [null, null])."""
    entry = index.get(name)
    return bool(entry) and entry[0] is not None and (path / name).is_dir()


def _required(path: Path, index: dict, name: str) -> Path:
    if not _present(path, index, name):
        raise FileNotFoundError(f"{path}: the pipeline needs the component folder {name}/, which is missing")
    return component_folder(path, name)


class SD3Family(Family):
    """StableDiffusion3Pipeline folders (MM-DiT transformer, CLIP-L + CLIP-G + T5)."""

    name = "SD3"
    defaults = SD3_DEFAULTS
    options = ("clip_skip", "max_sequence_length", "mu")
    # PAG perturbs the joint attention of the blocks (not SD3.5-Medium's image-only attn2, on which
    # diffusers' PAG processors cannot run); diffusers' PAG default "blocks.1".
    pag_layer_names = ((r"blocks_(\d+)/attn", r"transformer_blocks.\1.attn"),)
    pag_applied_layers = ("blocks.1",)

    def __init__(self, transformer, vae, clips, t5, tokenizers, params, scheduler_config, dtype):
        self.transformer, self.vae, self.clips, self.t5, self.tokenizers = transformer, vae, clips, t5, tokenizers
        self.params = params["transformer"]
        self.stacked_params = tuple(stack.path for stack in transformer.layer_stacks)
        self.clip_params, self.t5_params, self.vae_params = params["clips"], params["t5"], params["vae"]
        self.scheduler_config, self.dtype = scheduler_config, dtype
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.size_multiple = self.vae_scale * transformer.patch_size
        self.height = self.width = transformer.sample_size * self.vae_scale
        self._clip = [jax.jit(lambda p, ids, m=m: m.apply({"params": p}, ids)) for m in clips]
        self._t5 = None if t5 is None else jax.jit(lambda p, ids: t5.apply({"params": p}, ids))
        self._decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))

    @classmethod
    def load(cls, path: Path, index: dict, dtype="float32"):
        dtype = jnp.dtype(parse_dtype(dtype))
        transformer, transformer_params = load_sd3_transformer(_required(path, index, "transformer"), dtype)
        vae, vae_params = load_vae(_required(path, index, "vae"), dtype=dtype)
        clips, clip_params, tokenizers = [], [], []
        for suffix in ("", "_2"):
            module, params = load_clip(_required(path, index, "text_encoder" + suffix), dtype=dtype, projection=True)
            clips.append(module)
            clip_params.append(params)
            tokenizers.append(load_tokenizer(_required(path, index, "tokenizer" + suffix)))
        t5, t5_params = None, None
        if _present(path, index, "text_encoder_3"):
            t5, t5_params = load_t5(path / "text_encoder_3", dtype=dtype)
            tokenizers.append(load_tokenizer(_required(path, index, "tokenizer_3")))
        scheduler_config = read_json(_required(path, index, "scheduler") / "scheduler_config.json")
        params = {"transformer": transformer_params, "vae": vae_params, "clips": clip_params, "t5": t5_params}
        return cls(transformer, vae, clips, t5, tokenizers, params, scheduler_config, dtype)

    # -- conditioning ---------------------------------------------------------------------
    def uses_cfg(self, guidance_scale, options):
        return guidance_scale > 1.0

    def _t5_tokens(self, prompts, max_sequence_length):
        if self.t5 is None:  # diffusers: zeros in place of the T5 tokens
            return jnp.zeros((len(prompts), max_sequence_length, self.transformer.joint_attention_dim), self.dtype)
        ids = tokenize(self.tokenizers[2], prompts, max_length=max_sequence_length)
        return self._t5(self.t5_params, ids)

    def encode(self, prompts, options):
        clip_skip = options.get("clip_skip")
        max_sequence_length = options.get("max_sequence_length")
        max_sequence_length = MAX_SEQUENCE_LENGTH if max_sequence_length is None else max_sequence_length
        if not isinstance(max_sequence_length, int) or not 2 <= max_sequence_length <= 512:  # 512: diffusers' limit
            raise ValueError(f"max_sequence_length must be an integer in [2, 512], got {max_sequence_length!r}")
        hidden, pooled = [], []
        for encode, params, tokenizer in zip(self._clip, self.clip_params, self.tokenizers):
            out = encode(params, tokenize(tokenizer, prompts))
            hidden.append(out.hidden_states[-(2 + (clip_skip or 0))])  # penultimate layer, un-normalized
            pooled.append(out.text_embeds)
        t5 = self._t5_tokens(prompts, max_sequence_length).astype(self.dtype)
        clip = jnp.concatenate(hidden, axis=-1).astype(self.dtype)
        if clip.shape[-1] > t5.shape[-1]:
            raise ValueError(f"the CLIP hidden states ({clip.shape[-1]} wide) do not fit the T5 width {t5.shape[-1]}")
        clip = jnp.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
        context = jnp.concatenate([clip, t5], axis=1)
        return Conditioning(text={"context": context, "pooled": jnp.concatenate(pooled, axis=-1).astype(self.dtype)})

    # -- sampling -------------------------------------------------------------------------
    def make_schedule(self, num_inference_steps, height, width, options):
        mu = options.get("mu")
        if mu is None and self.scheduler_config.get("use_dynamic_shifting"):
            cfg, patch = self.scheduler_config, self.transformer.patch_size
            image_seq_len = (height // self.vae_scale // patch) * (width // self.vae_scale // patch)
            mu = flux_mu(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))
        return make_schedule(self.scheduler_config, num_inference_steps, mu=mu)

    def latent_shape(self, height, width):
        return (self.transformer.in_channels, height // self.vae_scale, width // self.vae_scale)

    def denoise(self, params, model_input, timestep, conditioning):
        text = conditioning.text
        return self.transformer.apply({"params": params}, model_input, text["context"], text["pooled"], timestep)

    def decode(self, latents, height, width):
        images = self._decode(self.vae_params, model_to_latents(self.vae.config, latents).astype(self.dtype))
        return np.asarray(jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1))
