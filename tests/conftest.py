"""Test-wide settings: float32 matmuls at full precision so parity tolerances mean something."""

import os

import jax

os.environ.setdefault("NAG_JAX_COMPILATION_CACHE", "")  # in-process CLI tests keep no compilation cache

jax.config.update("jax_default_matmul_precision", "highest")
