"""The PyTorch NAG reference for diffusers' FluxTransformer2DModel, written from nag-semantics.md.

It follows the reference implementation's structure (section 2): positive and negative text
rows run through all blocks; pooled embeddings are batched [pos; neg] so temb has a negative
row; image-stream modulation uses the positive rows (the reference truncates temb); double
blocks keep one image stream and put NAG on its attention rows; single blocks tile the image
into a second copy modulated by the negative row, overwrite both copies' image rows with the
NAG result after every attention, and keep only the first copy. The guidance function is the
one of section 1 (torch_nag) with the norm given: the reference's own Flux processors use L2.

`reference_nag_forward` runs it on one image row per text pair; `with_nag_negatives` wraps a
pipeline's transformer so the positive-prompt calls run it with the negative prompt appended.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from torch_nag import torch_nag


def _heads(attn, x, projections):
    return [p(x).unflatten(-1, (-1, attn.head_dim)) for p in projections]


def _attend(q, k, v, rope, key_mask=None):
    """Attention with RoPE; `key_mask` [rows, tokens] (boolean, true = attend) hides keys."""
    q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


class DoubleBlockNAG:
    """Image rows [B] once, text rows [pos; neg]; image output = NAG(pos branch, neg branch).
    `key_mask` [2B, text + image tokens] (Chroma's text padding) replaces the block's own mask."""

    def __init__(self, nag, key_mask=None):
        self.nag, self.key_mask = nag, key_mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        img_q, img_k, img_v = (t.tile(2, 1, 1, 1) for t in _heads(attn, hidden_states, (attn.to_q, attn.to_k, attn.to_v)))
        txt_q, txt_k, txt_v = _heads(attn, encoder_hidden_states, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        q = torch.cat([attn.norm_added_q(txt_q), attn.norm_q(img_q)], dim=1)
        k = torch.cat([attn.norm_added_k(txt_k), attn.norm_k(img_k)], dim=1)
        out = _attend(q, k, torch.cat([txt_v, img_v], dim=1), image_rotary_emb, self.key_mask)
        text_tokens, rows = encoder_hidden_states.shape[1], hidden_states.shape[0]
        img_out = self.nag(out[:rows, text_tokens:], out[rows:, text_tokens:])
        return attn.to_out[0](img_out), attn.to_add_out(out[:, :text_tokens])


class SingleBlockNAG:
    """Rows [copy 1; copy 2] of [text; image]; both copies' image rows get the NAG result."""

    def __init__(self, nag, text_tokens, key_mask=None):
        self.nag, self.text_tokens, self.key_mask = nag, text_tokens, key_mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        q, k, v = _heads(attn, hidden_states, (attn.to_q, attn.to_k, attn.to_v))
        out = _attend(attn.norm_q(q), attn.norm_k(k), v, image_rotary_emb, self.key_mask)
        rows, t = out.shape[0] // 2, self.text_tokens
        combined = self.nag(out[:rows, t:], out[rows:, t:])
        return torch.cat([out[:, :t], torch.cat([combined, combined], dim=0)], dim=1)


def _image_rows_of_temb(norm, x, emb=None):
    """The double block's image adaLN (Flux's AdaLayerNormZero, Chroma's pruned one) on the first rows of temb."""
    return type(norm).forward(norm, x, emb=emb[: x.shape[0]])


@contextlib.contextmanager
def reference_processors(model, nag, text_tokens, key_mask=None):
    """The NAG processors and the image-rows-of-temb modulation, put back afterwards."""
    saved = [block.attn.processor for block in (*model.transformer_blocks, *model.single_transformer_blocks)]
    for block in model.transformer_blocks:
        block.attn.set_processor(DoubleBlockNAG(nag, key_mask))
        block.norm1.forward = lambda x, emb=None, norm=block.norm1: _image_rows_of_temb(norm, x, emb)
    for block in model.single_transformer_blocks:
        block.attn.set_processor(SingleBlockNAG(nag, text_tokens, key_mask))
    try:
        yield
    finally:
        for block, processor in zip((*model.transformer_blocks, *model.single_transformer_blocks), saved):
            block.attn.set_processor(processor)
        for block in model.transformer_blocks:
            del block.norm1.forward


def reference_nag_forward(model, scale, tau, alpha, hidden_states, encoder_hidden_states, pooled_projections,
                          timestep, img_ids, txt_ids, guidance=None, norm="l1"):
    """Flux NAG as the reference computes it, on torch tensors in diffusers' conventions: B image
    rows, text rows [pos (B); neg (B)]. Returns the velocity for the B image rows."""
    rows = hidden_states.shape[0]
    nag = lambda z_pos, z_neg: torch_nag(z_pos, z_neg, scale, tau, alpha, norm)  # noqa: E731
    with reference_processors(model, nag, encoder_hidden_states.shape[1]), torch.no_grad():
        per_text_row = lambda v: v.to(hidden_states.dtype).tile(2) * 1000  # noqa: E731  t and g expanded to the text rows
        conditioning = [per_text_row(timestep)] + ([per_text_row(guidance)] if guidance is not None else [])
        temb = model.time_text_embed(*conditioning, pooled_projections)
        img = model.x_embedder(hidden_states)
        txt = model.context_embedder(encoder_hidden_states)
        rope = model.pos_embed(torch.cat([txt_ids, img_ids]))
        for block in model.transformer_blocks:
            txt, img = block(img, txt, temb, rope)
        img = img.tile(2, 1, 1)
        for block in model.single_transformer_blocks:
            txt, img = block(img, txt, temb, rope)
        return model.proj_out(model.norm_out(img[:rows], temb[:rows]))


def with_nag_negatives(model, positive_embeds, negative_embeds, negative_pooled, scale, tau, alpha, norm="l1",
                       nag_end=1.0):
    """Wrap a pipeline's transformer: calls with the positive prompt's context (not CFG's
    negative-prompt calls) run the reference NAG with the negative prompt's rows appended, while
    the timestep t = 1000 sigma stays at or above the reference's cut (1 - nag_end) * 1000."""
    forward = model.forward

    def forward_with_nag(hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                         img_ids=None, txt_ids=None, guidance=None, return_dict=True, **kwargs):
        nag_off = float(timestep[0]) * 1000 < (1 - nag_end) * 1000
        if nag_off or not torch.allclose(encoder_hidden_states, positive_embeds, atol=1e-4):  # encodings repeat to ~1e-6
            return forward(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                           pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids,
                           txt_ids=txt_ids, guidance=guidance, return_dict=return_dict, **kwargs)
        out = reference_nag_forward(
            model, scale, tau, alpha, hidden_states, torch.cat([encoder_hidden_states, negative_embeds]),
            torch.cat([pooled_projections, negative_pooled]), timestep, img_ids, txt_ids, guidance, norm,
        )
        return (out,)

    model.forward = forward_with_nag
