"""Batch generation jobs: many prompts -> PNG files in a folder, resumable after a crash.

    from nag_jax import NAGPipeline
    from nag_jax.batch import run_batch_job

    pipe = NAGPipeline.from_pretrained("sd-shapes")
    lines = [{"prompt": "a circle", "nag_negative_prompt": "red", "nag_scale": 3.0, "seed": 0},
             {"prompt": "a square", "seed": 1, "num_images_per_prompt": 2}]
    run_batch_job(pipe, lines, "out/")

Each line is a set of `NAGPipeline.__call__` arguments; its image k is the image k of
`pipe(**line)` (the same noise: (seed, k)), written to OUTPUT/{line:06d}-{k}.png. Images are
sampled `batch_size` at a time: lines are grouped by their settings (everything but the texts
and the seed) and each group is cut into batches of exactly `batch_size` images (the last one
padded), so one compiled sampling program serves every batch of a group; guidance scales are
traced values, so lines differing only in scales share the program too.

Every image is written as soon as its batch finishes, atomically (a temporary name, then a
rename), with its parameters in PNG text chunks, and then gets one line in OUTPUT/manifest.jsonl.
Rerunning the same job skips the images the manifest lists (when their files are intact), so a
crash or kill loses at most the batch in flight; a finished file is never rewritten. An image
whose parameters changed since the manifest recorded it is an error naming the parameter,
unless `overwrite=True` (then it is made again).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from nag_jax.pipeline import ARGUMENT_RANGES, check_argument

MANIFEST = "manifest.jsonl"
TEXT_ARGUMENTS = ("prompt", "negative_prompt", "nag_negative_prompt")
ROWS_PER_DEVICE = 4  # the default batch: this many images per device
INTEGER_KEYS = ("seed", "num_images", "num_inference_steps", "height", "width")
# What a JSONL line may set: the texts, integers and the pipeline's ranged numeric arguments.
LINE_KEYS = (*TEXT_ARGUMENTS, *INTEGER_KEYS, *ARGUMENT_RANGES)


@dataclasses.dataclass
class BatchJobResult:
    written: list  # paths written by this run
    skipped: int  # images already finished before this run
    seconds: float

    @property
    def summary(self) -> str:
        rate = len(self.written) / self.seconds if self.seconds > 0 else 0.0
        return (f"{len(self.written)} images written, {self.skipped} already finished, in {self.seconds:.1f} s "
                f"({rate:.2f} images/s)")


def read_prompts_file(path) -> list[dict]:
    """A prompts file -> one dict per non-empty line. A .jsonl file: JSON objects with `prompt`
    and optionally any of LINE_KEYS; any other file: one prompt per line. Values are checked
    here, so a bad line is an error naming the file and line before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        where = f"--prompts {path} line {number}"
        if path.suffix != ".jsonl":
            lines.append({"prompt": text.strip()})
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not JSON ({error})") from None
        if not isinstance(line, dict) or not isinstance(line.get("prompt"), str):
            raise ValueError(f"{where}: expected an object with a \"prompt\" string")
        unknown = sorted(set(line) - set(LINE_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(LINE_KEYS)}")
        for key, value in line.items():
            if key in ARGUMENT_RANGES:
                try:
                    check_argument(key, value)
                except ValueError as error:
                    raise ValueError(f"{where}: {error}") from None
            elif key in TEXT_ARGUMENTS[1:] and value is not None and not isinstance(value, str):
                raise ValueError(f"{where}: {key} must be a string, got {value!r}")
            elif key in INTEGER_KEYS and (not isinstance(value, int) or isinstance(value, bool)
                                          or (value <= 0 and key != "seed")):
                kind = "an integer" if key == "seed" else "a positive integer"
                raise ValueError(f"{where}: {key} must be {kind}, got {value!r}")
        lines.append(line)
    if not lines:
        raise ValueError(f"--prompts {path}: no prompts in the file")
    return lines


def output_name(line: int, image: int) -> str:
    return f"{line:06d}-{image}.png"


def expected_records(lines: list[dict], job: dict) -> list[dict]:
    """One record per output image: its file name, line, image index, the texts, its seed and
    every other call argument of its line, plus the job's `job` entries (model, dtype)."""
    records = []
    for number, line in enumerate(lines):
        if not isinstance(line.get("prompt"), str):
            raise ValueError(f"line {number}: prompt must be a string, got {line.get('prompt')!r}")
        arguments = {k: v for k, v in line.items() if k != "num_images_per_prompt"}
        arguments.setdefault("seed", 0)
        for image in range(line.get("num_images_per_prompt", 1)):
            records.append({"file": output_name(number, image), "line": number, "image_index": image,
                            **arguments, **job})
    return records


def shared_settings(record: dict, job: dict) -> dict:
    """The call arguments a batch shares: all but the texts, the seed and the bookkeeping."""
    return {k: v for k, v in record.items() if k not in (*TEXT_ARGUMENTS, "seed", "file", "line", "image_index", *job)}


def group_key(record: dict, job: dict) -> str:
    """Records with equal keys can share a batch: the same shared settings, and a negative prompt
    given for all or for none (it changes CFG's uncond rows)."""
    return json.dumps([shared_settings(record, job), record.get("negative_prompt") is None], sort_keys=True)


def plan_batches(records: list[dict], batch_size: int, job: dict) -> list[list[dict]]:
    """The records cut into batches of at most `batch_size`, each within one group, in line order."""
    groups: dict[str, list] = {}
    for record in records:
        groups.setdefault(group_key(record, job), []).append(record)
    return [members[i:i + batch_size] for members in groups.values() for i in range(0, len(members), batch_size)]


def read_manifest(folder: Path) -> dict[str, dict]:
    """file name -> record of every complete manifest line (a line cut short by a kill is dropped)."""
    path = folder / MANIFEST
    finished = {}
    if path.exists():
        for text in path.read_text().splitlines():
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "file" in record:
                finished[record["file"]] = record
    return finished


def _intact(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def _embedded_record(path: Path) -> dict | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return json.loads(image.text.get("nag-jax", "null"))
    except (OSError, SyntaxError, ValueError):
        return None


def _changed(recorded: dict, expected: dict) -> str | None:
    for key in sorted(set(recorded) | set(expected)):
        if recorded.get(key) != expected.get(key):
            return f"{key}={recorded.get(key)!r} then, {key}={expected.get(key)!r} now"
    return None


def pending_records(folder: Path, records: list[dict], overwrite: bool) -> tuple[list[dict], dict[str, dict]]:
    """(records still to make, finished records to keep). An intact file the manifest lists with
    the same parameters is finished; one the manifest does not list (killed between the rename and
    the manifest line) is adopted when its embedded parameters match. Changed parameters raise
    ValueError unless `overwrite`."""
    manifest = read_manifest(folder)
    todo, finished = [], {}
    for record in records:
        path = folder / record["file"]
        recorded = manifest.get(record["file"]) or (_embedded_record(path) if path.exists() else None)
        if recorded is None or not _intact(path):
            todo.append(record)
            continue
        change = _changed(recorded, record)
        if change is None:
            finished[record["file"]] = record
        elif overwrite:
            todo.append(record)
        else:
            raise ValueError(f"{folder / MANIFEST}: {record['file']} was made with {change}; rerun with the same "
                             "arguments to resume, or pass --overwrite (overwrite=True) to make it again")
    return todo, finished


def png_info(record: dict):
    """PNG text chunks: every parameter, and one JSON chunk ("nag-jax") that reproduces the image."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in record.items():
        info.add_text(key, "" if value is None else str(value))
    info.add_text("nag-jax", json.dumps(record))
    return info


def _write_atomically(image, path: Path, record: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    image.save(temporary, format="PNG", pnginfo=png_info(record))
    os.replace(temporary, path)


def _append(path: Path, records: list[dict]) -> None:
    with open(path, "a") as handle:
        handle.write("".join(json.dumps(record) + "\n" for record in records))
        handle.flush()
        os.fsync(handle.fileno())


def _batch_call(pipe, batch: list[dict], batch_size: int, job: dict):
    """`pipe` on one batch padded to `batch_size` rows (copies of the last), outputs of the real rows."""
    rows = batch + batch[-1:] * (batch_size - len(batch))
    negatives = None if rows[0].get("negative_prompt") is None else [r["negative_prompt"] for r in rows]
    # The pipeline's own rule for a missing NAG negative prompt, per row.
    nag_negatives = [r.get("nag_negative_prompt") if r.get("nag_negative_prompt") is not None
                     else (r.get("negative_prompt") or "") for r in rows]
    images = pipe([r["prompt"] for r in rows], negative_prompt=negatives, nag_negative_prompt=nag_negatives,
                  image_seeds=[(r["seed"], r["image_index"]) for r in rows], check_finite=True,
                  **shared_settings(rows[0], job)).images
    return images[:len(batch)]


def default_batch_size() -> int:
    import jax

    return ROWS_PER_DEVICE * jax.device_count()


def run_batch_job(pipe, lines: list[dict], output_dir, batch_size: int | None = None, overwrite: bool = False,
                  progress: bool = True, job: dict | None = None) -> BatchJobResult:
    """Make every image of `lines` (NAGPipeline call arguments each, num_images_per_prompt
    included) into `output_dir`, skipping those already finished; see the module docstring.
    `job`: entries recorded with every image and checked on resume (the CLI records model and dtype).
    `batch_size` (default: ROWS_PER_DEVICE per device) is the images per compiled call."""
    from tqdm.auto import tqdm

    job = dict(job or {})
    batch_size = default_batch_size() if batch_size is None else batch_size
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    records = expected_records(lines, job)
    todo, finished = pending_records(folder, records, overwrite)
    # The manifest rewritten to its finished lines (drops a cut line and the records made again).
    manifest = folder / MANIFEST
    temporary = folder / f".{MANIFEST}.tmp"
    temporary.write_text("".join(json.dumps(finished[r["file"]]) + "\n" for r in records if r["file"] in finished))
    os.replace(temporary, manifest)

    written, started = [], time.perf_counter()
    with tqdm(total=len(todo), desc="batch job", unit="img", disable=not progress, file=sys.stderr) as bar:
        for batch in plan_batches(todo, batch_size, job):
            images = _batch_call(pipe, batch, batch_size, job)
            for image, record in zip(images, batch):
                _write_atomically(image, folder / record["file"], record)
                written.append(folder / record["file"])
            _append(manifest, batch)
            bar.update(len(batch))
    return BatchJobResult(written, len(finished), time.perf_counter() - started)
