"""The one module that touches transformers internals.

Everything kvsqueeze needs from a Hugging Face model goes through here: finding the attention modules and their
layer types, recomputing queries and keys (pre- or post-RoPE, QK-norm included), rotary embeddings, softcapping,
reading and writing cache layers, the cache-layer class that keeps logical positions after eviction, and the
attention-mask alignment for caches whose layers hold different numbers of entries. When transformers changes,
this is the file to fix.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

#: ``config.model_type`` values whose attention modules this adapter knows how to read.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text", "gemma3")

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"

# Architectures whose config carries ``attn_logit_softcapping`` that their attention never applies.
_SOFTCAP_UNUSED = frozenset({"gemma3", "gemma3_text"})


class UnsupportedModelError(ValueError):
    """Raised when a model's architecture is not one kvsqueeze can compress."""


# ----------------------------------------------------------------------------------------------------------------
# Hooks that other threads may run
# ----------------------------------------------------------------------------------------------------------------


def forward_hook(module: nn.Module, hook: Callable) -> Any:
    """Register ``hook(module, args, kwargs, output)`` as a forward hook with kwargs; returns its handle.

    A model is shared: while a press block removes its hooks, another thread may be inside a forward pass of the
    same module, and torch then calls a hook it had already listed without its kwargs (``hook(module, args,
    output)``). Such a late call belongs to a block that has closed and is ignored."""

    def call(module: nn.Module, args: tuple, *rest: Any) -> Any:
        return hook(module, args, *rest) if len(rest) == 2 else None

    return module.register_forward_hook(call, with_kwargs=True)


def forward_pre_hook(module: nn.Module, hook: Callable) -> Any:
    """Register ``hook(module, args, kwargs)`` as a forward pre-hook with kwargs (see :func:`forward_hook`)."""

    def call(module: nn.Module, args: tuple, *rest: Any) -> Any:
        return hook(module, args, *rest) if len(rest) == 1 else None

    return module.register_forward_pre_hook(call, with_kwargs=True)


class CapturedQueries:
    """Query-projection outputs captured by :meth:`ModelAdapter.register_query_capture`, ``{layer_idx: tensor}``
    kept per thread: a press block hooks the shared model, and a forward of another thread (an answer on another
    context) must not hand its queries to this thread's compression."""

    def __init__(self) -> None:
        self._local = threading.local()

    def _store(self) -> dict[int, torch.Tensor]:
        store = getattr(self._local, "store", None)
        if store is None:
            store = self._local.store = {}
        return store

    def __setitem__(self, layer_idx: int, queries: torch.Tensor) -> None:
        self._store()[layer_idx] = queries

    def pop(self, layer_idx: int, default: torch.Tensor | None = None) -> torch.Tensor | None:
        return self._store().pop(layer_idx, default)


# ----------------------------------------------------------------------------------------------------------------
# Cache layers
# ----------------------------------------------------------------------------------------------------------------

#: The cache layers a press can compress (empty at the prefill): transformers' dynamic ones, exactly.
_PLAIN_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)
#: cache_implementation values for which generate() builds a plain DynamicCache ("hybrid", the hub default of
#: Gemma 2/3 generation configs, is reset to the dynamic cache by transformers 5).
_DYNAMIC_CACHE_IMPLEMENTATIONS = (None, "dynamic", "hybrid")
#: Attribute set on a model while a press runs its own extra passes (:meth:`ModelAdapter.internal_pass`).
_INTERNAL_PASS = "_kvsqueeze_internal_pass"
#: generate() settings that make it draft tokens (assisted / prompt-lookup decoding), besides assistant_model.
_DRAFTING_SETTINGS = ("prompt_lookup_num_tokens", "assistant_early_exit")


class _CompressedStorage:
    """What both compressed layer kinds add to transformers' dynamic layer besides their storage:

    * ``row_state`` — per-row state a press keeps about the layer (:func:`layer_state`), whose values follow the
      batch's rows: every row operation transformers applies to the cache (beam search's ``reorder_cache``,
      ``batch_repeat_interleave``, ``batch_select_indices``) is applied to them too, through their
      ``select_rows(rows)`` method;
    * ``reset()`` — transformers' ``Cache.reset`` contract (the objects are kept, the contents dropped): the layer
      becomes an empty dynamic layer again, so the cache can be prefilled and compressed anew.
    """

    __slots__ = ()  # a layout like DynamicLayer's (and a base after it), so reset() can turn the layer into one
    row_state: dict

    def _rows_selected(self, rows: torch.Tensor) -> None:
        """Apply a row selection (``new row i = old row rows[i]``) to :attr:`row_state`; a new dict, so a fork that
        shares the old one is untouched."""
        rows = torch.as_tensor(rows).reshape(-1)
        rows = rows.nonzero().flatten() if rows.dtype == torch.bool else rows.to(torch.int64)
        self.row_state = {key: value.select_rows(rows) for key, value in self.row_state.items()}

    def _reset_to_dynamic(self) -> None:
        for name in list(vars(self)):
            if name not in ("device", "dtype"):
                delattr(self, name)
        self.__class__ = DynamicLayer
        DynamicLayer.__init__(self)


