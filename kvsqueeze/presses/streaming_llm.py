"""StreamingLLM: attention sinks plus a window of recent tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvsqueeze.presses.base import Capabilities, LayerInputs, ScorerPress, check_int
from kvsqueeze.presses.registry import register_press


@register_press("streaming_llm")
@dataclass
class StreamingLLMPress(ScorerPress):
    """Keep the first ``n_sink`` tokens and the most recent ones, drop the middle.

    Paper: "Efficient Streaming Language Models with Attention Sinks", https://arxiv.org/abs/2309.17453

    Score: the ``n_sink`` first positions above everything, the others rising with position, so the press keeps
    the sinks and the most recent ``n_kept - n_sink`` tokens. After an earlier press of a composition, the sinks
    are the tokens at positions ``< n_sink`` that it kept (fewer if it removed some), and the recent entries fill
    the rest of the budget. The paper also re-assigns positions inside the cache ("pos-shift"); wrap this press
    in ``KeyRerotationPress`` for that.

    Fields: ``compression_ratio`` (0.0), ``budget`` (None), ``n_sink`` (4).
    """

    capabilities: ClassVar[Capabilities] = Capabilities(reads_hidden_states=False)

    n_sink: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.n_sink, "n_sink", minimum=0)

    def score(self, layer: LayerInputs) -> torch.Tensor:
        n_sink = min(self.n_sink, self.layer_budget(layer))
        # Sinks above everything, the rest rising with position: top-k keeps the sinks and the most recent
        # entries, and ties never depend on topk's internal order. By position, so after an earlier press of a
        # composition the sinks are the first positions a head still holds, not its first stored entries.
        positions = layer.positions().to(layer.keys.device).float()  # (bsz, num_kv_heads, seq_len)
        return (positions < n_sink).float() * 2 + positions / layer.context_length
