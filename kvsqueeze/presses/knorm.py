"""KNorm: keep the keys with the smallest L2 norm."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvsqueeze.presses.base import Capabilities, LayerInputs, ScorerPress
from kvsqueeze.presses.registry import register_press


@register_press("knorm")
@dataclass
class KnormPress(ScorerPress):
    """Keep the KV pairs whose (post-RoPE) keys have the lowest L2 norm.

    Paper: "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression", https://arxiv.org/abs/2406.11430

    Score: ``-||k||_2``. Low-norm keys tend to receive high attention. The paper leaves layers 0 and 1
    uncompressed; like the reference implementations compared in the leaderboards, this press compresses every
    layer (wrap it in a per-layer press to skip some).

    Fields: ``compression_ratio`` (0.0), ``budget`` (None).
    """

    capabilities: ClassVar[Capabilities] = Capabilities(reads_hidden_states=False)

    def score(self, layer: LayerInputs) -> torch.Tensor:
        return -layer.keys.float().norm(dim=-1)
