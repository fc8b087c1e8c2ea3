"""nag-jax: Normalized Attention Guidance for diffusion models in JAX/Flax.

The guidance math is imported at once; everything that imports `models/` loads on first use,
because `models/` imports `nag_jax.attention` and an eager import here would be a cycle.
"""

from __future__ import annotations

import importlib

from nag_jax.guidance import cfg, nag, nag_step_split, nasa

__version__ = "0.1.0"

_LAZY = {
    "NAGConfig": "nag_jax.intercept",
    "PAGConfig": "nag_jax.intercept",
    "guided": "nag_jax.intercept",
    "register_nag": "nag_jax.intercept",
    "register_pag": "nag_jax.intercept",
    "NAGPipeline": "nag_jax.pipeline",
    "export_to_video": "nag_jax.video",
}

__all__ = ["NAGConfig", "NAGPipeline", "PAGConfig", "cfg", "export_to_video", "guided", "nag", "nag_step_split", "nasa",
           "register_nag", "register_pag"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nag_jax' has no attribute {name!r}")
