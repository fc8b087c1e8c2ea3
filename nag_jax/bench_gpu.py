"""Bench part "gpu": per-step latency of the denoisers at the published configurations on an accelerator.

    python -m nag_jax.bench --only gpu           # one GPU: SDXL, Flux-dev, SD3.5-Large at 1024x1024
    python -m nag_jax.bench --only gpu --tiny    # the same code on the small configurations (any device)

Random bf16 weights are created on the device by a jitted init (no checkpoint needed). For each
family, guidance variant (no guidance, CFG, NAG; Flux in both NAG modes) and attention backend,
one denoiser step for one image is compiled, run once, then timed: the median of `repeats` calls.
CFG runs with the default backend only (it is two plain rows). NAG's extra time per step is
printed beside the paper's Table 4 (A100, 1024x1024), and the device's peak memory after each
family.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import jax
import jax.numpy as jnp

from nag_jax import bench
from nag_jax.attention import attention_backend

PAPER_TABLE4 = {"unet": 0.22, "flux": 0.87, "sd3": 0.43}  # NAG's extra time per step on an A100 (paper Table 4)
BACKENDS = ("auto", "blockwise")  # "auto" is cuDNN on a GPU where it applies
FAMILY_NAMES = {"unet": "SDXL", "flux": "Flux-dev", "sd3": "SD3.5-Large"}
CONFIGS = {  # family -> (published, tiny); Flux-dev is schnell's configuration with the guidance embedding
    "unet": (bench.SDXL_UNET_CONFIG, bench.TINY_UNET_CONFIG),
    "flux": (dict(bench.FLUX_SCHNELL_CONFIG, guidance_embeds=True), dict(bench.TINY_FLUX_CONFIG, guidance_embeds=True)),
    "sd3": (bench.SD35_LARGE_CONFIG, bench.TINY_SD3_CONFIG),
}


def device_model(family: str, tiny: bool):
    """(bf16 module, input specs(rows, text_rows), call) as in `bench.build`, Flux as the dev model."""
    module, inputs, call = bench.build(family, tiny)
    module = type(module).from_config(CONFIGS[family][tiny], dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    if family != "flux":
        return module, inputs, call

    def with_guidance(rows, text_rows):
        return dict(inputs(rows, text_rows), guidance=jax.ShapeDtypeStruct((rows,), jnp.float32))

    return module, with_guidance, call


def _random(specs, seed: int):
    leaves, tree = jax.tree.flatten(specs)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves)])


def _median_ms(step, params, x, repeats: int) -> float:
    jax.block_until_ready(step(params, x))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(params, x))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _peak_gib() -> float | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def gpu_figures(family: str, tiny: bool = False, backends=BACKENDS, repeats: int = 5, progress=None) -> list[dict]:
    """Records of ms per step for each variant and backend, NAG's ratios beside the paper's."""
    module, inputs, call = device_model(family, tiny)
    params = jax.jit(lambda key, x: module.init(key, **x))(
        jax.random.key(0), bench._small_init_inputs(family, inputs))
    name, config = FAMILY_NAMES[family], "tiny" if tiny else "real"
    records = []
    for backend in backends:
        baseline = None
        for variant, (extra, context, rows) in bench.variants(family).items():
            if variant == "NAG reference layout" or (variant == "CFG" and backend != backends[0]):
                continue  # the PyTorch layout is a FLOP comparison; CFG has no attention of its own

            @contextlib.contextmanager
            def traced_with(context=context):
                with attention_backend(backend), context():
                    yield

            step = jax.jit(bench.step_function(call, module, traced_with))
            ms = _median_ms(step, params, _random(inputs(rows, rows + extra), seed=1), repeats)
            baseline = baseline or ms
            label = f"{name} {variant} [{backend}]"
            if variant.startswith("NAG"):
                label += f" (paper A100: {1 + PAPER_TABLE4[family]:.2f}x)"
            records.append(dict(part="gpu", family=family, config=config, name=label, value=ms, unit="ms",
                                ratio=ms / baseline, target=None, met=None))
            if progress:
                progress.update(1)
    peak = _peak_gib()
    if peak is not None:
        records.append(dict(part="gpu", family=family, config=config, name=f"{name} peak device memory", value=peak,
                            unit="GiB", ratio=1.0, target=None, met=None))
    del params
    return records


def task_count(family: str, backends=BACKENDS) -> int:
    names = [v for v in bench.variants(family) if v != "NAG reference layout"]
    return len(names) * len(backends) - (len(backends) - 1) * ("CFG" in names)
