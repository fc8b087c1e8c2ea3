"""The PyTorch NAG reference for diffusers' SD3Transformer2DModel, written from nag-semantics.md.

The text stream carries [pos; neg] rows through every block and the pooled embedding is
batched the same way, so temb has a row per text row; the image stream (and the final norm)
is modulated by the positive rows. After every joint attention the image rows of guided
samples get the NAG combination of z_pos (image queries over [image; text_pos]) and z_neg
(over [image; text_neg]), before the output projection. The MMDiT-X image self-attention
(attn2) is left alone. Extra text rows belong to the last image rows, in order. With
`perturbed_rows`, the first image rows get PAG's identity map in the image-over-image block
(the mask of diffusers' PAG joint processors): image token i sees image token i and the text.

`install_nag` patches a transformer in place; `with_nag_text` wraps its forward so that,
while the flow-matching `nag_end` rule keeps NAG on, the negative rows are appended (the
reference pipeline layout: [uncond; cond; nag_negative] with CFG, [cond; nag_negative] without).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from torch_nag import torch_nag


def image_rows_of_text(rows: int, text_rows: int) -> np.ndarray:
    """The image row each text row belongs to: its own, then the last rows for the extras."""
    extra = text_rows - rows
    return np.concatenate([np.arange(rows), np.arange(rows - extra, rows)])


class NAGJointAttnProcessor:
    """Joint attention where text row j attends with the image row it belongs to and the image
    rows of guided samples get NAG."""

    def __init__(self, scale, tau, alpha, perturbed_rows=0):
        self.args = (scale, tau, alpha)
        self.perturbed_rows = perturbed_rows

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        rows, extra = hidden_states.shape[0], encoder_hidden_states.shape[0] - hidden_states.shape[0]
        image_of_text_row = image_rows_of_text(rows, encoder_hidden_states.shape[0])

        def heads(x):
            return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

        q, k, v = (heads(proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        txt_q, txt_k, txt_v = (heads(p(encoder_hidden_states)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
            txt_q, txt_k = attn.norm_added_q(txt_q), attn.norm_added_k(txt_k)
        joint = [torch.cat([image[image_of_text_row], text], dim=2) for image, text in ((q, txt_q), (k, txt_k), (v, txt_v))]
        image_tokens = hidden_states.shape[1]
        mask = None
        if self.perturbed_rows:
            mask = torch.zeros(len(image_of_text_row), 1, joint[0].shape[2], joint[0].shape[2])
            identity = torch.full((image_tokens, image_tokens), float("-inf")).fill_diagonal_(0)
            mask[: self.perturbed_rows, :, :image_tokens, :image_tokens] = identity
        out = F.scaled_dot_product_attention(*joint, attn_mask=mask).transpose(1, 2).flatten(2)
        img_out, txt_out = out[:rows, :image_tokens], out[:, image_tokens:]
        if extra:
            z_neg = out[rows:, :image_tokens]
            img_out = torch.cat([img_out[: rows - extra], torch_nag(img_out[rows - extra :], z_neg, *self.args)])
        img_out = attn.to_out[0](img_out)
        return img_out, (txt_out if attn.context_pre_only else attn.to_add_out(txt_out))


def install_nag(transformer, scale, tau, alpha):
    """NAG processors on every joint attention; image-side norms take the positive temb rows."""
    for block in transformer.transformer_blocks:
        block.attn.set_processor(NAGJointAttnProcessor(scale, tau, alpha))
        norm1 = block.norm1.forward  # called as norm1(x, emb=temb)
        block.norm1.forward = lambda x, emb, norm1=norm1: norm1(x, emb=emb[: x.shape[0]])
    norm_out = transformer.norm_out.forward  # called as norm_out(x, temb)
    transformer.norm_out.forward = lambda x, emb: norm_out(x, emb[: x.shape[0]])


def with_nag_text(transformer, negative_embeds, negative_pooled, nag_end=1.0):
    """Append the negative text rows (context and pooled) while t >= (1 - nag_end) * 1000; each
    text row gets the timestep of its image row."""
    forward = transformer.forward
    cut = (1 - nag_end) * 1000

    def forward_with_negatives(hidden_states, encoder_hidden_states, pooled_projections, timestep, **kwargs):
        if float(timestep[0]) >= cut:
            encoder_hidden_states = torch.cat([encoder_hidden_states, negative_embeds])
            pooled_projections = torch.cat([pooled_projections, negative_pooled])
            timestep = timestep[image_rows_of_text(hidden_states.shape[0], encoder_hidden_states.shape[0])]
        return forward(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                       pooled_projections=pooled_projections, timestep=timestep, **kwargs)

    transformer.forward = forward_with_negatives
