"""Flax (linen) diffusion model code owned by nag-jax. Knows jax and flax, never guidance."""
