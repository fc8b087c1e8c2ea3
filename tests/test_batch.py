"""Batch jobs: killed with SIGKILL and resumed, one compiled sampling program, images equal to
single NAGPipeline calls; resume bookkeeping (manifest, changed arguments, cut lines, orphans)."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from nag_jax import cli
from nag_jax.batch import MANIFEST, expected_records, pending_records, plan_batches, png_info, read_prompts_file
from nag_jax.pipeline import NAGPipeline

ROOT = Path(__file__).resolve().parents[1]
SHAPES, COLOURS = ("a circle", "a square", "a triangle"), ("red", "blue", "green", "yellow")
# 12 lines: NAG scales 3 and 5 alternate (traced: one program), negatives and seeds differ per line.
LINES = [{"prompt": SHAPES[i % 3], "nag_negative_prompt": COLOURS[i % 4], "nag_scale": 3 if i % 2 else 5,
          "seed": 100 + i} for i in range(12)]
JOB = ["generate", "--steps", "2", "--guidance-scale", "1", "--batch-size", "2", "--no-progress"]
COMPILED_LOOP = "Finished XLA compilation of jit(denoise_loop)"


@pytest.fixture(scope="module")
def pipe():
    return NAGPipeline.from_pretrained("sd-shapes")


def snapshot(folder: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.glob("*.png")}


def test_killed_job_resumes_with_one_program_and_single_call_images(tmp_path, pipe, caplog):
    prompts, output = tmp_path / "prompts.jsonl", tmp_path / "out"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in LINES))
    command = [sys.executable, "-m", "nag_jax.cli", *JOB, "--prompts", str(prompts), "--output", str(output)]
    log = tmp_path / "first-run.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_LOG_COMPILES="1")
    with open(log, "w") as stderr:
        job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        deadline = time.monotonic() + 120
        while not (output / MANIFEST).exists() or not (output / MANIFEST).read_text().strip():
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.01)
        job.send_signal(signal.SIGKILL)
        job.wait()
    before = {name: entry for name, entry in snapshot(output).items()
              if name in (output / MANIFEST).read_text()}  # finished = listed in the manifest
    assert 0 < len(before) < 12, "the kill must land mid-job"
    assert log.read_text().count(COMPILED_LOOP) == 1

    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING):
            assert cli.main([*JOB, "--prompts", str(prompts), "--output", str(output)]) == 0
    finally:
        jax.config.update("jax_log_compiles", False)
    assert caplog.text.count(COMPILED_LOOP) == 1  # every batch of the rerun, both NAG scales: one program

    after = snapshot(output)
    assert sorted(after) == [f"{i:06d}-0.png" for i in range(12)]
    for name, entry in before.items():
        assert after[name] == entry, f"{name} was rewritten"
    manifest = [json.loads(text) for text in (output / MANIFEST).read_text().splitlines()]
    assert sorted(record["file"] for record in manifest) == sorted(after)
    for record in manifest:
        line = LINES[record["line"]]
        assert {k: record[k] for k in line} == line
    for number, line in enumerate(LINES):
        single = pipe(line["prompt"], nag_negative_prompt=line["nag_negative_prompt"], nag_scale=line["nag_scale"],
                      seed=line["seed"], num_inference_steps=2, guidance_scale=1.0).images[0]
        ours = Image.open(output / f"{number:06d}-0.png")
        assert json.loads(ours.text["nag-jax"])["seed"] == line["seed"]
        difference = np.abs(np.asarray(ours, np.int16) - np.asarray(single, np.int16))
        assert difference.max() <= 1, (number, difference.max())  # rounding at the 8-bit step at most
    # Each line got its own NAG scale: line 0 (scale 5) made at scale 3 is far from its file.
    other = pipe("a circle", nag_negative_prompt="red", nag_scale=3, seed=100, num_inference_steps=2,
                 guidance_scale=1.0).images[0]
    assert np.abs(np.asarray(other, np.int16) - np.asarray(Image.open(output / "000000-0.png"), np.int16)).max() > 20


def test_txt_prompts_seeds_and_bad_lines(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("a circle\n\na square\n")
    assert read_prompts_file(text) == [{"prompt": "a circle"}, {"prompt": "a square"}]
    bad = tmp_path / "p.jsonl"
    for line, message in [('{"prompt": "a", "nag_scale": -1}', "line 1: nag_scale must be"),
                          ('{"prompt": "a", "colour": 1}', "unknown key(s) colour"),
                          ('{"prompt": "a", "num_images": 0}', "num_images must be a positive integer"),
                          ('{"negative_prompt": "a"}', 'a "prompt" string'), ("not json", "not JSON")]:
        bad.write_text(line + "\n")
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            read_prompts_file(bad)


def test_batches_group_static_settings_and_pad_nothing_across_groups():
    lines = [{"prompt": "a", "nag_scale": 3.0, "num_inference_steps": 2}, {"prompt": "b", "nag_scale": 3.0,
             "num_inference_steps": 4}, {"prompt": "c", "nag_scale": 3.0, "num_inference_steps": 2,
             "num_images_per_prompt": 3}, {"prompt": "d", "nag_scale": 3.0, "num_inference_steps": 2,
             "negative_prompt": "x"}]
    batches = plan_batches(expected_records(lines, {"model": "m"}), 2, {"model": "m"})
    assert [[r["file"] for r in batch] for batch in batches] == [
        ["000000-0.png", "000002-0.png"], ["000002-1.png", "000002-2.png"], ["000001-0.png"], ["000003-0.png"]]


def write_finished(folder: Path, record: dict) -> None:
    Image.new("RGB", (8, 8)).save(folder / record["file"], pnginfo=png_info(record))


def test_resume_bookkeeping(tmp_path):
    job = {"model": "m", "dtype": "float32"}
    records = expected_records([{"prompt": "a", "seed": 1, "num_images_per_prompt": 4}], job)
    for record in records[:3]:
        write_finished(tmp_path, record)
    (tmp_path / MANIFEST).write_text(json.dumps(records[0]) + "\n" + json.dumps(records[1]) + "\n"
                                     + json.dumps(records[2])[:20])  # a line cut by the kill
    (tmp_path / records[1]["file"]).write_bytes(b"\x89PNG truncated")  # listed, but damaged
    todo, finished = pending_records(tmp_path, records, overwrite=False)
    # 0: finished; 1: damaged, made again; 2: not in the manifest but its embedded record matches: adopted.
    assert [r["file"] for r in todo] == [records[1]["file"], records[3]["file"]]
    assert sorted(finished) == [records[0]["file"], records[2]["file"]]

    changed = expected_records([{"prompt": "a", "seed": 2, "num_images_per_prompt": 4}], job)
    with pytest.raises(ValueError, match=r"000000-0.png was made with seed=1 then, seed=2 now.*--overwrite"):
        pending_records(tmp_path, changed, overwrite=False)
    todo, finished = pending_records(tmp_path, changed, overwrite=True)
    assert len(todo) == 4 and not finished


def test_changed_argument_on_resume_is_a_one_line_cli_error(tmp_path, capsys):
    prompts, output = tmp_path / "p.txt", tmp_path / "out"
    prompts.write_text("a circle\n")
    output.mkdir()
    record = expected_records([{"prompt": "a circle", "seed": 0, "guidance_scale": 1.0}], {})[0]
    write_finished(output, record)
    (output / MANIFEST).write_text(json.dumps(record) + "\n")
    assert cli.main([*JOB, "--steps", "3", "--prompts", str(prompts), "--output", str(output)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("nag-jax: error:") and "000000-0.png was made with" in error and error.count("\n") == 1
