"""LagKV: score each partition of the cache relative to the statistics of the partition that follows it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvsqueeze.presses.base import Capabilities, LayerInputs, ScorerPress, check_int
from kvsqueeze.presses.registry import register_press


def _lag_relative_score(states: torch.Tensor) -> torch.Tensor:
    """Scores ``(bsz, heads, n_parts - 1, lag)`` of every partition but the last, from ``(bsz, heads, n_parts, lag,
    head_dim)`` keys or values: min-max normalise each channel by the next partition's range, take the spread
    (std) across channels per token, softmax within the partition."""
    current, reference = states[:, :, :-1], states[:, :, 1:]  # (bsz, heads, n_parts - 1, lag, head_dim)
    low = reference.amin(dim=-2, keepdim=True)  # (bsz, heads, n_parts - 1, 1, head_dim): per-channel range
    span = (reference.amax(dim=-2, keepdim=True) - low).clamp_min(torch.finfo(states.dtype).tiny)
    spread = ((current - low) / span).std(dim=-1)  # (bsz, heads, n_parts - 1, lag)
    return spread.softmax(dim=-1)


@register_press("lagkv")
@dataclass
class LagKVPress(ScorerPress):
    """Keep, in every partition of ``lag_size`` tokens, the tokens that stand out relative to the next partition.

    Paper: "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are Important",
    https://arxiv.org/abs/2504.04704

    Score: after ``n_sink`` sink tokens the sequence is cut into partitions of ``lag_size``. Each partition's keys
    (and, separately, values) are min-max normalised per channel by the range of the *next* partition; a token's
    score is the softmax, within its partition, of the standard deviation of its normalised channels; key and
    value scores are averaged. By default (``cross_scoring=False``) the score becomes the token's rank inside
    its partition divided by ``lag_size``, so every partition keeps about the same fraction, as in the paper's
    per-partition selection. The sinks and the last full partition plus the remainder (no reference follows
    them) are always kept: sinks first, then the most recent, if the budget is smaller than that set.

    Short inputs (fewer than ``n_sink + 2 * lag_size`` tokens, so no partition has a reference): nothing can be
    scored, so the press keeps the sinks and the most recent tokens (StreamingLLM behaviour, as in kvpress).

    In a composition after another press, LagKV works on the entries it is given, in their order: its sinks are
    the first ``n_sink`` kept entries and its partitions are runs of ``lag_size`` kept entries (the partitions
    follow the stream of kept entries, which may skip positions).

    Fields: ``compression_ratio`` (0.0), ``budget`` (None), ``n_sink`` (4), ``lag_size`` (128, >= 2),
    ``cross_scoring`` (False; True keeps the softmax scores, comparable across partitions and heads).
    """

    capabilities: ClassVar[Capabilities] = Capabilities(reads_hidden_states=False)

    n_sink: int = 4
    lag_size: int = 128
    cross_scoring: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.n_sink, "n_sink", minimum=0)
        check_int(self.lag_size, "lag_size (tokens per partition)", minimum=2)
        if not isinstance(self.cross_scoring, bool):
            raise TypeError(f"cross_scoring must be a bool, got {self.cross_scoring!r}")

    def score(self, layer: LayerInputs) -> torch.Tensor:
        bsz, num_kv_heads, seq_len, _ = layer.keys.shape
        device = layer.keys.device
        n_sink, lag = min(self.n_sink, seq_len), self.lag_size
        n_parts = (seq_len - n_sink) // lag
        positions = torch.arange(seq_len, device=device, dtype=torch.float32)
        # Protected entries score above every partition score (<= 1): sinks at 3, the rest 2 + rising position.
        scores = 2.0 + positions / seq_len
        scores[:n_sink] = 3.0
        scores = scores.expand(bsz, num_kv_heads, seq_len)
        if n_parts < 2:  # no partition has a reference: sinks + most recent
            return scores.clone()
        end = n_sink + n_parts * lag  # the scored partitions are [n_sink, end - lag)
        shape = (bsz, num_kv_heads, n_parts, lag, -1)  # (..., partition, token in partition, channel)
        key_score = _lag_relative_score(layer.keys[:, :, n_sink:end].float().reshape(shape))
        value_score = _lag_relative_score(layer.values[:, :, n_sink:end].float().reshape(shape))
        part = (key_score + value_score) / 2  # (bsz, num_kv_heads, n_parts - 1, lag)
        if not self.cross_scoring:
            part = part.argsort(dim=-1).argsort(dim=-1).float() / lag  # rank within the partition, in [0, 1)
        part = part.reshape(bsz, num_kv_heads, (n_parts - 1) * lag)
        return torch.cat([scores[..., :n_sink], part, scores[..., end - lag :]], dim=-1)
