"""DuoAttention: retrieval heads keep the whole context, streaming heads only attention sinks and recent tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from kvsqueeze.adapter import ModelAdapter
from kvsqueeze.calibration.artifacts import calibrate_command, check_artifact_field, load_artifact
from kvsqueeze.presses.base import KV, Capabilities, LayerInputs, Press, RaggedKV, check_int
from kvsqueeze.presses.registry import register_press

METHOD = "duo_attention"


class HeadPlan(NamedTuple):
    """What every (layer, KV head) keeps: ``streaming`` ``(num_layers, num_kv_heads)`` bool, and for streaming
    heads ``sinks``/``recent`` ``(num_layers, num_kv_heads)`` int64 (the first ``sinks`` and last ``recent``
    positions; 0 for retrieval heads, which keep everything). Layers that are not compressed are all-retrieval."""

    streaming: torch.Tensor
    sinks: torch.Tensor
    recent: torch.Tensor

    def kept(self, seq_len: int) -> torch.Tensor:
        """Entries kept per (layer, KV head) for a context of ``seq_len`` tokens."""
        window = (self.sinks + self.recent).clamp(max=seq_len)
        return torch.where(self.streaming, window, torch.full_like(window, seq_len))


@register_press("duo_attention")
@dataclass
class DuoAttentionPress(Press):
    """Split KV heads into retrieval heads (full cache) and streaming heads (sinks + recent window).

    Paper: "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads",
    https://arxiv.org/abs/2410.10819

    Each (layer, KV head) has a gate α ∈ [0, 1] learned by ``kvsqueeze calibrate --method duo_attention`` (see
    :mod:`kvsqueeze.calibration.duo_attention`): a high gate means the head's output needs the full context. The
    heads with the lowest gates become streaming heads: they keep the first ``n_sink`` and the last ``n_recent``
    entries. Retrieval heads keep everything. The cache stores exactly what each head keeps (a ragged layer where
    heads differ, see :class:`kvsqueeze.adapter.RaggedLayer`).

    Budget (``compression_ratio`` r, or ``budget`` entries per head): the press keeps ``T = n_kept(seq_len) × H``
    entries in total over the ``H`` (compressed layer, KV head) pairs, exactly as many as a uniform press would.
    The number of streaming heads ``k`` is the smallest that fits ``T``, taken in order of increasing gate (ties:
    lower layer, then lower head first); the entries that ``T`` still leaves free go to the streaming heads'
    recent windows (evenly, the remainder to the streaming heads with the highest gates), so the total is exactly
    ``T``. When even all heads streaming with the default window exceed ``T`` (short contexts, high ratios),
    every head streams and the window shrinks to ``T / H`` (sinks first, then recent tokens). The plan is a pure
    function of ``seq_len`` and the artifact, computed in :meth:`compress`.

    Where this differs from the paper: the paper splits heads by a gate threshold (0.5) or a target fraction of
    streaming heads, and its compression ratio is whatever that split gives; kvpress's ``head_compression_ratio``
    likewise fixes the fraction of streaming heads, not the budget (kvpress issue #228). Here the budget is the
    standard ``compression_ratio`` so the press is comparable with the others, and leftover budget widens the
    streaming windows. The gates come from the scaled-down local calibration (1K-token essay haystacks with
    passkeys, 50 steps), not the paper's BookSum training (1K–32K tokens, 2,000 steps).

    The gates rank heads by how much their output suffers from one particular streaming window, so they belong to
    the window they were trained with: the artifact records it (settings ``n_sink``/``n_recent``), and a press with
    another window raises a ValueError naming both and the calibration to run, unless
    ``allow_window_mismatch=True``. The budget then still widens or shrinks the streaming windows as above.

    Fields: ``compression_ratio`` (0.0), ``budget`` (None), ``artifact`` (None: the model's default location,
    ``kvsqueeze.calibration.default_artifact_path(model, "duo_attention")``), ``n_sink`` (16) and ``n_recent``
    (64): the streaming window, the values the default calibration trains with — scaled down for the small
    models and 1K–4K contexts from the paper's 128 + 256; to change them, calibrate with the same values
    (``calibrate(model, tokenizer, "duo_attention", duo_sink=..., n_recent=...)``). ``allow_window_mismatch``
    (False): use gates trained with another window anyway (their ranking is then only a guess).

    How the window counts: in calibration (as in the paper's training) a streaming head's query at position t sees
    the sinks and the keys ``t - n_recent + 1 … t``, itself included. The press keeps the last ``n_recent``
    *context* entries, and the question and answer tokens appended after the context are never evicted, so the
    first question token sees ``n_recent + 1`` recent tokens (itself included) and later ones see more: the
    streaming heads are compressed once, after the prefill, not slid during decoding.
    """

    artifact: str | None = None
    n_sink: int = 16
    n_recent: int = 64
    allow_window_mismatch: bool = False

    capabilities: ClassVar[Capabilities] = Capabilities(calibration=METHOD, headwise=True, uniform_layers=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_artifact_field(self.artifact)
        check_int(self.n_sink, "n_sink", minimum=0)
        # Calibration needs a recent window of at least one token (the query itself), so gates for a window
        # without recent tokens cannot exist.
        check_int(self.n_recent, "n_recent", minimum=1)
        if not isinstance(self.allow_window_mismatch, bool):
            raise TypeError(f"allow_window_mismatch must be a bool, got {self.allow_window_mismatch!r}")

    def validate(self, adapter: ModelAdapter) -> None:
        super().validate(adapter)
        self.gates(adapter)  # missing or foreign artifact: fail before the prefill

    def gates(self, adapter: ModelAdapter) -> torch.Tensor:
        """The calibrated gates ``(num_layers, num_kv_heads)`` (float32, CPU)."""
        artifact = load_artifact(self.artifact, adapter.model, METHOD)
        gates = artifact.get("gates")  # its shape checked by load_artifact
        trained = (artifact.settings.get("n_sink"), artifact.settings.get("n_recent"))
        if trained != (self.n_sink, self.n_recent) and not self.allow_window_mismatch:
            command = (f'kvsqueeze.calibration.calibrate(model, tokenizer, "duo_attention", duo_sink={self.n_sink}, '
                       f"n_recent={self.n_recent}" + (f", output={str(artifact.path)!r})" if self.artifact else ")"))
            cli = calibrate_command(adapter.model, METHOD, artifact.path if self.artifact else None)
            command = f"`{cli} --duo-sink {self.n_sink} --n-recent {self.n_recent}` (Python: {command})"
            raise ValueError(
                f"{artifact.path} holds DuoAttention gates trained with the streaming window n_sink={trained[0]}, "
                f"n_recent={trained[1]}, but this press streams n_sink={self.n_sink}, n_recent={self.n_recent}: "
                f"gates rank heads for their own window only. Use n_sink={trained[0]}, n_recent={trained[1]}, "
                f"recalibrate for this window with {command}, or pass allow_window_mismatch=True"
            )
        return gates

    def head_plan(self, adapter: ModelAdapter, seq_len: int) -> HeadPlan:
        """Which heads stream, and their windows, for a context of ``seq_len`` tokens (see the class docstring)."""
        gates = self.gates(adapter)
        n_layers, n_kv = gates.shape
        layers = adapter.compressible_layers
        streaming = torch.zeros(n_layers, n_kv, dtype=torch.bool)
        sinks = torch.zeros(n_layers, n_kv, dtype=torch.int64)
        recent = torch.zeros(n_layers, n_kv, dtype=torch.int64)
        n_heads = len(layers) * n_kv
        total = self.n_kept(seq_len) * n_heads
        if total >= n_heads * seq_len:
            return HeadPlan(streaming, sinks, recent)
        # (layer, head) pairs by increasing gate; the stable sort breaks ties by layer then head
        order = torch.sort(gates[layers].reshape(-1), stable=True).indices
        window = min(seq_len, self.n_sink + self.n_recent)
        if window < seq_len and n_heads * window <= total:
            k = math.ceil((n_heads * seq_len - total) / (seq_len - window))
            spare = total - (n_heads - k) * seq_len - k * window
            widths = torch.full((k,), window + spare // k, dtype=torch.int64)
            if spare % k:
                widths[k - spare % k :] += 1  # the remainder to the streaming heads with the highest gates
        else:  # even every head streaming with the full window is too much: shrink the window
            k = n_heads
            widths = torch.full((k,), total // k, dtype=torch.int64)
            if total % k:
                widths[k - total % k :] += 1
        chosen = order[:k]
        rows = torch.tensor(layers, dtype=torch.int64)[chosen // n_kv]
        cols = chosen % n_kv
        streaming[rows, cols] = True
        n_s = widths.clamp(max=self.n_sink)
        sinks[rows, cols] = n_s
        recent[rows, cols] = widths - n_s
        return HeadPlan(streaming, sinks, recent)

    def keep_mask(self, layer: LayerInputs, plan: HeadPlan | None = None) -> torch.Tensor:
        """Kept entries ``(bsz, kv_heads, seq_len)`` of one layer (the same for every sequence of the batch)."""
        plan = self.head_plan(layer.adapter, layer.seq_len) if plan is None else plan
        device = layer.keys.device
        pos = torch.arange(layer.seq_len, device=device)
        sinks = plan.sinks[layer.layer_idx].to(device)[:, None]
        recent = plan.recent[layer.layer_idx].to(device)[:, None]
        window = (pos[None] < sinks) | (pos[None] >= layer.seq_len - recent)
        keep = torch.where(plan.streaming[layer.layer_idx].to(device)[:, None], window, True)
        return keep.unsqueeze(0).expand(layer.keys.shape[:3])

    def compress(self, layer: LayerInputs) -> KV | RaggedKV:
        plan = self.head_plan(layer.adapter, layer.seq_len)
        if not bool(plan.streaming[layer.layer_idx].any()):  # every head keeps everything: bit-identical
            return KV(layer.keys, layer.values)
        return RaggedKV.from_mask(layer.keys, layer.values, self.keep_mask(layer, plan))
