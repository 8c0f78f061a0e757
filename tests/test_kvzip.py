"""KVzip (arXiv 2505.23416): reconstruction scores, global eviction, the press life cycle and the context cache."""

from __future__ import annotations

import pytest
import torch

import kvsqueeze
from kvsqueeze import adapter as A
from kvsqueeze.record import record_prefill

from conftest import MODEL_NAMES, build_model, build_tokenizer, hook_counts, prefill, token_ids

pytestmark = pytest.mark.usefixtures("single_thread")

TOKENIZER = build_tokenizer()


def _press(**kwargs):
    kwargs.setdefault("tokenizer", TOKENIZER)
    return kvsqueeze.make_press("kvzip", **kwargs)


def _kept_positions(cache, base, layer_idx: int) -> list[list[list[int]]]:
    """Original positions kept by each (row, head) of one layer, found by exact value-row matches."""
    _, values = A.layer_kv(base, layer_idx)
    _, packed, lengths = A.layer_entries(cache, layer_idx)  # any layout, one segment per (row, head)
    segments = packed.split(lengths.reshape(-1).tolist())
    out = []
    for b in range(values.shape[0]):
        row = []
        for h in range(values.shape[1]):
            kept = segments[b * values.shape[1] + h]
            eq = (kept[:, None] == values[b, h][None]).all(-1)  # (n_kept, L)
            assert (eq.sum(-1) == 1).all(), "a kept entry is not exactly one original context entry"
            row.append(eq.float().argmax(-1).tolist())
        out.append(row)
    return out


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_kept_total_is_exact_and_sinks_are_kept(model_name, ratio, layerwise, tiny_model):
    model = tiny_model(model_name)
    adapter = A.ModelAdapter(model)
    seq_len = 57
    ids = token_ids(seq_len, seed=1)
    press = _press(compression_ratio=ratio, layerwise=layerwise, chunk_size=20)
    base, _, _ = prefill(model, ids)
    cache, report, _ = prefill(model, ids, press)
    full = adapter.compressible_layers
    n_kv = adapter.shape.num_key_value_heads
    n_kept = press.n_kept(seq_len)
    per_layer = {i: int(A.layer_head_lengths(cache, i).sum()) for i in full}
    assert sum(per_layer.values()) == n_kept * n_kv * len(full)
    if layerwise:
        assert set(per_layer.values()) == {n_kept * n_kv}
    for i in full:
        positions = _kept_positions(cache, base, i)
        for h, kept in enumerate(positions[0]):
            assert kept == sorted(kept), "kept entries stay in positional order"
            assert set(range(min(4, n_kept))) <= set(kept), f"layer {i} head {h}: sinks dropped"
        assert cache.layers[i].get_seq_length() == seq_len
    assert report.measured_ratio == pytest.approx(1 - n_kept / seq_len)


