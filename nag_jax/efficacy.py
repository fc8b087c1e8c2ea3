"""The synthetic shapes domain, a deterministic attribute reader for it, and the efficacy benchmark.

Domain (fixed, so results stay comparable): 64x64 RGB, one circle, square or triangle of one
of six colours on a plain white, gray or black background; captions "a {colour} {shape} on a
{background} background" with each attribute left out independently (p = 0.3 in training).
The embedded default model (`nag_jax/embedded/sd-shapes`, made by examples/train_tiny.py)
is trained on exactly this data.

The reader takes the background colour from the image border, calls pixels far from it the
foreground, names the foreground's colour by the nearest palette entry and its shape by the
fill ratio of its bounding box (circle pi/4, square 1, triangle 1/2).

The benchmark asks for images whose colour the prompt leaves open ("a circle") with a
colour in the negative prompt ("red"), and counts how often that colour still appears and
how often the shape is right: without guidance, with NAG, with CFG, at several step counts.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 190),
    "orange": (240, 140, 30),
}
BACKGROUNDS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (20, 20, 20)}
COLOUR_NAMES = tuple(COLOURS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)


# ----------------------------------------------------------------------------- the data


def caption(colour: str | None, shape: str | None, background: str | None) -> str:
    """The caption with the attributes that are None left out ("a circle", "a red shape")."""
    text = "a " + (f"{colour} " if colour else "") + (shape or "shape")
    return text + (f" on a {background} background" if background else "")


def random_scenes(count: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Attribute indices and geometry for `count` scenes (all arrays of length count)."""
    half = rng.uniform(9.0, 18.0, count)  # half the shape's extent, pixels
    return {
        "shape": rng.integers(0, len(SHAPES), count),
        "colour": rng.integers(0, len(COLOURS), count),
        "background": rng.integers(0, len(BACKGROUNDS), count),
        "half": half,
        "cx": rng.uniform(half + 2, SIZE - 2 - half),
        "cy": rng.uniform(half + 2, SIZE - 2 - half),
    }


def render(scenes: dict[str, np.ndarray]) -> np.ndarray:
    """Scenes -> uint8 images [count, 64, 64, 3] (hard edges, no noise)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    cx, cy, half = (scenes[k][:, None, None].astype(np.float32) for k in ("cx", "cy", "half"))
    dx, dy = x[None] - cx, y[None] - cy
    circle = dx**2 + dy**2 <= half**2
    square = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # Upright isosceles triangle inside the same box: apex at the top, base at the bottom.
    inside_rows = (dy >= -half) & (dy <= half)
    triangle = inside_rows & (np.abs(dx) <= (dy + half) / 2)
    masks = np.stack([circle, square, triangle], 1)[np.arange(len(half)), scenes["shape"]]
    colours = np.array(list(COLOURS.values()), np.uint8)[scenes["colour"]]
    backgrounds = np.array(list(BACKGROUNDS.values()), np.uint8)[scenes["background"]]
    return np.where(masks[..., None], colours[:, None, None], backgrounds[:, None, None])


# ----------------------------------------------------------------------------- the reader


def read_attributes(images) -> list[dict]:
    """uint8 or [0, 1] float images [B, H, W, 3] -> per image {"colour", "shape", "background"}.

    colour/shape are None when no foreground is found (an empty or washed-out image).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = np.round(np.clip(images, 0, 1) * 255)
    images = images.astype(np.float32)
    palette = np.array(list(COLOURS.values()), np.float32)
    bg_palette = np.array(list(BACKGROUNDS.values()), np.float32)
    results = []
    for image in images:
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        background = np.median(border, axis=0)
        distance = np.abs(image - background).sum(-1)
        mask = distance > 90.0
        result = {"background": BACKGROUND_NAMES[int(np.argmin(((bg_palette - background) ** 2).sum(-1)))],
                  "colour": None, "shape": None}
        if mask.sum() >= 30:
            mean = np.median(image[mask], axis=0)
            result["colour"] = COLOUR_NAMES[int(np.argmin(((palette - mean) ** 2).sum(-1)))]
            result["shape"] = _shape_of(mask)
        results.append(result)
    return results


