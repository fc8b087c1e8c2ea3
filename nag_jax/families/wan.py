"""The Wan video family: WanPipeline (Wan2.1 T2V 1.3B / 14B, Wan2.2 TI2V-5B) and
WanImageToVideoPipeline (Wan2.1 I2V 14B 480P / 720P) folders as Wan-AI publishes them in
diffusers' layout.

Mirrors diffusers' Wan pipelines: prompts are cleaned (ftfy's text fixes, HTML entities
unescaped twice, whitespace collapsed), tokenized to `max_sequence_length` (512) and encoded by
UMT5 with the attention mask; the embeddings past each prompt's own length are zeroed.
Latents are [B, z_dim, (F - 1) / 4 + 1, H / s, W / s] (Wan2.1: z_dim 16, s 8; Wan2.2's VAE:
48, 16); the transformer sees the flow timestep
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

Wan2.2 A14B (T2V and I2V): two transformers of the Wan2.1-14B architecture, `transformer` (the
high-noise expert) for the steps whose timestep is >= boundary_ratio x num_train_timesteps
(model_index.json's `boundary_ratio`) and `transformer_2` (low-noise) for the rest, with CFG
scales guidance_scale and guidance_scale_2 (default: guidance_scale); CFG is on for both when
guidance_scale > 1, as diffusers decides it. The sampler runs each expert's steps as its own
compiled program (`Family.experts`). Its I2V has no image_encoder (transformer image_dim None):
the first frame conditions through the VAE latents and mask channels only, as in diffusers.

TI2V (`expand_timesteps` in model_index.json, Wan2.2-TI2V-5B): one model for both. Without an
image it is text-to-video; diffusers then gives every video token the step's timestep, which is
the per-row embedding exactly, so the transformer gets one timestep per row. With an image it
is image-to-video as diffusers' WanImageToVideoPipeline with expand_timesteps runs it: the
image's normalised VAE latents replace the first latent frame of the model input at every step,
and that frame's tokens get timestep 0 (one timestep per token); the returned latents carry
the image's frame too. No CLIP, no mask channels.
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
from nag_jax.guidance import steps_at_or_above
from nag_jax.pipeline import Family, check_argument, component_folder, read_json, with_scheduler
from nag_jax.sampler import Conditioning
from nag_jax.schedulers import make_schedule
from nag_jax.tokenize import load_tokenizer, tokenize

# diffusers' WanPipeline call defaults; NAG: nag-semantics.md section 5 (Wan2.1 row)
WAN_DEFAULTS = {"guidance_scale": 5.0, "num_inference_steps": 50, "nag_scale": 5.0, "nag_tau": 2.5, "nag_alpha": 0.25}
MAX_SEQUENCE_LENGTH = 512
VAE_TEMPORAL = 4  # AutoencoderKLWan's temporal compression (Wan2.1 and Wan2.2)
TI2V_SIZE = (704, 1280, 121)  # Wan2.2-TI2V-5B's published height, width, frames (720P, 24 fps)


def prompt_clean(text: str) -> str:
    """diffusers' Wan prompt cleaning (basic_clean with ftfy, then whitespace_clean)."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(ftfy.fix_text(text))).strip()).strip()


def first_frame_mask(latent_frames: int, height: int, width: int) -> np.ndarray:
    """The I2V mask channels [4, T, h, w]: 1 on the first latent frame (its 4 video frames are
    the given image), 0 after."""
    mask = np.zeros((VAE_TEMPORAL, latent_frames, height, width), np.float32)
    mask[:, 0] = 1.0
    return mask


def load_experts(path: Path, index: dict, dtype):
    """([(module, params) of each expert], boundary_ratio): `transformer` alone without a
    boundary_ratio; with one (Wan2.2 A14B) also `transformer_2`. A component model_index.json
    lists as [null, null] (diffusers' optional components) is (None, None)."""
    boundary_ratio = index.get("boundary_ratio")
    names = ("transformer",) if boundary_ratio is None else ("transformer", "transformer_2")
    experts = [load_wan_transformer(component_folder(path, name), dtype) if (index.get(name) or [None])[0]
               else (None, None) for name in names]
    if experts[0][0] is None and (boundary_ratio is None or experts[1][0] is None):
        raise FileNotFoundError(f"{path}: model_index.json lists no transformer (nor a transformer_2 with a "
                                "boundary_ratio); a Wan pipeline needs one")
    return experts, None if boundary_ratio is None else float(boundary_ratio)


