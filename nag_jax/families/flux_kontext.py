"""Flux Kontext (FLUX.1-Kontext-dev): instruction image editing, as diffusers' `FluxKontextPipeline`.

A Flux dev transformer that also sees the image to edit: the input image is resized (with
`auto_resize`, diffusers' `_auto_resize`, to the preferred Kontext resolution of the nearest
aspect ratio), VAE-encoded (the posterior mean), normalised and 2x2-packed like the latents, and
its tokens, with position ids (1, row, column), are appended to the noisy image tokens. The
prediction of the generated tokens alone is used; the schedule's shift follows the generated
tokens only. The output size is the asked one (default 1024x1024) refitted to `max_area` at
the same aspect ratio.

NAG: the conditioning-image tokens are image-stream tokens, so they get NAG like the generated
ones, and in `nag_mode="reference"` the single-stream blocks copy them with the rest of the
image stream, as the reference Kontext pipeline does. Its defaults: `nag_end` 0.25 (NAG in the
first quarter of the run only), and its Flux processors' L2 norm is `nag_norm="l2"`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from models.vae import latents_to_model
from nag_jax.families.flux import DEV_DEFAULTS, FluxFamily, image_ids, pack_latents

# (width, height) of the resolutions Kontext was trained on (diffusers' PREFERRED_KONTEXT_RESOLUTIONS)
PREFERRED_KONTEXT_RESOLUTIONS = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
)
# diffusers' documented Kontext setting (guidance 2.5, 28 steps); nag_end as the reference's Kontext pipeline
KONTEXT_DEFAULTS = {**DEV_DEFAULTS, "guidance_scale": 2.5, "nag_end": 0.25}
MAX_AREA = 1024**2


def conditioning_image_size(width: int, height: int, multiple: int, auto_resize: bool) -> tuple[int, int]:
    """(width, height) the input image is resized to: its own size, or with `auto_resize` the
    preferred resolution nearest its aspect ratio, rounded down to `multiple`."""
    width, height = width - width % multiple, height - height % multiple
    if auto_resize:
        aspect = width / height
        _, width, height = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return width // multiple * multiple, height // multiple * multiple


def fit_to_area(height: int, width: int, max_area: int, multiple: int) -> tuple[int, int]:
    """(height, width) with the aspect ratio of the asked size and about `max_area` pixels,
    rounded down to `multiple` (diffusers' FluxKontextPipeline)."""
    aspect = width / height
    return (round((max_area / aspect) ** 0.5) // multiple * multiple,
            round((max_area * aspect) ** 0.5) // multiple * multiple)


class FluxKontextFamily(FluxFamily):
    """FluxKontextPipeline folders. Own options beside Flux's: `image` (a PIL image to edit;
    None generates from text alone, as diffusers allows), `max_area` (pixels, default 1024**2)
    and `auto_resize` (default True)."""

    options = FluxFamily.options + ("image", "max_area", "auto_resize")
    option_defaults = {**FluxFamily.option_defaults, "image": None, "max_area": MAX_AREA, "auto_resize": True}

    def __init__(self, transformer, vae, *args, **kwargs):
        super().__init__(transformer, vae, *args, **kwargs)
        self.name, self.defaults = "Flux Kontext", KONTEXT_DEFAULTS
        self._encode_image = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode)[0])

    def uses_cfg(self, guidance_scale, options):
        image, max_area = options["image"], options["max_area"]
        if image is not None and not hasattr(image, "convert"):
            raise ValueError(f"image must be a PIL image (or None), got {type(image).__name__}")
        if not isinstance(max_area, int) or isinstance(max_area, bool) or max_area < self.size_multiple**2:
            raise ValueError(f"max_area must be an integer of at least {self.size_multiple ** 2} pixels, got {max_area!r}")
        if not isinstance(options["auto_resize"], bool):
            raise ValueError(f"auto_resize must be True or False, got {options['auto_resize']!r}")
        return super().uses_cfg(guidance_scale, options)

    def output_size(self, height, width, options):
        return fit_to_area(height, width, options["max_area"], self.size_multiple)

    def encode(self, prompts, options):
        conditioning = super().encode(prompts, options)
        if options["image"] is None:
            return conditioning
        tokens, ids = self._image_tokens(options["image"], options["auto_resize"])
        rows = len(prompts)
        image = dict(conditioning.image, image_latents=jnp.tile(tokens, (rows, 1, 1)),
                     img_ids=jnp.concatenate([conditioning.image["img_ids"], jnp.tile(ids[None], (rows, 1, 1))], 1))
        return conditioning.replace(image=image)

    def _image_tokens(self, image, auto_resize):
        """The packed, normalised VAE latents [1, M, 4C] of the image to edit and their ids [M, 3]."""
        from PIL import Image

        rgb = image.convert("RGB")
        width, height = conditioning_image_size(rgb.width, rgb.height, self.size_multiple, auto_resize)
        pixels = 2.0 * (np.asarray(rgb.resize((width, height), Image.LANCZOS), np.float32) / 255.0) - 1.0
        mean = self._encode_image(self.vae_params, jnp.asarray(pixels.transpose(2, 0, 1)[None], self.dtype))
        latents = latents_to_model(self.vae.config, mean.astype(jnp.float32))
        ids = image_ids(height // self.size_multiple, width // self.size_multiple)
        ids[:, 0] = 1  # the first id component tells the conditioning tokens from the generated ones
        return pack_latents(latents).astype(self.dtype), ids

    def denoise(self, params, model_input, timestep, conditioning):
        image_latents = conditioning.image.get("image_latents")
        if image_latents is None:
            return super().denoise(params, model_input, timestep, conditioning)
        generated = model_input.shape[1]
        joined = jnp.concatenate([model_input, image_latents.astype(model_input.dtype)], axis=1)
        return super().denoise(params, joined, timestep, conditioning)[:, :generated]
