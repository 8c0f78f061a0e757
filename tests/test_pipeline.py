"""Pipeline / CompressedContext on the tiny models, for every registered press: the compressed context never
changes while it answers, greedy answers equal ``model.generate`` under the same press, generation inside a
``with press(model)`` block keeps the compressed cache and the right positions, memory is really saved, and bad
input fails early with a message that names the value."""

from __future__ import annotations

import re

import pytest
import torch

import kvsqueeze
from kvsqueeze import Pipeline, UnsupportedModelError, make_press
from kvsqueeze import adapter as A
from kvsqueeze.presses import ScorerPress
from kvsqueeze.record import record_prefill

from conftest import DUO_WINDOW, EOS_ID, MAX_POSITIONS, MODEL_NAMES, ForwardCounter, hook_counts, token_ids
from press_matrix import CASES, FIRST_CASES, PRESS_KWARGS, PressCase

pytestmark = pytest.mark.usefixtures("single_thread")

CONTEXT = "The quick brown fox jumps over the lazy dog. The magic number is 42, remember it."
QUESTIONS = ["What is the magic number?", "Who jumps?", "Is the dog lazy? Answer:"]

first_case_params = [pytest.param(c, id=c.id) for c in FIRST_CASES]


@pytest.fixture
def setup(model_for, calibration_artifact, tokenizer):
    """``setup(case, model_name, ratio) -> (press, expected_kept, pipeline)``."""

    def make(case: PressCase, model_name: str, ratio: float = 0.5, tok=None):
        press, expected = case.build(ratio, artifact=lambda method: calibration_artifact(model_name, method))
        return press, expected, Pipeline(model_for(model_name, press), tok or tokenizer)

    return make


def _stored(layer) -> dict[str, torch.Tensor]:
    """Every tensor a cache layer stores: keys and values, and a head-wise layer's packed context and counts."""
    names = A.RaggedLayer.STORED if isinstance(layer, A.RaggedLayer) else ("keys", "values")
    return {name: getattr(layer, name) for name in names}


def snapshot(cache) -> list[tuple]:
    """Everything that identifies a cache's content and memory: layer objects, tensors (cloned), data pointers."""
    out = []
    for layer in cache.layers:
        stored = _stored(layer)
        out.append(
            (
                layer,
                type(layer),
                {name: t.clone() for name, t in stored.items()},
                {name: t.data_ptr() for name, t in stored.items()},
                {name: tuple(t.shape) for name, t in stored.items()},
                layer.get_seq_length(),
            )
        )
    return out


def assert_same_snapshot(cache, before: list[tuple]) -> None:
    assert len(cache.layers) == len(before)
    for i, (layer, (obj, kind, tensors, pointers, shapes, logical)) in enumerate(zip(cache.layers, before)):
        assert layer is obj and type(layer) is kind, f"layer {i} was replaced"
        stored = _stored(layer)
        assert {name: tuple(t.shape) for name, t in stored.items()} == shapes, f"layer {i}: shapes changed"
        assert {name: t.data_ptr() for name, t in stored.items()} == pointers, f"layer {i}: storage changed"
        for name, t in stored.items():
            assert torch.equal(t, tensors[name]), f"layer {i}: {name} changed"
        assert layer.get_seq_length() == logical, f"layer {i}: logical length {layer.get_seq_length()} != {logical}"


def strip_eos(ids: list[int]) -> list[int]:
    return ids[: ids.index(EOS_ID)] if EOS_ID in ids else ids


def generated(out) -> tuple[torch.Tensor, object]:
    """``(sequences, cache)`` of a ``generate(..., return_dict_in_generate=True)`` output (5.24: ``.cache``)."""
    cache = A.ModelAdapter.cache_from_output(out)
    assert cache is not None, f"no cache on {type(out).__name__}: {list(out.keys())}"
    return out.sequences, cache


