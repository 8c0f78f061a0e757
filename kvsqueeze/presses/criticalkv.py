"""CriticalKV and CriticalAdaKV: refine a scorer's selection by how much each value can move the layer output."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from kvsqueeze.presses.adakv import AdaKVPress, WrappedBudget, adaptive_head_budgets, check_wrapped_budget
from kvsqueeze.presses.base import (
    Capabilities,
    LayerInputs,
    Press,
    ScorerPress,
    check_wrapped_scorer,
    derived_capabilities,
)
from kvsqueeze.presses.expected_attention import ExpectedAttentionPress
from kvsqueeze.presses.registry import register_press


def _default_inner() -> ScorerPress:
    # The paper's bound already multiplies by ‖W_o v‖₁; Expected Attention's own ‖v‖ factor would count it twice.
    return ExpectedAttentionPress(use_vnorm=False)


def _check_fields(press: Press) -> None:
    if getattr(press.press, "use_vnorm", False):
        warnings.warn(
            f"{type(press).__name__} multiplies by ‖W_o v‖₁ itself; the wrapped {type(press.press).__name__} with "
            "use_vnorm=True counts the value norm a second time (pass use_vnorm=False, as the default inner press does)",
            UserWarning,
            stacklevel=3,
        )
    for name in ("epsilon", "first_stage_ratio"):
        value = getattr(press, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(press.epsilon) and press.epsilon >= 0):
        raise ValueError(f"epsilon must be a finite number >= 0, got {press.epsilon!r}")
    if not 0.0 <= press.first_stage_ratio <= 1.0:
        raise ValueError(f"first_stage_ratio must be in [0, 1], got {press.first_stage_ratio!r}")


def non_negative(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` shifted per head to start at 0 when any is negative (attention-like), float32."""
    s = scores.float()
    low = s.amin(dim=-1, keepdim=True)
    return torch.where(low < 0, s - low, s)


def base_scores(press: ScorerPress, layer: LayerInputs) -> torch.Tensor:
    """The wrapped press's scores made non-negative per head (:func:`non_negative`), float32."""
    return non_negative(press.score(layer))


