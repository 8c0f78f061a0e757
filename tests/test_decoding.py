"""DecodingPress: compression repeated while the model generates.

The reference for every decoding step is the uncompressed model with a per-(layer, KV head) mask that hides the
entries the compressed cache no longer stores: the compressed run must give the same logits. Which entries are
kept at each compression is checked against the wrapped press's rule (KNorm, StreamingLLM), and the cache size
against the budget and the interval.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from kvsqueeze import Pipeline, make_press
from kvsqueeze import adapter as A
from kvsqueeze.presses.decoding import decoding_state_nbytes, decoding_states

from conftest import build_tokenizer

MODELS = ("llama", "gemma3", "qwen3", "phi3")
INNER = {
    "knorm": {},
    "expected_attention": {"n_future_positions": 16, "n_sink": 2},
    "snapkv": {"window_size": 4, "kernel_size": 3},
    "tova": {},
    "streaming_llm": {"n_sink": 2},
}


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


def prompt(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def decode_under(press, model, ids: torch.Tensor, steps: int):
    """Greedy decoding by hand under ``press``; per step: the logits, the stored positions per compressible layer
    *before* the step's forward, and whether that forward compressed again."""
    adapter = A.ModelAdapter(model)
    cache = adapter.new_cache()
    kwargs = adapter.model_call_kwargs(cache)
    tokens, logits_seen, kept_before, recompressed = [], [], [], []
    with torch.inference_mode(), press(model) as report:
        logits = model(input_ids=ids, use_cache=True, **kwargs).logits[:, -1]
        for _ in range(steps):
            token = int(logits[0].argmax())
            tokens.append(token)
            kept_before.append({i: s.positions.clone() for i, s in decoding_states(cache).items()})
            count = report.decoding_compressions
            logits = model(input_ids=torch.tensor([[token]]), use_cache=True, **kwargs).logits[:, -1]
            logits_seen.append(logits)
            recompressed.append(report.decoding_compressions > count)
    return tokens, logits_seen, kept_before, recompressed, cache, report


def masked_chunk_logits(model, chunks: list[torch.Tensor], kept_before: list[dict]) -> list[torch.Tensor]:
    """The uncompressed model fed ``chunks`` in turn, each chunk's queries seeing (per KV head) only the positions
    ``kept_before[i][layer]`` that the compressed cache stored before it, plus the chunk itself causally (a chunk
    with no positions recorded sees everything); the last logits of every chunk."""
    adapter = A.ModelAdapter(model)
    group = adapter.shape.num_attention_heads // adapter.shape.num_key_value_heads
    cache = adapter.new_cache()
    kwargs = adapter.model_call_kwargs(cache)
    current: dict[int, torch.Tensor] = {}

    def pre_hook(module, args, kwargs_):
        positions = current.get(module.layer_idx)  # (1, kv_heads, n_stored)
        if positions is None:
            return args, kwargs_
        m = args[0].shape[1] if args else kwargs_["hidden_states"].shape[1]
        before = cache.layers[module.layer_idx].get_seq_length()  # the chunk is appended in the forward
        visible = torch.zeros(1, positions.shape[1], m, before + m, dtype=torch.bool)
        visible[..., :before].scatter_(-1, positions[:, :, None, :].expand(-1, -1, m, -1), True)
        visible[..., before:] = torch.ones(m, m, dtype=torch.bool).tril()
        kwargs_["attention_mask"] = visible.repeat_interleave(group, dim=1)
        return args, kwargs_

    out = []
    handles = [adapter.attention_modules[i].register_forward_pre_hook(pre_hook, with_kwargs=True)
               for i in adapter.compressible_layers]
    try:
        with torch.inference_mode():
            for chunk, kept in zip(chunks, kept_before):
                current.clear()
                current.update(kept)
                out.append(model(input_ids=chunk, use_cache=True, **kwargs).logits[:, -1])
    finally:
        for h in handles:
            h.remove()
    return out


def masked_dense_logits(model, ids: torch.Tensor, tokens: list[int], kept_before: list[dict]) -> list[torch.Tensor]:
    """The steps of :func:`decode_under` on the uncompressed model, each step's query seeing only what the
    compressed cache stored (per KV head) plus itself."""
    chunks = [ids] + [torch.tensor([[token]]) for token in tokens]
    return masked_chunk_logits(model, chunks, [{}] + kept_before)[1:]