# ----------------------------------------------------------------------------------------------------------------
# Compress once, answer many
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("case", first_case_params)
def test_context_cache_unchanged_after_three_questions(case, model_name, setup):
    press, _, pipe = setup(case, model_name)
    ctx = pipe.compress(CONTEXT, press=press)
    before = snapshot(ctx.cache)
    first = [ctx.generate_ids(q, max_new_tokens=6) for q in QUESTIONS]
    assert_same_snapshot(ctx.cache, before)
    # No state leaks from one question into the next: asking again, in another order, gives the same answers.
    again = [ctx.generate_ids(q, max_new_tokens=6) for q in reversed(QUESTIONS)]
    assert again[::-1] == first
    assert_same_snapshot(ctx.cache, before)
    assert ctx.n_tokens == pipe.context_ids(CONTEXT).shape[1]


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("case", first_case_params)
def test_greedy_answer_equals_generate_under_same_press(case, model_name, setup):
    press, _, pipe = setup(case, model_name)
    model = pipe.model
    ctx = pipe.compress(CONTEXT, press=press)
    ctx_ids, q_ids = pipe.context_ids(CONTEXT), pipe.question_ids(QUESTIONS[0])
    answer = ctx.generate_ids(QUESTIONS[0], max_new_tokens=8)
    # The reference compresses the context on its own (the press's hooks on a plain prefill into a new cache), then
    # generate skips the prompt tokens already in that cache (its logical length); the rest is the question.
    cache = pipe.adapter.new_cache()
    with torch.inference_mode(), press(model):
        model(input_ids=ctx_ids, use_cache=True, **pipe.adapter.model_call_kwargs(cache))
    assert cache.get_seq_length() == ctx_ids.shape[1] == ctx.n_tokens
    prompt = torch.cat([ctx_ids, q_ids], dim=1)
    with torch.inference_mode(), press(model):
        out = model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False,
                             **{pipe.adapter.cache_kwarg: cache})
    assert strip_eos(out[0, prompt.shape[1] :].tolist()) == answer
    assert ctx.answer(QUESTIONS[0], max_new_tokens=8) == pipe.tokenizer.decode(answer, skip_special_tokens=True).strip()


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("case", first_case_params)
def test_generate_inside_press_block_compresses_the_prefill(case, model_name, setup):
    """``with press(model): model.generate(ids)`` compresses the prompt once, appends the new tokens uncompressed
    and decodes at the right positions (same tokens as a manual loop with explicit positions)."""
    press, expected, pipe = setup(case, model_name)
    model, adapter = pipe.model, pipe.adapter
    ids = pipe.context_ids(CONTEXT)
    seq_len, new = ids.shape[1], 5
    with torch.inference_mode(), press(model) as report:
        out = model.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
    sequences, cache = generated(out)
    tokens = sequences[0, seq_len:].tolist()
    assert len(tokens) == new
    caps = press.capabilities
    for i in range(len(cache.layers)):
        if not adapter.is_compressible(i):
            continue
        n_kept = report.kept[i]
        if caps.uniform_layers:
            assert n_kept == expected(seq_len)
        # The last generated token is never fed back, so new - 1 tokens were appended.
        stored = float(A.layer_head_lengths(cache, i).double().mean())
        assert stored == n_kept + new - 1, f"layer {i}: {stored} stored per head, kept {n_kept}"
        # Position-changing presses keep the context's end fixed, so the logical length never changes.
        assert cache.layers[i].get_seq_length() == seq_len + new - 1, f"layer {i}: logical length"

    # The same decoding by hand: prefill under the press, then each token at an explicit position.
    fresh = adapter.new_cache()
    with torch.inference_mode(), press(model):
        logits = model(input_ids=ids, use_cache=True, **adapter.model_call_kwargs(fresh)).logits[:, -1]
        position = fresh.get_seq_length()
        assert position == seq_len
        manual, manual_logits = [], []
        for step in range(new):
            token = int(logits[0].argmax())
            manual.append(token)
            manual_logits.append(logits)
            logits = model(
                input_ids=torch.tensor([[token]]),
                position_ids=torch.tensor([[position + step]]),
                use_cache=True,
                **adapter.model_call_kwargs(fresh),
            ).logits[:, -1]
    for step, (theirs, ours) in enumerate(zip(out.logits, manual_logits)):
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4, msg=f"generate step {step}: logits differ")
    assert tokens == manual


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("case", first_case_params)
def test_from_recorded_equals_compress(case, model_name, setup):
    press, _, pipe = setup(case, model_name)
    ctx = pipe.compress(CONTEXT, press=press)
    recorded = pipe.record(CONTEXT, keep_attentions=press.capabilities.needs_attention_weights)
    if press.capabilities.extra_passes:  # refused clearly: the recording cannot run reconstruction passes
        with pytest.raises(ValueError, match="beyond the prefill"):
            pipe.from_recorded(recorded, press)
        return
    other = pipe.from_recorded(recorded, press)
    assert other.n_tokens == ctx.n_tokens
    for i in range(len(ctx.cache.layers)):
        k1, v1, n1 = A.layer_entries(ctx.cache, i)
        k2, v2, n2 = A.layer_entries(other.cache, i)
        assert torch.equal(n1, n2) and torch.equal(k1, k2) and torch.equal(v1, v2), f"layer {i}"
    assert other.report.kept == ctx.report.kept
    # Its prefill time is the recording's prefill plus this compression, as for a context compressed directly.
    assert recorded.prefill_seconds > 0
    assert other.prefill_seconds >= recorded.prefill_seconds + other.compression_seconds
    assert other.generate_ids(QUESTIONS[1], max_new_tokens=6) == ctx.generate_ids(QUESTIONS[1], max_new_tokens=6)


def test_pipeline_call_answers_one_or_many(tiny_model, tokenizer):
    pipe = Pipeline(tiny_model("llama"), tokenizer)
    press = make_press("knorm", compression_ratio=0.5)
    many = pipe(CONTEXT, QUESTIONS, press=press, max_new_tokens=5)
    one = pipe(CONTEXT, QUESTIONS[0], press=press, max_new_tokens=5)
    assert isinstance(many, list) and len(many) == 3 and isinstance(one, str)
    ctx = pipe.compress(CONTEXT, press=press)
    assert many == [ctx.answer(q, max_new_tokens=5) for q in QUESTIONS]
    assert one == many[0]


# ----------------------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("case", first_case_params)
def test_a_plain_forward_under_a_press_holds_only_what_it_stores(case, model_name, setup):
    """``with press(model): model(ids)`` without the pipeline: once the forward returns, no layer holds more bytes
    than the entries it stores (transformers' sliding layers keep a view of the whole prefill, and a press may keep
    its entries as views; the press block compacts them after the forward that compressed)."""
    press, _, pipe = setup(case, model_name, ratio=0.5)
    model, adapter = pipe.model, pipe.adapter
    ids = token_ids(40, seed=21)
    cache = adapter.new_cache()
    with torch.inference_mode(), press(model):
        model(input_ids=ids, use_cache=True, **adapter.model_call_kwargs(cache))
    assert any(A.is_compressed_layer(cache, i) for i in range(len(cache.layers)))
    for i, layer in enumerate(cache.layers):
        stored = (A.RaggedLayer.STORED if isinstance(layer, A.RaggedLayer) else ("keys", "values"))
        data = sum(getattr(layer, name).numel() * getattr(layer, name).element_size() for name in stored)
        assert A.layer_nbytes(cache, i) == data, f"layer {i} ({type(layer).__name__}) holds a larger buffer"


def test_queries_of_another_threads_forward_do_not_reach_a_compression(tiny_model, tokenizer):
    """A press that reuses the queries the model computed (SnapKV) compresses a context while another thread answers
    on another context, its forward forced in between this thread's query projection and attention of the last
    layer: the kept entries are those of the compression alone (the captured queries are per thread; the other
    forward's replaced them, which kept other entries or failed on their shape)."""
    import threading

    model = tiny_model("llama")
    pipe = Pipeline(model, tokenizer)
    adapter = pipe.adapter
    press = make_press("snapkv", compression_ratio=0.5, window_size=4)
    alone = pipe.compress(CONTEXT, press=press)
    other = pipe.compress(CONTEXT[:40], press=make_press("knorm", compression_ratio=0.5))
    main = threading.get_ident()
    answered = []
    thread = threading.Thread(target=lambda: answered.append(other.generate_ids(QUESTIONS[0], max_new_tokens=2)))
    other_projected, compressed = threading.Event(), threading.Event()
    last = adapter.attention_modules[adapter.compressible_layers[-1]]

    def after_projection(module, args, output):
        if threading.get_ident() == main:  # this thread's last-layer queries captured: the other thread projects
            if not thread.is_alive() and not compressed.is_set():
                thread.start()
                assert other_projected.wait(30)
        elif not other_projected.is_set():  # the other thread's queries captured: it waits until this one is done
            other_projected.set()
            assert compressed.wait(30)

    handles = []

    def register_after_the_blocks_capture(module, args, kwargs):  # so it runs after the press block's own hook
        if threading.get_ident() == main and not handles[1:]:
            handles.append(adapter.query_projection(last).register_forward_hook(after_projection))

    handles.append(adapter.decoder.register_forward_pre_hook(register_after_the_blocks_capture, with_kwargs=True))
    try:
        interleaved = pipe.compress(CONTEXT, press=press)
    finally:
        compressed.set()
        thread.join(30)
        for h in handles:
            h.remove()
    assert other_projected.is_set() and answered, "the other thread's forward did not run in between"
    for i in adapter.compressible_layers:
        assert torch.equal(A.layer_kv(interleaved.cache, i)[0], A.layer_kv(alone.cache, i)[0]), f"layer {i}"


