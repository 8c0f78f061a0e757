"""Observed attention (H2O-like): keep the entries that received the most attention during the prefill."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvsqueeze.presses.base import Capabilities, LayerInputs, ScorerPress
from kvsqueeze.presses.registry import register_press
from kvsqueeze.presses.utils import group_mean


@register_press("observed_attention")
@dataclass
class ObservedAttentionPress(ScorerPress):
    """Keep the "heavy hitters": entries with the highest average attention received over the prefill.

    Paper: "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
    https://arxiv.org/abs/2306.14048

    Score: for key ``i`` of ``n``, the sum over all queries of the attention it received, divided by the number of
    queries that can see it (``n - i``, causal), averaged over the query heads of each GQA group. Needs the full
    ``(bsz, num_heads, n, n)`` eager attention matrix, so the model must run ``attn_implementation="eager"``.

    Deviations from the paper, as in kvpress: H2O accumulates attention during decoding and evicts greedily step
    by step, keeping a separate budget of recent tokens; here the accumulated score is taken once over the
    prefill, normalised by the number of observing queries (otherwise early tokens win by construction), and
    every kept entry comes from one top-k (no reserved recent window).

    Fields: ``compression_ratio`` (0.0), ``budget`` (None).
    """

    capabilities: ClassVar[Capabilities] = Capabilities(needs_attention_weights=True, reads_hidden_states=False)

    def score(self, layer: LayerInputs) -> torch.Tensor:
        if layer.attentions is None:
            raise ValueError(
                f"{type(self).__name__} needs the eager attention weights of layer {layer.layer_idx}, but none were "
                "recorded; load the model with attn_implementation='eager' (and keep_attentions=True when "
                "recording a prefill)"
            )
        seq_len = layer.seq_len
        received = layer.attentions.sum(dim=-2, dtype=torch.float32)  # (bsz, num_heads, seq_len): column sums
        observers = torch.arange(seq_len, 0, -1, device=received.device, dtype=received.dtype)  # n - i
        return group_mean(received / observers, layer.keys.shape[1])