@pytest.mark.parametrize("inner", list(INNER))
@pytest.mark.parametrize("model_name", MODELS)
def test_decoding_compression_matches_the_masked_dense_reference(model_name, inner, tiny_model):
    model = tiny_model(model_name)
    press = make_press("decoding", press=make_press(inner, **INNER[inner]), budget=20, compression_interval=6,
                       hidden_states_buffer_size=8)
    ids = prompt(40)
    tokens, logits, kept_before, recompressed, cache, report = decode_under(press, model, ids, steps=26)
    assert report.decoding_compressions == 4 == sum(recompressed)  # after 6, 12, 18 and 24 appended tokens
    reference = masked_dense_logits(model, ids, tokens, kept_before)
    for step, (ours, theirs) in enumerate(zip(logits, reference)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4, msg=f"step {step}: logits differ")
    adapter = A.ModelAdapter(model)
    for i in adapter.compressible_layers:
        positions = decoding_states(cache)[i].positions
        assert positions.shape[-1] == A.layer_physical_length(cache, i) == 20 + 26 - 24
        assert bool((positions.diff(dim=-1) > 0).all()), "kept entries must stay in positional order"
        assert cache.layers[i].get_seq_length() == 40 + 26, "the logical length counts every token seen"


@pytest.mark.parametrize("inner", ["expected_attention", "snapkv", "tova"])
@pytest.mark.parametrize("model_name", MODELS)
def test_a_recompression_scores_like_a_prefill_of_the_same_tokens(model_name, inner, tiny_model):
    """When nothing was evicted before and the buffer holds every token, compressing during decoding must keep
    what the wrapped press keeps from a prefill of the same tokens: the buffer's queries (rotary embeddings
    recomputed at their positions), the logical length (Expected Attention's future positions) and the window
    all line up."""
    from kvsqueeze.record import record_prefill

    model = tiny_model(model_name)
    kwargs = INNER[inner]
    press = make_press("decoding", press=make_press(inner, **kwargs), budget=16, compression_interval=6,
                       hidden_states_buffer_size=32)
    ids = prompt(14, seed=5)  # within the budget: the prefill keeps everything
    tokens, _, _, recompressed, cache, _ = decode_under(press, model, ids, steps=7)
    assert recompressed == [False] * 5 + [True, False]
    fed = torch.cat([ids, torch.tensor([tokens[:6]])], dim=1)  # the 20 tokens the recompression saw
    recorded = record_prefill(model, fed)
    reference = make_press(inner, **kwargs, budget=16)
    for layer in recorded.layers:
        want = reference.keep_indices(layer)
        got = decoding_states(cache)[layer.layer_idx].positions[..., :16]
        assert got.tolist() == want.tolist(), f"layer {layer.layer_idx}"


@pytest.mark.parametrize("mode", ["budget", "ratio"])
def test_cache_size_follows_the_budget_and_the_interval(mode, tiny_model):
    model = tiny_model("llama")
    size = {"budget": 16} if mode == "budget" else {"compression_ratio": 0.5}
    press = make_press("decoding", press=make_press("knorm"), compression_interval=5, **size)
    ids = prompt(30)
    _, _, kept_before, recompressed, cache, _ = decode_under(press, model, ids, steps=21)
    stored = [k[0].shape[-1] for k in kept_before[1:]] + [A.layer_physical_length(cache, 0)]
    appended = 0
    expected_after_compression = 16 if mode == "budget" else 15  # floor(0.5 * 30) at the prefill
    for step, (n, again) in enumerate(zip(stored, recompressed)):
        appended += 1
        length = 30 + step + 1
        if again:
            assert appended == 5, f"step {step}: compressed after {appended} appended tokens"
            appended = 0
            expected_after_compression = 16 if mode == "budget" else int(length * 0.5)
        assert n == expected_after_compression + appended, f"step {step}: {n} stored"
        assert n < expected_after_compression + 5
    assert sum(recompressed) == 4


