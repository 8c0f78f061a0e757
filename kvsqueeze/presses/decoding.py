"""DecodingPress: compress again while the model generates, so the cache stays bounded over long outputs."""

from __future__ import annotations

import dataclasses
import time
import warnings
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
    check_budgetless_inner,
    check_int,
    check_wrapped_scorer,
    derived_capabilities,
    gather_kv,
    kept_for_ratio,
    kv_nbytes,
    store_kept,
)
from kvsqueeze.presses.expected_attention import ExpectedAttentionPress
from kvsqueeze.presses.registry import register_press

#: Key of this press's record in each compressed layer's state (:func:`kvsqueeze.adapter.layer_state`).
_STATE = "decoding"
#: Key marking a cache that :meth:`DecodingPress.continuing` keeps compressed (press blocks leave it alone).
_DRIVEN = ("decoding-driven",)


@dataclass(frozen=True)
class _Record:
    """What the press stores about one layer of one cache (replaced, never modified in place): the original
    positions of the entries kept at the last compression, and the buffer of the latest hidden states, which
    ends at position ``buffer_end``. Everything else is read off the cache, so tokens appended or cropped outside
    the press's hooks cannot put the two out of step."""

    kept_positions: torch.Tensor  # (bsz, num_key_value_heads, n_kept)
    hidden_states: torch.Tensor  # (bsz, n ≤ buffer size, hidden_size)
    buffer_end: int
    owner: object  # the press that compressed the layer: another decoding press leaves it alone

    def select_rows(self, rows: torch.Tensor) -> _Record:
        """The record of the rows ``rows`` (beam search and the cache's other row operations apply this)."""
        return dataclasses.replace(
            self,
            kept_positions=self.kept_positions.index_select(0, rows.to(self.kept_positions.device)),
            hidden_states=self.hidden_states.index_select(0, rows.to(self.hidden_states.device)),
        )


@dataclass(frozen=True)
class DecodingState:
    """One layer's decoding-time compression state, as :func:`decoding_states` reads it from a cache.

    Attributes
    ----------
    kept_positions : Tensor
        Original positions ``(bsz, num_key_value_heads, n_kept)`` of the entries kept at the last compression;
        the ``appended`` tokens since then follow them, at the positions just before ``length``.
    length : int
        Tokens the layer has seen (its logical length).
    appended : int
        Tokens stored after the entries kept at the last compression.
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


def _records(cache) -> dict[int, _Record]:
    """``{layer_idx: record}`` of the layers a decoding press compressed; each record lives on its layer
    (:func:`kvsqueeze.adapter.layer_state`), so it follows the cache's row operations and goes with a reset."""
    records = {}
    for idx in range(len(cache.layers)):
        if A.is_compressed_layer(cache, idx):
            record = A.layer_state(cache, idx).get(_STATE)
            if record is not None:
                records[idx] = record
    return records


def _state(cache, idx: int, record: _Record) -> DecodingState:
    """The record of layer ``idx`` with what the cache says now. The record follows the cache's row operations
    (:func:`kvsqueeze.adapter.layer_state`); rows changed any other way (the layer's tensors replaced by hand)
    are refused."""
    keys, _ = A.layer_kv(cache, idx)
    if keys.shape[0] != record.kept_positions.shape[0]:
        raise ValueError(
            f"the cache now holds {keys.shape[0]} rows where decoding-time compression recorded "
            f"{record.kept_positions.shape[0]}: its rows were changed other than by the cache's row operations "
            "(reorder_cache, batch_repeat_interleave, batch_select_indices), which the recorded positions follow"
        )
    n_kept = record.kept_positions.shape[-1]
    return DecodingState(record.kept_positions, A.layer_logical_length(cache, idx), keys.shape[-2] - n_kept,
                         record.hidden_states)


