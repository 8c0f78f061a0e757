"""Expected Attention: score each KV pair by the attention that future queries are expected to give it.

The functions here (query moments → RoPE averaged over future positions → closed-form expected attention) are
shared with :mod:`kvsqueeze.presses.expected_attention_stats`, which takes the moments from a calibration
artifact instead of the context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvsqueeze.adapter import ModelAdapter
from kvsqueeze.presses.base import LayerInputs, ScorerPress, check_int
from kvsqueeze.presses.registry import register_press


def query_moments(queries: torch.Tensor, use_covariance: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean ``(bsz, heads, head_dim)`` and covariance ``(bsz, heads, head_dim, head_dim)`` (divided by N) of
    ``queries`` ``(bsz, heads, n, head_dim)``, in float32; the covariance is None unless ``use_covariance``.

    The queries are centred before the product. The one-pass form ``E[qqᵀ] − μμᵀ`` is ~0.2 ms per layer
    cheaper at 1k tokens, but real queries have ``‖μ‖² / tr Σ`` up to 30 (SmolLM2), and in float32 that form
    then loses about four digits to cancellation (see ``tests/test_expected_attention.py``).
    """
    q = queries.float()
    mean = q.mean(dim=2)
    if not use_covariance:
        return mean, None
    centred = q - mean.unsqueeze(2)
    return mean, centred.transpose(-1, -2) @ centred / q.shape[2]


