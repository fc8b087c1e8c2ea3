"""The installed distribution works on its own: run from outside the checkout, Python must find
the three packages and the three embedded models in site-packages, not in the source tree."""

import os
import subprocess
import sys
from pathlib import Path


def test_installed_packages_import_outside_the_checkout(tmp_path):
    code = ("import nag_jax, models, convert, nag_jax.cli as cli; "
            "print(nag_jax.__file__); print(models.__file__); print(convert.__file__); "
            "print(*map(cli.embedded_model, cli.EMBEDDED_MODELS))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    paths = done.stdout.split()
    for path in paths:
        assert "site-packages" in Path(path).parts, path
    sd, flux, wan = paths[3:]  # the embedded models, with their denoisers
    assert (Path(sd) / "model_index.json").exists() and (Path(sd) / "unet").is_dir()
    assert (Path(flux) / "model_index.json").exists() and (Path(flux) / "transformer").is_dir()
    assert (Path(wan) / "model_index.json").exists() and (Path(wan) / "vae" / "config.json").exists()