def test_an_uncompressed_context_answers_while_a_press_block_is_open(tiny_model, tokenizer):
    """An answer on a context kept whole (press=None) is a continuation, not a prefix cache a press block should
    refuse: with a block open on the model (another thread's, typically), it answers as without one."""
    pipe = Pipeline(tiny_model("llama"), tokenizer)
    full = pipe.compress(CONTEXT)
    want = full.generate_ids(QUESTIONS[0], max_new_tokens=5)
    with make_press("knorm", compression_ratio=0.5)(pipe.model):
        assert full.generate_ids(QUESTIONS[0], max_new_tokens=5) == want


def _answer_from_another_thread_when(module, condition, answer) -> object:
    """A forward hook on ``module`` that, the first time it runs in this thread with ``condition()`` true, runs
    ``answer()`` in another thread to the end (that thread's forwards go through every hook on the shared model)."""
    import threading

    main = threading.get_ident()
    fired = []

    def hook(*_):
        if threading.get_ident() == main and not fired and condition():
            fired.append(True)
            thread = threading.Thread(target=answer)
            thread.start()
            thread.join(60)

    handle = module.register_forward_hook(hook)
    handle.fired = fired
    return handle


@pytest.mark.parametrize("phase", ["prefill", "reconstruction"])
def test_kvzip_compresses_the_same_while_another_thread_answers(phase, tiny_model, tokenizer):
    """KVzip's block state (the prefill waiting to be compressed) and its scoring hooks (the reconstruction passes)
    belong to the compressing thread: another thread answering in between used to cancel the compression (nothing
    kept out) or mix its own scores in (other entries kept), or fail."""
    pipe = Pipeline(tiny_model("llama"), tokenizer)
    adapter = pipe.adapter
    press = make_press("kvzip", compression_ratio=0.5, tokenizer=tokenizer)
    alone = pipe.compress(CONTEXT[:50], press=press)
    other = pipe.compress(CONTEXT + " The cat sleeps.", press=make_press("knorm", compression_ratio=0.5))
    answered = []
    internal = lambda: bool(getattr(pipe.model, A._INTERNAL_PASS, 0))  # noqa: E731
    condition = internal if phase == "reconstruction" else (lambda: not internal())
    handle = _answer_from_another_thread_when(
        adapter.attention_modules[0], condition, lambda: answered.append(other.generate_ids("Who?", max_new_tokens=2))
    )
    try:
        interleaved = pipe.compress(CONTEXT[:50], press=press)
    finally:
        handle.remove()
    assert handle.fired and answered, "the other thread did not answer in between"
    assert A.layer_lengths(interleaved.cache) == A.layer_lengths(alone.cache)
    for i in adapter.compressible_layers:
        assert torch.equal(A.layer_head_lengths(interleaved.cache, i), A.layer_head_lengths(alone.cache, i)), i
        for name, t in _stored(alone.cache.layers[i]).items():
            assert torch.equal(_stored(interleaved.cache.layers[i])[name], t), f"layer {i} {name}"


def test_a_recording_is_not_disturbed_by_another_threads_forward(tiny_model, tokenizer):
    """Pipeline.record keeps each layer's inputs from its own forward: another thread answering while the
    recording runs used to replace them (hidden states of its 1 token), and the recording then compressed wrong."""
    pipe = Pipeline(tiny_model("llama"), tokenizer)
    adapter = pipe.adapter
    alone = pipe.record(CONTEXT)
    other = pipe.compress(CONTEXT[:40], press=make_press("knorm", compression_ratio=0.5))
    answered = []
    last = adapter.attention_modules[adapter.compressible_layers[-1]]
    handle = _answer_from_another_thread_when(
        last, lambda: True, lambda: answered.append(other.generate_ids("Who?", max_new_tokens=2))
    )
    try:
        interleaved = pipe.record(CONTEXT)
    finally:
        handle.remove()
    assert handle.fired and answered
    for a, b in zip(alone.layers, interleaved.layers):
        assert torch.equal(a.hidden_states, b.hidden_states), f"layer {a.layer_idx}"
        assert torch.equal(a.keys, b.keys)


@pytest.mark.parametrize("kind", ["pre", "post"])
def test_a_block_closing_while_another_thread_is_inside_a_forward(kind, tiny_model, tokenizer):
    """torch lists a module's hooks when its forward starts; a press block that closes meanwhile removes its hooks,
    and torch then calls the removed with-kwargs hooks of that forward without kwargs. The other thread's answer
    must not fail (it raised a TypeError for the missing kwargs/output)."""
    import threading

    pipe = Pipeline(tiny_model("llama"), tokenizer)
    adapter = pipe.adapter
    ctx = pipe.compress(CONTEXT, press=make_press("knorm", compression_ratio=0.5))
    want = ctx.generate_ids("Who?", max_new_tokens=2)
    inside, closed = threading.Event(), threading.Event()

    def gate(*_):  # runs first among the decoder's hooks; in the answering thread it waits for the block to close
        if threading.current_thread().name == "answer":
            inside.set()
            closed.wait(30)

    register = adapter.decoder.register_forward_pre_hook if kind == "pre" else adapter.decoder.register_forward_hook
    handle = register(gate, prepend=True)
    got, errors = [], []

    def answer():
        try:
            got.append(ctx.generate_ids("Who?", max_new_tokens=2))
        except Exception as exc:  # the failure under test
            errors.append(exc)

    block = make_press("snapkv", compression_ratio=0.5)(pipe.model)
    block.__enter__()
    thread = threading.Thread(target=answer, name="answer")
    try:
        thread.start()
        assert inside.wait(30)
    finally:
        block.__exit__(None, None, None)
        closed.set()
        thread.join(30)
        handle.remove()
    assert not errors, errors
    assert got == [want]


