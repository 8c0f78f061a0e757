"""Chunked prefill (``Pipeline.compress(..., prefill_chunk_size=N)``): the context in forward passes of N tokens.

Without a press the cache and the answers equal the one-pass prefill's. Under ``decoding`` with
``compression_interval = N`` every chunk is compressed after its forward pass, so no layer ever holds more than its
budget plus one chunk; each chunk's queries see exactly what the compressed cache stored (checked against the
uncompressed model with a per-(layer, KV head) mask), and at layer 0, whose keys do not depend on the cache,
KNorm's block-wise selection is the one-pass selection. Presses that compress once are refused.
"""

from __future__ import annotations

import pytest
import torch

from kvsqueeze import Pipeline, make_press
from kvsqueeze import adapter as A
from kvsqueeze.pipeline import _chunks
from kvsqueeze.presses.decoding import decoding_states

from conftest import build_tokenizer, token_ids
from test_decoding import masked_chunk_logits

MODELS = ("llama", "gemma3", "qwen3", "phi3")
#: A context of 60 tokens, as the tiny tokenizer reads it (longer than the tiny Gemma's sliding window of 8).
CONTEXT = " ".join(f"w{i % 7}" for i in range(20))


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_chunks_end_with_the_context_and_take_the_remainder_first():
    ids = torch.arange(10)[None]
    assert [c.shape[1] for c in _chunks(ids, 4)] == [2, 4, 4]
    assert [c.shape[1] for c in _chunks(ids, 5)] == [5, 5]
    assert [c.shape[1] for c in _chunks(ids, 1)] == [1] * 10
    assert [c.shape[1] for c in _chunks(ids, 10)] == [10] == [c.shape[1] for c in _chunks(ids, None)]
    assert torch.equal(torch.cat(_chunks(ids, 3), dim=1), ids)


@pytest.mark.parametrize("size", [1, 7, 16])
@pytest.mark.parametrize("model_name", MODELS)
def test_without_a_press_a_chunked_prefill_is_the_one_pass_prefill(model_name, size, tiny_model, tok):
    """Same stored keys and values (Gemma's sliding layers included), same bytes, same answer."""
    pipe = Pipeline(tiny_model(model_name), tok)
    one = pipe.compress(CONTEXT)
    chunked = pipe.compress(CONTEXT, prefill_chunk_size=size)
    assert chunked.prefill_chunk_size == size and one.prefill_chunk_size is None
    for i in range(len(one.cache.layers)):
        k1, v1 = one.cache.layers[i].keys, one.cache.layers[i].values
        k2, v2 = chunked.cache.layers[i].keys, chunked.cache.layers[i].values
        assert k1.shape == k2.shape, f"layer {i}"
        torch.testing.assert_close(k2, k1, rtol=1e-4, atol=1e-5, msg=f"layer {i} keys")
        torch.testing.assert_close(v2, v1, rtol=1e-4, atol=1e-5, msg=f"layer {i} values")
    assert chunked.cache_bytes == one.cache_bytes and chunked.full_cache_bytes == one.full_cache_bytes
    assert chunked.answer("Which word?", max_new_tokens=6) == one.answer("Which word?", max_new_tokens=6)


def _prefill_by_hand(press, model, ids: torch.Tensor, size: int):
    """The chunks under ``press``, recording before each chunk the stored positions of every compressible layer and
    after its forward pass (before any recompression) the largest stored count; returns the last logits."""
    adapter = A.ModelAdapter(model)
    cache = adapter.new_cache()
    kwargs = adapter.model_call_kwargs(cache)
    kept_before, peaks = [], []

    def measure(module, args, kwargs_, output):  # registered before the press's own hook: runs first
        peaks.append(max(A.layer_physical_length(cache, i) for i in adapter.compressible_layers))

    handle = adapter.decoder.register_forward_hook(measure, with_kwargs=True)
    try:
        with torch.inference_mode(), press(model) as report:
            for chunk in _chunks(ids, size):
                kept_before.append({i: s.positions.clone() for i, s in decoding_states(cache).items()})
                logits = model(input_ids=chunk, use_cache=True, **kwargs).logits[:, -1]
    finally:
        handle.remove()
    return logits, kept_before, peaks, cache, report


