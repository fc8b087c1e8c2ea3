"""The PyTorch NAG reference for diffusers' WanTransformer3DModel, written from nag-semantics.md.

`WanNAGProcessor` goes on every `attn2` (cross-attention; self-attention keeps diffusers' own
processor). When the text context has more rows than the video batch, the extra rows are the
negative prompts of the last video rows: the video queries attend to the positive and the
negative text, the two results are combined per token by NAG (L1, torch_nag), then (I2V) the
attention to the CLIP image tokens, computed once from the positive rows, is added, then the
output projection.

diffusers' model concatenates [image tokens; text tokens] per row before the blocks, so for
I2V the image rows are extended to the text rows (`with_nag_rows`); the processor reads the
image part of the first (video) rows only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torch_nag import torch_nag

TEXT_TOKENS = 512  # what diffusers' WanAttnProcessor assumes: the context's last 512 tokens are text


class WanNAGProcessor:
    def __init__(self, scale, tau, alpha):
        self.scale, self.tau, self.alpha = scale, tau, alpha

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        rows = hidden_states.shape[0]
        extra = encoder_hidden_states.shape[0] - rows
        image = None
        if attn.add_k_proj is not None:
            image_tokens = encoder_hidden_states.shape[1] - TEXT_TOKENS
            image = encoder_hidden_states[:rows, :image_tokens]
            encoder_hidden_states = encoder_hidden_states[:, image_tokens:]

        def attend(q, k, v):
            split = lambda x: x.unflatten(2, (attn.heads, -1)).transpose(1, 2)  # noqa: E731
            return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2)

        query = attn.norm_q(attn.to_q(hidden_states))
        key, value = attn.norm_k(attn.to_k(encoder_hidden_states)), attn.to_v(encoder_hidden_states)
        z = attend(query, key[:rows], value[:rows])
        if extra:
            z_neg = attend(query[rows - extra:], key[rows:], value[rows:])
            z = torch.cat([z[: rows - extra], torch_nag(z[rows - extra:], z_neg, self.scale, self.tau, self.alpha)])
        if image is not None:
            z = z + attend(query, attn.norm_added_k(attn.add_k_proj(image)), attn.add_v_proj(image))
        return attn.to_out[0](z)


def install_nag(transformer, scale, tau, alpha):
    for block in transformer.blocks:
        block.attn2.set_processor(WanNAGProcessor(scale, tau, alpha))


def nag_forward(transformer, hidden_states, timestep, text, image=None):
    """The transformer with text rows [video rows; extra negative rows] (extra rows belong to
    the last video rows); I2V image rows are extended the same way for diffusers' concatenation."""
    if image is not None:
        extra = text.shape[0] - image.shape[0]
        image = torch.cat([image, image[image.shape[0] - extra:]])
    return transformer(hidden_states, timestep, text, image, return_dict=False)[0]


def with_nag_rows(transformer, negative_embeds, cfg: bool, nag_end: float = 1.0):
    """Wrap a pipeline's transformer: the positive-prompt calls (the first of each step's one or
    two calls) get the negative rows appended while t >= (1 - nag_end) * 1000 (flow timesteps)."""
    forward, calls = transformer.forward, [0]
    cut = (1 - nag_end) * 1000

    def forward_with_negatives(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
                               **kwargs):
        positive_call = calls[0] % (2 if cfg else 1) == 0
        calls[0] += 1
        if positive_call and float(timestep.max()) >= cut:  # TI2V's per-token timesteps: the first frame's are 0
            text = torch.cat([encoder_hidden_states, negative_embeds.to(encoder_hidden_states.dtype)])
            image = encoder_hidden_states_image
            if image is not None:
                image = torch.cat([image, image[image.shape[0] - negative_embeds.shape[0]:]])
            return forward(hidden_states, timestep, text, image, **kwargs)
        return forward(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image, **kwargs)

    transformer.forward = forward_with_negatives
