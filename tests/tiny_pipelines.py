"""Tiny random SD1.5-like and SDXL-like pipeline folders, laid out as published repositories.

Components come from the fixture builders (tiny_unet, tiny_components): CLIP weights with
the `text_model.` prefix and tokenizer folders with vocab.json/merges.txt, the SDXL UNet
sharded. model_index.json is written by hand, as the published repos carry it.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer

from tiny_components import save_tiny_clip, save_tiny_clip_tokenizer, save_tiny_vae
from tiny_unet import make_unet

SCHEDULERS = {
    "euler": {"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "leading", "steps_offset": 1},
    "euler_ancestral": {"_class_name": "EulerAncestralDiscreteScheduler"},
    "euler_trailing": {"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing"},
    "ddim": {"_class_name": "DDIMScheduler", "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False},
    "dpmpp_2m_karras": {"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True},
    "lcm": {"_class_name": "LCMScheduler", "original_inference_steps": 50},
}
_SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def write_scheduler(folder: Path, kind: str) -> None:
    """Swap the pipeline's scheduler: its config and model_index.json's entry, which must agree."""
    folder = Path(folder)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    config = dict(_SD_BETAS, **SCHEDULERS[kind], _diffusers_version="0.42.1")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2))
    index_path = folder / "model_index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["scheduler"] = ["diffusers", config["_class_name"]]
        index_path.write_text(json.dumps(index, indent=2))


def make_sd_pipeline(folder, kind: str = "sd15", scheduler: str = "euler") -> Path:
    """kind: a tiny_unet kind: "sd15", "sd2", "lcm" (one CLIP) or "sdxl" (two, pooled + time ids)."""
    folder = Path(folder)
    make_unet(kind, folder / "unet")
    save_tiny_vae(folder / "vae", latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4)
    index = {"_diffusers_version": "0.42.1", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", SCHEDULERS[scheduler]["_class_name"]]}
    save_tiny_clip_tokenizer(folder / "tokenizer")
    vocab = len(AutoTokenizer.from_pretrained(str(folder / "tokenizer")))
    if kind == "sdxl":
        save_tiny_clip_tokenizer(folder / "tokenizer_2", pad_token="!")
        save_tiny_clip(folder / "text_encoder", hidden_size=32, vocab_size=vocab, seed=1)
        save_tiny_clip(folder / "text_encoder_2", projection=True, hidden_size=16, projection_dim=16, vocab_size=vocab,
                       seed=2)
        index.update(_class_name="StableDiffusionXLPipeline", force_zeros_for_empty_prompt=True,
                     text_encoder=["transformers", "CLIPTextModel"], tokenizer=["transformers", "CLIPTokenizer"],
                     text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], image_encoder=[None, None],
                     feature_extractor=[None, None])
    else:
        save_tiny_clip(folder / "text_encoder", hidden_size=32, vocab_size=vocab, seed=1)
        index.update(_class_name="StableDiffusionPipeline", requires_safety_checker=False,
                     text_encoder=["transformers", "CLIPTextModel"], tokenizer=["transformers", "CLIPTokenizer"],
                     safety_checker=[None, None], feature_extractor=[None, None], image_encoder=[None, None])
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    write_scheduler(folder, scheduler)
    return folder


def sampler_call(run) -> dict:
    """What a pipeline call hands its sampler: `run()` makes the call; the sampler is replaced
    for it, so the loop is not run (latents come back as given). Keys: schedule, plan, args."""
    from nag_jax.sampler import Sampler

    captured = {}
    original = Sampler.__call__

    def capture(self, schedule, plan, params, latents, groups, scales, image_keys, *rest):
        captured.update(schedule=schedule, plan=plan, args=(params, latents, groups, scales, image_keys))
        return latents

    Sampler.__call__ = capture
    try:
        run()
    finally:
        Sampler.__call__ = original
    return captured
