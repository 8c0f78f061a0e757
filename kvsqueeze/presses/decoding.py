"""DecodingPress: compress again while the model generates, so the cache stays bounded over long outputs."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from kvsqueeze import adapter as A
from kvsqueeze.presses.base import (
    KV,
    Capabilities,
    CompressionReport,
    LayerInputs,
    ScorerPress,
    check_int,
    check_wrapped_scorer,
    derived_capabilities,
    gather_kv,
    has_own_budget,
    kept_for_ratio,
    kv_nbytes,
    store_kept,
)
from kvsqueeze.presses.expected_attention import ExpectedAttentionPress
from kvsqueeze.presses.registry import register_press

#: Key prefix of this press's per-layer entries in :func:`kvsqueeze.adapter.press_state`.
_STATE = "decoding"


@dataclass(frozen=True)
class DecodingState:
    """What the press keeps about one layer of one cache between forward passes (replaced, never modified).

    Attributes
    ----------
    kept_positions : Tensor
        Original positions ``(bsz, num_key_value_heads, n_kept)`` of the entries kept at the last compression;
        the ``appended`` tokens since then follow them, at the positions just before ``length``.
    length : int
        Tokens the layer has seen (its logical length).
    appended : int
        Tokens appended since the layer was last compressed.
    hidden_states : Tensor
        Attention inputs of the latest tokens, ``(bsz, n, hidden_size)`` with ``n ≤ hidden_states_buffer_size``
        (no tokens when the wrapped press does not read hidden states).
    """

    kept_positions: torch.Tensor
    length: int
    appended: int
    hidden_states: torch.Tensor

    @property
    def positions(self) -> torch.Tensor:
        """Original positions ``(bsz, num_key_value_heads, n_stored)`` of every stored entry, in stored order."""
        bsz, heads = self.kept_positions.shape[:2]
        new = torch.arange(self.length - self.appended, self.length, device=self.kept_positions.device)
        return torch.cat([self.kept_positions, new.expand(bsz, heads, self.appended)], dim=-1)

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in (self.kept_positions, self.hidden_states))


def decoding_states(cache) -> dict[int, DecodingState]:
    """``{layer_idx: DecodingState}`` that a :class:`DecodingPress` keeps on ``cache`` (empty when none did)."""
    return {key[1]: value for key, value in A.press_state(cache).items() if key[0] == _STATE}


def decoding_state_nbytes(cache) -> int:
    """Measured bytes of the state a :class:`DecodingPress` keeps on ``cache`` (positions and the hidden-state
    buffer); it is not part of :func:`kvsqueeze.adapter.cache_nbytes`, which counts keys and values only."""
    return sum(state.nbytes() for state in decoding_states(cache).values())


@register_press("decoding")
@dataclass
class DecodingPress(ScorerPress):
    """Compress the prefill, then again every ``compression_interval`` generated tokens, with a scorer press.

    Long generations (reasoning traces, long answers) grow the cache one entry per token and layer; a press that
    only compresses the prefill leaves that growth alone. This press scores with the wrapped ``press`` at the end
    of the prefill, like the wrapped press would, and then, every ``compression_interval`` tokens appended to a
    layer, scores the whole layer again (context entries kept so far and new tokens alike) and keeps its
    budget. Queries for the scores come from a buffer of the attention inputs of the latest
    ``hidden_states_buffer_size`` tokens, with rotary embeddings recomputed at their positions (no buffer when
    the wrapped press's capabilities say it does not read hidden states: KNorm, KeyDiff, StreamingLLM, LagKV,
    Random, Q-Filters). The Expected Attention paper (arXiv 2510.00636, §3.1) keeps "a small buffer of hidden
    states of 128 tokens" during decoding and compresses every 512 generated tokens: the defaults here.
    kvpress's DecodingPress uses a 256-token buffer and a fixed ``target_size``, and hands the wrapped press the
    current token's rotary embeddings, so window scorers (SnapKV) rotate every buffered query to one position;
    here each buffered query is rotated at its own position (tested against a prefill of the same tokens).

    Budget after each compression: with ``budget`` b, b entries per head; with ``compression_ratio`` r,
    ``⌊(1 − r)·L⌋`` of the L tokens seen so far (so the cache keeps the same fraction of a growing sequence).
    Between compressions a layer holds at most ``compression_interval − 1`` entries more. Kept entries keep
    their original RoPE positions and order; new tokens get the positions they would have had without
    compression. The positions of the kept entries and the buffer are kept on the cache
    (:func:`decoding_states`, measured by :func:`decoding_state_nbytes`), not on the press, and follow it into
    later ``generate`` calls and forks; the pipeline answers each question under the press, on a fork, so the
    compressed context never changes.

    The wrapped press scores from keys, values and the buffered queries: presses that need the prefill's
    attention weights (ObservedAttention) or give each layer its own budget (PyramidKV) are refused, and a
    window longer than the buffer (SnapKV's ``window_size``) is refused when the press is built. Beam search is
    refused (it reorders the cache's rows, which the per-row state does not follow).

    Fields: ``press`` (ScorerPress, default Expected Attention; its own ratio must be 0), ``compression_ratio``
    or ``budget`` (on this press), ``compression_interval`` (512), ``hidden_states_buffer_size`` (128).
    """

    press: ScorerPress = field(default_factory=ExpectedAttentionPress)
    compression_interval: int = 512
    hidden_states_buffer_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        check_wrapped_scorer(self.press)
        if has_own_budget(self.press):
            raise ValueError(
                f"the wrapped {type(self.press).__name__} must have no ratio/budget of its own (got "
                f"{self.press.compression_ratio!r}/{self.press.budget!r}); set compression_ratio or budget on the "
                "DecodingPress"
            )
        caps = self.press.capabilities
        if caps.needs_attention_weights:
            raise ValueError(
                f"{type(self.press).__name__} scores from the prefill's attention weights, which decoding steps do "
                "not produce; wrap a press that scores from keys, values or queries"
            )
        if not caps.uniform_layers:
            raise ValueError(
                f"the wrapped {type(self.press).__name__} gives each layer its own budget, which the decoding "
                "budget would replace; wrap a press with one budget for all layers"
            )
        check_int(self.compression_interval, "compression_interval", minimum=1)
        check_int(self.hidden_states_buffer_size, "hidden_states_buffer_size", minimum=1)
        window = getattr(self.press, "window_size", None)  # the last queries a press scores with (SnapKV)
        if isinstance(window, int) and window > self.hidden_states_buffer_size:
            raise ValueError(
                f"{type(self.press).__name__} scores with the last window_size={window} queries, more than the "
                f"hidden_states_buffer_size={self.hidden_states_buffer_size} tokens kept for decoding; raise the "
                "buffer or lower the window"
            )

    @derived_capabilities
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        return dataclasses.replace(self.press.capabilities, phases=frozenset({"prefill", "decoding"}))

    def validate(self, adapter: A.ModelAdapter) -> None:
        super().validate(adapter)
        self.press.validate(adapter)

    # -- budget ---------------------------------------------------------------------------------------------------
    def own_layer_budget(self, layer: LayerInputs) -> int:
        """``budget``, or ``⌊(1 − r)·L⌋`` of the ``L`` tokens seen so far (the logical length), at most what the
        layer stores."""
        if self.budget is not None:
            return min(self.budget, layer.seq_len)
        return min(layer.seq_len, kept_for_ratio(layer.context_length, self.compression_ratio))

    def score(self, layer: LayerInputs) -> torch.Tensor:
        return self.press.score(layer.replace(budget=self.layer_budget(layer)))

    # -- life cycle -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, layer: LayerInputs, cache, report: CompressionReport | None = None) -> None:
        """Compress ``layer`` (the prefill, a recorded prefill, or a layer due during decoding) and record its
        state on ``cache``."""
        start = time.perf_counter()
        bytes_before = kv_nbytes(layer.keys, layer.values)
        indices = self.keep_indices(layer)
        positions = layer.positions()
        if indices is None:
            kept = KV(layer.keys, layer.values)
        else:
            kept = gather_kv(layer.keys, layer.values, indices)
            positions = positions.gather(-1, indices)
        n_kept = store_kept(cache, layer.layer_idx, kept, layer.context_length)
        # A copy: a slice of the prefill's hidden states would keep all of them alive.
        buffer = layer.hidden_states[:, max(0, layer.hidden_states.shape[1] - self.buffer_size):].clone()
        A.press_state(cache)[(_STATE, layer.layer_idx)] = DecodingState(
            kept_positions=positions.contiguous(), length=layer.context_length, appended=0, hidden_states=buffer
        )
        if report is not None:  # the prefill (decoding-time compressions are counted by _recompress)
            report.seconds += time.perf_counter() - start
            report.add(layer.layer_idx, n_kept, layer.seq_len, bytes_before)

    @property
    def buffer_size(self) -> int:
        """Hidden states kept per layer: ``hidden_states_buffer_size``, or none when the wrapped press does not
        read them (its capabilities say so)."""
        return self.hidden_states_buffer_size if self.press.capabilities.reads_hidden_states else 0

    def _append(self, cache, idx: int, hidden: torch.Tensor) -> None:
        """Record the tokens a forward pass appended to layer ``idx``."""
        key = (_STATE, idx)
        state = A.press_state(cache)[key]
        n_new = hidden.shape[1]
        buffer = state.hidden_states
        if self.buffer_size:
            buffer = torch.cat([buffer, hidden], dim=1)
            buffer = buffer[:, max(0, buffer.shape[1] - self.buffer_size):]
        A.press_state(cache)[key] = dataclasses.replace(
            state, length=state.length + n_new, appended=state.appended + n_new, hidden_states=buffer
        )

    def _recompress(self, adapter: A.ModelAdapter, cache, report: CompressionReport) -> None:
        """Compress every layer of ``cache`` that has had ``compression_interval`` tokens appended since its last
        compression (all of them at once, after the forward pass, so every layer stores the same count)."""
        states = decoding_states(cache)
        due = [idx for idx, state in states.items() if state.appended >= self.compression_interval]
        start = time.perf_counter()
        for idx in due:
            state = states[idx]
            keys, values = A.layer_kv(cache, idx)
            hidden = state.hidden_states
            first = state.length - hidden.shape[1]
            # The buffer's rotary embeddings, from the model's own rotary module at the buffer's positions.
            positions = torch.arange(max(first, 0), max(first, 0) + max(hidden.shape[1], 1), device=hidden.device)
            cos, sin = adapter.rope(idx, positions[None], hidden)
            n = hidden.shape[1]
            layer = LayerInputs(
                adapter=adapter,
                module=adapter.attention_modules[idx],
                layer_idx=idx,
                hidden_states=hidden,
                keys=keys,
                values=values,
                position_embeddings=(cos[:, :n].expand(len(hidden), -1, -1), sin[:, :n].expand(len(hidden), -1, -1)),
                key_positions=state.positions,
                first_position=first,
            )
            self.apply(layer, cache)
        if due:
            report.seconds += time.perf_counter() - start
            report.decoding_compressions += 1

    def _hook(self, adapter: A.ModelAdapter, report: CompressionReport, queries: dict[int, torch.Tensor]):
        prefill_hook = super()._hook(adapter, report, queries)

        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            idx = module.layer_idx
            cache = adapter.cache_from_call(kwargs)
            if cache is None or not A.is_compressed_layer(cache, idx):
                prefill_hook(module, args, kwargs, output)  # compresses a prefill, refuses a call without cache
                return
            queries.pop(idx, None)
            if (_STATE, idx) not in A.press_state(cache):
                raise ValueError(
                    f"{type(self).__name__}: layer {idx} of this cache was compressed by another press, which kept "
                    "no record of its entries' positions; decoding-time compression continues only caches it "
                    "compressed itself (compress the prompt with this press)"
                )
            self._append(cache, idx, adapter.hidden_states_from_call(args, kwargs))

        return hook

    @contextmanager
    def __call__(self, model: nn.Module) -> Iterator[CompressionReport]:
        with super().__call__(model) as report:
            adapter = A.ModelAdapter(model)

            def after_forward(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
                cache = adapter.cache_from_call(kwargs)
                cache = cache if cache is not None else adapter.cache_from_output(output)
                if cache is not None:
                    self._recompress(adapter, cache, report)

            handle = adapter.decoder.register_forward_hook(after_forward, with_kwargs=True)
            try:
                yield report
            finally:
                handle.remove()
