"""SnapKV: score the context by the attention it receives from an observation window of the last tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from kvsqueeze.presses.base import LayerInputs, ScorerPress, check_int
from kvsqueeze.presses.registry import register_press
from kvsqueeze.presses.utils import group_mean, last_queries_attention, pool_scores, protect_last, protect_recent


@register_press("snapkv")
@dataclass
class SnapKVPress(ScorerPress):
    """Keep the entries the last ``window_size`` tokens attend to most, plus the window itself.

    Paper: "SnapKV: LLM Knows What You are Looking for Before Generation", https://arxiv.org/abs/2404.14469

    Score: softmax attention of each of the last ``w`` queries (the observation window) over the ``n - w`` earlier
    keys, averaged over the window queries, smoothed by a 1-D pooling of ``kernel_size`` along the sequence, then
    averaged over the query heads of each GQA group. The window itself scores above everything else, so it is
    always kept (the most recent entries first if the budget is smaller than the window). Attention comes from
    the eager weights when the model ran eager attention, otherwise it is recomputed for the window only.

    The paper sums the window's attention; the mean used here ranks identically. Without query-aware
    compression the window is the end of the context, not the question, which weakens the method. The defaults
    are kvpress's (window 64, kernel 5, average pooling); the paper's released configurations use a window of 32,
    kernel 7 and max pooling (``make_press("snapkv", window_size=32, kernel_size=7, pooling="max")``).

    After an earlier press of a composition (and in decoding-time compression) the window is the last ``w``
    *positions* of the context (:meth:`LayerInputs.positions`), not the last ``w`` stored entries: a head keeps
    the window entries it still holds and scores all the others; the pooling then runs over the kept entries in
    positional order, whose neighbours may be several positions apart. The window is then at most the number of
    stored entries minus one.

    Short inputs: the window shrinks to ``min(window_size, seq_len - 1)`` so at least one entry is scored; a
    one-entry layer gets a zero score.

    Fields: ``compression_ratio`` (0.0), ``budget`` (None), ``window_size`` (64), ``kernel_size`` (5, odd;
    1 disables pooling), ``pooling`` ("avg", or "max").
    """

    window_size: int = 64
    kernel_size: int = 5
    pooling: str = "avg"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.window_size, "window_size", minimum=1)
        check_int(self.kernel_size, "kernel_size", minimum=1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd so pooling keeps the sequence length, got {self.kernel_size}")
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"pooling must be 'avg' or 'max', got {self.pooling!r}")

    def window(self, seq_len: int) -> int:
        """Observation window used for a layer of ``seq_len`` entries (0 when there is nothing to score)."""
        return max(0, min(self.window_size, seq_len - 1))

    def score(self, layer: LayerInputs) -> torch.Tensor:
        seq_len, num_kv_heads = layer.seq_len, layer.keys.shape[1]
        if layer.key_positions is not None:  # not the context in order: the window is found by position
            return self._score_by_position(layer)
        w = self.window(seq_len)
        if w == 0:
            return layer.keys.new_zeros(layer.keys.shape[:-1], dtype=torch.float32)
        attn = last_queries_attention(layer, w)[..., : seq_len - w]  # (bsz, num_heads, w, seq_len - w)
        scores = attn.mean(dim=-2)  # (bsz, num_heads, seq_len - w)
        scores = pool_scores(scores, self.kernel_size, self.pooling)
        scores = group_mean(scores, num_kv_heads)  # (bsz, num_kv_heads, seq_len - w)
        return protect_last(F.pad(scores, (0, w)), w)

    def _score_by_position(self, layer: LayerInputs) -> torch.Tensor:
        """The same score when the keys are what an earlier press kept, or a decoding-time cache: the window is
        the last ``w`` positions of the context, whichever of them a head still holds, and the entries before it
        are scored. They sit in positional order before the window, so zeroing the window's columns before the
        pooling pads them exactly as the slice above does."""
        num_kv_heads = layer.keys.shape[1]
        # At most seq_len - 1 queries, as in a prefill: then even the earliest of them sees a stored key (fewer than
        # w positions follow it), and at least one entry is scored.
        w = min(self.window(layer.context_length), layer.seq_len - 1)
        if w <= 0:
            return layer.keys.new_zeros(layer.keys.shape[:-1], dtype=torch.float32)
        attn = last_queries_attention(layer, w)  # (bsz, num_heads, w, seq_len)
        in_window = layer.key_positions.to(attn.device) >= layer.context_length - w  # (bsz, num_kv_heads, seq_len)
        group = attn.shape[1] // num_kv_heads
        scores = attn.mean(dim=-2).masked_fill(in_window.repeat_interleave(group, dim=1), 0.0)
        scores = pool_scores(scores, self.kernel_size, self.pooling)
        return protect_recent(group_mean(scores, num_kv_heads), layer, w)
