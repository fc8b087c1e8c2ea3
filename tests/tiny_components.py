"""Tiny random text encoders, VAEs and tokenizers saved the way published repositories are.

Other tests import these to assemble tiny pipelines. Each `save_tiny_*` builds the PyTorch
module with transformers/diffusers, writes it into `folder` in the on-disk layout users
download (see /work/shared/design/checkpoints.md) and returns the PyTorch module (eval mode,
float32) as the reference. Tokenizers are real (BPE / sentencepiece unigram), trained or
written in-process from a small corpus.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

CORPUS = [
    "a photo of a cat",
    "a dog sitting on a red chair",
    "the quick brown fox jumps over the lazy dog",
    "an astronaut riding a horse on the moon",
    "a bowl of fruit on a wooden table",
    "a painting of a city at night, high quality",
    "blurry, low quality, watermark",
]


def assert_close(ours, reference, tol=1e-4):
    """max |ours - reference| <= tol * max(1, max |reference|): the project's parity standard."""
    reference = reference.detach().numpy() if isinstance(reference, torch.Tensor) else np.asarray(reference)
    ours = np.asarray(ours, dtype=np.float32)
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    scale = max(1.0, float(np.abs(reference).max()))
    error = float(np.abs(ours - reference).max())
    assert error <= tol * scale, f"max abs difference {error:.3g} exceeds {tol:g} * {scale:.3g}"


def _state_dict(module: torch.nn.Module, dtype=None) -> dict:
    tensors = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    return {k: v.to(dtype) for k, v in tensors.items()} if dtype is not None else tensors


def save_sharded(state_dict: dict, folder, prefix: str = "model", shards: int = 2) -> None:
    """Write `prefix-0000i-of-0000n.safetensors` files plus `prefix.safetensors.index.json`
    (transformers' `model`, diffusers' `diffusion_pytorch_model`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(state_dict)
    per_shard = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"{prefix}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state_dict[k] for k in keys[i * per_shard : (i + 1) * per_shard]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _save_weights(state_dict: dict, folder: Path, prefix: str, sharded: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if sharded:
        save_sharded(state_dict, folder, prefix)
    else:
        save_file(state_dict, str(folder / f"{prefix}.safetensors"), metadata={"format": "pt"})


# ----------------------------------------------------------------------------- CLIP

CLIP_MERGES = ["p h", "ph o", "pho t", "phot o</w>", "c a", "ca t</w>", "o f</w>", "d o", "do g</w>", "t h", "th e</w>"]
# 256 byte symbols, the same with </w>, one token per merge, then <|startoftext|>, <|endoftext|>.
CLIP_VOCAB_SIZE = 512 + len(CLIP_MERGES) + 2


def save_tiny_clip(folder, projection: bool = False, seed: int = 0, hidden_size: int = 32,
                   intermediate_size: int = 37, num_hidden_layers: int = 3, num_attention_heads: int = 4,
                   vocab_size: int = CLIP_VOCAB_SIZE, max_position_embeddings: int = 77, projection_dim: int = 24,
                   hidden_act: str = "quick_gelu", eos_token_id: int = 2, published_naming: bool = True,
                   sharded: bool = False, dtype=None):
    """CLIPTextModel (or ...WithProjection) in `folder`: config.json + model.safetensors.

    With `published_naming` (default) keys carry the `text_model.` prefix as in every published
    repository (transformers 4); otherwise transformers 5's prefix-less naming. The default
    vocab_size and eos_token_id=2 (legacy argmax pooling, as in SD1.5/SDXL configs) fit
    `save_tiny_clip_tokenizer`. Returns the float32 PyTorch module.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                            num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                            max_position_embeddings=max_position_embeddings, projection_dim=projection_dim,
                            hidden_act=hidden_act, bos_token_id=vocab_size - 2, eos_token_id=eos_token_id,
                            pad_token_id=1)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()
    _save_clip_tower(model, folder, "text_model.", published_naming, sharded, dtype)
    return model


