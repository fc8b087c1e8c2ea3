"""CLIP vision tower and CLIP's image preprocessing: parity with transformers on the same saved files."""

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from convert.clip import load_clip, load_clip_vision
from convert.mapping import ConversionError
from nag_jax.clip_preprocess import CLIPImagePreprocessor
from tests.tiny_components import CLIP_VOCAB_SIZE, assert_close, save_clip_preprocessor_config, save_tiny_clip_model, \
    save_tiny_clip_vision

PIXELS = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)


def reference_outputs(model, pixels=PIXELS):
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(pixels), output_hidden_states=True)


@pytest.mark.parametrize("projection", [False, True])
def test_clip_vision_matches_transformers(tmp_path, projection):
    save_tiny_clip_vision(tmp_path, projection=projection, seed=1, hidden_act="gelu" if projection else "quick_gelu")
    cls = CLIPVisionModelWithProjection if projection else CLIPVisionModel
    reference = reference_outputs(cls.from_pretrained(tmp_path).eval())
    module, params = load_clip_vision(tmp_path)
    out = module.apply({"params": params}, PIXELS)

    assert_close(out.last_hidden_state, reference.last_hidden_state)
    assert len(out.hidden_states) == len(reference.hidden_states) == 4
    for ours, theirs in zip(out.hidden_states, reference.hidden_states):
        assert_close(ours, theirs)
    assert out.hidden_states[-2].shape == (2, 17, 32)  # Wan I2V's penultimate layer: class token + 4x4 patches
    if projection:
        assert_close(out.image_embeds, reference.image_embeds)
        assert out.image_embeds.shape == (2, 24)
    else:
        assert out.image_embeds is None
        assert_close(out.pooled, reference.pooler_output)


def test_clip_vision_accepts_transformers5_naming_and_rejects_mismatches(tmp_path):
    published, bare = tmp_path / "published", tmp_path / "bare"
    save_tiny_clip_vision(published, projection=False, seed=2)
    save_tiny_clip_vision(bare, projection=False, seed=2, published_naming=False)
    _, params_published = load_clip_vision(published)
    _, params_bare = load_clip_vision(bare)
    jax.tree.map(np.testing.assert_array_equal, params_published, params_bare)

    with_projection = tmp_path / "projection"
    save_tiny_clip_vision(with_projection, projection=True, seed=2)
    with pytest.raises(ConversionError, match="visual_projection.weight"):
        load_clip_vision(with_projection, projection=False)
    module, params = load_clip_vision(with_projection)
    with pytest.raises(ValueError, match=r"takes \[B, 3, 32, 32\]"):
        module.apply({"params": params}, PIXELS[:, :, :16])


def test_both_towers_of_a_full_clip_model(tmp_path):
    """A full CLIPModel folder: each loader reads its tower, with the top-level projection_dim."""
    model = save_tiny_clip_model(tmp_path, seed=3)
    ids = np.array([[CLIP_VOCAB_SIZE - 2, 320, 515, 518, CLIP_VOCAB_SIZE - 1, 0]], dtype=np.int32)
    with torch.no_grad():
        image_reference = model.get_image_features(pixel_values=torch.from_numpy(PIXELS)).pooler_output
        text_reference = model.get_text_features(input_ids=torch.from_numpy(ids).long()).pooler_output
    vision, vision_params = load_clip_vision(tmp_path)
    text, text_params = load_clip(tmp_path)
    assert_close(vision.apply({"params": vision_params}, PIXELS).image_embeds, image_reference)
    assert_close(text.apply({"params": text_params}, ids).text_embeds, text_reference)
    assert CLIPModel.from_pretrained(tmp_path) is not None  # the layout is one transformers reads


@pytest.mark.parametrize("size, shortest_edge", [((45, 61), 32), ((80, 50), 40), ((32, 32), 32)])
def test_clip_preprocessing_matches_transformers(tmp_path, size, shortest_edge):
    save_clip_preprocessor_config(tmp_path, 32, shortest_edge=shortest_edge)
    rng = np.random.default_rng(4)
    images = [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(2)]
    reference = CLIPImageProcessorPil.from_pretrained(tmp_path)(images=images, return_tensors="np")["pixel_values"]
    ours = CLIPImagePreprocessor.from_pretrained(tmp_path)(images)
    assert ours.shape == (2, 3, 32, 32)
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)
    # uint8 arrays are taken as well as PIL images
    np.testing.assert_array_equal(CLIPImagePreprocessor.from_pretrained(tmp_path)([np.asarray(images[0])]), ours[:1])
