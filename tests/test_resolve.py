"""Model names: local folders, embedded names and Hugging Face repo ids (offline, from a cache laid
out as huggingface_hub lays it out) load the same pipeline."""

import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from nag_jax import cli
from nag_jax.pipeline import NAGPipeline
from nag_jax.resolve import embedded_model, files_to_download, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_snapshot(cache, repo_id="tiny-org/sd-shapes", source="sd-shapes"):
    """`source`'s embedded pipeline placed in `cache` as huggingface_hub stores a download."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(embedded_model(source), snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    hub_snapshot(cache)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_embedded_name_and_folder_load_the_same_pipeline(offline_cache, tmp_path):
    folder = tmp_path / "local"
    shutil.copytree(embedded_model(), folder)
    pipes = [NAGPipeline.from_pretrained(name) for name in ("tiny-org/sd-shapes", "sd-shapes", folder)]
    for pipe in pipes[1:]:
        jax.tree.map(np.testing.assert_array_equal, pipe.family.params, pipes[0].family.params)
        assert pipe.family.scheduler_config == pipes[0].family.scheduler_config
    # The CLI's --model takes the same names.
    assert cli.model_folder("tiny-org/sd-shapes") == offline_cache / "models--tiny-org--sd-shapes/snapshots" / COMMIT


def test_offline_and_not_cached_names_the_id_and_the_cache(offline_cache):
    with pytest.raises(FileNotFoundError) as error:
        resolve_model("tiny-org/not-downloaded")
    assert "tiny-org/not-downloaded" in str(error.value) and str(offline_cache) in str(error.value)
    with pytest.raises(FileNotFoundError, match="revision v2"):
        resolve_model("tiny-org/sd-shapes", revision="v2")
    with pytest.raises(ValueError, match="--model: /no/such/folder: no such pipeline folder"):
        cli.model_folder("/no/such/folder")


def test_a_local_folder_wins_over_a_repo_id_of_the_same_name(offline_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(embedded_model(), tmp_path / "tiny-org" / "sd-shapes")
    assert resolve_model("tiny-org/sd-shapes").resolve() == tmp_path / "tiny-org" / "sd-shapes"


def test_variant_snapshot_is_read_through_a_one_variant_view(tmp_path):
    """A snapshot holding plain and fp16 weights: each request sees one checkpoint per component."""
    snapshot = hub_snapshot(tmp_path / "hub")
    unet = snapshot / "unet"
    shutil.copy(unet / "diffusion_pytorch_model.safetensors", unet / "diffusion_pytorch_model.fp16.safetensors")
    (unet / "diffusion_pytorch_model.safetensors").write_bytes(b"not read")  # the plain file must not be used
    view = resolve_model("tiny-org/sd-shapes", variant="fp16", cache_dir=tmp_path / "hub", local_files_only=True)
    assert sorted(p.name for p in (view / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert (view / "unet" / "diffusion_pytorch_model.safetensors").resolve().name.endswith(".fp16.safetensors")
    NAGPipeline.from_pretrained("tiny-org/sd-shapes", variant="fp16", cache_dir=tmp_path / "hub",
                                local_files_only=True)
    with pytest.raises(FileNotFoundError, match="no weights of variant 'bf16'"):
        resolve_model("tiny-org/sd-shapes", variant="bf16", cache_dir=tmp_path / "hub", local_files_only=True)


def test_download_list_holds_only_what_the_pipeline_reads():
    index = {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"], "image_encoder": [None, None]}
    repo = ["model_index.json", "README.md", "sd_xl_base_1.0.safetensors", "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin",
            "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.onnx",
            "vae/config.json", "vae/diffusion_pytorch_model.safetensors.index.json",
            "vae/diffusion_pytorch_model-00001-of-00002.safetensors",
            "vae/diffusion_pytorch_model-00002-of-00002.safetensors",
            "vae/diffusion_pytorch_model.safetensors.index.fp16.json",
            "vae/diffusion_pytorch_model.fp16-00001-of-00001.safetensors", "text_encoder/config.json",
            "text_encoder/model.safetensors", "text_encoder/pytorch_model.bin", "text_encoder/flax_model.msgpack",
            "text_encoder_2/config.json", "text_encoder_2/model.safetensors",  # no fp16 variant: plain read
            "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
            "scheduler/scheduler_config.json", "safety_checker/config.json", "safety_checker/model.safetensors"]
    plain = files_to_download(repo, index)
    assert plain == ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                     "vae/config.json", "vae/diffusion_pytorch_model.safetensors.index.json",
                     "vae/diffusion_pytorch_model-00001-of-00002.safetensors",
                     "vae/diffusion_pytorch_model-00002-of-00002.safetensors", "text_encoder/config.json",
                     "text_encoder/model.safetensors", "text_encoder_2/config.json",
                     "text_encoder_2/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
                     "tokenizer/special_tokens_map.json", "scheduler/scheduler_config.json"]
    fp16 = set(files_to_download(repo, index, variant="fp16"))
    assert "text_encoder_2/model.safetensors" in fp16 and "unet/diffusion_pytorch_model.safetensors" not in fp16
    assert fp16 - set(plain) == {"unet/diffusion_pytorch_model.fp16.safetensors",
                    "vae/diffusion_pytorch_model.safetensors.index.fp16.json",
                    "vae/diffusion_pytorch_model.fp16-00001-of-00001.safetensors"}


def test_efficacy_no_longer_imports_the_cli():
    code = "import sys, nag_jax.efficacy; assert 'nag_jax.cli' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