@pytest.mark.parametrize("inner", ["knorm", "expected_attention", "keydiff"])
@pytest.mark.parametrize("model_name", MODELS)
def test_each_chunk_sees_exactly_what_the_compressed_cache_stored(model_name, inner, tiny_model):
    """Block-wise prefill under ``decoding(budget 12, interval 8)`` in chunks of 8: the last logits equal the
    uncompressed model's with each chunk's attention masked to the stored entries; the cache holds the budget at
    the end and never more than budget + chunk."""
    model = tiny_model(model_name)
    inner_press = make_press(inner, **({"n_future_positions": 16, "n_sink": 2} if inner == "expected_attention" else {}))
    press = make_press("decoding", press=inner_press, budget=12, compression_interval=8, hidden_states_buffer_size=8)
    ids = torch.randint(4, 128, (1, 45), generator=torch.Generator().manual_seed(3))  # chunks 5, 8, 8, 8, 8, 8
    logits, kept_before, peaks, cache, report = _prefill_by_hand(press, model, ids, 8)
    assert report.decoding_compressions == 5
    assert max(peaks) == 12 + 8 and peaks[0] == 5
    for i in A.ModelAdapter(model).compressible_layers:
        assert A.layer_physical_length(cache, i) == 12 and A.layer_logical_length(cache, i) == 45
    reference = masked_chunk_logits(model, _chunks(ids, 8), kept_before)[-1]
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_name", ["llama", "qwen3"])
def test_layer_zero_keeps_the_one_pass_knorm_selection(model_name, tiny_model):
    """Layer 0's keys depend on the token and its position only, so block-wise top-b by key norm must end with the
    global top-b: exactly what one-pass KNorm at the same budget keeps (distinct tokens: no tied norms)."""
    from kvsqueeze.record import record_prefill

    model = tiny_model(model_name)
    ids = token_ids(60, seed=4)
    press = make_press("decoding", press=make_press("knorm"), budget=16, compression_interval=8)
    _, _, _, cache, _ = _prefill_by_hand(press, model, ids, 8)
    layer = record_prefill(model, ids).layers[A.ModelAdapter(model).compressible_layers[0]]
    want = make_press("knorm", budget=16).keep_indices(layer)
    assert decoding_states(cache)[layer.layer_idx].positions.tolist() == want.tolist()


