"""Train flux-shapes, the embedded Flux-style pipeline: the flux family of examples/train_tiny.py.

`--family flux` (flux-shapes: a FluxPipeline folder): the same CLIP tokenizer and text encoder
(its pooled output), a T5-style unigram tokenizer and T5 encoder (the token context), a
schnell-like FluxTransformer2DModel (no guidance embedding; 2 double and 4 single blocks of
width 64) and FlowMatchEulerDiscreteScheduler without shift. It reuses the trained sd-shapes VAE
(copied, `--vae`): 4 latent channels, so the transformer takes 16-channel tokens, 8x8 of them
for a 64x64 image. The transformer and both text encoders are trained together by rectified
flow (velocity noise - x0 at uniform sigma, 10% empty captions for CFG), then steps 4 and 5 of
train_tiny.py's docstring.
`--resume FOLDER --reflow N` distils a trained flux folder into a few-step student: it samples
N (noise, 25-step ODE solution) pairs from it and trains on those straight paths.

The shipped flux-shapes is a teacher and its reflow student, run on the same 2 cores (not
niced; another job's tests ran beside the teacher):

    python examples/train_tiny.py --family flux --steps 4500 --batch 32 --output out/flux-teacher
    python examples/train_tiny.py --family flux --resume out/flux-teacher --reflow 5000 --steps 3000 \
        --lr 3e-4 --probe-steps 2 --checkpoint-every 1000 --seed 2 --output nag_jax/embedded/flux-shapes

teacher: 1653 s wall (27.5 min), 2135 s CPU; 25-step probe at the end colour 91%, shape 44%,
background 100%. Student: 718 s wall, 1017 s CPU (250 s of it generating the pairs); 2-step
probe colour 91%, shape 46%, background 100%. A shorter student (4000 pairs, 1500 steps, 647 s)
removed 78-82% of the red at 1-4 steps instead of 84-87% (docs/efficacy.md).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from train_tiny import TEXT_WIDTH, flow_euler, read_back, save_clip  # first: it puts the checkout on the path
from convert.flux import load_flux_transformer
from convert.t5 import load_t5
from nag_jax.efficacy import FULL_SCENES, caption
from nag_jax.families.flux import image_ids, pack_latents, unpack_latents

FLUX_DOUBLE_BLOCKS, FLUX_SINGLE_BLOCKS, FLUX_HEADS = 2, 4, 4  # width 64 = 4 heads of 16
FLUX_IMAGE_IDS = jnp.asarray(image_ids(8, 8))  # 16x16 latents packed into 8x8 tokens


def save_initial_flux_components(folder: Path, clip_vocab: int, t5_vocab: int, vae_folder: Path, seed: int) -> None:
    """The Flux-style pipeline: CLIP (pooled) + T5 (tokens) text encoders, a schnell-like
    FluxTransformer2DModel (no guidance embedding) over the 2x2-packed latents of the trained
    sd-shapes VAE (copied: 4 channels, so in_channels 16), flow-matching Euler without shift."""
    import torch
    from diffusers import FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    save_clip(folder / "text_encoder", clip_vocab)
    t5 = T5EncoderModel(T5Config(vocab_size=t5_vocab, d_model=TEXT_WIDTH, d_kv=8, d_ff=2 * TEXT_WIDTH, num_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                                 dropout_rate=0.0, pad_token_id=0, eos_token_id=1))
    t5.config.architectures = ["T5EncoderModel"]
    t5.save_pretrained(folder / "text_encoder_2")
    shutil.copytree(vae_folder, folder / "vae", dirs_exist_ok=True)
    vae_config = json.loads((vae_folder / "config.json").read_text())
    latent_channels = vae_config["latent_channels"]
    # FluxPipeline decodes latents / scaling_factor + shift_factor: the SD-style VAE has no shift
    (folder / "vae" / "config.json").write_text(json.dumps(dict(vae_config, shift_factor=0.0), indent=2))
    FluxTransformer2DModel(patch_size=1, in_channels=4 * latent_channels, num_layers=FLUX_DOUBLE_BLOCKS,
                           num_single_layers=FLUX_SINGLE_BLOCKS, attention_head_dim=16,
                           num_attention_heads=FLUX_HEADS, joint_attention_dim=TEXT_WIDTH,
                           pooled_projection_dim=TEXT_WIDTH, guidance_embeds=False,
                           axes_dims_rope=(4, 6, 6)).save_pretrained(folder / "transformer")
    # nag-jax reads the default image size from this key (diffusers ignores it): 16 latent pixels, 64 image pixels
    config_file = folder / "transformer" / "config.json"
    config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), sample_size=16), indent=2))
    (folder / "scheduler").mkdir(exist_ok=True)
    scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.42.1",
                 "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {"_class_name": "FluxPipeline", "_diffusers_version": "0.42.1",
             "feature_extractor": [None, None], "image_encoder": [None, None],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def flux_velocity(transformer, clip, t5, p, x, sigma, ids):
    """The Flux-style model's velocity for packed latents x [B, 64, 16] at noise level sigma [B]."""
    pooled = clip.apply({"params": p["text_encoder"]}, ids[0]).pooled
    context = t5.apply({"params": p["text_encoder_2"]}, ids[1])
    return transformer.apply({"params": p["transformer"]}, x, context, pooled, sigma, FLUX_IMAGE_IDS,
                             jnp.zeros((context.shape[1], 3), jnp.float32))


