"""CLIP score as torchmetrics defines it, and the paper's Table 1 CLIP column (baseline vs NAG).

The score of an image and its caption is 100 * max(cos(image embedding, text embedding), 0)
with a CLIPModel's projected embeddings, the image preprocessed as its CLIPImageProcessor does
(nag_jax.clip_preprocess) and the caption tokenized by its tokenizer (truncated to the text
tower's positions). A method's score is the mean over its images, reported with a bootstrap
confidence interval; NAG's gain over the baseline with a paired bootstrap interval.

    nag-jax bench --clip-score --clip-model openai/clip-vit-large-patch14 --prompts captions.txt \\
        --negative "Low resolution, blurry" --model black-forest-labs/FLUX.1-schnell --steps 4

generates the baseline and NAG images as two resumable batch jobs (OUTPUT/<steps>-steps/baseline,
.../NAG; nag_jax.batch), or with --from-jobs scores finished batch-job folders, and prints the rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SCORE_BATCH = 32  # images per compiled scoring call (the last call padded)


class CLIPScorer:
    """Both towers, the tokenizer and the preprocessing of a CLIPModel folder (or Hub id)."""

    def __init__(self, model, dtype="float32"):
        from convert.clip import load_clip, load_clip_vision
        from nag_jax.clip_preprocess import CLIPImagePreprocessor
        from nag_jax.resolve import resolve_clip_folder
        from nag_jax.tokenize import load_tokenizer

        folder = resolve_clip_folder(model)
        self.vision, self.vision_params = load_clip_vision(folder, dtype, projection=True)
        self.text, self.text_params = load_clip(folder, dtype=dtype, projection=True)
        self.tokenizer = load_tokenizer(folder)
        self.preprocess = CLIPImagePreprocessor.from_pretrained(folder)
        self.max_length = min(self.tokenizer.model_max_length, self.text.config.max_position_embeddings)

        def unit(x):
            x = x.astype(jnp.float32)
            return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

        def cosine(vision_params, text_params, pixels, ids):
            image = unit(self.vision.apply({"params": vision_params}, pixels).image_embeds)
            text = unit(self.text.apply({"params": text_params}, ids).text_embeds)
            return jnp.sum(image * text, axis=-1)

        self._cosine = jax.jit(cosine)

    def cosines(self, images, captions: list[str]) -> np.ndarray:
        """cos(image embedding, caption embedding) per (image, caption) pair; images as PIL or uint8 arrays."""
        from nag_jax.tokenize import tokenize

        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images for {len(captions)} captions; give one caption per image")
        out = []
        for start in range(0, len(images), SCORE_BATCH):
            pixels = self.preprocess(images[start:start + SCORE_BATCH])
            ids = tokenize(self.tokenizer, captions[start:start + SCORE_BATCH], self.max_length)
            count = len(ids)
            pad = lambda a: np.concatenate([a, np.repeat(a[-1:], SCORE_BATCH - count, axis=0)])  # noqa: E731
            out.append(np.asarray(self._cosine(self.vision_params, self.text_params, pad(pixels), pad(ids)))[:count])
        return np.concatenate(out)

    def scores(self, images, captions: list[str]) -> np.ndarray:
        """torchmetrics' CLIP score per pair: 100 * max(cos, 0)."""
        return 100.0 * np.maximum(self.cosines(images, captions), 0.0)


