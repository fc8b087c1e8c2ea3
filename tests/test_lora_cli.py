"""`nag-jax generate --lora PATH[:SCALE]` on the embedded sd-shapes model (kohya names as kohya
writes them for SD1.5's diffusers-layout UNet), and NAGPipeline.from_pretrained(loras=...)."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from lora_files import KOHYA, save_factors
from nag_jax import NAGPipeline
from nag_jax.cli import embedded_model, main

ARGS = ["generate", "--prompt", "a circle", "--steps", "2", "--no-progress"]


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    linear = lambda i, o: ((4, i), (o, 4), 4.0, KOHYA)  # noqa: E731
    return save_factors(tmp_path_factory.mktemp("lora") / "shapes.safetensors", {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": linear(32, 64),
        "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_ff_net_2": linear(256, 64),
        "lora_te_text_model_encoder_layers_0_mlp_fc1": linear(32, 64)}, gain=1.0)


def image_and_record(path):
    image = Image.open(path)
    return np.asarray(image, np.float32), json.loads(image.text["nag-jax"])


def test_generate_with_loras_merges_them_and_records_them(tmp_path, lora, capsys):
    assert main([*ARGS, "--output", str(tmp_path / "plain.png")]) == 0
    assert main([*ARGS, "--lora", f"{lora}:0.5", "--lora", str(lora), "--output", str(tmp_path / "lora.png")]) == 0
    assert "3 layers patched" in capsys.readouterr().out
    plain, _ = image_and_record(tmp_path / "plain.png")
    with_lora, record = image_and_record(tmp_path / "lora.png")
    assert record["loras"] == [f"{lora}:0.5", f"{lora}:1.0"]
    assert np.abs(with_lora - plain).max() > 10  # of 255



def test_from_pretrained_loras_equals_loading_them_after(lora):
    merged = NAGPipeline.from_pretrained(embedded_model(), loras=[(lora, 0.5), (lora, 1.0)])
    loaded = NAGPipeline.from_pretrained(embedded_model())
    base = jax.tree.map(np.asarray, (loaded.family.params, loaded.family.encoder_params))
    loaded.load_lora_weights(lora, 0.5)
    loaded.load_lora_weights(lora)
    parts = [(merged.family.params, loaded.family.params), (merged.family.encoder_params, loaded.family.encoder_params)]
    for ours, theirs in parts:
        jax.tree.map(np.testing.assert_array_equal, ours, theirs)
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, merged.family.params, base[0])))


@pytest.mark.parametrize("value", ["missing.safetensors", "missing.safetensors:0.5"])
def test_missing_lora_file_exits_2_with_one_line(value, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_status:  # argparse rejects it before a model is loaded
        main([*ARGS, "--lora", value, "--output", str(tmp_path / "x.png")])
    assert exit_status.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--lora" in err and "missing.safetensors" in err


def test_lora_of_another_model_exits_2_with_one_line(capsys, tmp_path):
    path = save_factors(tmp_path / "flux.safetensors",
                        {"lora_unet_double_blocks_0_img_attn_qkv": ((4, 32), (96, 4), None, KOHYA)})
    assert main([*ARGS, "--lora", str(path), "--output", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--lora" in err and "double_blocks" in err
