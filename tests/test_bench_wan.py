"""Wan FLOP counts (nag_jax/bench_wan.py) on the tiny config: ordered as they must be, and the
unrolled blocks the count traces (models.layers.unrolled_layers) compute what the scanned ones do."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.layers import unrolled_layers
from nag_jax.bench import flop_counts
from nag_jax.bench_wan import build_wan, small_init_inputs


@pytest.mark.parametrize("family", ["wan-14b", "wan2.2-ti2v-5b"])  # the second: per-token timesteps
def test_wan_flop_counts_are_ordered(family):
    records = {r["name"]: r for r in flop_counts(family, tiny=True)}
    assert set(records) == {"no NAG", "CFG", "NAG"}
    assert abs(records["CFG"]["ratio"] - 2.0) < 1e-3
    assert 1.0 < records["NAG"]["ratio"] < records["CFG"]["ratio"]


def test_unrolled_blocks_equal_scanned_and_are_all_counted():
    module, inputs, call = build_wan("wan-14b", tiny=True)
    x = jax.tree.map(lambda s: jax.random.normal(jax.random.key(1), s.shape, s.dtype), inputs(1, 1))
    params = module.init(jax.random.key(0), **jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                                           small_init_inputs(inputs(1, 1))))

    def lowered(unrolled: bool):
        step = jax.jit(lambda p, x: call(module, p, x))
        with unrolled_layers() if unrolled else contextlib.nullcontext():
            return step.lower(params, x)

    scanned, unrolled = lowered(False), lowered(True)
    np.testing.assert_allclose(unrolled.compile()(params, x), scanned.compile()(params, x), rtol=1e-5, atol=1e-5)
    flops = [float(program.cost_analysis()["flops"]) for program in (scanned, unrolled)]
    assert flops[1] > 1.5 * flops[0]  # both blocks counted, not the loop body once