def bootstrap_interval(values, paired_with=None, resamples: int = 1000, confidence: float = 0.95, seed: int = 0):
    """Percentile bootstrap interval of mean(values) (or of mean(values - paired_with), resampling pairs)."""
    values = np.asarray(values, np.float64)
    if paired_with is not None:
        values = values - np.asarray(paired_with, np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def score_job(scorer: CLIPScorer, folder) -> tuple[list[str], np.ndarray]:
    """(file names, scores) of a finished batch-job folder, each image against its prompt, in manifest order."""
    from PIL import Image

    from nag_jax.batch import read_manifest

    records = sorted(read_manifest(Path(folder)).values(), key=lambda r: r["file"])
    if not records:
        raise ValueError(f"{folder}: no finished images (no manifest.jsonl lines); run the batch job first")
    images = [Image.open(Path(folder) / r["file"]).convert("RGB") for r in records]
    return [r["file"] for r in records], scorer.scores(images, [r["prompt"] for r in records])


def table_rows(model: str, steps, results: dict) -> dict:
    """One Table-1 row: the model, steps, and per method its mean score, interval and count."""
    row = {"model": model, "steps": steps}
    baseline = next(iter(results.values()))
    for method, values in results.items():
        entry = {"mean": float(np.mean(values)), "interval": bootstrap_interval(values), "images": len(values)}
        if values is not baseline and len(values) == len(baseline):
            entry["gain_interval"] = bootstrap_interval(values, paired_with=baseline)
        row[method] = entry
    return row


def format_table(rows: list[dict]) -> str:
    """Markdown in the layout of the paper's Table 1 CLIP column: Base. and NAG (+gain), 95% intervals."""
    methods = [key for key in rows[0] if key not in ("model", "steps")]
    head = "| Model | Steps | " + " | ".join(f"CLIP {m}" for m in methods) + " |"
    lines = [head, "|" + " --- |" * (2 + len(methods))]
    for row in rows:
        base = row[methods[0]]["mean"]
        cells = []
        for method in methods:
            entry = row[method]
            low, high = entry["interval"]
            cell = f"{entry['mean']:.2f} [{low:.2f}, {high:.2f}]"
            if "gain_interval" in entry:
                g_low, g_high = entry["gain_interval"]
                cell += f" ({entry['mean'] - base:+.2f}, [{g_low:+.2f}, {g_high:+.2f}])"
            cells.append(cell)
        lines.append(f"| {row['model']} | {row['steps']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="nag-jax bench --clip-score",
        description="Mean CLIP score (torchmetrics' definition) of baseline and NAG images, as the CLIP column of "
                    "the NAG paper's Table 1, with 95% bootstrap intervals.")
    parser.add_argument("--clip-model", required=True,
                        help="a CLIPModel folder or Hub id (openai/clip-vit-large-patch14)")
    parser.add_argument("--prompts", help="captions: .txt (one per line) or .jsonl (nag-jax generate --prompts)")
    parser.add_argument("--negative", default="Low resolution, blurry",
                        help="NAG's negative prompt (default: the paper's \"Low resolution, blurry\")")
    parser.add_argument("--model", default="sd-shapes", help="pipeline folder, embedded name or Hub id")
    parser.add_argument("--steps", type=int, nargs="+", help="step counts, one row each (default: the family's)")
    parser.add_argument("--nag-scale", type=float, help="NAG scale (default: the family's)")
    parser.add_argument("--seed", type=int, default=0, help="caption i gets seed SEED + i (default 0)")
    parser.add_argument("--batch-size", type=int, help="images per sampling call (default 4 per device)")
    parser.add_argument("--output", default="clip-score-images", help="folder for the batch jobs' images")
    parser.add_argument("--from-jobs", nargs="+", metavar="DIR",
                        help="score these finished batch-job folders instead (the first is the baseline)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    scorer = CLIPScorer(args.clip_model)
    if args.from_jobs:
        results = {Path(d).name: score_job(scorer, d)[1] for d in args.from_jobs}
        rows = [table_rows(args.model, "-", results)]
    elif args.prompts:
        rows = generate_and_score(scorer, args)
    else:
        parser.error("give --prompts (to generate the images) or --from-jobs DIR ...")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def generate_and_score(scorer: CLIPScorer, args) -> list[dict]:
    """Per step count: the baseline (no guidance) and NAG (at the family's or --nag-scale) as batch jobs, scored."""
    from nag_jax.batch import read_prompts_file, run_batch_job
    from nag_jax.efficacy import guidance_methods
    from nag_jax.pipeline import NAGPipeline

    captions = [line["prompt"] for line in read_prompts_file(args.prompts)]
    pipe = NAGPipeline.from_pretrained(args.model)
    family = pipe.family
    scales = None if args.nag_scale is None else [args.nag_scale]
    methods = guidance_methods(family, args.negative, nag_scales=scales)
    chosen = {"Base.": methods["none"], "NAG": next(v for k, v in methods.items() if k.startswith("NAG"))}
    rows = []
    for steps in args.steps or [family.defaults["num_inference_steps"]]:
        results = {}
        for name, settings in chosen.items():
            folder = Path(args.output) / f"{steps}-steps" / ("baseline" if name == "Base." else name)
            lines = [dict(settings, prompt=caption, seed=args.seed + i, num_inference_steps=steps)
                     for i, caption in enumerate(captions)]
            run_batch_job(pipe, lines, folder, args.batch_size, progress=not args.no_progress,
                          job={"model": str(args.model)})
            results[name] = score_job(scorer, folder)[1]
        rows.append(table_rows(str(args.model), steps, results))
    return rows