def test_compaction_is_not_lost_to_a_concurrent_forward(tiny_model):
    """Another thread continuing another cache inside the same press block, starting after this thread's forward
    compressed and ending after it, must not take this forward's place in the compaction bookkeeping (per thread):
    the sliding layers still hold only their window afterwards. The interleaving is forced with events."""
    import threading

    model = tiny_model("gemma3")
    adapter = A.ModelAdapter(model)
    press = make_press("knorm", compression_ratio=0.5)
    other = adapter.new_cache()
    with torch.inference_mode(), press(model):
        model(input_ids=token_ids(40, seed=2), use_cache=True, **adapter.model_call_kwargs(other))
    cache = adapter.new_cache()
    main = threading.get_ident()
    started, main_done = threading.Event(), threading.Event()

    def second_forward():
        with torch.inference_mode():
            model(input_ids=token_ids(2, seed=9), use_cache=True, **adapter.model_call_kwargs(other))

    thread = threading.Thread(target=second_forward)

    def after_last_layer(module, args, kwargs, output):  # this thread, its layers compressed: let the other start
        if threading.get_ident() == main:
            thread.start()
            assert started.wait(10)

    def other_pre(module, args, kwargs):  # the other thread, after the block's bookkeeping saw its forward start
        if threading.get_ident() != main:
            started.set()
            assert main_done.wait(10)

    with torch.inference_mode(), press(model):
        last = adapter.attention_modules[len(adapter.attention_modules) - 1]
        handles = [last.register_forward_hook(after_last_layer, with_kwargs=True),
                   adapter.decoder.register_forward_pre_hook(other_pre, with_kwargs=True)]
        try:
            model(input_ids=token_ids(40, seed=1), use_cache=True, **adapter.model_call_kwargs(cache))
        finally:
            main_done.set()
            thread.join(10)
            for h in handles:
                h.remove()
    assert not thread.is_alive() and started.is_set()
    for i, layer in enumerate(cache.layers):
        data = layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        assert A.layer_nbytes(cache, i) == data, f"layer {i} holds more than it stores"


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("case", first_case_params)
def test_cache_bytes_are_measured_and_reduced(case, model_name, setup):
    press, expected, pipe = setup(case, model_name, ratio=0.5)
    full = pipe.compress(CONTEXT, press=None)
    ctx = pipe.compress(CONTEXT, press=press)
    seq_len = ctx.n_tokens
    assert full.cache_bytes == full.full_cache_bytes
    assert ctx.full_cache_bytes == full.cache_bytes, "bytes before compression != bytes of the uncompressed cache"
    assert ctx.cache_bytes < ctx.full_cache_bytes
    # Measured from the tensors: kept entries times the bytes per entry, sliding layers unchanged.
    want = index = 0
    for i in range(len(ctx.cache.layers)):
        k, v = A.layer_kv(full.cache, i)
        per_entry = k.shape[-1] * k.element_size() + v.shape[-1] * v.element_size()  # one head, one position
        want += per_entry * int(A.layer_head_lengths(ctx.cache, i).sum())
        if A.is_ragged_layer(ctx.cache, i):  # plus the per-head counts, the ragged layout's only index
            index += ctx.cache.layers[i].lengths.numel() * 8
        if not pipe.adapter.is_compressible(i):
            assert A.layer_nbytes(ctx.cache, i) == A.layer_nbytes(full.cache, i)
    assert ctx.cache_bytes == want + index
    full_layers = pipe.adapter.compressible_layers
    if not press.capabilities.uniform_layers:
        kept = sum(float(A.layer_head_lengths(ctx.cache, i).double().mean()) for i in full_layers)
        assert abs(kept - expected(seq_len) * len(full_layers)) <= len(full_layers)
    elif len(full_layers) == len(ctx.cache.layers):
        # Uniform press, every layer compressed: exactly the kept fraction, about half (a composition rounds down
        # once per inner press).
        assert (ctx.cache_bytes - index) * seq_len == ctx.full_cache_bytes * expected(seq_len)
        assert abs(ctx.cache_bytes / ctx.full_cache_bytes - 0.5) <= 3 / seq_len
    assert ctx.compression_seconds > 0 and ctx.prefill_seconds >= ctx.compression_seconds


# ----------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------


def test_sampling_with_a_seed_is_reproducible(tiny_model, tokenizer):
    pipe = Pipeline(tiny_model("qwen3"), tokenizer)
    ctx = pipe.compress(CONTEXT, press=make_press("snapkv", compression_ratio=0.5, window_size=8))
    kwargs = dict(max_new_tokens=16, do_sample=True, temperature=2.0)
    a = ctx.generate_ids(QUESTIONS[0], seed=3, **kwargs)
    b = ctx.generate_ids(QUESTIONS[0], seed=3, **kwargs)
    c = ctx.generate_ids(QUESTIONS[0], seed=4, **kwargs)
    assert a == b
    assert a != c, "two seeds gave the same 16 sampled tokens at temperature 2"
    greedy = ctx.generate_ids(QUESTIONS[0], max_new_tokens=16)
    assert a != greedy
    # Nucleus sampling with a vanishing top_p keeps only the most likely token: it is greedy decoding.
    assert ctx.generate_ids(QUESTIONS[0], max_new_tokens=16, do_sample=True, top_p=1e-9, seed=5) == greedy


# ----------------------------------------------------------------------------------------------------------------
# Chat template
# ----------------------------------------------------------------------------------------------------------------


