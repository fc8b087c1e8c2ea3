"""PixArt-alpha / PixArt-Sigma transformer, as diffusers' `PixArtTransformer2DModel`.

Patch embedding with a fixed 2-D sin-cos position table, adaLN-single (one timestep MLP for
the whole model; each block adds its own learned `scale_shift_table` to the shared six
modulation vectors), then per block: modulated self-attention, plain cross-attention over the
projected caption tokens (masked by the text mask), modulated GELU feed-forward. The blocks
run under `models.layers.scan_blocks` over parameters stacked along a leading layer axis (`blocks/...`).
PixArt-alpha's resolution / aspect-ratio embeddings are there when the config asks for them.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.layers import (CrossAttentionCore, GELUFeedForward, LayerStack, MLPEmbedder, RMSNorm, ScannedBlock,
                           SelfAttentionCore, key_mask_bias, layer_norm, modulate, scan_blocks,
                           timestep_embedding)

def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[M] positions -> [M, dim]: [sin, cos] at frequencies 10000^(-2i/dim), float64."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = positions.reshape(-1)[:, None].astype(np.float64) * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, height: int, width: int, base_size: int, interpolation_scale: float) -> np.ndarray:
    """diffusers' `get_2d_sincos_pos_embed` for a (height, width) token grid -> [H*W, dim] float32,
    tokens row-major; the first half of the features encodes the column, the second the row."""
    rows = np.arange(height, dtype=np.float32) / (height / base_size) / interpolation_scale
    cols = np.arange(width, dtype=np.float32) / (width / base_size) / interpolation_scale
    col_grid, row_grid = np.meshgrid(cols, rows, indexing="xy")
    return np.concatenate([sincos_1d(dim // 2, col_grid), sincos_1d(dim // 2, row_grid)], axis=1).astype(np.float32)


def patchify(module: nn.Module, x, dim: int, patch: int):
    """[B, C, H, W] -> tokens [B, (H/p)*(W/p), dim] by a stride-p convolution `patch_embed`."""
    tokens = nn.Conv(dim, (patch, patch), strides=(patch, patch), padding="VALID", dtype=module.dtype,
                     param_dtype=module.param_dtype, name="patch_embed")(jnp.transpose(x, (0, 2, 3, 1)))
    return tokens.reshape(tokens.shape[0], -1, dim)


def unpatchify(x, height: int, width: int, patch: int, channels: int):
    """Tokens [B, h*w, p*p*C] -> [B, C, h*p, w*p] (diffusers' einsum nhwpqc->nchpwq)."""
    x = x.reshape(x.shape[0], height, width, patch, patch, channels)
    return jnp.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], channels, height * patch, width * patch)


def final_layer(module: nn.Module, tokens, emb, grid, patch: int, channels: int):
    """Modulated norm with the model's own `scale_shift_table` [2, D] (shift, scale) plus the
    timestep embedding, `proj_out`, unpatchify (PixArt and SANA)."""
    dim = tokens.shape[-1]
    table = module.param("scale_shift_table", nn.initializers.normal(dim**-0.5), (2, dim), module.param_dtype)
    shift, scale = table[0][None] + emb, table[1][None] + emb
    tokens = modulate(layer_norm(tokens, 1e-6), shift, scale)
    out = nn.Dense(patch * patch * channels, dtype=module.dtype, param_dtype=module.param_dtype,
                   name="proj_out")(tokens)
    return unpatchify(out, *grid, patch, channels)


def block_modulation(module: nn.Module, x, modulation):
    """The block's six adaLN vectors [B, D] each: its `scale_shift_table` [6, D] plus the shared
    modulation [B, 6*D] (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp)."""
    dim = x.shape[-1]
    table = module.param("scale_shift_table", nn.initializers.normal(dim**-0.5), (6, dim), module.param_dtype)
    vectors = table[None].astype(modulation.dtype) + modulation.reshape(x.shape[0], 6, dim)
    return [vectors[:, i] for i in range(6)]


