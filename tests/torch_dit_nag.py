"""The PyTorch NAG reference for the cross-attention DiTs (PixArt-Sigma, SANA), from nag-semantics.md.

Their transformers reshape the projected caption to the image batch, so the negative rows
cannot ride along in `encoder_hidden_states`; instead `with_nag_negatives` wraps the model's
forward: while the `nag_end` rule keeps NAG on, it projects the negative embeddings with the
model's own caption projection (and norm) and hands them, with their own mask, to the
`NAGMaskedCrossAttentionProcessor` on every `attn2`. There the last image rows attend to the
negative rows (their mask as bias) and get NAG on the merged-head output, before `to_out`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from torch_nag import torch_nag


class NAGMaskedCrossAttentionProcessor:
    def __init__(self, negatives: dict, scale, tau, alpha):
        self.negatives, self.scale, self.tau, self.alpha = negatives, scale, tau, alpha

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        rows = hidden_states.shape[0]
        query = attn.to_q(hidden_states)

        def attend(query, context, bias):
            key, value = attn.to_k(context), attn.to_v(context)
            if attn.norm_q is not None:  # SANA-Sprint's QK norm, across heads
                query, key = attn.norm_q(query), attn.norm_k(key)
            split = lambda x: x.view(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)  # noqa
            mask = None if bias is None else bias[:, None]
            out = F.scaled_dot_product_attention(split(query), split(key), split(value), attn_mask=mask)
            return out.transpose(1, 2).reshape(query.shape[0], -1, query.shape[-1])

        z = attend(query, encoder_hidden_states, attention_mask)
        if self.negatives.get("context") is not None:
            context, bias = self.negatives["context"], self.negatives["bias"]
            n = context.shape[0]
            z_neg = attend(query[rows - n :], context, bias)
            z = torch.cat([z[: rows - n], torch_nag(z[rows - n :], z_neg, self.scale, self.tau, self.alpha)])
        return attn.to_out[1](attn.to_out[0](z))


def with_nag_negatives(transformer, project, negative_embeds, negative_mask, scale, tau, alpha, cut):
    """NAG processors on every attn2 of `transformer`; the negative rows (`project(embeds)`, mask
    bias (1 - mask) * -10000 as diffusers builds it) are active while timestep >= `cut`."""
    negatives = {}
    transformer.set_attn_processor({
        name: NAGMaskedCrossAttentionProcessor(negatives, scale, tau, alpha) if ".attn2." in name else processor
        for name, processor in transformer.attn_processors.items()
    })
    forward = transformer.forward

    def forward_with_negatives(hidden_states, *args, timestep=None, **kwargs):
        active = float(timestep.flatten()[0]) >= cut
        negatives["context"] = project(negative_embeds) if active else None
        negatives["bias"] = ((1 - negative_mask.float()) * -10000.0)[:, None]
        return forward(hidden_states, *args, timestep=timestep, **kwargs)

    transformer.forward = forward_with_negatives


def discrete_cut(nag_end: float) -> float:
    """The reference nag_end rule on 0..999 timesteps: NAG while t >= floor((1 - nag_end) * 999)."""
    return math.floor((1 - nag_end) * 999)
