"""One module per model family: what `nag_jax.pipeline.Family` asks of it (load, encode,
schedule, denoise, decode) and nothing shared."""