def relu_linear_attention(q, k, v):
    """out_n = sum_m v_m (k_m . q_n) / (sum_m k_m . q_n + 1e-15) with ReLU'd q, k; [B, N, H, D]
    in, [B, N, H*D] out, in float32 (diffusers pads v with a row of ones for the denominator)."""
    q, k, v = (t.astype(jnp.float32) for t in (jax.nn.relu(q), jax.nn.relu(k), v))
    kv = jnp.einsum("bmhd,bmhe->bhed", k, v)
    numerator = jnp.einsum("bhed,bnhd->bnhe", kv, q)
    denominator = jnp.einsum("bmhd,bnhd->bnh", k, q)[..., None]
    out = numerator / (denominator + 1e-15)
    return out.reshape(*out.shape[:2], -1)


def project_heads(source, name: str, heads: int, head_dim: int, bias: bool, norm: bool, dtype, param_dtype):
    """diffusers' `to_q` / `to_k` / `to_v` Linear, then with `norm` its RMS norm across heads
    (`norm_q` / `norm_k`, SANA-Sprint), split into heads: [B, N, heads, head_dim]. Call it inside
    a compact method: the layers belong to that module."""
    y = nn.Dense(heads * head_dim, use_bias=bias, dtype=dtype, param_dtype=param_dtype, name=name)(source)
    if norm:
        y = RMSNorm(1e-5, param_dtype=param_dtype, name=name.replace("to_", "norm_"))(y)
    return y.reshape(*y.shape[:-1], heads, head_dim)


class HeadsLayout(nn.Module):
    """The fields of a module that projects tokens into heads (`project_heads`): heads x head_dim,
    biased projections per `bias`, `qk_norm`: RMS norm of q and k across heads
    ("rms_norm_across_heads", SANA-Sprint)."""

    heads: int
    head_dim: int
    bias: bool = True
    qk_norm: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32


class SelfAttention(HeadsLayout):
    """diffusers' `Attention` over the image tokens: to_q/to_k/to_v/to_out.0 around a core.
    `linear`: SANA's ReLU linear attention in place of softmax attention."""

    linear: bool = False

    @nn.compact
    def __call__(self, x):
        q, k, v = (project_heads(x, name, self.heads, self.head_dim, self.bias, self.qk_norm and name != "to_v",
                                 self.dtype, self.param_dtype) for name in ("to_q", "to_k", "to_v"))
        out = relu_linear_attention(q, k, v).astype(x.dtype) if self.linear else SelfAttentionCore(name="core")(q, k, v)
        return nn.Dense(x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype, name="to_out")(out)


class CrossAttention(HeadsLayout):
    """diffusers' cross-attention `Attention` from the image tokens' side: to_q (+ norm_q), the
    core over the caption's keys and values (projected once per sampling run by `TextKeysValues`,
    masked by `key_bias`), to_out.0."""

    @nn.compact
    def __call__(self, x, keys, values, key_bias):
        q = project_heads(x, "to_q", self.heads, self.head_dim, self.bias, self.qk_norm, self.dtype, self.param_dtype)
        out = CrossAttentionCore(name="core")(q, keys, values, key_bias)
        return nn.Dense(x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype, name="to_out")(out)


class TextKeysValues(ScannedBlock, HeadsLayout):
    """One block's cross-attention keys and values of the caption tokens (diffusers' attn2.to_k
    (+ norm_k) and attn2.to_v), as a scan body: the caption passes through unchanged."""

    @nn.compact
    def __call__(self, context, layer):
        project = lambda name, norm: project_heads(context, name, self.heads, self.head_dim, self.bias,  # noqa: E731
                                                   norm, self.dtype, self.param_dtype)
        return context, (project("to_k", self.qk_norm), project("to_v", False))


def text_keys_values(context, context_mask, num_layers: int, **fields) -> dict:
    """What every step's cross-attentions read of the caption: keys and values of each block
    [num_layers, B', L, heads, head_dim] and the mask's score bias [B', 1, 1, L]."""
    _, (keys, values) = scan_blocks(TextKeysValues, text_stack(num_layers), context, outputs=True, **fields)
    return {"keys": keys, "values": values, "bias": key_mask_bias(context_mask)}


