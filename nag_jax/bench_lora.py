"""Cost of merging a LoRA: rank 64 on every linear kernel of SDXL's UNet and FLUX.1's transformer.

`python -m nag_jax.bench_lora [--rank 64] [--repeats 3]`. The parameter trees are abstract
(`jax.eval_shape` at the published configs, nag_jax.bench.build): nothing real-size is allocated
at once. Every 2-D kernel (a 3-D stacked one counts once per layer) is a LoRA target. For each
distinct kernel shape one random float32 leaf is merged with `nag_jax.lora.merge_layer` (compiled
first, then the median of `repeats` runs) and the time is multiplied by the number of layers of
that shape; a stacked parameter's layers after the first are merged in place, so this per-leaf
time stands for them too. The update FLOPs (2 * rank * in * out per layer) are exact; the seconds
are this machine's, with its load average beside them.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import time

import jax
import numpy as np
from flax import traverse_util

from convert.lora import LoraLayer, Target
from nag_jax.lora import merge_layer

FAMILIES = {"unet": "SDXL UNet", "flux": "FLUX.1 transformer"}


def kernel_shapes(family: str) -> collections.Counter:
    """(in, out) of every linear kernel of `family`'s published denoiser -> how many layers have it."""
    from nag_jax.bench import abstract_params, build

    module, inputs, _ = build(family, tiny=False)
    flat = traverse_util.flatten_dict(abstract_params(family, module, inputs)["params"], sep="/")
    shapes = collections.Counter()
    for path, leaf in flat.items():
        if path.endswith("kernel") and leaf.ndim in (2, 3):
            shapes[tuple(leaf.shape[-2:])] += 1 if leaf.ndim == 2 else leaf.shape[0]
    return shapes


def merge_seconds(shape: tuple[int, int], rank: int, repeats: int) -> float:
    """Median seconds to merge one rank-`rank` update into a random float32 kernel of `shape`."""
    rng = np.random.default_rng(0)
    fan_in, fan_out = shape
    layer = LoraLayer("denoiser", "bench", rng.standard_normal((rank, fan_in), np.float32),
                      rng.standard_normal((fan_out, rank), np.float32), float(rank), "bench")
    target = [Target("kernel", None, "linear", 0)]
    base = jax.device_put(rng.standard_normal(shape, np.float32))
    times = []
    for attempt in range(repeats + 1):  # the first call compiles
        flat = {"kernel": base}
        start = time.perf_counter()
        merge_layer(flat, layer, target, 1.0)
        jax.block_until_ready(flat["kernel"])
        if attempt:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def merge_figures(family: str, rank: int = 64, repeats: int = 3) -> dict:
    shapes = kernel_shapes(family)
    seconds = sum(count * merge_seconds(shape, rank, repeats) for shape, count in shapes.items())
    return dict(model=FAMILIES[family], layers=sum(shapes.values()), distinct_shapes=len(shapes),
                parameters_millions=sum(count * a * b for (a, b), count in shapes.items()) / 1e6,
                update_gflop=sum(count * 2 * rank * a * b for (a, b), count in shapes.items()) / 1e9,
                merge_seconds=seconds, load_average=os.getloadavg()[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nag_jax.bench_lora", description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"| model | LoRA layers (rank {args.rank}) | kernel params (M) | update GFLOP | merge s | load avg |")
    print("| --- | --- | --- | --- | --- | --- |")
    for family in FAMILIES:
        r = merge_figures(family, args.rank, args.repeats)
        print(f"| {r['model']} | {r['layers']} ({r['distinct_shapes']} shapes) | {r['parameters_millions']:.0f} | "
              f"{r['update_gflop']:.0f} | {r['merge_seconds']:.1f} | {r['load_average']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
