"""Per-(layer, head) mean and covariance of pre-RoPE queries, for Expected Attention with fixed statistics.

Accumulated as float64 running sums over every token after the first ``n_sink`` of each sequence, so the
calibration never holds all queries at once. The covariance is divided by N (not N - 1), like the statistics
the online Expected Attention press computes from the context.
"""

from __future__ import annotations

import torch


class QueryMomentCollector:
    """Running first and second moments of pre-RoPE queries, per layer and query head.

    Parameters
    ----------
    num_layers, num_heads, head_dim : int
    """

    rope = False  # wants pre-RoPE queries

    def __init__(self, num_layers: int, num_heads: int, head_dim: int):
        self._sum = torch.zeros(num_layers, num_heads, head_dim, dtype=torch.float64)
        self._outer = torch.zeros(num_layers, num_heads, head_dim, head_dim, dtype=torch.float64)
        self._count = torch.zeros(num_layers, dtype=torch.float64)

    def add(self, layer_idx: int, queries: torch.Tensor) -> None:
        """Accumulate ``(num_heads, m, head_dim)`` pre-RoPE queries of layer ``layer_idx``."""
        q = queries.detach().to("cpu", torch.float64)
        self._sum[layer_idx] += q.sum(dim=1)
        self._outer[layer_idx] += q.transpose(1, 2) @ q  # (num_heads, head_dim, head_dim)
        self._count[layer_idx] += q.shape[1]

    def finish(self) -> dict[str, torch.Tensor]:
        """``mean`` ``(num_layers, num_heads, head_dim)`` and ``covariance`` ``(..., head_dim, head_dim)``."""
        if bool((self._count == 0).any()):
            missing = (self._count == 0).nonzero().flatten().tolist()
            raise RuntimeError(f"no queries were captured at layers {missing} (sequences shorter than n_sink?)")
        n = self._count[:, None, None]
        mean = self._sum / n
        cov = self._outer / n[..., None] - mean[..., :, None] * mean[..., None, :]
        cov = (cov + cov.transpose(-1, -2)) / 2  # exact symmetry despite rounding
        return {"mean": mean.to(torch.float32), "covariance": cov.to(torch.float32)}
