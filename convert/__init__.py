"""Reading PyTorch checkpoints and turning them into Flax parameter trees."""

from convert.checkpoint import Checkpoint, CheckpointError, open_checkpoint, parse_dtype
from convert.mapping import ConversionError, Rule, map_checkpoint, target_shapes

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ConversionError",
    "Rule",
    "map_checkpoint",
    "open_checkpoint",
    "parse_dtype",
    "target_shapes",
]
