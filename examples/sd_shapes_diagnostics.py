"""Two measurements behind docs/efficacy.md's account of NAG on the sd-shapes UNets (PyTorch, diffusers hooks).

    python examples/sd_shapes_diagnostics.py contrast FOLDER
        per cross-attention layer, at the first sampling step (pure noise, t = 999) and at t = 500
        over 32 noises: how much the attention outputs for "a circle" and "red" differ
        (||z+ - z-||_1 / ||z+||_1 per token, the quantity NAG extrapolates) and how large attn2's
        output is against the hidden state it is added to;
    python examples/sd_shapes_diagnostics.py noise-agreement FOLDER [--steps 4]
        how much the initial noise alone fixes the colour of a colour-open prompt: the colour read
        back under the same 96 noises for "a circle" and "a triangle", against other noises
        (nag-jax sampling; FOLDER may also be a Flux-style folder such as flux-shapes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def attention_contrast(folder: str, positive: str = "a circle", negative: str = "red", count: int = 32) -> None:
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    recorded = {}

    def record(key):
        return lambda module, args, output=None: recorded.setdefault(key, []).append(args[0] if output is None
                                                                                    else output)

    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            module.to_out[0].register_forward_pre_hook(record((name, "attention")))  # before the output projection
            module.register_forward_hook(record((name, "output")))
        elif name.endswith("norm2") and "transformer_blocks" in name:
            module.register_forward_pre_hook(record((name.replace("norm2", "attn2"), "hidden")))
    noise = torch.randn(count, 4, unet.config.sample_size, unet.config.sample_size,
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        states = {prompt: text_encoder(tokenizer([prompt] * count, padding="max_length", truncation=True,
                                                 max_length=tokenizer.model_max_length, return_tensors="pt").input_ids)[0]
                  for prompt in (positive, negative)}
        for timestep in (999, 500):
            recorded.clear()
            for prompt in (positive, negative):
                unet(noise, timestep, encoder_hidden_states=states[prompt])
            for layer in dict.fromkeys(name for name, _ in recorded):
                z_pos, z_neg = recorded[layer, "attention"]
                l1 = lambda x: x.abs().sum(-1)  # noqa: E731
                contrast = (l1(z_pos - z_neg) / l1(z_pos)).mean().item()
                share = (l1(recorded[layer, "output"][0]) / l1(recorded[layer, "hidden"][0])).mean().item()
                print(f"t={timestep} {layer:55s} tokens {z_pos.shape[1]:4d}  |z+ - z-|/|z+| {contrast:.3f}  "
                      f"|attn2|/|h| {share:.3f}")


def noise_agreement(folder: str, steps: int, count: int = 96) -> None:
    from nag_jax.efficacy import read_attributes
    from nag_jax.pipeline import NAGPipeline

    pipe = NAGPipeline.from_pretrained(folder)
    rng = np.random.default_rng(0)
    flux = pipe.family.name.startswith("Flux")
    shape = (count, 64, 16) if flux else (count, 4, 16, 16)  # 64x64 images: packed Flux latents or UNet latents
    options = {} if flux else {"guidance_scale": 1.0}

    def colours(prompt, latents):
        images = pipe([prompt] * count, num_inference_steps=steps, latents=latents, output_type="np", **options).images
        return [found["colour"] for found in read_attributes(np.asarray(images))]

    latents = rng.standard_normal(shape).astype(np.float32)
    circle, triangle = colours("a circle", latents), colours("a triangle", latents)
    other = colours("a circle", rng.standard_normal(shape).astype(np.float32))
    print(f"{folder}, {steps} steps: the same colour under the same noise ('a circle' / 'a triangle') "
          f"{np.mean([a == b for a, b in zip(circle, triangle)]):.2f}; under other noise "
          f"{np.mean([a == b for a, b in zip(circle, other)]):.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("measurement", choices=("contrast", "noise-agreement"))
    parser.add_argument("folder")
    parser.add_argument("--steps", type=int, default=4, help="noise-agreement: sampling steps")
    args = parser.parse_args(argv)
    if args.measurement == "contrast":
        attention_contrast(args.folder)
    else:
        noise_agreement(args.folder, args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
