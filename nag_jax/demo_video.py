"""The video model's part of `nag-jax demo`: still strips of frames for the PNG grid, and an
animated WebP grid (rows prompt / negative, columns no guidance / NAG / CFG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# the embedded video model's demo: prompts that leave the colour open, each with a direction
DEMO_VIDEO_PAIRS = (("a circle moving right", "red"), ("a square moving up on a gray background", "blue"),
                    ("a triangle moving left on a black background", "yellow"))
STRIP_FRAMES = 3  # first, middle and last frame


def still_strip(frames: list, size: int) -> Image.Image:
    """A video (list of PIL frames) -> a size x size cell: its first, middle and last frames side by
    side in a white cell, so a still image shows the colour and the motion."""
    picks = np.linspace(0, len(frames) - 1, STRIP_FRAMES).round().astype(int)
    width = size // STRIP_FRAMES
    cell = Image.new("RGB", (size, size), "white")
    for k, index in enumerate(picks):
        cell.paste(frames[index].resize((width - 2, width - 2), Image.NEAREST), (k * width + 1, (size - width) // 2))
    return cell


def write_video_grid(path: Path, name: str, pairs, columns, rows, cell: int = 128, label_width: int = 300,
                     header: int = 24, fps: float = 4) -> Path:
    """An animated WebP: one row per (prompt, negative) pair, one column per method, each cell a
    clip (list of PIL frames), labelled like the PNG grid."""
    from nag_jax.video import export_to_video

    step = cell + 4
    base = Image.new("RGB", (label_width + len(columns) * step, header + len(pairs) * step), "white")
    draw = ImageDraw.Draw(base)
    for c, (method, count) in enumerate(columns):
        draw.text((label_width + c * step + 2, 4), f"{method}, {count}", fill="black")
    for r, (prompt, negative) in enumerate(pairs):
        middle = header + r * step + cell // 2
        draw.text((4, middle - 22), name, fill="navy")
        draw.text((4, middle - 6), f'prompt: "{prompt}"', fill="black")
        draw.text((4, middle + 10), f'negative: "{negative}"', fill="darkred")
    frames = []
    for f in range(len(rows[0][0])):
        frame = base.copy()
        for r, row in enumerate(rows):
            for c, video in enumerate(row):
                frame.paste(video[f].resize((cell, cell), Image.NEAREST), (label_width + c * step, header + r * step))
        frames.append(np.asarray(frame))
    return export_to_video(np.stack(frames), path, fps=fps)
