"""The masked dense reference for head-wise (ragged) caches, shared by the tiny-model and real-model tests.

The reference keeps the whole uncompressed cache and hides, with a 4-D mask per layer, every entry a press
evicted for each (sequence, KV head); the ragged cache must give the same logits and greedy tokens.
"""

from __future__ import annotations

import torch

from kvsqueeze import adapter as A


def masked_dense_decode(model, ids, keep: dict[int, torch.Tensor], first: torch.Tensor, steps: int) -> list[list[int]]:
    """Greedy tokens from the uncompressed cache with every evicted entry hidden by a per-layer 4-D mask."""
    adapter = A.ModelAdapter(model)
    cache = adapter.new_cache()
    n_ctx = ids.shape[1]
    groups = adapter.shape.num_attention_heads // adapter.shape.num_key_value_heads
    with torch.inference_mode():
        model(input_ids=ids, use_cache=True, **adapter.model_call_kwargs(cache))

    def pre_hook(module, args, kwargs):
        i = module.layer_idx
        if i not in keep:
            return None
        q_len = adapter.hidden_states_from_call(args, kwargs).shape[1]
        n_tail = cache.layers[i].keys.shape[-2] + q_len - n_ctx
        bsz = ids.shape[0]
        ctx = keep[i].repeat_interleave(groups, dim=1)[:, :, None, :].expand(bsz, -1, q_len, n_ctx)
        tail = torch.arange(n_tail)[None, :] <= (n_tail - q_len) + torch.arange(q_len)[:, None]
        tail = tail[None, None].expand(bsz, ctx.shape[1], q_len, n_tail)
        kwargs["attention_mask"] = torch.cat([ctx, tail], dim=-1)
        return args, kwargs

    handles = [adapter.attention_modules[i].register_forward_pre_hook(pre_hook, with_kwargs=True) for i in keep]
    tokens = [[] for _ in range(ids.shape[0])]
    try:
        step = first
        with torch.inference_mode():
            for _ in range(steps):
                logits = model(input_ids=step, use_cache=True, **adapter.model_call_kwargs(cache)).logits[:, -1]
                nxt = logits.argmax(-1)
                for b, t in enumerate(nxt.tolist()):
                    tokens[b].append(t)
                step = nxt[:, None]
    finally:
        for h in handles:
            h.remove()
    return tokens


def ragged_decode(model, cache, first: torch.Tensor, steps: int) -> list[list[int]]:
    adapter = A.ModelAdapter(model)
    tokens = [[] for _ in range(first.shape[0])]
    with torch.inference_mode(), A.ragged_attention(model):
        step = first
        for _ in range(steps):
            logits = model(input_ids=step, use_cache=True, **adapter.model_call_kwargs(cache)).logits[:, -1]
            nxt = logits.argmax(-1)
            for b, t in enumerate(nxt.tolist()):
                tokens[b].append(t)
            step = nxt[:, None]
    return tokens


def masked_dense_logits(model, ids, keep, question) -> torch.Tensor:
    adapter = A.ModelAdapter(model)
    cache = adapter.new_cache()
    groups = adapter.shape.num_attention_heads // adapter.shape.num_key_value_heads
    n_ctx, q_len, bsz = ids.shape[1], question.shape[1], ids.shape[0]
    with torch.inference_mode():
        model(input_ids=ids, use_cache=True, **adapter.model_call_kwargs(cache))

    def pre_hook(module, args, kwargs):
        i = module.layer_idx
        ctx = keep[i].repeat_interleave(groups, dim=1)[:, :, None, :].expand(bsz, -1, q_len, n_ctx)
        tail = torch.tril(torch.ones(q_len, q_len, dtype=torch.bool))[None, None].expand(bsz, ctx.shape[1], q_len, q_len)
        kwargs["attention_mask"] = torch.cat([ctx, tail], dim=-1)
        return args, kwargs

    handles = [adapter.attention_modules[i].register_forward_pre_hook(pre_hook, with_kwargs=True) for i in keep]
    try:
        with torch.inference_mode():
            return model(input_ids=question, use_cache=True, **adapter.model_call_kwargs(cache)).logits
    finally:
        for h in handles:
            h.remove()
