"""The one injection point: NAG reaches a model only through its attention cores.

`guided(config)` installs a `flax.linen.intercept_methods` interceptor. A registry maps an
attention module type (and method) to its NAG transform; every other method call passes
through untouched, and nothing changes outside the context. Works under `jax.jit` and inside
`lax.scan` bodies because interception happens while tracing.

A transform is `fn(config, module, plain, *args, **kwargs)`: `plain` is the module's own
method, `module` the bound module (so a transform for a foreign module can call its
submodules, and PAG can select layers by `layer_paths(module)`). Blocks run under scan
(`models.layers.ScannedBlock`) trace one body for all their layers: while it is traced, the
interceptor notes the traced layer index, so a transform inside knows which layers it stands
for and PAG selects its layers with a traced flag. A transform says which guidance it
implements by how it is registered: `register_nag` (negative context rows), `register_pag`
(perturbed-attention guidance: the identity attention map on the perturbed image rows).
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

from models.layers import (CrossAttentionCore, JointAttentionCore, ScannedBlock, SelfAttentionCore,
                           TextImageCrossAttentionCore, key_mask_bias)
from nag_jax.attention import attention, attention_partial, identity_partial, merge_heads, merge_partials
from nag_jax.guidance import check_nag_norm, nag

# (module type, method) -> (transform, the guidance it implements: "nag", "pag")
_TRANSFORMS: dict[tuple[type, str], tuple[Callable, frozenset]] = {}
NAG_MODES = ("shared-image", "reference")
# (module path, block, traced layer index) of each scanned block whose body is being traced, innermost last
_SCANNED_BODIES: list[tuple[tuple[str, ...], ScannedBlock, Any]] = []


def track_layers(interceptor):
    """`interceptor` wrapped to note each scanned block body's layer index while it is traced
    (what `layer_paths` reads); every interceptor that names layers must be wrapped."""

    def tracking(next_fun, args, kwargs, context):
        module = context.module
        if not (isinstance(module, ScannedBlock) and module.layers and context.method_name == "__call__"):
            return interceptor(next_fun, args, kwargs, context)
        _SCANNED_BODIES.append((module.path, module, args[1]))
        try:
            return interceptor(next_fun, args, kwargs, context)
        finally:
            _SCANNED_BODIES.pop()

    return tracking


def _scanned_body(module):
    """(path, block, traced layer index) of the innermost scanned block body holding `module`, or None."""
    path = tuple(module.path)
    return next((body for body in reversed(_SCANNED_BODIES) if path[: len(body[0])] == body[0]), None)


def layer_paths(module) -> dict[str, Any]:
    """The module path ("/"-joined, as in an unrolled model) of each layer this call of `module`
    stands for -> its global layer index: one path and None outside scanned blocks; inside one,
    a path per layer of the stack (`models.layers.ScannedBlock`)."""
    body = _scanned_body(module)
    if body is None:
        return {"/".join(module.path): None}
    block_path, block, _ = body
    parent, rest = block_path[:-1], tuple(module.path)[len(block_path) :]
    return {"/".join((*parent, f"{block.layer_name}_{index}", *rest)): index for index in block.layers}


@dataclasses.dataclass(frozen=True)
class PAGConfig:
    """Perturbed-attention guidance, decided before tracing: the attention cores that get the
    identity map (module paths of the unrolled model, `layer_paths`) and how many equal row
    groups the image batch has; the first group holds the perturbed rows (the sampler's layout)."""

    layers: frozenset = frozenset()
    row_groups: int = 1

    def perturbed_rows(self, module, rows: int) -> tuple[int, Any]:
        """(how many leading image rows of this call PAG perturbs, whether it does in this layer):
        (0, False) where no layer of the call is a PAG layer; else one row group and True, or,
        when the call stands for several scanned layers, a traced bool of the layer index."""
        paths = layer_paths(module)
        chosen = [index for path, index in paths.items() if path in self.layers]
        if not chosen:
            return 0, False
        if len(chosen) == len(paths):
            return rows // self.row_groups, True
        return rows // self.row_groups, jnp.any(_scanned_body(module)[2] == jnp.asarray(chosen))


def _in_pag_layer(applies, perturbed, plain):
    """`perturbed` in a PAG layer, else `plain()` (called only when the layer is decided while
    running: a traced flag inside scanned blocks); both are pytrees of equal shapes."""
    if applies is True:
        return perturbed
    return jax.tree.map(lambda a, b: jnp.where(applies, a, b), perturbed, plain())


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
    nag_norm: str = "l1"  # the norm of NAG's ratio: "l1" (paper) or "l2" (the reference's Flux processors)
    pag: PAGConfig = PAGConfig()  # no layers: PAG off

    @property
    def enabled(self) -> bool:
        try:
            return float(self.nag_scale) > 1.0
        except (TypeError, jax.errors.ConcretizationTypeError):
            return True  # traced: the caller decided statically that NAG is on

    def __post_init__(self):
        if self.nag_mode not in NAG_MODES:
            raise ValueError(f"nag_mode must be one of {', '.join(NAG_MODES)}, got {self.nag_mode!r}")
        check_nag_norm(self.nag_norm)

    def combine(self, z_pos, z_neg):
        return nag(z_pos, z_neg, self.nag_scale, self.nag_tau, self.nag_alpha, self.nag_norm)


def _register(guidance: str, module_type: type, method: str):
    def register(fn):
        _, implemented = _TRANSFORMS.get((module_type, method), (None, frozenset()))
        _TRANSFORMS[(module_type, method)] = (fn, implemented | {guidance})
        return fn

    return register


def register_nag(module_type: type, method: str = "__call__"):
    """Register `fn` as the NAG transform of `module_type.method`."""
    return _register("nag", module_type, method)


def register_pag(module_type: type, method: str = "__call__"):
    """Register `fn` as the PAG transform of `module_type.method` (also NAG's when registered
    with both: one transform per method)."""
    return _register("pag", module_type, method)


def guidance_of(module_type: type, method: str = "__call__") -> frozenset:
    """The guidance ("nag", "pag") the transform of `module_type.method` implements; empty if none."""
    return _TRANSFORMS.get((module_type, method), (None, frozenset()))[1]


@contextlib.contextmanager
def guided(config: NAGConfig):
    """Within this context, registered attention modules compute NAG (and PAG in `config.pag`'s layers)."""
    if config.nag_mode == "reference":  # its transform lives beside the Flux model it serves
        importlib.import_module("nag_jax.flux_modes")

    def interceptor(next_fun, args, kwargs, context):
        transform, _ = _TRANSFORMS.get((type(context.module), context.method_name), (None, None))
        if transform is None:
            return next_fun(*args, **kwargs)
        return transform(config, context.module, next_fun, *args, **kwargs)

    with nn.intercept_methods(track_layers(interceptor)):
        yield


def apply_to_last_rows(config: NAGConfig, z_pos, z_neg):
    """NAG on the last z_neg.shape[0] rows of z_pos; earlier rows (CFG uncond) untouched."""
    n = z_neg.shape[0]
    guided_rows = config.combine(z_pos[z_pos.shape[0] - n :], z_neg)
    return jnp.concatenate([z_pos[: z_pos.shape[0] - n], guided_rows], axis=0)


@register_nag(CrossAttentionCore)
def _cross_attention_nag(config, module, plain, q, k, v, bias=None):
    """Each context row keeps its own mask row (`bias`), the negative rows included."""
    rows = q.shape[0]
    extra = k.shape[0] - rows
    rows_of = lambda start, stop: None if bias is None else bias[start:stop]  # noqa: E731
    z_pos = plain(q, k[:rows], v[:rows], rows_of(0, rows))
    if extra == 0 or not config.enabled:
        return z_pos
    z_neg = merge_heads(attention(q[rows - extra :], k[rows:], v[rows:], rows_of(rows, None)))
    return apply_to_last_rows(config, z_pos, z_neg)


@register_nag(TextImageCrossAttentionCore)
def _text_image_cross_attention_nag(config, module, plain, q, k, v, image_k, image_v):
    """Wan I2V: NAG on the text part only; the image-token attention (positive rows, one per
    query row) is added after the combination (nag-semantics.md section 2)."""
    text = _cross_attention_nag(config, module, lambda *qkv: merge_heads(attention(*qkv)), q, k, v)
    return text + merge_heads(attention(q, image_k, image_v))


@register_pag(SelfAttentionCore)
def _self_attention_pag(config, module, plain, q, k, v, bias=None):
    """PAG's identity attention map: a perturbed row's output is its values (each token attends
    only to itself), as diffusers' PAG identity processors compute it."""
    perturbed, applies = config.pag.perturbed_rows(module, q.shape[0])
    if not perturbed:
        return plain(q, k, v, bias)
    first, rest = slice(None, perturbed), slice(perturbed, None)
    identity = _in_pag_layer(applies, merge_heads(v[first]), lambda: plain(q[first], k[first], v[first], bias))
    return jnp.concatenate([identity, plain(q[rest], k[rest], v[rest], bias)], axis=0)


def _image_over_image(q, k, v, perturbed: int, applies):
    """Image-query partials over the image keys; in a PAG layer (`applies`) the first
    `perturbed` rows see only their own key."""
    if not perturbed:
        return attention_partial(q, k, v)
    first, rest = slice(None, perturbed), slice(perturbed, None)
    identity = _in_pag_layer(applies, identity_partial(q[first], k[first], v[first]),
                             lambda: attention_partial(q[first], k[first], v[first]))
    parts = (identity, attention_partial(q[rest], k[rest], v[rest]))
    return jax.tree.map(lambda *rows: jnp.concatenate(rows, axis=0), *parts)


@register_pag(JointAttentionCore)
@register_nag(JointAttentionCore)
def _joint_attention(config, module, plain, txt_q, txt_k, txt_v, img_q, img_k, img_v, txt_mask=None):
    """Every text row attends over [its text; its image]; image rows get NAG.

    Image keys are shared by the positive and negative branches, so image-query scores
    against them are computed once and merged with each branch's text-key scores. In a PAG
    layer the perturbed rows' image queries see their own image token and all their text
    tokens (diffusers' PAG joint processors); their text queries attend as usual. A text mask
    (Chroma) has a row per text row: each branch's text keys are masked by their own row.
    """
    rows = img_q.shape[0]
    extra = txt_q.shape[0] - rows
    perturbed, applies = config.pag.perturbed_rows(module, rows)
    if extra == 0 and not perturbed:
        return plain(txt_q, txt_k, txt_v, img_q, img_k, img_v, txt_mask=txt_mask)
    text_bias = (lambda r: None) if txt_mask is None else (lambda r: key_mask_bias(txt_mask[r]))  # noqa: E731
    image_of_text_row = np.concatenate([np.arange(rows), np.arange(rows - extra, rows)])
    txt_out = merge_partials(
        [
            attention_partial(txt_q, txt_k, txt_v, text_bias(slice(None))),
            attention_partial(txt_q, img_k[image_of_text_row], img_v[image_of_text_row]),
        ],
        dtype=txt_q.dtype,
    )
    img_over_img = _image_over_image(img_q, img_k, img_v, perturbed, applies)
    z_pos = merge_partials([img_over_img, attention_partial(img_q, txt_k[:rows], txt_v[:rows], text_bias(slice(rows)))],
                           img_q.dtype)
    if extra == 0 or not config.enabled:  # negative text rows still flow, so the text stream keeps its shape
        return merge_heads(txt_out), merge_heads(z_pos)
    negative_rows = slice(rows - extra, rows)
    z_neg = merge_partials(
        [img_over_img.rows(negative_rows), attention_partial(img_q[negative_rows], txt_k[rows:], txt_v[rows:],
                                                                      text_bias(slice(rows, None)))],
        img_q.dtype,
    )
    return merge_heads(txt_out), apply_to_last_rows(config, merge_heads(z_pos), merge_heads(z_neg))
