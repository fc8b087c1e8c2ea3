"""`nag-jax` end to end on the embedded model: generate, demo, and one-line errors.

The CLI runs in-process (`main(argv)`), so each call costs one model load and one compile, not
a fresh Python with JAX.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.layers import CrossAttentionCore
from nag_jax import cli, intercept
from nag_jax.cli import embedded_model, main, output_paths

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def generate_one(out: Path, capsys, *argv) -> tuple[Image.Image, dict]:
    """`nag-jax generate ARGV --no-progress --output OUT` (a folder) makes one PNG and prints its
    path: the image and its JSON record of parameters."""
    assert main(["generate", *argv, "--no-progress", "--output", str(out)]) == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["image-0.png"]
    assert capsys.readouterr().out.strip() == str(files[0])
    image = Image.open(files[0])
    assert image.size == (64, 64)
    assert np.asarray(image).std() > 5  # a picture, not a flat field
    return image, json.loads(image.text["nag-jax"])


def test_generate_to_a_folder_writes_pngs_with_their_parameters(tmp_path, capsys):
    image, record = generate_one(tmp_path / "images", capsys, "--prompt", "a circle", "--nag-negative-prompt", "red",
                                 "--steps", "2", "--seed", "5")
    chunks = image.text
    assert chunks["prompt"] == "a circle" and chunks["nag_negative_prompt"] == "red"
    assert chunks["seed"] == "5" and chunks["num_inference_steps"] == "2"
    # --nag-negative-prompt alone turns NAG on at the family default; CFG keeps its default scale.
    assert record["nag_scale"] == 3.0 and record["nag_tau"] == 2.5 and record["nag_alpha"] == 0.375
    assert record["guidance_scale"] == 7.5 and record["model"] == str(embedded_model())


def test_generate_on_the_embedded_flux_model_by_name(tmp_path, capsys):
    """--model flux-shapes: 64x64 without --height (its transformer config's sample_size), Flux's
    NAG defaults, true CFG."""
    image, record = generate_one(tmp_path, capsys, "--model", "flux-shapes", "--prompt", "a circle",
                                 "--nag-negative-prompt", "red", "--negative-prompt", "blue", "--true-cfg-scale", "4",
                                 "--steps", "2", "--nag-norm", "l2")
    assert image.text["prompt"] == "a circle" and image.text["nag_negative_prompt"] == "red"
    assert record["nag_scale"] == 5.0 and record["nag_tau"] == 2.5 and record["nag_alpha"] == 0.25
    assert record["true_cfg_scale"] == 4.0 and record["negative_prompt"] == "blue" and record["nag_norm"] == "l2"
    assert record["height"] == record["width"] == 64 and record["model"] == str(embedded_model("flux-shapes"))


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


def demo_cell(grid: Image.Image, row: int, column: int) -> np.ndarray:
    """One image of the demo grid, by the layout constants of nag_jax.cli."""
    step = cli.DEMO_CELL + cli.DEMO_PAD
    x, y = cli.DEMO_LABEL_WIDTH + column * step, cli.DEMO_HEADER + row * step
    return np.asarray(grid.crop((x, y, x + cli.DEMO_CELL, y + cli.DEMO_CELL)), np.float32)


def test_demo_writes_a_labelled_grid_of_the_embedded_models(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "DEMO_STEPS", (1,))  # the full grid's 1/2/4 steps compile three times as much
    code = main(["demo", "--output-dir", str(tmp_path)])
    assert code == 0
    grid = Image.open(tmp_path / "nag-demo.png")
    step, rows = cli.DEMO_CELL + cli.DEMO_PAD, len(cli.DEMO_PAIRS)
    assert grid.size == (cli.DEMO_LABEL_WIDTH + 3 * step, cli.DEMO_HEADER + 3 * rows * step)
    out = capsys.readouterr().out
    assert str((tmp_path / "nag-demo.png").resolve()) in out
    # sd-shapes' rows, flux-shapes', then wan-shapes' (still strips): NAG and CFG (Flux: true CFG) change the cell
    for block in range(3):
        none, nag, cfg = (demo_cell(grid, block * rows, column) for column in range(3))
        assert np.abs(nag - none).max() > 0 and np.abs(cfg - none).max() > 0, block
    video = Image.open(tmp_path / "nag-demo-wan-shapes.webp")  # the animated grid: one frame per video frame
    assert video.n_frames == 9 and str((tmp_path / "nag-demo-wan-shapes.webp").resolve()) in out


def test_demo_without_an_embedded_model_names_it(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "EMBEDDED_MODELS", ("sd-shapes", "not-shipped"))
    monkeypatch.setattr(cli, "load_pipeline", None)  # the check comes before any model is loaded
    assert run(["demo", "--output-dir", str(tmp_path)]) == 2
    assert_one_line_error(capsys.readouterr().err, "embedded model not-shipped is missing")


def run(argv) -> int:
    """main(argv)'s exit status, whether it returns it or argparse exits."""
    try:
        return main(argv)
    except SystemExit as exit_info:
        return exit_info.code


def assert_one_line_error(err: str, *names_and_values: str):
    """stderr is exactly one `nag-jax[ COMMAND]: error: ...` line that names each given text."""
    assert re.fullmatch(r"nag-jax( \w+)?: error: [^\n]+\n", err), err
    assert "Traceback" not in err
    for text in names_and_values:
        assert text in err, (text, err)


GENERATE = ["generate", "--prompt", "a circle"]
# Rejected while parsing, before any model is read: (extra arguments, texts the line must hold)
BAD_FLAGS = [
    (["--steps", "0"], ["--steps", "'0'"]),
    (["--steps", "-3"], ["--steps", "'-3'"]),
    (["--steps", "2.5"], ["--steps", "'2.5'"]),
    (["--num-images", "0"], ["--num-images", "'0'"]),
    (["--num-images", "many"], ["--num-images", "'many'"]),
    (["--height", "-64"], ["--height", "'-64'"]),
    (["--width", "0"], ["--width", "'0'"]),
    (["--nag-scale", "-0.5"], ["--nag-scale", "-0.5"]),
    (["--nag-scale", "nan"], ["--nag-scale", "nan"]),
    (["--nag-tau", "0"], ["--nag-tau", "0.0"]),
    (["--nag-tau", "-1"], ["--nag-tau", "-1.0"]),
    (["--nag-tau", "high"], ["--nag-tau", "'high'"]),
    (["--nag-alpha", "-0.1"], ["--nag-alpha", "-0.1"]),
    (["--nag-alpha", "1.5"], ["--nag-alpha", "1.5"]),
    (["--nag-end", "0"], ["--nag-end", "0.0"]),
    (["--nag-end", "1.2"], ["--nag-end", "1.2"]),
    (["--guidance-scale", "-2"], ["--guidance-scale", "-2.0"]),
    (["--true-cfg-scale", "-1"], ["--true-cfg-scale", "-1.0"]),
    (["--pag-scale", "-1"], ["--pag-scale", "-1.0"]),
    (["--pag-adaptive-scale", "-0.1"], ["--pag-adaptive-scale", "-0.1"]),
    (["--dtype", "float8"], ["--dtype", "'float8'"]),
    (["--seed", "abc"], ["--seed", "'abc'"]),
    (["--nag-scael", "3"], ["--nag-scael"]),
    (["--output", "picture.jpg"], ["--output", "picture.jpg"]),
    (["--nag-norm", "l3"], ["--nag-norm", "'l3'"]),
    (["--image", "missing.png"], ["--image", "missing.png"]),
]


@pytest.mark.parametrize("extra, texts", BAD_FLAGS, ids=[" ".join(case[0]) for case in BAD_FLAGS])
def test_bad_flag_exits_2_with_one_line_before_loading_a_model(extra, texts, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "load_pipeline", None)  # loading a model would fail the test
    assert run(GENERATE + extra) == 2
    assert_one_line_error(capsys.readouterr().err, *texts)


def test_other_commands_bad_arguments_exit_2_with_one_line(capsys, tmp_path):
    cases = [
        (["generate", "--steps", "3"], ["--prompt"]),  # --prompt missing
        (["paint"], ["'paint'"]),
        (["convert", "/nonexistent/src", str(tmp_path / "out")], ["src", "/nonexistent/src"]),
        (["convert", str(embedded_model()), str(tmp_path)], ["dst", str(tmp_path)]),  # exists already
        (["convert", str(embedded_model()), str(tmp_path / "out"), "--dtype", "fp16"], ["--dtype", "'fp16'"]),
    ]
    for argv, texts in cases:
        assert run(argv) == 2, argv
        assert_one_line_error(capsys.readouterr().err, *texts)
    assert not (tmp_path / "out").exists()


def test_unwritable_output_is_refused_before_loading(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "load_pipeline", None)
    (tmp_path / "file.txt").write_text("not a folder")
    target = str(tmp_path / "file.txt" / "images")
    assert run(GENERATE + ["--output", target]) == 2
    assert_one_line_error(capsys.readouterr().err, "--output", target)


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory):
    """Copies of the embedded model: without vae/, with a truncated UNet file, with a UNet config
    that does not match its weights (several mismatches: a multi-line ConversionError)."""
    root = tmp_path_factory.mktemp("broken")
    models = {name: root / name for name in ("no vae", "truncated unet", "config mismatch")}
    for folder in models.values():
        shutil.copytree(embedded_model(), folder)
    shutil.rmtree(models["no vae"] / "vae")
    weights = models["truncated unet"] / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    config_path = models["config mismatch"] / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["block_out_channels"] = [16, 64]
    config_path.write_text(json.dumps(config))
    return models