def test_random_draws_afresh_at_every_recompression(tiny_model, monkeypatch):
    """Random under ``decoding`` draws new scores at each recompression (it used to reseed with ``seed + layer``
    every time: with the budget-plus-interval shape repeating, every recompression got the very same scores by cache
    index and kept the same slots); runs stay reproducible, and the prefill's draw is still ``seed + layer``."""
    from kvsqueeze.presses.random import RandomPress

    drawn: list[tuple[int, int, torch.Tensor]] = []
    score = RandomPress.score

    def recording(self, layer):
        out = score(self, layer)
        drawn.append((layer.layer_idx, layer.first_position, out))
        return out

    monkeypatch.setattr(RandomPress, "score", recording)
    model = tiny_model("llama")
    runs = []
    for _ in range(2):
        drawn.clear()
        press = make_press("decoding", press=make_press("random", seed=3), budget=16, compression_interval=5)
        tokens, *_ = decode_under(press, model, prompt(30), steps=16)
        runs.append((tokens, list(drawn)))
    (tokens, first), (tokens_again, second) = runs
    assert tokens == tokens_again and len(first) == len(second)
    assert all(a[:2] == b[:2] and torch.equal(a[2], b[2]) for a, b in zip(first, second))  # reproducible
    later = [(idx, out) for idx, start, out in first if start > 0 and idx == 0]
    assert len(later) == 3 and all(out.shape == later[0][1].shape for _, out in later)  # 16 + 5 entries each time
    for i in range(len(later)):
        for j in range(i):
            assert not torch.equal(later[i][1], later[j][1]), f"recompressions {j} and {i} drew the same scores"
    prefill = [out for idx, start, out in first if start == 0 and idx == 0]
    assert len(prefill) == 1
    assert torch.equal(prefill[0], torch.rand(prefill[0].shape, generator=torch.Generator().manual_seed(3)))


def test_kept_entries_follow_the_wrapped_press(tiny_model):
    """At each compression during decoding, KNorm keeps the stored entries with the smallest key norms and
    StreamingLLM its sinks and the most recent entries, whatever was evicted before."""
    model = tiny_model("qwen3")
    adapter = A.ModelAdapter(model)
    ids = prompt(36, seed=3)
    for inner, kwargs in (("knorm", {}), ("streaming_llm", {"n_sink": 3})):
        press = make_press("decoding", press=make_press(inner, **kwargs), budget=18, compression_interval=7)
        before: list[dict[int, torch.Tensor]] = []  # per forward (the prefill first): keys before compression

        def capture(module, args, kwargs_, output):  # runs before the press's own hook: the uncompressed layer
            cache = adapter.cache_from_call(kwargs_)
            before.append({i: cache.layers[i].keys.clone() for i in adapter.compressible_layers})

        handle = adapter.decoder.register_forward_hook(capture, with_kwargs=True)
        try:
            tokens, _, kept_before, recompressed, cache, _ = decode_under(press, model, ids, steps=22)
        finally:
            handle.remove()
        assert sum(recompressed) == 3
        # Replay: the positions stored before each compressing step, and what was kept after it.
        after = kept_before[1:] + [{i: s.positions for i, s in decoding_states(cache).items()}]
        checked = 0
        for step, again in enumerate(recompressed):
            if not again:
                continue
            for i in adapter.compressible_layers:
                stored_positions = torch.cat(
                    [kept_before[step][i], torch.full((1, kept_before[step][i].shape[1], 1), 36 + step)], dim=-1
                )
                kept = after[step][i]
                for h in range(kept.shape[1]):
                    if inner == "knorm":
                        norms = before[step + 1][i][0, h].norm(dim=-1)
                        want = stored_positions[0, h][norms.topk(18, largest=False).indices].sort().values
                    else:
                        s = stored_positions[0, h]
                        want = torch.cat([s[:3], s[-(18 - 3):]])
                    assert kept[0, h].tolist() == want.tolist(), f"{inner} step {step} layer {i} head {h}"
                    checked += 1
        assert checked > 0


def test_pipeline_answers_under_the_press_and_keeps_the_context(tiny_model):
    tokenizer = build_tokenizer()
    model = tiny_model("llama")
    pipe = Pipeline(model, tokenizer)
    press = make_press("decoding", press=make_press("expected_attention", n_future_positions=16, n_sink=2),
                       compression_ratio=0.5, compression_interval=4, hidden_states_buffer_size=6)
    context = "the quick brown fox jumps over the lazy dog. " * 3
    ctx = pipe.compress(context, press=press)
    keys = [layer.keys.clone() for layer in ctx.cache.layers]
    state = dict(decoding_states(ctx.cache))
    answers = [ctx.generate_ids(q, max_new_tokens=12) for q in ("what jumps?", "who is lazy?")]
    assert [ctx.generate_ids(q, max_new_tokens=12) for q in ("what jumps?", "who is lazy?")] == answers
    for layer, k in zip(ctx.cache.layers, keys):
        assert torch.equal(layer.keys, k), "the context was changed by an answer"
    assert decoding_states(ctx.cache) == state, "the context's decoding state was replaced by an answer"
    assert decoding_state_nbytes(ctx.cache) > 0

    # The answer is generate's under the same press, continuing a fork (which does compress again: interval 4).
    q_ids = pipe.question_ids("what jumps?")
    ctx_ids = pipe.context_ids(context)
    fork = ctx.fork_cache()
    with torch.inference_mode(), press(model) as report:
        out = model.generate(input_ids=torch.cat([ctx_ids, q_ids], 1), max_new_tokens=12, do_sample=False,
                             **{pipe.adapter.cache_kwarg: fork})
    assert report.decoding_compressions >= 2
    theirs = out[0, ctx_ids.shape[1] + q_ids.shape[1]:].tolist()
    assert theirs[: len(answers[0])] == answers[0]
    assert A.layer_physical_length(fork, 0) < ctx_ids.shape[1] + q_ids.shape[1] + 11


