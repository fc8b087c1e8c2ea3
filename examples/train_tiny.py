"""Train the embedded default model: a tiny SD-style pipeline on the synthetic shapes domain.

    python examples/train_tiny.py --output nag_jax/embedded/sd-shapes

The data (nag_jax/efficacy.py: circles, squares and triangles in six colours on three
backgrounds, captions with attributes left out) is generated in code. The components are
the real architectures nag-jax loads (CLIP text encoder, AutoencoderKL, UNet2DConditionModel,
EulerDiscreteScheduler), saved in the diffusers directory format so diffusers loads the
folder too:

1. a CLIP-style BPE tokenizer is trained with `tokenizers` on the captions and saved as the
   published CLIP file set (vocab.json, merges.txt, tokenizer configs);
2. the three networks are created by transformers/diffusers from their configs and saved, which
   fixes the PyTorch file layout, then loaded through nag-jax's own converters;
3. the VAE is trained as an autoencoder with a small KL term, its latent scale measured;
4. the UNet and the text encoder are trained together (epsilon prediction, SD's scaled-linear
   noise schedule, 10% empty captions so CFG has an unconditional model);
5. the trained Flax parameters are written back over the PyTorch files with the converters'
   key maps run backwards (`export_params`).

The shipped model is the default run (300 VAE steps at batch 8, 500 denoiser steps at batch 16
of a 1500-step learning-rate schedule): about 40 minutes of wall time on 2 heavily shared CPU
cores (about 10 minutes of CPU time at the measured rate); `--stop-after 1500` trains longer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from convert.checkpoint import open_checkpoint  # noqa: E402
from convert.clip import CLIP_RULES, load_clip  # noqa: E402
from convert.mapping import _route  # noqa: E402
from convert.unet import UNET_RULES, load_unet  # noqa: E402
from convert.vae import VAE_RULES, load_vae  # noqa: E402
from nag_jax.efficacy import BACKGROUND_NAMES, COLOUR_NAMES, SHAPES, caption, random_scenes, render  # noqa: E402

MAX_TOKENS = 16  # the longest caption is 9 tokens with its start and end markers
TEXT_WIDTH = 32
BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}

# ----------------------------------------------------------------------------- tokenizer


def all_captions() -> list[str]:
    """Every caption the data can produce (each attribute present or left out), plus ""."""
    options = lambda names: (None, *names)  # noqa: E731
    return [caption(c, s, b) for c in options(COLOUR_NAMES) for s in options(SHAPES) for b in options(BACKGROUND_NAMES)]


def train_tokenizer(folder: Path) -> None:
    """A byte-level BPE with CLIP's end-of-word marker, trained on the captions, saved as CLIP's
    files: every byte and byte + "</w>" first, then the learned merges, the specials last."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=1000, initial_alphabet=alphabet, end_of_word_suffix="</w>",
                                  show_progress=False)
    tokenizer.train_from_iterator(all_captions() * 4, trainer)
    merges = [" ".join(pair) if isinstance(pair, (tuple, list)) else pair
              for pair in json.loads(tokenizer.to_str())["model"]["merges"]]
    chars = sorted(alphabet)
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    tokens = list(dict.fromkeys(tokens)) + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_TOKENS, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


# ----------------------------------------------------------------------------- PyTorch layout


