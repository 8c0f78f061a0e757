"""Head-wise (ragged) caches: exact attention over per-head entry sets, equal to dense attention with the evicted
entries masked, through the attention function, the tiny models and the default model.

The reference everywhere is the *masked dense* computation: the uncompressed cache, with a 4-D mask per layer
that hides, for each (sequence, KV head), the entries the press evicted.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from kvsqueeze import adapter as A
from kvsqueeze import make_press
from kvsqueeze.pipeline import Pipeline
from kvsqueeze.presses.base import Capabilities, LayerInputs, Press, RaggedKV
from kvsqueeze.record import record_prefill

from conftest import EOS_ID, MODEL_NAMES, hook_counts, token_ids
from ragged_reference import masked_dense_decode, masked_dense_logits, ragged_decode

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------------------------------------------
# The attention function alone
# ----------------------------------------------------------------------------------------------------------------


def _random_valid(bsz: int, kv_heads: int, n_ctx: int, gen: torch.Generator) -> torch.Tensor:
    """Per-head validity of a padded context: head (b, h) keeps a random count in [1, n_ctx], padding after it."""
    counts = torch.randint(1, n_ctx + 1, (bsz, kv_heads), generator=gen)
    return torch.arange(n_ctx)[None, None, :] < counts[..., None]


def _dense_masked(query, key, value, valid, n_tail, scaling):
    """Reference: repeat KV heads, hide invalid context entries and future tail entries, softmax in float64."""
    bsz, n_heads, q_len, _ = query.shape
    groups = n_heads // key.shape[1]
    k = key.repeat_interleave(groups, dim=1).double()
    v = value.repeat_interleave(groups, dim=1).double()
    logits = query.double() @ k.transpose(-1, -2) * scaling
    kv_len = key.shape[-2]
    n_ctx = kv_len - n_tail
    visible = valid.repeat_interleave(groups, dim=1)[:, :, None, :].expand(bsz, n_heads, q_len, kv_len).clone()
    i = torch.arange(q_len)[:, None]
    j = torch.arange(n_tail)[None, :]
    visible[..., n_ctx:] &= (j <= n_tail - q_len + i)
    logits = logits.masked_fill(~visible, float("-inf"))
    return (logits.softmax(-1) @ v).transpose(1, 2).float()


@pytest.mark.parametrize("bsz", [1, 3])
@pytest.mark.parametrize("heads", [(4, 2), (6, 1), (4, 4)])  # (query heads, KV heads): GQA, MQA, MHA
@pytest.mark.parametrize("q_len", [1, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_ragged_attention_equals_masked_dense(bsz, heads, q_len, seed):
    gen = torch.Generator().manual_seed(seed)
    n_heads, n_kv = heads
    n_ctx, n_prev, d = 37, 3, 16
    n_tail = n_prev + q_len
    query = torch.randn(bsz, n_heads, q_len, d, generator=gen)
    key = torch.randn(bsz, n_kv, n_ctx + n_tail, d, generator=gen)
    value = torch.randn(bsz, n_kv, n_ctx + n_tail, d, generator=gen)
    valid = torch.cat([_random_valid(bsz, n_kv, n_ctx, gen), torch.ones(bsz, n_kv, n_tail, dtype=torch.bool)], -1)
    # Padding slots hold garbage: they must get exactly zero weight.
    key = torch.where(valid[..., None], key, torch.full_like(key, 1e3))
    want = _dense_masked(query, key, value, valid, n_tail, 0.25)
    for need_weights in (False, True):
        out, weights = A.ragged_attention_forward(query, key, value, valid, n_tail, None, 0.25, need_weights=need_weights)
        assert out.shape == (bsz, q_len, n_heads, d)
        torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
        if need_weights:
            groups = n_heads // n_kv
            hidden = ~valid.repeat_interleave(groups, 1)[:, :, None, :].expand_as(weights)
            assert weights[hidden].abs().max() == 0
    # The mask transformers builds for the new tokens (boolean or additive) gives the same result.
    causal = torch.arange(n_tail)[None, :] <= (n_tail - q_len) + torch.arange(q_len)[:, None]
    bool_mask = torch.cat([torch.ones(q_len, 11, dtype=torch.bool), causal], -1)[None, None]
    additive = torch.zeros(bool_mask.shape).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    for mask in (bool_mask, additive):
        out, _ = A.ragged_attention_forward(query, key, value, valid, n_tail, mask, 0.25)
        torch.testing.assert_close(out, want, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Through the models: random per-head budgets, then greedy decoding against the masked dense reference
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RandomHeadwisePress(Press):
    """Test press: every (sequence, KV head) keeps a random subset of random size (at least one entry)."""

    seed: int = 0

    capabilities: ClassVar[Capabilities] = Capabilities(headwise=True, uniform_layers=False)

    def keep_mask(self, layer: LayerInputs) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1000 + layer.layer_idx)
        bsz, heads, seq_len = layer.keys.shape[:3]
        keep = torch.rand(bsz, heads, seq_len, generator=gen) < torch.rand(bsz, heads, 1, generator=gen)
        keep[..., 0] = True  # never empty
        return keep

    def compress(self, layer: LayerInputs):
        return RaggedKV.from_mask(layer.keys, layer.values, self.keep_mask(layer))


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("bsz", [1, 2])
@pytest.mark.parametrize("press_name", ["random_headwise", "adakv"])
def test_decoding_20_tokens_equals_masked_dense(model_name, bsz, press_name, tiny_model):
    model = tiny_model(model_name)
    ids = token_ids(60, seed=21, batch=bsz)
    question = token_ids(7, seed=22, batch=bsz)[:, 1:]  # no BOS in the middle
    if press_name == "random_headwise":
        press = RandomHeadwisePress(seed=3)
    else:
        # AdaKV(Expected Attention), the default: it gives every tiny model ragged layers (AdaKV(KeyDiff) splits
        # the two heads of the tiny Gemma 3 evenly, which would leave the ragged path untested there)
        press = make_press("adakv", compression_ratio=0.6)
    recorded = record_prefill(model, ids)
    cache, _ = recorded.compress(press)
    keep = {layer.layer_idx: press.keep_mask(layer) for layer in recorded.layers}
    if press_name == "random_headwise":
        assert all(A.is_ragged_layer(cache, i) for i in keep), "the press produced no ragged layer"
    else:
        assert any(A.is_ragged_layer(cache, i) for i in keep), "AdaKV produced no ragged layer"
    hooks = hook_counts(model)
    # Logits of the question tokens first (q_len > 1 over the ragged context), then 20 greedy tokens.
    adapter = A.ModelAdapter(model)
    with torch.inference_mode(), A.ragged_attention(model):
        ragged_logits = model(input_ids=question, use_cache=True, **adapter.model_call_kwargs(A.fork_cache(cache))).logits
    assert model.config._attn_implementation == "sdpa", "ragged_attention did not restore the implementation"
    got = ragged_decode(model, A.fork_cache(cache), question, 20)
    want = masked_dense_decode(model, ids, keep, question, 20)
    assert got == want
    assert hook_counts(model) == hooks
    # Logits too, within float32 tolerance.
    torch.testing.assert_close(ragged_logits, masked_dense_logits(model, ids, keep, question), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_pipeline_and_generate_agree_on_a_ragged_cache(model_name, tiny_model, tokenizer):
    """The pipeline answers from the ragged cache, leaves it unchanged, and matches ``model.generate`` under the
    same press; the model's attention implementation is restored after every block."""
    model = tiny_model(model_name)
    pipe = Pipeline(model, tokenizer)
    press = make_press("adakv", press=make_press("knorm"), compression_ratio=0.5)
    context = "the quick brown fox jumps over the lazy dog while the cat sleeps in the sun. " * 2
    ctx = pipe.compress(context, press=press)
    assert any(A.is_ragged_layer(ctx.cache, i) for i in pipe.adapter.compressible_layers)
    before = {i: A.layer_entries(ctx.cache, i) for i in range(len(ctx.cache.layers))}
    answers = [ctx.generate_ids(q, max_new_tokens=8) for q in ("what?", "who sleeps?", "what?")]
    assert answers[0] == answers[2]
    for i, (k, v, n) in before.items():
        k2, v2, n2 = A.layer_entries(ctx.cache, i)
        assert torch.equal(k, k2) and torch.equal(v, v2) and torch.equal(n, n2), f"layer {i} changed"
        assert ctx.cache.layers[i].get_seq_length() == ctx.n_tokens
    assert model.config._attn_implementation == "sdpa"
    # model.generate inside the press block compresses the prompt in its prefill and decodes over the ragged
    # cache: the same greedy tokens as compressing the prompt and decoding by hand.
    ids = pipe.context_ids(context)
    with torch.inference_mode(), press(model):
        out = model.generate(input_ids=ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert model.config._attn_implementation == "sdpa"
    generated = out[0, ids.shape[1]:].tolist()
    cache, _ = record_prefill(model, ids).compress(press)
    with torch.inference_mode():
        first = model(input_ids=ids, logits_to_keep=1).logits[:, -1].argmax(-1)  # the prefill's own next token
    assert generated[0] == int(first)
    assert generated[1:] == ragged_decode(model, cache, first[:, None], 7)[0]


# ----------------------------------------------------------------------------------------------------------------
# Across the batch: beam search and several sequences per prompt
# ----------------------------------------------------------------------------------------------------------------


def test_selecting_rows_of_a_ragged_layer(tiny_model):
    """``reorder_cache`` / ``batch_repeat_interleave`` / ``batch_select_indices`` move whole sequences: row ``i``
    afterwards holds exactly the kept entries (per head) and appended tokens of the row it was taken from, and the
    layer it was forked from is untouched."""
    model = tiny_model("llama")
    ids = token_ids(40, seed=41, batch=3)
    cache, _ = record_prefill(model, ids).compress(RandomHeadwisePress(seed=5))
    with torch.inference_mode(), A.ragged_attention(model):
        model(input_ids=token_ids(3, seed=42, batch=3)[:, 1:], use_cache=True,
              **A.ModelAdapter(model).model_call_kwargs(cache))  # two appended tokens per row
    layer = cache.layers[0]

    def rows_of(lay):
        keys, values, valid = lay.padded()
        return [(keys[b][valid[b]], values[b][valid[b]], lay.lengths[b].clone()) for b in range(keys.shape[0])]

    before = rows_of(layer)
    for op, arg, picked in [
        ("reorder_cache", torch.tensor([2, 0, 0]), [2, 0, 0]),
        ("batch_repeat_interleave", 2, [0, 0, 1, 1, 2, 2]),
        ("batch_select_indices", torch.tensor([False, True, True]), [1, 2]),
        ("batch_select_indices", torch.tensor([1]), [1]),
    ]:
        fork = A.fork_cache(cache).layers[0]
        getattr(fork, op)(arg)
        after = rows_of(fork)
        assert len(after) == len(picked), op
        for (k, v, n), b in zip(after, picked):
            assert torch.equal(k, before[b][0]) and torch.equal(v, before[b][1]) and torch.equal(n, before[b][2]), op
        assert fork.get_seq_length() == layer.get_seq_length()
        assert rows_of(layer)[2][0].equal(before[2][0]), "the original layer changed"


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("press_name", ["random_headwise", "adakv"])
def test_beam_search_on_a_ragged_cache(model_name, press_name, tiny_model):
    """Beam search under a head-wise press: generate() reorders the ragged cache at every step, and each returned
    sequence's score equals its log-probability recomputed on the masked dense reference (the first token from the
    uncompressed prefill, the others over the compressed context). The random head-wise press keeps different
    entries in every row, so a reorder that moved the appended tokens but not the context would be caught."""
    model = tiny_model(model_name)
    ids = token_ids(60, seed=31)
    press = RandomHeadwisePress(seed=3) if press_name == "random_headwise" else make_press("adakv", compression_ratio=0.6)
    with torch.inference_mode(), press(model):
        out = model.generate(input_ids=ids, num_beams=3, num_return_sequences=3, max_new_tokens=6, do_sample=False,
                             length_penalty=0.0, return_dict_in_generate=True, output_scores=True)
    # Every hypothesis descends from the first of the 3 expanded rows (beam search starts from beam 0 only).
    recorded = record_prefill(model, ids.expand(3, -1))
    keep = {layer.layer_idx: press.keep_mask(layer)[:1] for layer in recorded.layers}
    with torch.inference_mode():
        first = model(input_ids=ids).logits[:, -1].log_softmax(-1)
    sequences = []
    for seq, score in zip(out.sequences, out.sequences_scores):
        gen = seq[ids.shape[1]:].tolist()
        if EOS_ID in gen:
            gen = gen[: gen.index(EOS_ID) + 1]
        sequences.append(gen)
        want = first[0, gen[0]]
        if len(gen) > 1:
            logp = masked_dense_logits(model, ids, keep, torch.tensor([gen[:-1]])).log_softmax(-1)
            want = want + logp[0, torch.arange(len(gen) - 1), torch.tensor(gen[1:])].sum()
        torch.testing.assert_close(score, want, rtol=0, atol=1e-4)
    assert len({tuple(g) for g in sequences}) == 3


def test_beam_search_continuing_a_ragged_context(tiny_model, tokenizer):
    """Beams from a given head-wise compressed context: the cache is expanded to the beams as transformers wants a
    given cache (``batch_repeat_interleave``), generate() reorders it, and the scores match the masked dense
    reference of the question and answer tokens."""
    model = tiny_model("llama")
    pipe = Pipeline(model, tokenizer)
    press = make_press("adakv", compression_ratio=0.6)
    text = "The quick brown fox jumps over the lazy dog. The magic number is 42, remember it. " * 2
    ctx = pipe.compress(text, press=press)
    assert any(A.is_ragged_layer(ctx.cache, i) for i in range(len(ctx.cache.layers)))
    ids, question = pipe.context_ids(text), pipe.question_ids("What is the magic number?")
    before = [{k: v.clone() for k, v in vars(layer).items() if isinstance(v, torch.Tensor)} for layer in ctx.cache.layers]
    cache = ctx.fork_cache()
    cache.batch_repeat_interleave(2)  # generate() expands the prompt, not a given cache
    with torch.inference_mode(), pipe.adapter.attention_for_cache(cache):
        out = model.generate(input_ids=torch.cat([ids, question], 1), num_beams=2, num_return_sequences=2,
                             max_new_tokens=5, do_sample=False, length_penalty=0.0, return_dict_in_generate=True,
                             output_scores=True, **pipe.adapter.model_call_kwargs(cache))
    recorded = record_prefill(model, ids)
    keep = {layer.layer_idx: press.keep_mask(layer) for layer in recorded.layers}
    n = ids.shape[1] + question.shape[1]
    for seq, score in zip(out.sequences, out.sequences_scores):
        gen = seq[n:].tolist()
        if EOS_ID in gen:
            gen = gen[: gen.index(EOS_ID) + 1]
        fed = torch.cat([question, torch.tensor([gen[:-1]], dtype=question.dtype)], 1)
        logp = masked_dense_logits(model, ids, keep, fed).log_softmax(-1)[0, question.shape[1] - 1:]
        torch.testing.assert_close(score, logp[torch.arange(len(gen)), torch.tensor(gen)].sum(), rtol=0, atol=1e-4)
    # Expanding and reordering the fork left the compressed context's tensors as they were.
    for layer, saved in zip(ctx.cache.layers, before):
        now = {k: v for k, v in vars(layer).items() if isinstance(v, torch.Tensor)}
        assert now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in saved)


