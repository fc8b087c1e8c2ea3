"""The UNet family: SD1.5, SD2.x, SDXL and every SDXL-architecture checkpoint.

Mirrors diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline: CLIP prompt encoding
(SDXL: two encoders, penultimate hidden states concatenated, pooled output of the second,
zero negative embeddings when no negative prompt is given and the pipeline says
`force_zeros_for_empty_prompt`), SDXL's six time ids, the LCM guidance embedding for
UNets with `time_cond_proj_dim` (then CFG is off, as in diffusers), VAE decoding.
NAG reaches only the cross-attention (text rows of the `context`), via the interceptor.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from convert.checkpoint import parse_dtype
from convert.clip import load_clip
from convert.unet import load_unet
from convert.vae import load_vae
from models.layers import timestep_embedding
from models.vae import model_to_latents
from nag_jax.pipeline import Family, component_folder, read_json, with_scheduler
from nag_jax.sampler import Conditioning
from nag_jax.schedulers import make_schedule
from nag_jax.tokenize import load_tokenizer, tokenize

# nag-semantics.md section 5 (SD1.5 / SDXL rows) and the diffusers pipelines' defaults.
SD_DEFAULTS = {"guidance_scale": 7.5, "num_inference_steps": 50, "nag_scale": 3.0, "nag_tau": 2.5, "nag_alpha": 0.375}
SDXL_DEFAULTS = {"guidance_scale": 5.0, "num_inference_steps": 50, "nag_scale": 3.0, "nag_tau": 2.5, "nag_alpha": 0.5}


class StableDiffusionFamily(Family):
    """SD1.5 / SD2.x (one CLIP encoder) and SDXL (two) UNet pipelines."""

    options = ("clip_skip", "timesteps", "eta")  # eta: TCDScheduler's (diffusers' pipelines pass it on)
    # PAG perturbs the self-attention (attn1) of the transformer blocks; diffusers' PAG default "mid".
    pag_layer_names = (
        (r"(down|up)_blocks_(\d+)_attentions_(\d+)/transformer_blocks_(\d+)/attn1/core",
         r"\1_blocks.\2.attentions.\3.transformer_blocks.\4.attn1"),
        (r"mid_block_attentions_(\d+)/transformer_blocks_(\d+)/attn1/core",
         r"mid_block.attentions.\1.transformer_blocks.\2.attn1"),
    )
    pag_applied_layers = ("mid",)

    def __init__(self, unet, vae, encoders, tokenizers, params, scheduler_config, pipeline_config, sample_size,
                 dtype):
        self.unet, self.vae, self.encoders, self.tokenizers = unet, vae, encoders, tokenizers
        self.params = params["unet"]
        self.encoder_params, self.vae_params = params["text_encoders"], params["vae"]
        self.scheduler_config, self.dtype = scheduler_config, dtype
        self.is_sdxl = len(encoders) == 2
        self.name = "SDXL" if self.is_sdxl else "Stable Diffusion"
        self.defaults = SDXL_DEFAULTS if self.is_sdxl else SD_DEFAULTS
        self.force_zeros_for_empty_prompt = self.is_sdxl and pipeline_config.get("force_zeros_for_empty_prompt", True)
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.size_multiple = self.vae_scale
        self.height = self.width = sample_size * self.vae_scale
        self._encode = [jax.jit(lambda p, ids, m=m: m.apply({"params": p}, ids)) for m in encoders]
        self._decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))

    @classmethod
    def load(cls, path: Path, index: dict, dtype="float32", scheduler: str | None = None):
        dtype = jnp.dtype(parse_dtype(dtype))
        # Arguments are checked before the (slow) weights are read.
        scheduler_config = read_json(component_folder(path, "scheduler") / "scheduler_config.json")
        scheduler_config = with_scheduler(scheduler_config, scheduler)
        unet, unet_params = load_unet(component_folder(path, "unet"), dtype)
        vae, vae_params = load_vae(component_folder(path, "vae"), dtype=dtype)
        names = [n for n in ("text_encoder", "text_encoder_2") if index.get(n) and index[n][0] is not None]
        encoders, encoder_params, tokenizers = [], [], []
        for name in names:
            # The class in model_index.json says whether there is a projection (a converted folder's
            # Flax parameter names do not carry the PyTorch name load_clip would look for).
            projection = index[name][1] == "CLIPTextModelWithProjection"
            module, params = load_clip(component_folder(path, name), dtype=dtype, projection=projection)
            encoders.append(module)
            encoder_params.append(params)
            tokenizers.append(load_tokenizer(component_folder(path, name.replace("text_encoder", "tokenizer"))))
        params = {"unet": unet_params, "vae": vae_params, "text_encoders": encoder_params}
        sample_size = read_json(path / "unet" / "config.json").get("sample_size", 64)
        return cls(unet, vae, encoders, tokenizers, params, scheduler_config, index, sample_size, dtype)

    # -- conditioning ---------------------------------------------------------------------
    def uses_cfg(self, guidance_scale, options):
        return guidance_scale > 1.0 and self.unet.config.time_cond_proj_dim is None

    def _hidden(self, index, prompts, clip_skip):
        out = self._encode[index](self.encoder_params[index], tokenize(self.tokenizers[index], prompts))
        if not self.is_sdxl:  # SD: last hidden state, or an earlier layer through the final norm
            if clip_skip is None:
                return out.last_hidden_state, None
            earlier = out.hidden_states[-(clip_skip + 1)]
            module = self.encoders[index]
            return module.apply({"params": self.encoder_params[index]}, earlier, method=module.final_norm), None
        # SDXL: un-normalized penultimate layer (or clip_skip layers earlier)
        return out.hidden_states[-(2 + (clip_skip or 0))], out.text_embeds

    def encode(self, prompts, options):
        clip_skip = options.get("clip_skip")
        hidden = [self._hidden(i, prompts, clip_skip) for i in range(len(self.encoders))]
        context = jnp.concatenate([h for h, _ in hidden], axis=-1).astype(self.dtype)
        image = {}
        if self.is_sdxl:
            image["text_embeds"] = hidden[-1][1].astype(self.dtype)
            height, width = options["height"], options["width"]
            image["time_ids"] = jnp.tile(jnp.array([[height, width, 0, 0, height, width]], self.dtype), (len(prompts), 1))
        if self.unet.config.time_cond_proj_dim is not None:  # LCM-style: embed w = guidance_scale - 1
            w = jnp.full((len(prompts),), options["guidance_scale"] - 1.0) * 1000.0
            image["timestep_cond"] = timestep_embedding(w, self.unet.config.time_cond_proj_dim).astype(self.dtype)
        return Conditioning(text={"context": context}, image=image)

    def encode_uncond(self, negatives, count, options):
        encoded = self.encode(negatives or [""] * count, options)
        if negatives is None and self.force_zeros_for_empty_prompt:
            zeros = {"context": jnp.zeros_like(encoded.text["context"])}
            return Conditioning(text=zeros, image=dict(encoded.image, text_embeds=jnp.zeros_like(encoded.image["text_embeds"])))
        return encoded

    # -- sampling -------------------------------------------------------------------------
    def make_schedule(self, num_inference_steps, height, width, options):
        return make_schedule(self.scheduler_config, num_inference_steps, timesteps=options.get("timesteps"),
                             eta=options.get("eta"))

    def latent_shape(self, height, width):
        return (self.unet.config.in_channels, height // self.vae_scale, width // self.vae_scale)

    def denoise(self, params, model_input, timestep, conditioning):
        image = conditioning.image
        added = {k: image[k] for k in ("text_embeds", "time_ids")} if self.is_sdxl else None
        return self.unet.apply(
            {"params": params}, model_input, timestep, conditioning.text["context"],
            timestep_cond=image.get("timestep_cond"), added_cond_kwargs=added,
        )

    def decode(self, latents, height, width):
        images = self._decode(self.vae_params, model_to_latents(self.vae.config, latents).astype(self.dtype))
        return np.asarray(jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1))