def save_initial_components(folder: Path, vocab_size: int, seed: int) -> None:
    """Random-init PyTorch components saved by their libraries: configs and file layouts."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text_config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
                                 num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
                                 projection_dim=TEXT_WIDTH, bos_token_id=vocab_size - 2,
                                 eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    text_encoder = CLIPTextModel(text_config)
    text_encoder.config.architectures = ["CLIPTextModel"]
    text_encoder.save_pretrained(folder / "text_encoder")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 16, 32), layers_per_block=1,
                  norm_num_groups=8, sample_size=64, mid_block_add_attention=False,
                  scaling_factor=1.0).save_pretrained(folder / "vae")
    UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                         down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                         attention_head_dim=4, cross_attention_dim=TEXT_WIDTH, norm_num_groups=8
                         ).save_pretrained(folder / "unet")
    (folder / "scheduler").mkdir(exist_ok=True)
    scheduler = dict(BETAS, _class_name="EulerDiscreteScheduler", timestep_spacing="trailing",
                     prediction_type="epsilon", steps_offset=0, _diffusers_version="0.42.1")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "requires_safety_checker": False, "feature_extractor": [None, None], "image_encoder": [None, None],
             "safety_checker": [None, None], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


# How each converter layout is undone: Flax array -> PyTorch array (reshaped to the file's shape after).
INVERSE_LAYOUTS = {
    "as_is": lambda w: w,
    "linear": lambda w: w.T,
    "conv": lambda w: w.transpose(3, 2, 0, 1),
    "linear_or_1x1_conv": lambda w: w.T,
}


def export_params(reference_file: Path, rules, params) -> dict[str, np.ndarray]:
    """Flax params -> tensors named and shaped as in `reference_file` (the converter's key map
    `rules` run backwards). Every key of the file must be produced: strict, like the converters."""
    reference = open_checkpoint(reference_file)
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    tensors = {}
    for key in reference.keys():
        rule, targets = _route(rules, key)
        if rule is None or len(targets) != 1 or targets[0] not in flat:
            raise KeyError(f"{reference_file}: no parameter for {key}")
        array = INVERSE_LAYOUTS[rule.layout](np.asarray(flat[targets[0]], np.float32))
        tensors[key] = np.ascontiguousarray(array.reshape(reference.shape(key)))
    used = {t for key in tensors for t in _route(rules, key)[1]}
    if used != set(flat):
        raise KeyError(f"{reference_file}: parameters not exported: {sorted(set(flat) - used)}")
    return tensors


def write_params(folder: Path, params: dict) -> None:
    """Overwrite the PyTorch weight files in `folder` with the trained Flax params."""
    for name, rules, file in (("text_encoder", CLIP_RULES, "model.safetensors"),
                              ("vae", VAE_RULES, "diffusion_pytorch_model.safetensors"),
                              ("unet", UNET_RULES, "diffusion_pytorch_model.safetensors")):
        path = folder / name / file
        tensors = export_params(path, rules, params[name])
        save_file(tensors, str(path), metadata={"format": "pt"})


# ----------------------------------------------------------------------------- training


class Data:
    """Scenes, images and every caption's token ids; batches drawn with a seeded generator."""

    def __init__(self, tokenizer, count: int, seed: int):
        self.rng = np.random.default_rng(seed)
        self.scenes = random_scenes(count, self.rng)
        self.images = render(self.scenes)
        captions = all_captions() + [""]
        self.caption_index = {text: i for i, text in enumerate(captions)}
        self.tokens = np.asarray(tokenizer(captions, padding="max_length", max_length=MAX_TOKENS).input_ids, np.int32)

    def image_batch(self, size):
        index = self.rng.integers(0, len(self.images), size)
        return index, self.images[index].astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0

    def token_batch(self, index, keep=0.7, empty=0.1):
        """Captions with each attribute kept with p=0.7; a fraction `empty` of them replaced by ""."""
        ids = []
        for i in index:
            kept = self.rng.random(3) < keep
            text = caption(COLOUR_NAMES[self.scenes["colour"][i]] if kept[0] else None,
                           SHAPES[self.scenes["shape"][i]] if kept[1] else None,
                           BACKGROUND_NAMES[self.scenes["background"][i]] if kept[2] else None)
            ids.append(self.caption_index["" if self.rng.random() < empty else text])
        return self.tokens[np.array(ids)]


def make_optimizer(steps: int, peak: float):
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak, min(200, steps // 10), steps, peak * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))


def train_vae(vae, params, data: Data, steps: int, batch: int, log):
    optimizer = make_optimizer(steps, 2e-3)

    def loss_fn(p, images, key):
        mean, logvar = vae.apply({"params": p}, images, method=vae.encode)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        recon = vae.apply({"params": p}, z, method=vae.decode)
        kl = 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - 1.0 - logvar)
        return jnp.mean(jnp.abs(recon - images)) + jnp.mean((recon - images) ** 2) + 1e-4 * kl

    @jax.jit
    def step(p, state, images, key):
        loss, grads = jax.value_and_grad(loss_fn)(p, images, key)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    state, key = optimizer.init(params), jax.random.key(1)
    for i in range(steps):
        key, sub = jax.random.split(key)
        params, state, loss = step(params, state, data.image_batch(batch)[1], sub)
        if i % 25 == 0 or i == steps - 1:
            log(f"vae step {i} loss {float(loss):.4f}")
    return params