def test_chat_template_wraps_context_and_question(tiny_model, tokenizer, chat_tokenizer):
    model = tiny_model("llama")
    pipe = Pipeline(model, chat_tokenizer)
    assert pipe.template.prefix == "<s>User: " and pipe.template.suffix == "\nBot:"
    want = chat_tokenizer("<s>User: " + CONTEXT, add_special_tokens=False, return_tensors="pt").input_ids
    assert torch.equal(pipe.context_ids(CONTEXT), want)
    assert (want[0] == chat_tokenizer.bos_token_id).sum() == 1, "BOS must not be doubled"
    q = chat_tokenizer("\n\n" + QUESTIONS[0] + "\nBot:", add_special_tokens=False, return_tensors="pt").input_ids
    assert torch.equal(pipe.question_ids(QUESTIONS[0]), q)
    # The answer prefix starts the assistant's turn: after the template's suffix, not inside the user's message.
    prefixed = chat_tokenizer("\n\n" + QUESTIONS[0] + "\nBot:" + " Answer:", add_special_tokens=False,
                              return_tensors="pt").input_ids
    assert torch.equal(pipe.question_ids(QUESTIONS[0], answer_prefix=" Answer:"), prefixed)
    press = make_press("knorm", compression_ratio=0.5)
    ctx = pipe.compress(CONTEXT, press=press)
    answer = ctx.generate_ids(QUESTIONS[0], max_new_tokens=6)
    with torch.inference_mode(), press(model):
        out = model.generate(input_ids=torch.cat([want, q], 1), max_new_tokens=6, do_sample=False,
                             **{pipe.adapter.cache_kwarg: ctx.fork_cache()})
    assert strip_eos(out[0, want.shape[1] + q.shape[1] :].tolist()) == answer
    # Plain text on request; a template demanded from a tokenizer without one is an error.
    assert Pipeline(model, chat_tokenizer, use_chat_template=False).template.prefix == ""
    with pytest.raises(ValueError, match="chat template"):
        Pipeline(model, tokenizer, use_chat_template=True)


# ----------------------------------------------------------------------------------------------------------------
# Bad input: each error names the value
# ----------------------------------------------------------------------------------------------------------------

BAD_RATIOS = [
    pytest.param(-0.1, ValueError, id="negative"),
    pytest.param(1.0, ValueError, id="one"),
    pytest.param(1.5, ValueError, id="above-one"),
    pytest.param(float("nan"), ValueError, id="nan"),
    pytest.param("0.5", TypeError, id="string"),
    pytest.param(True, TypeError, id="bool"),
]


def _valid_kwargs(name: str) -> dict:
    """Constructor kwargs that are valid apart from the ratio (wrappers get a valid inner press)."""
    if name == "composed":
        return {"presses": [make_press("knorm", compression_ratio=0.5)]}
    if name == "key_rerotation":
        return {"press": make_press("knorm", compression_ratio=0.5)}
    return dict(PRESS_KWARGS.get(name, [{}])[0])


@pytest.mark.parametrize("bad, error", BAD_RATIOS)
@pytest.mark.parametrize("name", kvsqueeze.list_presses())
def test_ratio_outside_range_names_the_value(name, bad, error):
    # The range check's own message (a wrapper refusing any ratio of its own would also name the value).
    with pytest.raises(error, match=rf"compression_ratio must be (a number )?in \[0, 1\).*got {re.escape(repr(bad))}"):
        make_press(name, compression_ratio=bad, **_valid_kwargs(name))


@pytest.mark.parametrize("bad, error", BAD_RATIOS)
def test_ratio_outside_range_of_wrapped_press_names_the_value(bad, error):
    with pytest.raises(error, match=rf"compression_ratio must be (a number )?in \[0, 1\).*got {re.escape(repr(bad))}"):
        make_press("key_rerotation", press=make_press("streaming_llm", compression_ratio=bad))


@pytest.mark.parametrize("context", ["", "   ", "\n\t \n"])
def test_empty_context_is_rejected(context, tiny_model, tokenizer):
    pipe = Pipeline(tiny_model("llama"), tokenizer)
    with pytest.raises(ValueError, match=re.escape(repr(context))):
        pipe.compress(context, press=make_press("knorm", compression_ratio=0.5))
    with pytest.raises(ValueError, match="empty"):
        pipe(context, "question?")
    with pytest.raises(TypeError, match="NoneType"):
        pipe.compress(None)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_context_longer_than_the_model_maximum(model_name, tiny_model, tokenizer):
    pipe = Pipeline(tiny_model(model_name), tokenizer)
    text = "x" * (MAX_POSITIONS + 40)
    n_tokens = len(tokenizer(text).input_ids)
    with pytest.raises(ValueError, match=rf"{n_tokens} tokens.*{MAX_POSITIONS}"):
        pipe.compress(text, press=make_press("knorm", compression_ratio=0.5))
    # Fits, but the question and answer would not: the error gives the three counts and the limit.
    ctx = pipe.compress("y" * (MAX_POSITIONS - 20), press=make_press("knorm", compression_ratio=0.5))
    with pytest.raises(ValueError, match=rf"max_new_tokens \(64\).*{MAX_POSITIONS}"):
        ctx.generate_ids("why?", max_new_tokens=64)
    # The limits are exact: a context that leaves room for no question (the prompt format's tokens around an empty
    # one) and one answer token is refused, one token shorter is accepted and answers the empty question; an
    # answer budget that exactly fills the positions is accepted, one more token is refused.
    least = pipe.question_ids("").shape[1] + 1
    assert least > 1  # the plain-text format puts a separator and an answer cue around the question
    k = MAX_POSITIONS - least + 1 - (len(tokenizer("x").input_ids) - 1)
    assert len(tokenizer("x" * k).input_ids) == MAX_POSITIONS - least + 1
    with pytest.raises(ValueError, match=rf"context has {MAX_POSITIONS - least + 1} tokens.*no room for a question "
                                         rf"\(with the {least - 1} tokens.*{MAX_POSITIONS}"):
        pipe.context_ids("x" * k)
    assert pipe.context_ids("x" * (k - 1)).shape[1] == MAX_POSITIONS - least
    pipe.compress("x" * (k - 1)).answer("", max_new_tokens=1)  # just fits
    room = MAX_POSITIONS - ctx.n_tokens - pipe.question_ids("why?").shape[1]
    ctx.generate_ids("why?", max_new_tokens=room)
    with pytest.raises(ValueError, match=rf"max_new_tokens \({room + 1}\)"):
        ctx.generate_ids("why?", max_new_tokens=room + 1)


