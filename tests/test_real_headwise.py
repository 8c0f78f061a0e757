"""Head-wise budgets on the embedded default model (SmolLM2-135M, 30 layers, 9 query / 3 KV heads).

* Decoding from a ragged cache gives the same greedy tokens (and logits within float32 tolerance) as dense
  attention over the uncompressed cache with the evicted entries masked.
* The ragged cache really frees memory: measured bytes / uncompressed bytes <= (1 - r) + 0.02 at 4k tokens.
"""

from __future__ import annotations

import pytest
import torch

import kvsqueeze
from kvsqueeze import adapter as A
from kvsqueeze.needles import haystack, needle_cases

from ragged_reference import masked_dense_decode, masked_dense_logits, ragged_decode

pytestmark = pytest.mark.real_model


def _headwise_presses(ratio: float) -> dict[str, kvsqueeze.Press]:
    make = kvsqueeze.make_press
    return {
        "adakv(expected_attention)": make("adakv", press=make("expected_attention"), compression_ratio=ratio),
        "critical_adakv": make("critical_adakv", compression_ratio=ratio),
    }


@pytest.mark.parametrize("name", ["adakv(expected_attention)", "critical_adakv"])
def test_ragged_decoding_equals_masked_dense_on_the_default_model(smollm, name):
    model, tokenizer = smollm
    pipe = kvsqueeze.Pipeline(model, tokenizer)
    case = needle_cases(tokenizer, n_cases=1, n_tokens=1000, seed=3)[0]
    ids = pipe.context_ids(case.context)
    question = pipe.question_ids(case.question, case.answer_prefix)
    press = _headwise_presses(0.5)[name]
    recorded = pipe.record(case.context)
    cache, _ = recorded.compress(press)
    keep = {layer.layer_idx: press.keep_mask(layer) for layer in recorded.layers}
    ragged = [i for i in keep if A.is_ragged_layer(cache, i)]
    assert len(ragged) >= len(keep) // 2, f"only layers {ragged} are ragged"
    adapter = A.ModelAdapter(model)
    with torch.inference_mode(), A.ragged_attention(model):
        logits = model(input_ids=question, use_cache=True, **adapter.model_call_kwargs(A.fork_cache(cache))).logits
    torch.testing.assert_close(logits, masked_dense_logits(model, ids, keep, question), rtol=1e-4, atol=1e-4)
    got = ragged_decode(model, A.fork_cache(cache), question, 20)
    want = masked_dense_decode(model, ids, keep, question, 20)
    assert got == want, f"{tokenizer.decode(got[0])!r} vs {tokenizer.decode(want[0])!r}"


@pytest.fixture(scope="module")
def recorded_4k(smollm):
    model, tokenizer = smollm
    pipe = kvsqueeze.Pipeline(model, tokenizer)
    text = haystack(tokenizer, 4000, seed=0)
    recorded = pipe.record(text)
    assert 3900 <= recorded.n_tokens <= 4200
    return pipe, recorded, text


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_headwise_memory_is_really_freed_at_4k(recorded_4k, smollm_duo_artifact, ratio, capsys):
    pipe, recorded, text = recorded_4k
    full = A.cache_nbytes(recorded.cache)
    lines = []
    presses = _headwise_presses(ratio)
    presses["duo_attention"] = kvsqueeze.make_press("duo_attention", compression_ratio=ratio, artifact=str(smollm_duo_artifact))
    presses["kvzip"] = kvsqueeze.make_press("kvzip", compression_ratio=ratio)
    for name, press in presses.items():
        if press.capabilities.extra_passes:  # KVzip: its own prefill and reconstruction passes
            ctx = pipe.compress(text, press)
        else:
            ctx = pipe.from_recorded(recorded, press)
        measured = ctx.cache_bytes / full
        lines.append(f"{name} r={ratio}: {ctx.cache_bytes} / {full} bytes = {measured:.4f}")
        assert ctx.full_cache_bytes == full
        assert measured <= (1 - ratio) + 0.02, lines[-1]
        assert any(A.is_ragged_layer(ctx.cache, i) for i in pipe.adapter.compressible_layers), name
    with capsys.disabled():
        print("\n" + "\n".join(lines))
