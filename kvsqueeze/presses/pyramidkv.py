"""PyramidKV: SnapKV scores with per-layer budgets that shrink from the bottom layers to the top."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from kvsqueeze.presses.base import Capabilities, LayerInputs
from kvsqueeze.presses.registry import register_press
from kvsqueeze.presses.snapkv import SnapKVPress


def pyramid_budgets(n_kept: int, window: int, seq_len: int, num_layers: int, beta: float) -> list[int]:
    """Entries kept per head at each of ``num_layers`` layers (bottom first), totalling ``num_layers * n_kept``.

    Every layer keeps its ``window`` plus a share of the ``n_kept - window`` remaining entries per layer on
    average; the shares fall arithmetically from ``max`` (bottom) to ``min = (n_kept - window) / beta`` (top) with
    ``max = 2 (n_kept - window) - min``, so their mean is exact. When ``max`` would exceed the ``seq_len - window``
    entries a layer has, it is clipped and ``min`` raised to keep the mean. Real shares are rounded cumulatively,
    so the total is exactly the uniform total and each layer is within one entry of its real share. Falls back to
    the uniform ``n_kept`` everywhere when no pyramid fits (one layer, or a budget no larger than the window).
    """
    uniform = [n_kept] * num_layers
    share = n_kept - window  # average entries per layer beyond the window
    if num_layers < 2 or share <= 0 or n_kept >= seq_len:
        return uniform
    room = seq_len - window  # entries a layer can keep beyond its window
    low = share / beta
    high = 2 * share - low
    if high > room:
        high = room
        low = 2 * share - high

    def cumulative(r: int) -> float:
        # Sum of the first r real shares high - i (high - low) / (L - 1), i = 0 .. r - 1.
        return r * high - (high - low) * r * (r - 1) / (2 * (num_layers - 1))

    rounded = [math.floor(cumulative(r) + 0.5) for r in range(num_layers + 1)]
    budgets = [window + min(max(rounded[r + 1] - rounded[r], 0), room) for r in range(num_layers)]
    return [min(max(b, 1), seq_len) for b in budgets]


@register_press("pyramidkv")
@dataclass
class PyramidKVPress(SnapKVPress):
    """SnapKV scores with a pyramid of per-layer budgets: more entries in lower layers, fewer in higher ones.

    Paper: "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
    https://arxiv.org/abs/2406.02069

    Score: SnapKV's (window attention, pooled, GQA-group mean; the window always kept). Budget: with ``k`` the
    uniform entries per layer and ``w`` the window, layer of rank ``l`` among the ``L`` compressible layers keeps
    ``w + max - l (max - min) / (L - 1)`` with ``min = (k - w) / beta`` and ``max = 2 (k - w) - min``, clipped to
    the layer's length (``min`` then rises to keep the mean), rounded so the total over the compressible layers
    equals ``L * k`` exactly (:func:`pyramid_budgets`). Only compressible (full-attention) layers count: in a
    Gemma3 hybrid the rank is the position among the full-attention layers. Uniform ``k`` when no pyramid fits.

    Follows the paper where kvpress differs: kvpress sizes the pyramid around ``window + n (1 - r)`` entries per
    layer, so it keeps ``window`` more entries than the ratio asks; here the window is part of the budget. The
    defaults are the paper's released run scripts (window 8, kernel 7, max pooling); kvpress uses 64 / 5 / avg.

    Fields: ``compression_ratio`` (0.0), ``budget`` (None), ``window_size`` (8), ``kernel_size`` (7),
    ``pooling`` ("max"), ``beta`` (20.0, >= 1; 1 gives uniform budgets).
    """

    window_size: int = 8
    kernel_size: int = 7
    pooling: str = "max"
    beta: float = 20.0

    capabilities: ClassVar[Capabilities] = Capabilities(uniform_layers=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)):
            raise TypeError(f"beta must be a number >= 1, got {self.beta!r}")
        if not (math.isfinite(self.beta) and self.beta >= 1):
            raise ValueError(f"beta must be a finite number >= 1 (top share = average / beta), got {self.beta!r}")

    def own_layer_budget(self, layer: LayerInputs) -> int:
        seq_len = layer.seq_len
        n_kept = self.n_kept(seq_len)
        layers = layer.adapter.compressible_layers
        if layer.layer_idx not in layers:
            return n_kept
        budgets = pyramid_budgets(n_kept, self.window(seq_len), seq_len, len(layers), float(self.beta))
        return budgets[layers.index(layer.layer_idx)]
