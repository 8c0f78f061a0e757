"""TOVA: keep the entries the last token attends to, averaged over the heads of the layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.presses.base import LayerInputs, ScorerPress
from kvsqueeze.presses.registry import register_press
from kvsqueeze.presses.utils import last_queries_attention, protect_last, protect_recent


@register_press("tova")
@dataclass
class TOVAPress(ScorerPress):
    """Keep the entries with the highest attention from the last token, averaged over all heads of the layer.

    Paper: "Transformers are Multi-State RNNs" (Token Omission Via Attention), https://arxiv.org/abs/2401.06104

    Score: softmax attention of the last query over every key, averaged over *all* query heads of the layer and
    repeated for every KV head, so all heads of a layer keep the same tokens. After an earlier press of a
    composition that kept different tokens per head, each token's attention is averaged over the heads by
    position (a head that no longer holds the token gives it none). Uses the eager attention row when
    the model ran eager attention, otherwise recomputes that single row.

    Deviation from the paper: the last token is always kept (its score is raised above the others; in a
    composition, the token at the last position, if an earlier press kept it); in TOVA it competes like any
    other token. Like kvpress, the paper's step-by-step eviction during decoding is replaced by
    one top-k at the end of the prefill.

    Fields: ``compression_ratio`` (0.0), ``budget`` (None).
    """

    def score(self, layer: LayerInputs) -> torch.Tensor:
        attn = last_queries_attention(layer, 1)[:, :, 0]  # (bsz, num_heads, seq_len)
        num_kv_heads = layer.keys.shape[1]
        if layer.key_positions is None:
            scores = attn.mean(dim=1, keepdim=True)  # (bsz, 1, seq_len): one score shared by all heads
            return protect_last(scores, 1).expand(-1, num_kv_heads, -1)
        # After an earlier press of a composition the KV heads may hold different tokens at one index: average each
        # token's attention over all query heads by position (a head that does not hold it gives it none), then
        # read every head's tokens back.
        bsz, num_heads, _ = attn.shape
        positions = layer.key_positions.to(attn.device).repeat_interleave(num_heads // num_kv_heads, dim=1)
        by_position = attn.new_zeros(bsz, num_heads, layer.context_length).scatter_(-1, positions, attn)
        token_scores = by_position.mean(dim=1, keepdim=True).expand(-1, num_kv_heads, -1)
        scores = token_scores.gather(-1, layer.key_positions.to(attn.device))
        return protect_recent(scores, layer, 1)
