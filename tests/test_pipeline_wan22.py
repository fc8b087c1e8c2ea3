"""Wan2.2 A14B (two experts) on tiny folders in the published layouts equals diffusers' WanPipeline /
WanImageToVideoPipeline: the high-noise `transformer` runs the steps with t >= boundary_ratio x
1000, `transformer_2` the rest, with guidance_scale / guidance_scale_2; NAG (the reference of
torch_wan_nag.py on both experts, inside diffusers' pipeline) alone, with CFG and with a
nag_end that cuts inside the second expert's steps. Each expert's steps are their own
compiled program, and offload_inactive_expert frees the devices of the expert not running.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil

import jax
import numpy as np
import pytest
import torch

from nag_jax.pipeline import NAGPipeline
from nag_jax.sampler import Segment, denoise_loop, segments
from tests.tiny_wan import build_tiny_wan_pipeline
from torch_wan_nag import install_nag, with_nag_rows

PROMPT, NEGATIVE, NAG_NEGATIVE = "a red cat", "blurry", "a photo of a dog"
NAG = dict(nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25)
# UniPC (flow_shift 3) timesteps 999, 857, 600: the high-noise expert (boundary 875 for T2V-A14B's
# ratio 0.875, 900 for I2V-A14B's 0.9) runs step 0, the low-noise expert steps 1 and 2.
CALL = dict(height=32, width=32, num_frames=5, num_inference_steps=3)
NAG_END = 0.2  # cut at t = 800: NAG on steps 0 and 1, so three scans (high+NAG, low+NAG, low)


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan22_t2v")
    reference = build_tiny_wan_pipeline(folder, boundary_ratio=0.875)
    latents = np.random.default_rng(0).standard_normal((1, 4, 2, 4, 4)).astype(np.float32)
    return reference, NAGPipeline.from_pretrained(folder), latents


def reference_latents(pipe, latents, guidance_scale, nag_end=None, **kwargs):
    """diffusers' latents; with `nag_end`, NAG installed on both experts."""
    if nag_end is not None:
        pipe = copy.deepcopy(pipe)
        negative = pipe.encode_prompt(NAG_NEGATIVE, do_classifier_free_guidance=False, max_sequence_length=512)[0]
        for transformer in (pipe.transformer, pipe.transformer_2):
            install_nag(transformer, NAG["nag_scale"], NAG["nag_tau"], NAG["nag_alpha"])
            with_nag_rows(transformer, negative, cfg=guidance_scale > 1, nag_end=nag_end)
    with torch.no_grad():
        return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, latents=torch.from_numpy(latents), output_type="latent",
                    guidance_scale=guidance_scale, **CALL, **kwargs).frames.numpy()


def ours(pipe, latents, **kwargs):
    return pipe(PROMPT, negative_prompt=NEGATIVE, latents=latents, output_type="latent", **CALL, **kwargs).frames


def relative(got, want):
    return np.abs(got - want).max() / max(1.0, np.abs(want).max())


TOL = 1e-4  # parity; NAG must move the latents by at least 50 times it


def test_folders_load_as_diffusers_writes_them(t2v):
    reference, pipe, _ = t2v
    index = json.loads((pipe.family.path / "model_index.json").read_text())
    assert index["boundary_ratio"] == 0.875 and index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    assert pipe.family.boundary_ratio == reference.config.boundary_ratio
    schedule = pipe.family.make_schedule(3, 32, 32, {})
    assert pipe.family.expert_split(schedule, {"guidance_scale": 5.0, "guidance_scale_2": None}) == (1, 5.0)


def test_t2v_frames_match_diffusers(t2v):
    """CFG with guidance_scale_2 != guidance_scale (without CFG: the NAG test's plain runs)."""
    reference, pipe, latents = t2v
    with torch.no_grad():
        want = reference(PROMPT, negative_prompt=NEGATIVE, latents=torch.from_numpy(latents), output_type="np",
                         guidance_scale=5.0, guidance_scale_2=2.0, **CALL).frames
    got = pipe(PROMPT, negative_prompt=NEGATIVE, latents=latents, output_type="np", guidance_scale=5.0,
               guidance_scale_2=2.0, **CALL).frames
    assert got.shape == (1, 5, 32, 32, 3) and np.abs(got - want).max() <= 1e-3
    assert np.abs(want - want.mean()).max() > 0.05  # the frames are not flat: the comparison sees content
    one_expert = copy.copy(reference)  # the low-noise expert's steps matter: not the high-noise one throughout
    one_expert.transformer_2 = reference.transformer
    assert relative(reference_latents(one_expert, latents, 5.0, guidance_scale_2=2.0), ours(
        pipe, latents, guidance_scale=5.0, guidance_scale_2=2.0)) > 1e-2


