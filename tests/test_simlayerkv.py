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
