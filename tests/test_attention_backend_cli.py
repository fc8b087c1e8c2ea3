"""The attention backend switch from the CLI and `from_pretrained`, and the CLI's persistent compilation cache."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nag_jax import attention, cli
from nag_jax.cli import embedded_model, main
from nag_jax.pipeline import NAGPipeline

ROOT = Path(__file__).resolve().parents[1]


def test_cli_backend_choices_are_the_attention_backends():
    assert cli.ATTENTION_BACKENDS == attention.BACKENDS


def test_attention_backend_reaches_the_denoiser_trace():
    """"cudnn" on a CPU fails while the denoiser is traced (the pipeline set the context there);
    an unknown name fails before any loading."""
    with pytest.raises(ValueError, match="attention_backend must be one of auto, xla, blockwise, cudnn, splash"):
        NAGPipeline.from_pretrained(embedded_model(), attention_backend="flash")
    pipe = NAGPipeline.from_pretrained(embedded_model(), attention_backend="cudnn")
    with pytest.raises(ValueError, match="attention_backend='cudnn' needs a GPU"):
        pipe("a circle", num_inference_steps=1, output_type="latent")


@pytest.mark.parametrize("argv, cached", [((), True), (("--no-compilation-cache",), False)])
def test_generate_flags(monkeypatch, tmp_path, argv, cached):
    calls = {}
    monkeypatch.setenv("NAG_JAX_COMPILATION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cli, "use_compilation_cache", lambda folder: calls.update(cache=folder))

    def load_pipeline(model, dtype, loras, attention_backend, offload_inactive_expert):
        calls.update(backend=attention_backend)
        raise ValueError("stop before loading")

    monkeypatch.setattr(cli, "load_pipeline", load_pipeline)
    assert main(["generate", "--prompt", "x", "--attention-backend", "blockwise", "--output", str(tmp_path / "o"),
                 *argv]) == 2
    assert calls == ({"cache": tmp_path / "cache", "backend": "blockwise"} if cached else {"backend": "blockwise"})


def test_cache_folder_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("NAG_JAX_COMPILATION_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cli.compilation_cache_folder() == tmp_path / "nag-jax" / "jax"


def test_second_process_takes_compiled_programs_from_the_cache(tmp_path):
    """Two `nag-jax generate` processes on the embedded model: the first fills the cache folder,
    the second finds every program there (adds no entry) and makes the same image."""
    cache = tmp_path / "cache"
    env = dict(os.environ, NAG_JAX_COMPILATION_CACHE=str(cache), PYTHONPATH=str(ROOT))

    def generate(name):
        subprocess.run([sys.executable, "-m", "nag_jax.cli", "generate", "--prompt", "a circle", "--steps", "1",
                        "--no-progress", "--output", str(tmp_path / name)], env=env, check=True, capture_output=True)
        return np.asarray(Image.open(tmp_path / name)), sorted(p.name for p in cache.iterdir())

    first, entries = generate("first.png")
    assert len(entries) >= 3  # text encoder, sampling loop, decoder at least
    second, entries_after = generate("second.png")
    assert entries_after == entries
    np.testing.assert_array_equal(second, first)
