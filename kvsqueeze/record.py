"""Record every layer's inputs during ONE prefill, then apply any number of presses to them.

This is what makes evaluation sweeps cheap: the prefill (the expensive part) runs once per sample, and each
press × ratio only runs its per-layer compression function on the recorded inputs. A press applied this way
produces exactly the cache it would produce from its own hooks, because the hook calls the same
:meth:`Press.apply` on the same inputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from kvsqueeze import adapter as A
from kvsqueeze.presses.base import CompressionReport, LayerInputs, Press, check_no_active_press


@dataclass
class RecordedPrefill:
    """An uncompressed prefill and the inputs of every compressible layer.

    Attributes
    ----------
    cache : Cache
        The uncompressed cache after the prefill (never modified by :meth:`compress`).
    layers : list of LayerInputs
        One entry per compressible (full-attention) layer.
    prefill_seconds : float
        Wall time of the recorded prefill.
    """

    adapter: A.ModelAdapter
    cache: object
    layers: list[LayerInputs]
    n_tokens: int
    prefill_seconds: float

    @torch.inference_mode()
    def compress(self, press: Press | None) -> tuple[object, CompressionReport]:
        """A new cache compressed by ``press`` from the recorded inputs; the recording is left untouched."""
        cache = A.fork_cache(self.cache)
        report = CompressionReport()
        if press is None:
            return cache, report
        if press.capabilities.extra_passes:
            raise ValueError(
                f"{type(press).__name__} needs model passes beyond the prefill; it cannot use a recorded prefill"
            )
        press.validate(self.adapter)
        for layer in self.layers:
            if press.capabilities.needs_attention_weights and layer.attentions is None:
                raise ValueError(
                    f"{type(press).__name__} needs attention weights; record the prefill with an eager model "
                    "and keep_attentions=True"
                )
            press.apply(layer, cache, report)
        return cache, report


@torch.inference_mode()
def record_prefill(model: nn.Module, input_ids: torch.Tensor, keep_attentions: bool = False) -> RecordedPrefill:
    """Run one uncompressed prefill of ``input_ids`` ``(bsz, seq_len)`` and record each layer's inputs.

    ``keep_attentions`` keeps eager attention weights ``(bsz, heads, seq_len, seq_len)`` per layer — quadratic
    memory, only for small inputs and presses that need them.
    """
    if not isinstance(keep_attentions, bool):
        raise TypeError(f"keep_attentions must be a bool, got {keep_attentions!r}")
    adapter = A.ModelAdapter(model)
    check_no_active_press(adapter)  # its hooks would compress the recorded prefill
    if keep_attentions and adapter.attn_implementation != "eager":
        raise ValueError(
            f"keep_attentions=True needs attn_implementation='eager', the model runs {adapter.attn_implementation!r}"
        )
    cache = adapter.new_cache()
    recorded: dict[int, LayerInputs] = {}
    queries = A.CapturedQueries()

    def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if adapter.cache_from_call(kwargs) is not cache:  # another thread's forward on the shared model
            return
        idx = module.layer_idx
        keys, values = A.layer_kv(cache, idx)
        attentions = output[1] if keep_attentions and isinstance(output, tuple) and len(output) > 1 else None
        recorded[idx] = LayerInputs(
            adapter=adapter,
            module=module,
            layer_idx=idx,
            hidden_states=adapter.hidden_states_from_call(args, kwargs),
            keys=keys,
            values=values,
            position_embeddings=kwargs["position_embeddings"],
            attentions=attentions,
            projected_queries=queries.pop(idx, None),
        )

    handles = adapter.register_query_capture(queries) + adapter.register_attention_hooks(hook)
    start = time.perf_counter()
    try:
        model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **adapter.model_call_kwargs(cache))
    finally:
        for h in handles:
            h.remove()
    seconds = time.perf_counter() - start
    return RecordedPrefill(adapter, cache, [recorded[i] for i in sorted(recorded)], input_ids.shape[1], seconds)
