"""Tiny random SANA / SANA-Sprint pipeline folders, laid out as the published diffusers repositories.

transformer/ (SanaTransformer2DModel; Sprint: guidance embeddings and QK norm across heads),
text_encoder/ (Gemma2Model) and tokenizer/ (a sentencepiece Gemma tokenizer: pad 0, eos 1,
bos 2, unk 3), vae/ (AutoencoderDC with SANA's block types, BatchNorm/ReLU decoder stages,
interpolating upsampling, 4x here), scheduler/ (SANA's flow DPM-Solver++ or Sprint's SCM config).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from nag_jax.families.sana import COMPLEX_HUMAN_INSTRUCTION
from tiny_components import CORPUS
from tiny_pixart import randomize

GEMMA_WIDTH = 32
GEMMA = dict(hidden_size=GEMMA_WIDTH, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=12, attn_logit_softcapping=5.0,
             sliding_window=16, pad_token_id=0, eos_token_id=1, bos_token_id=2)
TRANSFORMER = dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                   num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32,
                   caption_channels=GEMMA_WIDTH, sample_size=8, patch_size=1)
SPRINT = dict(guidance_embeds=True, qk_norm="rms_norm_across_heads")
STAGES = ["ResBlock", "EfficientViTBlock", "EfficientViTBlock"]
VAE = dict(in_channels=3, latent_channels=8, attention_head_dim=4, encoder_block_types=STAGES,
           decoder_block_types=STAGES, encoder_block_out_channels=[8, 16, 16], decoder_block_out_channels=[8, 16, 16],
           encoder_layers_per_block=[1, 1, 1], decoder_layers_per_block=[1, 1, 1],
           encoder_qkv_multiscales=[[], [5], [5]], decoder_qkv_multiscales=[[], [5], [5]],
           upsample_block_type="interpolate", downsample_block_type="Conv",
           decoder_norm_types=["batch_norm", "rms_norm", "rms_norm"], decoder_act_fns=["relu", "silu", "silu"],
           scaling_factor=0.41407)
# Sana_1600M_1024px_diffusers and Sana_Sprint_1.6B_1024px_diffusers scheduler/scheduler_config.json
SANA_SCHEDULER = {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++", "beta_end": 0.02,
                  "beta_schedule": "linear", "beta_start": 0.0001, "final_sigmas_type": "zero", "flow_shift": 3.0,
                  "lower_order_final": True, "num_train_timesteps": 1000, "prediction_type": "flow_prediction",
                  "solver_order": 2, "solver_type": "midpoint", "steps_offset": 0, "thresholding": False,
                  "timestep_spacing": "linspace", "use_flow_sigmas": True, "use_karras_sigmas": False,
                  "variance_type": None}
SPRINT_SCHEDULER = {"_class_name": "SCMScheduler", "num_train_timesteps": 1000, "prediction_type": "trigflow",
                    "sigma_data": 0.5}


def save_tiny_gemma_tokenizer(folder, vocab_size: int = 160):
    """A sentencepiece Gemma tokenizer trained on CORPUS and the instruction prefix: tokenizer.model,
    tokenizer_config.json, special_tokens_map.json and the converted tokenizer.json."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 10 + list(COMPLEX_HUMAN_INSTRUCTION)),
                                   model_writer=model, vocab_size=vocab_size, model_type="bpe", pad_id=0, eos_id=1,
                                   bos_id=2, unk_id=3, hard_vocab_limit=False, character_coverage=1.0, minloglevel=2,
                                   pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    specials = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "model_max_length": 8192, "padding_side": "right", **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    converted = AutoTokenizer.from_pretrained(str(folder))
    converted.backend_tokenizer.save(str(folder / "tokenizer.json"))
    return converted


def random_sana_transformer(sprint: bool = False, seed: int = 5, **overrides):
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(seed)
    config = dict(TRANSFORMER, **(SPRINT if sprint else {}), **overrides)
    return randomize(SanaTransformer2DModel(**config).eval(), seed + 1)


def random_gemma(vocab_size: int, seed: int = 3):
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    model = Gemma2Model(Gemma2Config(vocab_size=vocab_size, **GEMMA)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model


def random_dc_ae(seed: int = 0):
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    model = AutoencoderDC(**VAE).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # BatchNorm statistics away from (0, 1)
        for name, buffer in model.named_buffers():
            if name.endswith("running_var"):
                buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
            elif name.endswith("running_mean"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
    return randomize(model, seed + 2)


def make_sana_pipeline(folder, sprint: bool = False) -> Path:
    folder = Path(folder)
    tokenizer = save_tiny_gemma_tokenizer(folder / "tokenizer")
    random_gemma(len(tokenizer)).save_pretrained(str(folder / "text_encoder"))
    random_sana_transformer(sprint).save_pretrained(str(folder / "transformer"))
    random_dc_ae().save_pretrained(str(folder / "vae"))
    (folder / "scheduler").mkdir()
    scheduler = SPRINT_SCHEDULER if sprint else SANA_SCHEDULER
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {"_class_name": "SanaSprintPipeline" if sprint else "SanaPipeline", "_diffusers_version": "0.33.0.dev0",
             "scheduler": ["diffusers", scheduler["_class_name"]], "text_encoder": ["transformers", "Gemma2Model"],
             "tokenizer": ["transformers", "GemmaTokenizerFast"],
             "transformer": ["diffusers", "SanaTransformer2DModel"],
             "vae": ["diffusers", "AutoencoderDC"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
