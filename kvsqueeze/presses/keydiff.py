"""KeyDiff: keep the keys that differ most from the average key direction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.nn import functional as F

from kvsqueeze.presses.base import Capabilities, LayerInputs, ScorerPress
from kvsqueeze.presses.registry import register_press


@register_press("keydiff")
@dataclass
class KeyDiffPress(ScorerPress):
    """Keep the geometrically distinctive keys: those least similar to the mean key direction of their head.

    Paper: "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in Resource-Constrained
    Environments", https://arxiv.org/abs/2504.15364

    Score: ``-cos(k_i, a)`` with the anchor ``a`` the mean of the L2-normalised (post-RoPE, cached) keys of the same
    head. Needs no attention weights.

    The paper evicts block by block while the prompt is prefilled under a fixed budget; this press scores the
    whole prefill at once (as kvpress's ``KeyDiffPress``; kvpress reproduces the paper's setting with a block-wise
    wrapper, which kvsqueeze does not have).

    Fields: ``compression_ratio`` (0.0), ``budget`` (None).
    """

    capabilities: ClassVar[Capabilities] = Capabilities(reads_hidden_states=False)

    def score(self, layer: LayerInputs) -> torch.Tensor:
        keys = F.normalize(layer.keys.float(), dim=-1)  # (bsz, num_kv_heads, seq_len, head_dim), unit norm
        anchor = F.normalize(keys.mean(dim=-2, keepdim=True), dim=-1)  # (bsz, num_kv_heads, 1, head_dim)
        return -(keys * anchor).sum(dim=-1)  # cosine, as both are unit vectors