def test_guidance_scale_2_scales_the_second_experts_cfg(t2v):
    _, pipe, latents = t2v
    default, same, other = (ours(pipe, latents, guidance_scale=5.0, guidance_scale_2=g) for g in (None, 5.0, 2.0))
    np.testing.assert_array_equal(default, same)
    assert np.abs(other - same).max() > 1e-2


@pytest.mark.parametrize("guidance_scale, guidance_scale_2, nag_end", [(1.0, None, 1.0), (5.0, 2.0, 1.0),
                                                                        (5.0, 2.0, NAG_END)],
                         ids=["nag", "nag+cfg", "nag_end"])
def test_t2v_nag_matches_reference(t2v, guidance_scale, guidance_scale_2, nag_end):
    reference, pipe, latents = t2v
    want = reference_latents(reference, latents, guidance_scale, nag_end, guidance_scale_2=guidance_scale_2)
    got = ours(pipe, latents, guidance_scale=guidance_scale, guidance_scale_2=guidance_scale_2,
               nag_negative_prompt=NAG_NEGATIVE, nag_end=nag_end, **NAG)
    assert relative(got, want) <= TOL
    plain = ours(pipe, latents, guidance_scale=guidance_scale, guidance_scale_2=guidance_scale_2)
    assert relative(plain, want) > 50 * TOL  # NAG moved the result
    assert relative(plain, reference_latents(reference, latents, guidance_scale,
                                             guidance_scale_2=guidance_scale_2)) <= TOL


def test_each_expert_is_its_own_program_with_one_experts_parameters(t2v):
    """The three scans of a nag_end cut inside the low-noise steps: the sampler runs the high-noise
    expert's program with its parameters only (one scan, NAG), then the low-noise expert's with
    its parameters only (two scans, NAG and plain); the denoiser is traced once per scan, by
    the scan's expert."""
    _, pipe, latents = t2v
    fresh = NAGPipeline(pipe.family)
    traced, runs = [], []
    fresh.sampler.denoise = tuple(
        (lambda params, x, *rest, expert=expert, denoise=denoise: traced.append((expert, x.shape[0]))
         or denoise(params, x, *rest)) for expert, denoise in enumerate(fresh.sampler.denoise))
    program_of = fresh.sampler._program

    def recording(schedule, plan, report, parallel, expert):
        program = program_of(schedule, plan, report, parallel, expert)
        return lambda params, *args: runs.append((expert, params, args, schedule, plan)) or program(params, *args)

    fresh.sampler._program = recording
    ours(fresh, latents, guidance_scale=5.0, nag_negative_prompt=NAG_NEGATIVE, nag_end=NAG_END, **NAG)
    assert traced == [(0, 2), (1, 2), (1, 2)]  # [uncond; cond] rows, the NAG rows are text-only
    assert [run[0] for run in runs] == [0, 1]
    plan = runs[0][4]
    assert segments(plan, 3) == [Segment(0, 1, True, 0), Segment(1, 2, True, 1), Segment(2, 3, False, 1)]
    experts = pipe.family.experts()
    for (expert, params, args, schedule, plan), scans in zip(runs, (1, 2)):
        given, own, other = (jax.tree.leaves(tree) for tree in (params, experts[expert][1], experts[1 - expert][1]))
        assert len(given) == len(own) and all(np.array_equal(a, b) for a, b in zip(given, own))
        assert not all(np.array_equal(a, b) for a, b in zip(given, other))  # the two experts' weights differ
        loop = functools.partial(denoise_loop, fresh.sampler.denoise[expert], schedule, plan, "none", expert=expert)
        program = jax.make_jaxpr(loop)(params, *args)
        assert [eqn.primitive.name for eqn in program.jaxpr.eqns].count("scan") == scans


