"""The masked dense reference for head-wise (ragged) caches, shared by the tiny-model and real-model tests.

The reference keeps the whole uncompressed cache and hides, with a 4-D mask per layer, every entry a press
evicted for each (sequence, KV head); the ragged cache must give the same logits and greedy tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from kvsqueeze import adapter as A


@contextmanager
def masked_dense(model, ids: torch.Tensor, keep: dict[int, torch.Tensor]) -> Iterator[object]:
    """Prefill ``ids`` uncompressed and yield its cache; while the block runs, every layer in ``keep`` hides the
    context entries its mask drops (per KV head) and sees the appended tokens causally."""
    adapter = A.ModelAdapter(model)
    cache = adapter.new_cache()
    n_ctx, bsz = ids.shape[1], ids.shape[0]
    groups = adapter.shape.num_attention_heads // adapter.shape.num_key_value_heads
    with torch.inference_mode():
        model(input_ids=ids, use_cache=True, **adapter.model_call_kwargs(cache))

    def pre_hook(module, args, kwargs):
        i = module.layer_idx
        q_len = adapter.hidden_states_from_call(args, kwargs).shape[1]
        n_tail = cache.layers[i].keys.shape[-2] + q_len - n_ctx
        ctx = keep[i].repeat_interleave(groups, dim=1)[:, :, None, :].expand(bsz, -1, q_len, n_ctx)
        tail = torch.arange(n_tail)[None, :] <= (n_tail - q_len) + torch.arange(q_len)[:, None]
        kwargs["attention_mask"] = torch.cat([ctx, tail[None, None].expand(bsz, ctx.shape[1], q_len, n_tail)], -1)
        return args, kwargs

    handles = [adapter.attention_modules[i].register_forward_pre_hook(pre_hook, with_kwargs=True) for i in keep]
    try:
        with torch.inference_mode():
            yield cache
    finally:
        for h in handles:
            h.remove()


def greedy(model, cache, first: torch.Tensor, steps: int) -> list[list[int]]:
    """``steps`` greedy tokens per sequence after feeding ``first`` ``(bsz, n)`` to ``cache``."""
    kwargs = A.ModelAdapter(model).model_call_kwargs(cache)
    tokens: list[list[int]] = [[] for _ in range(first.shape[0])]
    step = first
    with torch.inference_mode():
        for _ in range(steps):
            nxt = model(input_ids=step, use_cache=True, **kwargs).logits[:, -1].argmax(-1)
            for b, t in enumerate(nxt.tolist()):
                tokens[b].append(t)
            step = nxt[:, None]
    return tokens


def masked_dense_decode(model, ids, keep: dict[int, torch.Tensor], first: torch.Tensor, steps: int) -> list[list[int]]:
    """Greedy tokens from the uncompressed cache with every evicted entry hidden."""
    with masked_dense(model, ids, keep) as cache:
        return greedy(model, cache, first, steps)


def masked_dense_logits(model, ids, keep: dict[int, torch.Tensor], question: torch.Tensor) -> torch.Tensor:
    """Logits of ``question`` over the uncompressed cache with every evicted entry hidden."""
    with masked_dense(model, ids, keep) as cache:
        kwargs = A.ModelAdapter(model).model_call_kwargs(cache)
        return model(input_ids=question, use_cache=True, **kwargs).logits


def ragged_decode(model, cache, first: torch.Tensor, steps: int) -> list[list[int]]:
    """Greedy tokens from a (ragged) compressed cache, with kvsqueeze's attention over ragged layers."""
    with A.ragged_attention(model):
        return greedy(model, cache, first, steps)
