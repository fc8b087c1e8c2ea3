"""Writing generated frames to video files: MP4 (H.264), animated WebP and GIF.

MP4 goes through imageio's ffmpeg plugin; the imageio-ffmpeg wheel ships the ffmpeg binary,
so nothing needs installing system-wide. WebP and GIF go through Pillow. The generation
parameters (`metadata`) are stored where each container has a place for text: the MP4
`comment` tag, the WebP EXIF ImageDescription, the GIF comment extension. `read_video_metadata`
reads them back.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

VIDEO_SUFFIXES = (".mp4", ".webp", ".gif")
_EXIF_IMAGE_DESCRIPTION = 0x010E
# imageio's 0-10 scale; 8 is libx264 crf 10: visually lossless for generated clips.
_MP4_QUALITY = 8


def _as_uint8_frames(frames) -> np.ndarray:
    """float [F, H, W, 3] in [0, 1], uint8 [F, H, W, 3], or a list of PIL images -> uint8 [F, H, W, 3]."""
    if isinstance(frames, (list, tuple)) and frames and isinstance(frames[0], Image.Image):
        frames = np.stack([np.asarray(frame.convert("RGB")) for frame in frames])
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames: expected [F, H, W, 3] with F >= 1 (or a list of PIL images), got shape {frames.shape}")
    if frames.dtype == np.uint8:
        return frames
    if not np.issubdtype(frames.dtype, np.floating):
        raise ValueError(f"frames: expected float in [0, 1] or uint8, got dtype {frames.dtype}")
    return np.round(np.clip(frames.astype(np.float32), 0.0, 1.0) * 255).astype(np.uint8)


def _metadata_text(metadata) -> str | None:
    if metadata is None or isinstance(metadata, str):
        return metadata
    return json.dumps(metadata, default=str)


def _write_mp4(frames: np.ndarray, path: Path, fps: float, text: str | None) -> None:
    import imageio.v2 as imageio

    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"frames: H.264 MP4 needs an even height and width, got {height}x{width}; "
                         "write .webp or .gif instead")
    output_params = ["-metadata", f"comment={text}"] if text is not None else []
    # macro_block_size 2: keep the size (imageio would otherwise rescale to a multiple of 16).
    with imageio.get_writer(path, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=_MP4_QUALITY,
                            macro_block_size=2, ffmpeg_log_level="error", output_params=output_params) as writer:
        for frame in frames:
            writer.append_data(frame)


def _write_animated(frames: np.ndarray, path: Path, fps: float, text: str | None, image_format: str) -> None:
    images = [Image.fromarray(frame) for frame in frames]
    options = dict(format=image_format, save_all=True, append_images=images[1:], loop=0,
                   duration=round(1000 / fps))
    if image_format == "WEBP":
        options["quality"] = 90
        if text is not None:
            exif = Image.Exif()
            exif[_EXIF_IMAGE_DESCRIPTION] = text
            options["exif"] = exif.tobytes()
    elif text is not None:
        options["comment"] = text.encode()
    images[0].save(path, **options)


def export_to_video(frames, path, fps: float = 16, metadata=None) -> Path:
    """Write `frames` to `path`; the format follows the extension (.mp4, .webp, .gif).

    frames: float [F, H, W, 3] in [0, 1], uint8 [F, H, W, 3], or a list of PIL images.
    metadata: a dict (stored as JSON) or a string, e.g. the generation parameters.
    The file appears complete or not at all (written under a temporary name, then renamed).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"path: the extension must be one of {', '.join(VIDEO_SUFFIXES)}, got {path.name!r}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    frames = _as_uint8_frames(frames)
    text = _metadata_text(metadata)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.partial{suffix}")
    try:
        if suffix == ".mp4":
            _write_mp4(frames, temporary, fps, text)
        else:
            _write_animated(frames, temporary, fps, text, suffix[1:].upper())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def read_video_metadata(path) -> str | None:
    """The text `export_to_video` stored as `metadata` (None when the file has none)."""
    path = Path(path)
    if path.suffix.lower() == ".mp4":
        import imageio_ffmpeg

        dump = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"],
                              capture_output=True, text=True, check=True).stdout
        return _ffmetadata_value(dump, "comment")
    with Image.open(path) as image:
        if image.format == "GIF":
            comment = image.info.get("comment")
            return comment.decode() if comment is not None else None
        return image.getexif().get(_EXIF_IMAGE_DESCRIPTION)


def _ffmetadata_value(dump: str, key: str) -> str | None:
    """One value from ffmpeg's ffmetadata text, where a backslash escapes the next character
    (newlines included) and an unescaped newline ends the value."""
    match = re.search(rf"^{re.escape(key)}=", dump, flags=re.MULTILINE)
    if match is None:
        return None
    value, chars = [], iter(dump[match.end() :])
    for char in chars:
        if char == "\n":
            break
        value.append(next(chars, "") if char == "\\" else char)
    return "".join(value)
