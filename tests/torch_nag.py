"""The PyTorch NAG reference for diffusers UNets, written from nag-semantics.md.

`NAGCrossAttentionProcessor` goes on every `attn2` (cross-attention): when the context has
more rows than the image batch, the extra rows are the negative prompts of the last image
rows; those rows get NAG on the merged-head attention output, before `to_out`.
`with_nag_context` wraps a pipeline's UNet so that, while the reference `nag_end` rule keeps
NAG on, the negative embeddings are appended to the context (the reference layout:
[uncond; cond; nag_negative] with CFG, [cond; nag_negative] without).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0


def torch_nag(z_pos, z_neg, scale, tau, alpha, norm="l1"):
    """norm "l1" (paper; the reference's SDXL/SD3/Wan processors) or "l2" (its Flux processors'
    torch.norm(p=2, dim=-1))."""
    guided = z_pos * scale - z_neg * (scale - 1)
    p = {"l1": 1, "l2": 2}[norm]
    ratio = torch.norm(guided, p=p, dim=-1, keepdim=True) / torch.norm(z_pos, p=p, dim=-1, keepdim=True)
    guided = guided * torch.minimum(ratio, ratio.new_full((1,), tau)) / ratio
    return guided * alpha + z_pos * (1 - alpha)


class NAGCrossAttentionProcessor:
    def __init__(self, scale, tau, alpha):
        self.scale, self.tau, self.alpha = scale, tau, alpha

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        rows = hidden_states.shape[0]
        extra = encoder_hidden_states.shape[0] - rows
        query = attn.to_q(hidden_states)

        def attend(query, context):
            key, value = attn.to_k(context), attn.to_v(context)
            split = lambda x: x.view(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)  # noqa: E731
            out = F.scaled_dot_product_attention(split(query), split(key), split(value))
            return out.transpose(1, 2).reshape(query.shape[0], -1, query.shape[-1])

        z = attend(query, encoder_hidden_states[:rows])
        if extra:
            z_neg = attend(query[rows - extra :], encoder_hidden_states[rows:])
            z = torch.cat([z[: rows - extra], torch_nag(z[rows - extra :], z_neg, self.scale, self.tau, self.alpha)])
        return attn.to_out[1](attn.to_out[0](z))


def install_nag(unet, scale, tau, alpha):
    """NAG processors on attn2 only; self-attention keeps diffusers' own processor."""
    unet.set_attn_processor({
        name: NAGCrossAttentionProcessor(scale, tau, alpha) if ".attn2." in name else AttnProcessor2_0()
        for name in unet.attn_processors
    })


def with_nag_context(unet, negative_embeds, nag_end=1.0):
    """Append `negative_embeds` to the UNet's context while t >= floor((1 - nag_end) * 999)."""
    forward = unet.forward
    cut = math.floor((1 - nag_end) * 999)

    def forward_with_negatives(sample, timestep, encoder_hidden_states, *args, **kwargs):
        if float(timestep) >= cut:
            encoder_hidden_states = torch.cat([encoder_hidden_states, negative_embeds])
        return forward(sample, timestep, encoder_hidden_states, *args, **kwargs)

    unet.forward = forward_with_negatives
