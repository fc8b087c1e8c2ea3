"""Train the embedded video model wan-shapes: a tiny Wan2.1-style WanPipeline on the moving-shapes domain.

Run through `examples/train_tiny.py --family wan` (or this file directly, same options). The data
(nag_jax/efficacy_video.py: 9 frames of 32x32, a circle, square or triangle in six colours on
three backgrounds, moving left, right, up or down; captions with attributes left out) is
generated in code. The components are the real diffusers WanPipeline classes, created by
transformers/diffusers from their configs and saved in the published layout, then loaded
through nag-jax's converters and trained in JAX; the trained parameters are written back over
the PyTorch files (train_tiny.export_params):

1. a T5-style unigram tokenizer of the caption words (tokenizer.json with T5's configs) and a
   2-layer UMT5 encoder of width 32;
2. AutoencoderKLWan (base_dim 8, z_dim 16, 8x spatial and 4x temporal compression: a clip is
   16 x 3 x 4 x 4 latents) trained as an autoencoder on whole clips (posterior mean plus fixed
   noise, a small penalty on the latents, the shape's pixels weighted 5x), in PyTorch: its CPU
   backward pass of the 3D convolutions is 6x faster than XLA's (BENCHMARKS.md section 5); latents_mean / latents_std
   measured on the training clips and written to its config;
3. WanTransformer3DModel (patch 1x1x1: 48 tokens; 4 blocks of width 64) and the UMT5 encoder
   trained together by rectified flow (velocity noise - x0 at uniform sigma, timestep sigma x
   1000, 10% empty captions for CFG), the text padded to 512 tokens with zeros as the pipeline
   pads it; FlowMatchEulerDiscreteScheduler without shift;
4. `--resume FOLDER --reflow N` distils a trained folder into a few-step student on N (noise,
   25-step ODE solution) pairs it generates, as flux-shapes was made.

Every `--checkpoint-every` steps the folder (OUTPUT.partial until the run ends) is a complete
pipeline, and a probe logs how well samples of 72 fully specified captions follow them (colour
and direction read back with `read_clips`). `--resume FOLDER --vae-steps N` continues training
the resumed VAE first (and re-measures its latents_mean / latents_std).

The shipped model (2026-12-01, second version) is four runs niced on the 2 shared CPU cores
(PYTHONPATH=.), each resuming the previous one; the first resumes the first shipped wan-shapes
(commit 495bb40's nag_jax/embedded/wan-shapes, checked out as out/wan-shapes-v1; its VAE had
13300 XLA steps on 16x16 windows, and its reconstructions read back 78% colour, 15-18% direction):

    nice -n 19 python examples/train_tiny.py --family wan --resume out/wan-shapes-v1 \
        --vae-steps 3000 --steps 0 --output out/wan-vae
    nice -n 19 python examples/train_tiny.py --family wan --resume out/wan-vae --steps 3000 \
        --checkpoint-every 1000 --output out/wan-teacher
    nice -n 19 python examples/train_tiny.py --family wan --resume out/wan-teacher --steps 6000 --lr 7e-4 \
        --seed 1 --checkpoint-every 2000 --output out/wan-teacher2
    nice -n 19 python examples/train_tiny.py --family wan --resume out/wan-teacher2 --reflow 4000 \
        --steps 2000 --lr 3e-4 --probe-steps 2 --checkpoint-every 500 --seed 2 --output nag_jax/embedded/wan-shapes

VAE: 3000 PyTorch steps at batch 4 on whole 32x32 9-frame clips, 781 s wall, 690 s CPU (beside
another training job); its reconstructions of 200 new clips read back 100% colour, 100%
direction. Teacher: 3000 steps (783 s wall), 25-step probe colour 96%, direction 14%: the colour
is learned first, the motion later; 6000 more steps (1186 s wall) took the probe to 100% / 79%.
Student: reflow on 4000 pairs for 2000 steps (530 s wall, 626 s CPU), 2-step probe 99% / 79%.
In all 55 minutes of wall time. The first version (42 minutes: its VAE trained in JAX on 16x16
windows, 600 denoiser steps) followed the motion in 6-8% of its probe's clips: its VAE was what
fell short.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_tiny, which puts the checkout on the path

from train_tiny import (Data, finish_work, flow_euler, parse_training_arguments,  # noqa: E402
                        reflow_pairs, run_denoiser, run_log, start_work, train_t5_tokenizer, training_parser,
                        write_params)
from convert.t5 import T5_RULES, load_t5  # noqa: E402
from convert.wan import DIFFUSERS_RULES as WAN_RULES  # noqa: E402
from convert.wan import load_wan_transformer  # noqa: E402
from convert.wan_vae import load_wan_vae  # noqa: E402
from models.wan_vae import decode_video, encode_video  # noqa: E402
from nag_jax.efficacy import BACKGROUND_NAMES  # noqa: E402
from nag_jax.efficacy_video import (COLOUR_NAMES, DIRECTION_NAMES, FRAMES, SHAPES, SIZE, all_video_captions,  # noqa: E402
                                    clip_names, random_clips, read_clips, render_clips, video_caption)

CONTEXT_TOKENS = 512  # the pipeline's max_sequence_length (captions: train_tiny.MAX_TOKENS tokens)
Z_DIM, LATENT = 16, (16, 3, 4, 4)  # a 9-frame 32x32 clip's latents
TEXT_WIDTH = 32
VAE_STEPS, DENOISER_STEPS = 4500, 1000
# 72 fully specified captions: every colour, shape and direction, the background cycling
PROBE_SCENES = tuple((c, s, d, BACKGROUND_NAMES[(i + j + k) % 3]) for i, c in enumerate(COLOUR_NAMES)
                     for j, s in enumerate(SHAPES) for k, d in enumerate(DIRECTION_NAMES))


def save_initial_components(folder: Path, vocab_size: int, seed: int) -> None:
    """Random-init PyTorch components saved by their libraries: configs and file layouts."""
    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    umt5 = UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, d_model=TEXT_WIDTH, d_kv=8, d_ff=2 * TEXT_WIDTH,
                                       num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                       relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
                                       is_encoder_decoder=False, use_cache=False, dropout_rate=0.0,
                                       pad_token_id=0, eos_token_id=1))
    umt5.config.architectures = ["UMT5EncoderModel"]
    umt5.save_pretrained(folder / "text_encoder")
    AutoencoderKLWan(base_dim=8, z_dim=Z_DIM, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                     temperal_downsample=[False, True, True], latents_mean=[0.0] * Z_DIM,
                     latents_std=[1.0] * Z_DIM).save_pretrained(folder / "vae")
    WanTransformer3DModel(patch_size=(1, 1, 1), num_attention_heads=4, attention_head_dim=16, in_channels=Z_DIM,
                          out_channels=Z_DIM, text_dim=TEXT_WIDTH, freq_dim=64, ffn_dim=256, num_layers=4,
                          cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                          rope_max_seq_len=32).save_pretrained(folder / "transformer")
    # nag-jax reads the default size and frame count from these keys (diffusers ignores them)
    config_file = folder / "transformer" / "config.json"
    config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), sample_size=SIZE // 8,
                                           num_frames=FRAMES), indent=2))
    (folder / "scheduler").mkdir(exist_ok=True)
    scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.42.1",
                 "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {"_class_name": "WanPipeline", "_diffusers_version": "0.42.1",
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": [None, None],
             "vae": ["diffusers", "AutoencoderKLWan"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


# component folder -> (key map, weight file)
COMPONENT_FILES = {
    "text_encoder": (T5_RULES, "model.safetensors"),
    "transformer": (WAN_RULES, "diffusion_pytorch_model.safetensors"),
}


class ClipData(Data):
    """train_tiny.Data on the moving-shapes domain: `examples` are clips."""

    def generate(self, count: int):
        clips = random_clips(count, self.rng)
        return clips, render_clips(clips)

    captions = staticmethod(all_video_captions)
    caption = staticmethod(video_caption)

    def names(self, index) -> tuple:
        return clip_names(self.examples, index)


def as_video(clips_uint8) -> np.ndarray:
    """uint8 [B, F, H, W, 3] -> float32 [B, 3, F, H, W] in [-1, 1]."""
    return clips_uint8.astype(np.float32).transpose(0, 4, 1, 2, 3) / 127.5 - 1.0


def train_vae(vae_folder: Path, rng: np.random.Generator, steps: int, batch: int, log) -> None:
    """The VAE folder trained in place as an autoencoder on fresh whole clips: decode(mean + 0.01
    noise), L1 + L2 with the shape's pixels weighted 5x, plus 1e-4 x mean(latents^2) to keep the
    latents near unit scale. (With 0.1 noise on the initial latents, of std 0.18, the decoder
    learned to ignore them: 600 steps read back 38% colour.) In PyTorch: its CPU backward pass of
    the 3D convolutions is 6x faster than XLA's here (0.18 against 1.07 s a step, batch 4, 32x32)."""
    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(int(rng.integers(2**31)))
    vae = AutoencoderKLWan.from_pretrained(str(vae_folder))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    for i in range(steps):
        videos = torch.from_numpy(as_video(render_clips(random_clips(batch, rng))))
        mean = vae.encode(videos).latent_dist.mean
        error = vae.decode(mean + 0.01 * torch.randn_like(mean)).sample - videos
        weight = 1.0 + 4.0 * ((videos - videos[:, :, :, :1, :1]).abs().sum(1, keepdim=True) > 0.01)
        loss = (weight * (error.abs() + error**2)).mean() + 1e-4 * (mean**2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if i % 100 == 0 or i == steps - 1:
            log(f"vae step {i} loss {loss.item():.4f}")
    vae.save_pretrained(str(vae_folder))
    config_file = vae_folder / "config.json"  # without the training machine's path diffusers adds
    config_file.write_text(json.dumps({k: v for k, v in json.loads(config_file.read_text()).items()
                                       if k != "_name_or_path"}, indent=2))


def text_context(t5, p, ids):
    """UMT5 states of the caption tokens, zeroed past each caption, padded with zeros to 512
    tokens: what the pipeline gives the transformer."""
    mask = (ids != 0).astype(jnp.int32)
    hidden = t5.apply({"params": p}, ids, mask) * mask[..., None]
    return jnp.pad(hidden, ((0, 0), (0, CONTEXT_TOKENS - ids.shape[1]), (0, 0)))


def velocity(transformer, t5, p, x, sigma, ids):
    return transformer.apply({"params": p["transformer"]}, x, sigma * 1000.0, text_context(t5, p["text_encoder"], ids[0]))


def flow_loss(transformer, t5):
    """Rectified flow on normalised latents: x_sigma = (1 - sigma) x0 + sigma noise, target noise - x0."""

    def loss_fn(p, batch, key):
        x0 = batch["x0"]
        s_key, n_key = jax.random.split(key)
        sigma = jax.random.uniform(s_key, (x0.shape[0],))
        noise = batch["noise"] if "noise" in batch else jax.random.normal(n_key, x0.shape)
        s = sigma[:, None, None, None, None]
        return jnp.mean((velocity(transformer, t5, p, (1 - s) * x0 + s * noise, sigma, batch["ids"]) - (noise - x0)) ** 2)

    return loss_fn


def euler(transformer, t5, params, noise, ids, steps: int):
    return flow_euler(lambda x, sigma: velocity(transformer, t5, params, x, sigma, ids), noise, steps)


def make_probe(transformer, t5, vae, vae_params, data: ClipData, mean, std, steps: int):
    """-> probe(params): colour and direction accuracy of one sample per PROBE_SCENES caption."""
    ids = data.ids([video_caption(*scene) for scene in PROBE_SCENES])

    @jax.jit
    def sample(params, key):
        x = euler(transformer, t5, params, jax.random.normal(key, (len(ids[0]), *LATENT)), ids, steps)
        return decode_video(vae, vae_params, x * std + mean)

    def probe(params):
        found = read_clips(np.asarray(sample(params, jax.random.key(3))).transpose(0, 2, 3, 4, 1) / 2 + 0.5)
        return {attribute: float(np.mean([f[attribute] == scene[k] for f, scene in zip(found, PROBE_SCENES)]))
                for attribute, k in (("colour", 0), ("direction", 2))}

    return probe


def encode_all(vae, params, clips_uint8, chunk=250) -> np.ndarray:
    encode = jax.jit(lambda p, x: encode_video(vae, p, x))
    return np.concatenate([np.asarray(encode(params, as_video(clips_uint8[i:i + chunk])))
                           for i in range(0, len(clips_uint8), chunk)])


def main(argv=None) -> int:
    parser = training_parser(__doc__.split("\n\n")[0])
    # --vae-steps with --resume continues training the resumed VAE (default: none; without --resume VAE_STEPS)
    parser.set_defaults(output="nag_jax/embedded/wan-shapes", vae_steps=None, vae_batch=4, steps=DENOISER_STEPS,
                        batch=16, images=4000)
    args = parse_training_arguments(parser, argv)
    from transformers import AutoTokenizer

    log = run_log()
    folder = Path(args.output)
    work = start_work(folder, args.resume)
    if not args.resume:
        train_t5_tokenizer(work / "tokenizer", all_video_captions(), model_max_length=CONTEXT_TOKENS)
    tokenizer = AutoTokenizer.from_pretrained(str(work / "tokenizer"))
    if not args.resume:
        save_initial_components(work, len(tokenizer), args.seed)
    t5, t5_params = load_t5(work / "text_encoder")
    vae_steps = args.vae_steps if args.vae_steps is not None else 0 if args.resume else VAE_STEPS
    if vae_steps:
        train_vae(work / "vae", np.random.default_rng(args.seed + 2), vae_steps, args.vae_batch, log)
    vae, vae_params = load_wan_vae(work / "vae")
    transformer, transformer_params = load_wan_transformer(work / "transformer")
    data = ClipData([tokenizer], args.images, args.seed)
    log(f"data: {len(data.images)} clips; vocabulary {len(tokenizer)} tokens")
    held_out = random_clips(200, np.random.default_rng(args.seed + 1))
    reconstructed = decode_video(vae, vae_params, encode_video(vae, vae_params, as_video(render_clips(held_out))))
    found = read_clips(np.asarray(reconstructed).transpose(0, 2, 3, 4, 1) / 2 + 0.5)
    log("VAE reconstructions of 200 new clips read back: colour "
        f"{np.mean([f['colour'] == clip_names(held_out, i)[0] for i, f in enumerate(found)]):.3f}, direction "
        f"{np.mean([f['direction'] == clip_names(held_out, i)[2] for i, f in enumerate(found)]):.3f}")
    latents = None if args.reflow else encode_all(vae, vae_params, data.images)  # reflow makes its own
    vae_config_file = work / "vae" / "config.json"
    vae_config = json.loads(vae_config_file.read_text())
    if vae_steps:
        vae_config.update(latents_mean=latents.mean((0, 2, 3, 4)).tolist(), latents_std=latents.std((0, 2, 3, 4)).tolist())
        vae_config_file.write_text(json.dumps(vae_config, indent=2))
    mean, std = (np.asarray(vae_config[k], np.float32).reshape(1, -1, 1, 1, 1) for k in ("latents_mean", "latents_std"))
    if latents is not None:
        x0 = (latents - mean) / std
        log(f"latents normalised: std per channel {np.round(x0.std((0, 2, 3, 4)), 2).tolist()}")

    params = {"transformer": transformer_params, "text_encoder": t5_params}
    probe = make_probe(transformer, t5, vae, vae_params, data, mean, std, args.probe_steps)
    if args.reflow:
        solve = lambda p, noise, ids: euler(transformer, t5, p, noise, ids, 25)  # noqa: E731
        pairs = reflow_pairs(solve, params, data, args.reflow, LATENT, log)

    def save(params):
        write_params(work, params, COMPONENT_FILES)
        log(f"saved {work}; {args.probe_steps}-step samples of the 72 full captions read back: {probe(params)}")

    run_denoiser(args, flow_loss(transformer, t5), params, data, pairs if args.reflow else x0, save, log)
    finish_work(work, folder, log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
