"""LoRA files on a tiny Wan2.1 T2V pipeline: our merged frames equal diffusers' WanPipeline's.

Files: ComfyUI / Kijai names (`diffusion_model.blocks.N.self_attn.q.lora_down.weight`, `.alpha`)
with CausVid-style full deltas (`.diff_b` on biases, `.diff` on a linear weight and on norms),
musubi-tuner's kohya names (`lora_unet_blocks_N_...`, every layer, as diffusers requires) and
PEFT (diffusers names, saved by diffusers). diffusers reads `diff_b` as PEFT's `lora_B.bias` but
drops `.diff` and every norm delta; the reference for those is ComfyUI's rule, weight + scale *
delta, applied to diffusers' modules: a linear `.diff` as a PEFT LoRA with identity `lora_A`
(the renaming diffusers itself uses for `head.head.diff`), norm and modulation deltas added to
the torch parameters. Frames within 1e-3 at scales 1 and 0.7, NAG once; unloading restores them exactly.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from lora_files import KOHYA, reference_images, save_factors, save_peft_lora
from nag_jax.pipeline import NAGPipeline
from test_pipeline_wan import CALL, NAG, NAG_NEGATIVE, PROMPT, assert_close, ours, reference_nag
from tests.tiny_wan import build_tiny_wan_pipeline

DIM, FFN = 32, 48  # the tiny transformer's width and feed-forward width
MOVES = 1e-2
COMFY = "diffusion_model.blocks"
# ComfyUI deltas diffusers drops -> diffusers' parameter, shape (the original norm3 is diffusers'
# cross-attention norm2, modulation its scale_shift_table)
DROPPED_DELTAS = {f"{COMFY}.1.norm3.diff": ("blocks.1.norm2.weight", (DIM,)),
                  f"{COMFY}.1.norm3.diff_b": ("blocks.1.norm2.bias", (DIM,)),
                  f"{COMFY}.0.cross_attn.norm_k.diff": ("blocks.0.attn2.norm_k.weight", (DIM,)),
                  f"{COMFY}.1.modulation.diff": ("blocks.1.scale_shift_table", (1, 6, DIM))}
LINEAR_DIFF = (f"{COMFY}.0.cross_attn.o.diff", "transformer.blocks.0.attn2.to_out.0")


def comfyui_file(path):
    """Factors with alphas and `diff_b` on their biases, a `.diff` on a linear layer without
    factors, `.diff` / `.diff_b` on norms and a modulation table: the key kinds of Kijai's CausVid / lightx2v files."""
    layers = {f"{COMFY}.0.self_attn.q": ((4, DIM), (DIM, 4), 2.0, KOHYA),
              f"{COMFY}.1.cross_attn.k": ((4, DIM), (DIM, 4), 8.0, KOHYA),
              f"{COMFY}.0.ffn.0": ((4, DIM), (FFN, 4), 4.0, KOHYA),
              f"{COMFY}.1.ffn.2": ((4, FFN), (DIM, 4), 4.0, KOHYA)}
    save_factors(path, layers, seed=2, gain=1.0)
    tensors = load_file(str(path))
    rng = np.random.default_rng(3)
    deltas = {f"{name}.diff_b": (layer[1][0],) for name, layer in layers.items()}
    deltas.update({LINEAR_DIFF[0]: (DIM, DIM), **{name: shape for name, (_, shape) in DROPPED_DELTAS.items()}})
    tensors.update({name: (0.2 * rng.standard_normal(shape)).astype(np.float32) for name, shape in deltas.items()})
    save_file(tensors, str(path))
    return path


def musubi_layers():
    linear = lambda i, o: ((4, i), (o, 4), 4.0, KOHYA)  # noqa: E731
    layers = {}
    for block in range(2):
        for attention in ("self_attn", "cross_attn"):
            layers.update({f"lora_unet_blocks_{block}_{attention}_{x}": linear(DIM, DIM) for x in "qkvo"})
        layers.update({f"lora_unet_blocks_{block}_ffn_0": linear(DIM, FFN),
                       f"lora_unet_blocks_{block}_ffn_2": linear(FFN, DIM)})
    return layers


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan_t2v")
    theirs = build_tiny_wan_pipeline(folder)
    files = tmp_path_factory.mktemp("loras")
    loras = {
        "comfyui": comfyui_file(files / "comfyui.safetensors"),
        "kohya": save_factors(files / "musubi.safetensors", musubi_layers(), seed=1, gain=1.0),
        "peft": save_peft_lora(theirs, files / "peft.safetensors",
                               {"transformer": ["to_q", "to_v", "to_out.0", "ffn.net.0.proj", "proj_out"]}, gain=1.0),
    }
    diff = load_file(str(loras["comfyui"]))[LINEAR_DIFF[0]]
    loras["comfyui_diff_as_peft"] = files / "diff_as_peft.safetensors"  # diffusers' identity renaming of a diff
    save_file({f"{LINEAR_DIFF[1]}.lora_A.weight": np.eye(DIM, dtype=np.float32),
               f"{LINEAR_DIFF[1]}.lora_B.weight": diff}, str(loras["comfyui_diff_as_peft"]))
    latents = np.random.default_rng(0).standard_normal((1, 4, 2, 4, 4)).astype(np.float32)
    return NAGPipeline.from_pretrained(folder), theirs, loras, latents