@dataclass
class _ViewPress(Press):
    """Keeps its entries as *views* of the layer's keys and values (a slice): dense (the last half of every head)
    or ragged (packed segments that are a prefix of the flattened layer)."""

    ragged: bool = False
    capabilities: ClassVar[Capabilities] = Capabilities(headwise=True, uniform_layers=False)

    def compress(self, layer: LayerInputs):
        from kvsqueeze.presses.base import KV

        bsz, heads, seq_len, d = layer.keys.shape
        n = seq_len // 2
        if not self.ragged:
            return KV(layer.keys[..., -n:, :], layer.values[..., -n:, :])
        lengths = torch.full((bsz, heads), n - 1)
        lengths[:, 0] = n
        total = int(lengths.sum())
        return RaggedKV(layer.keys.reshape(-1, d)[:total], layer.values.reshape(-1, d)[:total], lengths)


@pytest.mark.parametrize("ragged", [False, True], ids=["dense", "ragged"])
def test_kept_views_are_counted_by_storage_and_copied_by_the_pipeline(ragged, tiny_model, tokenizer):
    """Bytes are measured from storage: kept entries that are views into the whole layer's buffer count (and keep
    alive) the whole buffer. The pipeline copies them down to their size, so a compressed context holds and reports
    only what it kept."""
    model = tiny_model("llama")
    press = _ViewPress(ragged=ragged)
    recorded = record_prefill(model, token_ids(41, seed=43))
    cache, _ = recorded.compress(press)
    assert all(A.is_ragged_layer(cache, i) == ragged for i in range(len(cache.layers)))
    owned = sum(
        sum(t.numel() * t.element_size() for t in (
            (layer.ctx_keys, layer.ctx_values, layer.lengths, layer.keys, layer.values) if ragged
            else (layer.keys, layer.values)))
        for layer in cache.layers
    )
    assert A.cache_nbytes(cache) > owned, "views into the full layers must count their whole buffers"
    A.compact_cache(cache)
    assert A.cache_nbytes(cache) == owned
    ctx = Pipeline(model, tokenizer).compress("The quick brown fox jumps over the lazy dog. " * 3, press=press)
    held = sum(t.untyped_storage().nbytes() for layer in ctx.cache.layers for t in vars(layer).values()
               if isinstance(t, torch.Tensor))
    assert ctx.cache_bytes == held and ctx.cache_bytes < 0.55 * ctx.full_cache_bytes