class PixArtBlock(ScannedBlock):
    """diffusers' `BasicTransformerBlock` with norm_type "ada_norm_single", as a scan body."""

    heads: int
    head_dim: int
    attention_bias: bool = True
    norm_eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, layer, text_keys_values, text_bias, modulation):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block_modulation(self, x, modulation)
        kinds = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attention = SelfAttention(self.heads, self.head_dim, self.attention_bias, **kinds, name="attn1")
        x = x + gate_msa[:, None] * attention(modulate(layer_norm(x, self.norm_eps), shift_msa, scale_msa))
        cross_attention = CrossAttention(self.heads, self.head_dim, self.attention_bias, **kinds, name="attn2")
        x = x + cross_attention(x, *text_keys_values, text_bias)  # PixArt: no norm before cross-attention
        normed = modulate(layer_norm(x, self.norm_eps), shift_mlp, scale_mlp)
        ff = GELUFeedForward(dtype=self.dtype, param_dtype=self.param_dtype, name="ff")(normed)
        return x + gate_mlp[:, None] * ff, None


def blocks_stack(num_layers: int) -> LayerStack:
    """The scanned blocks: parameters stacked under `blocks`, layer i unrolled is `blocks_i`
    (diffusers' `transformer_blocks.i` but its attn2.to_k / to_v / norm_k)."""
    return LayerStack("blocks", range(num_layers), "blocks")


def text_stack(num_layers: int) -> LayerStack:
    """Each block's caption key/value projections (diffusers' `transformer_blocks.i.attn2.to_k`,
    `to_v`, `norm_k`), stacked under `text_blocks`; layer i unrolled is `text_blocks_i`."""
    return LayerStack("text_blocks", range(num_layers), "text_blocks")


class CaptionProjection(nn.Module):
    """diffusers' `PixArtAlphaTextProjection` (act "gelu_tanh"): Linear -> GELU(tanh) -> Linear."""

    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = lambda name: nn.Dense(  # noqa: E731
            self.features, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        return dense("linear_2")(nn.gelu(dense("linear_1")(x), approximate=True))


class AdaLNSingle(nn.Module):
    """diffusers' `AdaLayerNormSingle`: timestep (+ resolution and aspect ratio) -> (six
    modulation vectors [B, 6*D], the embedding [B, D] the final layer uses)."""

    dim: int
    use_additional_conditions: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, timestep, resolution=None, aspect_ratio=None):
        embed = lambda x, features, name: MLPEmbedder(features, self.dtype, self.param_dtype, name=name)(  # noqa: E731
            timestep_embedding(x, 256, flip_sin_to_cos=True, freq_shift=0.0).astype(self.dtype))
        emb = embed(timestep, self.dim, "timestep_embedder")
        if self.use_additional_conditions:
            size_dim = self.dim // 3
            batch = timestep.shape[0]
            sizes = embed(resolution.reshape(-1), size_dim, "resolution_embedder").reshape(batch, -1)
            ratios = embed(aspect_ratio.reshape(-1), size_dim, "aspect_ratio_embedder").reshape(batch, -1)
            emb = emb + jnp.concatenate([sizes, ratios], axis=1)
        modulation = nn.Dense(6 * self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="linear")(nn.silu(emb))
        return modulation, emb


class DiTConfig:
    """What the PixArt and SANA config dataclasses share: reading diffusers' config.json (keys of
    other versions ignored, after the subclass's `check`) and the derived widths."""

    @staticmethod
    def check(config: dict) -> None:
        """Raise for config values the model does not implement."""

    @classmethod
    def from_dict(cls, config: dict):
        cls.check(config)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels


@dataclasses.dataclass(frozen=True)
class PixArtConfig(DiTConfig):
    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int | None = 8
    num_layers: int = 28
    attention_bias: bool = True
    sample_size: int = 128
    patch_size: int = 2
    norm_eps: float = 1e-6
    interpolation_scale: float | None = None
    use_additional_conditions: bool | None = None
    caption_channels: int | None = None

    @staticmethod
    def check(config: dict) -> None:
        for key, allowed in (("norm_type", "ada_norm_single"), ("activation_fn", "gelu-approximate")):
            if config.get(key, allowed) != allowed:
                raise ValueError(f"PixArt transformer config: {key} must be {allowed!r}, got {config[key]!r}")

    @property
    def additional_conditions(self) -> bool:
        """diffusers' default: on for the 1024px (sample_size 128) PixArt-alpha models."""
        return self.sample_size == 128 if self.use_additional_conditions is None else self.use_additional_conditions


class DiTPart(nn.Module):
    """The fields of a cross-attention DiT and of each of its parts (`TwoPartTransformer`)."""

    config: DiTConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32