def our_frames(pipe, latents):
    return pipe(PROMPT, latents=latents, output_type="np", guidance_scale=1.0, **CALL).frames


def their_frames(pipe, latents):
    with torch.no_grad():
        return pipe(PROMPT, latents=torch.from_numpy(latents), output_type="np", guidance_scale=1.0, **CALL).frames


@contextlib.contextmanager
def dropped_deltas_added(pipe, comfyui_path, scale):
    """The ComfyUI deltas diffusers drops, added to its transformer's parameters, undone after."""
    tensors, parameters = load_file(str(comfyui_path)), dict(pipe.transformer.named_parameters())
    saved = {name: parameters[name].detach().clone() for name, _ in DROPPED_DELTAS.values()}
    with torch.no_grad():
        for key, (name, _) in DROPPED_DELTAS.items():
            parameters[name].add_(scale * torch.from_numpy(tensors[key]))
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                parameters[name].copy_(value)


def diffusers_with(pipe, files, loras, generate):
    """`generate()` of diffusers' pipeline with `loras` [(name, scale)] as diffusers can read them."""
    adapters = [(files[name], scale) for name, scale in loras]
    comfyui = [scale for name, scale in loras if name == "comfyui"]
    adapters += [(files["comfyui_diff_as_peft"], scale) for scale in comfyui]
    with dropped_deltas_added(pipe, files["comfyui"], sum(comfyui)):
        return reference_images(pipe, adapters, generate)


@pytest.fixture(scope="module")
def base_frames(setup):
    return our_frames(setup[0], setup[3])


@pytest.mark.parametrize("loras", [[("comfyui", 1.0)], [("comfyui", 0.7)], [("peft", 0.7)],
                                   [("kohya", 1.0), ("peft", 1.0)]])
def test_lora_matches_diffusers_and_unloads_exactly(setup, base_frames, loras):
    pipe, theirs, files, latents = setup
    for name, scale in loras:
        pipe.load_lora_weights(files[name], scale)
    frames = our_frames(pipe, latents)
    pipe.unload_lora_weights()
    want = diffusers_with(theirs, files, loras, lambda: their_frames(theirs, latents))
    assert np.abs(frames - want).max() <= 1e-3
    moved = np.abs(frames - base_frames).max()
    print(f"Wan LoRA {loras} moves the frames by {moved:.3f}")
    assert moved > MOVES
    assert np.array_equal(our_frames(pipe, latents), base_frames)


def test_comfyui_lora_with_nag_matches_reference(setup):
    pipe, theirs, files, latents = setup
    pipe.load_lora_weights(files["comfyui"], 0.7)
    got = ours(pipe, latents, guidance_scale=1.0, nag_negative_prompt=NAG_NEGATIVE, **NAG)
    plain = ours(pipe, latents, guidance_scale=1.0)
    pipe.unload_lora_weights()
    want = diffusers_with(theirs, files, [("comfyui", 0.7)], lambda: reference_nag(theirs, latents, 1.0))
    assert_close(got, want)
    assert np.abs(got - plain).max() > MOVES * max(1.0, np.abs(want).max())  # NAG moved the LoRA's result


def test_flux_names_are_refused_and_leave_the_pipeline_unchanged(setup, tmp_path):
    pipe = setup[0]
    path = save_factors(tmp_path / "flux.safetensors",
                        {"diffusion_model.double_blocks.0.img_attn.qkv": ((4, DIM), (3 * DIM, 4), None, KOHYA)})
    params = pipe.family.params
    with pytest.raises(ValueError, match="comfyui LoRA file.*double_blocks"):
        pipe.load_lora_weights(path)
    assert pipe.family.params is params


def test_cli_lora_on_a_wan_video_is_merged_and_recorded(setup, tmp_path, capsys):
    from nag_jax.cli import main
    from nag_jax.video import read_video_metadata

    pipe, _, files, _ = setup
    out = tmp_path / "clip.mp4"
    assert main(["generate", "--model", str(pipe.family.path), "--prompt", PROMPT, "--steps", "2", "--height", "32",
                 "--width", "32", "--num-frames", "5", "--guidance-scale", "1", "--nag-negative-prompt", NAG_NEGATIVE,
                 "--lora", f"{files['comfyui']}:0.7", "--output", str(out), "--no-progress"]) == 0
    assert "13 layers patched" in capsys.readouterr().out
    assert json.loads(read_video_metadata(out))["loras"] == [f"{files['comfyui']}:0.7"]
