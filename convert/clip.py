"""CLIP text encoder checkpoints (transformers' CLIPTextModel[WithProjection]) -> Flax params.

Published repositories were written by transformers 4 and carry the `text_model.` prefix;
transformers 5 writes the same keys without it. Both are accepted. The Flax module names
mirror the PyTorch module paths, so each rule only swaps the leaf name and layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp

from convert.checkpoint import Checkpoint, open_checkpoint, parse_dtype
from convert.mapping import Rule, map_checkpoint, target_shapes
from models.clip import CLIPTextEncoder

_PREFIX = r"(?:text_model\.)?"
_LAYER = _PREFIX + r"(encoder\.layers\.\d+)\."

CLIP_RULES = [
    Rule(_PREFIX + r"(embeddings\.(?:token|position)_embedding)\.weight", r"\1/embedding"),
    Rule(_LAYER + r"(self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc[12])\.weight", r"\1/\2/kernel", "linear"),
    Rule(_LAYER + r"(self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc[12])\.bias", r"\1/\2/bias"),
    Rule(_LAYER + r"(layer_norm[12])\.weight", r"\1/\2/scale"),
    Rule(_LAYER + r"(layer_norm[12])\.bias", r"\1/\2/bias"),
    Rule(_PREFIX + r"final_layer_norm\.weight", "final_layer_norm/scale"),
    Rule(_PREFIX + r"final_layer_norm\.bias", "final_layer_norm/bias"),
    Rule(r"text_projection\.weight", "text_projection/kernel", "linear"),
]


def read_component(folder_or_checkpoint, config: dict | None = None) -> tuple[dict, Checkpoint]:
    """A component folder (config.json + safetensors, single or sharded) -> (config dict, Checkpoint).

    An already opened Checkpoint (for example a renamed view of a single-file checkpoint) needs
    `config` passed in.
    """
    if isinstance(folder_or_checkpoint, Checkpoint):
        if config is None:
            raise ValueError("config: a Checkpoint was passed without its config dict; pass config=...")
        return config, folder_or_checkpoint
    folder = Path(folder_or_checkpoint)
    if config is None:
        config_path = folder / "config.json"
        if not config_path.exists():
            raise FileNotFoundError(f"{folder}: no config.json in the component folder")
        config = json.loads(config_path.read_text())
    return config, open_checkpoint(folder)


def load_clip(folder_or_checkpoint, config: dict | None = None, dtype="float32", projection: bool | None = None):
    """-> (CLIPTextEncoder, params). `projection` defaults to whether the checkpoint has
    `text_projection.weight` (CLIPTextModelWithProjection)."""
    config, checkpoint = read_component(folder_or_checkpoint, config)
    # transformers 4 saved the position_ids buffer in some checkpoints; it is arange(N), not a weight.
    checkpoint = checkpoint.renamed(lambda key: None if key.endswith("embeddings.position_ids") else key)
    if projection is None:
        projection = "text_projection.weight" in checkpoint
    jax_dtype = jnp.dtype(parse_dtype(dtype))
    module = CLIPTextEncoder.from_config(config, dtype=jax_dtype, param_dtype=jax_dtype, projection=projection)
    ids = jnp.zeros((1, module.config.max_position_embeddings), jnp.int32)
    params = map_checkpoint(checkpoint, CLIP_RULES, target_shapes(module, ids), dtype, "CLIP text encoder")
    return module, params