class TwoPartTransformer(DiTPart):
    """A cross-attention DiT as two parts over one parameter tree (PixArt, SANA):

    - `text_part` (caption tokens [B', L, caption_channels], mask [B', L] -> `text_keys_values`):
      the caption projection and every block's keys and values, the same at every step, so the
      sampler runs it once per sampling run (`Family.prepare`);
    - `step_part` (latents [B, C, H, W], that text, timestep [B], the model's extra conditions
      -> prediction [B, C_out, H, W]), the work of one step (B' > B only inside nag_jax.guided).

    Calling the module runs both: the diffusers model's forward."""

    config_class: ClassVar[type]
    text_part: ClassVar[type]
    step_part: ClassVar[type]

    @classmethod
    def from_config(cls, config: dict, dtype=jnp.float32, param_dtype=jnp.float32):
        return cls(cls.config_class.from_dict(config), dtype=dtype, param_dtype=param_dtype)

    @nn.nowrap  # not a module method: called on an unbound module, the parts stay unbound
    def parts(self) -> tuple[nn.Module, nn.Module]:
        """(text part, step part), unbound: apply each with the whole transformer's parameters."""
        return (self.text_part(self.config, self.dtype, self.param_dtype),
                self.step_part(self.config, self.dtype, self.param_dtype))

    @property
    def layer_stacks(self) -> tuple[LayerStack, ...]:
        return blocks_stack(self.config.num_layers), text_stack(self.config.num_layers)

    def setup(self):
        self.text, self.step = self.parts()
        nn.share_scope(self, self.text)
        nn.share_scope(self, self.step)

    def __call__(self, x, context, context_mask, timestep, *conditions):
        return self.step(x, self.text(context, context_mask), timestep, *conditions)


class PixArtText(DiTPart):
    """PixArt's text part: caption projection, then each block's cross-attention keys and values."""

    @nn.compact
    def __call__(self, context, context_mask):
        cfg = self.config
        context = context.astype(self.dtype)
        if cfg.caption_channels is not None:
            context = CaptionProjection(cfg.inner_dim, self.dtype, self.param_dtype, name="caption_projection")(context)
        return text_keys_values(context, context_mask, cfg.num_layers, heads=cfg.num_attention_heads,
                                head_dim=cfg.attention_head_dim, bias=cfg.attention_bias, dtype=self.dtype,
                                param_dtype=self.param_dtype)


class PixArtStep(DiTPart):
    """PixArt's step part: latents, the text part's output, timestep (and PixArt-alpha's
    resolution / aspect ratio) -> prediction."""

    def pos_embed(self, height: int, width: int) -> np.ndarray:
        cfg = self.config
        scale = cfg.interpolation_scale if cfg.interpolation_scale is not None else max(cfg.sample_size // 64, 1)
        return sincos_2d(cfg.inner_dim, height, width, cfg.sample_size // cfg.patch_size, scale)

    @nn.compact
    def __call__(self, x, text, timestep, resolution=None, aspect_ratio=None):
        cfg, dim, patch = self.config, self.config.inner_dim, self.config.patch_size
        height, width = x.shape[-2] // patch, x.shape[-1] // patch
        tokens = patchify(self, x.astype(self.dtype), dim, patch)
        tokens = tokens + jnp.asarray(self.pos_embed(height, width), self.dtype)[None]
        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (x.shape[0],))
        modulation, emb = AdaLNSingle(dim, cfg.additional_conditions, self.dtype, self.param_dtype,
                                      name="adaln_single")(timestep, resolution, aspect_ratio)
        tokens = scan_blocks(PixArtBlock, blocks_stack(cfg.num_layers), tokens, text["bias"], modulation,
                             per_layer=(text["keys"], text["values"]), heads=cfg.num_attention_heads,
                             head_dim=cfg.attention_head_dim, attention_bias=cfg.attention_bias, norm_eps=cfg.norm_eps,
                             dtype=self.dtype, param_dtype=self.param_dtype)
        return final_layer(self, tokens, emb, (height, width), patch, cfg.output_channels)


class PixArtTransformer(TwoPartTransformer):
    """diffusers' `PixArtTransformer2DModel`: (latents, caption tokens, their mask, timestep[,
    resolution, aspect ratio]) -> prediction."""

    config_class = PixArtConfig
    text_part = PixArtText
    step_part = PixArtStep