class CompressedLayer(DynamicLayer, _CompressedStorage):
    """A full-attention cache layer holding only the kept entries, physically.

    ``keys``/``values`` are ``(bsz, num_key_value_heads, n_kept + n_appended, head_dim)``: the compressed context
    followed by every token appended since. ``logical_length`` counts all tokens the layer has *seen*, so the next
    token gets the RoPE position and causal mask it would have had without compression — the same bookkeeping as
    transformers' sliding-window layer (``cumulative_length``).
    """

    #: Lowest logical length the layer was cropped to since :func:`take_low_water` last read it (None: no crop).
    low_water: int | None = None

    def __init__(
        self, keys: torch.Tensor, values: torch.Tensor, logical_length: int, kept: dict[int, int] | None = None
    ):
        super().__init__()
        self.keys, self.values = keys, values
        self.device = keys.device
        self.is_initialized = True
        self.cumulative_length = int(logical_length)
        self.n_compressed = keys.shape[-2]  # entries that belong to the compressed context (never cropped)
        # Compressed context entries of every dense compressed layer of the same cache, shared by them (and by
        # forks, whose layers are copies): {layer_idx: n_compressed}. Filled by :func:`write_layer`.
        self.kept_by_layer = _KeptByLayer() if kept is None else kept
        self.row_state = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if self.kept_by_layer.uneven and not _ATTENTION_STATE.fits_uneven:
            # transformers builds one mask per attention type from one layer's sizes: other lengths mismatch it
            # (a shape error, or for a one-token SDPA step no mask at all, which happens to be right).
            lengths = sorted(set(self.kept_by_layer.values()))
            raise ValueError(
                f"this cache's compressed layers store different numbers of context entries ({lengths[0]} to "
                f"{lengths[-1]}: a per-layer budget such as PyramidKV), but transformers builds one attention mask "
                "for all of them; decode inside `with press(model)`, through kvsqueeze.Pipeline, or within "
                "`kvsqueeze.adapter.ModelAdapter(model).attention_for_cache(cache)`, which fit the mask to each layer"
            )
        self.cumulative_length += key_states.shape[-2]
        keys, values = super().update(key_states, value_states)
        # Entries after the compressed context (appended tokens and these new ones): an attention call fitting a
        # mask built for another layer's length takes the mask's columns for exactly these (see _fit_mask).
        keys.kvsqueeze_tail = keys.shape[-2] - self.n_compressed
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        physical = self.keys.shape[-2]
        return physical + query_length, self.cumulative_length - physical

    def crop(self, tokens_to_remove: int) -> None:
        _crop_appended(self, tokens_to_remove, self.keys.shape[-2] - self.n_compressed)

    def reset(self) -> None:
        self._reset_to_dynamic()

    # -- across the batch: the stored rows as transformers' dynamic layer selects them, and the press state too ---
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._rows_selected(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        rows = torch.arange(self.keys.shape[0]).repeat_interleave(repeats)
        super().batch_repeat_interleave(repeats)
        self._rows_selected(rows)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._rows_selected(indices)


class _KeptByLayer(dict):
    """``{layer_idx: n_compressed}`` of a cache's dense compressed layers; ``uneven`` (whether they differ) is kept
    up to date on every write, so decoding steps read a flag instead of scanning the layers."""

    uneven = False

    def __setitem__(self, key: int, value: int) -> None:
        super().__setitem__(key, value)
        self.uneven = len(set(self.values())) > 1


def _crop_appended(layer: DynamicLayer, tokens_to_remove: int, appended: int) -> None:
    """Drop the last ``-tokens_to_remove`` tokens appended after compression (transformers' ``Cache.crop``
    contract); the compressed context itself is never cropped. Under a press, assisted decoding is refused
    (:meth:`ModelAdapter.register_generate_guard`): its drafts would be compressed before they could be cropped."""
    if tokens_to_remove > 0:
        raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
    n = -tokens_to_remove
    if n > appended:
        raise ValueError(
            f"cannot crop {n} tokens: only {appended} were appended after compression; "
            "the compressed context itself cannot be cropped"
        )
    if n:
        layer.keys, layer.values = layer.keys[..., :-n, :], layer.values[..., :-n, :]
        layer.cumulative_length -= n
        low = layer.low_water
        layer.low_water = layer.cumulative_length if low is None else min(low, layer.cumulative_length)


def take_low_water(cache: Cache, layer_idx: int) -> int | None:
    """The lowest logical length layer ``layer_idx`` was cropped to since the last call (None when it was not
    cropped), and forget it: tokens at or after it may have been replaced since. Read by presses that keep
    per-token state (decoding-time compression)."""
    layer = cache.layers[layer_idx]
    low = layer.low_water
    if low is not None:
        layer.low_water = None
    return low


class RaggedLayer(DynamicLayer, _CompressedStorage):
    """A full-attention cache layer where every (sequence, KV head) keeps its own number of context entries.

    Storage holds only what was kept:

    * ``ctx_keys``/``ctx_values`` ``(n_total, head_dim)`` — the kept context entries of every (sequence, head)
      pair, packed one segment after the other (sequence-major, then head, positions ascending);
    * ``lengths`` ``(bsz, num_key_value_heads)`` — the segment sizes (the only index; offsets are their cumsum);
    * ``keys``/``values`` ``(bsz, num_key_value_heads, n_appended, head_dim)`` — tokens appended after compression
      (questions, generated tokens), the same count for every head, stored densely.

    ``update`` returns the context padded to the longest segment followed by the appended tokens, with the
    per-head validity attached to the returned key tensor (``kvsqueeze_valid``, see :func:`ragged_valid`;
    :meth:`padded`). The padding is a temporary of one attention call, never stored. The attention function registered by
    :func:`ragged_attention` reads the validity and masks the padding exactly; with any other attention function
    the padding would be attended to, so :func:`ragged_attention` must be active whenever this layer is used.
    Logical positions are kept as in :class:`CompressedLayer`: ``cumulative_length`` counts every token seen.
    """

    low_water: int | None = None  # as CompressedLayer.low_water

    def __init__(
        self, ctx_keys: torch.Tensor, ctx_values: torch.Tensor, lengths: torch.Tensor, logical_length: int
    ):
        super().__init__()
        bsz, heads = lengths.shape
        self.ctx_keys, self.ctx_values = ctx_keys, ctx_values
        self.lengths = lengths.to(torch.int64)
        self.device = ctx_keys.device
        self.keys = ctx_keys.new_empty(bsz, heads, 0, ctx_keys.shape[-1])
        self.values = ctx_values.new_empty(bsz, heads, 0, ctx_values.shape[-1])
        self.is_initialized = True
        self.cumulative_length = int(logical_length)
        self.row_state = {}
        self._index()

    def _index(self) -> None:
        """``max_kept`` and the host copy of the index (segment start, length), read by every decoding step."""
        self.max_kept = int(self.lengths.max())
        flat = self.lengths.reshape(-1)
        self._segments: list[tuple[int, int]] = list(zip((flat.cumsum(0) - flat).tolist(), flat.tolist()))

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys and values ``(bsz, heads, max_kept + n_appended, d)`` — each head's context entries, zero padding
        up to the longest head, then the appended tokens — and their validity ``(bsz, heads, max_kept +
        n_appended)``. A temporary of one attention call: nothing here is stored."""
        keys = self._padded_with_tail(self.ctx_keys, self.keys)
        values = self._padded_with_tail(self.ctx_values, self.values)
        slots = torch.arange(keys.shape[-2], device=self.lengths.device)
        valid = (slots < self.lengths.unsqueeze(-1)) | (slots >= self.max_kept)
        return keys, values, valid.to(keys.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not _ATTENTION_STATE.ragged:  # the model's own attention would attend the padding: wrong, silently
            raise ValueError(
                "this cache has head-wise compressed layers (each KV head keeps its own count), which need "
                "kvsqueeze's ragged attention: use it inside `with press(model)`, through kvsqueeze.Pipeline, or "
                "within `kvsqueeze.adapter.ModelAdapter(model).attention_for_cache(cache)`"
            )
        self.cumulative_length += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        keys, values, valid = self.padded()
        keys.kvsqueeze_valid = valid
        keys.kvsqueeze_tail = self.keys.shape[-2]
        return keys, values

    def _padded_with_tail(self, packed: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
        """One copy per segment straight into the padded result: no gather index, no second copy by concatenation.
        The Python loop over segments is measured faster than one vectorised ``index_copy_`` into a zeroed buffer
        (125 vs 552 µs for 3 heads, 1.7 vs 4.6 ms for 4 × 8 heads) on this CPU."""
        bsz, heads, n_tail, d = tail.shape
        out = packed.new_empty(bsz * heads, self.max_kept + n_tail, d)
        for row, (start, length) in enumerate(self._segments):
            out[row, :length] = packed[start : start + length]
            if length < self.max_kept:
                out[row, length : self.max_kept] = 0  # masked, but must be finite (0 · NaN is NaN)
        out[:, self.max_kept :] = tail.reshape(bsz * heads, n_tail, d)
        return out.view(bsz, heads, self.max_kept + n_tail, d)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        physical = self.max_kept + self.keys.shape[-2]
        return physical + query_length, self.cumulative_length - physical

    def crop(self, tokens_to_remove: int) -> None:
        _crop_appended(self, tokens_to_remove, self.keys.shape[-2])

    # -- across the batch (beam search, several sequences per prompt) -------------------------------------------
    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep the sequences ``rows`` (a 1-D index into the batch; repeats allowed), in that order: each keeps its
        own kept entries per head, and its appended tokens. New tensors, so a fork's original is untouched."""
        rows = torch.as_tensor(rows).reshape(-1).to(self.lengths.device)
        rows = rows.nonzero().flatten() if rows.dtype == torch.bool else rows.to(torch.int64)
        per_sequence = self.lengths.sum(dim=1)
        starts = per_sequence.cumsum(0) - per_sequence
        # One gather index for all chosen sequences' packed spans: row r contributes starts[r] ... + per_sequence[r].
        counts = per_sequence[rows]
        offsets = starts[rows] - (counts.cumsum(0) - counts)
        index = torch.repeat_interleave(offsets, counts) + torch.arange(int(counts.sum()), device=counts.device)
        index = index.to(self.ctx_keys.device)
        self.ctx_keys = self.ctx_keys.index_select(0, index)
        self.ctx_values = self.ctx_values.index_select(0, index)
        self.lengths = self.lengths.index_select(0, rows)
        on_device = rows.to(self.keys.device)
        self.keys = self.keys.index_select(0, on_device)
        self.values = self.values.index_select(0, on_device)
        self._index()
        self._rows_selected(rows)

    def reset(self) -> None:
        self._reset_to_dynamic()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` becomes the old row ``beam_idx[i]``."""
        self.select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each sequence ``repeats`` times in a row (generate() expanding a given cache)."""
        self.select_rows(torch.arange(self.lengths.shape[0]).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Only the sequences ``indices``."""
        self.select_rows(indices)

    #: Every tensor the layer stores (read by :func:`layer_nbytes` and :func:`compact_cache`).
    STORED = ("ctx_keys", "ctx_values", "lengths", "keys", "values")

    def nbytes(self) -> int:
        """Bytes held, measured from the tensors' storage (a view into a larger buffer counts the whole buffer)."""
        return sum(getattr(self, name).untyped_storage().nbytes() for name in self.STORED)


def ragged_valid(keys: torch.Tensor) -> torch.Tensor | None:
    """Per-head validity ``(bsz, kv_heads, kv_len)`` attached by :meth:`RaggedLayer.update`, or None."""
    return getattr(keys, "kvsqueeze_valid", None)


def layer_kv(cache: Cache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored keys and values of one uniform layer, ``(bsz, num_key_value_heads, n_stored, head_dim)``."""
    layer = cache.layers[layer_idx]
    if isinstance(layer, RaggedLayer):
        raise TypeError(
            f"layer {layer_idx} is head-wise compressed (ragged); its heads hold different numbers of entries "
            "and it has no dense keys/values"
        )
    return layer.keys, layer.values


def layer_logical_length(cache: Cache, layer_idx: int) -> int:
    return cache.layers[layer_idx].get_seq_length()


def layer_physical_length(cache: Cache, layer_idx: int) -> int:
    """Entries stored per head (for a ragged layer: the longest head, appended tokens included)."""
    layer = cache.layers[layer_idx]
    if isinstance(layer, RaggedLayer):
        return layer.max_kept + layer.keys.shape[-2]
    if not layer.is_initialized or layer.keys is None or layer.keys.numel() == 0:
        return 0
    return layer.keys.shape[-2]


def layer_head_lengths(cache: Cache, layer_idx: int) -> torch.Tensor:
    """Entries stored by each (sequence, KV head) of one layer, ``(bsz, num_key_value_heads)``."""
    layer = cache.layers[layer_idx]
    if isinstance(layer, RaggedLayer):
        return layer.lengths + layer.keys.shape[-2]
    if not layer.is_initialized or layer.keys is None or layer.keys.numel() == 0:
        return torch.zeros(0, 0, dtype=torch.int64)
    return torch.full(layer.keys.shape[:2], layer.keys.shape[-2], dtype=torch.int64)


def layer_entries(cache: Cache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every stored entry of one layer, any layout: ``(keys, values, lengths)`` with keys/values packed
    ``(n_total, head_dim)`` per (sequence, head) segment in positional order and ``lengths`` ``(bsz, kv_heads)``.
    Appended tokens are included after each head's context entries."""
    layer = cache.layers[layer_idx]
    if isinstance(layer, RaggedLayer):
        keys, values, valid = layer.padded()
        return keys[valid], values[valid], valid.sum(-1)
    keys, values = layer.keys, layer.values
    lengths = torch.full(keys.shape[:2], keys.shape[-2], dtype=torch.int64, device=keys.device)
    return keys.reshape(-1, keys.shape[-1]), values.reshape(-1, values.shape[-1]), lengths


def is_compressed_layer(cache: Cache, layer_idx: int) -> bool:
    return isinstance(cache.layers[layer_idx], (CompressedLayer, RaggedLayer))


def is_ragged_layer(cache: Cache, layer_idx: int) -> bool:
    return isinstance(cache.layers[layer_idx], RaggedLayer)


def has_ragged_layers(cache: Cache) -> bool:
    return any(isinstance(layer, RaggedLayer) for layer in cache.layers)


def write_layer(cache: Cache, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, logical_length: int) -> None:
    """Replace one layer's storage by ``keys``/``values`` (the kept entries), keeping ``logical_length``."""
    kept = next((layer.kept_by_layer for layer in cache.layers if isinstance(layer, CompressedLayer)), _KeptByLayer())
    kept[layer_idx] = keys.shape[-2]
    cache.layers[layer_idx] = CompressedLayer(keys, values, logical_length, kept)


def write_ragged_layer(
    cache: Cache,
    layer_idx: int,
    ctx_keys: torch.Tensor,
    ctx_values: torch.Tensor,
    lengths: torch.Tensor,
    logical_length: int,
) -> None:
    """Replace one layer's storage by packed per-head entries (see :class:`RaggedLayer`)."""
    cache.layers[layer_idx] = RaggedLayer(ctx_keys, ctx_values, lengths, logical_length)


def layer_nbytes(cache: Cache, layer_idx: int) -> int:
    """Bytes held by one layer's stored tensors (keys, values and, for ragged layers, the length index);
    measured from the tensors' storage, not estimated: a tensor that is a view into a larger buffer counts the whole
    buffer, which it keeps alive (see :func:`compact_cache`)."""
    layer = cache.layers[layer_idx]
    if isinstance(layer, RaggedLayer):
        return layer.nbytes()
    total = 0
    for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
        if isinstance(t, torch.Tensor):
            total += t.untyped_storage().nbytes()
    return total


def compact_cache(cache: Cache) -> None:
    """Copy every stored tensor that is a view into a larger buffer, so the cache holds only what it stores.

    transformers' sliding-window layers keep the last window of a prefill as a view of the whole prefill's keys and
    values: the full buffer stays alive until the layer's next update. A compressed context is never updated (its
    questions run on forks), so without this its sliding layers would hold the whole context. A press may also
    return its kept entries as views (a slice of the layer's keys); those are copied the same way, the packed
    context of ragged layers included.
    """
    for layer in cache.layers:
        for name in RaggedLayer.STORED if isinstance(layer, RaggedLayer) else ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > t.numel() * t.element_size():
                setattr(layer, name, t.clone())


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by the key and value tensors of every layer."""
    return sum(layer_nbytes(cache, i) for i in range(len(cache.layers)))


def layer_lengths(cache: Cache) -> list[int]:
    """Physical (stored) entries per layer (the longest head for ragged layers)."""
    return [layer_physical_length(cache, i) for i in range(len(cache.layers))]


def fork_cache(cache: Cache) -> Cache:
    """A new cache that shares the stored tensors of ``cache`` but not its bookkeeping.

    Appending to the fork (``torch.cat`` in the layers) creates new tensors, so the original is never modified:
    this is how a compressed context answers many questions without copying its entries. Compressing the fork
    again (decoding-time compression) replaces its layers and its press state (:func:`press_state`), never the
    original's.
    """
    forked = copy.copy(cache)
    forked.layers = [copy.copy(layer) for layer in cache.layers]
    kept = None
    for layer in forked.layers:
        if isinstance(layer, _CompressedStorage):
            layer.row_state = dict(layer.row_state)
        if isinstance(layer, CompressedLayer):
            if kept is None:
                kept = _KeptByLayer(layer.kept_by_layer)
                kept.uneven = layer.kept_by_layer.uneven
            layer.kept_by_layer = kept
    if _PRESS_STATE in cache.__dict__:
        setattr(forked, _PRESS_STATE, dict(getattr(cache, _PRESS_STATE)))
    return forked


#: Attribute of a cache holding what a press keeps about it between forward passes (see :func:`press_state`).
_PRESS_STATE = "_kvsqueeze_press_state"


def press_state(cache: Cache) -> dict:
    """Per-cache state that a press keeps between forward passes, ``{key: value}``, created empty on first use.

    It lives on the cache, not on the press (presses hold no per-run state), so it follows the cache into later
    ``generate`` calls and :func:`fork_cache` copies it. Values must be replaced, never modified in place: a fork
    shares them with its original until it replaces them.
    """
    state = cache.__dict__.get(_PRESS_STATE)
    if state is None:
        state = {}
        setattr(cache, _PRESS_STATE, state)
    return state


#: Key in :func:`press_state` marking a cache the pipeline answers on (a fork of a prefilled context).
_ANSWER = ("answer",)


def mark_answer_cache(cache: Cache) -> None:
    """Mark ``cache`` as a pipeline answer's fork of a context that was prefilled (and compressed, or kept whole)
    on purpose: a press block another thread has open on the model lets its forward passes through
    (:meth:`ModelAdapter.register_prefill_guard`) instead of refusing an uncompressed context as a prefix cache."""
    press_state(cache)[_ANSWER] = True


def is_answer_cache(cache: Cache) -> bool:
    return bool(cache.__dict__.get(_PRESS_STATE, {}).get(_ANSWER))


def layer_state(cache: Cache, layer_idx: int) -> dict:
    """Per-row state a press keeps about one compressed layer, ``{key: value}`` (see :class:`_CompressedStorage`).

    Each value has the batch's rows first and a ``select_rows(rows)`` method returning the value for the rows
    ``rows`` (new row i = old row ``rows[i]``): beam search, ``batch_repeat_interleave`` and ``batch_select_indices``
    apply it, so the state always describes the rows the layer stores. It is replaced when the layer is (a new
    compression writes a new layer), dropped by ``cache.reset()``, and copied by :func:`fork_cache`. Values must
    be replaced, never modified in place (a fork shares them until it replaces them).
    """
    layer = cache.layers[layer_idx]
    if not isinstance(layer, _CompressedStorage):
        raise TypeError(f"layer {layer_idx} holds no compressed context ({type(layer).__name__})")
    return layer.row_state


# ----------------------------------------------------------------------------------------------------------------
# Attention over ragged (head-wise compressed) layers
# ----------------------------------------------------------------------------------------------------------------

#: The attention implementation kvsqueeze registers for each base implementation it wraps.
RAGGED_IMPLEMENTATIONS = {
    "sdpa": "kvsqueeze_sdpa",
    "eager": "kvsqueeze_eager",
    "flash_attention_2": "kvsqueeze_flash_attention_2",
}
_BASE_OF = {v: k for k, v in RAGGED_IMPLEMENTATIONS.items()}


def _tail_visibility(
    attention_mask: torch.Tensor | None, q_len: int, n_tail: int, device: torch.device
) -> torch.Tensor:
    """Which appended tokens each query sees, boolean ``(b, h, q_len, n_tail)`` (``b``, ``h`` may be 1).

    Taken from the last ``n_tail`` columns of the mask transformers built (so padding and causality of the new
    tokens are kept), or causal when the mask was skipped (sdpa leaves it out when it is all-visible/causal).
    """
    if attention_mask is None or attention_mask.dim() != 4:
        i = torch.arange(q_len, device=device)[:, None]
        j = torch.arange(n_tail, device=device)[None, :]
        return (j <= (n_tail - q_len) + i)[None, None]
    tail = attention_mask[..., -n_tail:]
    if tail.dtype != torch.bool:  # additive float mask: 0 where visible, the dtype's minimum where hidden
        tail = tail > torch.finfo(tail.dtype).min / 2
    return tail


def ragged_attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid: torch.Tensor,
    n_tail: int,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact attention of ``query`` over keys whose per-head validity differs (torch ops; CPU or GPU).

    Parameters
    ----------
    query : Tensor
        ``(bsz, num_heads, q_len, head_dim)``.
    key, value : Tensor
        ``(bsz, num_kv_heads, kv_len, head_dim)``: a padded context followed by ``n_tail`` appended tokens.
    valid : Tensor
        Boolean ``(bsz, num_kv_heads, kv_len)``; False marks padding that must receive no attention.
    n_tail : int
        Appended tokens at the end of ``key`` (the question/generated tokens, causal among themselves).
    attention_mask : Tensor or None
        The 4-D mask transformers built for this step; only its last ``n_tail`` columns are used.

    Returns
    -------
    ``(bsz, q_len, num_heads, head_dim)`` output and, when ``need_weights``, ``(bsz, num_heads, q_len, kv_len)``
    attention weights.

    GQA without copying keys: the query heads of one group are stacked along the query axis, so every KV head
    attends once with its own validity mask.
    """
    bsz, n_heads, q_len, head_dim = query.shape
    n_kv = key.shape[1]
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads are not a multiple of {n_kv} key/value heads")
    groups = n_heads // n_kv
    kv_len = key.shape[-2]
    n_ctx = kv_len - n_tail
    tail = _tail_visibility(attention_mask, q_len, n_tail, query.device)  # (b, h, q, n_tail)
    if tail.shape[1] == 1:
        tail = tail.unsqueeze(2).expand(tail.shape[0], n_kv, groups, q_len, n_tail)
    else:  # one mask per query head
        tail = tail.reshape(tail.shape[0], n_kv, groups, q_len, n_tail)
    tail = tail.expand(bsz, n_kv, groups, q_len, n_tail).reshape(bsz, n_kv, groups * q_len, n_tail)
    ctx = valid[..., :n_ctx].unsqueeze(2).expand(bsz, n_kv, groups * q_len, n_ctx)
    mask = torch.cat([ctx, tail], dim=-1)  # (bsz, kv_heads, groups * q_len, kv_len)
    packed = query.reshape(bsz, n_kv, groups * q_len, head_dim)
    scale = head_dim**-0.5 if scaling is None else scaling
    if softcap is None and not need_weights:
        out = torch.nn.functional.scaled_dot_product_attention(
            packed, key, value, attn_mask=mask, dropout_p=dropout, scale=scale
        )
        weights = None
    else:
        logits = torch.matmul(packed, key.transpose(-1, -2)) * scale
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        logits = logits.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
        if dropout:
            probs = torch.nn.functional.dropout(probs, p=dropout)
        out = torch.matmul(probs, value)
        weights = probs.reshape(bsz, n_heads, q_len, kv_len) if need_weights else None
    out = out.reshape(bsz, n_heads, q_len, value.shape[-1]).transpose(1, 2).contiguous()
    return out, weights


def _flash_varlen_available(query: torch.Tensor) -> bool:
    if query.device.type != "cuda" or query.dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def ragged_flash_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid: torch.Tensor,
    n_tail: int,
    scaling: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The same attention through flash-attention's variable-length kernel: each (sequence, KV head) is its own
    sequence of ``kept + n_tail`` keys, queried by the ``groups × q_len`` query rows of its group.

    Causality uses the kernel's bottom-right alignment: query ``i`` of ``q_len`` sees every context key and the
    appended keys up to its own position, which is exactly the rule of :func:`ragged_attention_forward` when
    no padding mask applies (one unpadded sequence per context, as the pipeline runs it).
    """
    from flash_attn import flash_attn_varlen_func

    bsz, n_heads, q_len, head_dim = query.shape
    n_kv = key.shape[1]
    groups = n_heads // n_kv
    keep = valid.reshape(-1, key.shape[-2])  # (bsz * kv_heads, kv_len), padding False
    lengths_k = keep.sum(-1, dtype=torch.int32)
    k_flat = key.reshape(-1, key.shape[-2], head_dim)[keep].unsqueeze(1)  # (total_k, 1, d)
    v_flat = value.reshape(-1, value.shape[-2], value.shape[-1])[keep].unsqueeze(1)
    # Queries: per (sequence, kv head), q_len rows with `groups` heads each (GQA handled by the kernel).
    q_flat = query.reshape(bsz, n_kv, groups, q_len, head_dim).permute(0, 1, 3, 2, 4).reshape(-1, groups, head_dim)
    zero = torch.zeros(1, dtype=torch.int32, device=query.device)
    cu_k = torch.cat([zero, lengths_k.cumsum(0, dtype=torch.int32)])
    cu_q = torch.arange(0, (bsz * n_kv + 1) * q_len, q_len, dtype=torch.int32, device=query.device)
    out = flash_attn_varlen_func(
        q_flat, k_flat, v_flat, cu_q, cu_k, q_len, int(lengths_k.max()),
        softmax_scale=scaling, causal=True, softcap=softcap or 0.0,
    )  # (bsz * kv_heads * q_len, groups, d)
    # rows were (sequence, kv head, query) with `groups` heads each; query head h = kv_head * groups + g
    return out.reshape(bsz, n_kv, q_len, groups, -1).permute(0, 2, 1, 3, 4).reshape(bsz, q_len, n_heads, -1)


@functools.cache
def _base_attention(base: str, module_type: type) -> Callable:
    """The attention function transformers would have used for ``base`` in a model with attention modules of
    ``module_type`` (looked up once per pair: this runs in every attention call)."""
    if base == "eager":
        fn = getattr(sys.modules.get(module_type.__module__), "eager_attention_forward", None)
        if fn is None:
            raise UnsupportedModelError(f"{module_type.__name__} has no eager_attention_forward")
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[base]


def _fit_mask(mask: torch.Tensor | None, kv_len: int, tail: int) -> torch.Tensor | None:
    """A 4-D mask built for another layer's length, refitted to ``kv_len`` keys: the layer's compressed context
    (its first ``kv_len - tail`` entries) visible, the original mask's last ``tail`` columns for the rest — the
    tokens appended since compression and the new ones, which every layer stores alike, so a padded row's padding
    stays hidden. Any other mask is returned as is. Compressed layers may store different counts (per-layer
    budgets, ragged heads), but transformers builds one mask per attention type from a single layer's sizes."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-1] == kv_len:
        return mask
    tail = min(tail, kv_len, mask.shape[-1])
    context = kv_len - tail
    if mask.dtype == torch.bool:
        visible = torch.ones(*mask.shape[:-1], context, dtype=torch.bool, device=mask.device)
    else:
        visible = torch.zeros(*mask.shape[:-1], context, dtype=mask.dtype, device=mask.device)
    return torch.cat([visible, mask[..., mask.shape[-1] - tail :]], dim=-1)


def layer_tail(cache: Cache, layer_idx: int) -> int:
    """Entries layer ``layer_idx`` stores after its compressed context: the tokens appended since compression,
    the same count in every layer (a layer that was not compressed stores them after its whole prefill)."""
    layer = cache.layers[layer_idx]
    if isinstance(layer, CompressedLayer):
        return layer.keys.shape[-2] - layer.n_compressed
    if isinstance(layer, RaggedLayer):
        return layer.keys.shape[-2]
    for other in cache.layers:
        if isinstance(other, (CompressedLayer, RaggedLayer)):
            return layer_tail(cache, cache.layers.index(other))
    return 0


def _make_ragged_attention(base: str) -> Callable:
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        valid = ragged_valid(key)
        if valid is None:  # a uniform layer (or the prefill): exactly what the base implementation does
            tail = getattr(key, "kvsqueeze_tail", query.shape[2])  # a compressed layer says how many it appended
            attention_mask = _fit_mask(attention_mask, key.shape[-2], tail)
            return _base_attention(base, type(module))(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        n_tail = key.kvsqueeze_tail
        softcap = kwargs.get("softcap")
        # The varlen kernel takes no padding mask: use it only when transformers built none (unpadded batch).
        if base == "flash_attention_2" and attention_mask is None and not dropout and _flash_varlen_available(query):
            return ragged_flash_forward(query, key, value, valid, n_tail, scaling, softcap), None
        return ragged_attention_forward(
            query, key, value, valid, n_tail, attention_mask, scaling, dropout, softcap, need_weights=base == "eager"
        )

    attention.__name__ = f"{RAGGED_IMPLEMENTATIONS[base]}_attention"
    return attention


@functools.cache
def register_ragged_attention() -> None:
    """Register kvsqueeze's attention implementations (and their mask builders) with transformers, once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, flash_attention_mask, sdpa_mask

    masks = {"sdpa": sdpa_mask, "eager": eager_mask, "flash_attention_2": flash_attention_mask}
    for base, name in RAGGED_IMPLEMENTATIONS.items():
        AttentionInterface.register(name, _make_ragged_attention(base))
        AttentionMaskInterface.register(name, masks[base])


def _implementations(config: Any) -> dict[str, Any]:
    """Every (sub-)config's attention implementation, nested as ``set_attn_implementation`` takes them back:
    ``{"": own, sub_config_name: {...}, ...}``."""
    saved: dict[str, Any] = {"": getattr(config, "_attn_implementation", None)}
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            saved[key] = _implementations(sub)
    return saved


def _text_config_request(config: Any, text_config: Any, implementation: str) -> str | dict[str, Any] | None:
    """The ``set_attn_implementation`` argument that gives ``text_config`` (``config`` itself or one of its
    sub-configs) ``implementation`` and leaves every other (sub-)config as it is; None when not found."""
    if config is text_config:
        return {"": implementation} if getattr(config, "sub_configs", None) else implementation
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is None:
            continue
        inner = _text_config_request(sub, text_config, implementation)
        if inner is not None:
            return {key: inner if isinstance(inner, dict) else {"": inner}}
    return None


def text_attention_implementation(model: nn.Module) -> str:
    """The attention implementation the model's decoder (its text config) runs (``"eager"`` when unset)."""
    return getattr(model.config.get_text_config(), "_attn_implementation", None) or "eager"


@contextmanager
def decoder_attention(model: nn.Module, implementation: str) -> Iterator[None]:
    """Run the model's decoder (the text config) with ``implementation``; every (sub-)config's implementation is
    restored afterwards. A multimodal model's vision tower keeps its own throughout."""
    saved = _implementations(model.config)
    request = _text_config_request(model.config, model.config.get_text_config(), implementation)
    model.set_attn_implementation(request if request is not None else implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(saved if len(saved) > 1 else saved[""])


class _AttentionState:
    """How many of kvsqueeze's attention adjustments are open in the process. :class:`RaggedLayer` refuses to run
    while no :func:`ragged_attention` block is open; :class:`CompressedLayer` refuses uneven layer lengths while no
    block fits masks per layer (either kind).

    Process-wide, not per thread, because the adjustments themselves are: ``ragged_attention`` switches the model's
    attention implementation and ``aligned_masks`` hooks its modules, so decoding in a worker thread inside a press
    block (``TextIteratorStreamer``) runs through them and must not be refused.
    """

    def __init__(self) -> None:
        self.ragged = 0  # open ragged_attention blocks
        self.aligned = 0  # open ModelAdapter.aligned_masks blocks
        self.lock = threading.Lock()

    @property
    def fits_uneven(self) -> bool:
        return bool(self.ragged or self.aligned)


_ATTENTION_STATE = _AttentionState()


@contextmanager
def _open(counter: str) -> Iterator[None]:
    with _ATTENTION_STATE.lock:
        setattr(_ATTENTION_STATE, counter, getattr(_ATTENTION_STATE, counter) + 1)
    try:
        yield
    finally:
        with _ATTENTION_STATE.lock:
            setattr(_ATTENTION_STATE, counter, getattr(_ATTENTION_STATE, counter) - 1)


@contextmanager
def ragged_attention(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with attention that understands head-wise (ragged) cache layers, then restore it.

    The model's implementation (``sdpa``, ``eager`` or ``flash_attention_2``) is swapped for kvsqueeze's
    registered wrapper of it: uniform layers run exactly the original function; ragged layers run exact attention
    over each head's own entries (flash-attention's variable-length kernel on CUDA when installed, torch ops
    otherwise). Nested use is a no-op.
    """
    register_ragged_attention()
    current = text_attention_implementation(model)
    if current in _BASE_OF:
        with _open("ragged"):
            yield
        return
    if current not in RAGGED_IMPLEMENTATIONS:
        raise UnsupportedModelError(
            f"head-wise compressed caches need attn_implementation 'sdpa', 'eager' or 'flash_attention_2'; "
            f"the model runs {current!r}"
        )
    with decoder_attention(model, RAGGED_IMPLEMENTATIONS[current]), _open("ragged"):
        yield


# ----------------------------------------------------------------------------------------------------------------
# Gated full/streaming attention (DuoAttention calibration)
# ----------------------------------------------------------------------------------------------------------------

#: The attention implementation registered for DuoAttention's gated training forward.
GATED_IMPLEMENTATION = "kvsqueeze_duo_gated"
_GATED_STATE: list[tuple[torch.Tensor, int, int, frozenset[int]]] = []  # innermost active gating last


def streaming_visibility(q_len: int, kv_len: int, n_sink: int, n_recent: int, device: torch.device) -> torch.Tensor:
    """Boolean ``(q_len, kv_len)``: what a streaming head sees — the first ``n_sink`` keys and the ``n_recent``
    most recent keys up to the query itself (queries are the last ``q_len`` of the ``kv_len`` positions)."""
    i = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    j = torch.arange(kv_len, device=device)[None, :]
    return (j <= i) & ((j < n_sink) | (i - j < n_recent))


def gated_attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    gates: torch.Tensor,
    n_sink: int,
    n_recent: int,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
) -> torch.Tensor:
    """DuoAttention's mixed attention: ``α · full + (1 − α) · streaming`` per KV head (arXiv 2410.10819, §3.1).

    Parameters
    ----------
    query : Tensor
        ``(bsz, num_heads, q_len, head_dim)``.
    key, value : Tensor
        ``(bsz, num_kv_heads, kv_len, head_dim)``.
    gates : Tensor
        ``(num_kv_heads,)`` gate values α in [0, 1] (differentiable); query head ``h`` uses the gate of its KV
        head ``h // (num_heads // num_kv_heads)``.
    n_sink, n_recent : int
        The streaming heads' window: sink tokens and recent tokens (the query included).
    attention_mask : Tensor or None
        The 4-D mask transformers built (causal when None); the streaming branch also applies it.

    Returns
    -------
    ``(bsz, q_len, num_heads, head_dim)``, the layout transformers' attention functions return.
    """
    n_heads, q_len = query.shape[1], query.shape[2]
    n_kv, kv_len = key.shape[1], key.shape[2]
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads are not a multiple of {n_kv} key/value heads")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa = n_heads != n_kv
    visible = _tail_visibility(attention_mask, q_len, kv_len, query.device)  # (b, h, q, kv), b and h may be 1
    if attention_mask is None and q_len == kv_len:  # plain causal: sdpa's fused causal kernel
        full = sdpa(query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa)
    else:
        full = sdpa(query, key, value, attn_mask=visible, scale=scaling, enable_gqa=gqa)
    # Streaming branch in blocks of queries: a block only reads the sinks and the keys of its recent windows.
    window = streaming_visibility(q_len, kv_len, n_sink, n_recent, query.device)
    offset, block, parts = kv_len - q_len, 128, []
    for start in range(0, q_len, block):
        end = min(q_len, start + block)
        first = max(0, offset + start - n_recent + 1)
        sink_end = min(n_sink, first)
        cols = torch.cat([torch.arange(sink_end), torch.arange(first, offset + end)]).to(query.device)
        mask = visible[..., start:end, :][..., cols] & window[start:end][:, cols]
        parts.append(sdpa(query[:, :, start:end], key[:, :, cols], value[:, :, cols], attn_mask=mask, scale=scaling,
                          enable_gqa=gqa))
    stream = torch.cat(parts, dim=2)
    alpha = gates.to(query.dtype).repeat_interleave(n_heads // n_kv)[None, :, None, None]
    out = stream + alpha * (full - stream)
    return out.transpose(1, 2).contiguous()


def _gated_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    if not _GATED_STATE:
        raise RuntimeError(f"{GATED_IMPLEMENTATION} attention runs only inside adapter.gated_attention(...)")
    gates, n_sink, n_recent, layers = _GATED_STATE[-1]
    if module.layer_idx not in layers:  # not gated (sliding-window layers): the model's own sdpa attention
        return _base_attention("sdpa", type(module))(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("softcap") is not None:
        raise UnsupportedModelError("gated (DuoAttention) attention does not support attention-logit softcapping")
    out = gated_attention_forward(
        query, key, value, gates[module.layer_idx], n_sink, n_recent, attention_mask, scaling
    )
    return out, None


@functools.cache
def register_gated_attention() -> None:
    """Register the gated attention implementation (and its sdpa mask builder) with transformers, once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GATED_IMPLEMENTATION, _gated_attention)
    AttentionMaskInterface.register(GATED_IMPLEMENTATION, sdpa_mask)


@contextmanager
def gated_attention(
    model: nn.Module, gates: torch.Tensor, n_sink: int, n_recent: int, layers: list[int] | None = None
) -> Iterator[None]:
    """Run ``model`` with DuoAttention's gated attention at ``layers`` (default: the full-attention layers).

    ``gates`` is ``(num_layers, num_kv_heads)``, typically a leaf tensor with ``requires_grad``: the attention
    output of every gated layer is ``α · full + (1 − α) · streaming`` (see :func:`gated_attention_forward`), so
    gradients of anything computed from the model's output reach ``gates``. The model's attention
    implementation is restored on exit.
    """
    adapter = ModelAdapter(model)
    n_layers, n_kv = adapter.shape.num_layers, adapter.shape.num_key_value_heads
    if tuple(gates.shape) != (n_layers, n_kv):
        raise ValueError(f"gates must be (num_layers, num_kv_heads) = ({n_layers}, {n_kv}), got {tuple(gates.shape)}")
    register_gated_attention()
    layers = adapter.compressible_layers if layers is None else layers
    _GATED_STATE.append((gates, int(n_sink), int(n_recent), frozenset(layers)))
    try:
        with decoder_attention(model, GATED_IMPLEMENTATION):
            yield
    finally:
        _GATED_STATE.pop()


# ----------------------------------------------------------------------------------------------------------------
# Model adapter
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int | None


class ModelAdapter:
    """Read-only view of a causal LM's attention internals.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM of a supported architecture (``SUPPORTED_MODEL_TYPES``).
    """

    def __init__(self, model: nn.Module):
        config = getattr(model, "config", None)
        if config is None:
            raise TypeError(f"expected a transformers model with a .config, got {type(model).__name__}")
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        model_type = getattr(text_config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"unsupported architecture {model_type!r} ({type(model).__name__}); "
                f"kvsqueeze supports: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        self.model = model
        self.config = text_config
        self.model_type = model_type
        modules: dict[int, nn.Module] = {}
        for _, module in model.named_modules():
            if hasattr(module, "layer_idx") and hasattr(module, "o_proj") and (
                hasattr(module, "q_proj") or hasattr(module, "qkv_proj")
            ):
                modules[module.layer_idx] = module
        if not modules:
            raise UnsupportedModelError(f"found no attention modules in {type(model).__name__}")
        self.attention_modules: list[nn.Module] = [modules[i] for i in sorted(modules)]
        n = len(self.attention_modules)
        layer_types = getattr(text_config, "layer_types", None)
        # A window at least as long as the model's maximum context never drops a token (Phi-3-mini-128k: 262144 for
        # 131072 positions): such layers are full attention in effect, and compressible.
        window = getattr(text_config, "sliding_window", None)
        max_positions = getattr(text_config, "max_position_embeddings", None)
        never_slides = bool(window and max_positions and window >= max_positions)
        if layer_types is None:
            # Without per-layer types, transformers' cache makes every layer a sliding-window layer when the config
            # sets a window (Mistral-7B-v0.1: 4096 tokens, Phi-3-mini-4k: 2047): read the layout off that cache.
            layer_types = [
                SLIDING_ATTENTION
                if isinstance(layer, DynamicSlidingWindowLayer) and not never_slides
                else FULL_ATTENTION
                for layer in DynamicCache(config=model.config).layers
            ]
        #: The config's attention type of each layer (which rotary parameters it uses, e.g. Gemma 3's local RoPE).
        self.layer_types: list[str] = list(layer_types)[:n]
        #: Layers that keep every token: full attention, and sliding windows that cover the whole maximum context.
        self._compressible = [
            t == FULL_ATTENTION or (never_slides and t == SLIDING_ATTENTION) for t in self.layer_types
        ]
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        self.shape = ModelShape(
            num_layers=n,
            num_attention_heads=text_config.num_attention_heads,
            num_key_value_heads=text_config.num_key_value_heads,
            head_dim=head_dim,
            max_position_embeddings=getattr(text_config, "max_position_embeddings", None),
        )
        self._rotary = self._find_rotary()
        self._rotary_takes_layer_type = self._rotary is not None and (
            "layer_type" in inspect.signature(self._rotary.forward).parameters
        )
        rope_types = getattr(self._rotary, "rope_type", None)
        rope_types = list(rope_types.values()) if isinstance(rope_types, dict) else [rope_types]
        # dynamic NTK and longrope rotary modules change their frequencies with the positions they are called at
        self._rotary_stateful = any(isinstance(t, str) and ("dynamic" in t or t == "longrope") for t in rope_types)
        forward_params = inspect.signature(type(self.attention_modules[0]).forward).parameters
        self.cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"
        self._memo: dict[tuple, Any] = {}

    #: Most values :meth:`memoized` keeps; the oldest is dropped first (sweeps over many context lengths).
    MEMO_SIZE = 64

    def memoized(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()``, computed once per ``key`` for the lifetime of this adapter.

        For values that depend only on the model and on ``key`` — e.g. the RoPE average over the positions after
        the context, the same for every layer of one type — so a press computes them once per prefill, not once
        per layer. Presses stay stateless; the adapter lives as long as one press block or recorded prefill.
        """
        if key not in self._memo:
            if len(self._memo) >= self.MEMO_SIZE:
                del self._memo[next(iter(self._memo))]
            self._memo[key] = compute()
        return self._memo[key]

    # -- layout ---------------------------------------------------------------------------------------------
    @property
    def compressible_layers(self) -> list[int]:
        """Indices of the layers that keep every token: full-attention layers, and sliding-window layers whose
        window is at least the model's maximum context. Layers that really slide are never compressed."""
        return [i for i, c in enumerate(self._compressible) if c]

    def is_compressible(self, layer_idx: int) -> bool:
        return self._compressible[layer_idx]

    def check_compressible(self) -> None:
        """Raise when the model has no full-attention layer: a press would then silently compress nothing."""
        if self.compressible_layers:
            return
        window = getattr(self.config, "sliding_window", None)
        raise ValueError(
            f"{type(self.model).__name__} has no full-attention layer to compress: all {len(self.layer_types)} "
            f"layers are {sorted(set(self.layer_types))} (sliding_window={window!r}), and kvsqueeze leaves "
            "sliding-window layers alone. If the context and answers fit in the window, full attention is exact: "
            "load the model with sliding_window=None (kvsqueeze.load_model(..., sliding_window=None); on the command "
            "line --model-option sliding_window=None)"
        )

    @functools.cached_property
    def decoder(self) -> nn.Module:
        """The module that runs the decoder layers (``model.model`` of a causal LM, or the model itself when it
        is the bare decoder): every forward that fills the cache passes through it, also a call on the inner
        model that bypasses the causal LM's ``forward``."""
        first = self.attention_modules[0]
        found = self.model
        for _, module in self.model.named_modules():
            layers = getattr(module, "layers", None)
            if isinstance(layers, nn.ModuleList) and any(m is first for m in layers.modules()):
                found = module  # named_modules lists parents first: the last match is the innermost owner
        return found

    @property
    def vocab_size(self) -> int | None:
        """Token ids the model has an embedding for: the input embedding's rows (``config.vocab_size`` when the
        model does not expose them)."""
        embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        return getattr(embeddings, "num_embeddings", None) or getattr(self.config, "vocab_size", None)

    def check_token_ids(self, ids: torch.Tensor, source: str, hint: str = "") -> None:
        """Raise a ValueError naming ``source`` when ``ids`` hold a token id outside the model's vocabulary (the
        embedding lookup would fail with a bare IndexError, or read another model's token)."""
        vocab = self.vocab_size
        if vocab is None or not ids.numel():
            return
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            raise ValueError(
                f"{source} holds token id {low if low < 0 else high}, outside the model's vocabulary of {vocab} "
                f"tokens [0, {vocab}){hint}"
            )

    @property
    def attn_implementation(self) -> str:
        """What the decoder runs (the text config's implementation; a vision tower may run another)."""
        return getattr(self.config, "_attn_implementation", None) or "eager"

    def new_cache(self) -> Cache:
        """An empty cache laid out for this model (sliding-window layers where the config has them)."""
        return DynamicCache(config=self.model.config)

    def cache_from_call(self, kwargs: dict) -> Cache | None:
        cache = kwargs.get(self.cache_kwarg)
        if cache is None:  # older/newer name
            cache = kwargs.get("past_key_values", kwargs.get("cache"))
        return cache

    def model_call_kwargs(self, cache: Cache) -> dict:
        """Keyword arguments that pass ``cache`` to the model's ``forward``/``generate`` under this version."""
        return {self.cache_kwarg: cache}

    # -- query / key recomputation -----------------------------------------------------------------------------
    @staticmethod
    def query_projection(module: nn.Module) -> nn.Module:
        """The linear layer whose output holds the queries (``q_proj``, or Phi-3's fused ``qkv_proj``)."""
        return module.q_proj if hasattr(module, "q_proj") else module.qkv_proj

    def register_query_capture(self, store: CapturedQueries, layers: list[int] | None = None) -> list[Any]:
        """Keep each layer's query-projection output in ``store`` during a forward pass (per thread).

        Presses that need the context's queries then reuse the ones the model computed instead of projecting the
        hidden states a second time (a full ``q_proj`` pass per layer).
        """
        layers = self.compressible_layers if layers is None else layers

        def make_hook(idx: int):
            def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
                store[idx] = output

            return hook

        return [
            self.query_projection(self.attention_modules[i]).register_forward_hook(make_hook(i)) for i in layers
        ]

    def _project_queries(
        self, module: nn.Module, hidden_states: torch.Tensor, projected: torch.Tensor | None = None
    ) -> torch.Tensor:
        bsz, q_len, _ = hidden_states.shape
        d, h = self.shape.head_dim, self.shape.num_attention_heads
        q = self.query_projection(module)(hidden_states) if projected is None else projected
        if not hasattr(module, "q_proj"):  # phi3: fused qkv projection, queries first
            q = q[..., : h * d]
        q = q.view(bsz, q_len, h, d)
        if hasattr(module, "q_norm"):  # qwen3 / gemma3 QK-norm, applied before RoPE
            q = module.q_norm(q)
        return q.transpose(1, 2)  # (bsz, num_heads, q_len, head_dim)

    def _project_keys(self, module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        bsz, q_len, _ = hidden_states.shape
        d, h, hk = self.shape.head_dim, self.shape.num_attention_heads, self.shape.num_key_value_heads
        if hasattr(module, "k_proj"):
            k = module.k_proj(hidden_states)
        else:
            k = module.qkv_proj(hidden_states)[..., h * d : (h + hk) * d]
        k = k.view(bsz, q_len, hk, d)
        if hasattr(module, "k_norm"):
            k = module.k_norm(k)
        return k.transpose(1, 2)

    @torch.no_grad()  # scoring never needs gradients, and recorded inputs may be inference-mode tensors
    def query_states(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        projected: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Queries ``(bsz, num_heads, q_len, head_dim)`` for ``hidden_states`` (the attention input).

        Pre-RoPE (QK-norm applied) when ``position_embeddings`` is None, post-RoPE otherwise. ``projected`` is the
        query projection's output for these hidden states when it was captured during the forward pass.
        """
        q = self._project_queries(module, hidden_states, projected)
        if position_embeddings is not None:
            q = apply_rope(q, *position_embeddings)
        return q

    @torch.no_grad()
    def key_states(self, module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE keys ``(bsz, num_kv_heads, q_len, head_dim)`` (QK-norm applied)."""
        return self._project_keys(module, hidden_states)

    def scaling(self, module: nn.Module) -> float:
        return float(getattr(module, "scaling", self.shape.head_dim**-0.5))

    def attention_softcap(self, module: nn.Module) -> float | None:
        """The attention-logit softcap ``c`` (logits become ``tanh(x / c) * c``) the model applies, or None.

        Gemma 3 keeps ``attn_logit_softcapping`` in its config but replaced softcapping by QK-norm: its attention
        never passes the value to the kernel, so recomputed attention must ignore it there.
        """
        if self.model_type in _SOFTCAP_UNUSED:
            return None
        cap = getattr(module, "attn_logit_softcapping", None)
        if cap is None:
            cap = getattr(self.config, "attn_logit_softcapping", None)
        return float(cap) if cap else None

    @torch.no_grad()
    def value_output_norms(self, module: nn.Module, values: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """``‖W_o^h v_i‖₁`` averaged over the query heads ``h`` of each GQA group, ``(bsz, kv_heads, seq_len)``.

        ``W_o^h`` is the block of the output projection that reads query head ``h``'s attention output, so the
        norm is how much value ``v_i`` can move the layer's output (CriticalKV's perturbation bound).
        """
        h, hk, d = self.shape.num_attention_heads, self.shape.num_key_value_heads, values.shape[-1]
        groups = h // hk
        weight = module.o_proj.weight  # (hidden, num_heads * head_dim)
        w = weight.view(weight.shape[0], hk, groups, d).permute(1, 2, 3, 0).to(values.dtype)  # (hk, g, d, hidden)
        out = []
        for start in range(0, values.shape[-2], chunk):
            v = values[..., start : start + chunk, :]  # (bsz, hk, n, d)
            projected = torch.einsum("bknd,kgdo->bkgno", v, w)
            out.append(projected.abs().sum(-1).float().mean(2))
        return torch.cat(out, dim=-1)

    # -- rotary embeddings ---------------------------------------------------------------------------------------
    def _find_rotary(self) -> nn.Module | None:
        for name, module in self.model.named_modules():
            if name.endswith("rotary_emb"):
                return module
        return None

    def rope(self, layer_idx: int, position_ids: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` of shape ``(bsz, len, rotary_dim)`` for ``position_ids`` at layer ``layer_idx``.

        Computed by the model's rotary module. Dynamic-NTK and longrope modules rescale their frequencies for the
        largest position they are called at and keep that state; it is restored afterwards, so a press asking for
        positions past the context (Expected Attention's future queries) leaves the model's next forward pass as
        it would have been.
        """
        if self._rotary is None:
            raise UnsupportedModelError(f"{type(self.model).__name__} has no rotary embedding module")
        args = (like, position_ids)
        if self._rotary_takes_layer_type:
            args += (self.layer_types[layer_idx],)
        if not self._rotary_stateful:
            return self._rotary(*args)
        state = _rotary_state(self._rotary)
        try:
            return self._rotary(*args)
        finally:
            _restore_rotary_state(self._rotary, state)

    # -- hooks ---------------------------------------------------------------------------------------------------
    def register_attention_hooks(self, hook: Callable, layers: list[int] | None = None) -> list[Any]:
        """Register ``hook(module, args, kwargs, output)`` as a forward hook on attention modules."""
        layers = self.compressible_layers if layers is None else layers
        return [forward_hook(self.attention_modules[i], hook) for i in layers]

    def register_prefill_guard(self) -> list[Any]:
        """A forward pre-hook on the model that refuses, before any layer runs, a call a press cannot compress:

        * no KV cache (``use_cache=False``, or the config's ``use_cache`` off): there is nothing to compress;
        * a padded prefill (a 2-D ``attention_mask`` with zeros): compression evicts entries per head wherever they
          are, so a padding mask cannot follow the kept entries, and padded entries would be scored like tokens
          and attended to afterwards. Only prefills (empty cache) are checked, so decoding steps pay no host sync;
        * a cache other than transformers' dynamic one (static, offloaded, quantized layers): a static layer's
          keys are its whole fixed-size buffer, empty slots included, and a quantized layer's are only its
          recent residual, so a press would score and keep the wrong entries;
        * a cache that already holds tokens no press compressed (a prefix or system-prompt cache, a prefill done
          before the block): a press compresses the prefill into an empty cache, from that prefill's hidden
          states; the cached tokens' are gone, so it would compress nothing. A cache that a press compressed
          (in this block or an earlier one) may be continued: the tokens appended to it are kept, like questions.

        The hook sits on :attr:`decoder`, so calling the inner model directly is checked too. A press's own extra
        passes (:meth:`internal_pass`) are not checked.
        """

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if getattr(self.model, _INTERNAL_PASS, 0):
                return
            cache = self.cache_from_call(kwargs)
            if cache is None:
                use_cache = kwargs.get("use_cache")
                if use_cache is None:
                    use_cache = getattr(self.config, "use_cache", True)
                if not use_cache:
                    raise ValueError(
                        "the model was called without a KV cache (use_cache=False), so a press has nothing to "
                        "compress; call it with use_cache=True (generate's default)"
                    )
            elif cache.get_seq_length() > 0:
                if any(isinstance(layer, (CompressedLayer, RaggedLayer)) for layer in cache.layers):
                    return  # a decoding step, or tokens appended to a compressed context: the prefill was checked
                if is_answer_cache(cache):
                    return  # a pipeline answer on an uncompressed context (another thread's, most likely)
                raise ValueError(
                    f"the cache already holds {cache.get_seq_length()} tokens that no press compressed (a prefix "
                    "cache, or a prefill run before the press block): a press compresses the prefill into an empty "
                    "cache, from its hidden states, so it would compress nothing here. Prefill the whole prompt "
                    "inside the press block, or continue a cache that a press compressed"
                )
            else:
                other = {type(layer).__name__ for layer in cache.layers if type(layer) not in _PLAIN_LAYERS}
                if other:
                    raise ValueError(
                        f"a press compresses transformers' dynamic cache (DynamicCache), not {type(cache).__name__} "
                        f"with {', '.join(sorted(other))}; drop cache_implementation / pass a DynamicCache"
                    )
            check_unpadded(kwargs.get("attention_mask", args[1] if len(args) > 1 else None))

        def check_unpadded(mask: Any) -> None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                return
            padded = (mask == 0).any(dim=-1)
            if bool(padded.any()):
                rows = padded.nonzero().flatten().tolist()
                raise ValueError(
                    f"a padded batch cannot be compressed: attention_mask has padding in row(s) {rows} of "
                    f"{mask.shape[0]}; compress one sequence at a time (kvsqueeze.Pipeline does)"
                )

        handles = [forward_pre_hook(self.decoder, pre_hook)]
        if self.model.config is not self.config:
            # A multimodal wrapper (its text config is a sub-config) may hand the decoder its masks already built (a
            # dict of 4-D masks for Gemma 3's): the 2-D padding mask is checked where the wrapper receives it.
            mask_index = _argument_index(type(self.model).forward, "attention_mask")

            def outer_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                if getattr(self.model, _INTERNAL_PASS, 0):
                    return
                cache = self.cache_from_call(kwargs)
                if cache is not None and cache.get_seq_length() > 0:
                    return  # not a prefill: the decoder's hook decides
                mask = kwargs.get("attention_mask")
                if mask is None and mask_index is not None and len(args) > mask_index:
                    mask = args[mask_index]
                check_unpadded(mask)

            handles.append(forward_pre_hook(self.model, outer_pre_hook))
        return handles

    def register_mask_hook(self, on_mask: Callable[[Cache | None, Any], None]) -> list[Any]:
        """Call ``on_mask(cache, attention_mask)`` before every forward, with the attention mask as the caller passed
        it (a 2-D padding mask, or None): on the decoder of a causal LM, on the wrapper of a multimodal model,
        whose decoder receives its masks already built (Gemma 3's dict of 4-D masks). Returns the hook handles."""
        module = self.model if self.model.config is not self.config else self.decoder
        mask_index = _argument_index(type(module).forward, "attention_mask")

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            mask = kwargs.get("attention_mask")
            if mask is None and mask_index is not None and len(args) > mask_index:
                mask = args[mask_index]
            on_mask(self.cache_from_call(kwargs), mask)

        return [forward_pre_hook(module, pre_hook)]

    @contextmanager
    def internal_pass(self) -> Iterator[None]:
        """Mark the model calls in the block as a press's own extra passes (KVzip's reconstruction runs the model
        on a fork of the uncompressed context cache), which :meth:`register_prefill_guard` lets through."""
        setattr(self.model, _INTERNAL_PASS, getattr(self.model, _INTERNAL_PASS, 0) + 1)
        try:
            yield
        finally:
            depth = getattr(self.model, _INTERNAL_PASS) - 1
            if depth:
                setattr(self.model, _INTERNAL_PASS, depth)
            else:
                delattr(self.model, _INTERNAL_PASS)

    def register_generate_guard(self, recompresses: bool = False) -> list[Any]:
        """Refuse, while a press is open, the ``generate()`` modes that do not feed the model "the prompt, then one
        token per step" (the model's own forward hooks cannot tell them apart):

        * assisted and prompt-lookup decoding: the first forward holds the prompt *and* unverified draft tokens,
          which the press would compress as if they were context (and a rejected draft then cannot be cropped);
        * chunked prefill (``prefill_chunk_size``): only the first chunk would be compressed — unless the press
          ``recompresses`` (it compresses again as the later chunks are appended);
        * a ``cache_implementation`` other than the dynamic cache (static buffers, offloading, quantization).

        Beam search is allowed: it reorders the cache's rows between steps, and a press's per-row state follows
        them (:func:`layer_state`). ``model.generate`` is shadowed by an instance attribute for the duration; the
        returned handle removes it. A bare decoder (``model.model``) has no ``generate`` and gets no guard: open
        the press on the model whose ``generate`` you call, or these modes pass unchecked.
        """
        model = self.model
        if not callable(getattr(model, "generate", None)):
            return []
        original = model.generate
        shadowed = model.__dict__.get("generate")  # an instance attribute set by someone else: restored on removal

        @functools.wraps(original)  # the same name, docstring and signature as the method it guards
        def generate(*args: Any, **kwargs: Any):
            # generate(inputs, generation_config, ...): the config may come positionally
            given = kwargs.get("generation_config", args[1] if len(args) > 1 else None)
            config = given or getattr(model, "generation_config", None)

            def setting(name: str) -> Any:
                value = kwargs.get(name)
                return value if value is not None else getattr(config, name, None)

            problems = []
            drafting = [n for n in _DRAFTING_SETTINGS if setting(n) is not None]
            if kwargs.get("assistant_model") is not None:
                drafting.insert(0, "assistant_model")
            if drafting:
                problems.append(
                    f"assisted/prompt-lookup decoding ({', '.join(drafting)}) runs unverified draft tokens in the "
                    "prefill, which the press would compress as context"
                )
            if setting("prefill_chunk_size") is not None and not recompresses:
                problems.append("a chunked prefill (prefill_chunk_size) would be compressed one chunk only (a "
                                "decoding press compresses every chunk)")
            if setting("cache_implementation") not in _DYNAMIC_CACHE_IMPLEMENTATIONS:
                problems.append(f"cache_implementation={setting('cache_implementation')!r} is not the dynamic cache")
            if problems:
                raise ValueError(f"generate() under a press: {'; '.join(problems)}. Generate without them.")
            return original(*args, **kwargs)

        model.generate = generate

        class _Handle:
            @staticmethod
            def remove() -> None:
                if model.__dict__.get("generate") is generate:
                    if shadowed is None:
                        del model.__dict__["generate"]
                    else:
                        model.__dict__["generate"] = shadowed

        return [_Handle()]

    @staticmethod
    def cache_from_output(output: Any) -> Cache | None:
        """The cache a model's forward returned (``cache`` from 5.24, ``past_key_values`` before), or None."""
        cache = getattr(output, "cache", None)
        return cache if cache is not None else getattr(output, "past_key_values", None)

    @staticmethod
    def hidden_states_from_call(args: tuple, kwargs: dict) -> torch.Tensor:
        return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    @contextmanager
    def aligned_masks(self) -> Iterator[None]:
        """Fix 4-D attention masks for layers whose stored length differs from the layer the mask was built for.

        transformers builds one mask per attention type from a single layer's sizes. After a per-layer budget
        (PyramidKV) the other layers store a different number of entries; for them the mask is rebuilt as "the
        layer's compressed context visible, the original mask's columns for everything appended since" (tokens
        appended after compression are stored alike in every layer, so a left-padded question keeps its padding
        hidden). The prefill itself must be unpadded (:meth:`register_prefill_guard`).
        """

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict):
            c = self.cache_from_call(kwargs)
            if c is None or module.layer_idx >= len(c.layers):
                return None
            mask = kwargs.get("attention_mask")
            q_len = self.hidden_states_from_call(args, kwargs).shape[1]
            idx = module.layer_idx
            fitted = _fit_mask(mask, layer_physical_length(c, idx) + q_len, layer_tail(c, idx) + q_len)
            if fitted is mask:
                return None
            kwargs["attention_mask"] = fitted
            return args, kwargs

        handles = [
            forward_pre_hook(self.attention_modules[i], pre_hook)
            for i in self.compressible_layers
        ]
        try:
            with _open("aligned"):
                yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def compressed_attention(self, uneven_layers: bool, ragged: bool) -> Iterator[None]:
        """Attention that fits a compressed cache: masks realigned (:meth:`aligned_masks`) when layers store
        different counts, per-head attention (:func:`ragged_attention`) when heads do; nothing added otherwise."""
        with contextlib.ExitStack() as stack:
            if uneven_layers:
                stack.enter_context(self.aligned_masks())
            if ragged:
                stack.enter_context(ragged_attention(self.model))
            yield

    def attention_for_cache(self, cache: Cache) -> contextlib.AbstractContextManager[None]:
        """:meth:`compressed_attention` for what ``cache`` holds (decoding after compression)."""
        lengths = {layer_physical_length(cache, i) for i in self.compressible_layers}
        return self.compressed_attention(len(lengths) > 1, has_ragged_layers(cache))


def _argument_index(function: Callable, name: str) -> int | None:
    """Position of argument ``name`` among a method's positional arguments after ``self`` (None when absent)."""
    params = [p for p in inspect.signature(function).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]
    names = [p.name for p in params]
    return names.index(name) if name in names else None


def _rotary_state(rotary: nn.Module) -> dict[str, Any]:
    """A copy of what a dynamic rotary module's forward may change: its buffers (replaced or updated in place)
    and its plain tensor and number attributes (``max_seq_len_cached``, ``attention_scaling``, cached frequencies)."""
    state: dict[str, Any] = {"buffers": {k: (v, v.clone()) for k, v in rotary._buffers.items() if v is not None}}
    state["attrs"] = {
        k: v for k, v in vars(rotary).items() if not k.startswith("_") and isinstance(v, (torch.Tensor, int, float))
    }
    state["names"] = set(vars(rotary)) | set(rotary._buffers)
    return state


def _restore_rotary_state(rotary: nn.Module, state: dict[str, Any]) -> None:
    for name, (tensor, data) in state["buffers"].items():
        if rotary._buffers.get(name) is not tensor:
            rotary._buffers[name] = tensor  # replaced (dynamic NTK registers a new buffer): the saved one is intact
        elif not torch.equal(tensor, data):
            tensor.copy_(data)  # updated in place (longrope), as the module itself did in this same mode
    for name, value in state["attrs"].items():
        setattr(rotary, name, value)
    for name in set(vars(rotary)) - state["names"]:
        if not name.startswith("_"):
            # created by the call, e.g. a layer-typed module's ``full_attention_max_seq_len_cached``, which would
            # otherwise make the next forward skip its own rescaling
            delattr(rotary, name)
    for name in set(rotary._buffers) - state["names"]:
        del rotary._buffers[name]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(bsz, heads, len, head_dim)`` by ``cos, sin`` ``(bsz, len, rotary_dim)``.

    Partial rotary (Phi-3 with ``partial_rotary_factor < 1``) rotates the first ``rotary_dim`` channels only.
    """
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)


def rotate_between(
    keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, old: torch.Tensor, new: torch.Tensor
) -> torch.Tensor:
    """Move post-RoPE ``keys`` ``(bsz, heads, n, head_dim)`` from positions ``old`` ``(bsz, heads, n)`` to ``new``
    (``(n,)`` or like ``old``), with the rotation read off the ``cos, sin`` ``(bsz, len, rotary_dim)`` that rotated
    them (the layer's position embeddings; both positions must be below ``len``).

    ``cos, sin`` carry the rotary module's attention scaling ``s`` (``s·cos θ``, ``s·sin θ``), so
    ``cos Δ = (c_new c_old + s_new s_old) / s²`` and ``sin Δ = (s_new c_old − c_new s_old) / s²`` with
    ``s² = c_old² + s_old²``. It needs no inverse frequencies, which dynamic-NTK and
    longrope scaling change with the length of the rotary module's latest call. Computed in float32.
    """
    bsz, heads, n = old.shape
    rot = cos.shape[-1]
    table = torch.stack([cos, sin]).to(device=keys.device, dtype=torch.float32)  # (2, bsz, len, rot)
    if table.shape[1] == 1 and bsz > 1:
        table = table.expand(-1, bsz, -1, -1)

    def at(positions: torch.Tensor) -> torch.Tensor:  # (2, bsz, heads, n, rot)
        positions = positions.to(keys.device).expand(bsz, heads, n).reshape(bsz, heads * n)
        picked = table.gather(2, positions[None, :, :, None].expand(2, -1, -1, rot))
        return picked.view(2, bsz, heads, n, rot)

    (c_old, s_old), (c_new, s_new) = at(old), at(new)
    scale = c_old * c_old + s_old * s_old
    cos_d, sin_d = (c_new * c_old + s_new * s_old) / scale, (s_new * c_old - c_new * s_old) / scale
    k_rot, k_pass = keys[..., :rot].float(), keys[..., rot:]
    rotated = (k_rot * cos_d + rotate_half(k_rot) * sin_d).to(keys.dtype)
    return torch.cat([rotated, k_pass], dim=-1) if k_pass.shape[-1] else rotated