@pytest.mark.parametrize("case, texts", [
    ("nonexistent", ["--model", "/nonexistent/model", "model_index.json"]),
    ("no vae", ["--model", "no vae", "vae/"]),
    ("truncated unet", ["--model", "diffusion_pytorch_model.safetensors", "corrupt"]),
    ("config mismatch", ["--model", "does not match", "wrong shape"]),
])
def test_bad_model_exits_2_with_one_line(broken_models, case, texts, capsys, tmp_path):
    model = broken_models.get(case, "/nonexistent/model")
    assert run(GENERATE + ["--model", str(model), "--output", str(tmp_path)]) == 2
    assert_one_line_error(capsys.readouterr().err, *texts)
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("extra, texts", [
    (["--height", "62"], ["height", "62", "multiple of"]),
    (["--width", "30"], ["width", "30", "multiple of"]),
    (["--pag-scale", "2", "--pag-applied-layers", "nowhere"], ["pag_applied_layers", "'nowhere'"]),
    (["--true-cfg-scale", "4"], ["true_cfg_scale", "Stable Diffusion"]),  # a Flux option
])
def test_model_dependent_bad_argument_exits_2_with_one_line(extra, texts, capsys, tmp_path):
    assert run(GENERATE + extra + ["--output", str(tmp_path)]) == 2
    assert_one_line_error(capsys.readouterr().err, *texts)