def _check_unpadded(mask) -> None:
    """Refuse padding in tokens appended to a cache this press keeps compressed: a compression would keep the pad
    tokens among the entries, and the padding mask, whose columns follow logical positions, would no longer line
    up with what is stored."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()):
        rows = (mask == 0).any(dim=-1).nonzero().flatten().tolist()
        raise ValueError(
            f"decoding-time compression cannot continue a padded batch: attention_mask has padding in row(s) {rows}; "
            "append each sequence's tokens unpadded (one sequence at a time, or equal lengths)"
        )


def decoding_states(cache) -> dict[int, DecodingState]:
    """``{layer_idx: DecodingState}`` that a :class:`DecodingPress` keeps on ``cache`` (empty when none did)."""
    return {idx: _state(cache, idx, record) for idx, record in _records(cache).items()}


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
    compressed context never changes. A long context fed in chunks (``Pipeline.compress(...,
    prefill_chunk_size=N)`` with ``compression_interval=N``) is compressed after every chunk in the same way:
    the first chunk as a prefill, each later one as appended tokens.

    The wrapped press scores from keys, values and the buffered queries: presses that need the prefill's
    attention weights (ObservedAttention) or give each layer its own budget (PyramidKV) are refused, and a
    window longer than the buffer (SnapKV's ``window_size``) is refused when the press is built. The per-row
    state lives on each compressed layer and follows the cache's row operations (beam search's reordering,
    ``batch_repeat_interleave``, ``batch_select_indices``), so beam search works; a padded continuation is refused
    (a compression would keep the pad tokens, and the padding mask would no longer line up). After tokens the
    press did not see (appended outside its block, or cropped and replaced) the buffer restarts, and the next
    compression waits until it is full again. A cache another press compressed (or a decoding press with other
    settings) passes through the block uncompressed during decoding, with a warning; a cache kept compressed by
    :meth:`continuing` is left to it. This press must be the outermost one: inside a wrapper or a composition
    its decoding phase would be dropped, so that is refused.

    Fields: ``press`` (ScorerPress, default Expected Attention; its own ratio must be 0), ``compression_ratio``
    or ``budget`` (on this press), ``compression_interval`` (512), ``hidden_states_buffer_size`` (128).
    """

    press: ScorerPress = field(default_factory=ExpectedAttentionPress)
    compression_interval: int = 512
    hidden_states_buffer_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        check_wrapped_scorer(self.press)
        check_budgetless_inner(self.press, "DecodingPress", "compression_ratio or budget")
        if self.press.capabilities.needs_attention_weights:
            raise ValueError(
                f"{type(self.press).__name__} scores from the prefill's attention weights, which decoding steps do "
                "not produce; wrap a press that scores from keys, values or queries"
            )
        check_int(self.compression_interval, "compression_interval", minimum=1)
        check_int(self.hidden_states_buffer_size, "hidden_states_buffer_size", minimum=1)
        inner = self.press
        while inner is not None:  # the wrapped press, and any press it wraps in turn (CriticalKV(SnapKV))
            window = getattr(inner, "window_size", None)  # the last queries a press scores with (SnapKV)
            if isinstance(window, int) and window > self.hidden_states_buffer_size:
                raise ValueError(
                    f"{type(inner).__name__} scores with the last window_size={window} queries, more than the "
                    f"hidden_states_buffer_size={self.hidden_states_buffer_size} tokens kept for decoding; raise "
                    "the buffer or lower the window"
                )
            inner = getattr(inner, "press", None)

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
        return self._target(layer.seq_len, layer.context_length)

    def _target(self, stored: int, length: int) -> int:
        if self.budget is not None:
            return min(self.budget, stored)
        return min(stored, kept_for_ratio(length, self.compression_ratio))

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
        A.layer_state(cache, layer.layer_idx)[_STATE] = _Record(
            positions.contiguous(), buffer, layer.context_length, self
        )
        if report is not None:  # the prefill (decoding-time compressions are counted by _recompress)
            report.seconds += time.perf_counter() - start
            report.add(layer.layer_idx, n_kept, layer.seq_len, bytes_before)

    @property
    def buffer_size(self) -> int:
        """Hidden states kept per layer: ``hidden_states_buffer_size``, or none when the wrapped press does not
        read them (its capabilities say so)."""
        return self.hidden_states_buffer_size if self.press.capabilities.reads_hidden_states else 0

    def _made(self, record: _Record | None) -> bool:
        """Whether this press (or one equal to it, e.g. the same one in a later block) wrote ``record``."""
        return record is not None and (record.owner is self or record.owner == self)

    def _owns(self, cache) -> bool:
        """Whether this press compressed ``cache``."""
        records = _records(cache)
        return bool(records) and all(self._made(r) for r in records.values())

    def _check_rows(self, cache) -> None:
        """Refuse, before any layer writes, a cache whose rows changed since this press recorded them (every
        layer holds the same rows: one is checked)."""
        idx, record = next(iter(_records(cache).items()))
        _state(cache, idx, record)

    def _append(self, cache, idx: int, hidden: torch.Tensor) -> None:
        """Record the tokens a forward pass just appended to layer ``idx`` (after its attention ran): the buffer
        keeps the hidden states of the latest tokens, contiguous up to the layer's logical length."""
        state = A.layer_state(cache, idx)
        record = state[_STATE]
        size, n_new = self.buffer_size, hidden.shape[1]
        end = A.layer_logical_length(cache, idx)
        start = end - n_new  # position of the first new token
        valid_end = record.buffer_end  # rows before this position still hold the tokens stored there
        low = A.take_low_water(cache, idx)  # a crop since: tokens from there on may have been replaced
        if low is not None:
            valid_end = min(valid_end, low)
        old = record.hidden_states
        old = old[:, : max(0, old.shape[1] - (record.buffer_end - min(valid_end, start)))]
        if valid_end < start:  # tokens this press did not see (appended outside it): the buffer restarts
            old = old[:, :0]
        # Only what the buffer keeps is copied: a fresh tensor of the buffer's size, no view of a longer one.
        keep_old = min(old.shape[1], max(0, size - n_new))
        buffer = torch.cat([old[:, old.shape[1] - keep_old:], hidden[:, max(0, n_new - size):]], dim=1)
        state[_STATE] = dataclasses.replace(record, hidden_states=buffer, buffer_end=end)

    def _recompress(self, adapter: A.ModelAdapter, cache, report: CompressionReport) -> None:
        """Compress every layer of ``cache`` that stores ``compression_interval`` tokens or more after the entries
        it kept at its last compression, when its budget removes any and its buffer is full (after tokens it did
        not see, the buffer restarts: the compression waits until it holds ``hidden_states_buffer_size`` tokens
        again, so a scorer never reads fewer queries than it asked for). All due layers are compressed at once,
        after the forward pass, so every layer stores the same count."""
        due = []
        for idx, record in _records(cache).items():
            state = _state(cache, idx, record)
            stored = record.kept_positions.shape[-1] + state.appended
            full = record.buffer_end == state.length and record.hidden_states.shape[1] >= min(
                self.buffer_size, state.length
            )
            if state.appended >= self.compression_interval and full and self._target(stored, state.length) < stored:
                due.append((idx, record, state))
        if not due:
            return
        start = time.perf_counter()
        for idx, record, state in due:
            keys, values = A.layer_kv(cache, idx)
            hidden = record.hidden_states
            first = state.length - hidden.shape[1]
            # The buffer's rotary embeddings, from the model's own rotary module at the buffer's positions.
            positions = torch.arange(first, first + max(hidden.shape[1], 1), device=hidden.device)
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
        report.seconds += time.perf_counter() - start
        report.decoding_compressions += 1

    def _hook(self, adapter: A.ModelAdapter, report: CompressionReport, queries: A.CapturedQueries):
        prefill_hook = super()._hook(adapter, report, queries)
        warned: list[bool] = []

        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            idx = module.layer_idx
            cache = adapter.cache_from_call(kwargs)
            if cache is None or not A.is_compressed_layer(cache, idx):
                prefill_hook(module, args, kwargs, output)  # compresses a prefill, refuses a call without cache
                return
            queries.pop(idx, None)
            if _DRIVEN in A.press_state(cache):
                return  # kept compressed by its own driver (continuing), e.g. a pipeline answer in another thread
            if not self._made(A.layer_state(cache, idx).get(_STATE)):
                if not warned:
                    warned.append(True)
                    warnings.warn(
                        f"{type(self).__name__}: a cache it did not compress (another press, or a decoding press "
                        "with other settings) went through the block; it is continued without compression during "
                        "decoding (new tokens are kept, as under any press)",
                        stacklevel=2,
                    )
                return
            self._append(cache, idx, adapter.hidden_states_from_call(args, kwargs))

        return hook

    def _decoder_hooks(self, adapter: A.ModelAdapter, report: CompressionReport, applies) -> list:
        """A pre-hook refusing changed rows before any layer writes, and a hook compressing after the forward
        pass, on the calls whose cache ``applies(cache)`` accepts."""

        def before_forward(module: nn.Module, args: tuple, kwargs: dict) -> None:
            cache = adapter.cache_from_call(kwargs)
            if cache is not None and applies(cache):
                self._check_rows(cache)

        def check_mask(cache, mask) -> None:
            if cache is not None and applies(cache):
                _check_unpadded(mask)

        def after_forward(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            cache = adapter.cache_from_call(kwargs)
            cache = cache if cache is not None else adapter.cache_from_output(output)
            if cache is not None and applies(cache):
                self._recompress(adapter, cache, report)

        return adapter.register_mask_hook(check_mask) + [
            A.forward_pre_hook(adapter.decoder, before_forward),
            A.forward_hook(adapter.decoder, after_forward),
        ]

    def _block_hooks(self, adapter: A.ModelAdapter, report: CompressionReport) -> list:
        return self._decoder_hooks(
            adapter, report, lambda cache: _DRIVEN not in A.press_state(cache) and self._owns(cache)
        )

    @contextmanager
    def continuing(self, model: nn.Module, cache) -> Iterator[CompressionReport]:
        """Keep compressing ``cache`` — a cache this press compressed — while it is decoded in the block, without
        opening a press block on the model: only forward calls on ``cache`` itself are touched, so other callers
        of the model (other threads, other caches) are not compressed, checked or refused, and an open block of
        this press leaves ``cache`` to this driver. The pipeline answers through this, on a fork of the compressed
        context. ``generate()`` modes a press block refuses (assisted or prompt-lookup decoding, which run
        unverified drafts) are not supported here either; beam search is (the state follows the cache's rows)."""
        adapter = A.ModelAdapter(model)
        self.validate(adapter)
        if not self._owns(cache) or set(_records(cache)) != set(adapter.compressible_layers):
            raise ValueError(
                f"{type(self).__name__}.continuing needs a cache this press compressed (its prompt prefilled under "
                "`with press(model)`, or Pipeline.compress/from_recorded with this press); this one was not"
            )
        state = A.press_state(cache)
        if _DRIVEN in state:
            raise ValueError("this cache is already being kept compressed by another continuing() block")
        report = CompressionReport()

        def on_attention(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            if adapter.cache_from_call(kwargs) is cache:
                self._append(cache, module.layer_idx, adapter.hidden_states_from_call(args, kwargs))

        handles = adapter.register_attention_hooks(on_attention)
        handles += self._decoder_hooks(adapter, report, lambda c: c is cache)
        state[_DRIVEN] = True
        try:
            yield report
        finally:
            state.pop(_DRIVEN, None)
            for h in handles:
                h.remove()
