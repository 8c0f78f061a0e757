"""The two base classes every press builds on, and the record of one layer's inputs that a press compresses.

Conventions, stated once:

* ``compression_ratio`` is the fraction of KV entries *removed*, ``0 <= r < 1``; ``n_kept = ⌊seq_len · (1 - r)⌋``
  (:func:`kept_for_ratio`).
  A press may instead be given ``budget``, an absolute number of kept entries per head.
* Shapes follow transformers: keys/values ``(bsz, num_key_value_heads, seq_len, head_dim)``, hidden states
  ``(bsz, seq_len, hidden_size)``, scores ``(bsz, num_key_value_heads, seq_len)`` with higher = keep.
* A press's compression is a pure function of one layer's recorded inputs (:class:`LayerInputs`). The hook that a
  press installs on a model only gathers those inputs and writes the result into the cache, so the same function
  runs on inputs recorded during a single shared prefill (the evaluation sweeps).
* Presses hold configuration only, never per-run state.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import nn

from kvsqueeze import adapter as A

if TYPE_CHECKING:
    from transformers.cache_utils import Cache


@dataclass(frozen=True)
class Capabilities:
    """What a press needs and does; the pipeline and evaluator read these instead of checking types.

    Attributes
    ----------
    needs_attention_weights : bool
        Scores from the full attention matrix of the prefill, so the model must run with ``eager`` attention.
    calibration : str or None
        Name of the calibration artifact the press loads (``kvsqueeze calibrate --method <name>``).
    headwise : bool
        Heads of one layer may keep different numbers of entries.
    phases : frozenset of str
        When the press compresses: ``"prefill"`` and/or ``"decoding"``.
    query_aware : bool
        The press is meant to see the question in the compressed prompt.
    extra_passes : bool
        Scoring needs model passes beyond the single prefill, so it cannot share a recorded prefill.
    changes_positions : bool
        Kept keys are moved to new RoPE positions (the cache's logical length stays the context length).
    uniform_layers : bool
        Every compressed layer keeps the same number of entries.
    reads_hidden_states : bool
        The scores read the layer's hidden states (its queries, recomputed or captured). Presses that score from
        keys, values, positions or an artifact alone say False, so what compresses during decoding
        (:class:`~kvsqueeze.presses.decoding.DecodingPress`) keeps no buffer of hidden states for them. True by
        default: a press that does not say is assumed to read them.
    """

    needs_attention_weights: bool = False
    calibration: str | None = None
    headwise: bool = False
    phases: frozenset[str] = frozenset({"prefill"})
    query_aware: bool = False
    extra_passes: bool = False
    changes_positions: bool = False
    uniform_layers: bool = True
    reads_hidden_states: bool = True

    @property
    def shares_recording(self) -> bool:
        """Whether the press can compress from one plain (sdpa) recorded prefill shared with other presses: no
        extra model passes, no attention weights (those need an eager prefill of their own)."""
        return not (self.extra_passes or self.needs_attention_weights)

    def merge(self, other: Capabilities) -> Capabilities:
        """Capabilities of two presses applied in sequence."""
        return Capabilities(
            needs_attention_weights=self.needs_attention_weights or other.needs_attention_weights,
            calibration=self.calibration or other.calibration,
            headwise=self.headwise or other.headwise,
            phases=self.phases & other.phases,
            query_aware=self.query_aware or other.query_aware,
            extra_passes=self.extra_passes or other.extra_passes,
            changes_positions=self.changes_positions or other.changes_positions,
            uniform_layers=self.uniform_layers and other.uniform_layers,
            reads_hidden_states=self.reads_hidden_states or other.reads_hidden_states,
        )


class derived_capabilities:
    """Decorator for wrappers whose capabilities come from the presses they wrap.

    On an instance it calls the decorated method; on the class (``press_class(name).capabilities``) it returns
    None, meaning "depends on the wrapped presses" — a property would return the property object itself.
    """

    def __init__(self, method):
        self.method = method
        self.__doc__ = method.__doc__

    def __get__(self, instance, owner=None) -> Capabilities | None:
        return None if instance is None else self.method(instance)


@dataclass
class LayerInputs:
    """Everything a press may read about one attention layer at the end of the prefill.

    Attributes
    ----------
    adapter : ModelAdapter
        Access to the model internals (query recomputation, RoPE, ``W_o``).
    module : nn.Module
        The attention module.
    layer_idx : int
        Index of the layer in the model.
    hidden_states : Tensor
        Attention input (after the layer's input norm), ``(bsz, seq_len, hidden_size)``.
    keys, values : Tensor
        Cached keys (post-RoPE) and values, ``(bsz, num_key_value_heads, seq_len, head_dim)``.
    position_embeddings : tuple of Tensor
        ``cos, sin`` used at this layer, ``(bsz, seq_len, rotary_dim)``.
    attentions : Tensor or None
        Attention weights ``(bsz, num_heads, seq_len, seq_len)`` when the model ran eager attention.
    projected_queries : Tensor or None
        The query projection's output ``(bsz, seq_len, out_features)`` captured during the forward pass, so
        :meth:`queries` does not project the hidden states again.
    budget : int or None
        Entries per head to keep at this layer, when a wrapping press decided it (AdaKV, CriticalKV, per-layer
        ratios hold the budget of the press they wrap); :meth:`Press.layer_budget` returns it before the press's
        own. None otherwise.
    key_positions : Tensor or None
        Original positions ``(bsz, num_key_value_heads, n)`` of ``keys``/``values`` when they are what an earlier
        press of a composition (or an earlier compression during decoding) kept; None when they are the whole
        context (position ``i`` at index ``i``).
    first_position : int
        Position of the first hidden state: 0 in a prefill, where the hidden states cover every token; during
        decoding-time compression (:class:`~kvsqueeze.presses.decoding.DecodingPress`) the hidden states are a
        buffer of the latest tokens only, which start at this position.
    """

    adapter: A.ModelAdapter
    module: nn.Module
    layer_idx: int
    hidden_states: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    attentions: torch.Tensor | None = None
    projected_queries: torch.Tensor | None = None
    budget: int | None = None
    key_positions: torch.Tensor | None = None
    first_position: int = 0

    @property
    def seq_len(self) -> int:
        """Number of keys to choose from (the context length, unless an earlier press already removed some)."""
        return self.keys.shape[-2]

    @property
    def context_length(self) -> int:
        """Tokens seen so far (the logical length): the hidden states cover the last of them, from
        ``first_position`` on (all of them in a prefill)."""
        return self.first_position + self.hidden_states.shape[1]

    def positions(self) -> torch.Tensor:
        """Original positions of the keys, ``(bsz, num_key_value_heads, seq_len)`` (see ``key_positions``)."""
        if self.key_positions is not None:
            return self.key_positions
        return torch.arange(self.seq_len, device=self.keys.device).expand(*self.keys.shape[:2], self.seq_len)

    @property
    def num_layers(self) -> int:
        return self.adapter.shape.num_layers

    def queries(self, rope: bool = True, last: int | None = None, first: int = 0) -> torch.Tensor:
        """Queries ``(bsz, num_heads, n, head_dim)`` of the tokens at positions ``first …`` (or of the last
        ``last`` tokens) among those whose hidden states the layer has (see ``first_position``).

        Post-RoPE by default, pre-RoPE (QK-norm applied) with ``rope=False``. Reuses the projection captured
        during the forward pass when there is one.
        """
        n_hidden = self.hidden_states.shape[1]
        if last is not None and last > n_hidden:
            raise ValueError(f"asked for the last {last} queries, but the layer has hidden states of {n_hidden} tokens")
        span = slice(-last, None) if last is not None else slice(max(0, first - self.first_position), None)
        hidden = self.hidden_states[:, span]
        projected = None if self.projected_queries is None else self.projected_queries[:, span]
        pe = None
        if rope:
            cos, sin = self.position_embeddings
            pe = (cos[:, span], sin[:, span])
        return self.adapter.query_states(self.module, hidden, pe, projected)

    def replace(self, **changes: Any) -> LayerInputs:
        """A copy with some fields changed (used by wrappers that chain presses)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return LayerInputs(**values)


class KV(NamedTuple):
    """A layer's kept keys and values, ``(bsz, num_key_value_heads, n_kept, head_dim)``."""

    keys: torch.Tensor
    values: torch.Tensor


@dataclass(frozen=True)
class RaggedKV:
    """A layer's kept entries when heads keep different numbers of them (head-wise budgets).

    ``keys``/``values`` are ``(n_total, head_dim)``: the kept entries of every (sequence, KV head) pair packed
    one segment after the other (sequence-major, then head, positions ascending); ``lengths`` is
    ``(bsz, num_key_value_heads)``, the segment sizes. Build it from a keep-mask with :meth:`from_mask`.
    """

    keys: torch.Tensor
    values: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def from_mask(cls, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> RaggedKV:
        """The entries where ``keep`` ``(bsz, kv_heads, seq_len)`` is True, in positional order per head."""
        if keep.shape != keys.shape[:3] or keep.dtype != torch.bool:
            raise ValueError(f"keep must be a bool mask of shape {tuple(keys.shape[:3])}, got {keep.dtype} {tuple(keep.shape)}")
        lengths = keep.sum(-1)
        if bool((lengths == 0).any()):
            raise ValueError("every head must keep at least one entry")
        return cls(keys[keep], values[keep], lengths)

    @property
    def uniform(self) -> bool:
        return bool((self.lengths == self.lengths.reshape(-1)[0]).all())

    def dense(self) -> KV:
        """``(bsz, kv_heads, n, head_dim)`` tensors (only when every head keeps the same count)."""
        bsz, heads = self.lengths.shape
        n = int(self.lengths.reshape(-1)[0])
        return KV(self.keys.view(bsz, heads, n, -1), self.values.view(bsz, heads, n, -1))


@dataclass
class CompressionReport:
    """What one ``with press(model)`` block did. Created per block; the press itself stays stateless."""

    seconds: float = 0.0
    kept: dict[int, float] = field(default_factory=dict)  # layer -> entries kept per head (mean over heads)
    seen: dict[int, int] = field(default_factory=dict)  # layer -> entries before compression
    bytes_before: dict[int, int] = field(default_factory=dict)  # layer -> measured K+V bytes before compression
    decoding_compressions: int = 0  # forward passes after the prefill that compressed the cache again

    @property
    def measured_ratio(self) -> float:
        """Fraction of entries removed over the compressed layers."""
        total = sum(self.seen.values())
        return 1.0 - sum(self.kept.values()) / total if total else 0.0

    def add(self, layer_idx: int, kept: float, seen: int, bytes_before: int) -> None:
        """Record one compressed layer."""
        self.kept[layer_idx] = kept
        self.seen[layer_idx] = seen
        self.bytes_before[layer_idx] = bytes_before


def check_int(value: Any, name: str, minimum: int | None = None) -> None:
    """Validate an integer press field: TypeError when it is not an int (bools refused), ValueError below
    ``minimum``; both name the field and the bad value."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_seed(value: Any, name: str = "seed") -> None:
    """Validate a random seed: an int (bools refused) that ``torch.Generator.manual_seed`` takes, i.e. in
    ``[-2**63, 2**64)``; the messages name the field and the value."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not -(2**63) <= value < 2**64:
        raise ValueError(f"{name} must be an int in [-2**63, 2**64) (torch's seed range), got {value!r}")


def check_number(value: Any, name: str, minimum: float | None = None, positive: bool = False) -> None:
    """Validate a real-valued field: TypeError unless an int or float (bools refused), ValueError when it is not
    finite, below ``minimum``, or not > 0 with ``positive``; every message names the field and the value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _check_ratio(value: Any, name: str = "compression_ratio") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1) (fraction of KV entries removed), got {value!r}")


@dataclass
class Press:
    """Base of every press: the hook life cycle and the compression contract.

    Subclasses implement :meth:`keep_indices` (the kept entries of one layer's :class:`LayerInputs`, the same number
    in every head; :class:`ScorerPress` does it from scores) or, when they do more than select (head-wise budgets,
    moved keys), :meth:`compress`, returning the kept keys and values; only the former can be chained in a
    composition. A press with per-layer budgets overrides :meth:`own_layer_budget`, so a wrapper's budget still
    wins (:meth:`layer_budget`). Use a press as a context manager on a model::

        with press(model) as report:
            model.generate(input_ids, max_new_tokens=32)

    Hooks are registered on every full-attention module on entry and always removed on exit, also when the
    block raises. A layer is compressed once, at the end of the forward pass that fills it from empty (the
    prefill); later tokens are appended uncompressed, except under a press whose ``phases`` include
    ``"decoding"`` (:class:`~kvsqueeze.presses.decoding.DecodingPress`), which compresses again as they come.

    Parameters
    ----------
    compression_ratio : float, default 0.0
        Fraction of KV entries removed, ``0 <= r < 1``.
    budget : int or None, default None
        Absolute number of entries kept per head instead of a ratio (``compression_ratio`` must then be 0).
    """

    compression_ratio: float = 0.0
    budget: int | None = None

    capabilities: ClassVar[Capabilities] = Capabilities()

    def __post_init__(self) -> None:
        _check_ratio(self.compression_ratio)
        if self.budget is not None:
            check_int(self.budget, "budget (entries kept per head)", minimum=1)
            if self.compression_ratio:
                raise ValueError(
                    f"give either compression_ratio ({self.compression_ratio}) or budget ({self.budget}), not both"
                )

    # -- budget ---------------------------------------------------------------------------------------------------
    def n_kept(self, seq_len: int) -> int:
        """Entries kept per head for a layer of ``seq_len`` entries: ``int(seq_len * (1 - r))``, at least one."""
        if self.budget is not None:
            return min(self.budget, seq_len)
        return kept_for_ratio(seq_len, self.compression_ratio)

    def layer_budget(self, layer: LayerInputs) -> int:
        """Entries kept per head at this layer: the budget a wrapping press passed down (``layer.budget``), else
        this press's own (:meth:`own_layer_budget`). Scores that depend on the budget (StreamingLLM's window,
        CriticalKV's stages) read it here, so they follow the wrapper's budget."""
        return layer.budget if layer.budget is not None else self.own_layer_budget(layer)

    def own_layer_budget(self, layer: LayerInputs) -> int:
        """This press's budget at this layer; presses with per-layer budgets override this."""
        return self.n_kept(layer.seq_len)

    # -- the contract ---------------------------------------------------------------------------------------------
    def compress(self, layer: LayerInputs) -> KV | RaggedKV:
        """Return the kept keys and values of one layer (:class:`RaggedKV` when heads keep different counts).

        The default gathers :meth:`keep_indices`; presses that do more than select entries override this."""
        indices = self.keep_indices(layer)
        if indices is None:  # nothing to remove: keep the tensors as they are (bit-identical)
            return KV(layer.keys, layer.values)
        return gather_kv(layer.keys, layer.values, indices)

    def keep_indices(self, layer: LayerInputs) -> torch.Tensor | None:
        """Indices ``(bsz, num_key_value_heads, n_kept)`` (ascending) of the entries kept, or None when all are.

        Presses that only select the same number of entries in every head implement this; compositions chain
        them and keep track of the original positions. Head-wise presses and presses that change keys do not.
        """
        raise NotImplementedError(f"{type(self).__name__} does not select a fixed number of entries per head")

    def validate(self, adapter: A.ModelAdapter) -> None:
        """Raise early if this press cannot run on the model (no layer to compress, attention implementation,
        missing artifacts)."""
        adapter.check_compressible()
        if self.capabilities.needs_attention_weights and adapter.attn_implementation != "eager":
            raise ValueError(
                f"{type(self).__name__} needs attention weights, but the model runs "
                f"attn_implementation={adapter.attn_implementation!r}; load it with attn_implementation='eager' "
                "(kvsqueeze.load_model(..., attn_implementation='eager'))"
            )

    # -- life cycle -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, layer: LayerInputs, cache: Cache, report: CompressionReport | None = None) -> None:
        """Compress ``layer`` and store the result in ``cache`` (used by the hook and by recorded prefills)."""
        start = time.perf_counter()
        bytes_before = kv_nbytes(layer.keys, layer.values)
        # The logical length never changes: even position-changing presses keep the context's end fixed.
        n_kept = store_kept(cache, layer.layer_idx, self.compress(layer), layer.seq_len)
        if report is not None:
            report.seconds += time.perf_counter() - start
            report.add(layer.layer_idx, n_kept, layer.seq_len, bytes_before)

    def _hook(self, adapter: A.ModelAdapter, report: CompressionReport, queries: A.CapturedQueries):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            idx = module.layer_idx
            projected = queries.pop(idx, None)
            cache = adapter.cache_from_call(kwargs)
            if cache is None:  # the prefill guard refuses use_cache=False; anything else must not pass silently
                raise ValueError(
                    f"{type(self).__name__}: attention layer {idx} ran without a KV cache, so there is nothing to "
                    "compress; call the model with use_cache=True"
                )
            hidden = adapter.hidden_states_from_call(args, kwargs)
            # Compress once: in the forward that filled this layer from empty (its prefill).
            if A.is_compressed_layer(cache, idx) or A.layer_logical_length(cache, idx) != hidden.shape[1]:
                return
            keys, values = A.layer_kv(cache, idx)
            attentions = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            layer = LayerInputs(
                adapter=adapter,
                module=module,
                layer_idx=idx,
                hidden_states=hidden,
                keys=keys,
                values=values,
                position_embeddings=kwargs["position_embeddings"],
                attentions=attentions,
                projected_queries=projected,
            )
            self.apply(layer, cache, report)

        return hook

    def _block_hooks(self, adapter: A.ModelAdapter, report: CompressionReport) -> list[Any]:
        """Hooks a press needs in its block besides the per-layer one (none by default); their handles are removed
        with the others when the block closes."""
        return []

    @contextmanager
    def __call__(self, model: nn.Module) -> Iterator[CompressionReport]:
        adapter = A.ModelAdapter(model)
        with active_press(adapter, self):
            self.validate(adapter)
            report = CompressionReport()
            queries = A.CapturedQueries()
            handles = adapter.register_query_capture(queries)
            handles += adapter.register_attention_hooks(self._hook(adapter, report, queries))
            handles += self._block_hooks(adapter, report)
            handles += compaction_hooks(adapter, report)
            try:
                with adapter.compressed_attention(not self.capabilities.uniform_layers, self.capabilities.headwise):
                    yield report
            finally:
                for h in handles:
                    h.remove()


def compaction_hooks(adapter: A.ModelAdapter, report: CompressionReport) -> list[Any]:
    """Decoder hooks that compact the cache after each forward pass in which the press compressed
    (:func:`kvsqueeze.adapter.compact_cache`): transformers' sliding-window layers keep the last window of a prefill
    as a view of the whole prefill's keys and values, and a press may keep its entries as views, so without this a
    plain ``with press(model): model(ids)`` would free nothing on a hybrid model's sliding layers."""
    local = threading.local()  # per thread: forwards of other threads in the same block interleave with this one

    def before_forward(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not hasattr(local, "stack"):
            local.stack = []
        local.stack.append(report.seconds)  # a stack: a press's own passes nest inside the forward (KVzip)

    def after_forward(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        stack = getattr(local, "stack", None)
        if stack and report.seconds != stack.pop():  # this forward compressed
            cache = adapter.cache_from_call(kwargs)
            cache = cache if cache is not None else adapter.cache_from_output(output)
            if cache is not None:
                A.compact_cache(cache)

    return [
        A.forward_pre_hook(adapter.decoder, before_forward),
        A.forward_hook(adapter.decoder, after_forward),
    ]


#: Attribute set on a model while a press block is open on it.
_ACTIVE = "_kvsqueeze_active_press"
_ACTIVE_LOCK = threading.Lock()


def check_no_active_press(adapter: A.ModelAdapter) -> None:
    """Refuse a second press block (or a recorded prefill) on a model that already has one open: the first press
    compresses each layer in its prefill, so a second one would silently find nothing left to do. The mark is on
    the decoder, which a causal LM and its inner model (``model.model``) share: a block opened on either counts."""
    active = adapter.decoder.__dict__.get(_ACTIVE)
    if active is not None:
        raise ValueError(
            f"a press is already active on this model ({type(active).__name__}), in an enclosing block or in another "
            "thread's: one press block at a time per model. Presses do not nest: chain them with "
            "kvsqueeze.make_press('composed', presses=[...]); from several threads, compress one context at a time "
            "(answering needs no block)"
        )


@contextmanager
def active_press(adapter: A.ModelAdapter, press: Press) -> Iterator[None]:
    """Mark ``press`` as the one press open on the adapter's model for the duration of the block (refusing a
    second), and refuse prefills and generate() modes it cannot compress meanwhile
    (:meth:`ModelAdapter.register_prefill_guard`, :meth:`ModelAdapter.register_generate_guard`)."""
    decoder = adapter.decoder
    with _ACTIVE_LOCK:  # check and mark in one step: two threads opening a block on one model cannot both enter
        check_no_active_press(adapter)
        setattr(decoder, _ACTIVE, press)
    handles: list[Any] = []
    try:
        handles += adapter.register_prefill_guard()
        handles += adapter.register_generate_guard(recompresses="decoding" in press.capabilities.phases)
        yield
    finally:  # also when installing a guard failed: nothing stays behind on the model
        for h in handles:
            h.remove()
        with _ACTIVE_LOCK:
            if decoder.__dict__.get(_ACTIVE) is press:
                delattr(decoder, _ACTIVE)


def kv_nbytes(keys: torch.Tensor, values: torch.Tensor) -> int:
    """Measured bytes of one layer's key and value tensors."""
    return keys.numel() * keys.element_size() + values.numel() * values.element_size()


def store_kept(cache: Cache, layer_idx: int, kept: KV | RaggedKV, logical_length: int) -> float:
    """Write one layer's kept entries into ``cache`` — ragged when heads keep different counts, dense otherwise
    (also for a :class:`RaggedKV` whose heads happen to agree: no index needed) — and return the entries kept per
    head (mean over heads)."""
    if isinstance(kept, RaggedKV) and kept.uniform:
        kept = kept.dense()
    if isinstance(kept, RaggedKV):
        A.write_ragged_layer(cache, layer_idx, kept.keys, kept.values, kept.lengths, logical_length)
        return float(kept.lengths.double().mean())
    A.write_layer(cache, layer_idx, kept.keys, kept.values, logical_length)
    return float(kept.keys.shape[-2])


def kept_for_ratio(seq_len: int, ratio: float) -> int:
    """Entries a head keeps out of ``seq_len`` at compression ratio ``ratio``: ``⌊seq_len·(1 − r)⌋``, at least 1.

    The floor is taken with a 1e-9 tolerance: in binary floating point ``1 - 0.9`` is ``0.0999…``, and a bare
    ``int(20 * (1 - 0.9))`` keeps 1 entry where the ratio asks for 2 (about a third of (length, common ratio)
    pairs came out one short that way)."""
    return min(seq_len, max(1, math.floor(seq_len * (1.0 - ratio) + 1e-9)))


def has_own_budget(press: Press) -> bool:
    """Whether ``press`` was given a compression ratio or an absolute budget (wrappers check this on themselves
    and on the press they wrap)."""
    return bool(press.compression_ratio) or press.budget is not None


def keep_top(scores: torch.Tensor, n_kept: int) -> torch.Tensor:
    """Indices of the ``n_kept`` highest scores along the last dim, in ascending (positional) order.

    ``scores`` is ``(bsz, num_key_value_heads, seq_len)``; the result is ``(bsz, num_key_value_heads, n_kept)``.
    Sorting keeps the kept entries in their original order, so repeated or position-based compression stays right.
    """
    idx = scores.topk(n_kept, dim=-1, sorted=False).indices  # by-value order is not needed: half the cost
    return idx.sort(dim=-1).values


def gather_kv(keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> KV:
    """Gather ``(bsz, heads, n_kept)`` indices from keys/values ``(bsz, heads, seq_len, head_dim)``.

    Whole rows are copied with ``index_select`` on the flattened ``(bsz·heads·seq_len, head_dim)`` view: on a CPU
    that is ~10x faster than ``torch.gather`` with an index expanded over ``head_dim``.
    """
    bsz, heads, seq_len = keys.shape[:3]
    n_kept = indices.shape[-1]
    offsets = torch.arange(bsz * heads, device=indices.device).view(bsz, heads, 1) * seq_len
    rows = (indices + offsets).reshape(-1)

    def take(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1]).index_select(0, rows).view(bsz, heads, n_kept, x.shape[-1])

    return KV(take(keys), take(values))


@dataclass
class ScorerPress(Press):
    """A press defined by a score per KV entry; the base keeps the top ``n_kept`` per head, in positional order.

    Subclasses implement :meth:`score`, returning ``(bsz, num_key_value_heads, seq_len)``, higher = keep.
    """

    def score(self, layer: LayerInputs) -> torch.Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} is a ScorerPress without a score: subclasses implement score(layer), returning "
            "(bsz, num_key_value_heads, seq_len) scores, higher = keep"
        )

    def select(self, layer: LayerInputs, n_kept: int | None = None) -> torch.Tensor:
        """Kept indices ``(bsz, num_key_value_heads, n_kept)``, ascending."""
        n_kept = self.layer_budget(layer) if n_kept is None else n_kept
        if n_kept >= layer.seq_len:
            shape = (*layer.keys.shape[:2], layer.seq_len)
            return torch.arange(layer.seq_len, device=layer.keys.device).expand(shape)
        scores = self.score(layer)
        return keep_top(scores, n_kept)

    def keep_indices(self, layer: LayerInputs) -> torch.Tensor | None:
        n_kept = self.layer_budget(layer)
        return None if n_kept >= layer.seq_len else self.select(layer, n_kept)


def check_wrapped_scorer(press: object) -> None:
    """Wrappers that re-select from scores need a :class:`ScorerPress` inside; anything else fails here, and so
    does a press that compresses during decoding (see :func:`check_not_decoding`)."""
    if not isinstance(press, ScorerPress):
        raise TypeError(f"press must be a ScorerPress to wrap, got {type(press).__name__}")
    check_not_decoding(press)


def check_budgetless_inner(press: Press, wrapper: str, budget_from: str) -> None:
    """A wrapper that sets its inner press's budget (per-layer ratios, decoding-time budgets) needs an inner press
    with no ratio/budget of its own and one budget for all layers; otherwise that budget would be silently unused.
    ``budget_from`` names where the wrapper's budget is set, for the messages."""
    if has_own_budget(press):
        raise ValueError(
            f"the wrapped {type(press).__name__} must have no ratio/budget of its own (got "
            f"{press.compression_ratio!r}/{press.budget!r}); set {budget_from} on the {wrapper}"
        )
    if not press.capabilities.uniform_layers:
        raise ValueError(
            f"the wrapped {type(press).__name__} gives each layer its own budget, which {budget_from} of the "
            f"{wrapper} would replace (its allocation would be silently unused); wrap a press with one budget for "
            "all layers"
        )


def check_not_decoding(press: Press, where: str = "press") -> None:
    """A press that compresses during decoding only does so from its own hooks, so inside another press it would
    silently compress the prefill only: refused, naming it."""
    if "decoding" in press.capabilities.phases:
        raise ValueError(
            f"{where} ({type(press).__name__}) compresses during decoding, which it can only do as the outermost "
            "press; wrap the other press inside it instead (make_press('decoding', press=...))"
        )
