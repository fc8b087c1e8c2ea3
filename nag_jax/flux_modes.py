"""NAG's two modes for Flux (`NAGConfig.nag_mode`), reached through the interceptor only.

Inside `guided(...)` the text stream carries the negative prompts as extra rows; the model
conditions each text row on its own pooled embedding, and modulates the image stream with the
first (positive) rows.

- "shared-image" (fast; the Flux pipeline defaults to "reference", see families/flux.py): nothing Flux-specific. Every joint attention, double- and
  single-stream, goes through the `JointAttentionCore` transform of `nag_jax/intercept.py`:
  one image stream, the negative text rows evolve through all blocks, image rows get NAG.
- "reference": what the PyTorch reference computes. The double-stream blocks are as above.
  In the single-stream blocks the reference runs a second copy of each guided image row,
  `[text_neg; image']`, modulated by the negative conditioning row; after every attention
  both copies' image rows are overwritten with the NAG-combined rows, while each copy's MLP
  path and gate keep their own modulation, so `image'` drifts from `image`. Only the first
  copy reaches the output. It differs from "shared-image" only when the pooled embeddings
  differ.

Design of "reference": a transform on `FluxSingleStreamBlocks` (the module holding the whole
single-stream stack) appends the image copies as extra image rows, so text row j and image
row j are one copy each and the model's own rule "image modulation uses the first rows of
temb" gives every copy its conditioning. While that stack runs, a nested interceptor
post-processes each `JointAttentionCore` call: the outer NAG transform sees equal batches and
runs plain joint attention, then the nested one writes NAG(first copy, second copy) into both
copies' image rows (the blocks run under scan: both interceptors act on its one traced body,
so on every layer). The stack's result keeps the first copies. The model knows nothing of it.

Importing this module registers the transform; `guided` imports it for nag_mode="reference".
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from models.flux import FluxSingleStreamBlocks
from models.layers import JointAttentionCore
from nag_jax.intercept import register_nag


@register_nag(FluxSingleStreamBlocks)
def _single_stream_reference_nag(config, module, plain, txt, img, temb, txt_rope, img_rope, txt_mask=None):
    rows = img.shape[0]
    extra = txt.shape[0] - rows
    if config.nag_mode == "shared-image" or extra == 0 or not config.enabled:
        return plain(txt, img, temb, txt_rope, img_rope, txt_mask)
    guided_rows = slice(rows - extra, rows)  # image rows that have a negative prompt

    def combine_image_copies(next_fun, args, kwargs, context):
        if type(context.module) is not JointAttentionCore or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        txt_out, img_out = next_fun(*args, **kwargs)
        combined = config.combine(img_out[guided_rows], img_out[rows:])
        return txt_out, jnp.concatenate([img_out[: rows - extra], combined, combined], axis=0)

    with nn.intercept_methods(combine_image_copies):
        txt_out, img_out = plain(txt, jnp.concatenate([img, img[guided_rows]], axis=0), temb, txt_rope, img_rope,
                                 txt_mask)
    return txt_out, img_out[:rows]
