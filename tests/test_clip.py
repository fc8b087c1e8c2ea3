"""CLIP text encoder: parity with transformers on the same saved files, both key namings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from convert.clip import load_clip
from convert.mapping import ConversionError
from tests.tiny_components import CLIP_VOCAB_SIZE, assert_close, save_tiny_clip

BOS, EOS = CLIP_VOCAB_SIZE - 2, CLIP_VOCAB_SIZE - 1
# "a photo of a cat" and "a dog" + bytes as the tiny tokenizer gives them; EOS-padded and "!"-padded.
IDS = np.array([[BOS, 320, 515, 518, 320, 517, EOS, EOS, EOS, EOS],
                [BOS, 320, 520, 256, 9, 40, EOS, 0, 0, 0]], dtype=np.int32)


def reference_outputs(model):
    with torch.no_grad():
        return model(torch.from_numpy(IDS).long(), output_hidden_states=True)


@pytest.mark.parametrize("projection", [False, True])
def test_clip_matches_transformers(tmp_path, projection):
    save_tiny_clip(tmp_path, projection=projection, seed=1)
    # The reference is what transformers itself reads back from the published layout.
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    reference_model = cls.from_pretrained(tmp_path).eval()
    reference = reference_outputs(reference_model)
    module, params = load_clip(tmp_path)
    out = module.apply({"params": params}, IDS)

    assert_close(out.last_hidden_state, reference.last_hidden_state)
    assert len(out.hidden_states) == len(reference.hidden_states) == 4
    assert_close(out.hidden_states[-2], reference.hidden_states[-2])  # SDXL's penultimate layer
    assert_close(out.hidden_states[0], reference.hidden_states[0])
    if projection:
        assert_close(out.text_embeds, reference.text_embeds)
        assert out.text_embeds.shape == (2, 24)
    else:
        assert out.text_embeds is None
        assert_close(out.pooled, reference.pooler_output)
    # clip_skip as SD1.5 does it: an earlier layer through the final LayerNorm.
    skipped = module.apply({"params": params}, out.hidden_states[-2], method="final_norm")
    text_model = getattr(reference_model, "text_model", reference_model)  # transformers 5 drops the wrapper
    with torch.no_grad():
        assert_close(skipped, text_model.final_layer_norm(reference.hidden_states[-2]))


def test_clip_pooling_by_eos_id(tmp_path):
    """Configs after transformers PR 24773 pool at the first eos id, not at the largest id."""
    model = save_tiny_clip(tmp_path, seed=2, eos_token_id=300)
    # Larger ids than the eos id (300) around it, and a second eos: the first one counts.
    ids = np.array([[BOS, 400, 300, 510, 300, 0], [BOS, 300, EOS, EOS, 12, 300]], dtype=np.int32)
    with torch.no_grad():
        reference = model(torch.from_numpy(ids).long())
    module, params = load_clip(tmp_path)
    assert_close(module.apply({"params": params}, ids).pooled, reference.pooler_output)


def test_clip_accepts_transformers5_naming_and_rejects_foreign_keys(tmp_path):
    published, bare = tmp_path / "published", tmp_path / "bare"
    save_tiny_clip(published, projection=True, seed=3)
    save_tiny_clip(bare, projection=True, seed=3, published_naming=False)
    _, params_published = load_clip(published)
    module, params_bare = load_clip(bare)
    jax.tree.map(np.testing.assert_array_equal, params_published, params_bare)
    out_a = module.apply({"params": params_published}, IDS)
    out_b = module.apply({"params": params_bare}, IDS)
    np.testing.assert_array_equal(np.asarray(out_a.text_embeds), np.asarray(out_b.text_embeds))

    # A projection-less model cannot take a checkpoint with a projection: a strict error.
    with pytest.raises(ConversionError, match="text_projection.weight"):
        load_clip(published, projection=False)


def test_clip_bfloat16_runs_close_to_float32(tmp_path):
    save_tiny_clip(tmp_path, seed=4)
    module32, params32 = load_clip(tmp_path)
    module16, params16 = load_clip(tmp_path, dtype="bfloat16")
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params16))
    out32 = module32.apply({"params": params32}, IDS).last_hidden_state
    out16 = module16.apply({"params": params16}, IDS).last_hidden_state
    assert out16.dtype.name == "bfloat16"
    assert np.isfinite(np.asarray(out16, np.float32)).all()
    assert_close(out16, np.asarray(out32), tol=5e-2)


def test_clip_rejects_unknown_activation():
    from models.clip import CLIPTextConfig

    with pytest.raises(ValueError, match="hidden_act='relu'"):
        CLIPTextConfig.from_dict({"hidden_act": "relu"})