def _rank(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry along the last dim, 0 = highest score."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    return order.argsort(dim=-1)


def first_stage(scores: torch.Tensor, n_kept: torch.Tensor, first_stage_ratio: float) -> torch.Tensor:
    """Stage 1: each head's top ``int(first_stage_ratio · n_kept)`` entries by ``scores``, mask ``(bsz, heads, n)``."""
    n1 = (n_kept.float() * first_stage_ratio).floor().long()
    return _rank(scores) < n1.unsqueeze(-1)


def two_stage_keep(
    scores: torch.Tensor, vnorm: torch.Tensor, n_kept: torch.Tensor, first_stage_ratio: float, epsilon: float
) -> torch.Tensor:
    """CriticalKV's selection with per-head budgets ``n_kept`` ``(bsz, heads)``; keep mask ``(bsz, heads, seq_len)``.

    Stage 1 keeps each head's top ``int(first_stage_ratio · n_kept)`` entries by ``scores``; stage 2 fills the rest
    of the head's budget by ``(score + ε)·‖W_o v‖₁``.
    """
    stage1 = first_stage(scores, n_kept, first_stage_ratio)
    critical = ((scores + epsilon) * vnorm).masked_fill(stage1, float("inf"))
    return _rank(critical) < n_kept.unsqueeze(-1)


@register_press("criticalkv")
@dataclass
class CriticalKVPress(WrappedBudget, ScorerPress):
    """Wrap a scorer press with CriticalKV's two-stage selection.

    Paper: "CriticalKV: Optimizing KV Cache Eviction from an Output Perturbation Perspective" (Feng et al.),
    https://arxiv.org/abs/2502.03805

    Evicting entry ``i`` perturbs the attention output by at most ``a_i·‖W_o v_i‖₁`` (L1 bound), so attention
    alone misjudges entries with small or large projected values. Stage 1 keeps the top
    ``first_stage_ratio × n_kept`` entries by the wrapped press's score; stage 2 fills the rest of the budget by
    ``(score + ε)·‖W_o v_i‖₁``, the norm computed per query head and averaged over the GQA group. Scores of the
    wrapped press that can be negative (e.g. KNorm's ``-‖k‖``) are shifted per head to start at 0, since the
    bound needs attention-like non-negative scores (the paper only uses attention scores). The default wrapped
    press is Expected Attention without its own value-norm factor (``use_vnorm=False``), which would otherwise
    count the value twice.

    Fields: ``press`` (ScorerPress), ``epsilon`` (1e-4), ``first_stage_ratio`` (0.5), ``compression_ratio`` /
    ``budget`` (here or on the wrapped press).
    """

    press: ScorerPress = field(default_factory=_default_inner)
    epsilon: float = 1e-4
    first_stage_ratio: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_wrapped_scorer(self.press)
        _check_fields(self)
        check_wrapped_budget(self, self.press)

    @derived_capabilities
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        return self.press.capabilities

    def score(self, layer: LayerInputs) -> torch.Tensor:
        """Scores whose top ``n_kept`` per head are exactly the two-stage selection (stage 1 ranked first)."""
        n_kept = min(self.layer_budget(layer), layer.seq_len)
        scores = base_scores(self.press, layer.replace(budget=n_kept))
        vnorm = layer.adapter.value_output_norms(layer.module, layer.values)
        n = torch.full(scores.shape[:2], n_kept, device=scores.device)
        stage1 = first_stage(scores, n, self.first_stage_ratio)
        critical = (scores + self.epsilon) * vnorm
        top = critical.amax(dim=-1, keepdim=True)
        # Stage-1 entries above every stage-2 score, in their base-score order.
        return torch.where(stage1, top + 1.0 + scores / (scores.amax(-1, keepdim=True) + 1e-12), critical)


@register_press("critical_adakv")
@dataclass
class CriticalAdaKVPress(AdaKVPress):
    """AdaKV's head-wise budgets, then CriticalKV's two stages within each head's budget.

    Papers: https://arxiv.org/abs/2407.11550 (AdaKV) and https://arxiv.org/abs/2502.03805 (CriticalKV).

    The layer budget ``heads × n_kept`` is split across heads by AdaKV's rule on the wrapped press's scores
    (each head guaranteed ``alpha_safeguard × n_kept``); each head then selects its ``n_h`` entries in two stages:
    its top ``first_stage_ratio × n_h`` by score, the rest by ``(score + ε)·‖W_o v‖₁``. The cache stores each
    head's own entries (ragged layer), so the memory saving is real.

    Fields: ``press`` (ScorerPress, default Expected Attention without value norm), ``alpha_safeguard`` (0.2),
    ``epsilon`` (1e-4), ``first_stage_ratio`` (0.5), ``compression_ratio``/``budget``.
    """

    press: ScorerPress = field(default_factory=_default_inner)
    epsilon: float = 1e-4
    first_stage_ratio: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_fields(self)

    def keep_mask(self, layer: LayerInputs) -> torch.Tensor:
        """Kept entries ``(bsz, kv_heads, seq_len)``: ``kv_heads × n_kept`` per sequence."""
        n_kept = self.layer_budget(layer)
        if n_kept >= layer.seq_len:
            return torch.ones(layer.keys.shape[:3], dtype=torch.bool, device=layer.keys.device)
        raw = self.press.score(layer.replace(budget=n_kept)).float()
        # AdaKV's split on the wrapped press's own scores (as AdaKVPress does); the two stages on scores shifted to
        # be non-negative per head (see base_scores).
        per_head = adaptive_head_budgets(raw, n_kept, self.alpha_safeguard).sum(-1)
        scores = non_negative(raw)
        vnorm = layer.adapter.value_output_norms(layer.module, layer.values)
        return two_stage_keep(scores, vnorm, per_head, self.first_stage_ratio, self.epsilon)
