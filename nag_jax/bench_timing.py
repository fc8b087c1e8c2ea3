"""Bench part "timing": one denoiser step on small random models, jitted nag-jax beside the
diffusers PyTorch eager model holding the same weights (needs torch and diffusers, the test
extra), the variants interleaved round-robin, medians reported with the load average.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax

from nag_jax.bench import (QUIET_LOAD, TINY_FLUX_CONFIG, TINY_SD3_CONFIG, TINY_UNET_CONFIG, _concrete, _record, build,
                           step_function, variants)


def _diffusers_model(family: str, folder: Path):
    """The diffusers model of the tiny config, saved to `folder`, and nag-jax's copy of it."""
    import diffusers

    if family == "unet":
        from convert.unet import load_unet

        model = diffusers.UNet2DConditionModel(**TINY_UNET_CONFIG).eval()
        model.save_pretrained(folder)
        module, params = load_unet(folder)
    elif family == "flux":
        from convert.flux import load_flux_transformer

        model = diffusers.FluxTransformer2DModel(**TINY_FLUX_CONFIG).eval()
        model.save_pretrained(folder)
        module, params = load_flux_transformer(folder)
    else:
        from convert.sd3 import load_sd3_transformer

        model = diffusers.SD3Transformer2DModel(**TINY_SD3_CONFIG).eval()
        model.save_pretrained(folder)
        module, params = load_sd3_transformer(folder)
    return model, module, {"params": params}


def _torch_step(family: str, model, x: dict):
    import torch

    t = jax.tree.map(torch.from_numpy, x)
    if family == "unet":
        return lambda: model(t["sample"], t["timesteps"], t["encoder_hidden_states"], return_dict=False)
    return lambda: model(**t, return_dict=False)


def _torch_reference_nag_flux(model, x: dict):
    """diffusers Flux with the PyTorch reference NAG of tests/test_flux_nag.py (importable only
    from a source checkout), or None."""
    tests = Path(__file__).resolve().parent.parent / "tests"
    if not (tests / "test_flux_nag.py").exists():
        return None
    sys.path.insert(0, str(tests))
    try:
        from test_flux_nag import torch_reference_nag
    except ImportError:
        return None
    finally:
        sys.path.remove(str(tests))
    import copy

    reference_model = copy.deepcopy(model)
    return lambda: torch_reference_nag(reference_model, x)


def timing_figures(family: str, repeats: int = 7, progress=None) -> list[dict]:
    """Median seconds per denoiser step of every variant, measured interleaved in one run, with the
    highest 1-minute load average seen (before or after): above QUIET_LOAD no target is judged."""
    import torch

    module, inputs, call = build(family, tiny=True)
    with tempfile.TemporaryDirectory() as folder:
        model, module, params = _diffusers_model(family, Path(folder))
    steps = {}
    x_plain = _concrete(inputs(1, 1))
    steps["diffusers (PyTorch eager)"] = _torch_step(family, model, x_plain)
    if family == "flux":
        x_neg = _concrete(inputs(1, 2))
        reference = _torch_reference_nag_flux(model, x_neg)
        if reference is not None:
            steps["diffusers + reference NAG (PyTorch eager)"] = reference
    for name, (extra, context, rows) in variants(family).items():
        if name == "NAG reference layout":
            continue  # a FLOP-count construction; its timing is the PyTorch reference's above
        fn = jax.jit(step_function(call, module, context))
        x = jax.device_put(_concrete(inputs(rows, rows + extra)))
        steps[f"nag-jax {name}"] = lambda fn=fn, x=x: jax.block_until_ready(fn(params, x))
    times = {name: [] for name in steps}
    load_before = os.getloadavg()[0]
    with torch.no_grad():
        for fn in steps.values():  # warm-up: compile, allocate
            fn(), fn()
        names = list(steps)
        for r in range(repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order
                start = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - start)
            if progress:
                progress.update(1)
    medians = {name: statistics.median(t) for name, t in times.items()}
    load = max(load_before, os.getloadavg()[0])
    records = []
    for name, seconds in medians.items():
        baseline = medians["nag-jax no NAG"] if name.startswith("nag-jax") else medians["diffusers (PyTorch eager)"]
        record = _record("timing", family, name, seconds, "ms", baseline, scale=1e3, tiny=True)
        if name == "nag-jax no NAG":
            record["vs_pytorch_eager"] = seconds / medians["diffusers (PyTorch eager)"]
            record["target"], record["met"] = 1.0, bool(record["vs_pytorch_eager"] <= 1.0)
        elif (family, name) == ("flux", "nag-jax NAG shared-image"):
            record["target"], record["met"] = 1.35, bool(record["ratio"] <= 1.35)
        else:
            record["target"] = record["met"] = None
        record["load_average"] = load
        if load > QUIET_LOAD:  # other jobs starve one side: the ratios say nothing
            record["met"] = None
        records.append(record)
    return records
