"""The Wan2.1 video family: WanPipeline (T2V 1.3B / 14B) and WanImageToVideoPipeline (I2V 14B
480P / 720P) folders as Wan-AI publishes them in diffusers' layout.

Mirrors diffusers' Wan pipelines: prompts are cleaned (ftfy's text fixes, HTML entities
unescaped twice, whitespace collapsed), tokenized to `max_sequence_length` (512) and encoded by
UMT5 with the attention mask; the embeddings past each prompt's own length are zeroed.
Latents are [B, 16, (F - 1) / 4 + 1, H / 8, W / 8]; the transformer sees the flow timestep
(integers, as UniPC's schedule gives them) and predicts a velocity; CFG is on for
guidance_scale > 1 with "" (or negative_prompt) as the uncond text. The final latents are
un-normalised with the VAE's latents_mean / latents_std and decoded frame chunk by frame chunk.

I2V (transformer with image_dim): the first frame conditions in two ways, both video-stream
conditioning (one row per video row, never NAG rows): CLIP's penultimate hidden states (257
tokens) for the cross-attention's image part, and the VAE encoding of [image; zero frames]
(normalised) behind 4 mask channels (1 on the first latent frame), concatenated to the latents
on channels at every step. diffusers' attention processor takes the last 512 context tokens as
the text (it concatenates [image; text]); here the streams stay separate, so a
max_sequence_length below 512 works, where diffusers' I2V would misread the split.
"""

from __future__ import annotations

import functools
import hashlib
import html
import re
from pathlib import Path

import ftfy
import jax
import jax.numpy as jnp
import numpy as np

from convert.checkpoint import parse_dtype
from convert.clip import load_clip_vision
from convert.t5 import load_t5
from convert.wan import load_wan_transformer
from convert.wan_vae import load_wan_vae
from models.wan_vae import decode_video, encode_video
from nag_jax.clip_preprocess import CLIPImagePreprocessor
from nag_jax.pipeline import Family, component_folder, read_json, with_scheduler
from nag_jax.sampler import Conditioning
from nag_jax.schedulers import make_schedule
from nag_jax.tokenize import load_tokenizer, tokenize

# diffusers' WanPipeline call defaults; NAG: nag-semantics.md section 5 (Wan2.1 row)
WAN_DEFAULTS = {"guidance_scale": 5.0, "num_inference_steps": 50, "nag_scale": 5.0, "nag_tau": 2.5, "nag_alpha": 0.25}
MAX_SEQUENCE_LENGTH = 512
VAE_TEMPORAL, VAE_SPATIAL = 4, 8  # AutoencoderKLWan's compression


def prompt_clean(text: str) -> str:
    """diffusers' Wan prompt cleaning (basic_clean with ftfy, then whitespace_clean)."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(ftfy.fix_text(text))).strip()).strip()


def first_frame_mask(latent_frames: int, height: int, width: int) -> np.ndarray:
    """The I2V mask channels [4, T, h, w]: 1 on the first latent frame (its 4 video frames are
    the given image), 0 after."""
    mask = np.zeros((VAE_TEMPORAL, latent_frames, height, width), np.float32)
    mask[:, 0] = 1.0
    return mask


def as_pil_image(image):
    """A PIL image, a file path, or a float array [H, W, 3] in [0, 1] -> an RGB PIL image."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"image {str(image)!r} does not exist")
        image = Image.open(image)
    elif isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] == 3:
        image = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL image, a file path or a float array [H, W, 3], got {type(image).__name__}")
    return image.convert("RGB")


def vae_pixels(image, height: int, width: int) -> np.ndarray:
    """RGB PIL image -> [3, height, width] in [-1, 1], resized with Lanczos as diffusers' VideoProcessor does."""
    from PIL import Image

    pixels = np.asarray(image.resize((width, height), Image.LANCZOS), np.float32) / 255.0
    return (2.0 * pixels - 1.0).transpose(2, 0, 1)


