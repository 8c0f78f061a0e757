"""SimLayerKV's lazy-layer decision against the attention weights the model itself computed (eager).

The press matrix runs SimLayerKV with threshold 0 (every layer lazy); here thresholds are placed just below and
just above each layer's measured attention mass, so both branches (lazy: sinks + recent only; not lazy: keep
everything) are exercised on every layer, and the decision is checked against an independent computation.
"""

from __future__ import annotations

import pytest
import torch

from conftest import MODEL_NAMES, token_ids
from kvsqueeze import make_press
from kvsqueeze.adapter import layer_kv
from kvsqueeze.record import record_prefill

from ragged_reference import masked_dense_logits

SEQ_LEN, N_INITIAL, N_LAST, RATIO = 48, 4, 4, 0.5


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_lazy_layers_follow_the_models_attention(model_name, tiny_model, single_thread):
    recorded = record_prefill(tiny_model(model_name, "eager"), token_ids(SEQ_LEN, seed=3), keep_attentions=True)
    n_kept = make_press("simlayerkv", compression_ratio=RATIO).n_kept(SEQ_LEN)
    positions = [*range(N_INITIAL), *range(SEQ_LEN - (n_kept - N_INITIAL), SEQ_LEN)]
    # The paper's criterion from the model's own weights: mean over heads and the last queries of the attention
    # on the sinks and the recent window.
    mass = {layer.layer_idx: float(layer.attentions[0, :, -N_LAST:, positions].sum(-1).mean())
            for layer in recorded.layers}
    thresholds = sorted({min(max(m + d, 0.0), 1.0) for m in mass.values() for d in (-1e-4, 1e-4)})
    seen = set()
    for threshold in thresholds:
        press = make_press("simlayerkv", compression_ratio=RATIO, lazy_threshold=threshold,
                           n_last=N_LAST, n_initial=N_INITIAL)
        cache, _ = recorded.compress(press)
        for layer in recorded.layers:
            i = layer.layer_idx
            keys, values = layer_kv(cache, i)
            lazy = mass[i] >= press.lazy_threshold
            seen.add(lazy)
            want = positions if lazy else list(range(SEQ_LEN))
            assert torch.equal(keys, layer.keys[:, :, want]), f"layer {i}, threshold {threshold:.4f}, mass {mass[i]:.4f}"
            assert torch.equal(values, layer.values[:, :, want])
    assert seen == {True, False}, "both branches must be exercised"


@pytest.mark.parametrize("model_name", [m for m in MODEL_NAMES if m != "gemma3"])  # gemma3: one full layer only
def test_mixed_lazy_layers_generate_like_the_masked_reference(model_name, tiny_model, single_thread):
    """With a threshold between the layers' masses, some layers are lazy and keep only sinks and recent entries,
    the others keep everything: the layers store different counts, which ``model.generate`` under the press must
    decode exactly like the uncompressed model with each layer's evicted entries hidden."""
    model = tiny_model(model_name, "eager")
    ids = token_ids(SEQ_LEN, seed=3)
    recorded = record_prefill(model, ids, keep_attentions=True)
    n_kept = make_press("simlayerkv", compression_ratio=RATIO).n_kept(SEQ_LEN)
    positions = [*range(N_INITIAL), *range(SEQ_LEN - (n_kept - N_INITIAL), SEQ_LEN)]
    mass = sorted(float(layer.attentions[0, :, -N_LAST:, positions].sum(-1).mean()) for layer in recorded.layers)
    threshold = (mass[0] + mass[-1]) / 2
    assert mass[0] < threshold < mass[-1]
    press = make_press("simlayerkv", compression_ratio=RATIO, lazy_threshold=threshold, n_last=N_LAST,
                       n_initial=N_INITIAL)
    with torch.inference_mode(), press(model) as report:
        out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    assert set(report.kept.values()) == {float(n_kept), float(SEQ_LEN)}, report.kept  # lazy and full layers both
    keep = {}
    for layer in recorded.layers:
        lazy = report.kept[layer.layer_idx] == n_kept
        mask = torch.zeros(1, layer.keys.shape[1], SEQ_LEN, dtype=torch.bool)
        mask[..., positions if lazy else slice(None)] = True
        keep[layer.layer_idx] = mask
    generated = out.sequences[:, SEQ_LEN:]
    # (the reference's boolean 4-D masks need sdpa; the sdpa model has the same weights)
    want = masked_dense_logits(tiny_model(model_name), ids, keep, generated[:, :-1])  # after each generated token
    got = torch.stack(out.logits[1:], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
