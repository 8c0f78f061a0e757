"""SimLayerKV: layers that only look at the sinks and recent tokens ("lazy" layers) keep only those."""

from __future__ import annotations

from dataclasses import dataclass
import torch

from kvsqueeze.presses.base import Capabilities, LayerInputs, Press, check_int, derived_capabilities, keep_top
from kvsqueeze.presses.utils import window_attention
from kvsqueeze.presses.registry import register_press


@register_press("simlayerkv")
@dataclass
class SimLayerKVPress(Press):
    """Detect lazy layers from the last queries' attention, and give them StreamingLLM treatment.

    Paper: "SimLayerKV: A Simple Framework for Layer-Level KV Cache Reduction", https://arxiv.org/abs/2410.13846

    A layer is lazy when the last ``n_last`` queries put, on average over heads and queries, at least
    ``lazy_threshold`` of their attention on the ``n_initial`` first tokens and the recent tokens. Lazy layers
    keep exactly those (``n_initial`` sinks + the most recent ``n_kept - n_initial``, where ``n_kept`` comes from
    ``compression_ratio``/``budget``); other layers keep everything. The paper fixes the recent window (1024
    tokens on 4k–32k contexts); here it is the press budget, so lazy layers are compressed at the requested ratio
    and the measured overall ratio is lower (only lazy layers shrink). The paper's thresholds are per model
    family (Llama-3 0.9, Llama-2 0.65, Mistral 0.8, Qwen 0.85); 0.9 is the default (kvpress defaults to 1.0,
    which no layer reaches, so its press compresses nothing unless given a threshold).

    Fields: ``compression_ratio``/``budget`` (size of lazy layers), ``lazy_threshold`` (0.9), ``n_last`` (1),
    ``n_initial`` (4).
    """

    lazy_threshold: float = 0.9
    n_last: int = 1
    n_initial: int = 4

    @derived_capabilities
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        # With a threshold of 0 every layer is lazy: all compressed layers keep the same count.
        return Capabilities(uniform_layers=self.lazy_threshold <= 0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.lazy_threshold, bool) or not isinstance(self.lazy_threshold, (int, float)):
            raise TypeError(f"lazy_threshold must be a number in [0, 1], got {self.lazy_threshold!r}")
        if not 0.0 <= self.lazy_threshold <= 1.0:
            raise ValueError(f"lazy_threshold must be in [0, 1], got {self.lazy_threshold!r}")
        check_int(self.n_last, "n_last", minimum=1)
        check_int(self.n_initial, "n_initial", minimum=0)

    def kept_positions(self, seq_len: int, n_kept: int) -> torch.Tensor:
        """Sinks and recent positions of a lazy layer, ascending."""
        n_sink = min(self.n_initial, n_kept)
        positions = torch.arange(seq_len)
        keep = (positions < n_sink) | (positions >= seq_len - (n_kept - n_sink))
        return positions[keep]

    def lazy_entries(self, layer: LayerInputs, n_kept: int) -> torch.Tensor:
        """Indices ``(bsz, num_kv_heads, n_kept)``, ascending, of the entries a lazy layer keeps.

        When the keys are what an earlier press of a composition kept, the sinks are found by position (the kept
        entries at positions ``< n_initial``) and the most recent kept entries fill the rest of the budget."""
        if layer.key_positions is None:
            keep = self.kept_positions(layer.seq_len, n_kept).to(layer.keys.device)
            return keep.expand(*layer.keys.shape[:2], keep.numel())
        positions = layer.key_positions.to(layer.keys.device).float()
        n_sink = min(self.n_initial, n_kept)
        return keep_top((positions < n_sink).float() * 2 + positions / layer.context_length, n_kept)

    def lazy_mass(self, layer: LayerInputs, n_kept: int) -> torch.Tensor:
        """Attention mass ``(bsz,)`` the last queries put on the entries a lazy layer would keep."""
        n_last = min(self.n_last, layer.seq_len)
        attn = window_attention(layer, n_last)  # (bsz, heads, n_last, seq_len)
        keep = self.lazy_entries(layer, n_kept).to(attn.device)  # (bsz, num_kv_heads, n_kept)
        group = attn.shape[1] // keep.shape[1]
        keep = keep.repeat_interleave(group, dim=1)[:, :, None].expand(-1, -1, n_last, -1)
        return attn.gather(-1, keep).sum(-1).mean(dim=(1, 2))

    def keep_indices(self, layer: LayerInputs) -> torch.Tensor | None:
        n_kept = self.layer_budget(layer)
        if n_kept >= layer.seq_len:
            return None
        lazy = self.lazy_mass(layer, n_kept) >= self.lazy_threshold  # (bsz,)
        if not bool(lazy.all()):
            # A layer stores one count for the whole batch: compress only when every sequence finds it lazy.
            return None
        return self.lazy_entries(layer, n_kept)
