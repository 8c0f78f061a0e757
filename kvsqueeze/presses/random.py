"""Random eviction: the floor every method must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvsqueeze.presses.base import Capabilities, LayerInputs, ScorerPress, check_seed
from kvsqueeze.presses.registry import register_press


@register_press("random")
@dataclass
class RandomPress(ScorerPress):
    """Evict uniformly random KV entries (a baseline, not a method).

    Score: i.i.d. uniform per (batch, head, token), drawn from a generator seeded with ``seed + layer_idx``, so a
    run is reproducible and layers differ. The generator lives on the CPU and the scores are moved to the keys'
    device, which works on any device.

    Fields: ``compression_ratio`` (0.0), ``budget`` (None), ``seed`` (0).
    """

    capabilities: ClassVar[Capabilities] = Capabilities(reads_hidden_states=False)

    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_seed(self.seed)

    def score(self, layer: LayerInputs) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + layer.layer_idx)
        return torch.rand(layer.keys.shape[:-1], generator=gen).to(layer.keys.device)
