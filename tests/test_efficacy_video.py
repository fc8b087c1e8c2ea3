"""The moving-shapes reader against the clip generator's ground truth, and the video efficacy rows."""

from types import SimpleNamespace

import numpy as np

from nag_jax.efficacy import format_table
from nag_jax.efficacy_video import (DIRECTION_NAMES, FRAMES, MOTION, SIZE, all_video_captions, clip_names, random_clips,
                                    read_clips, render_clips, run_video_efficacy, video_caption)
from nag_jax.families.wan import WAN_DEFAULTS, WanFamily


def _read_right(found, clips) -> dict[str, float]:
    wanted = [clip_names(clips, i) for i in range(len(found))]
    return {"colour": np.mean([f["colour"] == w[0] for f, w in zip(found, wanted)]),
            "direction": np.mean([f["direction"] == w[2] for f, w in zip(found, wanted)]),
            "background": np.mean([f["background"] == w[3] for f, w in zip(found, wanted)])}


def test_reader_reads_clean_clips_all_right():
    clips = random_clips(300, np.random.default_rng(3))
    videos = render_clips(clips)
    assert videos.shape == (300, FRAMES, SIZE, SIZE, 3)
    found = read_clips(videos)
    assert _read_right(found, clips) == {"colour": 1.0, "direction": 1.0, "background": 1.0}
    moves = [np.subtract(f["frames"][-1]["position"], f["frames"][0]["position"]) for f in found]
    assert all(abs(np.abs(move).max() - MOTION) < 1.5 for move in moves)  # the whole path stays in the frame


def test_reader_holds_under_blur_and_noise():
    """Decoded clips are soft-edged and noisy: a 3x3 box blur per frame plus noise must still read."""
    clips = random_clips(200, np.random.default_rng(4))
    videos = render_clips(clips).astype(np.float32)
    padded = np.pad(videos, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    blurred = sum(padded[:, :, i:i + SIZE, j:j + SIZE] for i in range(3) for j in range(3)) / 9
    noisy = np.clip(blurred + np.random.default_rng(5).normal(0, 8, blurred.shape), 0, 255) / 255.0
    accuracy = _read_right(read_clips(noisy), clips)
    assert accuracy["colour"] >= 0.98 and accuracy["direction"] >= 0.98


def test_reader_reports_a_still_or_empty_clip_as_no_direction():
    still = render_clips(dict(random_clips(1, np.random.default_rng(6)), direction=np.zeros(1, int)))
    still[:] = still[:, :1]  # every frame the first
    assert read_clips(still)[0]["direction"] is None
    empty = read_clips(np.full((1, FRAMES, SIZE, SIZE, 3), 20, np.uint8))[0]
    assert (empty["colour"], empty["direction"], empty["background"]) == (None, None, "black")


def test_video_captions_leave_attributes_out():
    assert video_caption("red", "circle", "left", "black") == "a red circle moving left on a black background"
    assert video_caption(None, "square", "up", None) == "a square moving up"
    assert video_caption("red", None, None, None) == "a red shape"
    assert len(set(all_video_captions())) == 7 * 4 * 5 * 4


class _MovingPipe:
    """Renders each prompt's direction; red clips unless NAG is on (blue then)."""

    family = SimpleNamespace(options=WanFamily.options, cfg_argument=WanFamily.cfg_argument, defaults=WAN_DEFAULTS,
                             video=True)

    def __call__(self, prompt, num_images_per_prompt, num_inference_steps, seed, output_type, check_finite, **settings):
        count = num_images_per_prompt
        direction = next(d for d in DIRECTION_NAMES if d in prompt)
        clips = dict(random_clips(count, np.random.default_rng(seed)), colour=np.full(count, 2 if "nag_scale" in settings else 0),
                     direction=np.full(count, DIRECTION_NAMES.index(direction)))
        return SimpleNamespace(frames=render_clips(clips), images=None)


def test_video_efficacy_counts_the_negative_colour_and_the_direction():
    rows = run_video_efficacy(_MovingPipe(), seeds=2, steps=(1,), negatives=("red",), log=lambda _: None)
    assert {row["method"]: row["negative_colour_rate"] for row in rows} == {"none": 1.0, "NAG": 0.0, "CFG": 1.0}
    assert all(row["direction_accuracy"] == 1.0 and row["images"] == 8 for row in rows)
    assert "| 1 | NAG | 0.0% | 100.0% | 8 |" in format_table(rows, attribute="direction")


def test_a_scale_sweep_runs_only_its_nag_rows():
    rows = run_video_efficacy(_MovingPipe(), seeds=1, steps=(2,), negatives=("red",), nag_scales=(3, 8),
                              methods=["NAG 3", "NAG 8"], log=lambda _: None)
    assert [row["method"] for row in rows] == ["NAG 3", "NAG 8"]
