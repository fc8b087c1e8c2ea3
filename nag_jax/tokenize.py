"""Tokenizers (transformers' own, loaded from published folders) and fixed-length padding.

`tokenize` pads and truncates the way the diffusers pipelines do: CLIP prompts to the
tokenizer's 77 tokens with its pad token (SD1.5 "<|endoftext|>", SDXL's second tokenizer
"!"), T5 prompts to `max_sequence_length`, end-of-sequence token kept at the end of a
truncated prompt. Truncation is reported with a warning that names the limit, as diffusers
logs it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np


def load_tokenizer(folder):
    """A transformers tokenizer from a folder (CLIP: vocab.json + merges.txt; T5: spiece.model
    and/or tokenizer.json). AutoTokenizer reads the class from tokenizer_config.json."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
    return AutoTokenizer.from_pretrained(str(folder))


def tokenize(tokenizer, prompts, max_length: int | None = None) -> np.ndarray:
    """prompts (str or list of str) -> int32 ids [B, max_length], padded to max_length.

    `max_length` defaults to the tokenizer's model_max_length (77 for CLIP); T5 pipelines pass
    their `max_sequence_length` (Flux 512 or 256, SD3 256).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if max_length is None:
        max_length = tokenizer.model_max_length
    if not isinstance(max_length, int) or max_length < 2 or max_length > 1_000_000:
        raise ValueError(f"max_length must be a token count >= 2, got {max_length!r}")
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True).input_ids
    untruncated = tokenizer(prompts).input_ids  # no padding: each prompt's own length
    cut = [prompt for prompt, full in zip(prompts, untruncated) if len(full) > max_length]
    if cut:
        warnings.warn(
            f"{len(cut)} prompt(s) are longer than the text encoder's limit of {max_length} tokens and were "
            f"truncated (first: {cut[0][:60]!r})",
            stacklevel=2,
        )
    return np.asarray(ids, dtype=np.int32)

