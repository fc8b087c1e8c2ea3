"""The embedded video model wan-shapes: diffusers makes the same clip from the folder, the trained
weights are what the converters read, and `nag-jax generate` writes a clip from it offline."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from nag_jax.cli import main
from nag_jax.resolve import embedded_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def test_wan_shapes_makes_the_diffusers_clip():
    """diffusers' WanPipeline loads the folder and makes our clip from the same latents; ours
    without height or num_frames (32x32, 9 frames: read from the folder)."""
    import torch
    from diffusers import DiffusionPipeline

    from nag_jax.pipeline import NAGPipeline

    folder = embedded_model("wan-shapes")
    ours, theirs = NAGPipeline.from_pretrained(folder), DiffusionPipeline.from_pretrained(str(folder))
    assert type(theirs).__name__ == "WanPipeline"
    latents = np.random.default_rng(0).standard_normal((1, 16, 3, 4, 4)).astype(np.float32)
    frames = ours("a red circle moving left", num_inference_steps=2, latents=latents, guidance_scale=1.0,
                  output_type="np").frames
    with torch.no_grad():
        reference = theirs("a red circle moving left", num_inference_steps=2, latents=torch.from_numpy(latents),
                           height=32, width=32, num_frames=9, guidance_scale=1.0, output_type="np").frames
    assert frames.shape == np.asarray(reference).shape == (1, 9, 32, 32, 3)
    np.testing.assert_allclose(frames, np.asarray(reference), atol=1e-3)


@pytest.mark.parametrize("component", ("text_encoder", "vae", "transformer"))
def test_wan_shapes_weights_are_what_the_converters_read(component):
    """train_tiny_wan wrote the trained weights with export_params (the VAE: PyTorch's
    save_pretrained); converting the file and exporting again gives the file back exactly."""
    from safetensors.numpy import load_file

    from convert.t5 import load_t5
    from convert.wan import load_wan_transformer
    from convert.wan_vae import WAN_VAE_RULES, load_wan_vae
    from train_tiny import export_params
    from train_tiny_wan import COMPONENT_FILES

    loaders = {"text_encoder": load_t5, "vae": load_wan_vae, "transformer": load_wan_transformer}
    rules, file = {**COMPONENT_FILES, "vae": (WAN_VAE_RULES, "diffusion_pytorch_model.safetensors")}[component]
    path = embedded_model("wan-shapes") / component / file
    on_disk = load_file(str(path))
    exported = export_params(path, rules, loaders[component](path.parent)[1])
    assert exported.keys() == on_disk.keys()
    for key in on_disk:
        np.testing.assert_array_equal(exported[key], on_disk[key])


def test_generate_writes_a_wan_shapes_clip(tmp_path, capsys):
    """The issue's command: `nag-jax generate --model wan-shapes --prompt "a circle moving left"
    --nag-negative-prompt red --output clip.mp4`, offline, the model's own size and frame count."""
    from nag_jax.video import read_video_metadata

    clip = tmp_path / "clip.mp4"
    assert main(["generate", "--model", "wan-shapes", "--prompt", "a circle moving left", "--nag-negative-prompt",
                 "red", "--steps", "2", "--no-progress", "--output", str(clip)]) == 0
    assert capsys.readouterr().out.strip() == str(clip)
    record = json.loads(read_video_metadata(clip))
    assert record["num_frames"] == 9 and record["height"] == record["width"] == 32
    assert record["nag_negative_prompt"] == "red" and record["nag_scale"] == 5.0


def test_wan_shapes_tokenizer_keeps_caption_words_whole():
    from nag_jax.tokenize import load_tokenizer

    words = "a red circle moving left on a gray background".split()
    tokens = load_tokenizer(embedded_model("wan-shapes") / "tokenizer").tokenize(" ".join(words))
    assert [token.strip("\u2581") for token in tokens] == words