def test_state_is_measured_and_does_not_hold_the_prefill(tiny_model):
    model = tiny_model("llama")
    adapter = A.ModelAdapter(model)
    hidden = model.config.hidden_size
    for inner, buffered in (("expected_attention", 5), ("knorm", 0)):  # KNorm reads no hidden states
        press = make_press("decoding", press=make_press(inner), budget=8, compression_interval=4,
                           hidden_states_buffer_size=5)
        assert press.buffer_size == buffered
        cache = adapter.new_cache()
        with torch.inference_mode(), press(model):
            model(input_ids=prompt(60), use_cache=True, **adapter.model_call_kwargs(cache))
            states = decoding_states(cache)
            assert sorted(states) == adapter.compressible_layers
            for s in states.values():
                assert s.hidden_states.shape == (1, buffered, hidden) and s.appended == 0 and s.length == 60
                assert s.hidden_states.untyped_storage().nbytes() == buffered * hidden * 4, "a view keeps the prefill"
                assert s.positions.shape == (1, 2, 8)
            assert decoding_state_nbytes(cache) == sum(s.nbytes() for s in states.values())
            for t in range(3):  # appended tokens: the buffer slides, positions follow without a compression
                model(input_ids=prompt(1, seed=t), use_cache=True, **adapter.model_call_kwargs(cache))
            for s in decoding_states(cache).values():
                assert s.appended == 3 and s.length == 63 and s.hidden_states.shape[1] == buffered
                assert s.positions[0, 0, -3:].tolist() == [60, 61, 62]

    # A buffer longer than what was seen holds every token, before and after a compression during decoding.
    press = make_press("decoding", press=make_press("expected_attention"), budget=8, compression_interval=3,
                       hidden_states_buffer_size=40)
    cache = adapter.new_cache()
    with torch.inference_mode(), press(model) as report:
        model(input_ids=prompt(30), use_cache=True, **adapter.model_call_kwargs(cache))
        assert {s.hidden_states.shape[1] for s in decoding_states(cache).values()} == {30}
        for t in range(3):
            model(input_ids=prompt(1, seed=t), use_cache=True, **adapter.model_call_kwargs(cache))
    assert report.decoding_compressions == 1
    assert {s.hidden_states.shape[1] for s in decoding_states(cache).values()} == {33}
    assert set(report.seen.values()) == {30}, "the report's per-layer counts describe the prefill"


def test_what_a_decoding_press_reads_matches_its_capabilities(tiny_model, calibration_artifact):
    """A scorer whose capabilities say it reads no hidden states keeps the same entries when they are replaced by
    noise (what lets a decoding press keep no buffer for it); the others do read them."""
    from kvsqueeze.presses import ScorerPress, list_presses, press_class
    from kvsqueeze.record import record_prefill

    model = tiny_model("llama")
    recorded = record_prefill(model, prompt(48))
    layer = recorded.layers[1]
    noisy = layer.replace(hidden_states=torch.randn_like(layer.hidden_states), projected_queries=None)
    checked = {True: [], False: []}
    for name in list_presses():
        cls = press_class(name)
        caps = getattr(cls, "capabilities", None)
        if not issubclass(cls, ScorerPress) or not hasattr(caps, "reads_hidden_states") or caps.needs_attention_weights:
            continue
        if not caps.uniform_layers:
            continue  # per-layer budgets: scored the same way as the uniform ones they extend
        extra = {"artifact": str(calibration_artifact("llama", caps.calibration))} if caps.calibration else {}
        press = cls(**extra)
        same = torch.equal(press.score(layer), press.score(noisy))
        assert same == (not caps.reads_hidden_states), f"{name}: reads_hidden_states={caps.reads_hidden_states}"
        checked[caps.reads_hidden_states].append(name)
    assert {"knorm", "keydiff", "streaming_llm", "random", "lagkv", "qfilters"} <= set(checked[False])
    assert {"expected_attention", "snapkv", "tova"} <= set(checked[True])


