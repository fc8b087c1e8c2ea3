"""CLIP checkpoints (transformers' CLIPTextModel[WithProjection], CLIPVisionModel[WithProjection],
and either tower of a full CLIPModel) -> Flax params.

Published repositories were written by transformers 4 and carry the `text_model.` /
`vision_model.` prefixes; transformers 5 writes a bare tower's keys without them. Both are
accepted. The Flax module names mirror the PyTorch module paths, so each rule only swaps the
leaf name and layout. A full CLIPModel folder holds both towers: each loader reads its own.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax.numpy as jnp

from convert.checkpoint import Checkpoint, open_checkpoint, parse_dtype
from convert.mapping import Rule, map_checkpoint, target_shapes
from models.clip import CLIPTextEncoder, CLIPVisionModel


def _tower_rules(prefix: str, norms: tuple[str, ...]) -> list[Rule]:
    """Encoder layers and the named LayerNorms of the tower whose keys may start with `prefix`."""
    layer = prefix + r"(encoder\.layers\.\d+)\."
    norm = prefix + "(" + "|".join(norms) + ")"
    return [
        Rule(layer + r"(self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc[12])\.weight", r"\1/\2/kernel", "linear"),
        Rule(layer + r"(self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc[12])\.bias", r"\1/\2/bias"),
        Rule(layer + r"(layer_norm[12])\.weight", r"\1/\2/scale"),
        Rule(layer + r"(layer_norm[12])\.bias", r"\1/\2/bias"),
        Rule(norm + r"\.weight", r"\1/scale"),
        Rule(norm + r"\.bias", r"\1/bias"),
    ]


_TEXT = r"(?:text_model\.)?"
CLIP_RULES = [
    Rule(_TEXT + r"(embeddings\.(?:token|position)_embedding)\.weight", r"\1/embedding"),
    *_tower_rules(_TEXT, ("final_layer_norm",)),
    Rule(r"text_projection\.weight", "text_projection/kernel", "linear"),
]

_VISION = r"(?:vision_model\.)?"
CLIP_VISION_RULES = [
    Rule(_VISION + r"embeddings\.class_embedding", "embeddings.class_embedding"),
    Rule(_VISION + r"embeddings\.patch_embedding\.weight", "embeddings.patch_embedding/kernel", "conv"),
    Rule(_VISION + r"embeddings\.position_embedding\.weight", "embeddings.position_embedding/embedding"),
    *_tower_rules(_VISION, ("pre_layrnorm", "post_layernorm")),
    Rule(r"visual_projection\.weight", "visual_projection/kernel", "linear"),
]
# Keys of the other tower of a full CLIPModel (and its logit scale, which no tower uses).
_TEXT_ONLY = re.compile(r"text_model\..*|text_projection\.weight")
_VISION_ONLY = re.compile(r"vision_model\..*|visual_projection\.weight")


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
    return _load_tower(folder_or_checkpoint, config, dtype, projection, CLIPTextEncoder, CLIP_RULES, _VISION_ONLY,
                       "text_projection.weight", lambda cfg: jnp.zeros((1, cfg.max_position_embeddings), jnp.int32))


def load_clip_vision(folder_or_checkpoint, dtype="float32", config: dict | None = None,
                     projection: bool | None = None):
    """-> (CLIPVisionModel, params) from a CLIPVisionModel[WithProjection] folder or a full CLIPModel
    folder (its `vision_model.*` and `visual_projection`). `projection` defaults to whether the
    checkpoint has `visual_projection.weight`."""
    return _load_tower(folder_or_checkpoint, config, dtype, projection, CLIPVisionModel, CLIP_VISION_RULES,
                       _TEXT_ONLY, "visual_projection.weight",
                       lambda cfg: jnp.zeros((1, cfg.num_channels, cfg.image_size, cfg.image_size), jnp.float32))


def _load_tower(folder_or_checkpoint, config, dtype, projection, module_class, rules, other_tower: re.Pattern,
                projection_key: str, example_input):
    config, checkpoint = read_component(folder_or_checkpoint, config)

    def keep(key):  # drop the other tower, the logit scale, and transformers 4's position_ids buffers (arange(N))
        dropped = other_tower.fullmatch(key) or key == "logit_scale" or key.endswith("embeddings.position_ids")
        return None if dropped else key

    checkpoint = checkpoint.renamed(keep)
    if projection is None:
        projection = projection_key in checkpoint
    jax_dtype = jnp.dtype(parse_dtype(dtype))
    module = module_class.from_config(config, dtype=jax_dtype, param_dtype=jax_dtype, projection=projection)
    shapes = target_shapes(module, example_input(module.config))
    what = "CLIP text encoder" if module_class is CLIPTextEncoder else "CLIP vision tower"
    return module, map_checkpoint(checkpoint, rules, shapes, dtype, what)
