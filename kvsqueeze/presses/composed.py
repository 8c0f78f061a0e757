"""ComposedPress: apply several presses one after the other on the same layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvsqueeze.presses.base import (
    Capabilities,
    LayerInputs,
    Press,
    check_not_decoding,
    derived_capabilities,
    gather_kv,
    has_own_budget,
)
from kvsqueeze.presses.registry import register_press


@register_press("composed")
@dataclass
class ComposedPress(Press):
    """Chain presses: each one compresses what the previous one kept.

    The kept fraction is the product of the inner presses' kept fractions (``1 - Π(1 - r_i)`` removed, up to
    integer rounding at each step). Every inner press sees the layer's full hidden states and position
    embeddings but only the keys/values its predecessors kept, with their original positions
    (``LayerInputs.key_positions``). What depends on position is found by position, not by index: window
    attention masks the future by position, Expected Attention averages RoPE over the positions after the
    context and its sinks are the kept tokens at positions ``< n_sink`` (likewise StreamingLLM's and SimLayerKV's
    sinks), SnapKV's and PyramidKV's observation window and TOVA's last token are the last positions of the
    context, whichever of them a head still holds. LagKV alone partitions the entries it is given in their
    order. Attention weights are handed to the first press only (they would be stale for the others), so a press
    that needs attention weights must come first. Inner presses must select the same number of entries in every
    head (:meth:`Press.keep_indices`): head-wise presses, presses that need extra model passes and presses that
    move keys are refused.

    Fields: ``presses`` (list of presses, required, applied in order). ``compression_ratio``/``budget`` of the
    composition itself must stay unset: each inner press carries its own.
    """

    presses: list[Press] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if has_own_budget(self):
            raise ValueError(
                "ComposedPress takes its ratios from its inner presses; "
                f"got compression_ratio={self.compression_ratio!r}, budget={self.budget!r}"
            )
        if not isinstance(self.presses, (list, tuple)) or not self.presses:
            raise ValueError(f"presses must be a non-empty list of presses, got {self.presses!r}")
        for i, p in enumerate(self.presses):
            if not isinstance(p, Press):
                raise TypeError(f"presses[{i}] must be a Press, got {type(p).__name__}")
            check_not_decoding(p, f"presses[{i}]")
            caps = p.capabilities
            if caps.headwise or caps.extra_passes or type(p).keep_indices is Press.keep_indices:
                raise ValueError(
                    f"presses[{i}] ({type(p).__name__}) cannot be chained: a composition passes each press the "
                    "entries the previous one kept, which needs presses that select the same number of entries in "
                    "every head from the prefill alone (Press.keep_indices; no head-wise budgets, no extra model "
                    "passes); wrap the composition's scorers instead, or use the press on its own"
                )
            if p.capabilities.changes_positions:
                raise ValueError(
                    f"presses[{i}] ({type(p).__name__}) moves keys to new positions; inside a composition a later "
                    "press would break the contiguous positions, and an earlier one hides the original positions"
                )
            if i > 0 and p.capabilities.needs_attention_weights:
                raise ValueError(
                    f"presses[{i}] ({type(p).__name__}) needs attention weights, which are only valid for the "
                    "first press of a composition"
                )

    @derived_capabilities
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        caps = self.presses[0].capabilities
        for p in self.presses[1:]:
            caps = caps.merge(p.capabilities)
        return caps

    def validate(self, adapter) -> None:
        for p in self.presses:
            p.validate(adapter)

    def n_kept(self, seq_len: int) -> int:
        for p in self.presses:
            seq_len = p.n_kept(seq_len)
        return seq_len

    def keep_indices(self, layer: LayerInputs) -> torch.Tensor | None:
        chosen = None  # indices into layer.keys of what the presses so far kept; None = everything
        step = layer
        for p in self.presses:
            idx = p.keep_indices(step)
            if idx is None:
                continue
            chosen = idx if chosen is None else chosen.gather(-1, idx)
            positions = layer.positions().gather(-1, chosen)
            kept = gather_kv(layer.keys, layer.values, chosen)
            step = layer.replace(
                keys=kept.keys, values=kept.values, key_positions=positions, attentions=None, budget=None
            )
        return chosen
