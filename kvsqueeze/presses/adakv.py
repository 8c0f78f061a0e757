"""AdaKV: head-wise budgets for any scorer press — the layer's budget goes to the heads whose scores need it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvsqueeze.presses.base import (
    KV,
    Capabilities,
    LayerInputs,
    Press,
    RaggedKV,
    ScorerPress,
    check_wrapped_scorer,
    derived_capabilities,
    has_own_budget,
)
from kvsqueeze.presses.expected_attention import ExpectedAttentionPress
from kvsqueeze.presses.registry import register_press


def check_wrapped_budget(wrapper: Press, inner: Press) -> None:
    """A wrapper takes its ratio/budget either itself or from the press it wraps, not from both; and a press with
    per-layer budgets (PyramidKV, per-layer ratios) keeps them: a uniform ratio on the wrapper would replace
    them."""
    if has_own_budget(wrapper) and has_own_budget(inner):
        raise ValueError(
            f"set the compression ratio/budget on {type(wrapper).__name__} or on the wrapped "
            f"{type(inner).__name__}, not both (got {wrapper.compression_ratio!r}/{wrapper.budget!r} and "
            f"{inner.compression_ratio!r}/{inner.budget!r})"
        )
    if has_own_budget(wrapper) and not inner.capabilities.uniform_layers:
        raise ValueError(
            f"the wrapped {type(inner).__name__} gives each layer its own budget, which a uniform "
            f"compression_ratio/budget on {type(wrapper).__name__} ({wrapper.compression_ratio!r}/"
            f"{wrapper.budget!r}) would replace; set the ratio on the wrapped press instead"
        )


class WrappedBudget:
    """Mixin for wrappers of one ``press``: validation by the wrapped press, and the wrapper's own ratio/budget
    when set, otherwise the wrapped press's (:func:`check_wrapped_budget` refuses both)."""

    press: Press

    def validate(self, adapter) -> None:
        self.press.validate(adapter)

    def n_kept(self, seq_len: int) -> int:
        return super().n_kept(seq_len) if has_own_budget(self) else self.press.n_kept(seq_len)

    def own_layer_budget(self, layer: LayerInputs) -> int:
        return super().own_layer_budget(layer) if has_own_budget(self) else self.press.layer_budget(layer)


def check_alpha(alpha: object) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha_safeguard must be a number in [0, 1], got {alpha!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha_safeguard must be in [0, 1], got {alpha!r}")


def adaptive_head_budgets(scores: torch.Tensor, n_kept: int, alpha: float) -> torch.Tensor:
    """AdaKV's selection: keep mask ``(bsz, heads, seq_len)`` with ``heads × n_kept`` entries per sequence.

    Every head first keeps its own top ``max(1, int(alpha · n_kept))`` entries (the safeguard; at least one, so no
    head is left empty); the rest of the layer's
    budget goes to the highest remaining scores across all heads, so heads whose scores are concentrated give
    entries to heads whose scores are spread out.
    """
    bsz, heads, seq_len = scores.shape
    s = scores.float().clone()
    # At least one entry per head even for alpha·n_kept < 1: an empty head would have nothing to attend to.
    floor = max(1, int(alpha * n_kept))
    s.scatter_(-1, s.topk(floor, dim=-1, sorted=False).indices, float("inf"))
    chosen = s.reshape(bsz, heads * seq_len).topk(heads * n_kept, dim=-1, sorted=False).indices
    keep = torch.zeros(bsz, heads * seq_len, dtype=torch.bool, device=scores.device)
    keep.scatter_(-1, chosen, True)
    return keep.view(bsz, heads, seq_len)


@register_press("adakv")
@dataclass
class AdaKVPress(WrappedBudget, Press):
    """Wrap a scorer press with AdaKV's head-wise budget allocation.

    Paper: "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation", https://arxiv.org/abs/2407.11550

    The wrapped press scores every entry; instead of the top ``n_kept`` per head, the layer keeps the top
    ``heads × n_kept`` across all its heads, after guaranteeing each head its own top ``alpha_safeguard ·
    n_kept``. Heads end up with different numbers of entries and the cache stores exactly those (a ragged
    layer, see :class:`kvsqueeze.adapter.RaggedLayer`): the memory saving is real, unlike masking
    implementations that keep the evicted entries in memory. The default wrapped press is Expected Attention with
    its own defaults: its paper evaluates AdaKV(Expected Attention) (arXiv 2510.00636, §2.2), with epsilon = 0 on
    needle-in-a-haystack (the default, and the setting of this library's needle and RULER benchmarks) and 0.02
    on its other benchmarks (``press=make_press("expected_attention", epsilon=0.02)``; kvpress's registry entry
    ``expected_attention`` uses 0.01).

    Fields: ``press`` (a ScorerPress, default ExpectedAttentionPress()), ``alpha_safeguard`` (0.2, the official
    code's value for GQA models), ``compression_ratio``/``budget`` (set here or on the wrapped press).
    """

    press: ScorerPress = field(default_factory=ExpectedAttentionPress)
    alpha_safeguard: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_wrapped_scorer(self.press)
        check_alpha(self.alpha_safeguard)
        check_wrapped_budget(self, self.press)

    @derived_capabilities
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        return self.press.capabilities.merge(Capabilities(headwise=True))

    def keep_mask(self, layer: LayerInputs) -> torch.Tensor:
        """Kept entries ``(bsz, kv_heads, seq_len)``: ``kv_heads × n_kept`` per sequence, per-head counts vary."""
        n_kept = self.layer_budget(layer)
        if n_kept >= layer.seq_len:
            return torch.ones(layer.keys.shape[:3], dtype=torch.bool, device=layer.keys.device)
        scores = self.press.score(layer.replace(budget=n_kept))
        return adaptive_head_budgets(scores, n_kept, self.alpha_safeguard)

    def compress(self, layer: LayerInputs):
        if self.layer_budget(layer) >= layer.seq_len:  # nothing to remove: bit-identical
            return KV(layer.keys, layer.values)
        return RaggedKV.from_mask(layer.keys, layer.values, self.keep_mask(layer))