def test_what_a_decoding_press_refuses(tiny_model):
    model = tiny_model("llama")
    adapter = A.ModelAdapter(model)
    with pytest.raises(ValueError, match="no ratio/budget of its own"):
        make_press("decoding", press=make_press("knorm", compression_ratio=0.5), budget=8)
    with pytest.raises(ValueError, match="attention weights"):
        make_press("decoding", press=make_press("observed_attention"), budget=8)
    with pytest.raises(ValueError, match="its own budget"):
        make_press("decoding", press=make_press("pyramidkv"), budget=8)
    with pytest.raises(TypeError, match="ScorerPress"):
        make_press("decoding", press=make_press("adakv"), budget=8)
    for name, bad, error, message in (
        ("compression_interval", 0, ValueError, "compression_interval must be an int >= 1, got 0"),
        ("hidden_states_buffer_size", 0, ValueError, "hidden_states_buffer_size must be an int >= 1, got 0"),
        ("compression_interval", True, TypeError, "compression_interval must be an int, got True"),
    ):
        with pytest.raises(error, match=message):
            make_press("decoding", budget=8, **{name: bad})

    press = make_press("decoding", press=make_press("knorm"), budget=8, compression_interval=2)
    ids = prompt(20)

    # A cache another press compressed has no record of its entries' positions: continued like under any press
    # (new tokens kept), with a warning; continuing() refuses it.
    cache = adapter.new_cache()
    with torch.inference_mode():
        with make_press("knorm", compression_ratio=0.5)(model):
            model(input_ids=ids, use_cache=True, **adapter.model_call_kwargs(cache))
        with press(model) as report, pytest.warns(UserWarning, match="did not compress"):
            for t in range(3):
                model(input_ids=prompt(1, seed=t), use_cache=True, **adapter.model_call_kwargs(cache))
        assert report.decoding_compressions == 0 and A.layer_physical_length(cache, 0) == 10 + 3
        with pytest.raises(ValueError, match="needs a cache this press compressed"):
            with press.continuing(model, cache):
                pass

    # Padding in tokens appended to a cache this press keeps compressed: a recompression would keep the pads, and
    # the padding mask would no longer line up with what is stored. Refused, naming the padded row.
    cache = adapter.new_cache()
    batch = torch.cat([prompt(20, seed=1), prompt(20, seed=2)])
    with torch.inference_mode(), press(model):
        model(input_ids=batch, use_cache=True, **adapter.model_call_kwargs(cache))
        mask = torch.ones(2, 24, dtype=torch.long)
        mask[1, 20:22] = 0
        with pytest.raises(ValueError, match=r"cannot continue a padded batch: attention_mask has padding in row\(s\) \[1\]"):
            model(input_ids=prompt(4).repeat(2, 1), attention_mask=mask, use_cache=True,
                  **adapter.model_call_kwargs(cache))
        assert cache.get_seq_length() == 20  # refused before any layer stored a token

    # A scoring window longer than the buffer of queries: refused when built, and by the scoring itself.
    with pytest.raises(ValueError, match="window_size=6 .* hidden_states_buffer_size=4"):
        make_press("decoding", press=make_press("snapkv", window_size=6), budget=8, hidden_states_buffer_size=4)
    snap = make_press("decoding", press=make_press("snapkv", window_size=4), budget=8, compression_interval=2,
                      hidden_states_buffer_size=4)
    object.__setattr__(snap.press, "window_size", 6)  # a press whose window the check cannot see
    cache = adapter.new_cache()
    with torch.inference_mode(), snap(model):
        model(input_ids=ids, use_cache=True, **adapter.model_call_kwargs(cache))  # the prefill has 20 queries
        with pytest.raises(ValueError, match="last 6 queries.* 4 tokens"):
            for t in range(3):
                model(input_ids=prompt(1, seed=t), use_cache=True, **adapter.model_call_kwargs(cache))


