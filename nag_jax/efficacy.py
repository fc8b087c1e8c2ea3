"""The synthetic shapes domain, a deterministic attribute reader for it, and the efficacy benchmark.

Domain (fixed, so results stay comparable): 64x64 RGB, one circle, square or triangle of one
of six colours on a plain white, gray or black background; captions "a {colour} {shape} on a
{background} background" with each attribute left out independently (p = 0.3 in training).
The embedded models (`nag_jax/embedded/sd-shapes` and `flux-shapes`, made by
examples/train_tiny.py) are trained on exactly this data.

The reader takes the background colour from the image border, calls pixels far from it the
foreground, names the foreground's colour by the nearest palette entry and its shape by the
fill ratio of its bounding box (circle pi/4, square 1, triangle 1/2).

The benchmark asks for images whose colour the prompt leaves open ("a circle") with a
colour in the negative prompt ("red"), and counts how often that colour still appears and
how often the shape is right: without guidance, with NAG (for Flux in both NAG modes,
"reference" and "shared-image"), with CFG (for Flux true CFG), at several step counts.
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
COLOUR_PALETTE = np.array(list(COLOURS.values()), np.float32)
BACKGROUND_PALETTE = np.array(list(BACKGROUNDS.values()), np.float32)


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


def render(scenes: dict[str, np.ndarray], size: int = SIZE) -> np.ndarray:
    """Scenes -> uint8 images [count, size, size, 3] (hard edges, no noise)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
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
    results = []
    for image in as_pixels(images):
        background, mask, colour = read_foreground(image, min_pixels=30)
        results.append({"background": background, "colour": colour, "shape": None if colour is None else _shape_of(mask)})
    return results


def as_pixels(images) -> np.ndarray:
    """uint8 or [0, 1] float pixels -> float32 in 0..255 (floats rounded as an 8-bit file would)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = np.round(np.clip(images, 0, 1) * 255)
    return images.astype(np.float32)


def read_foreground(image: np.ndarray, min_pixels: int, core: float = 0.0) -> tuple[str, np.ndarray, str | None]:
    """One float32 image [H, W, 3] in 0..255 -> (background name, foreground mask, foreground colour
    name or None when fewer than `min_pixels` pixels stand out from the background). The colour is
    the median of the foreground pixels whose distance from the background is above its `core`
    quantile (small shapes: their blurred edges, mixed with the background, are most pixels)."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    background = np.median(border, axis=0)
    distance = np.abs(image - background).sum(-1)
    mask = distance > 90.0
    name = BACKGROUND_NAMES[int(np.argmin(((BACKGROUND_PALETTE - background) ** 2).sum(-1)))]
    if mask.sum() < min_pixels:
        return name, mask, None
    pixels = image[mask & (distance >= np.quantile(distance[mask], core))]
    return name, mask, COLOUR_NAMES[int(np.argmin(((COLOUR_PALETTE - np.median(pixels, axis=0)) ** 2).sum(-1)))]


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


def attribute_accuracy(found: list[dict], wanted) -> dict[str, float]:
    """Fraction of `read_attributes` results `found` that match `wanted`, a (colour, shape,
    background) name tuple per image, per attribute."""
    return {attribute: float(np.mean([f[attribute] == w[i] for f, w in zip(found, wanted)]))
            for i, attribute in enumerate(("colour", "shape", "background"))}


FULL_SCENES = tuple((c, s, b) for c in COLOUR_NAMES for s in SHAPES for b in BACKGROUND_NAMES)


