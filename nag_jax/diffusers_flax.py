"""NAG for diffusers' own Flax Stable Diffusion pipelines (extra `diffusers-flax`).

diffusers 0.39 is the last release with the Flax pipelines, and it needs transformers < 5;
install with `pip install "nag-jax[diffusers-flax]"` (docs/diffusers-flax.md). Nothing of
diffusers is edited or copied: NAG reaches its models the way it reaches nag-jax's own, through
the interceptor of `nag_jax/intercept.py`.

- `FlaxAttention` (both attentions of every `FlaxBasicTransformerBlock`) gets a NAG transform.
  It acts only on cross-attention calls whose context has more rows than the image stream: the
  extra rows are negative contexts for the last image rows (nag-jax's batch convention). q/k/v
  and the output projection are the module's own submodules; the attention itself is
  `nag_jax.attention.attention`. Self-attention and ordinary cross-attention run unchanged.
- `NAGFlaxStableDiffusionPipeline` / `NAGFlaxStableDiffusionXLPipeline` are diffusers' Flax
  pipelines with the NAG arguments added. With NAG on, the call runs diffusers' own
  `_generate` (and so its `jit=True` pmap path) while an interceptor on the UNet appends the
  NAG negative context rows to `encoder_hidden_states`: [uncond; cond; nag_negative].

How the NAG inputs reach the pmapped `_generate`, whose signature is diffusers': they travel
in `params["nag"]` (token ids sharded like `prompt_ids`, scalars per device). Whether NAG is on
and whether `nag_end` < 1 are decided by the presence of those entries, so they are static
(part of the pytree structure), never traced branches.

`nag_end`: diffusers' loop is one `lax.fori_loop`, so the step range cannot be split statically
from outside. Each UNet call is instead a `lax.cond` on its timestep (NAG while
t >= floor((1 - nag_end) * 999)): only the taken branch runs at each step, both are compiled.
diffusers' Flax pipelines always run the CFG batch [uncond; cond]; with guidance_scale = 1 the
uncond rows are still computed and cancel (diffusers' behaviour), so "NAG alone" costs that too.
"""

from __future__ import annotations

import contextlib
import inspect
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from diffusers import FlaxStableDiffusionPipeline, FlaxStableDiffusionXLPipeline, FlaxUNet2DConditionModel
from diffusers.models.attention_flax import FlaxAttention

from nag_jax.attention import attention, merge_heads
from nag_jax.guidance import nag_end_cut
from nag_jax.intercept import NAGConfig, apply_to_last_rows, guided, register_nag
from nag_jax.pipeline import check_range
from nag_jax.families.unet import SD_DEFAULTS, SDXL_DEFAULTS


def _heads_merged_attention(module: FlaxAttention, hidden_states, context):
    """softmax(q k^T / sqrt(d)) v with the module's projections, heads merged, before proj_attn."""

    def split_heads(x):
        return x.reshape(*x.shape[:-1], module.heads, module.dim_head)

    q = split_heads(module.query(hidden_states))
    k, v = split_heads(module.key(context)), split_heads(module.value(context))
    return merge_heads(attention(q, k, v, scale=module.dim_head**-0.5))


@register_nag(FlaxAttention)
def _flax_attention_nag(config, module, plain, hidden_states, context=None, deterministic=True):
    rows = hidden_states.shape[0]
    extra = 0 if context is None else context.shape[0] - rows
    if extra <= 0:  # self-attention, or cross-attention without negative rows
        return plain(hidden_states, context, deterministic=deterministic)
    if not config.enabled:
        return plain(hidden_states, context[:rows], deterministic=deterministic)
    z_pos = _heads_merged_attention(module, hidden_states, context[:rows])
    z_neg = _heads_merged_attention(module, hidden_states[rows - extra :], context[rows:])
    out = module.proj_attn(apply_to_last_rows(config, z_pos, z_neg))
    return module.dropout_layer(out, deterministic=deterministic)


_UNET_CALL = inspect.signature(FlaxUNet2DConditionModel.__call__)


@contextlib.contextmanager
def unet_with_negative_context(negative_context, config: NAGConfig, cut=None):
    """Within this context, every FlaxUNet2DConditionModel call gets `negative_context` appended
    to its encoder_hidden_states (rows for its last image rows) and runs under `guided(config)`;
    with `cut` given, only at timesteps t >= cut (a `lax.cond`), the plain call otherwise."""

    def interceptor(next_fun, args, kwargs, context):
        if not isinstance(context.module, FlaxUNet2DConditionModel) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        call = _UNET_CALL.bind(context.module, *args, **kwargs).arguments
        call.pop("self")

        def with_nag():
            extended = jnp.concatenate([call["encoder_hidden_states"], negative_context.astype(
                call["encoder_hidden_states"].dtype)], axis=0)
            with guided(config):
                return next_fun(**dict(call, encoder_hidden_states=extended))

        if cut is None:
            return with_nag()
        timestep = jnp.ravel(jnp.asarray(call["timesteps"]))[0]
        return jax.lax.cond(timestep >= cut, with_nag, lambda: next_fun(**call))

    with nn.intercept_methods(interceptor):
        yield