def test_nag_on_a_model_without_nag_transform_exits_2_with_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.delitem(intercept._TRANSFORMS, (CrossAttentionCore, "__call__"))
    assert run(GENERATE + ["--nag-negative-prompt", "red", "--output", str(tmp_path)]) == 2
    assert_one_line_error(capsys.readouterr().err, "nag_scale", "3.0", "NAG transform")


def test_real_process_prints_one_line_and_no_traceback(tmp_path):
    """What reaches a terminal: a parse-time error and one found after the model is loaded."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    for extra, texts in ((["--nag-alpha", "1.5"], ["--nag-alpha", "1.5"]), (["--height", "62"], ["height", "62"])):
        done = subprocess.run([sys.executable, "-m", "nag_jax.cli"] + GENERATE + extra + ["--output", str(tmp_path)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and done.stdout == ""
        assert_one_line_error(done.stderr, *texts)


def test_output_path_rules(tmp_path):
    assert output_paths(str(tmp_path / "a.png"), 1) == [tmp_path / "a.png"]
    assert output_paths(str(tmp_path / "a.png"), 2) == [tmp_path / "a-0.png", tmp_path / "a-1.png"]
    assert output_paths(str(tmp_path / "dir"), 2) == [tmp_path / "dir" / "image-0.png", tmp_path / "dir" / "image-1.png"]


@pytest.mark.parametrize("name", ("sd-shapes", "flux-shapes"))  # the video model: tests/test_wan_shapes.py
def test_embedded_model_makes_diffusers_image(name):
    """diffusers loads the folder (its own pipeline class from model_index.json) and makes our image
    from the same latents; ours without height or max_sequence_length (Flux: from the folder)."""
    import torch
    from diffusers import DiffusionPipeline

    from nag_jax.pipeline import NAGPipeline

    folder = embedded_model(name)
    ours, theirs = NAGPipeline.from_pretrained(folder), DiffusionPipeline.from_pretrained(str(folder))
    family = ours.family
    latents = np.random.default_rng(0).standard_normal((1, *family.latent_shape(64, 64))).astype(np.float32)
    no_cfg = {family.cfg_argument: 1.0}
    flux = {}
    if name == "flux-shapes":
        # diffusers' FluxPipeline decodes latents / scaling_factor + shift_factor: None fails there
        assert theirs.vae.config.shift_factor is not None, "flux-shapes/vae/config.json needs a shift_factor (0.0)"
        flux = {"max_sequence_length": theirs.tokenizer_2.model_max_length}
    images = ours("a red circle", num_inference_steps=2, latents=latents, output_type="np", **no_cfg).images
    with torch.no_grad():
        reference = theirs("a red circle", num_inference_steps=2, latents=torch.from_numpy(latents), height=64,
                           width=64, output_type="np", **no_cfg, **flux).images
    assert images.shape == reference.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(images, reference, atol=1e-3)


# every trained weight file of the embedded models, and nag-jax's converter for it
TRAINED_COMPONENTS = [("sd-shapes", "text_encoder"), ("sd-shapes", "vae"), ("sd-shapes", "unet"),
                      ("flux-shapes", "text_encoder"), ("flux-shapes", "text_encoder_2"),
                      ("flux-shapes", "transformer")]


@pytest.mark.parametrize("name, component", TRAINED_COMPONENTS)
def test_embedded_weights_are_what_the_converters_read(name, component):
    """train_tiny.export_params (the converters' key maps run backwards) wrote the trained
    weights; converting the file and exporting again gives the file back exactly."""
    from safetensors.numpy import load_file

    from convert.clip import load_clip
    from convert.flux import load_flux_transformer
    from convert.t5 import load_t5
    from convert.unet import load_unet
    from convert.vae import load_vae
    from train_tiny import COMPONENT_FILES, export_params

    loaders = {"text_encoder": load_clip, "text_encoder_2": load_t5, "vae": load_vae, "unet": load_unet,
               "transformer": load_flux_transformer}
    rules, file = COMPONENT_FILES[component]
    path = embedded_model(name) / component / file
    on_disk = load_file(str(path))
    exported = export_params(path, rules, loaders[component](path.parent)[1])
    assert exported.keys() == on_disk.keys()
    for key in on_disk:
        np.testing.assert_array_equal(exported[key], on_disk[key])


@pytest.mark.parametrize("name, tokenizer", [("sd-shapes", "tokenizer"), ("flux-shapes", "tokenizer"),
                                             ("flux-shapes", "tokenizer_2")])
def test_embedded_tokenizers_keep_caption_words_whole(name, tokenizer):
    """The trained tokenizers give each caption word one token (CLIP's "red</w>", T5's "\u2581red")."""
    from nag_jax.tokenize import load_tokenizer

    loaded = load_tokenizer(embedded_model(name) / tokenizer)
    words = "a red circle on a gray background".split()
    assert [token.strip("\u2581").removesuffix("</w>") for token in loaded.tokenize(" ".join(words))] == words