def prompt_accuracy(pipe, seeds: int = 4, steps=STEPS, log=print) -> list[dict]:
    """Does the model follow its prompt at all? Per step count, without guidance: the accuracy of
    colour, shape and background read back from `seeds` images of each of the 54 fully specified
    captions ("a red circle on a white background"). Chance is 1/6, 1/3 and 1/3."""
    prompts = [caption(*scene) for scene in FULL_SCENES]
    rows = []
    for step_count in steps:
        images = pipe(prompts, num_inference_steps=step_count, num_images_per_prompt=seeds, output_type="np",
                      check_finite=True, **guidance_methods(pipe.family, None)["none"]).images
        found = read_attributes(images)
        accuracy = attribute_accuracy(found, [scene for scene in FULL_SCENES for _ in range(seeds)])
        row = {"steps": step_count, "images": len(found), **{f"{k}_accuracy": v for k, v in accuracy.items()}}
        log(json.dumps(row))
        rows.append(row)
    return rows


def guidance_methods(family, negative, nag_scales=None, cfg_scale=None, nag_modes=()) -> dict[str, dict]:
    """Call arguments by method, each with `negative` as its negative prompt: "none"; NAG at the
    family's default scale ("NAG"), or one entry per scale of `nag_scales` ("NAG 5"), each once per
    mode of `nag_modes` when given ("NAG reference", "NAG shared-image 5"); "CFG" at `cfg_scale`
    (default: the family's). The CFG scale is the family's `cfg_argument` (guidance_scale; Flux:
    true_cfg_scale, its guidance_scale being distilled guidance), 1 meaning off."""
    off = {family.cfg_argument: 1.0}
    methods = {"none": off}
    scales = [family.defaults["nag_scale"]] if nag_scales is None else list(nag_scales)
    for mode in nag_modes or [None]:
        for scale in scales:
            words = ["NAG", mode, None if nag_scales is None else f"{scale:g}"]
            methods[" ".join(w for w in words if w)] = dict(off, nag_scale=scale, nag_negative_prompt=negative,
                                                           **({"nag_mode": mode} if mode else {}))
    cfg_scale = family.defaults[family.cfg_argument] if cfg_scale is None else cfg_scale
    methods["CFG"] = {family.cfg_argument: cfg_scale, "negative_prompt": negative}
    return methods


def run_efficacy(pipe, seeds: int = 200, steps=STEPS, prompts=BENCH_PROMPTS, negatives=BENCH_NEGATIVES,
                 batch: int = 200, nag_scales=None, cfg_scale=None, log=print, read=None,
                 attribute: str = "shape", methods=None) -> list[dict]:
    """One row per (steps, method): rate of the negative colour and shape accuracy over all
    prompt/negative pairs, `seeds` images each (seeds 0..seeds-1). `nag_scales` replaces NAG at
    the family's default scale by one NAG row per scale; a family with NAG modes (Flux) gets
    each NAG row once per mode. `cfg_scale` replaces the family's CFG scale. Video families:
    `read` (default `read_attributes`) reads the clips and `attribute` names what each prompt's
    second entry asks for (efficacy_video: "direction"). `methods`: only these rows (names as in
    guidance_methods), e.g. the NAG rows of a scale sweep."""
    from nag_jax.intercept import NAG_MODES

    family = pipe.family
    choice = dict(nag_scales=nag_scales, cfg_scale=cfg_scale,
                  nag_modes=NAG_MODES if "nag_mode" in family.options else ())
    rows = []
    for step_count in steps:
        for method in guidance_methods(family, None, **choice):
            if methods is not None and method not in methods:
                continue
            hits = correct = total = 0
            started = time.perf_counter()
            for prompt, wanted in prompts:
                for negative in negatives:
                    settings = guidance_methods(family, negative, **choice)[method]
                    for first in range(0, seeds, batch):
                        count = min(batch, seeds - first)
                        output = pipe(prompt, num_inference_steps=step_count, num_images_per_prompt=count,
                                      seed=first, output_type="np", check_finite=True, **settings)
                        for found in (read or read_attributes)(output.frames if family.video else output.images):
                            hits += found["colour"] == negative
                            correct += found[attribute] == wanted
                            total += 1
            row = {"steps": step_count, "method": method, "images": total,
                   "negative_colour_rate": hits / total, f"{attribute}_accuracy": correct / total,
                   "seconds": round(time.perf_counter() - started, 1)}
            log(json.dumps(row))
            rows.append(row)
    return rows