def test_tokens_added_or_cropped_outside_the_press_keep_positions_right(tiny_model):
    """The state is read off the cache: tokens appended outside the press block, and a crop, leave the positions,
    the logical length and the logits equal to the masked dense reference."""
    model = tiny_model("llama")
    adapter = A.ModelAdapter(model)
    press = make_press("decoding", press=make_press("expected_attention", n_future_positions=16, n_sink=2),
                       budget=12, compression_interval=4, hidden_states_buffer_size=6)
    ids = prompt(20, seed=9)
    cache = adapter.new_cache()
    kwargs = adapter.model_call_kwargs(cache)
    tokens, logits_seen, kept_before = [], [], []
    with torch.inference_mode():
        with press(model):
            logits = model(input_ids=ids, use_cache=True, **kwargs).logits[:, -1]
        # 3 steps under the press, 3 outside it, a crop of the last 2, then 9 under it again.
        schedule = ["in"] * 3 + ["out"] * 3 + ["crop"] + ["in"] * 9
        for what in schedule:
            if what == "crop":
                cache.crop(-2)
                tokens, logits_seen, kept_before = tokens[:-2], logits_seen[:-2], kept_before[:-2]
                logits = logits_seen[-1]
                continue
            token = int(logits[0].argmax())
            tokens.append(token)
            kept_before.append({i: s.positions.clone() for i, s in decoding_states(cache).items()})
            block = press(model) if what == "in" else adapter.attention_for_cache(cache)
            with block:
                logits = model(input_ids=torch.tensor([[token]]), use_cache=True, **kwargs).logits[:, -1]
            logits_seen.append(logits)
    n_seen = 20 + len(tokens)
    for i, s in decoding_states(cache).items():
        assert s.length == cache.layers[i].get_seq_length() == n_seen
        assert s.positions.shape[-1] == A.layer_physical_length(cache, i)
        tail = s.positions[0, 0, s.positions.shape[-1] - s.appended:]
        assert tail.tolist() == list(range(n_seen - s.appended, n_seen))
    reference = masked_dense_logits(model, ids, tokens, kept_before)
    for step, (ours, theirs) in enumerate(zip(logits_seen, reference)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4, msg=f"step {step}: logits differ")


def test_the_buffer_holds_only_its_own_rows(tiny_model):
    """After a long turn the buffer is a fresh tensor of its own size, not a view of everything appended."""
    model = tiny_model("llama")
    adapter = A.ModelAdapter(model)
    press = make_press("decoding", press=make_press("expected_attention"), budget=8, compression_interval=500,
                       hidden_states_buffer_size=8)
    cache = adapter.new_cache()
    with torch.inference_mode(), press(model):
        model(input_ids=prompt(20), use_cache=True, **adapter.model_call_kwargs(cache))
        for n in (1, 150, 3):
            model(input_ids=prompt(n, seed=n), use_cache=True, **adapter.model_call_kwargs(cache))
            for s in decoding_states(cache).values():
                assert s.hidden_states.shape[1] == 8
                assert s.hidden_states.untyped_storage().nbytes() == 8 * model.config.hidden_size * 4


def test_recompressions_that_remove_nothing_are_not_made(tiny_model):
    model = tiny_model("llama")
    press = make_press("decoding", press=make_press("knorm"), budget=100, compression_interval=2)
    _, _, _, recompressed, cache, report = decode_under(press, model, prompt(20), steps=8)
    assert report.decoding_compressions == 0 and not any(recompressed)
    cache.crop(-3)  # the tokens appended are still the cache's own, so they can be cropped
    assert A.layer_physical_length(cache, 0) == 20 + 8 - 3


def test_answering_under_a_decoding_press_leaves_other_callers_alone(tiny_model):
    """The pipeline keeps compressing only its fork (``continuing``): other calls on the model meanwhile — another
    cache, another press block — are neither compressed nor refused."""
    model = tiny_model("llama")
    adapter = A.ModelAdapter(model)
    press = make_press("decoding", press=make_press("knorm"), budget=10, compression_interval=2)
    with torch.inference_mode():
        mine = adapter.new_cache()
        with press(model):
            model(input_ids=prompt(24), use_cache=True, **adapter.model_call_kwargs(mine))
        other = adapter.new_cache()
        with press.continuing(model, mine) as report:
            for t in range(4):
                model(input_ids=prompt(1, seed=t), use_cache=True, **adapter.model_call_kwargs(mine))
            model(input_ids=prompt(30, seed=1), use_cache=True, **adapter.model_call_kwargs(other))
            with make_press("knorm", compression_ratio=0.5)(model):  # no press block is open on the model
                model(input_ids=prompt(16, seed=2), use_cache=True, **adapter.model_call_kwargs(adapter.new_cache()))
        assert report.decoding_compressions == 2
        assert not any(A.is_compressed_layer(other, i) for i in range(len(other.layers)))
        assert A.layer_physical_length(other, 0) == 30
        assert A.layer_physical_length(mine, 0) == 10
        # A block of another decoding press, open meanwhile (another thread's), leaves the driven cache to its
        # driver: it is kept at the driver's budget (10), not the block's (6), and the block does not warn.
        other_press = make_press("decoding", press=make_press("knorm"), budget=6, compression_interval=2)
        with press.continuing(model, mine) as report, other_press(model) as other_report, warnings.catch_warnings():
            warnings.simplefilter("error")
            for t in range(4):
                model(input_ids=prompt(1, seed=t), use_cache=True, **adapter.model_call_kwargs(mine))
        assert report.decoding_compressions == 2 and other_report.decoding_compressions == 0
        assert A.layer_physical_length(mine, 0) == 10
        # Without a driver, that block leaves a cache it did not compress alone too (with a warning).
        with other_press(model) as other_report, pytest.warns(UserWarning, match="did not compress"):
            for t in range(4):
                model(input_ids=prompt(1, seed=t), use_cache=True, **adapter.model_call_kwargs(mine))
        assert other_report.decoding_compressions == 0 and A.layer_physical_length(mine, 0) == 14


