"""The adapter's view of each supported architecture matches what transformers itself does.

For the six tiny architectures of ``conftest.py``: the queries and keys the adapter recomputes are the ones the
model's attention received, and the layers it calls compressible are exactly those of the cache transformers
builds that keep every token — also for configs with no ``layer_types`` whose every layer has a sliding window:
shorter than the context (Mistral-7B-v0.1, Phi-3-mini-4k), they must be refused with a clear error rather than
compressed as if full; longer than the maximum context (Phi-3-mini-128k), they are full attention in effect.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import kvsqueeze
from conftest import MAX_POSITIONS, MODEL_NAMES, build_model, build_tokenizer, prefill, token_ids
from kvsqueeze import adapter as A
from kvsqueeze.record import record_prefill

SEQ_LEN = 24
CAPTURE = "kvsqueeze_test_capture"


@pytest.fixture(scope="module")
def captured() -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """An attention function that records the (layer, query, key) it is called with, then runs sdpa."""
    calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def capture(module, query, key, value, attention_mask, **kwargs):
        calls.append((module.layer_idx, query.detach().clone(), key.detach().clone()))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(CAPTURE, capture)
    return calls


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_recomputed_queries_and_keys_are_what_the_attention_received(model_name, captured, single_thread):
    model = build_model(model_name, attn_implementation=CAPTURE)
    captured.clear()
    recorded = record_prefill(model, token_ids(SEQ_LEN, seed=21, batch=2))
    seen = {idx: (q, k) for idx, q, k in captured}
    adapter = recorded.adapter
    assert recorded.layers, model_name
    for layer in recorded.layers:
        query, key = seen[layer.layer_idx]
        with torch.inference_mode():
            torch.testing.assert_close(layer.queries(), query, rtol=1e-5, atol=1e-6)  # post-RoPE, from the capture
            hidden_only = layer.replace(projected_queries=None)  # projected again from the hidden states
            torch.testing.assert_close(hidden_only.queries(), query, rtol=1e-5, atol=1e-6)
            pre_keys = adapter.key_states(layer.module, layer.hidden_states)
            cos, sin = layer.position_embeddings
            torch.testing.assert_close(A.apply_rope(pre_keys, cos, sin), key, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.keys, key)


def _layout_cases():
    cases = [(name, {}) for name in MODEL_NAMES]
    cases += [
        ("qwen2", {"use_sliding_window": True, "max_window_layers": 1, "sliding_window": 8}),  # hybrid, no layer_types
        ("mistral", {"sliding_window": 16}),  # Mistral-7B-v0.1 style: every layer sliding
        ("phi3", {"sliding_window": 16}),  # Phi-3-mini-4k style
        # windows longer than the maximum context, on configs that type their layers: full attention in effect
        ("qwen2", {"use_sliding_window": True, "max_window_layers": 0, "sliding_window": 2 * MAX_POSITIONS}),
        ("qwen3", {"use_sliding_window": True, "max_window_layers": 1, "sliding_window": 2 * MAX_POSITIONS}),
        ("gemma3", {"sliding_window": 2 * MAX_POSITIONS}),
    ]
    return [pytest.param(name, overrides, id=f"{name}-{overrides or 'default'}") for name, overrides in cases]


@pytest.mark.parametrize("model_name, overrides", _layout_cases())
def test_compressible_layers_are_those_that_keep_every_token(model_name, overrides, single_thread):
    """Compressible = the layers of transformers' own cache that keep every token of a context as long as the model
    allows: full-attention layers, and sliding-window layers whose window is longer than that (the tiny Phi-3, as
    Phi-3-mini-128k). Layers that really slide are never compressed."""
    model = build_model(model_name, **overrides)
    adapter = A.ModelAdapter(model)
    n = MAX_POSITIONS - 8
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=token_ids(n, seed=22), use_cache=True, **adapter.model_call_kwargs(cache))
    keep_all = [i for i, layer in enumerate(cache.layers) if A.layer_kv(cache, i)[0].shape[-2] == n]
    assert adapter.compressible_layers == keep_all, (adapter.layer_types, [type(x).__name__ for x in cache.layers])


def test_hybrid_qwen2_compresses_only_its_full_attention_layer(single_thread):
    model = build_model("qwen2", use_sliding_window=True, max_window_layers=1, sliding_window=8)
    ids = token_ids(SEQ_LEN, seed=23)
    base, _, _ = prefill(model, ids)
    cache, report, _ = prefill(model, ids, kvsqueeze.make_press("knorm", compression_ratio=0.5))
    assert list(report.kept) == [0] and A.layer_physical_length(cache, 0) == SEQ_LEN // 2
    for i in (1, 2):  # sliding-window layers: left as transformers keeps them, equal to the run without a press
        assert isinstance(cache.layers[i], DynamicSlidingWindowLayer)
        for got, want in zip(A.layer_kv(cache, i), A.layer_kv(base, i), strict=True):
            assert torch.equal(got, want)


@pytest.mark.parametrize("model_name", ["mistral", "phi3"])
def test_model_with_every_layer_sliding_is_refused_clearly(model_name, single_thread):
    """Nothing to compress must not pass silently; the error says why and how to run the model with full attention."""
    model = build_model(model_name, sliding_window=16)
    assert A.ModelAdapter(model).compressible_layers == []
    press = kvsqueeze.make_press("knorm", compression_ratio=0.5)
    message = r"no full-attention layer.*sliding_window=16.*sliding_window=None"
    with pytest.raises(ValueError, match=message):
        with press(model):
            pass
    pipe = kvsqueeze.Pipeline(model, build_tokenizer())
    with pytest.raises(ValueError, match=message):
        pipe.compress("a context of a few words", press=press)
    with pytest.raises(ValueError, match=message):
        pipe.from_recorded(pipe.record("a context of a few words"), press)
    assert pipe.compress("a context of a few words").n_tokens > 0  # without a press the model still runs

    # The advice holds: inside the window, the same weights with sliding_window=None give the same logits, and
    # that model compresses.
    full = build_model(model_name, sliding_window=None)
    ids = token_ids(12, seed=24)
    with torch.inference_mode():
        torch.testing.assert_close(full(input_ids=ids).logits, model(input_ids=ids).logits)
    _, report, _ = prefill(full, ids, press)
    assert report.kept == {i: 6 for i in range(3)}


# -- RoPE whose frequencies depend on the call (dynamic NTK, longrope) -------------------------------------------
_FACTORS = [1.0, 1.5, 2.0, 3.0]  # rotary_dim 8 of the tiny Phi-3 (head_dim 16, partial rotary 0.5) has 4 frequencies
SCALED_ROPE = {
    "llama-dynamic": ("llama", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}}),
    "phi3-longrope": ("phi3", {
        "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": _FACTORS,
                            "long_factor": [4 * f for f in _FACTORS], "original_max_position_embeddings": 64,
                            "partial_rotary_factor": 0.5},
        "original_max_position_embeddings": 64,
    }),
}


def _rerotated_reference(adapter, layer, kept_values):
    """The kept entries' pre-RoPE keys rotated to the last positions with the ``cos, sin`` the prefill used."""
    from test_presses import match_rows

    idx = match_rows(kept_values, layer.values)
    pre = adapter.key_states(layer.module, layer.hidden_states)
    n, length = idx.shape[-1], layer.seq_len
    cos, sin = layer.position_embeddings
    kept = pre.gather(2, idx[..., None].expand(-1, -1, -1, pre.shape[-1]))
    return A.apply_rope(kept, cos[:, length - n:], sin[:, length - n:])


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("scorer", ["knorm", "expected_attention"])
@pytest.mark.parametrize("seq_len", [40, 100], ids=["short", "past-original-max"])
@pytest.mark.parametrize("variant", list(SCALED_ROPE))
def test_rerotated_keys_use_the_frequencies_of_the_prefill(variant, seq_len, scorer):
    """KeyRerotation used to read the rotary module's current inverse frequencies, which dynamic NTK and longrope
    change with the length of the module's latest call: Expected Attention's call at future positions (inside the
    same hook), or any other forward between a recording and its compression, made it rotate with frequencies the
    keys never had (errors of 2-4 in the keys)."""
    name, overrides = SCALED_ROPE[variant]
    model = build_model(name, **overrides)
    ids = token_ids(seq_len, seed=5)
    press = kvsqueeze.make_press("key_rerotation", press=kvsqueeze.make_press(scorer, compression_ratio=0.5))
    recorded = record_prefill(model, ids)
    cache, _, _ = prefill(model, ids, press)
    with torch.inference_mode():
        model(input_ids=token_ids(20, seed=6))  # another length between the recording and its compression
        for layer in recorded.layers:
            kept_k, kept_v = A.layer_kv(cache, layer.layer_idx)
            want = _rerotated_reference(recorded.adapter, layer, kept_v)
            torch.testing.assert_close(kept_k, want, rtol=1e-4, atol=1e-5, msg=f"layer {layer.layer_idx} (hook)")
            from_recording = press.compress(layer)
            torch.testing.assert_close(from_recording.keys, _rerotated_reference(recorded.adapter, layer, from_recording.values),
                                       rtol=1e-4, atol=1e-5, msg=f"layer {layer.layer_idx} (recording)")


