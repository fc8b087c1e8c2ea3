"""Bench part "profile": where one jitted denoiser step of a small model spends its time on the
CPU, from a `jax.profiler` trace of the compiled step: each XLA op's time, grouped by what the
op computes (read from the model path and primitive XLA records in the op's metadata).

Shares of the op time, not absolute times. For the UNet, whose step is mostly its 1024-token
self-attention (32x32 latents, 8 heads of 4 features), also that attention call alone, jitted
nag-jax beside PyTorch's `scaled_dot_product_attention` on the same arrays, interleaved.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import os
import re
import statistics
import tempfile
import time

import jax
import numpy as np

from nag_jax.bench import _concrete, abstract_params, build, step_function

# (group, pattern searched in the op's metadata op_name); the first match wins
GROUPS = (
    ("attention scores and softmax (core)", r"/(core|attn)/"),  # the attention core modules
    ("convolutions", r"conv"),
    ("group / layer norms", r"norm"),
    ("dense layers and the rest", r""),
)


def op_groups(hlo_text: str) -> dict[str, str]:
    """Every named instruction of a compiled HLO module -> its group, by its op_name metadata or,
    for a fusion without metadata (XLA:CPU's library-call fusions for dots), the first op_name
    inside the computation it calls."""
    inside = {}
    for computation, body in re.findall(r"^%([\w.-]+) \([^\n]*\{\n(.*?)^\}", hlo_text, re.S | re.M):
        names = re.findall(r'op_name="([^"]*)"', body)
        if names:
            inside[computation] = names[0]
    groups = {}
    for name, rest in re.findall(r"^\s*(?:ROOT )?%([\w.-]+) = ([^\n]*)", hlo_text, re.M):
        op_name = re.search(r'op_name="([^"]*)"', rest)
        called = re.search(r"calls=%([\w.-]+)", rest)
        op_name = op_name.group(1) if op_name else inside.get(called.group(1)) if called else None
        if op_name is not None:
            groups[name] = next(group for group, pattern in GROUPS if re.search(pattern, op_name))
    return groups


def profile_figures(family: str = "unet", steps: int = 10, progress=None) -> list[dict]:
    """Share of the traced op time per group for the small `family` step without guidance."""
    from jax.profiler import ProfileData

    from nag_jax.bench import _record

    module, inputs, call = build(family, tiny=True)
    params, x = _concrete(abstract_params(family, module, inputs)), _concrete(inputs(1, 1))
    compiled = jax.jit(step_function(call, module, contextlib.nullcontext)).lower(params, x).compile()
    groups = op_groups(compiled.as_text())
    for _ in range(3):
        jax.block_until_ready(compiled(params, x))
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder)
        for _ in range(steps):
            jax.block_until_ready(compiled(params, x))
        jax.profiler.stop_trace()
        trace = ProfileData.from_file(sorted(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True))[-1])
    spent = collections.Counter()
    for plane in trace.planes:
        for line in plane.lines:
            for event in line.events:
                group = groups.get(event.name)
                if group is not None:
                    spent[group] += event.duration_ns
    total = sum(spent.values())
    if progress:
        progress.update(1)
    shares = [dict(_record("profile", family, f"{group} (share of op time)", spent[group] / total, "of ops", 1.0,
                           tiny=True), load_average=os.getloadavg()[0]) for group, _ in GROUPS]
    return shares + (attention_core_figures() if family == "unet" else [])


def attention_core_figures(tokens: int = 1024, heads: int = 8, head_dim: int = 4, repeats: int = 21) -> list[dict]:
    """Median seconds of one attention call at the tiny UNet's largest self-attention: nag-jax's
    `attention` (default backend) and PyTorch's fused CPU kernel, interleaved, load recorded."""
    import torch

    from nag_jax.attention import attention
    from nag_jax.bench import _record

    q, k, v = (np.random.default_rng(i).standard_normal((1, tokens, heads, head_dim)).astype(np.float32)
               for i in range(3))
    ours = jax.jit(attention)
    arrays = [jax.device_put(a) for a in (q, k, v)]
    theirs = [torch.from_numpy(a).permute(0, 2, 1, 3).contiguous() for a in (q, k, v)]
    calls = {"nag-jax attention (jit)": lambda: jax.block_until_ready(ours(*arrays)),
             "PyTorch scaled_dot_product_attention": lambda: torch.nn.functional.scaled_dot_product_attention(*theirs)}
    times = {name: [] for name in calls}
    load_before = os.getloadavg()[0]
    with torch.no_grad():
        for call in calls.values():
            call()
        for _ in range(repeats):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    load = max(load_before, os.getloadavg()[0])
    medians = {name: statistics.median(t) for name, t in times.items()}
    baseline = medians["PyTorch scaled_dot_product_attention"]
    return [dict(_record("profile", "unet", f"{name}, {tokens} tokens {heads}x{head_dim}", seconds, "ms", baseline,
                         scale=1e3, tiny=True), load_average=load) for name, seconds in medians.items()]
