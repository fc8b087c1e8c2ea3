"""The shapes-domain attribute reader against the data generator's ground truth."""

import numpy as np

from types import SimpleNamespace

from nag_jax.efficacy import (BACKGROUND_NAMES, COLOUR_NAMES, SHAPES, caption, format_accuracy_table, format_table,
                              prompt_accuracy, random_scenes, read_attributes, render, run_efficacy)
from nag_jax.families.flux import SCHNELL_DEFAULTS, FluxFamily
from nag_jax.families.unet import SD_DEFAULTS, StableDiffusionFamily

# What run_efficacy reads of a family, as the real SD1.5 and Flux-schnell families have it.
SD_FAMILY = SimpleNamespace(options=StableDiffusionFamily.options, cfg_argument=StableDiffusionFamily.cfg_argument,
                            defaults=SD_DEFAULTS, video=False)
FLUX_FAMILY = SimpleNamespace(options=FluxFamily.options, cfg_argument=FluxFamily.cfg_argument,
                              defaults=SCHNELL_DEFAULTS, video=False)


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


class _RenderingPipe:
    """Stands in for a model: draws each prompt's scene, with the colour swapped to green when
    `wrong_colour` (so colour accuracy must drop to the share of green captions)."""

    family = SD_FAMILY

    def __init__(self, wrong_colour=False):
        self.wrong_colour = wrong_colour
        self.scene_of = {caption(COLOUR_NAMES[c], SHAPES[s], BACKGROUND_NAMES[b]): (c, s, b)
                         for c in range(6) for s in range(3) for b in range(3)}

    def __call__(self, prompts, num_images_per_prompt, **settings):
        index = np.array([self.scene_of[p] for p in prompts for _ in range(num_images_per_prompt)])
        colour = np.full(len(index), COLOUR_NAMES.index("green")) if self.wrong_colour else index[:, 0]
        scenes = {"colour": colour, "shape": index[:, 1], "background": index[:, 2], "half": np.full(len(index), 14.0),
                  "cx": np.full(len(index), 32.0), "cy": np.full(len(index), 32.0)}
        return SimpleNamespace(images=render(scenes).astype(np.float32) / 255.0)


def test_prompt_accuracy_counts_each_attribute_against_its_caption():
    right = prompt_accuracy(_RenderingPipe(), seeds=2, steps=(4,), log=lambda _: None)
    assert right == [{"steps": 4, "images": 108, "colour_accuracy": 1.0, "shape_accuracy": 1.0,
                      "background_accuracy": 1.0}]
    wrong = prompt_accuracy(_RenderingPipe(wrong_colour=True), seeds=1, steps=(1,), log=lambda _: None)[0]
    assert abs(wrong["colour_accuracy"] - 1 / 6) < 1e-9 and wrong["shape_accuracy"] == 1.0
    assert "| 1 | 16.7% | 100.0% | 100.0% | 54 |" in format_accuracy_table([wrong])


def _scene(colour: str, count: int) -> dict:
    return {"colour": np.full(count, COLOUR_NAMES.index(colour)), "shape": np.zeros(count, int),
            "background": np.zeros(count, int), "half": np.full(count, 14.0), "cx": np.full(count, 32.0),
            "cy": np.full(count, 32.0)}


class _RecordingPipe:
    """Red circles, blue ones when `blue(settings)`; records each call's guidance settings."""

    def __init__(self, family, blue):
        self.family, self.blue, self.calls = family, blue, []

    def __call__(self, prompt, num_images_per_prompt, num_inference_steps, seed, output_type, check_finite,
                 **settings):
        self.calls.append(settings)
        return SimpleNamespace(images=render(_scene("blue" if self.blue(settings) else "red", num_images_per_prompt)))


def _efficacy(pipe, **choice):
    rows = run_efficacy(pipe, seeds=3, steps=(2,), prompts=(("a circle", "circle"),), negatives=("red",),
                        log=lambda _: None, **choice)
    assert all(row["shape_accuracy"] == 1.0 and row["images"] == 3 for row in rows)
    return {row["method"]: row["negative_colour_rate"] for row in rows}


def test_efficacy_sweeps_nag_scales_beside_no_guidance_and_cfg():
    pipe = _RecordingPipe(SD_FAMILY, lambda settings: settings.get("nag_scale", 1.0) > 4)
    assert _efficacy(pipe, nag_scales=(3, 5)) == {"none": 1.0, "NAG 3": 1.0, "NAG 5": 0.0, "CFG": 1.0}
    nag = {"guidance_scale": 1.0, "nag_negative_prompt": "red"}
    assert pipe.calls == [{"guidance_scale": 1.0}, dict(nag, nag_scale=3), dict(nag, nag_scale=5),
                          {"guidance_scale": 7.5, "negative_prompt": "red"}]


def test_flux_rows_are_both_nag_modes_and_true_cfg():
    """Flux: its guidance_scale is distilled guidance, so CFG is true_cfg_scale (default 4) with the
    negative prompt, and "none" leaves guidance_scale alone; NAG once per mode."""
    pipe = _RecordingPipe(FLUX_FAMILY, lambda settings: settings.get("nag_mode") == "shared-image"
                          or settings["true_cfg_scale"] > 1 and "negative_prompt" in settings)
    assert _efficacy(pipe) == {"none": 1.0, "NAG shared-image": 0.0, "NAG reference": 1.0, "CFG": 0.0}
    nag = {"true_cfg_scale": 1.0, "nag_scale": 5.0, "nag_negative_prompt": "red"}
    assert pipe.calls == [{"true_cfg_scale": 1.0}, dict(nag, nag_mode="shared-image"), dict(nag, nag_mode="reference"),
                          {"true_cfg_scale": 4.0, "negative_prompt": "red"}]
    pipe.calls.clear()
    assert list(_efficacy(pipe, nag_scales=(3,), cfg_scale=6.0)) == ["none", "NAG shared-image 3", "NAG reference 3",
                                                                    "CFG"]
    assert pipe.calls[-1] == {"true_cfg_scale": 6.0, "negative_prompt": "red"}