def test_a_decoding_press_must_be_the_outermost_press():
    decoding = make_press("decoding", press=make_press("knorm"), budget=8)
    for build in (
        lambda: make_press("composed", presses=[decoding]),
        lambda: make_press("criticalkv", press=decoding, compression_ratio=0.5),
        lambda: make_press("adakv", press=decoding, compression_ratio=0.5),
        lambda: make_press("per_layer", press=make_press("decoding", press=make_press("knorm")),
                           compression_ratios=[0.5]),
        lambda: make_press("key_rerotation", press=decoding),
        lambda: make_press("decoding", press=make_press("decoding", press=make_press("knorm")), budget=8),
    ):
        with pytest.raises(ValueError, match="outermost"):
            build()
    # A window too long for the buffer is found inside a wrapper too.
    with pytest.raises(ValueError, match="window_size=16"):
        make_press("decoding", press=make_press("criticalkv", press=make_press("snapkv", window_size=16)),
                   budget=8, hidden_states_buffer_size=4)


def _decode_rows(model, prompts: torch.Tensor, steps: torch.Tensor, press, change=None):
    """Feed ``prompts`` (rows, n) then the tokens ``steps`` (rows, k) one column at a time under ``press``;
    ``change(cache, t)`` may apply a row operation before step t and return the step tokens' new row order. Returns
    the logits of every step and the recorded positions at the end."""
    adapter = A.ModelAdapter(model)
    cache = adapter.new_cache()
    kwargs = adapter.model_call_kwargs(cache)
    logits = []
    with torch.inference_mode(), press(model) as report:
        model(input_ids=prompts, use_cache=True, **kwargs)
        for t in range(steps.shape[1]):
            if change is not None:
                steps = change(cache, t, steps)
            logits.append(model(input_ids=steps[:, t : t + 1], use_cache=True, **kwargs).logits[:, -1])
    assert report.decoding_compressions >= 2
    return logits, {i: s.positions for i, s in decoding_states(cache).items()}


def test_the_state_follows_the_caches_row_operations(tiny_model):
    """Beam search reorders a cache's rows between steps, generate() may repeat or select them: the recorded
    positions and the buffer of hidden states follow, so swapping two rows half-way gives exactly the run that
    had them in the swapped order from the start, and repeating a row gives the run of two equal rows."""
    model = tiny_model("llama")
    press = make_press("decoding", press=make_press("expected_attention", **INNER["expected_attention"]), budget=10,
                       compression_interval=3, hidden_states_buffer_size=4)
    a, b = prompt(16, seed=1), prompt(16, seed=2)
    steps_a, steps_b = prompt(10, seed=3), prompt(10, seed=4)

    # (row operation at step 4 and the new row order of the step tokens, prompts and steps of the run, those of
    # the reference run that has the resulting rows from the start)
    ab, ab_steps = torch.cat([a, b]), torch.cat([steps_a, steps_b])
    runs = {
        "swap": (lambda c: c.reorder_cache(torch.tensor([1, 0])), lambda s: s[[1, 0]], ab, ab_steps,
                 torch.cat([b, a]), torch.cat([steps_b, steps_a])),
        "select": (lambda c: c.batch_select_indices(torch.tensor([1])), lambda s: s[[1]], ab, ab_steps, b, steps_b),
        "repeat": (lambda c: c.batch_repeat_interleave(2), lambda s: s.repeat_interleave(2, dim=0), a, steps_a,
                   torch.cat([a, a]), torch.cat([steps_a, steps_a])),
    }
    for name, (operation, reorder, prompts, steps, want_prompts, want_steps) in runs.items():

        def change(cache, t, current, operation=operation, reorder=reorder):
            if t != 4:
                return current
            operation(cache)
            return reorder(current)

        got, positions = _decode_rows(model, prompts, steps, press, change)
        want, want_positions = _decode_rows(model, want_prompts, want_steps, press)
        for t in range(4, 10):
            torch.testing.assert_close(got[t], want[t], rtol=0, atol=1e-5, msg=f"{name}, step {t}")
        for i in positions:
            assert torch.equal(positions[i], want_positions[i]), f"{name}, layer {i}"


