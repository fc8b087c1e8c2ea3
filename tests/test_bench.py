"""Smoke test of the benchmark's FLOP-count path on the small Flux config (no timing asserted)."""

from __future__ import annotations

import json

from nag_jax import bench


def test_flux_flop_counts_are_ordered_and_plausible():
    records = {r["name"]: r for r in bench.flop_counts("flux", tiny=True)}
    assert set(records) == {"no NAG", "CFG", "NAG shared-image", "NAG reference", "NAG reference layout"}
    plain = records["no NAG"]["value"] * 1e9

    # Lower bound: every image and text token goes through each block's weight matrices once
    # (double block: q, k, v, out and the 4x MLP per stream; single block: q, k, v, the 4x MLP
    # in and the 5x out), two FLOPs per multiply-add.
    config, shapes = bench.TINY_FLUX_CONFIG, bench.TINY_SHAPES["flux"]
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    tokens = shapes["image_tokens"] + shapes["text_tokens"]
    per_token = 12 * dim * dim * (config["num_layers"] + config["num_single_layers"])
    assert 2 * tokens * per_token < plain < 2 * (2 * tokens * per_token)

    assert abs(records["CFG"]["ratio"] - 2.0) < 0.01  # two image rows: twice the work
    shared, reference, layout = (records[n]["ratio"] for n in ("NAG shared-image", "NAG reference", "NAG reference layout"))
    assert 1.0 < shared < reference < layout < 2.0  # the shared image-key merge saves work in every layout
    assert records["NAG shared-image"]["target"] == 1.2 and isinstance(records["NAG shared-image"]["met"], bool)


def test_kontext_and_chroma_flop_counts_are_ordered():
    """Kontext counts as Flux (both NAG modes) with the conditioning-image tokens in the image
    stream; Chroma has one NAG mode. CFG doubles the work; NAG costs less than CFG."""
    kontext = {r["name"]: r["ratio"] for r in bench.flop_counts("kontext", tiny=True)}
    assert abs(kontext["CFG"] - 2.0) < 0.01 and 1.0 < kontext["NAG shared-image"] < kontext["NAG reference"] < 2.0
    chroma = {r["name"]: r["ratio"] for r in bench.flop_counts("chroma", tiny=True)}
    assert set(chroma) == {"no NAG", "CFG", "NAG"}
    assert abs(chroma["CFG"] - 2.0) < 0.01 and 1.0 < chroma["NAG"] < 2.0


def test_table_and_json_render_records():
    record = bench._record("flops", "sd3", "NAG", 1.5e9, "GFLOP", 1.25e9, scale=1e-9)
    assert record["met"] is True and abs(record["ratio"] - 1.2) < 1e-9
    table = bench.format_table([record])
    assert "sd3" in table and "met" in table and "1.200x" in table
    assert json.loads(json.dumps([record]))[0]["value"] == 1.5


def test_timings_under_load_are_marked_not_judged():
    """A timing taken with the load average above QUIET_LOAD is flagged in the table instead of
    judged against its target (other jobs starve one side of the comparison)."""
    quiet = bench._record("timing", "unet", "nag-jax no NAG", 0.04, "ms", 0.04, scale=1e3, tiny=True)
    quiet.update(target=1.0, met=True, load_average=0.2)
    busy = dict(quiet, load_average=bench.QUIET_LOAD + 4)
    assert "met" in bench.format_table([quiet]) and "UNDER LOAD" not in bench.format_table([quiet])
    assert "UNDER LOAD 5.00: not a figure" in bench.format_table([busy])
    assert "load_average" in bench.environment()


def test_pipeline_part_times_whole_calls_of_both_pipelines():
    """The pipeline part's code path (figures are BENCHMARKS.md's, taken on a quiet machine)."""
    from nag_jax.bench_pipeline import pipeline_figures

    records = pipeline_figures(steps=2, repeats=1)
    assert [r["name"] for r in records] == ["diffusers (PyTorch eager), 2 steps", "nag-jax no NAG, 2 steps",
                                            "nag-jax NAG, 2 steps"]
    assert all(r["value"] > 0 and r["load_average"] >= 0 for r in records) and records[0]["ratio"] == 1.0
    assert records[1]["target"] == 1.0
