"""export_to_video: every format decodes back (by imageio / Pillow, not by our code) to the frames
written, with the metadata readable; inputs and bad arguments."""

import json

import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image, ImageSequence

import nag_jax
from nag_jax.video import export_to_video, read_video_metadata

FRAMES, HEIGHT, WIDTH = 5, 32, 48
# Quotes, ffmetadata's escapes (= ; # \), a newline and non-ASCII text must survive.
METADATA = {"prompt": 'a "red" fox; #1 = best\\\nnext line, café', "nag_scale": 5.0, "num_frames": FRAMES}


def moving_gradient():
    """float [F, H, W, 3] in [0, 1]: smooth ramps that shift every frame (compressible, but each
    frame differs)."""
    f, y, x = np.meshgrid(np.arange(FRAMES), np.arange(HEIGHT), np.arange(WIDTH), indexing="ij")
    red = (x + 4 * f) / (WIDTH + 4 * FRAMES)
    green = y / HEIGHT
    blue = 0.5 + 0.4 * np.sin(f / FRAMES * np.pi) * np.ones_like(red)
    return np.stack([red, green, blue], axis=-1).astype(np.float32)


def decode(path):
    if path.suffix == ".mp4":
        return np.stack(imageio.mimread(path, format="FFMPEG"))
    with Image.open(path) as image:
        return np.stack([np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)])


@pytest.mark.parametrize("suffix, mean_error", [(".mp4", 4.0), (".webp", 4.0), (".gif", 6.0)])
def test_each_format_decodes_back_with_its_metadata(tmp_path, suffix, mean_error):
    frames = moving_gradient()
    path = nag_jax.export_to_video(frames, tmp_path / f"clip{suffix}", fps=8, metadata=METADATA)
    assert path == tmp_path / f"clip{suffix}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left

    decoded = decode(path)
    assert decoded.shape == (FRAMES, HEIGHT, WIDTH, 3)
    expected = np.round(frames * 255)
    assert np.abs(decoded.astype(np.float32) - expected).mean() < mean_error
    # Frames stay in order: each decoded frame is nearest to its own input frame.
    distances = np.abs(decoded[:, None].astype(np.float32) - expected[None]).mean(axis=(2, 3, 4))
    np.testing.assert_array_equal(distances.argmin(axis=1), np.arange(FRAMES))
    assert json.loads(read_video_metadata(path)) == METADATA


def test_frame_rate_is_written(tmp_path):
    frames = moving_gradient()
    mp4 = export_to_video(frames, tmp_path / "clip.mp4", fps=12)
    assert imageio.get_reader(mp4, format="FFMPEG").get_meta_data()["fps"] == pytest.approx(12)
    gif = export_to_video(frames, tmp_path / "clip.gif", fps=10)
    with Image.open(gif) as image:
        assert image.info["duration"] == 100


def test_uint8_and_pil_frames_and_no_metadata(tmp_path):
    frames = np.round(moving_gradient() * 255).astype(np.uint8)
    from_uint8 = decode(export_to_video(frames, tmp_path / "a.webp"))
    from_pil = decode(export_to_video([Image.fromarray(f) for f in frames], tmp_path / "b.webp"))
    np.testing.assert_array_equal(from_uint8, from_pil)
    assert read_video_metadata(tmp_path / "a.webp") is None
    assert read_video_metadata(export_to_video(frames, tmp_path / "c.mp4")) is None


def test_an_existing_file_is_replaced_whole(tmp_path):
    path = tmp_path / "clip.gif"
    path.write_bytes(b"old")
    export_to_video(moving_gradient()[:2], path)
    assert len(decode(path)) == 2


@pytest.mark.parametrize(
    "frames, name, match",
    [
        (np.zeros((2, 8, 8, 3)), "clip.avi", "extension"),
        (np.zeros((2, 8, 8)), "clip.mp4", r"\[F, H, W, 3\]"),
        (np.zeros((2, 8, 8, 3), np.int32), "clip.mp4", "dtype"),
        (np.zeros((2, 9, 8, 3)), "clip.mp4", "even height and width"),
    ],
)
def test_bad_arguments_are_refused_and_write_nothing(tmp_path, frames, name, match):
    with pytest.raises(ValueError, match=match):
        export_to_video(frames, tmp_path / name)
    assert list(tmp_path.iterdir()) == []