def encode_all(vae, params, images_uint8, chunk=500):
    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode)[0])
    out = []
    for start in range(0, len(images_uint8), chunk):
        x = images_uint8[start:start + chunk].astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
        out.append(np.asarray(encode(params, x)))
    return np.concatenate(out)


def train_denoiser(unet, clip, params, latents, data: Data, steps: int, batch: int, log, checkpoint=None,
                   stop_after: int | None = None):
    """UNet + text encoder, epsilon prediction on latents already multiplied by the scaling factor.
    `stop_after` ends the run early while keeping the learning-rate schedule of `steps`."""
    betas = np.linspace(BETAS["beta_start"] ** 0.5, BETAS["beta_end"] ** 0.5, 1000) ** 2
    alphas_bar = jnp.asarray(np.cumprod(1.0 - betas), jnp.float32)
    optimizer = make_optimizer(steps, 1e-3)

    def loss_fn(p, x0, ids, key):
        t_key, n_key = jax.random.split(key)
        t = jax.random.randint(t_key, (x0.shape[0],), 0, 1000)
        noise = jax.random.normal(n_key, x0.shape)
        a = alphas_bar[t][:, None, None, None]
        noisy = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise
        context = clip.apply({"params": p["text_encoder"]}, ids).last_hidden_state
        predicted = unet.apply({"params": p["unet"]}, noisy, t, context)
        return jnp.mean((predicted - noise) ** 2)

    @jax.jit
    def step(p, state, x0, ids, key):
        loss, grads = jax.value_and_grad(loss_fn)(p, x0, ids, key)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    state, key, running = optimizer.init(params), jax.random.key(2), []
    started = time.perf_counter()
    for i in range(min(steps, stop_after or steps)):
        key, sub = jax.random.split(key)
        index = data.rng.integers(0, len(latents), batch)
        params, state, loss = step(params, state, latents[index], data.token_batch(index), sub)
        running.append(float(loss))
        if i % 100 == 0:
            log(f"denoiser step {i} loss {np.mean(running[-100:]):.4f} ({time.perf_counter() - started:.0f} s)")
        if checkpoint is not None and (i + 1) % 500 == 0 and i + 1 < steps:
            checkpoint(params)
    return params


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="nag_jax/embedded/sd-shapes", help="pipeline folder to write")
    parser.add_argument("--vae-steps", type=int, default=300)
    parser.add_argument("--vae-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1500, help="denoiser training steps")
    parser.add_argument("--stop-after", type=int, default=500,
                        help="end after this many denoiser steps (the shipped model: 500 of a 1500-step schedule)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--images", type=int, default=8000, help="size of the generated training set")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", flush=True)

    folder = Path(args.output)
    work = folder.with_name(folder.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    train_tokenizer(work / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(work / "tokenizer"))
    save_initial_components(work, len(tokenizer), args.seed)
    clip, clip_params = load_clip(work / "text_encoder")
    vae, vae_params = load_vae(work / "vae")
    unet, unet_params = load_unet(work / "unet")
    data = Data(tokenizer, args.images, args.seed)
    log(f"data: {len(data.images)} images; vocabulary {len(tokenizer)} tokens")

    vae_params = train_vae(vae, vae_params, data, args.vae_steps, args.vae_batch, log)
    latents = encode_all(vae, vae_params, data.images)
    scaling = float(1.0 / latents.std())
    log(f"latent std {latents.std():.3f} -> scaling_factor {scaling:.4f}")
    vae_config = json.loads((work / "vae" / "config.json").read_text())
    (work / "vae" / "config.json").write_text(json.dumps(dict(vae_config, scaling_factor=scaling), indent=2))

    def save(params):
        write_params(work, {"text_encoder": params["text_encoder"], "unet": params["unet"], "vae": vae_params})
        log(f"saved {work}")

    params = train_denoiser(unet, clip, {"unet": unet_params, "text_encoder": clip_params}, latents * scaling, data,
                            args.steps, args.batch, log, checkpoint=save,
                            stop_after=args.stop_after)
    save(params)
    shutil.rmtree(folder, ignore_errors=True)
    work.rename(folder)
    log(f"done: {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
