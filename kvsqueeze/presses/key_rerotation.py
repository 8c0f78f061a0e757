"""KeyRerotationPress: after eviction, move the kept keys to contiguous RoPE positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze import adapter as A
from kvsqueeze.presses.base import (
    KV,
    Capabilities,
    LayerInputs,
    Press,
    ScorerPress,
    check_wrapped_scorer,
    derived_capabilities,
    gather_kv,
    has_own_budget,
)
from kvsqueeze.presses.registry import register_press


@register_press("key_rerotation")
@dataclass
class KeyRerotationPress(Press):
    """Wrap a scorer press and re-rotate its kept keys to contiguous RoPE positions.

    Used to reproduce StreamingLLM's "pos-shift" (https://arxiv.org/abs/2309.17453, §3.2): with the kept keys at
    contiguous positions, the distance between a new query and any cached key never exceeds the cache size.
    RoPE only sees relative distances, so the ``n_kept`` kept keys are moved to the *last* ``n_kept`` positions
    of the context, ``seq_len - n_kept … seq_len - 1`` (the paper numbers them ``0 … n_kept - 1`` and continues
    from ``n_kept``; the attention scores are the same). Keeping the end fixed means the cache's logical length
    does not change, so new tokens get the positions every other layer (sliding-window layers of hybrid models
    included) and ``model.generate`` expect. Each kept key is rotated by ``new_position - old_position`` (RoPE
    rotations compose); values are unchanged.

    The rotation by ``new - old`` is taken from the layer's recorded ``position_embeddings`` (the ``cos, sin`` the
    prefill used at both positions, see :func:`kvsqueeze.adapter.rotate_between`), not from the rotary module's
    current inverse frequencies: with dynamic-NTK or longrope scaling those depend on the length of the module's
    latest call, so they need not be the frequencies the cached keys were rotated with.

    Fields: ``press`` (a ScorerPress with uniform layer budgets, required; its ratio/budget is the wrapper's).
    """

    press: ScorerPress | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_wrapped_scorer(self.press)
        if has_own_budget(self):
            raise ValueError(
                "set the ratio/budget on the wrapped press; "
                f"got compression_ratio={self.compression_ratio!r}, budget={self.budget!r}"
            )
        if not self.press.capabilities.uniform_layers:
            raise ValueError(
                f"{type(self.press).__name__} gives layers different budgets; re-rotated positions must be the "
                "same on every layer (positions are shared across layers)"
            )

    @derived_capabilities
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        return self.press.capabilities.merge(Capabilities(changes_positions=True))

    def validate(self, adapter) -> None:
        self.press.validate(adapter)

    def n_kept(self, seq_len: int) -> int:
        return self.press.n_kept(seq_len)

    def compress(self, layer: LayerInputs) -> KV:
        if layer.first_position != 0 or layer.key_positions is not None:  # not reachable through the public API
            raise ValueError("key_rerotation needs the whole context in order (a one-shot prefill compression)")
        indices = self.press.select(layer)  # (bsz, kv_heads, n_kept), ascending
        kept = gather_kv(layer.keys, layer.values, indices)
        n_kept = indices.shape[-1]
        new_positions = torch.arange(layer.seq_len - n_kept, layer.seq_len, device=indices.device)
        cos, sin = layer.position_embeddings  # (bsz, seq_len, rotary_dim), positions 0 … seq_len - 1
        keys = A.rotate_between(kept.keys, cos, sin, indices, new_positions)
        return KV(keys, kept.values)
