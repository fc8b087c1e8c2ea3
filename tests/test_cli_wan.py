"""`nag-jax generate` on a tiny random Wan folder: an MP4 that decodes back to the asked frame
count and size, with the parameters in its metadata; clear one-line errors for a bad frame
count, a bad size, a missing image file, an I2V model without --image, and video flags on an
image model."""

from __future__ import annotations

import json

import imageio.v2 as imageio
import numpy as np
import pytest

from nag_jax import cli
from nag_jax.video import read_video_metadata
from tests.test_cli import assert_one_line_error, run
from tests.tiny_wan import build_tiny_wan_pipeline

WAN = ["generate", "--prompt", "a red cat", "--steps", "2", "--height", "32", "--width", "48", "--no-progress"]


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan_cli")
    build_tiny_wan_pipeline(folder)
    return folder


def test_generate_writes_an_mp4_of_the_asked_frames_and_size(wan_folder, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    assert run(WAN + ["--model", str(wan_folder), "--num-frames", "9", "--nag-negative-prompt", "blurry",
                      "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    frames = np.stack(imageio.mimread(out, format="FFMPEG"))
    assert frames.shape == (9, 32, 48, 3)
    metadata = json.loads(read_video_metadata(out))
    assert metadata["num_frames"] == 9 and metadata["nag_negative_prompt"] == "blurry" and metadata["nag_scale"] == 5.0


@pytest.mark.parametrize("extra, texts", [
    (["--num-frames", "8"], ["--num-frames", "'8'", "4k + 1"]),
    (["--num-frames", "0"], ["--num-frames", "'0'"]),
    (["--image", "missing.png", "--output", "a.mp4"], ["--image", "missing.png"]),
    (["--output", "clip.avi"], ["--output", "clip.avi"]),
])
def test_bad_video_flags_exit_2_before_loading(extra, texts, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "load_pipeline", None)  # loading a model would fail the test
    assert run(WAN + extra) == 2
    assert_one_line_error(capsys.readouterr().err, *texts)


@pytest.mark.parametrize("extra, texts", [
    (["--height", "40"], ["height", "multiple of 16", "40"]),
    (["--image", "first.png"], ["image", "image-to-video"]),
    (["--output", "still.png"], ["--output", "still.png", "mp4"]),
])
def test_model_dependent_video_errors(wan_folder, extra, texts, capsys, monkeypatch, tmp_path):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (32, 32)).save(tmp_path / "first.png")
    assert run(WAN + ["--model", str(wan_folder)] + extra) == 2
    assert_one_line_error(capsys.readouterr().err, *texts)


def test_video_flags_on_an_image_model(capsys, tmp_path):
    assert run(["generate", "--prompt", "a circle", "--num-frames", "5", "--output", str(tmp_path / "x")]) == 2
    assert_one_line_error(capsys.readouterr().err, "makes images", "--num-frames")
