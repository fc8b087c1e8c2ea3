"""T5 encoder: parity with transformers' T5EncoderModel on the same saved files."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import T5EncoderModel

from convert.t5 import load_t5
from models.t5 import relative_position_buckets
from tests.tiny_components import assert_close, save_tiny_t5

# Long enough (30 tokens) that offsets reach the logarithmic buckets and max_distance (20).
IDS = np.array([[3, 31, 35, 5, 13, 9, 18, 3, 23, 10, 5, 4, 44, 7, 46, 6, 10, 21, 22, 40, 41, 3, 5, 8, 9, 12, 1, 0, 0, 0],
                [4, 5, 6, 1] + [0] * 26], dtype=np.int32)


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    offsets = torch.arange(40)[None, :] - torch.arange(40)[:, None]
    reference = T5Attention._relative_position_bucket(offsets, bidirectional=True, num_buckets=32, max_distance=16)
    np.testing.assert_array_equal(np.asarray(relative_position_buckets(40, 40, 32, 16)), reference.numpy())


def test_t5_sharded_matches_transformers(tmp_path):
    save_tiny_t5(tmp_path, seed=1, sharded=True, tied_embed_tokens=True)
    assert (tmp_path / "model.safetensors.index.json").exists()
    reference_model = T5EncoderModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        reference = reference_model(torch.from_numpy(IDS).long()).last_hidden_state
        mask = torch.from_numpy((IDS != 0).astype(np.int64))
        mask[:, 0] = 1
        reference_masked = reference_model(torch.from_numpy(IDS).long(), attention_mask=mask).last_hidden_state
    module, params = load_t5(tmp_path)
    run = jax.jit(module.apply)
    assert_close(run({"params": params}, IDS), reference)
    assert_close(run({"params": params}, IDS, mask.numpy().astype(np.int32)), reference_masked)
    # The mask must matter, or the masked comparison above proves nothing.
    assert float((reference - reference_masked).abs().max()) > 1e-2


def test_t5_only_embed_tokens_and_bfloat16(tmp_path):
    """A file holding only `encoder.embed_tokens.weight` loads; bf16 params stay close to float32."""
    from safetensors.numpy import load_file, save_file

    save_tiny_t5(tmp_path, seed=2)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
    save_file(tensors, str(tmp_path / "model.safetensors"))

    module32, params32 = load_t5(tmp_path)
    module16, params16 = load_t5(tmp_path, dtype="bfloat16")
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params16))
    out32 = jax.jit(module32.apply)({"params": params32}, IDS)
    out16 = jax.jit(module16.apply)({"params": params16}, IDS)
    assert out16.dtype == jnp.bfloat16
    with torch.no_grad():
        reference = T5EncoderModel.from_pretrained(tmp_path).eval()(torch.from_numpy(IDS).long()).last_hidden_state
    assert_close(out32, reference)
    assert_close(out16, out32, tol=5e-2)