def test_unknown_press_suggests_close_names():
    with pytest.raises(KeyError, match=r"'knrom'.*Did you mean: knorm"):
        make_press("knrom", compression_ratio=0.5)
    # Also a ValueError, like every other bad input, and its message is not quoted as a plain KeyError's is.
    with pytest.raises(ValueError) as raised:
        make_press("knrom")
    assert str(raised.value).startswith("unknown press 'knrom'.")
    with pytest.raises(TypeError, match="a press name must be a string, got 123"):
        kvsqueeze.register_press(123)
    with pytest.raises(KeyError, match=r"'snap_kv'.*Did you mean:.*snapkv"):
        make_press("snap_kv")
    with pytest.raises(KeyError, match=r"'no_such_thing'.*Known presses: .*knorm"):
        kvsqueeze.presses.press_class("no_such_thing")
    with pytest.raises(TypeError, match=r"'knorm'.*no field\(s\) \['windw_size'\]"):
        make_press("knorm", windw_size=3)


def test_answer_options_and_question_lengths_are_checked_before_the_prefill(tiny_model, tokenizer):
    """``pipe(context, questions, ...)`` and the transformers "kv-compression" task refuse bad answer options, a
    question too long for the context and a bad context in a list before any prefill, not after compressing the
    context (or after answering the first questions)."""
    import transformers

    model = tiny_model("llama")
    pipe = Pipeline(model, tokenizer)
    press = make_press("knorm", compression_ratio=0.5)
    room = MAX_POSITIONS - pipe.context_ids(CONTEXT).shape[1] - pipe.question_ids("q").shape[1]
    too_long = "q" * (room - 2)  # with max_new_tokens=4: context + question + answer one token past the maximum
    bad_calls = [
        (dict(max_new_tokens=0), ValueError, r"max_new_tokens must be a positive int, got 0"),
        (dict(top_k=5), TypeError, r"unexpected keyword 'top_k'; a Pipeline call takes context, questions, press"),
        (dict(pres=press), TypeError, r"unexpected keyword 'pres'; a Pipeline call takes context, questions, press"),
        (dict(temperature=0.7), ValueError, r"temperature=0.7 only apply when sampling"),
        (dict(answer_prefix=None), TypeError, r"answer_prefix must be a string, got None"),
        (dict(do_sample=True, seed=2**64), ValueError, r"seed must be an int in \[-2\*\*63, 2\*\*64\).*18446744073709551616"),
    ]
    with ForwardCounter(model) as counter:
        for kwargs, error, match in bad_calls:
            with pytest.raises(error, match=match):
                pipe(CONTEXT, QUESTIONS[0], press=press, **kwargs)
        with pytest.raises(ValueError, match=r"exceed the model's maximum"):
            pipe(CONTEXT, [QUESTIONS[0], too_long], press=press, max_new_tokens=4)
        hf = transformers.pipeline("kv-compression", model=model, tokenizer=tokenizer, press=press)
        with pytest.raises(ValueError, match=r"max_new_tokens must be a positive int, got 0"):
            transformers.pipeline("kv-compression", model=model, tokenizer=tokenizer, max_new_tokens=0)
        with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 2.0"):
            hf(CONTEXT, question="q", do_sample=True, top_p=2.0)
        with pytest.raises(ValueError, match=r"temperature=0.7 only apply when sampling"):
            hf(CONTEXT, question="q", temperature=0.7)
        with pytest.raises(ValueError, match=r"exceed the model's maximum"):
            hf(CONTEXT, question=[QUESTIONS[0], too_long], max_new_tokens=4)
        with pytest.raises(ValueError, match=r"context is empty"):
            hf([CONTEXT, " "], question="q")
    assert counter.calls == 0, "a forward pass ran before the bad input was refused"
    # The limit is exact: one token less fits, and the same call is answered.
    assert len(pipe(CONTEXT, [QUESTIONS[0], too_long[:-1]], press=press, max_new_tokens=4)) == 2


def test_pipeline_refuses_what_it_cannot_answer_with(tiny_model, tokenizer):
    """A model without a language-model head (``AutoModel``'s bare decoder) cannot answer; a tokenizer whose ids
    exceed the model's vocabulary belongs to another model. Both are refused, naming what is wrong."""
    model = tiny_model("llama")
    with pytest.raises(TypeError, match=r"causal LM with a language-model head.*got LlamaModel"):
        Pipeline(model.model, tokenizer)
    from conftest import build_model

    small = build_model("llama", vocab_size=40)  # the test tokenizer has ids up to 127: printable ASCII
    pipe = Pipeline(small, tokenizer)
    with ForwardCounter(small) as counter:
        with pytest.raises(ValueError, match=r"tokenized text holds token id \d+, outside the model's vocabulary "
                                             r"of 40 tokens.*does not belong"):
            pipe.compress("zzz")
        ctx_ok = pipe.context_ids("AB")  # ids below 40 pass
        assert int(ctx_ok.max()) < 40
    assert counter.calls == 0


def test_a_tiny_temperature_samples_the_argmax(tiny_model, tokenizer):
    """``temperature`` → 0 is greedy decoding, also below float32's smallest number (1/T overflows there)."""
    ctx = Pipeline(tiny_model("llama"), tokenizer).compress(CONTEXT)
    greedy = ctx.generate_ids(QUESTIONS[0], max_new_tokens=8)
    for temperature in (1e-30, 1e-300, 5e-324):
        assert ctx.generate_ids(QUESTIONS[0], max_new_tokens=8, do_sample=True, temperature=temperature,
                                seed=0) == greedy, temperature
    # The largest seed torch takes is accepted; one more is refused (before the prefill, see above).
    ctx.generate_ids(QUESTIONS[0], max_new_tokens=2, do_sample=True, seed=2**64 - 1)
    ctx.generate_ids(QUESTIONS[0], max_new_tokens=2, do_sample=True, seed=-(2**63))
    with pytest.raises(ValueError, match="seed must be an int in"):
        ctx.generate_ids(QUESTIONS[0], max_new_tokens=2, do_sample=True, seed=-(2**63) - 1)


