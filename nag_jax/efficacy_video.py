"""The moving-shapes video domain, a reader for it, and the video efficacy benchmark.

Domain: clips of FRAMES frames at SIZE x SIZE, one circle, square or triangle in one of the
image domain's six colours on its white, gray or black background, moving left, right, up or
down by MOTION pixels over the clip; captions "a red circle moving left on a black background"
with each of the four attributes left out independently in training, as the image domain does.
The embedded video model (`nag_jax/embedded/wan-shapes`, made by examples/train_tiny_wan.py) is
trained on exactly this data.

The reader reads each frame as the image reader does (background from the border, foreground
colour by the nearest palette entry, from its pixels farthest from
the background) plus the foreground's centroid; per clip, the colour is the
majority over the frames and the direction is the axis and sign of the centroid's least-squares
velocity (None when it moves less than a third of MOTION).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import numpy as np

from nag_jax.efficacy import (BACKGROUND_NAMES, COLOUR_NAMES, SHAPES, add_sampling_arguments, as_pixels, format_table,
                              read_foreground, render, run_efficacy)

SIZE, FRAMES = 32, 9
MOTION = 12.0  # pixels the shape travels from the first frame to the last
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
DIRECTION_NAMES = tuple(DIRECTIONS)
MIN_PIXELS = 15  # the smallest triangle covers about 60 pixels; a quarter of it still counts


def video_caption(colour: str | None, shape: str | None, direction: str | None, background: str | None) -> str:
    """The caption with the attributes that are None left out ("a circle moving left", "a red shape")."""
    text = "a " + (f"{colour} " if colour else "") + (shape or "shape") + (f" moving {direction}" if direction else "")
    return text + (f" on a {background} background" if background else "")


def all_video_captions() -> list[str]:
    """Every caption the data can produce (each attribute present or left out)."""
    options = lambda names: (None, *names)  # noqa: E731
    return [video_caption(c, s, d, b) for c in options(COLOUR_NAMES) for s in options(SHAPES)
            for d in options(DIRECTION_NAMES) for b in options(BACKGROUND_NAMES)]


def random_clips(count: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Attribute indices and geometry of `count` clips: the start centre (cx, cy) keeps the shape
    inside the frame along its whole path."""
    half = rng.uniform(5.5, 8.0, count)
    direction = rng.integers(0, len(DIRECTIONS), count)
    step = np.array(list(DIRECTIONS.values()), np.float32)[direction]
    low, high = half + 1, SIZE - 1 - half
    start = [rng.uniform(low - np.minimum(step[:, k], 0) * MOTION, high - np.maximum(step[:, k], 0) * MOTION)
             for k in range(2)]
    return {"shape": rng.integers(0, len(SHAPES), count), "colour": rng.integers(0, len(COLOUR_NAMES), count),
            "background": rng.integers(0, len(BACKGROUND_NAMES), count), "direction": direction, "half": half,
            "cx": start[0], "cy": start[1]}


def render_clips(clips: dict[str, np.ndarray]) -> np.ndarray:
    """Clips -> uint8 videos [count, FRAMES, SIZE, SIZE, 3], the shape moving MOTION pixels in total."""
    step = np.array(list(DIRECTIONS.values()), np.float32)[clips["direction"]] * MOTION / (FRAMES - 1)
    frames = [render(dict(clips, cx=clips["cx"] + f * step[:, 0], cy=clips["cy"] + f * step[:, 1]), SIZE)
              for f in range(FRAMES)]
    return np.stack(frames, axis=1)


def clip_names(clips: dict[str, np.ndarray], index) -> tuple:
    """(colour, shape, direction, background) names of clip `index`."""
    return (COLOUR_NAMES[clips["colour"][index]], SHAPES[clips["shape"][index]],
            DIRECTION_NAMES[clips["direction"][index]], BACKGROUND_NAMES[clips["background"][index]])