def average_rope(
    adapter: ModelAdapter, layer_idx: int, start: int, n_positions: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``cos`` and ``sin`` ``(rotary_dim,)`` of layer ``layer_idx`` over positions ``[start, start + n)``.

    transformers applies RoPE as ``x·cos + rotate_half(x)·sin``, i.e. the matrix ``diag(cos) + diag(sin)·P`` with
    ``P = [[0, -I], [I, 0]]`` on the first ``rotary_dim`` channels (identity on the rest, for partial rotary).
    The average rotation ``R̄`` over positions is therefore ``diag(mean cos) + diag(mean sin)·P``: not a rotation
    any more (it shrinks the fast-turning channels towards zero). ``cos``/``sin`` come from the model's own rotary
    module, so RoPE scaling (Llama-3, YaRN attention factor) and per-layer-type frequencies (Gemma-3) are included.
    """
    positions = torch.arange(start, start + n_positions, device=device).unsqueeze(0)
    like = torch.zeros(1, dtype=torch.float32, device=device)
    cos, sin = adapter.rope(layer_idx, positions, like)  # (1, n_positions, rotary_dim)
    return cos[0].float().mean(dim=0), sin[0].float().mean(dim=0)


def average_rope_matrix(mean_cos: torch.Tensor, mean_sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``R̄ᵀ`` ``(head_dim, head_dim)``: row vectors ``x`` are rotated by the average RoPE as ``x @ R̄ᵀ``.

    Row ``j`` is ``R̄e_j`` (the average rotation applied to the unit vector ``e_j``); channels past ``rotary_dim``
    (partial rotary) pass through unchanged.
    """
    rot, half = mean_cos.shape[0], mean_cos.shape[0] // 2
    eye = torch.eye(head_dim, dtype=torch.float32, device=mean_cos.device)
    e_rot = eye[:, :rot]
    turned = torch.cat([-e_rot[:, half:], e_rot[:, :half]], dim=-1)  # rotate_half of each unit vector
    out = eye.clone()
    out[:, :rot] = e_rot * mean_cos + turned * mean_sin
    return out


def rotate_moments(
    r_t: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``R̄μ`` and ``R̄ΣR̄ᵀ`` for moments of shapes ``(..., head_dim)`` and ``(..., head_dim, head_dim)``, given
    ``r_t = R̄ᵀ`` (:func:`average_rope_matrix`)."""
    mean = mean @ r_t
    if cov is not None:
        cov = r_t.transpose(0, 1) @ cov @ r_t
    return mean, cov


def expected_attention(
    keys: torch.Tensor,
    mean: torch.Tensor,
    cov: torch.Tensor | None,
    scaling: float,
    n_sink: int = 0,
    sink_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expected attention of a Gaussian query on each key, averaged over the query heads of each GQA group.

    For ``q ~ N(μ, Σ)`` the expected unnormalised weight is ``E[exp(s·qᵀk)] = exp(s·μᵀk + s²·kᵀΣk / 2)`` (the
    Gaussian moment-generating function) with ``s`` the attention scaling; a softmax over keys normalises it.

    Parameters
    ----------
    keys : Tensor
        ``(bsz, num_key_value_heads, n, head_dim)`` post-RoPE keys.
    mean : Tensor
        ``(bsz, num_heads, head_dim)`` query mean (already RoPE-averaged).
    cov : Tensor or None
        ``(bsz, num_heads, head_dim, head_dim)`` query covariance, or None for the mean-query term only.
    scaling : float
        The attention module's logit scaling (``1/√head_dim``, or Gemma's ``query_pre_attn_scalar**-0.5``).
    n_sink : int
        The first ``n_sink`` keys take no part in the softmax (their result is 0).
    sink_mask : Tensor or None
        ``(bsz, num_key_value_heads, n)`` bool, True for the keys that take no part in the softmax, for keys that
        are not the context in order (a composition, decoding); used instead of ``n_sink``. Every head needs at
        least one key outside it.

    Returns
    -------
    Tensor
        ``(bsz, num_key_value_heads, n)`` float32, each query head's distribution over the keys that are not
        sinks, summing to one before the group mean.
    """
    bsz, num_kv, n, head_dim = keys.shape
    group = mean.shape[1] // num_kv
    k = keys.float().reshape(bsz * num_kv, n, head_dim)
    # Query head h reads KV head h // group; the heads of a group sit side by side: (.., 1, group·d).
    mu = mean.reshape(bsz * num_kv, 1, group * head_dim)
    if cov is None:
        logits = (k @ mu.view(-1, group, head_dim).transpose(1, 2)).transpose(1, 2) * scaling  # (.., group, n)
    else:
        # kᵀ(s²/2·Σ)k + s·μᵀk = Σ_d k_d·((s²/2·Σk)_d + s·μ_d): one matmul with the linear term fused in, then
        # one dot product per (key, query head), written as a batched matmul.
        sigma = cov.reshape(bsz, num_kv, group, head_dim, head_dim).permute(0, 1, 3, 2, 4)
        sigma = sigma.reshape(bsz * num_kv, head_dim, group * head_dim)
        k_sigma = torch.baddbmm(mu, k, sigma, beta=scaling, alpha=scaling**2 / 2)  # (.., n, group·d)
        logits = torch.bmm(k_sigma.view(-1, group, head_dim), k.reshape(-1, head_dim, 1))
        logits = logits.view(-1, n, group).transpose(1, 2)  # (.., group, n)
    if sink_mask is not None:
        logits = logits.masked_fill(sink_mask.reshape(bsz * num_kv, 1, n).to(logits.device), float("-inf"))
    elif n_sink:
        logits[..., :n_sink] = float("-inf")
    return logits.softmax(dim=-1).mean(dim=1).view(bsz, num_kv, n)


def expected_attention_scores(
    layer: LayerInputs,
    mean: torch.Tensor,
    cov: torch.Tensor | None,
    n_sink: int,
    n_future_positions: int,
    use_vnorm: bool,
    epsilon: float,
) -> torch.Tensor:
    """Expected Attention scores ``(bsz, num_key_value_heads, seq_len)`` of one layer from pre-RoPE query moments.

    The moments are rotated by the RoPE average over the ``n_future_positions`` positions after the context
    (``[context_length, context_length + n_future_positions)``, also when an earlier press of a composition has
    already removed keys), the expected attention is computed over the keys that are not sinks, multiplied by
    ``(a + epsilon)·‖v‖`` when ``use_vnorm``, and the sinks get the maximum score + 1 so they are always kept.
    The sinks are the keys at positions ``< n_sink`` (:meth:`LayerInputs.positions`): after an earlier press of
    a composition, or in decoding, they are not the first ``n_sink`` stored entries of every head.
    """
    adapter, n_context, device = layer.adapter, layer.context_length, layer.keys.device
    head_dim = mean.shape[-1]

    def rope_matrix() -> torch.Tensor:
        mean_cos, mean_sin = average_rope(adapter, layer.layer_idx, n_context, n_future_positions, device)
        return average_rope_matrix(mean_cos, mean_sin, head_dim)

    # The same for every layer of one type in a prefill: computed once, not once per layer.
    key = ("expected_attention.rope", adapter.layer_types[layer.layer_idx], n_context, n_future_positions, str(device))
    mean, cov = rotate_moments(adapter.memoized(key, rope_matrix), mean, cov)
    scaling = layer.adapter.scaling(layer.module)
    # Keys in context order (a prefill): the sinks are the first n_sink entries, sliced without a mask.
    sinks = None if layer.key_positions is None or not n_sink else layer.key_positions.to(device) < n_sink
    scores = expected_attention(layer.keys, mean, cov, scaling, n_sink, sink_mask=sinks)
    if use_vnorm:
        value_norms = torch.linalg.vector_norm(layer.values.float(), dim=-1)
        scores = (scores + epsilon) * value_norms if epsilon else scores * value_norms
    if sinks is not None:
        top = scores.masked_fill(sinks, float("-inf")).amax(dim=-1, keepdim=True)
        scores = torch.where(sinks, top + 1, scores)
    elif n_sink:
        scores[..., :n_sink] = scores[..., n_sink:].amax(dim=-1, keepdim=True) + 1  # on device: no host sync
    return scores


def check_expected_attention_fields(press: ScorerPress) -> None:
    """Validation shared by the Expected Attention presses."""
    check_int(press.n_future_positions, "n_future_positions", minimum=1)
    check_int(press.n_sink, "n_sink", minimum=0)
    for name in ("use_covariance", "use_vnorm"):
        if not isinstance(getattr(press, name), bool):
            raise TypeError(f"{name} must be a bool, got {getattr(press, name)!r}")
    eps = press.epsilon
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"epsilon must be a number >= 0, got {eps!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"epsilon must be a finite number >= 0, got {eps!r}")


@register_press("expected_attention")
@dataclass
class ExpectedAttentionPress(ScorerPress):
    """Keep the KV pairs that future queries, modelled as a Gaussian, are expected to attend to most.

    Paper: "Expected Attention: KV Cache Compression by Estimating Attention from Future Queries Distribution",
    https://arxiv.org/abs/2510.00636

    Score: ``(â_i + epsilon)·‖v_i‖``, where ``â_i = softmax_i(s·μ̄ᵀk_i + s²·k_iᵀΣ̄k_i/2)`` averaged over the query
    heads of each GQA group. ``μ`` and ``Σ`` (divided by N) are the moments of the pre-RoPE queries (QK-norm
    applied) of the context tokens after the first ``n_sink``; ``μ̄ = R̄μ`` and ``Σ̄ = R̄ΣR̄ᵀ`` with ``R̄`` the RoPE
    matrix averaged over the next ``n_future_positions`` positions; ``s`` is the module's scaling (``1/√d`` in the
    paper; Gemma uses ``query_pre_attn_scalar``). The tokens at the ``n_sink`` first positions (attention sinks) are
    always kept; in a composition they are found by position, whatever an earlier press removed.

    Where this differs from the paper: the paper uses ``‖W_o v_i‖`` in its formula but ``‖v_i‖`` in its
    experiments (as here); it uses epsilon = 0.02 in all experiments except needle-in-a-haystack (epsilon = 0,
    the default here, as in kvpress); and it ranks scores across the heads of a layer (AdaKV head-adaptive
    budgets) — wrap this press in a head-adaptive press for that. The paper derives the query Gaussian from
    Gaussian hidden states through the linear ``W_Q``; with QK-norm (Qwen3, Gemma3) the queries are not linear in
    the hidden states, and the moments are taken from the normalised queries directly. Softcapped logits are not
    modelled. A context of at most ``n_sink`` tokens treats its first ``seq_len - 1`` tokens as sinks.

    Fields: ``compression_ratio`` (0.0), ``budget`` (None), ``n_future_positions`` (512), ``n_sink`` (4),
    ``use_covariance`` (True), ``use_vnorm`` (True), ``epsilon`` (0.0).
    """

    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_expected_attention_fields(self)

    def score(self, layer: LayerInputs) -> torch.Tensor:
        n_sink = min(self.n_sink, layer.seq_len - 1)
        queries = layer.queries(rope=False, first=n_sink)  # pre-RoPE, QK-norm applied
        mean, cov = query_moments(queries, self.use_covariance)
        return expected_attention_scores(
            layer, mean, cov, n_sink, self.n_future_positions, self.use_vnorm, self.epsilon
        )
