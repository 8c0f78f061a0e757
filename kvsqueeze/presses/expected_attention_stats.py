"""Expected Attention with query statistics calibrated once per model instead of taken from the context."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvsqueeze.adapter import ModelAdapter
from kvsqueeze.calibration.artifacts import check_artifact_field, load_artifact, load_artifact_once
from kvsqueeze.presses.base import Capabilities, LayerInputs, ScorerPress
from kvsqueeze.presses.expected_attention import check_expected_attention_fields, expected_attention_scores
from kvsqueeze.presses.registry import register_press

METHOD = "expected_attention_stats"


@register_press("expected_attention_stats")
@dataclass
class ExpectedAttentionStatsPress(ScorerPress):
    """Expected Attention whose query mean and covariance per (layer, head) come from a calibration artifact.

    Paper: "Expected Attention: KV Cache Compression by Estimating Attention from Future Queries Distribution",
    https://arxiv.org/abs/2510.00636

    Score: as ``expected_attention`` — ``(â_i + epsilon)·‖v_i‖`` with ``â_i = softmax_i(s·μ̄ᵀk_i + s²·k_iᵀΣ̄k_i/2)``
    averaged over each GQA group, ``μ̄ = R̄μ``, ``Σ̄ = R̄ΣR̄ᵀ`` and ``R̄`` the RoPE matrix averaged over the next
    ``n_future_positions`` positions — but ``μ`` and ``Σ`` are the pre-RoPE query moments (QK-norm applied,
    covariance divided by N) measured on calibration text, after the first ``n_sink`` tokens of each sequence
    (``kvsqueeze calibrate --method expected_attention_stats``). The scores then depend on the context only
    through its keys and values, and the press costs no query recomputation. The ``n_sink`` first tokens of the
    context are always kept. The paper's differences listed in ``expected_attention`` apply here too; kvpress
    calibrates on BookSum and divides the covariance by N - 1, this package uses the shipped essays and N.

    Fields: ``compression_ratio`` (0.0), ``budget`` (None), ``artifact`` (None: the model's default location,
    ``kvsqueeze.calibration.default_artifact_path(model, "expected_attention_stats")``), ``n_future_positions``
    (512), ``n_sink`` (4), ``use_covariance`` (True), ``use_vnorm`` (True), ``epsilon`` (0.0).
    """

    artifact: str | None = None
    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    capabilities: ClassVar[Capabilities] = Capabilities(calibration=METHOD, reads_hidden_states=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_artifact_field(self.artifact)
        check_expected_attention_fields(self)

    def validate(self, adapter: ModelAdapter) -> None:
        super().validate(adapter)
        load_artifact(self.artifact, adapter.model, METHOD)  # missing or foreign artifact: fail before prefill

    def score(self, layer: LayerInputs) -> torch.Tensor:
        artifact = load_artifact_once(layer.adapter, self.artifact, METHOD)  # not re-checked on every layer
        device, bsz = layer.keys.device, layer.keys.shape[0]
        mean = artifact.get("mean", device)[layer.layer_idx]  # (num_heads, head_dim)
        mean = mean.expand(bsz, *mean.shape)
        cov = None
        if self.use_covariance:
            cov = artifact.get("covariance", device)[layer.layer_idx]  # (num_heads, head_dim, head_dim)
            cov = cov.expand(bsz, *cov.shape)
        n_sink = min(self.n_sink, layer.seq_len - 1)
        return expected_attention_scores(
            layer, mean, cov, n_sink, self.n_future_positions, self.use_vnorm, self.epsilon
        )
