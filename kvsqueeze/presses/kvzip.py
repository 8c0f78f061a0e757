"""KVzip: query-agnostic KV scores from how much each entry helps the model reconstruct its own context."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kvsqueeze import adapter as A
from kvsqueeze.presses.base import (
    KV,
    Capabilities,
    CompressionReport,
    LayerInputs,
    Press,
    RaggedKV,
    active_press,
    check_int,
    compaction_hooks,
    derived_capabilities,
    kv_nbytes,
    store_kept,
)
from kvsqueeze.presses.registry import register_press

REPEAT_PROMPT = "\n\nRepeat the previous context exactly.\n"
CONTINUE_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"


@functools.lru_cache(maxsize=4)
def _tokenizer_from(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@register_press("kvzip")
@dataclass
class KVzipPress(Press):
    """Score every context entry by the attention it receives while the model repeats the context; evict the
    lowest scores globally across layers and heads.

    Paper: "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction",
    https://arxiv.org/abs/2505.23416

    After the context prefill, the model is fed a repeat prompt followed by the context again, on a fork of the
    cache (the context's cache never sees these tokens). At every full-attention layer the queries of those
    reconstruction tokens (post-RoPE) attend causally over the original context keys and the reconstruction keys;
    an original entry's score is the maximum softmax weight it receives over all reconstruction queries and over
    the query heads of its GQA group. Long contexts are reconstructed in chunks of ``chunk_size`` tokens, each on
    its own fork of the context cache; a later chunk's prompt asks to continue "starting with" the last
    ``n_overlap`` tokens of the previous chunk, as in the official code and kvpress. Where they differ: their
    softmax for a chunk's reconstruction queries runs over the sinks, that chunk's own context keys and the
    reconstruction keys only, and those queries score only that chunk; here it runs over every context key the
    queries attend to in the model (the whole context, causally), and every entry takes its maximum over all
    chunks. The two agree for contexts of at most ``chunk_size`` tokens (one chunk) and differ beyond.
    The first ``n_sink`` entries of every head are always kept. Then the ``T = n_kept(seq_len) × H`` highest
    scores over all (compressed layer, KV head, position) are kept, ``H`` the number of (layer, KV head) pairs —
    exactly the total of a uniform press; with ``layerwise=True`` every layer keeps ``n_kept × kv_heads``, spread
    over its heads by score. Heads keep different counts and the cache stores exactly those (ragged layers).

    Life cycle: scoring needs every layer's keys before any layer is compressed, so the press does not compress in
    the attention hooks. ``with press(model):`` lets the prefill run uncompressed; at the end of the model forward
    that filled an empty cache it runs the reconstruction passes and rewrites every full-attention layer. Both
    ``with press(model): model.generate(ids)`` and ``Pipeline.compress(context, press)`` work; a recorded prefill
    cannot be used (``capabilities.extra_passes``). Cost: one forward of prompt + context over a cache twice as long,
    plus the scoring matmuls and softmaxes (the paper's fused kernels bring it to ~2× the prefill; this torch
    version measured 34.5 s of reconstruction after a 7.1 s prefill, 2,039 tokens, SmolLM2-135M, one CPU thread).
    The chunks run at the positions after the context, so a context plus its longest chunk (prompt included) must
    fit in ``max_position_embeddings``; one that does not is refused before any pass, with the ``chunk_size`` that
    would fit.

    Where this differs from the paper: the repeat prompt is plain text (no chat template), all reconstruction
    queries count (the prompt's too), and the cache is physically pruned instead of masked. The prompts are
    tokenized with ``tokenizer`` (default: the tokenizer saved with the model, ``config._name_or_path``).

    Fields: ``compression_ratio`` (0.0), ``budget`` (None), ``n_sink`` (4), ``layerwise`` (False), ``chunk_size``
    (2048, the paper's), ``n_overlap`` (8), ``repeat_prompt``/``continue_prompt`` (the prompts above),
    ``tokenizer`` (None), ``query_block`` (256: reconstruction queries scored at once, bounds memory).
    """

    n_sink: int = 4
    layerwise: bool = False
    chunk_size: int = 2048
    n_overlap: int = 8
    repeat_prompt: str = REPEAT_PROMPT
    continue_prompt: str = CONTINUE_PROMPT
    tokenizer: Any = field(default=None, repr=False, compare=False)
    query_block: int = 256

    @derived_capabilities
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        # Global eviction gives layers different totals; ``layerwise`` keeps every layer at the same total.
        return Capabilities(extra_passes=True, headwise=True, uniform_layers=self.layerwise)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.n_sink, "n_sink", minimum=0)
        check_int(self.chunk_size, "chunk_size", minimum=1)
        check_int(self.n_overlap, "n_overlap", minimum=0)
        check_int(self.query_block, "query_block", minimum=1)
        if not isinstance(self.layerwise, bool):
            raise TypeError(f"layerwise must be a bool, got {self.layerwise!r}")
        for name in ("repeat_prompt", "continue_prompt"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string, got {getattr(self, name)!r}")
        if self.tokenizer is not None and not (callable(self.tokenizer) and hasattr(self.tokenizer, "decode")):
            raise TypeError(f"tokenizer must be a Hugging Face tokenizer or None, got {self.tokenizer!r}")

    # -- prompts --------------------------------------------------------------------------------------------------
    def _tokenizer(self, model: nn.Module):
        if self.tokenizer is not None:
            return self.tokenizer
        import os

        path = getattr(model.config, "_name_or_path", None)
        if path and os.path.isdir(path):
            try:
                return _tokenizer_from(path)
            except (OSError, ValueError):
                pass
        raise ValueError(
            f"KVzipPress needs a tokenizer for its repeat prompt and found none next to the model "
            f"(config._name_or_path={path!r}); pass it: make_press('kvzip', tokenizer=tokenizer, ...)"
        )

    def _encode(self, model: nn.Module, text: str) -> list[int]:
        return list(self._tokenizer(model)(text, add_special_tokens=False).input_ids) if text else []

    def validate(self, adapter: A.ModelAdapter) -> None:
        super().validate(adapter)
        self._tokenizer(adapter.model)  # no tokenizer: fail before the prefill

    def compress(self, layer: LayerInputs):
        raise NotImplementedError(
            "KVzipPress scores need reconstruction passes over all layers; use `with press(model): ...` or "
            "Pipeline.compress(context, press), not a single layer's inputs or a recorded prefill"
        )

    # -- scoring --------------------------------------------------------------------------------------------------
    def chunks(self, model: nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """The reconstruction inputs ``(bsz, prompt + chunk)`` for a context of ``input_ids`` ``(bsz, n)``."""
        n = input_ids.shape[1]
        first, cont = self._encode(model, self.repeat_prompt), self._encode(model, self.continue_prompt)
        out = []
        for start in range(0, n, self.chunk_size):
            prompt = first if start == 0 else cont
            head = torch.tensor(prompt, dtype=input_ids.dtype, device=input_ids.device).expand(input_ids.shape[0], -1)
            overlap = input_ids[:, max(0, start - self.n_overlap) : start] if start else input_ids[:, :0]
            out.append(torch.cat([head, overlap, input_ids[:, start : start + self.chunk_size]], dim=1))
        return out

    @torch.no_grad()
    def scores(self, adapter: A.ModelAdapter, input_ids: torch.Tensor, cache) -> dict[int, torch.Tensor]:
        """Scores ``(bsz, kv_heads, n_ctx)`` of every full-attention layer of the prefilled ``cache``.

        Runs one forward per chunk on a fork of ``cache``; the context cache itself is left unchanged.
        """
        model = adapter.model
        n_ctx = input_ids.shape[1]
        layers = adapter.compressible_layers
        best: dict[int, torch.Tensor] = {}
        queries = A.CapturedQueries()

        scoring: list = [None]  # the fork of the chunk being scored: other callers of the model are not scored

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            idx = module.layer_idx
            fork = adapter.cache_from_call(kwargs)
            if fork is None or fork is not scoring[0]:  # another thread's forward on the shared model
                return
            keys, _ = A.layer_kv(fork, idx)  # (bsz, kv_heads, n_ctx + m, d): the context, then this chunk
            hidden = adapter.hidden_states_from_call(args, kwargs)
            q = adapter.query_states(module, hidden, kwargs["position_embeddings"], queries.pop(idx, None))
            score = self._chunk_scores(adapter, module, q, keys, n_ctx)
            best[idx] = score if idx not in best else torch.maximum(best[idx], score)

        chunks = self.chunks(model, input_ids)
        self._check_positions(adapter, n_ctx, max(c.shape[1] for c in chunks))
        handles = adapter.register_query_capture(queries) + adapter.register_attention_hooks(hook)
        try:
            for ids in chunks:
                fork = scoring[0] = A.fork_cache(cache)
                with adapter.internal_pass():  # a fork of the uncompressed context: not a prefill to refuse
                    model(input_ids=ids, use_cache=True, logits_to_keep=1, **adapter.model_call_kwargs(fork))
        finally:
            for h in handles:
                h.remove()
        return {i: best[i] for i in layers}

    def _check_positions(self, adapter: A.ModelAdapter, n_ctx: int, longest: int) -> None:
        """Refuse reconstruction passes that would run past the model's positions: each chunk sits after the whole
        context, at positions up to ``n_ctx + longest - 1``, where the model was never trained (RoPE would not
        complain; the scores would silently come from untrained positions)."""
        limit = adapter.shape.max_position_embeddings
        if limit is None or n_ctx + longest <= limit:
            return
        model = adapter.model
        overhead = max(len(self._encode(model, self.repeat_prompt)),
                       len(self._encode(model, self.continue_prompt)) + min(self.n_overlap, n_ctx))
        room = limit - n_ctx - overhead  # context tokens per chunk that would still fit after the prompt
        hint = f"use chunk_size <= {room} or a shorter context" if room >= 1 else "use a shorter context"
        raise ValueError(
            f"KVzipPress: a context of {n_ctx} tokens leaves no room for its reconstruction pass: the repeat prompt "
            f"and up to {min(self.chunk_size, n_ctx)} context tokens ({longest} tokens in all) run after the context, "
            f"up to position {n_ctx + longest - 1}, past the model's maximum of {limit} "
            f"(config.max_position_embeddings); {hint}"
        )

    def _chunk_scores(
        self, adapter: A.ModelAdapter, module: nn.Module, q: torch.Tensor, keys: torch.Tensor, n_ctx: int
    ) -> torch.Tensor:
        """Max softmax weight on each context key ``(bsz, kv_heads, n_ctx)`` over the queries ``q``
        ``(bsz, heads, m, d)`` of one chunk and the query heads of each GQA group."""
        bsz, n_heads, m, d = q.shape
        n_kv, kv_len = keys.shape[1], keys.shape[2]
        groups = n_heads // n_kv
        scale = adapter.scaling(module)
        softcap = adapter.attention_softcap(module)
        # One matmul per (sequence, KV head): the group's query heads are stacked along the query axis.
        k_t = keys.float().reshape(bsz * n_kv, kv_len, d).transpose(1, 2)
        q = q.float().reshape(bsz, n_kv, groups, m, d)
        out = torch.zeros(bsz * n_kv, n_ctx, dtype=torch.float32, device=keys.device)
        j = torch.arange(kv_len - n_ctx, device=keys.device)
        for s in range(0, m, self.query_block):
            e = min(m, s + self.query_block)
            rows = q[:, :, :, s:e].reshape(bsz * n_kv, groups * (e - s), d)
            logits = torch.matmul(rows, k_t).mul_(scale)  # (bsz * kv_heads, groups * block, kv_len)
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
            hidden = j[None, :] > torch.arange(s, e, device=keys.device)[:, None]  # causal among the chunk
            logits[..., n_ctx:].masked_fill_(hidden.repeat(groups, 1), float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            out = torch.maximum(out, probs[..., :n_ctx].amax(dim=1))
        return out.view(bsz, n_kv, n_ctx)

    def keep_masks(self, scores: dict[int, torch.Tensor], seq_len: int) -> dict[int, torch.Tensor]:
        """Kept entries ``(bsz, kv_heads, seq_len)`` per layer: the global (or per-layer) top scores, sinks first."""
        layers = sorted(scores)
        s = torch.stack([scores[i] for i in layers], dim=1).clone()  # (bsz, n_layers, kv_heads, n)
        bsz, n_layers, n_kv, n = s.shape
        n_kept = self.n_kept(seq_len)
        protect = min(self.n_sink, n_kept)
        if protect:
            s[..., :protect] = float("inf")
        else:  # no sinks: every head still keeps its best entry
            s.scatter_(-1, s.argmax(-1, keepdim=True), float("inf"))
        if self.layerwise:
            flat = s.reshape(bsz * n_layers, n_kv * n)
            chosen = flat.topk(n_kv * n_kept, dim=-1, sorted=False).indices
        else:
            flat = s.reshape(bsz, n_layers * n_kv * n)
            chosen = flat.topk(n_layers * n_kv * n_kept, dim=-1, sorted=False).indices
        keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, chosen, True).view(bsz, n_layers, n_kv, n)
        return {i: keep[:, pos] for pos, i in enumerate(layers)}

    # -- life cycle -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def compress_cache(
        self, adapter: A.ModelAdapter, input_ids: torch.Tensor, cache, report: CompressionReport | None = None
    ) -> None:
        """Score the prefilled ``cache`` of ``input_ids`` and rewrite its full-attention layers in place."""
        start = time.perf_counter()
        n_ctx = input_ids.shape[1]
        layers = adapter.compressible_layers
        if self.n_kept(n_ctx) >= n_ctx:  # keep everything: no reconstruction needed
            masks = None
        else:
            masks = self.keep_masks(self.scores(adapter, input_ids, cache), n_ctx)
        for i in layers:
            keys, values = A.layer_kv(cache, i)
            if A.layer_logical_length(cache, i) != n_ctx or keys.shape[-2] != n_ctx:
                raise RuntimeError(f"layer {i} holds {keys.shape[-2]} entries, expected the {n_ctx} context tokens")
            bytes_before = kv_nbytes(keys, values)
            keep = None if masks is None else masks[i]
            kept = KV(keys, values) if keep is None or bool(keep.all()) else RaggedKV.from_mask(keys, values, keep)
            n_kept = store_kept(cache, i, kept, n_ctx)
            if report is not None:
                report.add(i, n_kept, n_ctx, bytes_before)
        if report is not None:
            report.seconds += time.perf_counter() - start

    @contextmanager
    def __call__(self, model: nn.Module) -> Iterator[CompressionReport]:
        adapter = A.ModelAdapter(model)
        with active_press(adapter, self):
            yield from self._block(model, adapter)

    def _block(self, model: nn.Module, adapter: A.ModelAdapter) -> Iterator[CompressionReport]:
        self.validate(adapter)
        report = CompressionReport()
        # Per thread: another thread's forward on the shared model (an answer) must not cancel or take this one's.
        local = threading.local()

        def state() -> dict[str, Any]:
            if not hasattr(local, "state"):
                local.state = {"pending": None, "busy": False}
            return local.state

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            state_ = state()
            if state_["busy"]:  # our own reconstruction passes
                return
            state_["pending"] = None
            cache = adapter.cache_from_call(kwargs)
            if cache is not None and cache.get_seq_length() != 0:
                return  # a decoding step
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                raise ValueError("KVzipPress needs the context's input_ids (the model was called with inputs_embeds)")
            state_["pending"] = (ids, cache)  # no cache passed: the model creates one, read from its output

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            state_ = state()
            if state_["busy"] or state_["pending"] is None:
                return
            ids, cache = state_["pending"]
            state_["pending"] = None
            if cache is None:
                cache = adapter.cache_from_output(output)
                if cache is None:
                    raise ValueError("KVzipPress: the model returned no KV cache, so there is nothing to compress; "
                                     "call it with use_cache=True")
            state_["busy"] = True
            try:
                self.compress_cache(adapter, ids, cache, report)
            finally:
                state_["busy"] = False

        decoder = adapter.decoder  # also sees a call on the inner model that bypasses the causal LM's forward
        handles = [
            A.forward_pre_hook(decoder, pre_hook),
            A.forward_hook(decoder, hook),
        ]
        handles += compaction_hooks(adapter, report)  # after the compressing hook: runs after it
        try:
            with adapter.compressed_attention(uneven_layers=True, ragged=True):
                yield report
        finally:
            for h in handles:
                h.remove()
