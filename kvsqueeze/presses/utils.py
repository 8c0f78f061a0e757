"""Neutral helpers shared by attention-based presses: window attention, GQA group averaging, pooling, protection.

Nothing here is a press. Every helper is vectorized over batch and heads and never reads values back to the host,
so it can run inside the per-layer hooks.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from kvsqueeze.presses.base import LayerInputs


@torch.no_grad()  # scoring never needs gradients, and recorded inputs may be inference-mode tensors
def window_attention(layer: LayerInputs, window_size: int) -> torch.Tensor:
    """Softmax attention of the last ``window_size`` queries over every cached key, recomputed in float32.

    The queries are recomputed post-RoPE (QK-norm included) from the layer's hidden states; keys are the cached
    post-RoPE keys, shared by the query heads of each GQA group. Logits are scaled by the module's scaling,
    softcapped when the model softcaps, and causally masked inside the window: query ``i`` of the window sits at
    position ``context_length - window_size + i`` and sees the keys whose original position is at most that
    (:meth:`LayerInputs.positions`: after an earlier press of a composition, key ``j`` is not at position ``j``).

    Parameters
    ----------
    layer : LayerInputs
        The layer's recorded inputs.
    window_size : int
        Number of trailing queries, ``1 <= window_size <= seq_len``.

    Returns
    -------
    Tensor
        ``(bsz, num_heads, window_size, seq_len)`` float32 attention weights; each row sums to 1.
    """
    seq_len, n_context = layer.seq_len, layer.context_length
    if not 1 <= window_size <= seq_len:
        raise ValueError(f"window_size must be in [1, seq_len={seq_len}], got {window_size}")
    queries = layer.queries(rope=True, last=window_size).float()  # (bsz, num_heads, w, head_dim)
    keys = layer.keys.float()  # (bsz, num_kv_heads, seq_len, head_dim)
    bsz, num_heads, _, head_dim = queries.shape
    num_kv_heads = keys.shape[1]
    group = num_heads // num_kv_heads
    # Query head h uses KV head h // group (transformers' repeat_kv order), so split heads as (kv_head, group)
    # and broadcast the keys over the group instead of copying them.
    q = queries.view(bsz, num_kv_heads, group, window_size, head_dim)
    logits = q @ keys.unsqueeze(2).transpose(-1, -2)  # (bsz, num_kv_heads, group, w, seq_len)
    logits = logits.reshape(bsz, num_heads, window_size, seq_len) * layer.adapter.scaling(layer.module)
    cap = layer.adapter.attention_softcap(layer.module)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    query_pos = torch.arange(n_context - window_size, n_context, device=logits.device)
    if layer.key_positions is None:
        key_pos = torch.arange(seq_len, device=logits.device)
        future = key_pos[None, :] > query_pos[:, None]  # (w, seq_len), True where the key is in the query's future
    else:  # per head: (bsz, kv_heads, 1, w, seq_len), broadcast over each GQA group
        key_pos = layer.key_positions.to(logits.device)
        future = (key_pos[:, :, None, None, :] > query_pos[:, None]).expand(-1, -1, group, -1, -1)
        future = future.reshape(bsz, num_heads, window_size, seq_len)
    logits = logits.masked_fill(future, float("-inf"))
    return logits.softmax(dim=-1)


def last_queries_attention(layer: LayerInputs, window_size: int) -> torch.Tensor:
    """Attention ``(bsz, num_heads, window_size, seq_len)`` float32 of the last queries: the eager weights the
    model computed when the layer has them, otherwise recomputed by :func:`window_attention`."""
    if layer.attentions is not None:
        return layer.attentions[..., -window_size:, :].float()
    return window_attention(layer, window_size)


def group_mean(x: torch.Tensor, num_key_value_heads: int) -> torch.Tensor:
    """Average per-query-head values over each GQA group: ``(bsz, num_heads, ...) -> (bsz, num_kv_heads, ...)``."""
    bsz, num_heads = x.shape[:2]
    if num_heads % num_key_value_heads:
        raise ValueError(f"num_heads ({num_heads}) is not a multiple of num_key_value_heads ({num_key_value_heads})")
    group = num_heads // num_key_value_heads
    return x.view(bsz, num_key_value_heads, group, *x.shape[2:]).mean(dim=2)


def pool_scores(scores: torch.Tensor, kernel_size: int, mode: str = "avg") -> torch.Tensor:
    """Smooth ``(bsz, heads, n)`` scores along the last dim with a same-length 1-D pooling (odd ``kernel_size``).

    ``mode`` is ``"avg"`` (zero padding counts in the mean, as in SnapKV's reference code) or ``"max"``.
    ``kernel_size == 1`` returns the scores unchanged.
    """
    if kernel_size == 1:
        return scores
    bsz, heads, n = scores.shape
    flat = scores.reshape(bsz * heads, 1, n)  # pooling works on (batch, channels, length)
    if mode == "avg":
        pooled = F.avg_pool1d(flat, kernel_size, stride=1, padding=kernel_size // 2)
    elif mode == "max":
        pooled = F.max_pool1d(flat, kernel_size, stride=1, padding=kernel_size // 2)
    else:
        raise ValueError(f"pooling must be 'avg' or 'max', got {mode!r}")
    return pooled.view(bsz, heads, n)


def protect_last(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Scores with the last ``n`` entries raised above every other one (no host sync), so top-k keeps them first.

    Inside the protected block the scores rise with position: if the budget is smaller than ``n`` the most recent
    entries win, never an arbitrary tie-break.
    """
    if n <= 0:
        return scores
    n = min(n, scores.shape[-1])
    top = scores.amax(dim=-1, keepdim=True)  # (..., 1)
    ramp = torch.arange(1, n + 1, device=scores.device, dtype=scores.dtype) / n  # (n,) in (0, 1]
    protected = top + 1.0 + ramp
    return torch.cat([scores[..., :-n], protected], dim=-1)


def protect_recent(scores: torch.Tensor, layer: LayerInputs, n: int) -> torch.Tensor:
    """Scores ``(bsz, num_kv_heads, seq_len)`` with the entries at the last ``n`` positions of the context
    (position ``>= context_length - n``) raised above every other one, rising with position.

    By position, not by index (:meth:`LayerInputs.positions`): after an earlier press of a composition the last
    ``n`` stored entries of a head are not the last ``n`` tokens, and a head may hold fewer of them. Keys that are
    the context in order take :func:`protect_last`'s path (no mask).
    """
    if layer.key_positions is None or n <= 0:
        return protect_last(scores, n)
    positions = layer.key_positions.to(scores.device)
    start = layer.context_length - n
    top = scores.amax(dim=-1, keepdim=True)
    ramp = (positions - start + 1).to(scores.dtype) / n  # in (0, 1] for the protected entries
    return torch.where(positions >= start, top + 1.0 + ramp, scores)