def with_first_frame(latents, first_frame):
    """TI2V image-to-video: latents [B, C, T, h, w] with the image's latent frame [B, C, 1, h, w]
    in place of the first (diffusers mixes with a 0/1 mask, which selects exactly this)."""
    return latents.at[:, :, :1].set(first_frame.astype(latents.dtype))


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
    """Wan2.1, Wan2.2 A14B (T2V and I2V) and Wan2.2 TI2V. Own options: `num_frames` (4k + 1,
    default 81; TI2V 121), `max_sequence_length` (at most 512), `image` (I2V and TI2V: the first
    frame), `guidance_scale_2` (two-expert models only: the low-noise expert's CFG scale)."""

    options = ("num_frames", "max_sequence_length", "image", "guidance_scale_2")
    option_defaults = {"num_frames": 81, "max_sequence_length": MAX_SEQUENCE_LENGTH, "image": None,
                       "guidance_scale_2": None}
    defaults = WAN_DEFAULTS
    height, width = 480, 832
    video = True

    def __init__(self, path, transformer, t5, tokenizer, vae, image_encoder, params, scheduler_config, vae_config,
                 dtype, image_to_video=None, experts=None, expand_timesteps: bool = False):
        """`experts`: Wan2.2 A14B's (boundary_ratio, transformer_2) (a missing expert: module and
        params None); `image_to_video`: the pipeline class's (default: the transformer takes CLIP
        tokens); `expand_timesteps`: Wan2.2 TI2V (per-token timesteps with an image)."""
        self.boundary_ratio, self.transformer_2 = experts or (None, None)
        self.path, self.transformer, self.tokenizer = path, transformer or self.transformer_2, tokenizer
        self.params, self.params_2, self.t5_params = params["transformer"], params.get("transformer_2"), params["t5"]
        self.scheduler_config, self.dtype = scheduler_config, dtype
        self.image_to_video = image_encoder is not None if image_to_video is None else image_to_video
        self.expand_timesteps = expand_timesteps
        self.name = "Wan TI2V" if expand_timesteps else "Wan I2V" if self.image_to_video else "Wan T2V"
        if expand_timesteps:
            self.height, self.width, frames = TI2V_SIZE
            self.option_defaults = {**self.option_defaults, "num_frames": frames}
        self.vae_spatial = vae.config.spatial_factor
        self.size_multiple = self.vae_spatial * self.transformer.config.patch_size[1]
        self.stacked_params = tuple(stack.path for stack in self.transformer.layer_stacks)
        self._text = jax.jit(lambda p, ids, mask: t5.apply({"params": p}, ids, mask))
        shape = (1, vae_config["z_dim"], 1, 1, 1)
        self.latents_mean, self.latents_std = (np.asarray(vae_config[k], np.float32).reshape(shape)
                                               for k in ("latents_mean", "latents_std"))
        self._encode_video, self._decode_video = (
            functools.partial(jax.jit(lambda p, x, f=f: f(vae, p, x)), params["vae"]) for f in (encode_video, decode_video))
        self._image_tokens = None  # Wan2.2 I2V: no CLIP image tokens
        if image_encoder is not None:
            module, self._clip_preprocess = image_encoder
            self._image_tokens = functools.partial(
                jax.jit(lambda p, x: module.apply({"params": p}, x).hidden_states[-2]), params["image_encoder"])
        self._image_conditioning = None  # (key, value) of the last call's first frame

    @classmethod
    def load(cls, path: Path, index: dict, dtype="float32", scheduler: str | None = None):
        dtype = jnp.dtype(parse_dtype(dtype))
        experts, boundary_ratio = load_experts(path, index, dtype)
        transformer, transformer_params = experts[0]
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
        if boundary_ratio is not None:
            params["transformer_2"] = experts[1][1]
        if transformer is not None and transformer.config.image_dim is not None:  # diffusers: Wan2.1 I2V only
            module, params["image_encoder"] = load_clip_vision(component_folder(path, "image_encoder"), dtype)
            image_encoder = (module, CLIPImagePreprocessor.from_pretrained(component_folder(path, "image_processor")))
        family = cls(path, transformer, t5, tokenizer, vae, image_encoder, params, scheduler_config,
                     read_json(vae_folder / "config.json"), dtype, index["_class_name"] == "WanImageToVideoPipeline",
                     None if boundary_ratio is None else (boundary_ratio, experts[1][0]),
                     bool(index.get("expand_timesteps")))
        # nag-jax reads a default size ("sample_size": latent pixels per side) and frame count from
        # transformer/config.json when there (the embedded wan-shapes: 32x32, 9 frames); diffusers ignores them
        config = read_json(component_folder(path, "transformer") / "config.json") if transformer is not None else {}
        if "sample_size" in config:
            family.height = family.width = config["sample_size"] * family.vae_spatial
        if "num_frames" in config:
            family.option_defaults = dict(family.option_defaults, num_frames=config["num_frames"])
        return family

    def _first_frame(self, options) -> dict:
        """The call's image as video-stream conditioning (one row), cached: I2V: condition
        [1, 20, T, h, w] and (Wan2.1) CLIP image tokens [1, 257, d]; TI2V: the frame's latents
        [1, 48, 1, h, w]."""
        image = as_pil_image(options["image"])
        height, width, frames = options["height"], options["width"], options["num_frames"]
        key = (hashlib.sha1(image.tobytes()).hexdigest(), image.size, height, width, frames)
        if self._image_conditioning is None or self._image_conditioning[0] != key:
            # TI2V encodes the image alone; I2V the image followed by black frames
            video = np.zeros((1, 3, 1 if self.expand_timesteps else frames, height, width), np.float32)
            video[0, :, 0] = vae_pixels(image, height, width)
            latents = np.asarray(self._encode_video(jnp.asarray(video, self.dtype)), np.float32)
            latents = (latents - self.latents_mean) / self.latents_std
            if self.expand_timesteps:
                conditioning = {"first_frame": jnp.asarray(latents, self.dtype)}
            else:
                mask = first_frame_mask(latents.shape[2], latents.shape[3], latents.shape[4])[None]
                conditioning = {"condition": jnp.asarray(np.concatenate([mask, latents], axis=1), self.dtype)}
                if self._image_tokens is not None:
                    conditioning["image_embeds"] = self._image_tokens(
                        jnp.asarray(self._clip_preprocess([image]), self.dtype)).astype(self.dtype)
            self._image_conditioning = (key, conditioning)
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
        if not (self.image_to_video or self.expand_timesteps) and options["image"] is not None:
            raise ValueError("image is only for image-to-video (and TI2V) Wan pipelines; this one is text-to-video")
        if options["guidance_scale_2"] is not None:
            if self.boundary_ratio is None:
                raise ValueError("guidance_scale_2 is only for two-expert Wan2.2 pipelines (boundary_ratio in "
                                 "model_index.json); this one has one transformer")
            check_argument("guidance_scale_2", options["guidance_scale_2"])
        return guidance_scale > 1.0

    def encode(self, prompts, options):
        ids = tokenize(self.tokenizer, [prompt_clean(p) for p in prompts], max_length=options["max_sequence_length"])
        mask = (ids != self.tokenizer.pad_token_id).astype(np.int32)
        hidden = self._text(self.t5_params, ids, mask).astype(self.dtype) * jnp.asarray(mask, self.dtype)[..., None]
        if options["image"] is None:
            return Conditioning(text={"context": hidden})
        image = {name: jnp.repeat(value, len(prompts), axis=0) for name, value in self._first_frame(options).items()}
        return Conditioning(text={"context": hidden}, image=image)

    # -- sampling -------------------------------------------------------------------------
    def make_schedule(self, num_inference_steps, height, width, options):
        return make_schedule(self.scheduler_config, num_inference_steps)

    def latent_shape(self, height, width, num_frames=81):
        frames = (num_frames - 1) // VAE_TEMPORAL + 1
        return (self.transformer.config.out_channels, frames, height // self.vae_spatial, width // self.vae_spatial)

    def latent_shape_of_call(self, height, width, options):
        return self.latent_shape(height, width, options["num_frames"])

    def denoise(self, params, model_input, timestep, conditioning, transformer=None):
        """`transformer`: the expert's module (default: the first one's)."""
        image = conditioning.image or {}
        rows = model_input.shape[0]
        if "condition" in image:
            model_input = jnp.concatenate([model_input, image["condition"].astype(model_input.dtype)], axis=1)
        if "first_frame" in image:  # TI2V image-to-video: the image's frame in front, its tokens at timestep 0
            model_input = with_first_frame(model_input, image["first_frame"])
            _, _, frames, height, width = model_input.shape
            _, patch_h, patch_w = self.transformer.config.patch_size
            per_frame = (height // patch_h) * (width // patch_w)
            timestep = jnp.where(jnp.arange(frames * per_frame) < per_frame, 0.0, timestep)
            timestep = jnp.broadcast_to(timestep, (rows, frames * per_frame))
        else:
            timestep = jnp.broadcast_to(timestep, (rows,))
        return (transformer or self.transformer).apply({"params": params}, model_input, timestep,
                                                       conditioning.text["context"], image.get("image_embeds"))

    def experts(self):
        if self.boundary_ratio is None:
            return super().experts()
        return ((self.denoise, self.params),
                (functools.partial(self.denoise, transformer=self.transformer_2), self.params_2))

    def expert_split(self, schedule, options):
        if self.boundary_ratio is None:
            return None, None
        boundary = self.boundary_ratio * self.scheduler_config.get("num_train_timesteps", 1000)
        high_noise = steps_at_or_above(schedule.timesteps, boundary)
        for name, params, steps in (("transformer", self.params, high_noise),
                                    ("transformer_2", self.params_2, len(schedule.timesteps) - high_noise)):
            if params is None and steps:
                raise ValueError(f"{self.path}: {steps} step(s) need the {name} expert, which this folder does not "
                                 f"have (model_index.json); boundary_ratio = {self.boundary_ratio}")
        scale_2 = options["guidance_scale_2"]
        return high_noise, options["guidance_scale"] if scale_2 is None else scale_2

    def final_latents(self, latents, conditioning):
        image = conditioning.image or {}
        return with_first_frame(latents, image["first_frame"]) if "first_frame" in image else latents

    def decode(self, latents, height, width):
        """Final latents [B, C, T, h, w] -> frames float32 [B, F, H, W, 3] in [0, 1]."""
        latents = np.asarray(latents, np.float32) * self.latents_std + self.latents_mean
        video = self._decode_video(jnp.asarray(latents, self.dtype))
        return np.asarray(jnp.clip(video.astype(jnp.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 4, 1))
