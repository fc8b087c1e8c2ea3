"""The FLOP count of the cross-attention DiTs (small configs): every scanned block counted, CFG
twice the work, NAG a small extra (one negative cross-attention per block)."""

import pytest

from nag_jax import bench
from nag_jax.bench_dit import TINY_CONFIGS, TINY_SHAPES


@pytest.mark.parametrize("family", ["pixart", "sana"])
def test_dit_flop_counts_count_every_block(family, monkeypatch):
    records = {r["name"]: r for r in bench.flop_counts(family, tiny=True)}
    layers = TINY_CONFIGS[family]["num_layers"]
    monkeypatch.setitem(TINY_CONFIGS, family, dict(TINY_CONFIGS[family], num_layers=4))
    deeper = bench.flop_counts(family, tiny=True)[0]["value"]
    assert deeper > 1.8 * records["no NAG"]["value"]  # twice the blocks, nearly twice the work: none counted once
    assert set(records) == {"no NAG", "CFG", "NAG", "text part, once per run", "text part with NAG, once per run"}
    config, latent = TINY_CONFIGS[family], TINY_SHAPES[family]["latent"]
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    tokens = latent[1] * latent[2] // config["patch_size"] ** 2
    # Lower bound: each image token through every block's q, k, v, out (self) and q, out (cross): 6 dim^2
    # multiply-adds, two FLOPs each; a scan body counted once would fall below it.
    assert records["no NAG"]["value"] * 1e9 > 2 * tokens * 6 * dim * dim * config["num_layers"]
    assert abs(records["CFG"]["ratio"] - 2.0) < 0.01
    assert 1.0 < records["NAG"]["ratio"] < 1.5 and records["NAG"]["target"] == 1.03
    # the caption's keys and values are the text part's work, outside the step: each block's to_k
    # and to_v over the caption tokens, twice as many rows with NAG's negative
    text_tokens = TINY_SHAPES[family]["text_tokens"]
    assert records["text part, once per run"]["value"] * 1e9 > 2 * text_tokens * 2 * dim * dim * layers
    assert records["text part with NAG, once per run"]["value"] == pytest.approx(
        2 * records["text part, once per run"]["value"], rel=0.01)
