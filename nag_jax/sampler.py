"""The one denoising loop every family uses: a `lax.scan` over steps inside one compiled call.

Static choices (CFG on or off, NAG on or off, where `nag_end` cuts, progress reporting) live in
a frozen `GuidancePlan` and select the traced program; the scales are traced values, so
changing them reuses the compiled loop. `nag_end` is two scans: the steps after the cut are
traced without the negative rows and outside `guided`, so they never compute the negative
branch. The loop's length is a scan length, so compile time does not grow with the steps.

Conditioning arrives as groups of `Conditioning` (cond, and optionally uncond for CFG and
nag_negative for NAG), each with one row per image. They are assembled inside the compiled
function into the row layout the models expect (image rows [uncond; cond]; text rows
[uncond; cond; nag_negative]), so the same code runs on one device, sharded over a `data`
mesh axis, or per device under `pmap`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import pickle
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nag_jax.guidance import cfg
from nag_jax.intercept import NAGConfig, guided

PARALLEL_MODES = ("auto", "sharded", "pmap", "none")


@flax.struct.dataclass
class Conditioning:
    """Encoded prompts for a batch of images, one row per image.

    `text` leaves belong to the text stream (context tokens; for MM-DiT also the pooled
    embedding that modulates it) and get the NAG negative rows appended; `image` leaves
    condition the image stream (SDXL's pooled embedding and time ids) and never do.
    """

    text: Any
    image: Any = None


@dataclasses.dataclass(frozen=True)
class GuidancePlan:
    """Everything about guidance that is decided before tracing."""

    cfg: bool = False
    nag: bool = False
    nag_steps: int = 0  # leading steps that run NAG (nag_step_split)
    nag_mode: str = "shared-image"
    progress: bool = False


@flax.struct.dataclass
class Scales:
    """Traced guidance strengths: changing them does not recompile."""

    guidance_scale: Any = 1.0
    nag_scale: Any = 1.0
    nag_tau: Any = 2.5
    nag_alpha: Any = 0.5


def _rows(*trees):
    """Concatenate pytrees along their leading (row) axis; None groups are skipped."""
    present = [t for t in trees if t is not None]
    return jax.tree.map(lambda *leaves: jnp.concatenate(leaves, axis=0), *present)


def assemble(groups: dict, with_nag: bool) -> Conditioning:
    """Image rows [uncond; cond]; text rows [uncond; cond] plus [nag_negative] when NAG runs."""
    uncond, cond = groups.get("uncond"), groups["cond"]
    negative = groups.get("nag_negative") if with_nag else None
    return Conditioning(
        text=_rows(uncond and uncond.text, cond.text, negative and negative.text),
        image=None if cond.image is None else _rows(uncond and uncond.image, cond.image),
    )


class _Progress:
    """Host side of the per-step progress report (a tqdm bar and/or the user's callback)."""

    active: list = []

    @classmethod
    def tick(cls, step, timestep, latents=None):
        for report in cls.active:
            report(int(step), float(timestep), latents)


def denoise_loop(denoise: Callable, schedule, plan: GuidancePlan, report: str, params, latents, groups, scales,
                 image_keys):
    """Run every step. `denoise(params, model_input, t, conditioning) -> model_output`.

    `report`: "none", "steps" (step index and timestep to the host, for progress bars) or
    "latents" (the latents too, for a user's per-step callback).
    """
    timesteps = jnp.asarray(schedule.timesteps)
    nag_config = NAGConfig(scales.nag_scale, scales.nag_tau, scales.nag_alpha, plan.nag_mode)

    def body_for(with_nag: bool):
        conditioning = assemble(groups, with_nag)

        def body(carry, step):
            sample, state = carry
            model_input = schedule.scale_model_input(sample, step)
            if plan.cfg:
                model_input = jnp.concatenate([model_input, model_input], axis=0)
            with guided(nag_config) if with_nag else contextlib.nullcontext():
                output = denoise(params, model_input, timesteps[step], conditioning)
            if plan.cfg:
                uncond_out, cond_out = jnp.split(output, 2, axis=0)
                output = cfg(uncond_out, cond_out, scales.guidance_scale)
            noise = None
            if schedule.needs_noise:  # each image's noise from its own key, whatever the layout
                draw = lambda key: jax.random.normal(jax.random.fold_in(key, step), sample.shape[1:], sample.dtype)  # noqa: E731
                noise = jax.vmap(draw)(image_keys)
            sample, state = schedule.step(state, step, output, sample, noise)
            if report != "none":
                jax.debug.callback(_Progress.tick, step, timesteps[step], *([sample] if report == "latents" else []))
            return (sample, state), None

        return body

    carry = (latents, schedule.init_state(latents))
    phases = ((True, 0, plan.nag_steps), (False, plan.nag_steps, schedule.num_steps)) if plan.nag else (
        (False, 0, schedule.num_steps),)
    for with_nag, start, stop in phases:
        if stop > start:
            carry, _ = jax.lax.scan(body_for(with_nag), carry, jnp.arange(start, stop))
    return carry[0]


def _digest(obj) -> str:
    """A stable key for a schedule (numpy tables included) to cache compiled loops by."""
    return hashlib.sha1(pickle.dumps(obj)).hexdigest()


def resolve_parallel(parallel: str) -> str:
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {', '.join(PARALLEL_MODES)}, got {parallel!r}")
    if parallel == "auto":
        return "sharded" if jax.local_device_count() > 1 else "none"
    return parallel


class Sampler:
    """Compiles `denoise_loop` once per (schedule, plan, parallel mode) and runs it.

    Batches are split over all local devices for "sharded" (jit with a `data` mesh axis) and
    "pmap"; the caller pads the batch to a multiple of `batch_multiple(parallel)`.
    """

    def __init__(self, denoise: Callable):
        self.denoise = denoise
        self._compiled: dict = {}

    @staticmethod
    def batch_multiple(parallel: str) -> int:
        return 1 if resolve_parallel(parallel) == "none" else jax.local_device_count()

    def _program(self, schedule, plan: GuidancePlan, report: str, parallel: str):
        key = (_digest(schedule), plan, report, parallel)
        if key not in self._compiled:
            loop = functools.partial(denoise_loop, self.denoise, schedule, plan, report)
            if parallel == "pmap":
                self._compiled[key] = jax.pmap(loop, in_axes=(None, 0, 0, None, 0))
            else:
                self._compiled[key] = jax.jit(loop)
        return self._compiled[key]

    def __call__(self, schedule, plan: GuidancePlan, params, latents, groups: dict, scales: Scales, image_keys,
                 parallel: str = "auto", reporters=(), report: str = "none"):
        """`reporters`: host functions (step, timestep, latents or None) called after each step;
        `report` says what the compiled loop sends them ("none", "steps", "latents")."""
        parallel = resolve_parallel(parallel)
        program = self._program(schedule, plan, report if reporters else "none", parallel)
        devices = jax.local_devices()
        if parallel == "sharded":
            mesh = Mesh(np.array(devices), ("data",))
            by_row = NamedSharding(mesh, PartitionSpec("data"))
            latents, groups, image_keys = jax.device_put((latents, groups, image_keys), by_row)
            params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        elif parallel == "pmap":
            per_device = lambda x: x.reshape(len(devices), x.shape[0] // len(devices), *x.shape[1:])  # noqa: E731
            latents, groups, image_keys = jax.tree.map(per_device, (latents, groups, image_keys))
        _Progress.active = list(reporters)
        try:
            out = program(params, latents, groups, scales, image_keys)
            out = jax.block_until_ready(out)
        finally:
            _Progress.active = []
        if parallel == "pmap":
            out = out.reshape(-1, *out.shape[2:])
        return out
