"""Tests run in the legacy environment (diffusers < 0.40 with its Flax pipelines, transformers < 5).

They reuse the fixture builders of tests/ and its full-precision float32 matmuls.
"""

import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
jax.config.update("jax_default_matmul_precision", "highest")