class WanFamily(Family):
    """Wan2.1 T2V and I2V. Own options: `num_frames` (4k + 1, default 81), `max_sequence_length`
    (at most 512), `image` (I2V only: the first frame)."""

    options = ("num_frames", "max_sequence_length", "image")
    option_defaults = {"num_frames": 81, "max_sequence_length": MAX_SEQUENCE_LENGTH, "image": None}
    defaults = WAN_DEFAULTS
    height, width = 480, 832
    video = True

    def __init__(self, path, transformer, t5, tokenizer, vae, image_encoder, params, scheduler_config, vae_config,
                 dtype):
        self.path, self.transformer, self.tokenizer = path, transformer, tokenizer
        self.params, self.t5_params = params["transformer"], params["t5"]
        self.scheduler_config, self.dtype = scheduler_config, dtype
        self.image_to_video = transformer.config.image_dim is not None
        self.name = "Wan I2V" if self.image_to_video else "Wan T2V"
        self.size_multiple = VAE_SPATIAL * transformer.config.patch_size[1]
        self.stacked_params = tuple(stack.path for stack in transformer.layer_stacks)
        self._text = jax.jit(lambda p, ids, mask: t5.apply({"params": p}, ids, mask))
        shape = (1, vae_config["z_dim"], 1, 1, 1)
        self.latents_mean, self.latents_std = (np.asarray(vae_config[k], np.float32).reshape(shape)
                                               for k in ("latents_mean", "latents_std"))
        self._encode_video, self._decode_video = (
            functools.partial(jax.jit(lambda p, x, f=f: f(vae, p, x)), params["vae"]) for f in (encode_video, decode_video))
        if image_encoder is not None:
            module, self._clip_preprocess = image_encoder
            self._image_tokens = functools.partial(
                jax.jit(lambda p, x: module.apply({"params": p}, x).hidden_states[-2]), params["image_encoder"])
        self._image_conditioning = None  # (key, value) of the last call's first frame

    @classmethod
    def load(cls, path: Path, index: dict, dtype="float32", scheduler: str | None = None):
        dtype = jnp.dtype(parse_dtype(dtype))
        transformer, transformer_params = load_wan_transformer(component_folder(path, "transformer"), dtype)
        t5, t5_params = load_t5(component_folder(path, "text_encoder"), dtype=dtype)
        tokenizer = load_tokenizer(component_folder(path, "tokenizer"))
        vae_folder = component_folder(path, "vae")
        vae, vae_params = load_wan_vae(vae_folder, dtype)
        scheduler_config = with_scheduler(read_json(component_folder(path, "scheduler") / "scheduler_config.json"),
                                          scheduler)
        if scheduler_config["_class_name"] == "FlowMatchEulerDiscreteScheduler":  # Wan's shift under Euler's name
            scheduler_config.setdefault("shift", scheduler_config.get("flow_shift", 1.0))
        params = {"transformer": transformer_params, "t5": t5_params, "vae": vae_params}
        image_encoder = None
        if transformer.config.image_dim is not None:
            module, params["image_encoder"] = load_clip_vision(component_folder(path, "image_encoder"), dtype)
            image_encoder = (module, CLIPImagePreprocessor.from_pretrained(component_folder(path, "image_processor")))
        family = cls(path, transformer, t5, tokenizer, vae, image_encoder, params, scheduler_config,
                     read_json(vae_folder / "config.json"), dtype)
        # nag-jax reads a default size ("sample_size": latent pixels per side) and frame count from
        # transformer/config.json when there (the embedded wan-shapes: 32x32, 9 frames); diffusers ignores them
        config = read_json(component_folder(path, "transformer") / "config.json")
        if "sample_size" in config:
            family.height = family.width = config["sample_size"] * VAE_SPATIAL
        if "num_frames" in config:
            family.option_defaults = dict(cls.option_defaults, num_frames=config["num_frames"])
        return family

    def _first_frame(self, options):
        """(CLIP image tokens [1, 257, d], condition [1, 20, T, h, w]) of the call's image, cached."""
        image = as_pil_image(options["image"])
        height, width, frames = options["height"], options["width"], options["num_frames"]
        key = (hashlib.sha1(image.tobytes()).hexdigest(), image.size, height, width, frames)
        if self._image_conditioning is None or self._image_conditioning[0] != key:
            video = np.zeros((1, 3, frames, height, width), np.float32)
            video[0, :, 0] = vae_pixels(image, height, width)
            latents = np.asarray(self._encode_video(jnp.asarray(video, self.dtype)), np.float32)
            latents = (latents - self.latents_mean) / self.latents_std
            mask = first_frame_mask(latents.shape[2], latents.shape[3], latents.shape[4])[None]
            condition = jnp.asarray(np.concatenate([mask, latents], axis=1), self.dtype)
            image_tokens = self._image_tokens(jnp.asarray(self._clip_preprocess([image]), self.dtype))
            self._image_conditioning = (key, (image_tokens.astype(self.dtype), condition))
        return self._image_conditioning[1]

    # -- conditioning ---------------------------------------------------------------------
    def uses_cfg(self, guidance_scale, options):
        # the first family hook of every call: check the family's own options here
        frames, length = options["num_frames"], options["max_sequence_length"]
        if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1 or (frames - 1) % VAE_TEMPORAL:
            raise ValueError(f"num_frames must be a positive integer of the form 4k + 1 (1, 5, ..., 81), got {frames!r}")
        if not isinstance(length, int) or isinstance(length, bool) or not 1 <= length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(f"max_sequence_length must be an integer in [1, {MAX_SEQUENCE_LENGTH}], got {length!r}")
        if self.image_to_video and options["image"] is None:
            raise ValueError("image is required: this Wan pipeline is image-to-video; give the first frame "
                             "(image=..., or --image on the command line)")
        if not self.image_to_video and options["image"] is not None:
            raise ValueError("image is only for image-to-video Wan pipelines; this one is text-to-video")
        return guidance_scale > 1.0

    def encode(self, prompts, options):
        ids = tokenize(self.tokenizer, [prompt_clean(p) for p in prompts], max_length=options["max_sequence_length"])
        mask = (ids != self.tokenizer.pad_token_id).astype(np.int32)
        hidden = self._text(self.t5_params, ids, mask).astype(self.dtype) * jnp.asarray(mask, self.dtype)[..., None]
        if not self.image_to_video:
            return Conditioning(text={"context": hidden})
        image_embeds, condition = self._first_frame(options)
        rows = len(prompts)
        image = {"image_embeds": jnp.repeat(image_embeds, rows, axis=0), "condition": jnp.repeat(condition, rows, axis=0)}
        return Conditioning(text={"context": hidden}, image=image)

    # -- sampling -------------------------------------------------------------------------
    def make_schedule(self, num_inference_steps, height, width, options):
        return make_schedule(self.scheduler_config, num_inference_steps)

    def latent_shape(self, height, width, num_frames=81):
        frames = (num_frames - 1) // VAE_TEMPORAL + 1
        return (self.transformer.config.out_channels, frames, height // VAE_SPATIAL, width // VAE_SPATIAL)

    def latent_shape_of_call(self, height, width, options):
        return self.latent_shape(height, width, options["num_frames"])

    def denoise(self, params, model_input, timestep, conditioning):
        image = conditioning.image or {}
        if "condition" in image:
            model_input = jnp.concatenate([model_input, image["condition"].astype(model_input.dtype)], axis=1)
        timestep = jnp.broadcast_to(timestep, (model_input.shape[0],))
        return self.transformer.apply({"params": params}, model_input, timestep, conditioning.text["context"],
                                      image.get("image_embeds"))

    def decode(self, latents, height, width):
        """Final latents [B, C, T, h, w] -> frames float32 [B, F, H, W, 3] in [0, 1]."""
        latents = np.asarray(latents, np.float32) * self.latents_std + self.latents_mean
        video = self._decode_video(jnp.asarray(latents, self.dtype))
        return np.asarray(jnp.clip(video.astype(jnp.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 4, 1))