class _NAGFlaxPipelineMixin:
    """NAG arguments on top of a diffusers Flax pipeline; see the module docstring."""

    nag_defaults: dict
    prompt_row_ndim: int  # trailing axes of prompt_ids that make one prompt's ids

    def _negative_context(self, ids, params):
        raise NotImplementedError

    def _nag_ids(self, nag_negative_prompt, neg_prompt_ids, prompt_ids):
        """NAG negative token ids shaped like prompt_ids (default: neg_prompt_ids, else "")."""
        if nag_negative_prompt is None and neg_prompt_ids is not None:
            return neg_prompt_ids
        if nag_negative_prompt is None or isinstance(nag_negative_prompt, (str, list, tuple)):
            prompts = [""] if nag_negative_prompt is None else nag_negative_prompt
            ids = np.asarray(self.prepare_inputs(list(prompts) if isinstance(prompts, tuple) else prompts))
            per_prompt = prompt_ids.shape[-self.prompt_row_ndim :]
            count = math.prod(prompt_ids.shape[: -self.prompt_row_ndim])
            if ids.shape[0] not in (1, count):
                raise ValueError(f"nag_negative_prompt has {ids.shape[0]} entries for {count} prompts; "
                                 "give one, or one per prompt")
            return jnp.asarray(np.broadcast_to(ids, (count, *per_prompt)).reshape(prompt_ids.shape))
        ids = jnp.asarray(nag_negative_prompt)
        if ids.shape != prompt_ids.shape:
            raise ValueError(f"nag_negative_prompt as token ids must have prompt_ids' shape {tuple(prompt_ids.shape)}, "
                             f"got {tuple(ids.shape)}")
        return ids

    def __call__(self, prompt_ids, params, prng_seed, *args, nag_negative_prompt=None, nag_scale: float = 1.0,
                 nag_tau: float | None = None, nag_alpha: float | None = None, nag_end: float = 1.0, **kwargs):
        """diffusers' call plus NAG. NAG is on for nag_scale > 1 (reference convention: paper
        phi + 1). nag_negative_prompt: a string, a list (one per prompt), or token ids shaped
        like prompt_ids (sharded with jit=True); default neg_prompt_ids when given, else "".
        nag_end in (0, 1]: NAG only while t >= floor((1 - nag_end) * 999)."""
        nag_scale = check_range("nag_scale", nag_scale, 0.0, math.inf)
        nag_tau = check_range("nag_tau", self.nag_defaults["nag_tau"] if nag_tau is None else nag_tau, 0.0,
                               math.inf, low_open=True)
        nag_alpha = check_range("nag_alpha", self.nag_defaults["nag_alpha"] if nag_alpha is None else nag_alpha,
                                 0.0, 1.0)
        nag_end = check_range("nag_end", nag_end, 0.0, 1.0, low_open=True)
        if nag_scale <= 1.0:  # NAG off: diffusers' call, untouched
            return super().__call__(prompt_ids, params, prng_seed, *args, **kwargs)
        call = inspect.signature(super().__call__).bind(prompt_ids, params, prng_seed, *args, **kwargs)
        call.apply_defaults()
        ids = self._nag_ids(nag_negative_prompt, call.arguments["neg_prompt_ids"], prompt_ids)
        # With jit=True every input carries a leading device axis, params included.
        per_device = (prompt_ids.shape[0],) if call.arguments["jit"] else ()
        scalars = {"scale": nag_scale, "tau": nag_tau, "alpha": nag_alpha}
        cut = nag_end_cut(nag_end, "discrete")
        if cut > 0:  # t >= 0 always: no cut needed at nag_end = 1
            scalars["cut"] = cut
        nag_inputs = {name: jnp.full(per_device, value, jnp.float32) for name, value in scalars.items()}
        call.arguments["params"] = {**params, "nag": dict(nag_inputs, negative_prompt_ids=ids)}
        return super().__call__(*call.args, **call.kwargs)

    def _generate(self, prompt_ids, params, *args, **kwargs):
        if "nag" not in params:
            return super()._generate(prompt_ids, params, *args, **kwargs)
        params = dict(params)
        nag = params.pop("nag")
        config = NAGConfig(nag_scale=nag["scale"], nag_tau=nag["tau"], nag_alpha=nag["alpha"])
        negative_context = self._negative_context(nag["negative_prompt_ids"], params)
        with unet_with_negative_context(negative_context, config, nag.get("cut")):
            return super()._generate(prompt_ids, params, *args, **kwargs)


class NAGFlaxStableDiffusionPipeline(_NAGFlaxPipelineMixin, FlaxStableDiffusionPipeline):
    """diffusers' FlaxStableDiffusionPipeline (SD1.x/2.x) with NAG; same loading and call."""

    nag_defaults = SD_DEFAULTS
    prompt_row_ndim = 1

    def _negative_context(self, ids, params):
        return self.text_encoder(ids, params=params["text_encoder"])[0]  # as diffusers encodes prompts


class NAGFlaxStableDiffusionXLPipeline(_NAGFlaxPipelineMixin, FlaxStableDiffusionXLPipeline):
    """diffusers' FlaxStableDiffusionXLPipeline with NAG; same loading and call."""

    nag_defaults = SDXL_DEFAULTS
    prompt_row_ndim = 2  # [tokenizer, tokens]

    def _negative_context(self, ids, params):
        return self.get_embeddings(ids, params)[0]  # both encoders' penultimate states, as diffusers