def test_offloading_the_inactive_expert_frees_its_devices_and_changes_nothing(t2v):
    _, pipe, latents = t2v
    offloading = NAGPipeline(pipe.family, offload_inactive_expert=True)
    seen = []

    def record(step, timestep, _):
        placement = offloading.sampler._placement
        on_device = {expert: not any(leaf.is_deleted() for leaf in jax.tree.leaves(entry[2]))
                     for expert, entry in placement.items()}
        seen.append((step, on_device, [jax.tree.leaves(entry[2]) for entry in placement.values()]))

    args = dict(guidance_scale=5.0, guidance_scale_2=2.0, nag_negative_prompt=NAG_NEGATIVE, **NAG)
    got = ours(offloading, latents, callback_on_step=record, **args)
    np.testing.assert_array_equal(got, ours(pipe, latents, **args))
    assert [(step, on_device) for step, on_device, _ in seen] == [(0, {0: True}), (1, {1: True}), (2, {1: True})]
    high_noise_arrays = seen[0][2][0]
    assert all(isinstance(leaf, jax.Array) and leaf.is_deleted() for leaf in high_noise_arrays)
    assert offloading.sampler._placement == {}  # after the call neither expert stays on the devices


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("wan22_i2v")
    reference = build_tiny_wan_pipeline(folder, image_to_video=True, boundary_ratio=0.9)
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    latents = rng.standard_normal((1, 4, 2, 4, 4)).astype(np.float32)
    return reference, NAGPipeline.from_pretrained(folder), latents, image


def test_i2v_has_no_image_encoder_and_matches_diffusers(i2v):
    """Wan2.2 I2V: model_index.json lists image_encoder as [null, null]; the first frame conditions
    through the VAE latents and mask channels only. CFG with guidance_scale_2, and NAG on top
    (latents; decoding is the T2V test's)."""
    reference, pipe, latents, image = i2v
    index = json.loads((pipe.family.path / "model_index.json").read_text())
    assert index["image_encoder"] == [None, None] and pipe.family.image_to_video
    want = reference_latents(reference, latents, 5.0, image=image, guidance_scale_2=3.0)
    plain = ours(pipe, latents, image=image, guidance_scale=5.0, guidance_scale_2=3.0)
    assert relative(plain, want) <= TOL
    other = ours(pipe, latents, image=np.zeros((32, 32, 3)), guidance_scale=5.0, guidance_scale_2=3.0)
    assert relative(other, want) > 1e-2  # the image conditions the video

    nag_want = reference_latents(reference, latents, 5.0, 1.0, image=image, guidance_scale_2=3.0)
    nag_got = ours(pipe, latents, image=image, guidance_scale=5.0, guidance_scale_2=3.0,
                   nag_negative_prompt=NAG_NEGATIVE, **NAG)
    assert relative(nag_got, nag_want) <= TOL
    assert relative(plain, nag_want) > 50 * TOL


def test_a_missing_expert_is_named_when_its_steps_come(t2v, tmp_path):
    """diffusers lets either transformer be absent ([null, null]); a step that needs it is an error."""
    _, pipe, latents = t2v
    folder = tmp_path / "no_low_noise"
    shutil.copytree(pipe.family.path, folder, ignore=shutil.ignore_patterns("transformer_2"))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(dict(index, transformer_2=[None, None])))
    high_only = NAGPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="transformer_2"):
        ours(high_only, latents)


def test_bad_arguments(t2v):
    _, pipe, latents = t2v
    with pytest.raises(ValueError, match="guidance_scale_2"):
        ours(pipe, latents, guidance_scale_2=-1.0)
    one_expert = copy.copy(pipe.family)
    one_expert.boundary_ratio = None
    with pytest.raises(ValueError, match="guidance_scale_2"):
        ours(NAGPipeline(one_expert), latents, guidance_scale_2=2.0)
    with pytest.raises(ValueError, match="offload_inactive_expert"):
        NAGPipeline(one_expert, offload_inactive_expert=True)


def test_cli_flags_reach_the_pipeline():
    import argparse

    from nag_jax.cli import add_generate_arguments, resolve_settings
    from nag_jax.families.wan import WAN_DEFAULTS

    parser = argparse.ArgumentParser()
    add_generate_arguments(parser)
    args = parser.parse_args(["--prompt", "a cat", "--guidance-scale-2", "3", "--offload-inactive-expert"])
    assert resolve_settings(args, WAN_DEFAULTS)["guidance_scale_2"] == 3.0 and args.offload_inactive_expert
    assert "guidance_scale_2" not in resolve_settings(parser.parse_args(["--prompt", "a cat"]), WAN_DEFAULTS)
    with pytest.raises(SystemExit):
        parser.parse_args(["--prompt", "a cat", "--guidance-scale-2", "-1"])