def test_no_prefill_under_an_open_press_block(tiny_model, tokenizer):
    """Inside ``with press(model)`` the press's hooks would compress any prefill: a recording or a "keep
    everything" compress there is refused; answering a context compressed before still works."""
    model = tiny_model("llama")
    pipe = Pipeline(model, tokenizer)
    ctx = pipe.compress(CONTEXT, press=make_press("knorm", compression_ratio=0.5))
    with make_press("random", compression_ratio=0.5)(model):
        with pytest.raises(ValueError, match=r"already active on this model \(RandomPress\)"):
            pipe.record(CONTEXT)
        with pytest.raises(ValueError, match="already active"):
            pipe.compress(CONTEXT)
        with pytest.raises(ValueError, match="already active"):
            pipe.compress(CONTEXT, press=make_press("knorm", compression_ratio=0.25))
        inside = ctx.answer(QUESTIONS[0], max_new_tokens=4)
    assert inside == ctx.answer(QUESTIONS[0], max_new_tokens=4)


def test_press_argument_must_be_a_press(tiny_model, tokenizer):
    pipe = Pipeline(tiny_model("llama"), tokenizer)
    with pytest.raises(TypeError, match="str"):
        pipe.compress(CONTEXT, press="knorm")


def test_answer_arguments_are_checked(tiny_model, tokenizer):
    ctx = Pipeline(tiny_model("llama"), tokenizer).compress(CONTEXT)
    with pytest.raises(ValueError, match=r"max_new_tokens.*\b0\b"):
        ctx.generate_ids("q", max_new_tokens=0)
    with pytest.raises(ValueError, match=r"temperature.*\b0\b"):
        ctx.generate_ids("q", do_sample=True, temperature=0)
    with pytest.raises(ValueError, match=r"top_p.*1\.5"):
        ctx.generate_ids("q", top_p=1.5)
    # Sampling settings without do_sample=True would be silently ignored by greedy decoding.
    for kwargs, named in ((dict(temperature=0.7), "temperature=0.7"), (dict(top_p=0.9), "top_p=0.9"),
                          (dict(seed=3), "seed=3")):
        with pytest.raises(ValueError, match=rf"{re.escape(named)}.*do_sample=True"):
            ctx.generate_ids("q", **kwargs)
    assert ctx.generate_ids("q", max_new_tokens=2, do_sample=True, temperature=0.7, top_p=0.9, seed=3)
    # Wrong types name the argument (they used to sample for do_sample="no", or fail deep inside torch).
    for kwargs, error, named in (
        (dict(do_sample="no"), TypeError, "do_sample"),
        (dict(do_sample=True, temperature="1"), TypeError, "temperature"),
        (dict(do_sample=True, temperature=True), TypeError, "temperature"),
        (dict(do_sample=True, top_p=None), TypeError, "top_p"),
        (dict(do_sample=True, seed="3"), TypeError, "seed"),
        (dict(do_sample=True, seed=True), TypeError, "seed"),
        (dict(answer_prefix=None), TypeError, "answer_prefix"),
        (dict(do_sample=True, temperature=float("inf")), ValueError, "temperature"),
    ):
        with pytest.raises(error, match=named):
            ctx.generate_ids("q", max_new_tokens=2, **kwargs)
    # A tiny temperature is the argmax, not NaN probabilities.
    greedy = ctx.generate_ids("q", max_new_tokens=4)
    assert ctx.generate_ids("q", max_new_tokens=4, do_sample=True, temperature=1e-40, seed=0) == greedy


def test_pipeline_call_and_recordings_are_checked(tiny_model, tokenizer):
    model = tiny_model("llama")
    pipe = Pipeline(model, tokenizer)
    for questions in (None, [], {"q": 1}, ["fine", 3]):
        with pytest.raises(TypeError, match="questions must be a string or a non-empty list"):
            pipe(CONTEXT, questions)
    recorded = pipe.record(CONTEXT)
    with pytest.raises(TypeError, match="press must be a kvsqueeze Press.*str"):
        pipe.from_recorded(recorded, "knorm")
    with pytest.raises(TypeError, match="RecordedPrefill"):
        pipe.from_recorded("recorded")
    # A recording of another model (same architecture, other weights) would answer from that model's cache.
    other = Pipeline(tiny_model("llama", "eager"), tokenizer)
    with pytest.raises(ValueError, match="another model"):
        other.from_recorded(recorded, kvsqueeze.make_press("knorm", compression_ratio=0.5))
    with pytest.raises(TypeError, match="tokenizer must be a transformers tokenizer"):
        Pipeline(model, None)
    with pytest.raises(TypeError, match="use_chat_template"):
        Pipeline(model, tokenizer, use_chat_template="yes")


class _NeedsWeights(ScorerPress):
    """A local (unregistered) press declaring it needs attention weights."""

    from kvsqueeze.presses import Capabilities as _C

    capabilities = _C(needs_attention_weights=True)

    def score(self, layer):
        return layer.attentions.float().sum(-2)[:, :: layer.attentions.shape[1] // layer.keys.shape[1]]


def _eager_only_presses(calibration_artifact) -> list:
    presses = [_NeedsWeights(compression_ratio=0.5)]
    for case in CASES:
        press, _ = case.build(0.5, artifact=lambda method: calibration_artifact("llama", method))
        if press.capabilities.needs_attention_weights:
            presses.append(press)
    return presses


def test_eager_only_presses_refuse_a_non_eager_model(tiny_model, tokenizer, calibration_artifact):
    model = tiny_model("llama", "sdpa")
    pipe = Pipeline(model, tokenizer)
    presses = _eager_only_presses(calibration_artifact)
    assert len(presses) >= 1 + ("observed_attention" in kvsqueeze.list_presses())
    before = hook_counts(model)
    recorded = record_prefill(model, token_ids(24, seed=1))
    for press in presses:
        with pytest.raises(ValueError, match=r"needs attention weights.*'sdpa'.*'eager'"):
            with press(model):
                pass
        with pytest.raises(ValueError, match="eager"):
            pipe.compress(CONTEXT, press=press)
        with pytest.raises(ValueError, match="eager"):
            recorded.compress(press)
        assert hook_counts(model) == before
    with pytest.raises(ValueError, match=r"keep_attentions.*eager.*'sdpa'"):
        record_prefill(model, token_ids(8), keep_attentions=True)
    with pytest.raises(TypeError, match=r"keep_attentions must be a bool, got 'no'"):
        record_prefill(model, token_ids(8), keep_attentions="no")
    # The same presses run on the eager variant of the same weights.
    eager = Pipeline(tiny_model("llama", "eager"), tokenizer)
    for press in presses:
        assert eager.compress(CONTEXT, press=press).cache_bytes < eager.compress(CONTEXT).cache_bytes


def test_unsupported_architecture_is_named(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=1, n_head=2)).eval()
    press = make_press("knorm", compression_ratio=0.5)
    with pytest.raises(UnsupportedModelError, match=r"'gpt2'.*GPT2LMHeadModel"):
        Pipeline(model, tokenizer)
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        with press(model):
            pass
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        record_prefill(model, token_ids(8))
    assert issubclass(UnsupportedModelError, ValueError)
    assert hook_counts(model) == {"forward": 0, "forward_pre": 0, "with_kwargs": 0, "generate_shadowed": 0}