def test_global_eviction_gives_non_uniform_layers(tiny_model):
    """Across layers (not per layer) the lowest scores go: the layers of the tiny Llama end up with different
    budgets, and every kept score is at least every evicted score (sinks aside)."""
    model = tiny_model("llama")
    adapter = A.ModelAdapter(model)
    ids = token_ids(60, seed=2)
    press = _press(compression_ratio=0.5)
    base, _, _ = prefill(model, ids)
    with torch.inference_mode():
        scores = press.scores(adapter, ids, base)
    cache, _, _ = prefill(model, ids, press)
    totals = [int(A.layer_head_lengths(cache, i).sum()) for i in adapter.compressible_layers]
    assert len(set(totals)) > 1, totals
    kept_scores, dropped_scores = [], []
    for i in adapter.compressible_layers:
        positions = _kept_positions(cache, base, i)[0]
        for h, kept in enumerate(positions):
            s = scores[i][0, h]
            mask = torch.zeros(60, dtype=torch.bool)
            mask[kept] = True
            mask[:4] = False  # sinks are kept whatever their score
            kept_scores.append(s[mask])
            dropped = torch.ones(60, dtype=torch.bool)
            dropped[kept] = False
            dropped_scores.append(s[dropped])
    assert torch.cat(kept_scores).min() >= torch.cat(dropped_scores).max()


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_scores_match_eager_attention_of_the_repeated_context(model_name, tiny_model):
    """With one chunk, the score of a context entry is the max eager attention weight it gets from the repeat
    tokens (prompt + context) in one uncompressed forward of context + repeat, over the query heads of its group."""
    model = tiny_model(model_name)
    eager = build_model(model_name, "eager")
    adapter = A.ModelAdapter(model)
    ids = token_ids(40, seed=3)
    press = _press(compression_ratio=0.5)
    base, _, _ = prefill(model, ids)
    with torch.inference_mode():
        scores = press.scores(adapter, ids, base)
        (repeat,) = press.chunks(model, ids)
        out = eager(input_ids=torch.cat([ids, repeat], dim=1), output_attentions=True, use_cache=False)
    groups = adapter.shape.num_attention_heads // adapter.shape.num_key_value_heads
    for i in adapter.compressible_layers:
        att = out.attentions[i][:, :, 40:, :40]  # (1, heads, repeat, context)
        want = att.amax(dim=2).view(1, adapter.shape.num_key_value_heads, groups, 40).amax(dim=2)
        torch.testing.assert_close(scores[i], want, rtol=1e-4, atol=1e-6)


def test_later_chunks_continue_from_the_previous_chunk():
    press = _press(chunk_size=10, n_overlap=3)
    ids = token_ids(25, seed=4)
    model = build_model("llama")
    chunks = press.chunks(model, ids)
    first = TOKENIZER(press.repeat_prompt, add_special_tokens=False).input_ids
    cont = TOKENIZER(press.continue_prompt, add_special_tokens=False).input_ids
    assert len(chunks) == 3
    assert chunks[0][0].tolist() == first + ids[0, :10].tolist()
    assert chunks[1][0].tolist() == cont + ids[0, 7:20].tolist()
    assert chunks[2][0].tolist() == cont + ids[0, 17:25].tolist()


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_context_cache_holds_only_context_entries(model_name, tiny_model):
    """The reconstruction runs on forks: the context cache keeps its logical length and only context entries."""
    model = tiny_model(model_name)
    adapter = A.ModelAdapter(model)
    ids = token_ids(50, seed=5)
    base, _, _ = prefill(model, ids)
    press = _press(compression_ratio=0.25, chunk_size=16)
    cache, _, _ = prefill(model, ids, press)
    assert cache.get_seq_length() == 50
    for i, layer in enumerate(cache.layers):
        assert layer.get_seq_length() == 50, f"layer {i}"
        if i in adapter.compressible_layers:
            _kept_positions(cache, base, i)  # every kept entry is one of the context's
            assert A.layer_head_lengths(cache, i).max() <= 50
        else:  # sliding-window layers: exactly the uncompressed prefill's
            k, v = A.layer_kv(cache, i)
            kb, vb = A.layer_kv(base, i)
            assert torch.equal(k, kb) and torch.equal(v, vb)


