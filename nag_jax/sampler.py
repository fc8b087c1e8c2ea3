"""The one denoising loop every family uses: a `lax.scan` over steps inside one compiled call.

Static choices (CFG on or off, NAG on or off, where `nag_end` cuts, PAG's layers, progress
reporting) live in a frozen `GuidancePlan` and select the traced program; the scales are
traced values, so changing them reuses the compiled loop. The step range is cut into static
`Segment`s, one scan each: `nag_end` cuts it where NAG stops (the steps after the cut are traced
without the negative rows, and outside `guided` unless PAG runs, so they never compute the
negative branch), and a two-expert model (Wan2.2 A14B) where its second expert takes over. Each
expert's steps are their own compiled program taking only that expert's parameters, so no step
ever traces both; the scheduler state passes from one program to the next. A scan's length is
not traced into its body, so compile time does not grow with the steps.

Conditioning arrives as groups of `Conditioning` (cond, and optionally uncond for CFG and
nag_negative for NAG), each with one row per image. They are assembled inside the compiled
function into the row layout the models expect (image rows [uncond; cond]; text rows
[uncond; cond; nag_negative]), so the same code runs on one device, sharded over a `data`
mesh axis, or per device under `pmap`. PAG puts its perturbed rows (cond conditioning) first:
image rows [perturbed; uncond; cond], so NAG's extra text rows still belong to the last,
cond, rows and the perturbed and uncond rows never get NAG (nag-semantics.md section 3).

`per_image` (the pipeline's batch_invariant) runs the denoiser on one image's rows at a time
inside each step, on each device's own rows, so every image gets the same compiled arithmetic
whatever the batch grouping or device count (bit-identical results; docs/reproducibility.md).
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

from nag_jax.guidance import cfg, pag_scale_at
from nag_jax.intercept import NAGConfig, PAGConfig, guided
from nag_jax.sharding import param_shardings

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
    expert_steps: int | None = None  # two experts: leading steps the first runs, the rest the second; None: one
    nag_mode: str = "shared-image"
    nag_norm: str = "l1"
    progress: bool = False
    per_image: bool = False  # the denoiser sees one image (its CFG/NAG rows) at a time: batch_invariant
    pag_layers: frozenset = frozenset()  # module paths of the attention cores PAG perturbs; empty: PAG off

    @property
    def pag(self) -> bool:
        return bool(self.pag_layers)

    @property
    def row_groups(self) -> int:
        """Copies of the image batch the denoiser sees: [perturbed;] [uncond;] cond."""
        return 1 + self.cfg + self.pag


@flax.struct.dataclass
class Scales:
    """Traced guidance strengths: changing them does not recompile."""

    guidance_scale: Any = 1.0
    nag_scale: Any = 1.0
    nag_tau: Any = 2.5
    nag_alpha: Any = 0.5
    pag_scale: Any = 0.0
    pag_adaptive_scale: Any = 0.0
    guidance_scale_2: Any = None  # the second expert's CFG scale (diffusers' guidance_scale_2); None: guidance_scale


def _rows(*trees):
    """Concatenate pytrees along their leading (row) axis; None groups are skipped."""
    present = [t for t in trees if t is not None]
    return jax.tree.map(lambda *leaves: jnp.concatenate(leaves, axis=0), *present)


def assemble(groups: dict, with_nag: bool, with_pag: bool) -> Conditioning:
    """Image rows [perturbed; uncond; cond] (perturbed with PAG: cond conditioning); text rows
    the same plus [nag_negative] when NAG runs."""
    uncond, cond = groups.get("uncond"), groups["cond"]
    perturbed = cond if with_pag else None
    negative = groups.get("nag_negative") if with_nag else None
    return Conditioning(
        text=_rows(perturbed and perturbed.text, uncond and uncond.text, cond.text, negative and negative.text),
        image=None if cond.image is None else _rows(perturbed and perturbed.image, uncond and uncond.image, cond.image),
    )


def combine(plan: GuidancePlan, scales: Scales, timestep, output):
    """The guided prediction from the denoiser's row groups: CFG, then PAG's
    pag_scale(t) * (cond - perturbed) (diffusers' PAG pipelines)."""
    groups = jnp.split(output, plan.row_groups, axis=0)
    cond = groups[-1]
    guided_output = cfg(groups[-2], cond, scales.guidance_scale) if plan.cfg else cond
    if plan.pag:
        guided_output = guided_output + pag_scale_at(scales.pag_scale, scales.pag_adaptive_scale, timestep) * (
            cond - groups[0])
    return guided_output


class _Progress:
    """Host side of the per-step progress report (a tqdm bar and/or the user's callback)."""

    active: list = []

    @classmethod
    def tick(cls, step, timestep, latents=None):
        for report in cls.active:
            report(int(step), float(timestep), latents)


def _report(report: str, step, timestep, sample, axis_name):
    """Send this step to the host; under pmap only device 0 reports, with every device's rows."""
    if report == "none":
        return
    if axis_name is None:  # one program (one device, or sharded jit): one call with whole arrays
        jax.debug.callback(_Progress.tick, step, timestep, *([sample] if report == "latents" else []))
        return
    args = (step, timestep) + ((jax.lax.all_gather(sample, axis_name, tiled=True),) if report == "latents" else ())
    jax.lax.cond(jax.lax.axis_index(axis_name) == 0, lambda: jax.debug.callback(_Progress.tick, *args), lambda: None)


@dataclasses.dataclass(frozen=True)
class Segment:
    """One scan of the loop: steps [start, stop), with or without NAG, on one expert."""

    start: int
    stop: int
    nag: bool
    expert: int = 0


def segments(plan: GuidancePlan, num_steps: int) -> list[Segment]:
    """The scans in step order: the range cut where NAG stops and where the second expert starts."""
    nag_cut = plan.nag_steps if plan.nag else 0
    expert_cut = num_steps if plan.expert_steps is None else plan.expert_steps
    cuts = sorted({0, nag_cut, expert_cut, num_steps})
    return [Segment(start, stop, start < nag_cut, int(start >= expert_cut))
            for start, stop in zip(cuts, cuts[1:]) if stop > start]


def denoise_loop(denoise: Callable, schedule, plan: GuidancePlan, report: str, params, latents, groups, scales,
                 image_keys, state=None, axis_name=None, expert: int | None = None, prepare=None):
    """Run the steps of `expert` (None: every step; `denoise` and `params` are that expert's).
    `denoise(params, model_input, t, conditioning) -> model_output`, given the conditioning
    through `prepare(params, conditioning)` (the step-invariant work, run once per scan, before
    it; None: nothing to prepare). Returns (latents, scheduler state); `state` is the state the
    previous expert's steps left (None: the start).

    `report`: "none", "steps" (step index and timestep to the host, for progress bars) or
    "latents" (the latents too, for a user's per-step callback). `image_keys`: one PRNG key
    (or its raw key data) per row. `axis_name`: the pmap axis, when run under pmap.
    """
    if not jax.dtypes.issubdtype(image_keys.dtype, jax.dtypes.prng_key):
        image_keys = jax.random.wrap_key_data(image_keys)
    timesteps = jnp.asarray(schedule.timesteps)
    nag_config = NAGConfig(scales.nag_scale, scales.nag_tau, scales.nag_alpha, plan.nag_mode, plan.nag_norm,
                           PAGConfig(plan.pag_layers, plan.row_groups))

    prepared = (lambda conditioning: conditioning) if prepare is None else functools.partial(prepare, params)

    def body_for(with_nag: bool, scales: Scales):
        conditioning = prepared(assemble(groups, with_nag, plan.pag))

        def guided_output(model_input, conditioning, timestep):
            if plan.row_groups > 1:
                model_input = jnp.concatenate([model_input] * plan.row_groups, axis=0)
            with guided(nag_config) if with_nag or plan.pag else contextlib.nullcontext():
                output = denoise(params, model_input, timestep, conditioning)
            if plan.row_groups > 1:
                output = combine(plan, scales, timestep, output)
            return output

        def image_by_image(model_input, timestep):
            """The denoiser on one image's rows at a time, as the body of a loop whose length XLA
            cannot see: never unrolled or inlined into its surroundings, it compiles to the same
            numerics whatever the batch size, device count or parallel mode."""
            count = jax.lax.optimization_barrier(jnp.int32(model_input.shape[0]))
            # Rows are read from arrays with a spare row: from a one-row array XLA would drop the
            # slice and hoist the image's work out of the loop, which changes its arithmetic.
            rows = jax.tree.map(lambda leaf: jnp.concatenate([leaf, leaf[:1]]), (model_input, groups))

            def one_image(i, outputs):
                row = lambda leaf: jax.lax.dynamic_slice_in_dim(leaf, i, 1)  # noqa: E731
                x, image_groups = jax.tree.map(row, rows)
                # prepared per image and step: one image's rows, the same arithmetic whatever the batch
                output = guided_output(x, prepared(assemble(image_groups, with_nag, plan.pag)), timestep)
                return jax.lax.dynamic_update_slice_in_dim(outputs, output, i, 0)

            return jax.lax.fori_loop(0, count, one_image, jnp.zeros_like(model_input))

        def body(carry, step):
            sample, state = carry
            model_input = schedule.scale_model_input(sample, step)
            if plan.per_image:
                output = image_by_image(model_input, timesteps[step])
            else:
                output = guided_output(model_input, conditioning, timesteps[step])
            noise = None
            if schedule.needs_noise:  # each image's noise from its own key, whatever the layout
                draw = lambda key: jax.random.normal(jax.random.fold_in(key, step), sample.shape[1:], sample.dtype)  # noqa: E731
                noise = jax.vmap(draw)(image_keys)
            sample, state = schedule.step(state, step, output, sample, noise)
            _report(report, step, timesteps[step], sample, axis_name)
            return (sample, state), None

        return body

    if state is None:
        state = schedule.init_state(latents)
        if axis_name is not None:  # per device, as the rows are (shard_map checks that a scan carry keeps it)
            state = jax.tree.map(lambda leaf: jax.lax.pcast(leaf, axis_name, to="varying"), state)
    carry = (latents, state)
    for segment in segments(plan, schedule.num_steps):
        if expert is None or segment.expert == expert:
            second = segment.expert == 1 and scales.guidance_scale_2 is not None
            segment_scales = scales.replace(guidance_scale=scales.guidance_scale_2) if second else scales
            carry, _ = jax.lax.scan(body_for(segment.nag, segment_scales), carry, jnp.arange(segment.start, segment.stop))
    return carry


def _digest(obj) -> str:
    """A stable key for a schedule (numpy tables included) to cache compiled loops by."""
    return hashlib.sha1(pickle.dumps(obj)).hexdigest()


def resolve_parallel(parallel: str) -> str:
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {', '.join(PARALLEL_MODES)}, got {parallel!r}")
    if parallel == "auto":
        return "sharded" if jax.device_count() > 1 else "none"
    return parallel


def make_mesh(model_parallel: int = 1) -> Mesh:
    """All devices (of every host) as a (data, model) mesh: batch rows over `data`, parameters
    over `model` (see nag_jax/sharding.py). model_parallel=1 is plain data parallelism."""
    devices = jax.devices()
    if not isinstance(model_parallel, int) or model_parallel < 1 or len(devices) % model_parallel:
        raise ValueError(f"model_parallel must be a positive integer dividing the device count ({len(devices)}), "
                         f"got {model_parallel!r}")
    return Mesh(np.array(devices).reshape(len(devices) // model_parallel, model_parallel), ("data", "model"))


def _to_global(tree, sharding_of):
    """Place host-identical arrays onto (possibly several hosts') devices; `sharding_of(leaf)`."""
    def place(leaf):
        sharding = sharding_of(leaf)
        if jax.process_count() == 1:
            return jax.device_put(leaf, sharding)
        host = np.asarray(leaf)  # every host holds the whole batch: each takes its own shards
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, tree)


class Sampler:
    """Compiles `denoise_loop` once per (schedule, plan, report, parallel mode, expert) and runs it.

    parallel="sharded": one jit over a (data, model) mesh of all devices; batch rows are split
    over `data` and, with `model_parallel` > 1, each large parameter over `model` (FSDP-style:
    XLA gathers a layer's weights where it is used), for models bigger than one device.
    parallel="pmap": one program copy per local device, parameters replicated.
    The caller pads the batch to a multiple of `batch_multiple(parallel)`.

    `denoise`: one function, or one per expert (a tuple, in step order; the call's `params` is
    then a tuple too). Each expert's parameters are placed on the devices once and kept there;
    with `offload_inactive_expert` only the running expert's are: the other's device copy is
    deleted when its steps end (its host copy, the converters' numpy arrays, stays).
    """

    def __init__(self, denoise: Callable | tuple, model_parallel: int = 1, stacked_params=(),
                 prepare: Callable | None = None, offload_inactive_expert: bool = False):
        self.denoise, self.prepare = denoise, prepare
        self.model_parallel = model_parallel
        self.stacked_params = stacked_params  # param subtrees with a leading layer axis: not split
        self.offload_inactive_expert = offload_inactive_expert
        self._compiled: dict = {}
        self._placement: dict = {}  # expert -> (id(params), layout, placed params, params)

    def batch_multiple(self, parallel: str) -> int:
        parallel = self._check(parallel)
        if parallel == "none":
            return 1
        if parallel == "pmap":
            return jax.local_device_count()
        return make_mesh(self.model_parallel).shape["data"]

    def _check(self, parallel: str) -> str:
        parallel = resolve_parallel(parallel)
        if self.model_parallel > 1 and parallel != "sharded":
            raise ValueError(f"model_parallel={self.model_parallel} needs parallel='sharded' (or 'auto' with "
                             f"several devices), got parallel={parallel!r}")
        return parallel

    def _placed(self, expert: int, params, layout, place):
        """`params` on the devices, placed once per (expert, params object, layout): the converters
        hand over host arrays, and copying a large model to its devices every call would dominate."""
        if self._placement.get(expert, (None, None))[:2] != (id(params), layout):
            self._placement[expert] = (id(params), layout, place(params), params)  # keeps params alive: id unique
        return self._placement[expert][2]

    def _offload(self, expert: int):
        """Free the devices of `expert`'s parameters (their host copy stays with the caller)."""
        _, _, placed, params = self._placement.pop(expert)
        host = {id(leaf) for leaf in jax.tree.leaves(params)}
        for leaf in jax.tree.leaves(placed):
            if isinstance(leaf, jax.Array) and id(leaf) not in host:  # never the caller's own arrays
                leaf.delete()

    def _program(self, schedule, plan: GuidancePlan, report: str, parallel: str, expert: int | None):
        key = (_digest(schedule), plan, report, parallel, expert)
        if key not in self._compiled:
            denoise = self.denoise[expert or 0] if isinstance(self.denoise, tuple) else self.denoise
            loop = functools.partial(denoise_loop, denoise, schedule, plan, report, expert=expert, prepare=self.prepare)
            if parallel == "pmap":
                loop = functools.partial(loop, axis_name="data")
                self._compiled[key] = jax.pmap(loop, axis_name="data", in_axes=(None, 0, 0, None, 0, 0))
            elif parallel == "sharded" and plan.per_image:
                # Each device runs the one-device program on its own rows (a jit over the mesh would
                # gather the rows into the image loop); parameters whole on every device. The
                # scheduler state leaves and re-enters blocked the same way, whatever its layout.
                rows, whole = PartitionSpec("data"), PartitionSpec()
                loop = functools.partial(loop, axis_name="data")
                self._compiled[key] = jax.jit(jax.shard_map(loop, mesh=make_mesh(self.model_parallel),
                                                            in_specs=(whole, rows, rows, whole, rows, rows),
                                                            out_specs=rows))
            else:
                self._compiled[key] = jax.jit(loop)
        return self._compiled[key]

    def __call__(self, schedule, plan: GuidancePlan, params, latents, groups: dict, scales: Scales, image_keys,
                 parallel: str = "auto", reporters=(), report: str = "none"):
        """`reporters`: host functions (step, timestep, latents or None) called after each step;
        `report` says what the compiled loop sends them ("none", "steps", "latents")."""
        parallel = self._check(parallel)
        report = report if reporters else "none"
        image_keys = jax.random.key_data(image_keys)  # plain uint32 rows: placed like any other array
        if parallel == "sharded":
            mesh = make_mesh(self.model_parallel)
            by_row = lambda leaf: NamedSharding(mesh, PartitionSpec("data"))  # noqa: E731
            latents, groups, image_keys = _to_global((latents, groups, image_keys), by_row)
            layout = ("sharded", self.model_parallel)
            place = lambda p: jax.tree.map(  # noqa: E731
                lambda leaf, sharding: _to_global(leaf, lambda _: sharding), p,
                param_shardings(p, mesh, stacked=self.stacked_params))
        elif parallel == "none":
            layout, place = "none", jax.device_put
        elif parallel == "pmap":
            devices = jax.local_device_count()
            per_device = lambda x: x.reshape(devices, x.shape[0] // devices, *x.shape[1:])  # noqa: E731
            latents, groups, image_keys = jax.tree.map(per_device, (latents, groups, image_keys))
        if plan.expert_steps is None:
            experts, expert_params = [None], (params,)
        else:
            experts = list(dict.fromkeys(segment.expert for segment in segments(plan, schedule.num_steps)))
            expert_params = params
        carry = (latents, None)
        _Progress.active = list(reporters)
        try:
            for expert in experts:
                program = self._program(schedule, plan, report, parallel, expert)
                placed = expert_params[expert or 0]
                if parallel != "pmap":
                    placed = self._placed(expert or 0, placed, layout, place)
                carry = jax.block_until_ready(program(placed, carry[0], groups, scales, image_keys, carry[1]))
                if self.offload_inactive_expert and expert is not None and parallel != "pmap":
                    self._offload(expert or 0)
        finally:
            _Progress.active = []
        out = carry[0]
        if parallel == "pmap":
            out = out.reshape(-1, *out.shape[2:])
        if parallel == "sharded" and jax.process_count() > 1:
            from jax.experimental import multihost_utils

            out = multihost_utils.process_allgather(out, tiled=True)
        return out
