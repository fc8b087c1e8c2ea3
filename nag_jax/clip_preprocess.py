"""CLIP's image preprocessing in numpy/PIL (what transformers' CLIPImageProcessor does).

Resize so the shortest side has `shortest_edge` pixels (PIL bicubic on the 8-bit image, the long
side truncated as transformers computes it), center crop, rescale to [0, 1] and normalize with
the mean/std of the model's preprocessor_config.json. The result is NCHW float32, the
`pixel_values` that `models.clip.CLIPVisionModel` takes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPImagePreprocessor:
    shortest_edge: int = 224
    crop_size: tuple[int, int] = (224, 224)  # (height, width)
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_center_crop: bool = True
    do_normalize: bool = True

    @classmethod
    def from_pretrained(cls, folder) -> "CLIPImagePreprocessor":
        """From a CLIP folder's preprocessor_config.json (absent: OpenAI CLIP's 224-pixel defaults)."""
        path = Path(folder) / "preprocessor_config.json"
        if not path.exists():
            return cls()
        config = json.loads(path.read_text())
        size, crop = config.get("size", 224), config.get("crop_size", 224)
        shortest = size.get("shortest_edge") if isinstance(size, dict) else size
        if shortest is None:
            raise ValueError(f"{path}: size={size!r}; CLIP preprocessing needs size.shortest_edge")
        crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
        fields = {"image_mean", "image_std", "resample", "rescale_factor", "do_resize", "do_center_crop",
                  "do_normalize"}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}
        return cls(shortest_edge=shortest, crop_size=crop, **values)

    def __call__(self, images) -> np.ndarray:
        """PIL images or uint8 arrays [H, W, 3] -> pixel_values [B, 3, crop_h, crop_w] float32."""
        return np.stack([self._one(image) for image in images])

    def _one(self, image) -> np.ndarray:
        image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
        image = image.convert("RGB")
        if self.do_resize:
            width, height = image.size
            short, long = sorted((width, height))
            new_long = int(self.shortest_edge * long / short)
            size = (self.shortest_edge, new_long) if width <= height else (new_long, self.shortest_edge)
            image = image.resize(size, resample=self.resample)
        pixels = np.asarray(image)
        if self.do_center_crop:
            crop_h, crop_w = self.crop_size
            height, width = pixels.shape[:2]
            if crop_h > height or crop_w > width:
                raise ValueError(f"crop_size {self.crop_size} is larger than the resized image ({height}, {width})")
            top, left = (height - crop_h) // 2, (width - crop_w) // 2
            pixels = pixels[top : top + crop_h, left : left + crop_w]
        pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, np.float32)
            std = np.asarray(self.image_std, np.float32)
            pixels = (pixels - mean) / std
        return pixels.transpose(2, 0, 1)
