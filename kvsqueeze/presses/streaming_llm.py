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

    Score: 1 for the ``n_sink`` first and the last ``n_kept - n_sink`` tokens, 0 in between. The paper also
    re-assigns positions inside the cache ("pos-shift"); wrap this press in ``KeyRerotationPress`` for that.

    Fields: ``compression_ratio`` (0.0), ``budget`` (None), ``n_sink`` (4).
    """

    capabilities: ClassVar[Capabilities] = Capabilities(reads_hidden_states=False)

    n_sink: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.n_sink, "n_sink", minimum=0)

    def score(self, layer: LayerInputs) -> torch.Tensor:
        seq_len = layer.seq_len
        n_kept = self.layer_budget(layer)
        n_sink = min(self.n_sink, n_kept)
        positions = torch.arange(seq_len, device=layer.keys.device)
        keep = (positions < n_sink) | (positions >= seq_len - (n_kept - n_sink))
        # Rising with position inside each kept block, so ties never depend on topk's internal order.
        scores = keep.float() * 2 + positions.float() / seq_len
        return scores.expand(*layer.keys.shape[:2], seq_len)
