"""`nag-jax` end to end on the embedded model: generate, demo, and one-line errors.

The CLI runs in-process (`main(argv)`), so each call costs one model load and one compile, not
a fresh Python with JAX.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nag_jax import cli
from nag_jax.cli import embedded_model, main, output_paths

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def test_generate_to_a_folder_writes_pngs_with_their_parameters(tmp_path, capsys):
    out = tmp_path / "images"
    code = main(["generate", "--prompt", "a circle", "--nag-negative-prompt", "red", "--steps", "2", "--seed", "5",
                 "--no-progress", "--output", str(out)])
    assert code == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["image-0.png"]
    assert capsys.readouterr().out.strip() == str(files[0])
    image = Image.open(files[0])
    assert image.size == (64, 64)
    chunks = image.text
    assert chunks["prompt"] == "a circle" and chunks["nag_negative_prompt"] == "red"
    assert chunks["seed"] == "5" and chunks["num_inference_steps"] == "2"
    record = json.loads(chunks["nag-jax"])
    # --nag-negative-prompt alone turns NAG on at the family default; CFG keeps its default scale.
    assert record["nag_scale"] == 3.0 and record["nag_tau"] == 2.5 and record["nag_alpha"] == 0.375
    assert record["guidance_scale"] == 7.5 and record["model"] == str(embedded_model())
    assert np.asarray(image).std() > 5  # a picture, not a flat field


def test_generate_several_images_to_one_png_name_numbers_them(tmp_path):
    target = tmp_path / "shape.png"
    code = main(["generate", "--prompt", "a square", "--num-images", "2", "--steps", "1", "--guidance-scale", "1",
                 "--pag-scale", "1.5", "--pag-applied-layers", "mid", "up", "--no-progress", "--output", str(target)])
    assert code == 0
    first, second = tmp_path / "shape-0.png", tmp_path / "shape-1.png"
    assert first.exists() and second.exists() and not target.exists()
    assert json.loads(Image.open(second).text["nag-jax"])["image_index"] == 1
    record = json.loads(Image.open(first).text["nag-jax"])
    assert record["nag_scale"] == 1.0  # no NAG negative: NAG off
    assert record["pag_scale"] == 1.5 and record["pag_applied_layers"] == ["mid", "up"]
    assert not np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))


def test_demo_writes_a_labelled_grid(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "DEMO_STEPS", (1,))  # the full grid's 1/2/4 steps compile three times as much
    code = main(["demo", "--output-dir", str(tmp_path)])
    assert code == 0
    grid = Image.open(tmp_path / "nag-demo.png")
    columns, rows = 3, len(cli.DEMO_PAIRS)
    assert grid.width > columns * 128 and grid.height > rows * 128
    assert str((tmp_path / "nag-demo.png").resolve()) in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", "a circle", "--steps", "0", "--output", "x"], "num_inference_steps"),
    (["generate", "--prompt", "a circle", "--model", "/nonexistent/model"], "model_index.json"),
    (["generate", "--prompt", "a circle", "--output", "picture.jpg"], ".png"),
    (["generate", "--prompt", "a circle", "--pag-scale", "2", "--pag-applied-layers", "nowhere"], "'nowhere'"),
    (["convert", "/nonexistent/src", "/tmp/nag-jax-never-written"], "nonexistent"),
])
def test_bad_arguments_print_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("nag-jax: error: ") and err.count("\n") == 1 and message in err
    assert "Traceback" not in err


def test_argparse_errors_exit_2_without_traceback(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--steps", "3"])  # --prompt missing
    assert exit_info.value.code == 2
    assert "--prompt" in capsys.readouterr().err


def test_output_path_rules(tmp_path):
    assert output_paths(str(tmp_path / "a.png"), 1) == [tmp_path / "a.png"]
    assert output_paths(str(tmp_path / "a.png"), 2) == [tmp_path / "a-0.png", tmp_path / "a-1.png"]
    assert output_paths(str(tmp_path / "dir"), 2) == [tmp_path / "dir" / "image-0.png", tmp_path / "dir" / "image-1.png"]


def test_embedded_model_loads_in_diffusers_and_round_trips():
    """The folder is a real diffusers pipeline, and the trained weights written back by
    train_tiny.export_params are exactly what nag-jax's converters read."""
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.numpy import load_file

    from convert.unet import UNET_RULES, load_unet
    from train_tiny import export_params

    folder = embedded_model()
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    on_disk = load_file(str(unet_file))
    torch_weight = dict(pipe.unet.named_parameters())["conv_in.weight"].detach().numpy()
    np.testing.assert_array_equal(torch_weight, on_disk["conv_in.weight"])
    _, params = load_unet(folder / "unet")
    exported = export_params(unet_file, UNET_RULES, params)
    assert exported.keys() == on_disk.keys()
    for key in on_disk:
        np.testing.assert_array_equal(exported[key], on_disk[key])
    assert pipe.tokenizer("a red circle").input_ids[1:-1] == pipe.tokenizer.convert_tokens_to_ids(
        ["a</w>", "red</w>", "circle</w>"])
