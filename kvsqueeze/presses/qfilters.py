"""Q-Filters: score keys by their projection on a calibrated direction of each head's queries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvsqueeze.adapter import ModelAdapter
from kvsqueeze.calibration.artifacts import check_artifact_field, load_artifact, load_artifact_once
from kvsqueeze.presses.base import Capabilities, LayerInputs, ScorerPress
from kvsqueeze.presses.registry import register_press

METHOD = "qfilters"


@register_press("qfilters")
@dataclass
class QFiltersPress(ScorerPress):
    """Keep the keys with the largest projection on the head's Q-filter.

    Paper: "Q-Filters: Leveraging QK Geometry for Efficient KV Cache Compression", https://arxiv.org/abs/2503.02812

    Score: ``<k_i, f>`` for post-RoPE keys ``k_i``, with ``f`` the filter of the (layer, KV head): the first right
    singular vector of the head's post-RoPE calibration queries, averaged over the query heads of the GQA group
    and normalised (``kvsqueeze calibrate --method qfilters``).

    Sign: each query head's vector is oriented so that queries project positively on it on average (the paper's
    ``v1+ = sgn(1ᵀu1)·v1``). Queries are anisotropic along that direction and roughly centred on the others, so
    ``E_q[<q, k>] ≈ κ·<k, f>`` with ``κ > 0`` (Theorem 3.3): a larger projection means a larger expected
    attention logit, and the press keeps the largest. kvpress stores the negated vector and negates the score
    again; the ranking is the same.

    Where this differs from the paper: the official cache keeps a recent window uncompressed and the paper's
    needle tests leave layers 0 and 1 uncompressed; like kvpress, this press scores every key of every layer
    (combine it with other presses for those). Filters come from the shipped essays, not the Pile.

    Fields: ``compression_ratio`` (0.0), ``budget`` (None), ``artifact`` (None: the model's default location,
    ``kvsqueeze.calibration.default_artifact_path(model, "qfilters")``).
    """

    artifact: str | None = None

    capabilities: ClassVar[Capabilities] = Capabilities(calibration=METHOD, reads_hidden_states=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_artifact_field(self.artifact)

    def validate(self, adapter: ModelAdapter) -> None:
        super().validate(adapter)
        load_artifact(self.artifact, adapter.model, METHOD)  # missing or foreign artifact: fail before prefill

    def score(self, layer: LayerInputs) -> torch.Tensor:
        artifact = load_artifact_once(layer.adapter, self.artifact, METHOD)  # not re-checked on every layer
        filters = artifact.get("filters", layer.keys.device)[layer.layer_idx]  # (num_kv_heads, head_dim)
        return torch.einsum("bknd,kd->bkn", layer.keys.float(), filters)
