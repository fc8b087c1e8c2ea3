"""CLIP score: parity with transformers' CLIPModel on a tiny random CLIP, the bootstrap, and the
Table-1 bench on the embedded sd-shapes model."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from nag_jax import cli
from nag_jax.clip_score import CLIPScorer, bootstrap_interval
from tests.tiny_components import save_tiny_clip_model

CAPTIONS = ["a photo of a cat", "a dog", "the cat", "a photo of the dog", "a circle", "a red square"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    save_tiny_clip_model(folder, seed=5)
    return folder


def reference_cosines(folder, images, captions) -> np.ndarray:
    """What torchmetrics' CLIPScore computes before the 100 * max(., 0): transformers end to end."""
    model = CLIPModel.from_pretrained(folder).eval()
    pixels = CLIPImageProcessorPil.from_pretrained(folder)(images=images, return_tensors="pt")["pixel_values"]
    tokens = AutoTokenizer.from_pretrained(folder)(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels).pooler_output
        text = model.get_text_features(**tokens).pooler_output
    image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
    return (image * text).sum(-1).numpy()


def test_clip_score_matches_transformers(tiny_clip):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 50, 3), dtype=np.uint8)) for i in range(6)]
    reference = reference_cosines(tiny_clip, images, CAPTIONS)
    assert (reference > 0).any() and (reference < 0).any()  # both sides of the clamp are exercised
    scorer = CLIPScorer(tiny_clip)
    np.testing.assert_allclose(100 * scorer.cosines(images, CAPTIONS), 100 * reference, atol=1e-4, rtol=0)
    np.testing.assert_allclose(scorer.scores(images, CAPTIONS), 100 * np.maximum(reference, 0), atol=1e-4, rtol=0)


def test_bootstrap_interval():
    values = np.random.default_rng(1).normal(30.0, 2.0, 400)
    low, high = bootstrap_interval(values)
    assert low < values.mean() < high and 0.2 < high - low < 0.6  # about 2 * 1.96 * 2 / sqrt(400) = 0.39
    assert bootstrap_interval(values + 1.5, paired_with=values) == pytest.approx((1.5, 1.5))


def test_clip_score_bench_on_the_embedded_model(tiny_clip, tmp_path, capsys):
    prompts = tmp_path / "captions.txt"
    prompts.write_text("a circle\na square\na triangle\na circle on a black background\n")
    output = tmp_path / "images"
    argv = ["bench", "--clip-score", "--clip-model", str(tiny_clip), "--prompts", str(prompts), "--negative", "red",
            "--steps", "1", "--batch-size", "4", "--output", str(output), "--no-progress"]
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    assert "| Model | Steps | CLIP Base. | CLIP NAG |" in table
    row = next(line for line in table.splitlines() if line.startswith("| sd-shapes | 1 |"))
    means = [float(cell.split()[0]) for cell in row.strip("| ").split(" | ")[2:]]
    captions = prompts.read_text().splitlines()
    for mean, method in zip(means, ("baseline", "NAG")):
        images = [Image.open(output / "1-steps" / method / f"{i:06d}-0.png") for i in range(4)]
        expected = np.mean(100 * np.maximum(reference_cosines(tiny_clip, images, captions), 0))
        assert mean == pytest.approx(expected, abs=0.006)  # the table rounds to 0.01
    baseline, nag = (np.asarray(Image.open(output / "1-steps" / m / "000000-0.png"), np.int16)
                     for m in ("baseline", "NAG"))
    assert np.abs(baseline - nag).max() > 5  # NAG changed the images it scored (8-bit rounding moves them by 1)
    # The same rows from the finished batch-job folders, without generating.
    assert cli.main(["bench", "--clip-score", "--clip-model", str(tiny_clip), "--from-jobs",
                     str(output / "1-steps" / "baseline"), str(output / "1-steps" / "NAG")]) == 0
    assert f"{means[0]:.2f} [" in capsys.readouterr().out