def _shape_of(mask: np.ndarray) -> str:
    """Fill ratio of the bounding box: circle pi/4 ~ 0.785, square 1, triangle 0.5; a triangle is
    also wider at the bottom than at the top, which separates it from a blurred circle."""
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    fill = mask.sum() / ((bottom - top + 1) * (right - left + 1))
    height = bottom - top + 1
    upper = mask[top: top + max(height // 4, 1)].sum()
    lower = mask[bottom - max(height // 4, 1) + 1: bottom + 1].sum()
    if fill > 0.9:
        return "square"
    if fill < 0.66 or lower > 2.2 * max(upper, 1):
        return "triangle"
    return "circle"


# ----------------------------------------------------------------------------- the benchmark

# (prompt, shape it asks for): prompts that leave the colour open.
BENCH_PROMPTS = (("a circle", "circle"), ("a square on a gray background", "square"), ("a triangle", "triangle"))
BENCH_NEGATIVES = ("red", "blue", "green")
STEPS = (1, 2, 4, 25)


FULL_SCENES = tuple((c, s, b) for c in COLOUR_NAMES for s in SHAPES for b in BACKGROUND_NAMES)


def prompt_accuracy(pipe, seeds: int = 4, steps=STEPS, log=print) -> list[dict]:
    """Does the model follow its prompt at all? Per step count, without guidance: the accuracy of
    colour, shape and background read back from `seeds` images of each of the 54 fully specified
    captions ("a red circle on a white background"). Chance is 1/6, 1/3 and 1/3."""
    prompts = [caption(*scene) for scene in FULL_SCENES]
    rows = []
    for step_count in steps:
        images = pipe(prompts, num_inference_steps=step_count, num_images_per_prompt=seeds, guidance_scale=1.0,
                      output_type="np", check_finite=True).images
        wanted = [scene for scene in FULL_SCENES for _ in range(seeds)]
        found = read_attributes(images)
        row = {"steps": step_count, "images": len(found)}
        for i, attribute in enumerate(("colour", "shape", "background")):
            row[f"{attribute}_accuracy"] = float(np.mean([f[attribute] == w[i] for f, w in zip(found, wanted)]))
        log(json.dumps(row))
        rows.append(row)
    return rows


def _methods(defaults: dict, nag_scales=None) -> dict[str, dict]:
    """No guidance, NAG ("NAG" at the family default, "NAG 5" per scale of `nag_scales`), CFG."""
    nag = ({"NAG": defaults["nag_scale"]} if nag_scales is None else {f"NAG {scale:g}": scale for scale in nag_scales})
    return {"none": dict(guidance_scale=1.0),
            **{name: dict(guidance_scale=1.0, nag_scale=scale) for name, scale in nag.items()},
            "CFG": dict(guidance_scale=defaults["guidance_scale"])}


def run_efficacy(pipe, seeds: int = 200, steps=STEPS, prompts=BENCH_PROMPTS, negatives=BENCH_NEGATIVES,
                 batch: int = 200, nag_scales=None, log=print) -> list[dict]:
    """One row per (steps, method): rate of the negative colour and shape accuracy over all
    prompt/negative pairs, `seeds` images each (seeds 0..seeds-1). `nag_scales` replaces NAG at
    the family's default scale by one NAG row per scale."""
    rows = []
    for step_count in steps:
        for method, settings in _methods(pipe.family.defaults, nag_scales).items():
            hits = correct = total = 0
            started = time.perf_counter()
            for prompt, want_shape in prompts:
                for negative in negatives:
                    for first in range(0, seeds, batch):
                        count = min(batch, seeds - first)
                        extra = {}
                        if method.startswith("NAG"):
                            extra["nag_negative_prompt"] = negative
                        elif method == "CFG":
                            extra["negative_prompt"] = negative
                        images = pipe(prompt, num_inference_steps=step_count, num_images_per_prompt=count,
                                      seed=first, output_type="np", check_finite=True, **settings, **extra).images
                        for found in read_attributes(images):
                            hits += found["colour"] == negative
                            correct += found["shape"] == want_shape
                            total += 1
            row = {"steps": step_count, "method": method, "images": total,
                   "negative_colour_rate": hits / total, "shape_accuracy": correct / total,
                   "seconds": round(time.perf_counter() - started, 1)}
            log(json.dumps(row))
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table: steps x method, negative-colour rate and shape accuracy in percent."""
    lines = ["| steps | method | negative colour rate | shape accuracy | images |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['steps']} | {row['method']} | {100 * row['negative_colour_rate']:.1f}% | "
                     f"{100 * row['shape_accuracy']:.1f}% | {row['images']} |")
    return "\n".join(lines)


def format_accuracy_table(rows: list[dict]) -> str:
    """Markdown table: steps x colour / shape / background accuracy on fully specified prompts."""
    lines = ["| steps | colour accuracy | shape accuracy | background accuracy | images |",
             "| --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['steps']} | {100 * row['colour_accuracy']:.1f}% | {100 * row['shape_accuracy']:.1f}% | "
                     f"{100 * row['background_accuracy']:.1f}% | {row['images']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="nag-jax bench --efficacy",
        description="Does NAG remove what the negative prompt names? Counts the negative colour and the shape "
                    "accuracy on the shapes domain, without guidance, with NAG and with CFG.")
    parser.add_argument("--model", help="pipeline folder (default: the embedded sd-shapes model)")
    parser.add_argument("--seeds", type=int, default=200, help="images per prompt/negative pair and cell (default 200)")
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS), help="step counts (default 1 2 4 25)")
    parser.add_argument("--negatives", nargs="+", default=list(BENCH_NEGATIVES),
                        help=f"colours for the negative prompt (default {' '.join(BENCH_NEGATIVES)})")
    parser.add_argument("--batch", type=int, default=200, help="images per sampler call (default 200)")
    parser.add_argument("--nag-scales", type=float, nargs="+",
                        help="NAG scales to compare (default: the family's default scale alone)")
    parser.add_argument("--accuracy-seeds", type=int, default=4,
                        help="images per fully specified caption for the prompt-accuracy check (54 captions; "
                             "default 4, 0 skips it)")
    parser.add_argument("--output", help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)
    from nag_jax.pipeline import NAGPipeline

    from nag_jax.cli import embedded_model

    pipe = NAGPipeline.from_pretrained(args.model or embedded_model())
    accuracy = prompt_accuracy(pipe, seeds=args.accuracy_seeds, steps=args.steps) if args.accuracy_seeds else []
    rows = run_efficacy(pipe, seeds=args.seeds, steps=args.steps, negatives=args.negatives, batch=args.batch,
                        nag_scales=args.nag_scales)
    if accuracy:
        print(format_accuracy_table(accuracy) + "\n")
    print(format_table(rows))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"prompt_accuracy": accuracy, "efficacy": rows}, handle, indent=2)
    return 0
