"""Tiny random Wan components (Wan2.1; Wan2.2-TI2V-5B) saved in the published layouts (diffusers folder, original
single file, ComfyUI's repackage), for the Wan tests."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.tiny_components import _save_weights, _state_dict

TEXT_TOKENS = 512  # WanAttnProcessor reads everything before the last 512 context tokens as image tokens
IMAGE_TOKENS = 257  # CLIP ViT-H/14 at 224: 256 patches + class token


def save_tiny_umt5(folder, seed: int = 0, vocab_size: int = 64, d_model: int = 32, num_layers: int = 2):
    """UMT5EncoderModel (gated-gelu, a relative-position table in every block) in `folder`, as
    Wan-AI's text_encoder/ folders hold it. Returns the float32 PyTorch module."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=48, num_layers=num_layers, num_heads=4,
                        relative_attention_num_buckets=8, relative_attention_max_distance=20,
                        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, dropout_rate=0.0,
                        tie_word_embeddings=False)
    model = UMT5EncoderModel(config).eval()
    with torch.no_grad():  # the init gives tiny activations; make the test see real mixing
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = ["UMT5EncoderModel"]
    model.config.to_json_file(str(folder / "config.json"))
    state = _state_dict(model)
    state["encoder.embed_tokens.weight"] = state["encoder.embed_tokens.weight"].clone()  # tied to shared.weight
    _save_weights(state, folder, "model", sharded=True)
    return model


def tiny_wan_config(image_to_video: bool = False, clip: bool = True) -> dict:
    """`clip`: I2V with CLIP image tokens (Wan2.1); without (Wan2.2 A14B) only the extra channels."""
    config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                  text_dim=24, freq_dim=32, ffn_dim=48, num_layers=2, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
    if image_to_video:  # latents + mask (4 channels) + encoded first frame
        config.update(in_channels=12)
        if clip:
            config.update(image_dim=20, added_kv_proj_dim=32)
    return config


