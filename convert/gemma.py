"""Gemma-2 checkpoints (transformers' `Gemma2Model`, SANA's `text_encoder/`) -> Flax params.

Keys `embed_tokens.weight`, `layers.N.self_attn.q_proj.weight`, `layers.N.mlp.gate_proj.weight`,
`layers.N.input_layernorm.weight`, `norm.weight`, optionally under `model.` (a causal-LM file).
The Flax module names mirror the PyTorch paths.
"""

from __future__ import annotations

import jax.numpy as jnp

from convert.checkpoint import parse_dtype
from convert.clip import read_component
from convert.mapping import Rule, map_checkpoint, target_shapes
from models.gemma import Gemma2Encoder

_PREFIX = r"(?:model\.)?"
_LAYER = _PREFIX + r"(layers\.\d+)\."

GEMMA2_RULES = [
    Rule(_PREFIX + r"embed_tokens\.weight", "embed_tokens/embedding"),
    Rule(_LAYER + r"((?:self_attn|mlp)\.\w+_proj)\.weight", r"\1/\2/kernel", "linear"),
    Rule(_LAYER + r"((?:self_attn)\.\w+_proj)\.bias", r"\1/\2/bias"),
    Rule(_LAYER + r"(\w+_layernorm)\.weight", r"\1/\2/weight"),
    Rule(_PREFIX + r"norm\.weight", "norm/weight"),
]


def load_gemma2(folder, dtype="float32", config: dict | None = None):
    """A `text_encoder/` folder (Gemma2Model, single or sharded safetensors) -> (Gemma2Encoder, params)."""
    config, checkpoint = read_component(folder, config)
    checkpoint = checkpoint.renamed(lambda key: None if key == "lm_head.weight" else key)  # tied to the embedding
    jax_dtype = jnp.dtype(parse_dtype(dtype))
    module = Gemma2Encoder.from_config(config, dtype=jax_dtype, param_dtype=jax_dtype)
    shapes = target_shapes(module, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
    return module, map_checkpoint(checkpoint, GEMMA2_RULES, shapes, dtype, "Gemma-2 text encoder")