def format_table(rows: list[dict], attribute: str = "shape") -> str:
    """Markdown table: steps x method, negative-colour rate and `attribute` accuracy in percent."""
    lines = [f"| steps | method | negative colour rate | {attribute} accuracy | images |",
             "| --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['steps']} | {row['method']} | {100 * row['negative_colour_rate']:.1f}% | "
                     f"{100 * row[f'{attribute}_accuracy']:.1f}% | {row['images']} |")
    return "\n".join(lines)


def format_accuracy_table(rows: list[dict]) -> str:
    """Markdown table: steps x colour / shape / background accuracy on fully specified prompts."""
    lines = ["| steps | colour accuracy | shape accuracy | background accuracy | images |",
             "| --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['steps']} | {100 * row['colour_accuracy']:.1f}% | {100 * row['shape_accuracy']:.1f}% | "
                     f"{100 * row['background_accuracy']:.1f}% | {row['images']} |")
    return "\n".join(lines)


def add_sampling_arguments(parser, unit: str, steps, negatives) -> None:
    """--seeds, --steps, --negatives and --batch of the image and video benchmarks (`unit`: what is sampled)."""
    parser.add_argument("--seeds", type=int, default=200, help=f"{unit} per prompt/negative pair and cell (default 200)")
    parser.add_argument("--steps", type=int, nargs="+", default=list(steps),
                        help=f"step counts (default {' '.join(map(str, steps))})")
    parser.add_argument("--negatives", nargs="+", default=list(negatives),
                        help=f"colours for the negative prompt (default {' '.join(negatives)})")
    parser.add_argument("--batch", type=int, default=200, help=f"{unit} per sampler call (default 200)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="nag-jax bench --efficacy",
        description="Does NAG remove what the negative prompt names? Counts the negative colour and the shape "
                    "accuracy on the shapes domain, without guidance, with NAG and with CFG.")
    parser.add_argument("--model", help="pipeline folder or embedded model name, sd-shapes or flux-shapes (default "
                                        "sd-shapes); a video model (wan-shapes) runs the moving-shapes benchmark "
                                        "(see its --help)")
    add_sampling_arguments(parser, "images", STEPS, BENCH_NEGATIVES)
    parser.add_argument("--nag-scales", type=float, nargs="+",
                        help="NAG scales to compare (default: the family's default scale alone)")
    parser.add_argument("--cfg-scale", type=float,
                        help="CFG scale: guidance_scale, for Flux true_cfg_scale (default: the family's, 7.5 for "
                             "SD1.5, 4 for Flux)")
    parser.add_argument("--accuracy-seeds", type=int, default=4,
                        help="images per fully specified caption for the prompt-accuracy check (54 captions; "
                             "default 4, 0 skips it)")
    parser.add_argument("--output", help="also write the rows as JSON to this file")
    from nag_jax.pipeline import NAGPipeline

    pipe = NAGPipeline.from_pretrained(parser.parse_known_args(argv)[0].model or "sd-shapes")
    if pipe.family.video:  # wan-shapes: the moving-shapes benchmark, with its own options
        from nag_jax.efficacy_video import main as video_main

        return video_main(argv, pipe)
    args = parser.parse_args(argv)
    accuracy = prompt_accuracy(pipe, seeds=args.accuracy_seeds, steps=args.steps) if args.accuracy_seeds else []
    rows = run_efficacy(pipe, seeds=args.seeds, steps=args.steps, negatives=args.negatives, batch=args.batch,
                        nag_scales=args.nag_scales, cfg_scale=args.cfg_scale)
    if accuracy:
        print(format_accuracy_table(accuracy) + "\n")
    print(format_table(rows))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"prompt_accuracy": accuracy, "efficacy": rows}, handle, indent=2)
    return 0