def test_a_chunked_context_answers_repeatably_and_reports_the_one_pass_bytes(tiny_model, tok):
    """The context is unchanged by answering; ``full_cache_bytes`` are those of the one-pass uncompressed prefill,
    ``cache_bytes`` the ⌊(1 − r)·n⌋ entries per layer the ratio form keeps at the end."""
    model = tiny_model("llama")
    pipe = Pipeline(model, tok)
    press = make_press("decoding", press=make_press("knorm"), compression_ratio=0.5, compression_interval=8)
    ctx = pipe.compress(CONTEXT, press, prefill_chunk_size=8)
    n = ctx.n_tokens
    assert ctx.layer_lengths == [n // 2] * len(ctx.layer_lengths)
    assert ctx.full_cache_bytes == pipe.compress(CONTEXT).cache_bytes
    assert ctx.cache_bytes * n == ctx.full_cache_bytes * (n // 2)
    assert ctx.measured_ratio == 1 - (n // 2) / n
    before = [layer.keys.clone() for layer in ctx.cache.layers]
    first = ctx.answer("Which word?", max_new_tokens=5)
    assert ctx.answer("Which word?", max_new_tokens=5) == first
    assert all(torch.equal(b, layer.keys) for b, layer in zip(before, ctx.cache.layers))


def test_a_press_that_compresses_once_is_refused_with_chunks(tiny_model, tok):
    pipe = Pipeline(tiny_model("llama"), tok)
    with pytest.raises(ValueError, match=r"KnormPress compresses once.*prefill_chunk_size=8.*'decoding'") as info:
        pipe.compress(CONTEXT, make_press("knorm", compression_ratio=0.5), prefill_chunk_size=8)
    assert "compression_interval=8" in str(info.value)
    # one chunk is a one-pass prefill: any press
    assert pipe.compress(CONTEXT, make_press("knorm", compression_ratio=0.5), prefill_chunk_size=500).layer_lengths


@pytest.mark.parametrize("size, error", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)])
def test_bad_chunk_sizes_are_refused_before_the_prefill(size, error, tiny_model, tok):
    pipe = Pipeline(tiny_model("llama"), tok)
    with pytest.raises(error, match="prefill_chunk_size"):
        pipe.compress(CONTEXT, prefill_chunk_size=size)


@pytest.mark.parametrize("model_name", ["llama", "gemma3"])
def test_generate_with_a_chunked_prefill_under_decoding_compresses_every_chunk(model_name, tiny_model):
    """transformers' own chunked prefill (``generate(prefill_chunk_size=8)``: chunks of 8 from the start) under a
    decoding press gives the tokens of the same chunks fed by hand, and never holds more than budget + chunk; a
    press that compresses once still refuses it (only the first chunk would be compressed)."""
    model = tiny_model(model_name)
    ids = token_ids(45, seed=6)
    press = make_press("decoding", press=make_press("knorm"), budget=12, compression_interval=8)
    adapter = A.ModelAdapter(model)
    peaks = []

    def measure(module, args, kwargs_, output):
        cache = adapter.cache_from_call(kwargs_) or adapter.cache_from_output(output)
        peaks.append(max(A.layer_physical_length(cache, i) for i in adapter.compressible_layers))

    handle = adapter.decoder.register_forward_hook(measure, with_kwargs=True)
    try:
        with torch.inference_mode(), press(model) as report:
            out = model.generate(ids, max_new_tokens=5, do_sample=False, prefill_chunk_size=8)
    finally:
        handle.remove()
    assert report.decoding_compressions >= 5 and max(peaks) <= 12 + 8

    cache = adapter.new_cache()
    kwargs = adapter.model_call_kwargs(cache)
    tokens = []
    with torch.inference_mode(), press(model):
        for start in range(0, 45, 8):  # chunks of 8 from the start, the remainder last (transformers' split)
            logits = model(input_ids=ids[:, start:start + 8], use_cache=True, **kwargs).logits[:, -1]
        for _ in range(5):
            tokens.append(int(logits[0].argmax()))
            logits = model(input_ids=torch.tensor([tokens[-1:]]), use_cache=True, **kwargs).logits[:, -1]
    assert out[0, 45:].tolist() == tokens

    with torch.inference_mode(), make_press("knorm", budget=12)(model), pytest.raises(ValueError, match="chunk"):
        model.generate(ids, max_new_tokens=2, do_sample=False, prefill_chunk_size=8)


def test_a_window_longer_than_the_budget_and_a_longer_interval(tiny_model, tok):
    """SnapKV's 16-token window over a 4-entry budget shrinks to what is stored instead of failing mid-prefill; an
    interval longer than the chunk works but says the cache is not compressed after every chunk."""
    pipe = Pipeline(tiny_model("llama"), tok)
    press = make_press("decoding", press=make_press("snapkv", window_size=16), budget=4, compression_interval=4,
                       hidden_states_buffer_size=16)
    assert pipe.compress(CONTEXT, press, prefill_chunk_size=4).layer_lengths[0] == 4
    press = make_press("decoding", press=make_press("knorm"), budget=10, compression_interval=16)
    with pytest.warns(UserWarning, match="compression_interval=16 is longer than prefill_chunk_size=8"):
        ctx = pipe.compress(CONTEXT, press, prefill_chunk_size=8)
    assert max(ctx.layer_lengths) <= 10 + 16
