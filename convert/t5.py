"""T5 and UMT5 encoder checkpoints (transformers' T5EncoderModel, UMT5EncoderModel) -> Flax params.

Keys: `shared.weight`, `encoder.block.N.layer.M...`, `encoder.final_layer_norm.weight`.
Some files also hold `encoder.embed_tokens.weight`, tied to `shared.weight` (it is dropped),
or only it (it is read as the shared embedding). The Flax module names mirror the PyTorch
paths, so the rules only swap the leaf name and layout.
"""

from __future__ import annotations

import jax.numpy as jnp

from convert.checkpoint import parse_dtype
from convert.clip import read_component
from convert.mapping import Rule, map_checkpoint, target_shapes
from models.t5 import T5Encoder

_BLOCK = r"(encoder\.block\.\d+)\."

T5_RULES = [
    Rule(r"shared\.weight", "shared/embedding"),
    # T5: block 0 only; UMT5: every block
    Rule(_BLOCK + r"(layer\.0\.SelfAttention\.relative_attention_bias)\.weight", r"\1.\2/embedding"),
    Rule(_BLOCK + r"(layer\.0\.SelfAttention\.[qkvo]|layer\.1\.DenseReluDense\.(?:wi_0|wi_1|wi|wo))\.weight",
         r"\1/\2/kernel", "linear"),
    Rule(_BLOCK + r"(layer\.[01]\.layer_norm)\.weight", r"\1/\2/weight"),
    Rule(r"encoder\.final_layer_norm\.weight", "encoder.final_layer_norm/weight"),
]


def load_t5(folder_or_checkpoint, config: dict | None = None, dtype="float32"):
    """-> (T5Encoder, params) from a text_encoder folder (single or sharded safetensors)."""
    config, checkpoint = read_component(folder_or_checkpoint, config)
    has_shared = "shared.weight" in checkpoint

    def untie(key):
        if key == "encoder.embed_tokens.weight":
            return None if has_shared else "shared.weight"
        return key

    checkpoint = checkpoint.renamed(untie)
    jax_dtype = jnp.dtype(parse_dtype(dtype))
    module = T5Encoder.from_config(config, dtype=jax_dtype, param_dtype=jax_dtype)
    shapes = target_shapes(module, jnp.zeros((1, 8), jnp.int32))
    return module, map_checkpoint(checkpoint, T5_RULES, shapes, dtype, "T5 encoder")
