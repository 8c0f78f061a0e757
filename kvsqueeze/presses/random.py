"""Random eviction: the floor every method must beat."""

from __future__ import annotations

import hashlib
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
    run is reproducible and layers differ. A compression after the prefill (every recompression of the
    ``decoding`` wrapper, every chunk of a chunked prefill: ``first_position > 0``) seeds it from ``seed``, the
    layer and the number of tokens seen, so each one draws afresh: reusing the prefill's draw would give every
    recompression the same scores by cache index, keeping the same slots each time instead of a uniform sample.
    The generator lives on the CPU and the scores are moved to the keys' device, which works on any device.

    Fields: ``compression_ratio`` (0.0), ``budget`` (None), ``seed`` (0).
    """

    capabilities: ClassVar[Capabilities] = Capabilities(reads_hidden_states=False)

    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_seed(self.seed)

    def score(self, layer: LayerInputs) -> torch.Tensor:
        seed = self.seed + layer.layer_idx
        if layer.first_position > 0:
            key = f"{self.seed}:{layer.layer_idx}:{layer.context_length}".encode()
            seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1
        gen = torch.Generator().manual_seed(seed)
        return torch.rand(layer.keys.shape[:-1], generator=gen).to(layer.keys.device)
