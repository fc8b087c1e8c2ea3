"""The one injection point: NAG reaches a model only through its attention cores.

`guided(config)` installs a `flax.linen.intercept_methods` interceptor. A registry maps an
attention module type (and method) to its NAG transform; every other method call passes
through untouched, and nothing changes outside the context. Works under `jax.jit` and inside
`lax.scan` bodies because interception happens while tracing.

A transform is `fn(config, module, plain, *args, **kwargs)`: `plain` is the module's own
method, `module` the bound module (so a transform for a foreign module can call its
submodules).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.layers import CrossAttentionCore, JointAttentionCore
from nag_jax.attention import attention, attention_partial, merge_heads, merge_partials
from nag_jax.guidance import nag

_TRANSFORMS: dict[tuple[type, str], Callable] = {}
NAG_MODES = ("shared-image", "reference")


@dataclasses.dataclass(frozen=True)
class NAGConfig:
    """NAG parameters in the reference's convention (nag_scale = paper phi + 1).

    Values may be Python floats or traced scalars. NAG is on only for nag_scale > 1; with a
    concrete nag_scale <= 1 every transform runs the plain attention on the positive rows.
    """

    nag_scale: Any = 1.0
    nag_tau: Any = 2.5
    nag_alpha: Any = 0.5
    # "reference" (Flux) reproduces the reference's two image copies in the single-stream
    # blocks; "shared-image" keeps one image stream (nag-semantics.md section 2).
    nag_mode: str = "shared-image"

    @property
    def enabled(self) -> bool:
        try:
            return float(self.nag_scale) > 1.0
        except (TypeError, jax.errors.ConcretizationTypeError):
            return True  # traced: the caller decided statically that NAG is on

    def __post_init__(self):
        if self.nag_mode not in NAG_MODES:
            raise ValueError(f"nag_mode must be one of {', '.join(NAG_MODES)}, got {self.nag_mode!r}")

    def combine(self, z_pos, z_neg):
        return nag(z_pos, z_neg, self.nag_scale, self.nag_tau, self.nag_alpha)


def register_nag(module_type: type, method: str = "__call__"):
    """Register `fn` as the NAG transform of `module_type.method`."""

    def register(fn):
        _TRANSFORMS[(module_type, method)] = fn
        return fn

    return register


def has_nag_transform(module_type: type, method: str = "__call__") -> bool:
    return (module_type, method) in _TRANSFORMS


@contextlib.contextmanager
def guided(config: NAGConfig):
    """Within this context, registered attention modules compute NAG."""
    if config.nag_mode == "reference":  # its transform lives beside the Flux model it serves
        importlib.import_module("nag_jax.flux_modes")

    def interceptor(next_fun, args, kwargs, context):
        transform = _TRANSFORMS.get((type(context.module), context.method_name))
        if transform is None:
            return next_fun(*args, **kwargs)
        return transform(config, context.module, next_fun, *args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


def apply_to_last_rows(config: NAGConfig, z_pos, z_neg):
    """NAG on the last z_neg.shape[0] rows of z_pos; earlier rows (CFG uncond) untouched."""
    n = z_neg.shape[0]
    guided_rows = config.combine(z_pos[z_pos.shape[0] - n :], z_neg)
    return jnp.concatenate([z_pos[: z_pos.shape[0] - n], guided_rows], axis=0)


@register_nag(CrossAttentionCore)
def _cross_attention_nag(config, module, plain, q, k, v):
    rows = q.shape[0]
    extra = k.shape[0] - rows
    z_pos = plain(q, k[:rows], v[:rows])
    if extra == 0 or not config.enabled:
        return z_pos
    z_neg = merge_heads(attention(q[rows - extra :], k[rows:], v[rows:]))
    return apply_to_last_rows(config, z_pos, z_neg)


@register_nag(JointAttentionCore)
def _joint_attention_nag(config, module, plain, txt_q, txt_k, txt_v, img_q, img_k, img_v):
    """Every text row attends over [its text; its image]; image rows get NAG.

    Image keys are shared by the positive and negative branches, so image-query scores
    against them are computed once and merged with each branch's text-key scores.
    """
    rows = img_q.shape[0]
    extra = txt_q.shape[0] - rows
    if extra == 0:
        return plain(txt_q, txt_k, txt_v, img_q, img_k, img_v)
    image_of_text_row = np.concatenate([np.arange(rows), np.arange(rows - extra, rows)])
    txt_out = merge_partials(
        [
            attention_partial(txt_q, txt_k, txt_v),
            attention_partial(txt_q, img_k[image_of_text_row], img_v[image_of_text_row]),
        ],
        dtype=txt_q.dtype,
    )
    img_over_img = attention_partial(img_q, img_k, img_v)
    z_pos = merge_partials([img_over_img, attention_partial(img_q, txt_k[:rows], txt_v[:rows])], img_q.dtype)
    if not config.enabled:  # negative text rows still flow, so the text stream keeps its shape
        return merge_heads(txt_out), merge_heads(z_pos)
    negative_rows = slice(rows - extra, rows)
    z_neg = merge_partials(
        [img_over_img.rows(negative_rows), attention_partial(img_q[negative_rows], txt_k[rows:], txt_v[rows:])],
        img_q.dtype,
    )
    return merge_heads(txt_out), apply_to_last_rows(config, merge_heads(z_pos), merge_heads(z_neg))
