"""Decoding-time compression on the embedded default model (SmolLM2-135M: GQA 9/3 heads, 30 layers).

The same masked dense reference as the tiny-model tests (``tests/test_decoding.py``): at every decoding step, the
logits under ``decoding`` equal those of the uncompressed model with each (layer, KV head) masked to what the
compressed cache stores, through several recompressions.
"""

from __future__ import annotations

import pytest
import torch

from kvsqueeze import adapter as A
from kvsqueeze import make_press
from kvsqueeze.needles import haystack
from kvsqueeze.presses.decoding import decoding_states

from test_decoding import decode_under, masked_dense_logits

pytestmark = pytest.mark.real_model


@pytest.mark.parametrize("inner", ["expected_attention", "knorm"])
def test_decoding_on_the_default_model_matches_the_masked_reference(inner, smollm):
    model, tokenizer = smollm
    ids = tokenizer(haystack(tokenizer, 600), return_tensors="pt").input_ids[:, :600]
    press = make_press("decoding", press=make_press(inner), budget=256, compression_interval=32,
                       hidden_states_buffer_size=64)
    tokens, logits, kept_before, recompressed, cache, report = decode_under(press, model, ids, steps=70)
    assert sum(recompressed) == report.decoding_compressions == 2  # after 32 and 64 appended tokens
    adapter = A.ModelAdapter(model)
    for i in adapter.compressible_layers:
        assert A.layer_physical_length(cache, i) == 256 + 70 - 64
        assert cache.layers[i].get_seq_length() == ids.shape[1] + 70
    shape = adapter.shape
    assert A.cache_nbytes(cache) == 2 * shape.num_layers * shape.num_key_value_heads * (256 + 6) * shape.head_dim * 4
    reference = masked_dense_logits(model, ids, tokens, kept_before)
    worst = max(float((ours - theirs).abs().max()) for ours, theirs in zip(logits, reference))
    print(f"\n{inner}: largest logit difference from the masked reference over 70 steps: {worst:.2e}")
    for step, (ours, theirs) in enumerate(zip(logits, reference)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-3, msg=f"step {step}: logits differ")
    assert len(decoding_states(cache)) == shape.num_layers