def test_calibrated_press_checks_its_artifact_before_compressing(tiny_model, tokenizer, calibration_artifact, tmp_path):
    """A missing artifact names the command that creates it; another model's artifact is refused (no hooks left)."""
    checked = 0
    for name in kvsqueeze.list_presses():
        caps = kvsqueeze.presses.press_class(name).capabilities
        if not (isinstance(caps, kvsqueeze.Capabilities) and caps.calibration):
            continue
        model = tiny_model("qwen3")
        pipe = Pipeline(model, tokenizer)
        before = hook_counts(model)
        missing = make_press(name, compression_ratio=0.5, artifact=str(tmp_path / "nowhere.safetensors"))
        with pytest.raises(FileNotFoundError, match=rf"nowhere\.safetensors.*kvsqueeze calibrate.*{caps.calibration}"):
            pipe.compress(CONTEXT, press=missing)
        foreign = make_press(name, compression_ratio=0.5, artifact=str(calibration_artifact("llama", caps.calibration)))
        with pytest.raises(ValueError, match="another model"):
            pipe.compress(CONTEXT, press=foreign)
        assert hook_counts(model) == before
        # The fixture's DuoAttention gates are trained for the tests' streaming window; the press must use it.
        window = dict(zip(("n_sink", "n_recent"), DUO_WINDOW)) if caps.calibration == "duo_attention" else {}
        own = make_press(name, compression_ratio=0.5, artifact=str(calibration_artifact("qwen3", caps.calibration)),
                         **window)
        assert pipe.compress(CONTEXT, press=own).report.measured_ratio > 0.45
        checked += 1
    assert checked >= 1, "no registered press declares a calibration artifact"


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(prompt_lookup_num_tokens=3),
        dict(assistant_model="tiny"),
        dict(prefill_chunk_size=16),
        dict(cache_implementation="static"),
        dict(cache_implementation="quantized"),
        dict(past_key_values="static"),
    ],
    ids=["prompt-lookup", "assistant-model", "chunked-prefill", "static", "quantized", "static-cache-object"],
)
def test_generate_modes_a_press_cannot_follow_are_refused(kwargs, tiny_model):
    """Assisted / prompt-lookup decoding put unverified drafts in the prefill (compressed as context, silently
    different tokens), a chunked prefill was compressed one chunk only (under a press that compresses once), and a static cache's empty slots were
    scored as entries: all are refused before any layer runs; plain generate still compresses."""
    from transformers import StaticCache

    model = tiny_model("llama")
    ids = token_ids(40, seed=31)
    if kwargs.get("assistant_model") == "tiny":
        kwargs = dict(assistant_model=tiny_model("llama", "eager"))
    if kwargs.get("past_key_values") == "static":
        kwargs = A.ModelAdapter(model).model_call_kwargs(StaticCache(config=model.config, max_cache_len=64))
    press = make_press("knorm", compression_ratio=0.5)
    with torch.inference_mode(), press(model) as report:
        with pytest.raises(ValueError, match="press"):
            model.generate(ids, max_new_tokens=4, do_sample=False, **kwargs)
        assert not report.kept  # refused before any layer was compressed
        model.generate(ids, max_new_tokens=2, do_sample=False)
        assert report.kept and all(k == 20 for k in report.kept.values())
    assert "generate" not in model.__dict__


def test_generate_guard_accepts_what_transformers_runs_as_a_dynamic_cache(tiny_model):
    """Gemma 2/3 hub generation configs say cache_implementation="hybrid", which transformers 5 runs as the dynamic
    cache: plain generate under a press must work. A generate the user patched on the instance is restored."""
    model = tiny_model("llama")
    ids = token_ids(40, seed=32)
    press = make_press("knorm", compression_ratio=0.5)
    model.generation_config.cache_implementation = "hybrid"
    try:
        with torch.inference_mode(), press(model) as report:
            model.generate(ids, max_new_tokens=2, do_sample=False)
        assert report.kept and all(k == 20 for k in report.kept.values())
    finally:
        model.generation_config.cache_implementation = None
    # A generation config passed positionally (generate(inputs, generation_config)) is read too.
    from transformers import GenerationConfig

    with torch.inference_mode(), press(model), pytest.raises(ValueError, match="prompt_lookup_num_tokens"):
        model.generate(ids, GenerationConfig(prompt_lookup_num_tokens=3, max_new_tokens=4, do_sample=False))
    patched = model.generate
    model.generate = patched  # an instance attribute, as a wrapper or a user patch leaves
    try:
        with press(model):
            assert model.generate is not patched
        assert model.__dict__["generate"] is patched
    finally:
        del model.__dict__["generate"]


@pytest.mark.parametrize("how", ["compress", "from_recorded"])
def test_context_cache_holds_only_what_it_stores(how, tiny_model, tokenizer):
    """transformers keeps a sliding-window layer's last window as a view of the whole prefill, which stayed alive
    with the context (its questions run on forks, so the layer is never updated): the reported bytes counted the
    view, the memory held the whole prefill. The context's tensors now own exactly their bytes."""
    model = tiny_model("gemma3")  # sliding window 8, far shorter than the context
    pipe = Pipeline(model, tokenizer)
    for press in (None, make_press("knorm", compression_ratio=0.5)):
        ctx = pipe.compress(CONTEXT, press=press) if how == "compress" else pipe.from_recorded(pipe.record(CONTEXT), press)
        held = 0
        for i, layer in enumerate(ctx.cache.layers):
            for t in (layer.keys, layer.values):
                assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), f"layer {i} holds a larger buffer"
                held += t.untyped_storage().nbytes()
        assert ctx.cache_bytes == held
        assert ctx.answer("what?", max_new_tokens=3) == pipe.compress(CONTEXT, press=press).answer("what?", max_new_tokens=3)
