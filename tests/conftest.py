"""Test-wide settings: float32 matmuls at full precision so parity tolerances mean something."""

import jax

jax.config.update("jax_default_matmul_precision", "highest")
