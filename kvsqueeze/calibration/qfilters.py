"""Q-Filters from sampled queries: one SVD per (layer, query head), signs fixed, averaged per GQA group.

Paper: "Q-Filters: Leveraging QK Geometry for Efficient KV Cache Compression", https://arxiv.org/abs/2503.02812
(§3.2). The filter of a head is the first right singular vector ``v1`` of its post-RoPE queries, flipped so that
queries project positively on average (``v1+ = sgn(1ᵀu1) v1``, and ``1ᵀu1 ∝ Σ_t <q_t, v1>``). Query heads that
share a KV head share one filter: the normalised mean of their filters.
"""

from __future__ import annotations

import torch


def qfilter_directions(queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sign-fixed first right singular vectors of per-head query samples.

    Parameters
    ----------
    queries : Tensor
        ``(num_heads, n_samples, head_dim)`` post-RoPE query vectors.

    Returns
    -------
    directions : Tensor
        ``(num_heads, head_dim)`` unit vectors ``v1+`` with ``mean_t <q_t, v1+> >= 0``.
    explained : Tensor
        ``(num_heads,)`` share of the queries' energy on that direction, ``σ1² / Σ σ²`` (1 = perfectly one-dimensional).
    """
    if queries.dim() != 3 or queries.shape[1] < 1:
        raise ValueError(f"queries must be (num_heads, n_samples >= 1, head_dim), got shape {tuple(queries.shape)}")
    q = queries.to(torch.float64)
    _, sigma, vh = torch.linalg.svd(q, full_matrices=False)  # vh: (num_heads, k, head_dim)
    v1 = vh[:, 0, :]  # (num_heads, head_dim)
    # The SVD's sign is arbitrary: orient v1 so that the queries' mean projection on it is positive.
    mean_projection = torch.einsum("hnd,hd->h", q, v1) / q.shape[1]
    sign = torch.where(mean_projection < 0, -1.0, 1.0).to(v1.dtype)
    explained = sigma[:, 0] ** 2 / (sigma**2).sum(dim=-1).clamp_min(torch.finfo(torch.float64).tiny)
    return (v1 * sign[:, None]).to(torch.float32), explained.to(torch.float32)


def group_filters(directions: torch.Tensor, num_key_value_heads: int) -> torch.Tensor:
    """Average the unit filters of the query heads of each GQA group and renormalise.

    ``directions`` is ``(num_heads, head_dim)``; query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)``
    (transformers' ``repeat_kv`` layout). Returns ``(num_key_value_heads, head_dim)`` unit vectors.
    """
    num_heads, head_dim = directions.shape
    if num_key_value_heads < 1 or num_heads % num_key_value_heads:
        raise ValueError(f"{num_heads} query heads cannot be grouped over {num_key_value_heads} KV heads")
    mean = directions.view(num_key_value_heads, num_heads // num_key_value_heads, head_dim).mean(dim=1)
    return mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class QFilterCollector:
    """Gathers sampled post-RoPE queries per layer during calibration, then computes the filters.

    Parameters
    ----------
    num_layers : int
    num_key_value_heads : int
    """

    rope = True  # wants post-RoPE queries

    def __init__(self, num_layers: int, num_key_value_heads: int):
        self.num_key_value_heads = num_key_value_heads
        self._samples: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]

    def add(self, layer_idx: int, queries: torch.Tensor) -> None:
        """Append ``(num_heads, m, head_dim)`` sampled queries of one forward at layer ``layer_idx``."""
        self._samples[layer_idx].append(queries.detach().to("cpu", torch.float32))

    def finish(self) -> dict[str, torch.Tensor]:
        """``filters`` ``(num_layers, num_kv_heads, head_dim)``, plus the per-query-head directions and their
        explained-energy share (diagnostics)."""
        filters, directions, explained = [], [], []
        for layer_idx, chunks in enumerate(self._samples):
            if not chunks:
                raise RuntimeError(f"no queries were captured at layer {layer_idx}")
            d, e = qfilter_directions(torch.cat(chunks, dim=1))
            directions.append(d)
            explained.append(e)
            filters.append(group_filters(d, self.num_key_value_heads))
        return {
            "filters": torch.stack(filters),
            "query_head_filters": torch.stack(directions),
            "explained": torch.stack(explained),
        }