def flux_loss(transformer, clip, t5):
    """Rectified flow: x_sigma = (1 - sigma) x0 + sigma noise, velocity target noise - x0, sigma
    uniform in [0, 1]; x0 are packed latents (model space: times the VAE's scaling factor). A batch
    with "noise" pairs each x0 with its own noise (reflow); otherwise the noise is drawn."""

    def loss_fn(p, batch, key):
        x0, ids = batch["x0"], batch["ids"]
        s_key, n_key = jax.random.split(key)
        sigma = jax.random.uniform(s_key, (x0.shape[0],))
        noise = batch["noise"] if "noise" in batch else jax.random.normal(n_key, x0.shape)
        noisy = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        return jnp.mean((flux_velocity(transformer, clip, t5, p, noisy, sigma, ids) - (noise - x0)) ** 2)

    return loss_fn


def make_flux_probe(transformer, clip, t5, vae, vae_params, data, scaling: float, steps: int = 25):
    """-> probe(params): as the UNet probe, sampled with flow-matching Euler on linspace(1, 0)."""
    ids = data.ids([caption(*scene) for scene in FULL_SCENES])

    @jax.jit
    def sample(params, key):
        x = flux_euler(transformer, clip, t5, params, jax.random.normal(key, (len(ids[0]), 64, 16)), ids, steps)
        return vae.apply({"params": vae_params}, unpack_latents(x, 16, 16) / scaling, method=vae.decode)

    return lambda params: read_back(sample(params, jax.random.key(3)), FULL_SCENES)


def flux_euler(transformer, clip, t5, params, noise, ids, steps: int):
    """Flow-matching Euler on the Flux-style model: packed latents."""
    return flow_euler(lambda x, sigma: flux_velocity(transformer, clip, t5, params, x, sigma, ids), noise, steps)


def flux_training(work: Path, clip, clip_params, vae, vae_params, data, scaling: float, latents, probe_steps: int):
    """The flux family's part of train_tiny.main: (params, probe, loss_fn, x0, solve, noise_shape) for the
    transformer and both text encoders of the pipeline folder `work`."""
    transformer, transformer_params = load_flux_transformer(work / "transformer")
    t5, t5_params = load_t5(work / "text_encoder_2")
    params = {"transformer": transformer_params, "text_encoder": clip_params, "text_encoder_2": t5_params}
    probe = make_flux_probe(transformer, clip, t5, vae, vae_params, data, scaling, probe_steps)
    solve = lambda p, noise, ids: flux_euler(transformer, clip, t5, p, noise, ids, 25)  # noqa: E731
    return params, probe, flux_loss(transformer, clip, t5), np.asarray(pack_latents(latents * scaling)), solve, (64, 16)