def test_ragged_cache_bytes_and_refusals(tiny_model):
    model = tiny_model("llama")
    ids = token_ids(64, seed=5)
    press = make_press("adakv", press=make_press("knorm"), compression_ratio=0.75)
    recorded = record_prefill(model, ids)
    cache, report = recorded.compress(press)
    full = A.cache_nbytes(recorded.cache)
    kept = sum(int(A.layer_head_lengths(cache, i).sum()) for i in range(len(cache.layers)))
    total = sum(int(A.layer_head_lengths(recorded.cache, i).sum()) for i in range(len(cache.layers)))
    assert kept == int(total * 0.25)
    assert A.cache_nbytes(cache) / full <= 0.25 + 0.02
    ragged = [i for i in range(len(cache.layers)) if A.is_ragged_layer(cache, i)]
    assert ragged, "AdaKV at 0.75 left every layer with equal heads"
    layer = cache.layers[ragged[0]]
    with pytest.raises(TypeError, match="head-wise"):
        A.layer_kv(cache, ragged[0])
    with pytest.raises(ValueError, match="only 0 were appended"):
        layer.crop(-1)


def test_ragged_cache_outside_ragged_attention_is_refused(tiny_model):
    """The model's own attention would attend a ragged layer's padding (silently wrong logits), so decoding on a
    head-wise cache outside ``with press(model)`` / the pipeline is refused; ``attention_for_cache`` makes the
    same call exact again (equal to decoding on a copy inside the press block)."""
    model = tiny_model("llama")
    adapter = A.ModelAdapter(model)
    press = make_press("adakv", press=make_press("knorm"), compression_ratio=0.75)
    step = torch.tensor([[7]])
    with torch.inference_mode(), press(model):
        out = model(input_ids=token_ids(64, seed=5))
        cache = A.ModelAdapter.cache_from_output(out)
        assert any(A.is_ragged_layer(cache, i) for i in range(len(cache.layers)))
        inside = model(input_ids=step, **adapter.model_call_kwargs(A.fork_cache(cache))).logits
    with torch.inference_mode():
        with pytest.raises(ValueError, match="head-wise compressed layers.*attention_for_cache"):
            model(input_ids=step, **adapter.model_call_kwargs(A.fork_cache(cache)))
        with adapter.attention_for_cache(cache):
            outside = model(input_ids=step, **adapter.model_call_kwargs(A.fork_cache(cache))).logits
    torch.testing.assert_close(outside, inside, rtol=0, atol=0)

    # The same refusal in another thread; and inside the block, a worker thread decodes (TextIteratorStreamer runs
    # generate in a thread): the attention switch is the model's, not the thread's.
    def decode_in_thread(results: list) -> None:
        try:
            with torch.inference_mode():
                results.append(model(input_ids=step, **adapter.model_call_kwargs(A.fork_cache(cache))).logits)
        except Exception as exc:  # noqa: BLE001 - the type is what the test checks
            results.append(exc)

    def in_thread() -> object:
        results: list = []
        worker = threading.Thread(target=decode_in_thread, args=(results,))
        worker.start()
        worker.join()
        return results[0]

    assert isinstance(in_thread(), ValueError)
    with adapter.attention_for_cache(cache):
        threaded = in_thread()
    assert isinstance(threaded, torch.Tensor), threaded
    torch.testing.assert_close(threaded, inside, rtol=0, atol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("n_new", [1, 3])
def test_uneven_layer_cache_outside_aligned_masks_is_refused(tiny_model, attn, n_new):
    """transformers builds one mask from one layer's sizes, which does not fit layers of other lengths (PyramidKV):
    outside the press block that used to be a bare shape error (or, for one SDPA token, happen to work). It is
    refused with a message naming the fix, and ``attention_for_cache`` gives the in-block logits exactly."""
    model = tiny_model("llama", attn)
    adapter = A.ModelAdapter(model)
    press = make_press("pyramidkv", compression_ratio=0.5)
    step = token_ids(n_new, seed=8)
    with torch.inference_mode(), press(model):
        cache = A.ModelAdapter.cache_from_output(model(input_ids=token_ids(64, seed=5)))
        assert len(set(A.layer_lengths(cache))) > 1
        inside = model(input_ids=step, **adapter.model_call_kwargs(A.fork_cache(cache))).logits
    with torch.inference_mode():
        fork = A.fork_cache(cache)
        with pytest.raises(ValueError, match=r"different numbers of context entries.*attention_for_cache"):
            model(input_ids=step, **adapter.model_call_kwargs(fork))
        with adapter.attention_for_cache(cache):
            outside = model(input_ids=step, **adapter.model_call_kwargs(A.fork_cache(cache))).logits
            threaded: list = []  # a worker thread inside the block (TextIteratorStreamer) decodes too
            worker = threading.Thread(target=lambda: threaded.append(
                model(input_ids=step, **adapter.model_call_kwargs(A.fork_cache(cache))).logits))
            worker.start()
            worker.join()
    torch.testing.assert_close(outside, inside, rtol=0, atol=0)
    torch.testing.assert_close(threaded[0], inside, rtol=0, atol=0)
    # Equal lengths need no alignment: a uniform press's cache decodes with the model's own attention.
    with torch.inference_mode(), make_press("knorm", compression_ratio=0.5)(model):
        uniform = A.ModelAdapter.cache_from_output(model(input_ids=token_ids(64, seed=5)))
    with torch.inference_mode():
        model(input_ids=step, **adapter.model_call_kwargs(uniform))


def test_ragged_attention_refuses_unknown_implementation(tiny_model):
    model = tiny_model("llama")
    model.config._attn_implementation_internal = "flex_attention"
    try:
        with pytest.raises(A.UnsupportedModelError, match="flex_attention"):
            with A.ragged_attention(model):
                pass
    finally:
        model.config._attn_implementation_internal = "sdpa"


def test_attention_switches_are_undone_when_the_block_raises(tiny_model):
    """An exception inside ``attention_for_cache`` (or a press block) restores the model's attention implementation
    and closes the process-wide switches: afterwards a head-wise cache is refused again, as before the block."""
    model = tiny_model("llama")
    adapter = A.ModelAdapter(model)
    press = make_press("adakv", press=make_press("knorm"), compression_ratio=0.75)
    with torch.inference_mode(), press(model):
        cache = A.ModelAdapter.cache_from_output(model(input_ids=token_ids(40, seed=3)))
    pyramid = make_press("pyramidkv", compression_ratio=0.5)
    with torch.inference_mode(), pyramid(model):
        uneven = A.ModelAdapter.cache_from_output(model(input_ids=token_ids(40, seed=4)))
    assert len({A.layer_physical_length(uneven, i) for i in adapter.compressible_layers}) > 1
    before = model.config._attn_implementation
    for block in (lambda: adapter.attention_for_cache(cache), lambda: adapter.attention_for_cache(uneven),
                  lambda: press(model)):
        with pytest.raises(RuntimeError, match="boom"):
            with block():
                raise RuntimeError("boom")
        assert model.config._attn_implementation == before
        step = torch.tensor([[7]])
        with torch.inference_mode():
            with pytest.raises(ValueError, match="head-wise compressed layers"):
                model(input_ids=step, **adapter.model_call_kwargs(A.fork_cache(cache)))
            with pytest.raises(ValueError, match="different numbers of context entries"):
                model(input_ids=torch.tensor([[7, 8, 9]]), **adapter.model_call_kwargs(A.fork_cache(uneven)))


@pytest.mark.parametrize("press_name", ["knorm", "adakv"])
def test_crop_removes_appended_tokens_and_keeps_their_positions(press_name, tiny_model):
    """``cache.crop(-n)`` (transformers' contract) removes tokens appended after compression: decoding them again
    gives the same logits (same positions), all of them may go, the compressed context itself may not."""
    model = tiny_model("llama")
    adapter = A.ModelAdapter(model)
    inner = make_press("knorm", compression_ratio=0.5)
    press = inner if press_name == "knorm" else make_press("adakv", press=make_press("knorm"), compression_ratio=0.5)
    ids = token_ids(40, seed=8)
    new = torch.tensor([[11, 12, 13]])
    with torch.inference_mode(), press(model):
        cache = A.ModelAdapter.cache_from_output(model(input_ids=ids))
        stored = A.layer_lengths(cache)
        first = model(input_ids=new, **adapter.model_call_kwargs(cache)).logits
        cache.crop(-2)
        assert cache.get_seq_length() == 41 and A.layer_lengths(cache) == [n + 1 for n in stored]
        again = model(input_ids=new[:, 1:], **adapter.model_call_kwargs(cache)).logits
        torch.testing.assert_close(again, first[:, 1:], rtol=1e-4, atol=1e-5)
        cache.crop(-3)
        assert cache.get_seq_length() == 40 and A.layer_lengths(cache) == stored
        with pytest.raises(ValueError, match="cannot crop 1 tokens: only 0 were appended"):
            cache.crop(-1)


# ----------------------------------------------------------------------------------------------------------------
# Left-padded tokens appended after compression
# ----------------------------------------------------------------------------------------------------------------


def _kept_context_masks(model, ids: torch.Tensor, cache) -> dict[int, torch.Tensor]:
    """Per compressed layer, which context positions each (sequence, KV head) stores, ``(bsz, kv_heads, n_ctx)``,
    found by matching the stored keys against an uncompressed prefill's (random tiny-model keys are distinct)."""
    adapter = A.ModelAdapter(model)
    full = adapter.new_cache()
    with torch.inference_mode():
        model(input_ids=ids, use_cache=True, **adapter.model_call_kwargs(full))
    masks = {}
    for i in adapter.compressible_layers:
        layer = cache.layers[i]
        if isinstance(layer, A.RaggedLayer):
            keys, _, valid = layer.padded()
            ctx, ctx_valid = keys[..., : layer.max_kept, :], valid[..., : layer.max_kept]
        else:
            ctx = layer.keys[..., : layer.n_compressed, :]
            ctx_valid = torch.ones(ctx.shape[:3], dtype=torch.bool)
        same = (ctx[:, :, :, None, :] == full.layers[i].keys[:, :, None, :, :]).all(-1) & ctx_valid[..., None]
        assert int(same.sum()) == int(ctx_valid.sum()), f"layer {i}: a stored entry matches no context position"
        masks[i] = same.any(2)
    return masks


PADDED_CONTINUATION = {
    "knorm": lambda: make_press("knorm", compression_ratio=0.5),
    "pyramidkv": lambda: make_press("pyramidkv", compression_ratio=0.5, window_size=2),
    "per_layer": lambda: make_press("per_layer", press=make_press("knorm"), compression_ratios=[0.25, 0.5, 0.75]),
    "adakv": lambda: make_press("adakv", press=make_press("knorm"), compression_ratio=0.5),
}


@pytest.mark.parametrize("press_name", list(PADDED_CONTINUATION))
@pytest.mark.parametrize("model_name", ["llama", "qwen3"])
def test_a_left_padded_question_after_compression_equals_the_masked_reference(model_name, press_name, tiny_model):
    """Two unpadded contexts compressed together, then questions of different lengths appended left-padded with a
    2-D attention mask: each row's logits equal the uncompressed model's with the evicted entries and the padding
    hidden. With a per-layer budget (PyramidKV, per_layer) the mask transformers builds from one layer is refitted
    to the others, and the padding columns must stay hidden there too."""
    model = tiny_model(model_name)
    adapter = A.ModelAdapter(model)
    ids = token_ids(20, seed=31, batch=2)
    question = token_ids(6, seed=32, batch=2)
    question_mask = torch.ones_like(question)
    question_mask[1, :3] = 0  # row 1: three pads, then a 3-token question
    nxt = token_ids(1, seed=33, batch=2)
    cache = adapter.new_cache()
    press = PADDED_CONTINUATION[press_name]()
    mask = torch.cat([torch.ones_like(ids), question_mask], dim=1)
    with torch.inference_mode(), press(model):
        model(input_ids=ids, use_cache=True, **adapter.model_call_kwargs(cache))
        lengths = {A.layer_physical_length(cache, i) for i in adapter.compressible_layers}
        if press_name in ("pyramidkv", "per_layer"):
            assert len(lengths) > 1, "the press should give layers different lengths"
        got = model(input_ids=question, attention_mask=mask, use_cache=True,
                    **adapter.model_call_kwargs(cache)).logits
        # One more token after the padded question: its pads are now among the appended entries.
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        got_step = model(input_ids=nxt, attention_mask=step_mask, use_cache=True,
                         **adapter.model_call_kwargs(cache)).logits
    keep = _kept_context_masks(model, ids, cache)
    pad = question_mask == 0

    # Reference: the uncompressed cache, per layer a 4-D mask hiding evicted entries and the question's padding.
    groups = adapter.shape.num_attention_heads // adapter.shape.num_key_value_heads
    q_len, n_ctx = question.shape[1], ids.shape[1]

    # The question and the next token in one forward: the same attention as two steps.
    fed = torch.cat([question, nxt], dim=1)
    n_fed = q_len + 1
    visible_fed = torch.ones(n_fed, n_fed, dtype=torch.bool).tril()[None, None] & ~torch.cat(
        [pad, torch.zeros(2, 1, dtype=torch.bool)], dim=1)[:, None, None, :]
    visible_fed = visible_fed | torch.eye(n_fed, dtype=torch.bool)  # a pad query sees itself: finite, never compared

    def pre_hook(module, args, kwargs):
        ctx = keep[module.layer_idx].repeat_interleave(groups, dim=1)[:, :, None, :].expand(-1, -1, n_fed, -1)
        kwargs["attention_mask"] = torch.cat([ctx, visible_fed.expand(-1, ctx.shape[1], -1, -1)], dim=-1)
        return args, kwargs

    reference_cache = adapter.new_cache()
    with torch.inference_mode():
        model(input_ids=ids, use_cache=True, **adapter.model_call_kwargs(reference_cache))
    handles = [adapter.attention_modules[i].register_forward_pre_hook(pre_hook, with_kwargs=True) for i in keep]
    try:
        with torch.inference_mode():
            want = model(input_ids=fed, use_cache=True, **adapter.model_call_kwargs(reference_cache)).logits
    finally:
        for h in handles:
            h.remove()
    assert n_ctx + n_fed == reference_cache.get_seq_length()
    torch.testing.assert_close(got[0], want[0, :q_len], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, 3:], want[1, 3:q_len], rtol=1e-5, atol=1e-5)  # row 1's real tokens
    torch.testing.assert_close(got_step[:, -1], want[:, -1], rtol=1e-5, atol=1e-5)  # the step after the pads



