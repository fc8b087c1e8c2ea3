"""Wan2.2-TI2V-5B on a tiny random folder in its published layout (WanPipeline with
expand_timesteps, the Wan2.2 VAE): the transformer's per-token timesteps equal diffusers';
text-to-video equals diffusers' WanPipeline and image-to-video (the same folder, an image given)
equals diffusers' WanImageToVideoPipeline with expand_timesteps, frames within 1e-3, CFG off and
on; NAG equals torch_wan_nag.py's reference run inside those pipelines; the CLI takes --image."""

from __future__ import annotations

import copy
import json

import jax
import numpy as np
import pytest
import torch

from convert.wan import load_wan_transformer
from nag_jax.pipeline import NAGPipeline
from tests.tiny_components import assert_close
from tests.tiny_wan import build_tiny_wan_pipeline, save_tiny_wan_transformer, tiny_wan_config
from torch_wan_nag import install_nag, with_nag_rows

PROMPT, NEGATIVE, NAG_NEGATIVE = "a red cat on a mat", "blurry", "a photo of a dog"
NAG = dict(nag_scale=8.0, nag_tau=5.0, nag_alpha=0.5)  # stronger than the defaults: this tiny model barely listens to text
CALL = dict(height=64, width=64, num_frames=5, num_inference_steps=2)  # latents 6 x 2 x 4 x 4: 8 tokens


def test_per_token_timesteps_match_diffusers(tmp_path):
    reference = save_tiny_wan_transformer(tmp_path, config=dict(tiny_wan_config(), in_channels=6, out_channels=6))
    module, params = load_wan_transformer(tmp_path)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 6, 2, 4, 4)).astype(np.float32)
    context = rng.standard_normal((2, 16, 24)).astype(np.float32)
    timesteps = rng.uniform(0, 1000, (2, 8)).astype(np.float32)  # one per token, frames x rows x columns
    with torch.no_grad():
        want = reference(torch.from_numpy(latents), torch.from_numpy(timesteps), torch.from_numpy(context),
                         return_dict=False)[0]
        per_row = reference(torch.from_numpy(latents), torch.from_numpy(timesteps[:, 0]), torch.from_numpy(context),
                            return_dict=False)[0]
    apply = jax.jit(module.apply)
    assert_close(apply({"params": params}, latents, timesteps, context), want)
    assert_close(apply({"params": params}, latents, timesteps[:, 0], context), per_row)
    assert float((want - per_row).abs().max()) > 1e-2  # the per-token timesteps matter


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    folder = tmp_path_factory.mktemp("wan_ti2v")
    t2v = build_tiny_wan_pipeline(folder, ti2v=True)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["expand_timesteps"] is True
    # diffusers runs TI2V's image-to-video with WanImageToVideoPipeline on the same components
    i2v = WanImageToVideoPipeline(**{k: getattr(t2v, k) for k in ("tokenizer", "text_encoder", "vae", "transformer")},
                                  scheduler=copy.deepcopy(t2v.scheduler), expand_timesteps=True)
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))  # resized by both pipelines
    latents = rng.standard_normal((1, 6, 2, 4, 4)).astype(np.float32)
    return {"t2v": t2v, "i2v": i2v}, NAGPipeline.from_pretrained(folder), latents, image


def image_of(mode, image):
    return {"image": image} if mode == "i2v" else {}


def diffusers_call(pipe, latents, image, output_type, **kwargs):
    with torch.no_grad():
        return pipe(prompt=PROMPT, latents=torch.from_numpy(latents), output_type=output_type, **image, **CALL,
                    **kwargs).frames


@pytest.mark.parametrize("mode", ["t2v", "i2v"])
@pytest.mark.parametrize("guidance_scale", [1.0, 5.0], ids=["no-cfg", "cfg"])
def test_frames_match_diffusers(ti2v, mode, guidance_scale):
    references, pipe, latents, image = ti2v
    kwargs = dict(negative_prompt=NEGATIVE, guidance_scale=guidance_scale)
    want = diffusers_call(references[mode], latents, image_of(mode, image), "np", **kwargs)
    got = pipe(PROMPT, latents=latents, output_type="np", **image_of(mode, image), **CALL, **kwargs).frames
    assert got.shape == (1, 5, 64, 64, 3)
    assert np.abs(got - want).max() <= 1e-3
    assert np.abs(want - want.mean()).max() > 0.05  # the frames are not flat


@pytest.mark.parametrize("mode", ["t2v", "i2v"])
@pytest.mark.parametrize("guidance_scale", [1.0, 5.0], ids=["nag", "nag+cfg"])
def test_nag_matches_reference(ti2v, mode, guidance_scale):
    references, pipe, latents, image = ti2v
    reference = copy.deepcopy(references[mode])
    negative = reference.encode_prompt(NAG_NEGATIVE, do_classifier_free_guidance=False, max_sequence_length=512)[0]
    install_nag(reference.transformer, NAG["nag_scale"], NAG["nag_tau"], NAG["nag_alpha"])
    with_nag_rows(reference.transformer, negative, cfg=guidance_scale > 1)
    want = diffusers_call(reference, latents, image_of(mode, image), "latent", guidance_scale=guidance_scale)
    ours = lambda **kwargs: pipe(PROMPT, latents=latents, output_type="latent", guidance_scale=guidance_scale,  # noqa: E731
                                 **image_of(mode, image), **CALL, **kwargs).frames
    got = ours(nag_negative_prompt=NAG_NEGATIVE, **NAG)
    assert_close(got, want.numpy())
    plain = ours()
    assert np.abs(plain - want.numpy()).max() > 1e-2 * max(1.0, float(want.abs().max()))  # NAG moved the result
    if mode == "i2v":  # the returned latents start with the image's frame, untouched by sampling
        np.testing.assert_array_equal(got[:, :, 0], plain[:, :, 0])


def test_size_must_be_a_multiple_of_32(ti2v):
    _, pipe, _, _ = ti2v
    assert pipe.family.size_multiple == 32 and pipe.family.name == "Wan TI2V"
    with pytest.raises(ValueError, match="height must be a positive multiple of 32"):
        pipe(PROMPT, **{**CALL, "height": 48}, output_type="latent")


def test_cli_generates_image_to_video(ti2v, tmp_path, capsys):
    import imageio.v2 as imageio

    from tests.test_cli import run

    _, pipe, _, image = ti2v
    image.save(tmp_path / "first.png")
    out = tmp_path / "clip.mp4"
    assert run(["generate", "--model", str(pipe.family.path), "--prompt", PROMPT, "--image", str(tmp_path / "first.png"),
                "--steps", "2", "--height", "64", "--width", "64", "--num-frames", "5", "--no-progress",
                "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert np.stack(imageio.mimread(out, format="FFMPEG")).shape == (5, 64, 64, 3)