def test_beam_search_keeps_each_rows_positions(tiny_model):
    """Beam search under a decoding press: recompressions happen while beams are reordered, and every row's
    recorded positions still name its stored entries. Layer 0's keys depend only on (token, position), so each
    stored key must equal the layer-0 key of some token at the position recorded for it."""
    model = tiny_model("llama")
    adapter = A.ModelAdapter(model)
    press = make_press("decoding", press=make_press("knorm"), budget=10, compression_interval=3)
    ids = prompt(20, seed=5)
    cache = adapter.new_cache()
    with torch.inference_mode(), press(model) as report:
        out = model.generate(ids, max_new_tokens=12, num_beams=3, num_return_sequences=3, do_sample=False,
                             return_dict_in_generate=True, pad_token_id=0, **adapter.model_call_kwargs(cache))
    assert report.decoding_compressions >= 3 and out.sequences.shape == (3, 32)
    length = cache.get_seq_length()
    # Layer-0 keys of every token at every position: a batch of constant sequences.
    vocab = model.config.vocab_size
    table_cache = adapter.new_cache()
    with torch.inference_mode():
        model(input_ids=torch.arange(vocab)[:, None].expand(vocab, length), use_cache=True,
              **adapter.model_call_kwargs(table_cache))
    table = table_cache.layers[0].keys  # (vocab, kv_heads, length, d)
    stored = cache.layers[0].keys  # (3 beams, kv_heads, n, d)
    positions = decoding_states(cache)[0].positions  # (3, kv_heads, n)
    assert stored.shape[:3] == positions.shape
    for row in range(stored.shape[0]):
        for head in range(stored.shape[1]):
            assert bool((positions[row, head].diff() > 0).all()) and int(positions[row, head, -1]) == length - 1
            candidates = table[:, head, positions[row, head]]  # (vocab, n, d)
            matches = (candidates - stored[row, head]).abs().amax(-1) < 1e-5  # (vocab, n)
            assert bool(matches.any(0).all()), (row, head, matches.any(0))


def test_the_buffer_never_holds_a_replaced_token(tiny_model):
    """Tokens cropped and appended again outside the press are not the ones the buffer saw: after such a turn the
    buffer restarts, and a compression waits until it is full again (a window scorer never reads fewer queries
    than its window)."""
    model = tiny_model("llama")
    adapter = A.ModelAdapter(model)
    press = make_press("decoding", press=make_press("snapkv", window_size=4, kernel_size=1), budget=10,
                       compression_interval=2, hidden_states_buffer_size=6)
    cache = adapter.new_cache()
    kwargs = adapter.model_call_kwargs(cache)
    seen: dict[int, torch.Tensor] = {}  # position -> the layer-0 attention input of the token stored there

    def capture(module, args, kw, output):
        hidden = adapter.hidden_states_from_call(args, kw)
        first = cache.layers[0].get_seq_length() - hidden.shape[1]
        for j in range(hidden.shape[1]):
            seen[first + j] = hidden[0, j].clone()

    handle = adapter.attention_modules[0].register_forward_hook(capture, with_kwargs=True)
    try:
        with torch.inference_mode():
            with press(model):
                model(input_ids=prompt(12), use_cache=True, **kwargs)
                model(input_ids=prompt(1, seed=1), use_cache=True, **kwargs)
            cache.crop(-1)
            with adapter.attention_for_cache(cache):  # a different token at the cropped position, outside the press
                model(input_ids=prompt(1, seed=2), use_cache=True, **kwargs)
            with press(model) as report:
                buffered, compressions = [], []
                for t in range(8):
                    model(input_ids=prompt(1, seed=10 + t), use_cache=True, **kwargs)
                    state = decoding_states(cache)[0]
                    rows = state.hidden_states[0]
                    first = state.length - rows.shape[0]
                    for j in range(rows.shape[0]):
                        assert torch.equal(rows[j], seen[first + j]), f"step {t}: buffer row for position {first + j}"
                    buffered.append(rows.shape[0])
                    compressions.append(report.decoding_compressions)
    finally:
        handle.remove()
    # The buffer restarted after the outside token (1 row, then one more per step); the interval (2) was reached
    # long before, but the first compression waited until the buffer held its 6 rows, then one every 2 tokens.
    assert buffered == [1, 2, 3, 4, 5, 6, 6, 6]
    assert compressions == [0, 0, 0, 0, 0, 1, 1, 2]