def test_a_press_leaves_a_dynamic_rotary_module_as_the_prefill_left_it():
    """Expected Attention asks the rotary module for positions past the context; a dynamic-NTK module used to keep
    the frequencies it grew for them, so the model went on decoding with frequencies scaled for 512 more tokens."""
    name, overrides = SCALED_ROPE["llama-dynamic"]
    ids = token_ids(MAX_POSITIONS + 44, seed=9)  # past max_position_embeddings, where dynamic NTK rescales
    states = []
    for press in (None, kvsqueeze.make_press("expected_attention", compression_ratio=0.25)):
        model = build_model(name, **{**overrides, "rope_parameters": {**overrides["rope_parameters"], "factor": 2.0}})
        rotary = model.model.rotary_emb
        cache, _, _ = prefill(model, ids, press)
        states.append((rotary.inv_freq.clone(), int(rotary.max_seq_len_cached)))
        with torch.inference_mode():
            model(input_ids=torch.tensor([[11]]), use_cache=True, **A.ModelAdapter(model).model_call_kwargs(cache))
    (freq, length), (freq_press, length_press) = states
    assert length_press == length == MAX_POSITIONS + 44
    assert torch.equal(freq_press, freq)
    # the next token is computed with the frequencies of its own length in both runs (only the caches differ)
    assert int(rotary.max_seq_len_cached) == MAX_POSITIONS + 45


