"""Expected Attention's closed form against slow, direct float64 computations.

The press computes its scores with fused matmuls (the linear term folded into the
quadratic one, the average RoPE matrix built once per prefill); these tests rebuild each step the way the paper
writes it — explicit rotation matrices per future position, a centred covariance, one softmax per query head —
and check the press against it on the six tiny architectures (GQA, Gemma-3 scaling, QK-norm, biases, partial
rotary).
"""

from __future__ import annotations

import pytest
import torch

from conftest import MODEL_NAMES, token_ids
from kvsqueeze import make_press
from kvsqueeze.adapter import ModelAdapter
from kvsqueeze.presses.expected_attention import expected_attention, query_moments
from kvsqueeze.record import record_prefill

SEQ_LEN = 40


def _rotate_half_matrix(rot: int) -> torch.Tensor:
    """``P`` with ``P @ x == rotate_half(x)`` for column vectors ``x`` of ``rot`` channels."""
    eye = torch.eye(rot, dtype=torch.float64)
    half = rot // 2
    rows = torch.cat([-eye[:, half:], eye[:, :half]], dim=-1)  # row j = rotate_half(e_j) = P e_j
    return rows.T


def reference_scores(layer, n_sink: int, n_future: int, use_covariance: bool = True, use_vnorm: bool = True,
                     epsilon: float = 0.0) -> torch.Tensor:
    """Expected Attention scores of one recorded layer, step by step in float64."""
    adapter = layer.adapter
    seq_len = layer.seq_len
    q = layer.queries(rope=False).double()[:, :, n_sink:]  # (bsz, heads, N, d), pre-RoPE, QK-norm applied
    bsz, heads, _, d = q.shape
    mu = q.mean(dim=2)
    centred = q - mu.unsqueeze(2)
    cov = centred.transpose(-1, -2) @ centred / q.shape[2]

    # R̄ = mean over future positions of the per-position RoPE matrices diag(cos) + diag(sin)·P.
    positions = torch.arange(seq_len, seq_len + n_future).unsqueeze(0)
    cos, sin = adapter.rope(layer.layer_idx, positions, torch.zeros(1))
    cos, sin = cos[0].double(), sin[0].double()
    rot = cos.shape[-1]
    p_mat = _rotate_half_matrix(rot)
    mats = torch.eye(d, dtype=torch.float64).repeat(n_future, 1, 1)
    mats[:, :rot, :rot] = torch.diag_embed(cos) + torch.diag_embed(sin) @ p_mat
    r_bar = mats.mean(dim=0)
    mu_bar = mu @ r_bar.T
    cov_bar = r_bar @ cov @ r_bar.T

    scaling = adapter.scaling(layer.module)
    keys = layer.keys.double()[:, :, n_sink:]
    num_kv = keys.shape[1]
    group = heads // num_kv
    out = torch.zeros(bsz, num_kv, keys.shape[2], dtype=torch.float64)
    for b in range(bsz):
        for h in range(heads):
            k = keys[b, h // group]  # (n, d)
            logits = scaling * k @ mu_bar[b, h]
            if use_covariance:
                logits = logits + scaling**2 / 2 * ((k @ cov_bar[b, h]) * k).sum(-1)
            out[b, h // group] += logits.softmax(dim=-1) / group
    if use_vnorm:
        out = (out + epsilon) * layer.values.double()[:, :, n_sink:].norm(dim=-1)
    if n_sink:
        top = out.amax(dim=-1, keepdim=True) + 1
        out = torch.cat([top.expand(bsz, num_kv, n_sink), out], dim=-1)
    return out


def _record(model, seq_len: int = SEQ_LEN, batch: int = 1):
    return record_prefill(model, token_ids(seq_len, seed=7, batch=batch))


def test_rotate_half_matrix_is_what_rope_applies(tiny_model):
    """The reference's per-position matrix really is transformers' RoPE (else the next test proves nothing)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    adapter = ModelAdapter(tiny_model("llama"))
    cos, sin = adapter.rope(0, torch.tensor([[5]]), torch.zeros(1))
    d = cos.shape[-1]
    x = torch.randn(1, 1, 1, d, generator=torch.Generator().manual_seed(0))
    mat = torch.diag(cos[0, 0]) + torch.diag(sin[0, 0]) @ _rotate_half_matrix(d).float()
    rotated, _ = apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(rotated[0, 0, 0], mat @ x[0, 0, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize(
    "fields",
    [{}, {"use_covariance": False}, {"use_vnorm": False, "n_sink": 0}, {"epsilon": 0.02, "n_future_positions": 64}],
    ids=["defaults", "no-covariance", "no-vnorm-no-sink", "epsilon"],
)
def test_scores_match_float64_reference(model_name, fields, tiny_model, single_thread):
    press = make_press("expected_attention", compression_ratio=0.5, **fields)
    recorded = _record(tiny_model(model_name), batch=2)
    for layer in recorded.layers:
        got = press.score(layer)
        want = reference_scores(layer, press.n_sink, press.n_future_positions, press.use_covariance,
                                press.use_vnorm, press.epsilon)
        assert got.shape == want.shape == (*layer.keys.shape[:2], layer.seq_len)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


def test_gaussian_moment_formula_matches_monte_carlo():
    """``softmax(s·μᵀk + s²·kᵀΣk/2)`` is the normalised ``E[exp(s·qᵀk)]`` for ``q ~ N(μ, Σ)``."""
    gen = torch.Generator().manual_seed(3)
    d, n, scaling = 8, 6, 0.4
    mean = torch.randn(d, generator=gen, dtype=torch.float64) * 0.5
    a = torch.randn(d, d, generator=gen, dtype=torch.float64) * 0.3
    cov = a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)
    keys = torch.randn(n, d, generator=gen, dtype=torch.float64)
    samples = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).sample((400_000,))
    empirical = torch.exp(scaling * samples @ keys.T).mean(dim=0)
    empirical = empirical / empirical.sum()
    closed = expected_attention(
        keys.float()[None, None], mean.float()[None, None], cov.float()[None, None], scaling
    )[0, 0]
    torch.testing.assert_close(closed.double(), empirical, rtol=0.02, atol=0.0)
    # The covariance term matters here: without it the answer is measurably different.
    mean_only = expected_attention(keys.float()[None, None], mean.float()[None, None], None, scaling)[0, 0]
    assert (mean_only.double() - empirical).abs().max() > 5 * (closed.double() - empirical).abs().max()


def test_query_moments_match_centred_float64_with_a_large_mean():
    """The covariance stays accurate in float32 when the mean dominates the spread (‖μ‖²/tr Σ ≈ 64, as in real
    queries: up to 30 on SmolLM2), where the one-pass ``E[qqᵀ] − μμᵀ`` loses ~4 digits to cancellation."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 3, 1000, 64, generator=gen) + 8.0 * torch.randn(2, 3, 1, 64, generator=gen)
    mean, cov = query_moments(q)
    q64 = q.double()
    centred = q64 - q64.mean(dim=2, keepdim=True)
    want = centred.transpose(-1, -2) @ centred / q.shape[2]
    torch.testing.assert_close(mean.double(), q64.mean(dim=2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cov.double(), want, rtol=0, atol=1e-4 * float(want.abs().max()))
    assert query_moments(q, use_covariance=False)[1] is None


def test_sink_keys_do_not_change_the_other_scores(tiny_model, single_thread):
    press = make_press("expected_attention", compression_ratio=0.5)
    layer = _record(tiny_model("llama")).layers[0]
    scores = press.score(layer)
    keys = layer.keys.clone()
    keys[:, :, : press.n_sink] = 100 * torch.randn_like(keys[:, :, : press.n_sink])
    moved = press.score(layer.replace(keys=keys))
    torch.testing.assert_close(moved[..., press.n_sink:], scores[..., press.n_sink:])
    assert bool((scores[..., : press.n_sink] > scores[..., press.n_sink:].amax(-1, keepdim=True)).all())


def test_average_rope_is_computed_once_per_prefill_and_length(tiny_model, single_thread, monkeypatch):
    """Every layer of one type shares the RoPE average: one rotary call per prefill and context length."""
    model = tiny_model("llama")
    calls = []
    original = ModelAdapter.rope

    def counting(self, layer_idx, position_ids, like):
        calls.append((layer_idx, position_ids.shape[-1]))
        return original(self, layer_idx, position_ids, like)

    monkeypatch.setattr(ModelAdapter, "rope", counting)
    recorded = record_prefill(model, token_ids(SEQ_LEN, seed=1))
    press = make_press("expected_attention", compression_ratio=0.5)
    recorded.compress(press)
    assert len(recorded.layers) == 3 and calls == [(0, 512)]
    recorded.compress(press)  # the same recording: same adapter, same length, nothing recomputed
    assert len(calls) == 1
    record_prefill(model, token_ids(SEQ_LEN + 5, seed=1)).compress(press)  # another length: computed again
    assert len(calls) == 2
