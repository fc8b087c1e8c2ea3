"""Tokenizers from published folder layouts; padding and truncation as the diffusers pipelines do."""

import warnings

import numpy as np
import pytest

from nag_jax.tokenize import load_tokenizer, tokenize
from tests.tiny_components import CLIP_VOCAB_SIZE, save_tiny_clip_tokenizer, save_tiny_t5_tokenizer

LONG_PROMPT = "a photo of a cat " * 30


def test_clip_tokenizer_published_layout_pads_to_77(tmp_path):
    save_tiny_clip_tokenizer(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    tokenizer = load_tokenizer(tmp_path)
    ids = tokenize(tokenizer, ["a photo of a cat", ""])
    assert ids.dtype == np.int32 and ids.shape == (2, 77)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert (bos, eos, tokenizer.pad_token_id) == (CLIP_VOCAB_SIZE - 2, CLIP_VOCAB_SIZE - 1, CLIP_VOCAB_SIZE - 1)
    # <|startoftext|> a photo of a cat <|endoftext|>, then padding with <|endoftext|>.
    assert ids[0, :7].tolist() == [bos, 320, 515, 518, 320, 517, eos]
    assert (ids[0, 7:] == eos).all()
    assert ids[1, :2].tolist() == [bos, eos]


def test_clip_tokenizer_sdxl_pad_token(tmp_path):
    save_tiny_clip_tokenizer(tmp_path, pad_token="!")
    tokenizer = load_tokenizer(tmp_path)
    ids = tokenize(tokenizer, "a cat", max_length=10)
    assert ids.shape == (1, 10)
    assert ids[0, :4].tolist() == [CLIP_VOCAB_SIZE - 2, 320, 517, CLIP_VOCAB_SIZE - 1]
    assert (ids[0, 4:] == 0).all()  # "!" is id 0 in the byte-level vocabulary


def test_truncation_warns_and_names_the_limit(tmp_path):
    save_tiny_clip_tokenizer(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    with pytest.warns(UserWarning, match="limit of 77 tokens"):
        ids = tokenize(tokenizer, [LONG_PROMPT, "a cat"])
    assert ids.shape == (2, 77)
    assert ids[0, -1] == tokenizer.eos_token_id  # truncated prompts still end with eos
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a prompt that fits must not warn
        tokenize(tokenizer, "a photo of a cat")


def test_t5_tokenizer_published_layout_pads_to_max_sequence_length(tmp_path):
    save_tiny_t5_tokenizer(tmp_path)
    assert {"spiece.model", "tokenizer.json", "special_tokens_map.json", "tokenizer_config.json"} <= {
        p.name for p in tmp_path.iterdir()}
    tokenizer = load_tokenizer(tmp_path)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    ids = tokenize(tokenizer, ["a photo of a cat", "a dog"], max_length=32)
    assert ids.shape == (2, 32) and ids.dtype == np.int32
    lengths = [(row != 0).sum() for row in ids]
    for row, length in zip(ids, lengths):
        assert row[length - 1] == 1 and (row[length:] == 0).all()  # eos then pad
    assert lengths[0] > lengths[1] > 1

    # The sentencepiece model alone (no tokenizer.json) gives the same ids.
    (tmp_path / "tokenizer.json").unlink()
    np.testing.assert_array_equal(tokenize(load_tokenizer(tmp_path), ["a photo of a cat", "a dog"], 32), ids)

    with pytest.warns(UserWarning, match="limit of 16 tokens"):
        tokenize(tokenizer, LONG_PROMPT, max_length=16)


def test_tokenize_rejects_bad_max_length(tmp_path):
    save_tiny_clip_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="max_length"):
        tokenize(load_tokenizer(tmp_path), "a cat", max_length=0)