def save_tiny_wan_transformer(folder, image_to_video: bool = False, seed: int = 0, config: dict | None = None):
    """diffusers WanTransformer3DModel in `folder` (config.json + sharded safetensors). Random
    weights at a scale where every path (modulation, norms, image attention) visibly matters."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**(config or tiny_wan_config(image_to_video))).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.normal_(0.0, 0.2)
            else:
                parameter.uniform_(0.5, 1.5)
    model.save_pretrained(str(folder), max_shard_size="20KB")
    return model


# diffusers name -> original Wan name, (regex, replacement) in order: the reverse of diffusers'
# convert_wan_transformer_to_diffusers, written independently of convert/wan.py.
TO_ORIGINAL = [
    (r"condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"condition_embedder\.time_proj\.", "time_projection.1."),
    (r"condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_([qkv])\.", r".\1."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.add_([kv])_proj\.", r".\1_img."),
    (r"\.norm_added_k\.", ".norm_k_img."),
    (r"\.norm2\.", ".norm3."),
    (r"\.scale_shift_table$", ".modulation"),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
]


def to_original_name(key: str) -> str:
    for pattern, replacement in TO_ORIGINAL:
        key = re.sub(pattern, replacement, key)
    return key


def save_original_single_file(model, path, prefix: str = ""):
    """The transformer as one safetensors file in the original Wan naming (ComfyUI: prefix
    "model.diffusion_model.")."""
    state = {prefix + to_original_name(k): v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return state


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


WAN_UNIPC = {  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers scheduler/scheduler_config.json (the keys UniPC reads)
    "num_train_timesteps": 1000, "solver_order": 2, "prediction_type": "flow_prediction", "predict_x0": True,
    "solver_type": "bh2", "lower_order_final": True, "disable_corrector": [], "use_flow_sigmas": True,
    "flow_shift": 3.0, "final_sigmas_type": "zero", "timestep_spacing": "linspace",
}


def tiny_wan22_vae_config(z_dim: int = 6, seed: int = 0) -> dict:
    """Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json with tiny widths (published: base_dim 160,
    decoder_base_dim 256, z_dim 48) and random latents statistics; every other key as published."""
    generator = torch.Generator().manual_seed(seed)
    return {"_class_name": "AutoencoderKLWan", "attn_scales": [], "base_dim": 8, "clip_output": False,
            "decoder_base_dim": 12, "dim_mult": [1, 2, 4, 4], "dropout": 0.0, "in_channels": 12, "is_residual": True,
            "latents_mean": torch.randn(z_dim, generator=generator).tolist(),
            "latents_std": (torch.rand(z_dim, generator=generator) + 0.5).tolist(), "num_res_blocks": 2,
            "out_channels": 12, "patch_size": 2, "scale_factor_spatial": 16, "scale_factor_temporal": 4,
            "temperal_downsample": [False, True, True], "z_dim": z_dim}


def save_tiny_wan22_vae(folder, seed: int = 0):
    """diffusers AutoencoderKLWan in the Wan2.2 layout (`tiny_wan22_vae_config`), every parameter
    moved off its init (gammas are ones and biases zeros there), saved with the published
    config.json keys (diffusers does not take `clip_output`; it writes it back by hand)."""
    from diffusers import AutoencoderKLWan

    config = tiny_wan22_vae_config(seed=seed)
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**{k: v for k, v in config.items() if k not in ("_class_name", "clip_output")}).eval()
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    vae.save_pretrained(str(folder))
    written = json.loads((Path(folder) / "config.json").read_text())
    write_json(Path(folder) / "config.json", {**written, "clip_output": False})
    return vae


def build_tiny_wan_pipeline(folder, image_to_video: bool = False, seed: int = 0, boundary_ratio: float | None = None,
                            ti2v: bool = False):
    """A diffusers WanPipeline / WanImageToVideoPipeline of tiny random components, saved with
    `save_pretrained` into `folder` (model_index.json and one folder per component, as Wan-AI
    publishes them). Returns the diffusers pipeline (float32, CPU) as the reference.

    `boundary_ratio`: Wan2.2 A14B's layout, a second transformer (`transformer_2`, other weights)
    and the ratio in model_index.json; its I2V has no image encoder (no CLIP tokens).
    `ti2v`: Wan2.2-TI2V-5B's layout (WanPipeline with expand_timesteps, the Wan2.2 VAE, the
    transformer's channels its z_dim, flow_shift 5)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    from tests.tiny_components import save_tiny_t5_tokenizer

    parts = Path(tempfile.mkdtemp())  # the components as built; save_pretrained writes the published layout
    save_tiny_t5_tokenizer(parts / "tokenizer")
    save_tiny_umt5(parts / "text_encoder", seed=seed, vocab_size=64, d_model=24)
    if ti2v:
        vae = save_tiny_wan22_vae(parts / "vae", seed=seed + 2)
        channels = vae.config.z_dim
        config = dict(tiny_wan_config(), in_channels=channels, out_channels=channels)
    else:
        config = tiny_wan_config(image_to_video, clip=boundary_ratio is None)
        torch.manual_seed(seed + 2)
        generator = torch.Generator().manual_seed(seed + 3)
        vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                               temperal_downsample=[False, True, True],
                               latents_mean=torch.randn(4, generator=generator).tolist(),
                               latents_std=(torch.rand(4, generator=generator) + 0.5).tolist()).eval()
    transformer = save_tiny_wan_transformer(parts / "transformer", seed=seed + 1, config=config)
    components = dict(tokenizer=AutoTokenizer.from_pretrained(str(parts / "tokenizer")),
                      text_encoder=UMT5EncoderModel.from_pretrained(str(parts / "text_encoder")).eval(),
                      transformer=transformer, vae=vae,
                      scheduler=UniPCMultistepScheduler(**{**WAN_UNIPC, "flow_shift": 5.0 if ti2v else 3.0}))
    if boundary_ratio is not None:
        components.update(boundary_ratio=boundary_ratio, transformer_2=save_tiny_wan_transformer(
            parts / "transformer_2", seed=seed + 5, config=config))
    if image_to_video and boundary_ratio is None:  # Wan2.1 I2V: CLIP image tokens too
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

        torch.manual_seed(seed + 4)
        components["image_encoder"] = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=20, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8, projection_dim=16)).eval()
        components["image_processor"] = CLIPImageProcessor(size={"shortest_edge": 32},
                                                           crop_size={"height": 32, "width": 32})
    if image_to_video:
        pipe = WanImageToVideoPipeline(**components)
    else:
        pipe = WanPipeline(**components, expand_timesteps=ti2v)
    pipe.save_pretrained(str(folder))
    shutil.rmtree(parts)
    return pipe