def _multimodal_gemma3():
    """A tiny Gemma3ForConditionalGeneration (text part as conftest's ``gemma3``, one vision layer)."""
    import transformers

    from conftest import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

    torch.manual_seed(0)
    text = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS, head_dim=16,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=8,
                pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=127, boi_token_index=125, eoi_token_index=126)
    return transformers.Gemma3ForConditionalGeneration(config).eval()


def test_a_padded_batch_is_refused_on_a_multimodal_wrapper():
    """Gemma 3's multimodal model hands its decoder a dict of 4-D masks, where the padding guard looked for the
    2-D mask: a left-padded batch went through and its pad entries were scored and kept like tokens. The 2-D mask
    is now checked where the wrapper receives it; the same batch unpadded compresses."""
    model = _multimodal_gemma3()
    ids = token_ids(20, seed=1, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    press = kvsqueeze.make_press("knorm", compression_ratio=0.5)
    for call in (lambda m: model(input_ids=ids, attention_mask=m, use_cache=True),
                 lambda m: model.generate(ids, attention_mask=m, max_new_tokens=2, do_sample=False, pad_token_id=0)):
        with pytest.raises(ValueError, match=r"padded batch.*row\(s\) \[1\] of 2"):
            with torch.inference_mode(), press(model):
                call(mask)
        with torch.inference_mode(), press(model) as report:
            call(torch.ones_like(ids))
        assert report.kept == {1: 10}, report.kept


def test_a_padded_continuation_under_a_decoding_press_is_refused_on_a_multimodal_wrapper():
    """The decoding press refuses padding in tokens appended to a cache it keeps compressed; on Gemma 3's
    multimodal model the 2-D mask only reaches the wrapper (its decoder gets 4-D masks), and is checked there."""
    model = _multimodal_gemma3()
    adapter = A.ModelAdapter(model)
    press = kvsqueeze.make_press("decoding", press=kvsqueeze.make_press("knorm"), budget=8, compression_interval=2)
    cache = adapter.new_cache()
    with torch.inference_mode(), press(model):
        model(input_ids=token_ids(20, seed=1, batch=2), use_cache=True, **adapter.model_call_kwargs(cache))
        mask = torch.ones(2, 24, dtype=torch.long)
        mask[1, 20:22] = 0
        with pytest.raises(ValueError, match=r"cannot continue a padded batch: .*row\(s\) \[1\]"):
            model(input_ids=token_ids(4, seed=3).repeat(2, 1), attention_mask=mask, use_cache=True,
                  **adapter.model_call_kwargs(cache))
        assert cache.get_seq_length() == 20
        model(input_ids=token_ids(4, seed=3).repeat(2, 1), attention_mask=torch.ones_like(mask), use_cache=True,
              **adapter.model_call_kwargs(cache))  # unpadded: continued
        assert cache.get_seq_length() == 24


@pytest.mark.parametrize("model_name, overrides", [
    ("qwen2", {"use_sliding_window": True, "max_window_layers": 0, "sliding_window": 2 * MAX_POSITIONS}),
    ("gemma3", {"sliding_window": 2 * MAX_POSITIONS}),
], ids=["qwen2", "gemma3"])
def test_windows_longer_than_the_context_are_compressed_exactly(model_name, overrides, single_thread):
    """Sliding-typed layers whose window covers the whole maximum context (they were left uncompressed, and a Qwen2
    with no full-attention layer was refused) are compressed, and the next tokens see exactly what was kept: the
    uncompressed model with its attention masked to the kept entries gives the same logits."""
    from test_decoding import masked_chunk_logits
    from test_presses import match_rows

    model = build_model(model_name, **overrides)
    adapter = A.ModelAdapter(model)
    assert adapter.compressible_layers == list(range(adapter.shape.num_layers))
    ids = token_ids(40, seed=25)
    full, _, _ = prefill(model, ids)
    cache, report, _ = prefill(model, ids, kvsqueeze.make_press("knorm", compression_ratio=0.5))
    assert report.kept == {i: 20 for i in range(adapter.shape.num_layers)}
    kept = {i: match_rows(A.layer_kv(cache, i)[1], A.layer_kv(full, i)[1]) for i in adapter.compressible_layers}
    steps = [torch.tensor([[t]]) for t in (7, 19, 33)]
    got = []
    with torch.inference_mode():
        for step in steps:
            got.append(model(input_ids=step, use_cache=True, **adapter.model_call_kwargs(cache)).logits[:, -1])
    grown = []
    for n in range(len(steps)):  # the appended tokens are kept, after the compressed context
        grown.append({i: torch.cat([p, torch.arange(40, 40 + n).expand(*p.shape[:2], n)], -1) for i, p in kept.items()})
    want = masked_chunk_logits(model, [ids, *steps], [{}, *grown])[1:]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_attention_implementations_of_a_multimodal_model_are_read_and_restored_per_sub_model():
    """The adapter reads the decoder's (text config's) implementation and switches only the decoder's: a vision
    tower running another implementation keeps it, inside the block and after; before, the top-level config was
    read (an eager text model was refused by eager-only presses) and one string restored everywhere."""
    model = _multimodal_gemma3()

    def implementations():
        c = model.config
        return c._attn_implementation, c.text_config._attn_implementation, c.vision_config._attn_implementation

    ids = token_ids(20, seed=3)
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "eager"})
    headwise = kvsqueeze.make_press("adakv", press=kvsqueeze.make_press("knorm"), compression_ratio=0.5)
    with torch.inference_mode(), headwise(model):
        assert implementations() == ("sdpa", "kvsqueeze_sdpa", "eager")
        model.generate(ids, max_new_tokens=3, do_sample=False)  # ragged layers need the ragged attention
    assert implementations() == ("sdpa", "sdpa", "eager")

    model.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
    assert A.ModelAdapter(model).attn_implementation == "eager"
    with torch.inference_mode(), kvsqueeze.make_press("observed_attention", compression_ratio=0.5)(model) as report:
        model(input_ids=ids, use_cache=True)
    assert report.kept == {1: 10}
    with torch.inference_mode(), headwise(model):
        model(input_ids=ids, use_cache=True)
    assert implementations() == ("sdpa", "eager", "sdpa")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name, overrides", [
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}),
    ("phi3", SCALED_ROPE["phi3-longrope"][1]),
    ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}),
], ids=["llama-dynamic", "phi3-longrope", "gemma3-layer-typed-dynamic"])
def test_asking_the_rotary_module_for_far_positions_changes_no_later_forward(name, overrides):
    """``adapter.rope`` at positions past the maximum leaves the model computing exactly as an untouched copy; a
    layer-typed module (Gemma 3) used to keep the ``full_attention_max_seq_len_cached`` the call created, so its
    next forward skipped its own rescaling (logits off by 0.17)."""
    untouched, used = build_model(name, **overrides), build_model(name, **overrides)
    adapter = A.ModelAdapter(used)
    with torch.inference_mode():
        adapter.rope(adapter.compressible_layers[0], torch.arange(2 * MAX_POSITIONS + 88)[None], torch.zeros(1))
        ids = token_ids(MAX_POSITIONS + 44, seed=1)
        torch.testing.assert_close(used(input_ids=ids).logits, untouched(input_ids=ids).logits, rtol=0, atol=0)