# ----------------------------------------------------------------------------------------------------------------
# cache.reset()
# ----------------------------------------------------------------------------------------------------------------


RESET_PRESSES = {
    "knorm": lambda: make_press("knorm", compression_ratio=0.5),
    "adakv": lambda: make_press("adakv", press=make_press("knorm"), compression_ratio=0.5),
    "decoding": lambda: make_press("decoding", press=make_press("knorm"), budget=10, compression_interval=2),
}


@pytest.mark.parametrize("press_name", list(RESET_PRESSES))
@pytest.mark.parametrize("model_name", ["llama", "gemma3"])
def test_a_reset_compressed_cache_is_like_a_new_one(model_name, press_name, tiny_model):
    """transformers' ``Cache.reset`` keeps the cache object and drops its contents: a compressed cache (dense,
    head-wise, or with decoding-time state) becomes an empty dynamic cache that holds nothing, is compressed anew
    under a press, and decodes like a new cache, with or without a press."""
    from kvsqueeze.presses.decoding import decoding_states

    model = tiny_model(model_name)
    adapter = A.ModelAdapter(model)
    press = RESET_PRESSES[press_name]()
    first, second = token_ids(24, seed=41), token_ids(20, seed=42)

    def run(cache, ids, under_press: bool):
        with torch.inference_mode(), (press(model) if under_press else contextlib.nullcontext()):
            return model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                                  output_logits=True, **adapter.model_call_kwargs(cache))

    for under_press in (True, False):
        cache = adapter.new_cache()
        run(cache, first, under_press=True)
        assert any(A.is_compressed_layer(cache, i) for i in range(len(cache.layers)))
        cache.reset()
        assert cache.get_seq_length() == 0 and A.cache_nbytes(cache) == 0
        assert not any(A.is_compressed_layer(cache, i) for i in range(len(cache.layers)))
        assert decoding_states(cache) == {}
        reused = run(cache, second, under_press)
        fresh_cache = adapter.new_cache()
        fresh = run(fresh_cache, second, under_press)
        assert torch.equal(reused.sequences, fresh.sequences)
        for a, b in zip(reused.logits, fresh.logits):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert A.layer_lengths(cache) == A.layer_lengths(fresh_cache)