def _pipeline_context(model_name, tiny_model, press):
    model = tiny_model(model_name)
    pipe = kvsqueeze.Pipeline(model, TOKENIZER)
    text = "The magic number is 42. " + "Some filler text goes here, again and again. " * 3
    return model, pipe, pipe.compress(text, press)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_cache_unchanged_after_answering(model_name, tiny_model):
    # chunks of 24: the tiny models' 256 positions must hold the context and each reconstruction chunk after it
    model, pipe, ctx = _pipeline_context(model_name, tiny_model, _press(compression_ratio=0.5, chunk_size=24))
    assert any(A.is_ragged_layer(ctx.cache, i) for i in range(len(ctx.cache.layers)))
    snapshot = [tuple(t.clone() for t in A.layer_entries(ctx.cache, i)) for i in range(len(ctx.cache.layers))]
    lengths = [layer.get_seq_length() for layer in ctx.cache.layers]
    first = [ctx.answer("What is the magic number?", max_new_tokens=6) for _ in range(2)]
    ctx.answer("Something else?", max_new_tokens=4)
    assert first[0] == first[1]
    assert [layer.get_seq_length() for layer in ctx.cache.layers] == lengths == [ctx.n_tokens] * len(lengths)
    for i, saved in enumerate(snapshot):  # every stored entry (packed context and appended tail), any layout
        assert all(torch.equal(a, b) for a, b in zip(A.layer_entries(ctx.cache, i), saved)), f"layer {i}"


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_generate_inside_the_block_equals_the_pipeline(model_name, tiny_model):
    press = _press(compression_ratio=0.5, chunk_size=24)  # within the tiny models' 256 positions
    model, pipe, ctx = _pipeline_context(model_name, tiny_model, press)
    question = "What is the magic number?"
    want = ctx.generate_ids(question, max_new_tokens=8)
    n_ctx = ctx.n_tokens
    ids = torch.cat([_ctx_ids(pipe), pipe.question_ids(question)], dim=1)
    adapter = A.ModelAdapter(model)
    cache = adapter.new_cache()
    with torch.inference_mode(), press(model) as report:
        model(input_ids=ids[:, :n_ctx], use_cache=True, logits_to_keep=1, **adapter.model_call_kwargs(cache))
        out = model.generate(
            ids, max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=0, **adapter.model_call_kwargs(cache)
        )
    got = out[0, ids.shape[1] :].tolist()
    got = got[: got.index(2)] if 2 in got else got
    assert got == want
    assert report.kept == ctx.report.kept


def _ctx_ids(pipe):
    return pipe.context_ids("The magic number is 42. " + "Some filler text goes here, again and again. " * 3)


def test_generate_alone_compresses_its_prompt(tiny_model):
    """``with press(model): model.generate(ids)`` compresses the prompt at the end of generate's prefill."""
    model = tiny_model("llama")
    press = _press(compression_ratio=0.5)
    ids = token_ids(40, seed=6)
    with torch.inference_mode(), press(model) as report:
        out = model.generate(
            ids, max_new_tokens=5, do_sample=False, eos_token_id=2, pad_token_id=0, return_dict_in_generate=True
        )
    cache = A.ModelAdapter.cache_from_output(out)
    assert report.measured_ratio == pytest.approx(0.5)
    assert any(A.is_ragged_layer(cache, i) for i in range(len(cache.layers)))
    assert cache.get_seq_length() == out.sequences.shape[1] - 1  # the last token is never fed back


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("model_name", ["llama", "qwen3"])
def test_measured_bytes_follow_ratio(model_name, ratio, tiny_model):
    model = tiny_model(model_name)
    adapter = A.ModelAdapter(model)
    ids = token_ids(150, seed=7)
    base, _, _ = prefill(model, ids)
    cache, _, _ = prefill(model, ids, _press(compression_ratio=ratio, chunk_size=32))  # within 256 positions
    full = adapter.compressible_layers
    before = sum(A.layer_nbytes(base, i) for i in full)
    after = sum(A.layer_nbytes(cache, i) for i in full)
    assert after <= ((1 - ratio) + 0.02) * before, (after / before, ratio)


def test_ratio_zero_runs_no_reconstruction_and_is_bit_identical(tiny_model):
    model = tiny_model("qwen3")
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        ids = token_ids(30, seed=8)
        base, _, _ = prefill(model, ids)
        calls.clear()
        cache, report, _ = prefill(model, ids, _press())
    finally:
        handle.remove()
    assert len(calls) == 1
    for i in range(len(cache.layers)):
        k, v = A.layer_kv(cache, i)
        kb, vb = A.layer_kv(base, i)
        assert torch.equal(k, kb) and torch.equal(v, vb)
    assert report.measured_ratio == 0.0


