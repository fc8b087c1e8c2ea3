"""The shapes-domain attribute reader against the data generator's ground truth."""

import numpy as np

from nag_jax.efficacy import (BACKGROUND_NAMES, COLOUR_NAMES, SHAPES, caption, format_table, random_scenes,
                              read_attributes, render)


def _accuracy(found, scenes, attribute, names):
    return np.mean([f[attribute] == names[i] for f, i in zip(found, scenes[attribute])])


def test_reader_matches_the_generator():
    scenes = random_scenes(600, np.random.default_rng(7))
    found = read_attributes(render(scenes))
    assert _accuracy(found, scenes, "colour", COLOUR_NAMES) >= 0.95
    assert _accuracy(found, scenes, "shape", SHAPES) >= 0.95
    assert _accuracy(found, scenes, "background", BACKGROUND_NAMES) >= 0.95


def test_reader_survives_decoder_like_blur_and_noise():
    """Model outputs are soft-edged and slightly noisy: a 3x3 box blur plus noise must still read."""
    scenes = random_scenes(300, np.random.default_rng(8))
    images = render(scenes).astype(np.float32)
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    blurred = sum(padded[:, i:i + 64, j:j + 64] for i in range(3) for j in range(3)) / 9
    noisy = np.clip(blurred + np.random.default_rng(9).normal(0, 6, blurred.shape), 0, 255) / 255.0
    found = read_attributes(noisy)  # float images in [0, 1]
    assert _accuracy(found, scenes, "colour", COLOUR_NAMES) >= 0.95
    assert _accuracy(found, scenes, "shape", SHAPES) >= 0.9


def test_reader_reports_an_empty_image_as_no_shape():
    blank = np.full((1, 64, 64, 3), 128, np.uint8)
    assert read_attributes(blank) == [{"background": "gray", "colour": None, "shape": None}]


def test_captions_leave_attributes_out():
    assert caption("red", "circle", "white") == "a red circle on a white background"
    assert caption(None, "circle", None) == "a circle"
    assert caption("red", None, None) == "a red shape"
    assert caption(None, None, "black") == "a shape on a black background"


def test_table_lists_every_row():
    rows = [{"steps": 1, "method": "NAG", "images": 10, "negative_colour_rate": 0.1, "shape_accuracy": 0.9}]
    table = format_table(rows)
    assert "| 1 | NAG | 10.0% | 90.0% | 10 |" in table