def _save_clip_tower(model, folder, prefix: str, published_naming: bool, sharded: bool = False, dtype=None):
    """config.json + weights of a CLIP tower; the tower's keys with `prefix` (published) or bare
    (transformers 5), its projection's key bare either way."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.to_json_file(str(folder / "config.json"))
    state = {}
    for key, tensor in _state_dict(model, dtype).items():
        bare = key.removeprefix(prefix)
        state[bare if key.endswith("projection.weight") or not published_naming else prefix + bare] = tensor
    _save_weights(state, folder, "model", sharded)


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP byte-level BPE uses for the bytes 0..255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(others))]




def save_tiny_clip_tokenizer(folder, pad_token: str = "<|endoftext|>", model_max_length: int = 77):
    """A byte-level BPE CLIP tokenizer in the published file set (vocab.json, merges.txt,
    special_tokens_map.json, tokenizer_config.json), with a few merges; CLIP_VOCAB_SIZE ids, the
    specials last (<|startoftext|>, then <|endoftext|>) as in the real CLIP vocabulary.
    `pad_token="!"` gives the SDXL tokenizer_2 convention (pad id 0)."""
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in CLIP_MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(CLIP_MERGES) + "\n")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad_token,
                "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


TINY_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                   patch_size=8)


def save_tiny_clip_vision(folder, projection: bool = True, seed: int = 0, published_naming: bool = True,
                          projection_dim: int = 24, hidden_act: str = "quick_gelu"):
    """CLIPVisionModel (or ...WithProjection) in `folder`: config.json + model.safetensors, keys with the
    `vision_model.` prefix as published (Wan's image_encoder, IP-Adapter encoders) or, without
    `published_naming`, transformers 5's bare CLIPVisionModel keys. Returns the float32 PyTorch module."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(**TINY_VISION, projection_dim=projection_dim, hidden_act=hidden_act)
    model = (CLIPVisionModelWithProjection if projection else CLIPVisionModel)(config).eval()
    _save_clip_tower(model, folder, "vision_model.", published_naming)
    return model


def save_tiny_clip_model(folder, seed: int = 0, projection_dim: int = 24):
    """A full CLIPModel (both towers, as openai/clip-vit-large-patch14 is published) in `folder`:
    config.json, model.safetensors, the tiny CLIP tokenizer and a preprocessor_config.json with
    CLIP's mean/std for the tiny image size. Returns the float32 PyTorch CLIPModel."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=CLIP_VOCAB_SIZE - 2, eos_token_id=2,
                pad_token_id=1)
    vision = dict(TINY_VISION, num_hidden_layers=2)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)).eval()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = ["CLIPModel"]
    model.config.to_json_file(str(folder / "config.json"))
    _save_weights(_state_dict(model), folder, "model", sharded=False)
    save_tiny_clip_tokenizer(folder)
    save_clip_preprocessor_config(folder, vision["image_size"])
    return model


def save_clip_preprocessor_config(folder, size: int, shortest_edge: int | None = None):
    """preprocessor_config.json as published CLIP repositories write it (OpenAI's mean/std), for `size` pixels."""
    config = {"crop_size": {"height": size, "width": size}, "do_center_crop": True, "do_convert_rgb": True,
              "do_normalize": True, "do_rescale": True, "do_resize": True, "image_processor_type": "CLIPImageProcessor",
              "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
              "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": shortest_edge or size}}
    Path(folder, "preprocessor_config.json").write_text(json.dumps(config, indent=2))


# ----------------------------------------------------------------------------- T5


def save_tiny_t5(folder, seed: int = 0, vocab_size: int = 64, d_model: int = 32, d_kv: int = 8, d_ff: int = 48,
                 num_layers: int = 2, num_heads: int = 4, relative_attention_num_buckets: int = 8,
                 relative_attention_max_distance: int = 20, sharded: bool = False, tied_embed_tokens: bool = False,
                 dtype=None):
    """T5EncoderModel (v1.1: gated-gelu) in `folder`: config.json + model.safetensors (or
    shards with an index). Keys as published: `shared.weight`, `encoder.block.N...`; with
    `tied_embed_tokens` also the tied `encoder.embed_tokens.weight`. The default vocab_size
    covers `save_tiny_t5_tokenizer`. Returns the float32 PyTorch module."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers,
                      num_heads=num_heads, relative_attention_num_buckets=relative_attention_num_buckets,
                      relative_attention_max_distance=relative_attention_max_distance,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                      dropout_rate=0.0)
    model = T5EncoderModel(config).eval()
    with torch.no_grad():  # T5's init gives tiny activations; make the test see real mixing
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = ["T5EncoderModel"]
    model.config.to_json_file(str(folder / "config.json"))
    state = _state_dict(model, dtype)
    state.pop("encoder.embed_tokens.weight", None)
    if tied_embed_tokens:
        state["encoder.embed_tokens.weight"] = state["shared.weight"].clone()
    _save_weights(state, folder, "model", sharded)
    return model


def save_tiny_t5_tokenizer(folder, vocab_size: int = 48, extra_ids: int = 4, model_max_length: int = 512):
    """A sentencepiece unigram T5 tokenizer trained on CORPUS: spiece.model with the T5 ids
    (pad 0, eos 1, unk 2), special_tokens_map.json, tokenizer_config.json (model_max_length 512
    as published), and the tokenizer.json that transformers converts from it (published T5
    folders carry both).
    `extra_ids` sentinel tokens <extra_id_N> follow the pieces, as in T5."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 10), model_writer=model, vocab_size=vocab_size,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, character_coverage=1.0, minloglevel=2)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    extra = [f"<extra_id_{i}>" for i in range(extra_ids)]
    specials = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "additional_special_tokens": extra}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    config = {"tokenizer_class": "T5Tokenizer", "model_max_length": model_max_length, "extra_ids": extra_ids,
              **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    # T5TokenizerFast(vocab_file=...) yields a 4-token vocabulary in transformers 5; from_pretrained
    # on the folder converts spiece.model correctly.
    converted = AutoTokenizer.from_pretrained(str(folder))
    converted.backend_tokenizer.save(str(folder / "tokenizer.json"))


# ----------------------------------------------------------------------------- VAE


def save_tiny_vae(folder, latent_channels: int = 4, seed: int = 0, block_out_channels=(16, 32),
                  layers_per_block: int = 1, norm_num_groups: int = 8, scaling_factor: float | None = None,
                  shift_factor: float | None = None, latents_mean=None, latents_std=None,
                  use_quant_conv: bool | None = None, sharded: bool = False, dtype=None):
    """AutoencoderKL in `folder`: config.json + diffusion_pytorch_model.safetensors.

    Defaults follow the published families: 4 latent channels as SD1.5/SDXL (quant convs,
    scaling 0.13025); 16 as Flux/SD3 (no quant convs, scaling 0.3611, shift 0.1159). Images are 2 ** (len(block_out_channels) - 1) times the
    latents' height and width.
    Returns the float32 PyTorch module."""
    from diffusers import AutoencoderKL

    flux_like = latent_channels == 16
    if use_quant_conv is None:
        use_quant_conv = not flux_like
    if scaling_factor is None:
        scaling_factor = 0.3611 if flux_like else 0.13025
    if shift_factor is None and flux_like:
        shift_factor = 0.1159
    blocks = len(block_out_channels)
    torch.manual_seed(seed)
    model = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                          down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                          block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                          norm_num_groups=norm_num_groups, scaling_factor=scaling_factor, shift_factor=shift_factor,
                          latents_mean=latents_mean, latents_std=latents_std, use_quant_conv=use_quant_conv,
                          use_post_quant_conv=use_quant_conv, sample_size=32).eval()
    folder = Path(folder)
    model.save_config(str(folder))
    _save_weights(_state_dict(model, dtype), folder, "diffusion_pytorch_model", sharded)
    return model


def randomize_mmdit(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Redraw every parameter of an MM-DiT (Flux, SD3) at 1/sqrt(fan-in), QK-norm scales near 1,
    so every weight, the zero-initialized modulations included, visibly moves the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if re.search(r"\.norm_(added_)?[qk]\.weight$", name):
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(torch.randn(param.shape, generator=generator) / max(param.shape[-1], 1) ** 0.5)
    return model
