"""Compile time against depth: the transformer lowered and compiled on abstract parameters.

Part `depth` of `python -m nag_jax.bench`. Flux (FLUX.1-schnell widths, 1024x1024 tokens) at
2 + 4 and 19 + 38 blocks, SD3 (SD3.5-Large widths) at 2, 24 and 38 blocks, each twice: with
the repeated blocks under scan (the models' own form) and unrolled (`unrolled_layers`, the
same program as the Python loop the models had before). One denoiser step without guidance,
`jax.jit(...).lower(...).compile()` timed after one untimed warm-up compile; nothing is
allocated or run. Each figure's ratio is
to the shallowest depth of the same form, so a flat-in-depth compile shows ratios near 1.
Measurements are interleaved over repetitions (median) and carry the load average at their
end: on a busy machine the seconds are not comparable across runs, the ratios within a run are.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time

import jax

from models.layers import unrolled_layers

# family -> (label, model fields) per depth, shallowest first
DEPTHS = {
    "flux": (("2+4 blocks", dict(num_layers=2, num_single_layers=4)),
             ("19+38 blocks", dict(num_layers=19, num_single_layers=38))),
    "sd3": (("2 blocks", dict(num_layers=2)), ("24 blocks", dict(num_layers=24)), ("38 blocks", dict(num_layers=38))),
}
FORMS = {"scan": contextlib.nullcontext, "unrolled": unrolled_layers}


def compile_seconds(family: str, fields: dict, form: str) -> float:
    """Seconds to lower and compile one denoiser step of `family` at the published widths with `fields`."""
    from nag_jax.bench import abstract_params, build

    module, inputs, call = build(family, tiny=False)
    module = module.clone(**fields)
    params = abstract_params(family, module, inputs)
    start = time.perf_counter()
    with FORMS[form]():
        jax.jit(lambda p, x: call(module, p, x)).lower(params, inputs(1, 1)).compile()
    return time.perf_counter() - start


def depth_figures(family: str, repeats: int = 1, forms=tuple(FORMS), progress=None) -> list[dict]:
    """One record per (depth, form): median compile seconds, ratio to the shallowest depth."""
    from nag_jax.bench import _record

    seconds = {(label, form): [] for label, _ in DEPTHS[family] for form in forms}
    compile_seconds(family, DEPTHS[family][0][1], forms[0])  # warm-up: first-compile costs of the process
    for _ in range(repeats):
        for label, fields in DEPTHS[family]:
            for form in forms:
                seconds[(label, form)].append(compile_seconds(family, fields, form))
                if progress:
                    progress.update(1)
    load = os.getloadavg()[0]
    shallowest = DEPTHS[family][0][0]
    return [
        dict(_record("depth", family, f"compile, {label}, {form} (load {load:.1f})", statistics.median(values), "s",
                     statistics.median(seconds[(shallowest, form)])), load_average=load)
        for (label, form), values in seconds.items()
    ]