def read_clips(videos) -> list[dict]:
    """uint8 or [0, 1] float videos [B, F, H, W, 3] -> per clip {"colour", "direction", "background",
    "frames"}, frames holding per frame {"colour", "position": (x, y) centroid or None}."""
    results = []
    for video in as_pixels(videos):
        frames, backgrounds = [], []
        for image in video:
            background, mask, colour = read_foreground(image, MIN_PIXELS, core=0.5)
            rows, cols = np.nonzero(mask)
            position = None if colour is None else (float(cols.mean()), float(rows.mean()))
            frames.append({"colour": colour, "position": position})
            backgrounds.append(background)
        colours = Counter(f["colour"] for f in frames if f["colour"] is not None)
        results.append({"colour": colours.most_common(1)[0][0] if colours else None,
                        "direction": _direction(frames, len(video)),
                        "background": Counter(backgrounds).most_common(1)[0][0], "frames": frames})
    return results


def _direction(frames: list[dict], count: int) -> str | None:
    """The direction of the centroid's least-squares velocity over the frames where it was found."""
    found = [(t, f["position"]) for t, f in enumerate(frames) if f["position"] is not None]
    if len(found) < 2:
        return None
    times = np.array([t for t, _ in found], np.float32)
    positions = np.array([p for _, p in found], np.float32)
    velocity = np.polyfit(times, positions, 1)[0] if len(found) > 2 else (positions[1] - positions[0]) / (times[1] - times[0])
    if np.abs(velocity).max() * (count - 1) < MOTION / 3:
        return None
    axis = int(np.argmax(np.abs(velocity)))
    return ("right", "down")[axis] if velocity[axis] > 0 else ("left", "up")[axis]


# ----------------------------------------------------------------------------- the benchmark

# (prompt, direction it asks for): prompts that leave the colour open, one per direction.
VIDEO_BENCH_PROMPTS = (("a circle moving right", "right"), ("a square moving left", "left"),
                       ("a triangle moving up", "up"), ("a circle moving down on a gray background", "down"))
VIDEO_BENCH_NEGATIVES = ("red", "blue", "green")
VIDEO_STEPS = (1, 2, 4)


def run_video_efficacy(pipe, seeds: int = 200, steps=VIDEO_STEPS, prompts=VIDEO_BENCH_PROMPTS,
                       negatives=VIDEO_BENCH_NEGATIVES, batch: int = 200, nag_scales=None, cfg_scale=None,
                       log=print, methods=None) -> list[dict]:
    """`run_efficacy` on clips: per (steps, method) the negative colour's rate (majority colour of a
    clip) and how often the motion read back is the prompt's direction."""
    return run_efficacy(pipe, seeds=seeds, steps=steps, prompts=prompts, negatives=negatives, batch=batch,
                        nag_scales=nag_scales, cfg_scale=cfg_scale, log=log, read=read_clips, attribute="direction",
                        methods=methods)


def main(argv=None, pipe=None) -> int:
    parser = argparse.ArgumentParser(
        prog="nag-jax bench --efficacy --model wan-shapes",
        description="Does NAG remove the colour the negative prompt names from a video while keeping its motion? "
                    "The negative colour's rate and the direction accuracy on the moving-shapes domain, without "
                    "guidance, with NAG and with CFG.")
    parser.add_argument("--model", default="wan-shapes", help="video pipeline folder or embedded name (default "
                                                              "wan-shapes)")
    add_sampling_arguments(parser, "clips", VIDEO_STEPS, VIDEO_BENCH_NEGATIVES)
    parser.add_argument("--nag-scales", type=float, nargs="+",
                        help="also one NAG row per scale (e.g. 3 5 8 11) at each of --scale-steps")
    parser.add_argument("--scale-steps", type=int, nargs="+", default=[4],
                        help="step counts of the --nag-scales rows (default 4)")
    parser.add_argument("--cfg-scale", type=float, help="CFG guidance_scale (default: the family's)")
    parser.add_argument("--output", help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)
    if pipe is None:
        from nag_jax.pipeline import NAGPipeline

        pipe = NAGPipeline.from_pretrained(args.model)
    rows = run_video_efficacy(pipe, seeds=args.seeds, steps=args.steps, negatives=args.negatives, batch=args.batch,
                              cfg_scale=args.cfg_scale)
    if args.nag_scales:
        rows += run_video_efficacy(pipe, seeds=args.seeds, steps=args.scale_steps, negatives=args.negatives,
                                   batch=args.batch, nag_scales=args.nag_scales,
                                   methods=[f"NAG {scale:g}" for scale in args.nag_scales])
    print(format_table(rows, attribute="direction"))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"efficacy": rows}, handle, indent=2)
    return 0