def test_hooks_removed_and_recorded_prefill_refused(tiny_model):
    model = tiny_model("llama")
    before = hook_counts(model)
    press = _press(compression_ratio=0.5)
    with pytest.raises(RuntimeError, match="boom"):
        with press(model):
            raise RuntimeError("boom")
    assert hook_counts(model) == before
    recorded = record_prefill(model, token_ids(20, seed=9))
    with pytest.raises(ValueError, match="recorded prefill"):
        recorded.compress(press)
    with pytest.raises(NotImplementedError, match="reconstruction"):
        press.compress(recorded.layers[0])


def test_missing_tokenizer_is_explained(tiny_model):
    press = kvsqueeze.make_press("kvzip", compression_ratio=0.5)
    with pytest.raises(ValueError, match=r"tokenizer=tokenizer"):
        with press(tiny_model("llama")):
            pass


def test_reconstruction_past_the_models_positions_is_refused():
    """The reconstruction chunks run after the context; past ``max_position_embeddings`` they are refused before any
    pass, and the error's chunk size fits exactly."""
    model = build_model("llama", max_position_embeddings=150)
    ids = token_ids(60, seed=3)
    prompt = len(TOKENIZER(kvsqueeze.presses.kvzip.REPEAT_PROMPT, add_special_tokens=False).input_ids)
    press = _press(compression_ratio=0.5)  # one chunk: prompt + 60 tokens after 60 context tokens
    with pytest.raises(ValueError, match=rf"60 tokens.*position {60 + prompt + 60 - 1}.*maximum of 150") as err:
        prefill(model, ids, press)
    room = int(__import__("re").search(r"chunk_size <= (\d+)", str(err.value)).group(1))
    calls = []
    model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    with pytest.raises(ValueError):
        prefill(model, ids, _press(compression_ratio=0.5, chunk_size=room + 1))
    assert len(calls) == 1  # the context prefill only: no reconstruction pass ran
    cache, report, _ = prefill(model, ids, _press(compression_ratio=0.5, chunk_size=room))
    assert report.measured_ratio == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"n_sink": -1}, ValueError, r"n_sink.*-1"),
        ({"chunk_size": 0}, ValueError, r"chunk_size.*0"),
        ({"n_overlap": 2.5}, TypeError, r"n_overlap.*2\.5"),
        ({"layerwise": 1}, TypeError, r"layerwise.*1"),
        ({"repeat_prompt": None}, TypeError, r"repeat_prompt.*None"),
        ({"tokenizer": "gpt2"}, TypeError, r"tokenizer.*'gpt2'"),
        ({"tokenizer": len}, TypeError, r"tokenizer.*<built-in function len>"),
    ],
)
def test_bad_fields(kwargs, error, match):
    with pytest.raises(error, match=match):
        kvsqueeze.make_press("kvzip", **kwargs)


@pytest.mark.real_model
def test_default_model_kvzip(smollm):
    """SmolLM2-135M, ~600 tokens of essays at ratio 0.5: exact total, real savings, an answer."""
    from kvsqueeze.corpus import essays

    model, tokenizer = smollm
    pipe = kvsqueeze.Pipeline(model, tokenizer)
    press = kvsqueeze.make_press("kvzip", compression_ratio=0.5)  # tokenizer found next to the model
    ctx = pipe.compress(essays()[0][:2400], press)
    n_kept = press.n_kept(ctx.n_tokens)
    assert ctx.report.measured_ratio == pytest.approx(1 - n_kept / ctx.n_tokens)
    assert ctx.cache_bytes <= 0.52 * ctx.full_cache_bytes
    assert ctx.cache.get_seq_length() == ctx.n_tokens
    assert ctx.answer("What is this text about?", max_new_tokens=4)
