"""PerLayerCompression: a different compression ratio for every layer, around any scorer press."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kvsqueeze.presses.base import (
    Capabilities,
    LayerInputs,
    ScorerPress,
    _check_ratio,
    check_budgetless_inner,
    check_wrapped_scorer,
    derived_capabilities,
    has_own_budget,
    kept_for_ratio,
)
from kvsqueeze.presses.registry import register_press


@register_press("per_layer")
@dataclass
class PerLayerCompressionPress(ScorerPress):
    """Compress layer ``l`` with its own ratio ``compression_ratios[l]``, scoring with the wrapped press.

    Layers end up with different lengths; the cache stores each layer's own count physically and masks are
    realigned per layer (:meth:`kvsqueeze.adapter.ModelAdapter.aligned_masks`), so no attention backend
    restriction applies. Entries for sliding-window layers of hybrid models are ignored (those layers are never
    compressed). The press is itself a scorer (its scores are the wrapped press's), so AdaKV can wrap it for
    head-wise budgets inside each layer's budget.

    Fields: ``press`` (ScorerPress, required; its own ratio must be 0), ``compression_ratios`` (one ratio in
    [0, 1) per model layer, required). ``compression_ratio``/``budget`` of the wrapper stay unset.
    """

    press: ScorerPress | None = None
    compression_ratios: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_wrapped_scorer(self.press)
        if has_own_budget(self):
            raise ValueError(
                "PerLayerCompressionPress takes one ratio per layer in compression_ratios; "
                f"got compression_ratio={self.compression_ratio!r}, budget={self.budget!r}"
            )
        check_budgetless_inner(self.press, "PerLayerCompressionPress", "compression_ratios")
        if not isinstance(self.compression_ratios, (list, tuple)) or not self.compression_ratios:
            raise ValueError(f"compression_ratios must be a non-empty list of ratios, got {self.compression_ratios!r}")
        for i, r in enumerate(self.compression_ratios):
            _check_ratio(r, f"compression_ratios[{i}]")

    @derived_capabilities
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        return self.press.capabilities.merge(Capabilities(uniform_layers=False))

    def validate(self, adapter) -> None:
        n = adapter.shape.num_layers
        if len(self.compression_ratios) != n:
            raise ValueError(
                f"compression_ratios has {len(self.compression_ratios)} entries, the model has {n} layers"
            )
        self.press.validate(adapter)

    def n_kept(self, seq_len: int) -> int:
        """Mean over layers of the kept count (each layer uses its own ratio)."""
        kept = [kept_for_ratio(seq_len, r) for r in self.compression_ratios]
        return math.floor(sum(kept) / len(kept))

    def own_layer_budget(self, layer: LayerInputs) -> int:
        if layer.layer_idx >= len(self.compression_ratios):
            raise ValueError(
                f"layer {layer.layer_idx} has no entry in compression_ratios ({len(self.compression_ratios)} given)"
            )
        return kept_for_ratio(layer.seq_len, float(self.compression_ratios[layer.layer_idx]))

    def score(self, layer: LayerInputs) -> torch.Tensor:
        return self.press.score(layer.replace(budget=self.layer_budget(layer)))
