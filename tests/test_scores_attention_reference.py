"""Attention-based scores against independent float64 references written from each method's specification.

``tests/test_presses.py`` checks that a press keeps the top entries of its *own* score; a wrong formula (window,
pooling kernel, averaging axis, layer budget) would pass there. Here each score is rebuilt from the method's
definition (the papers, and the reference notes for the peer library's conventions) with explicit loops over
batch rows and heads, from attention weights recomputed in float64, and compared with ``press.score(layer)`` on every
layer of every tiny architecture (GQA, Gemma-3 scaling, QK-norm, biases, partial rotary):

* the reference attention is an explicit causal softmax of the post-RoPE queries against the cached keys, query
  head ``h`` reading KV head ``h // group``; it is itself checked against transformers' eager attention weights;
* SnapKV, PyramidKV, TOVA and observed attention (H2O) are scored from it; attention-reading presses are checked
  both with the eager weights and with their own recomputation (no weights recorded);
* PyramidKV's per-layer budgets follow the paper's arithmetic pyramid and add up to the uniform budget;
* Expected Attention with calibrated statistics is the Gaussian closed form with the artifact's moments;
* CriticalKV's selection is the paper's two stages with an independent ``‖W_o^h v‖₁``.

AdaKV and CriticalAdaKV are not repeated here: ``_check_headwise_selection`` in ``tests/test_presses.py`` already
checks their selection rules (safeguard, layer-wide top, two stages per head) against the wrapped scores.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import MODEL_NAMES, token_ids
from kvsqueeze import make_press
from kvsqueeze.presses.base import keep_top
from kvsqueeze.presses.pyramidkv import pyramid_budgets
from kvsqueeze.record import record_prefill
from test_expected_attention import reference_scores as expected_attention_reference

#: Long enough for SnapKV's default 64-token window to leave 16 scored entries.
SEQ_LEN = 80
BATCH = 2
pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------------------------------------------
# Reference attention
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recorded(tiny_model):
    """``recorded(name)``: one eager prefill of ``BATCH`` different rows per tiny model, attention weights kept."""
    cache = {}

    def get(name: str):
        if name not in cache:
            ids = token_ids(SEQ_LEN, seed=11, batch=BATCH)
            cache[name] = record_prefill(tiny_model(name, "eager"), ids, keep_attentions=True)
        return cache[name]

    return get


def reference_attention(layer) -> torch.Tensor:
    """Causal softmax attention ``(bsz, num_heads, n, n)`` in float64, one (row, head) at a time.

    ``softmax_j(s · q_t · k_j)`` over the keys ``j <= t`` visible to query ``t``, with ``s`` the module's scaling,
    post-RoPE queries and the cached post-RoPE keys; query head ``h`` reads KV head ``h // group``.
    """
    queries = layer.queries(rope=True).double()  # (bsz, num_heads, n, d)
    keys = layer.keys.double()  # (bsz, num_kv_heads, n, d)
    bsz, heads, n, _ = queries.shape
    group = heads // keys.shape[1]
    scaling = layer.adapter.scaling(layer.module)
    future = torch.ones(n, n, dtype=torch.bool).triu(1)  # [t, j]: key j comes after query t
    out = torch.empty(bsz, heads, n, n, dtype=torch.float64)
    for b in range(bsz):
        for h in range(heads):
            logits = scaling * queries[b, h] @ keys[b, h // group].T
            out[b, h] = logits.masked_fill(future, float("-inf")).softmax(dim=-1)
    return out


def group_average(per_head: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``(bsz, num_heads, n) -> (bsz, num_kv_heads, n)``: mean over the query heads ``h`` with ``h // group == k``."""
    bsz, heads, n = per_head.shape
    group = heads // num_kv_heads
    out = torch.zeros(bsz, num_kv_heads, n, dtype=torch.float64)
    for h in range(heads):
        out[:, h // group] += per_head[:, h] / group
    return out


def assert_scores_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(
        got.double(), want, rtol=1e-4, atol=1e-6 * float(want.abs().max()), msg=lambda m: f"{what}: {m}"
    )


def both_paths(layer):
    """The layer with the eager attention weights, and without them (the press recomputes its window)."""
    return {"eager": layer, "recomputed": layer.replace(attentions=None)}


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_reference_attention_is_the_models_eager_attention(model_name, recorded):
    """The float64 reference equals the weights transformers' eager attention computed (else nothing below holds)."""
    with torch.inference_mode():
        for layer in recorded(model_name).layers:
            torch.testing.assert_close(
                reference_attention(layer), layer.attentions.double(), rtol=1e-4, atol=1e-6,
                msg=lambda m: f"{model_name} layer {layer.layer_idx}: {m}",
            )


# ----------------------------------------------------------------------------------------------------------------
# SnapKV and PyramidKV scores
# ----------------------------------------------------------------------------------------------------------------


def snapkv_reference(attn: torch.Tensor, num_kv_heads: int, window: int, kernel: int, pooling: str) -> torch.Tensor:
    """SnapKV's prefix scores (arXiv 2404.14469), ``(bsz, num_kv_heads, n - window)`` float64.

    Per query head: the attention that the ``window`` last queries (the observation window) pay to each of the
    ``n - window`` earlier keys, **summed** over the window queries (softmax over every key a query sees, the window
    columns then dropped); smoothed along the sequence by a pooling of odd ``kernel`` centred on each entry —
    ``avg``: the sum of the in-range neighbours divided by ``kernel`` (out-of-range neighbours count as zeros, as
    in the reference code's zero-padded ``avg_pool1d``), ``max``: the largest in-range neighbour. Then averaged over
    the query heads of each GQA group (the peer library's GQA rule).
    """
    bsz, heads, n, _ = attn.shape
    prefix = n - window
    summed = attn[:, :, prefix:, :prefix].sum(dim=2)  # (bsz, heads, prefix)
    half = kernel // 2
    pooled = torch.empty_like(summed)
    for i in range(prefix):
        neighbours = summed[..., max(0, i - half) : min(prefix, i + half + 1)]
        pooled[..., i] = neighbours.sum(-1) / kernel if pooling == "avg" else neighbours.amax(-1)
    return group_average(pooled, num_kv_heads)


def check_window_scores(press, layer, scores: torch.Tensor, what: str) -> tuple[int, int]:
    """Compare the prefix scores with the reference; the window must outrank the prefix, latest entries first.

    The press averages the window attention where SnapKV sums it (its docstring: same ranking), so its prefix
    scores are the reference divided by the window length.
    """
    n = layer.seq_len
    window = min(press.window_size, n - 1)  # the press's documented short-input rule; not reached at SEQ_LEN
    assert window == press.window_size, "SEQ_LEN must exceed the window for this check"
    want = snapkv_reference(reference_attention(layer), layer.keys.shape[1], window, press.kernel_size, press.pooling)
    assert scores.shape == layer.keys.shape[:-1], what
    assert_scores_close(scores[..., : n - window], want / window, what)
    win = scores[..., n - window :]
    assert bool((win.min(-1).values > scores[..., : n - window].amax(-1)).all()), f"{what}: window not kept first"
    assert bool((win.diff(dim=-1) > 0).all()), f"{what}: window not ranked latest first"
    return n, window


SNAPKV_FIELDS = [{}, {"window_size": 8, "kernel_size": 7, "pooling": "max"}, {"window_size": 13, "kernel_size": 1}]


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("fields", SNAPKV_FIELDS, ids=["defaults", "w8-k7-max", "w13-no-pooling"])
def test_snapkv_scores_match_reference(model_name, fields, recorded):
    press = make_press("snapkv", compression_ratio=0.5, **fields)
    with torch.inference_mode():
        for layer in recorded(model_name).layers:
            for path, variant in both_paths(layer).items():
                check_window_scores(press, variant, press.score(variant), f"{model_name} L{layer.layer_idx} {path}")


def test_snapkv_defaults():
    """The peer library's (and SnapKV's class) defaults: window 64, kernel 5, average pooling."""
    press = make_press("snapkv")
    assert (press.window_size, press.kernel_size, press.pooling) == (64, 5, "avg")


PYRAMID_FIELDS = [{}, {"window_size": 4, "kernel_size": 3, "pooling": "avg", "beta": 2.0}]


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("fields", PYRAMID_FIELDS, ids=["defaults", "w4-k3-avg-beta2"])
def test_pyramidkv_scores_match_reference(model_name, fields, recorded):
    """PyramidKV scores entries exactly as SnapKV does; only the budgets differ (arXiv 2406.02069)."""
    press = make_press("pyramidkv", compression_ratio=0.5, **fields)
    with torch.inference_mode():
        for layer in recorded(model_name).layers:
            for path, variant in both_paths(layer).items():
                check_window_scores(press, variant, press.score(variant), f"{model_name} L{layer.layer_idx} {path}")


def test_pyramidkv_defaults_are_the_papers_run_scripts():
    """Window 8, kernel 7, max pooling (KVCache-Factory run scripts), beta 20 (paper)."""
    press = make_press("pyramidkv")
    assert (press.window_size, press.kernel_size, press.pooling, press.beta) == (8, 7, "max", 20)


# ----------------------------------------------------------------------------------------------------------------
# PyramidKV budgets
# ----------------------------------------------------------------------------------------------------------------


def pyramid_shares(n: int, ratio_kept: int, window: int, num_layers: int, beta: float) -> list[float] | None:
    """PyramidKV's real per-layer budgets (arXiv 2406.02069; KVCache-Factory ``pyramidkv_utils.py``), bottom first.

    With ``C`` the average entries per layer (window included), ``min = (C - w) / beta`` and
    ``max = 2 (C - w) - min``; when ``max`` exceeds the ``n - w`` entries a layer can hold beyond its window, it
    is set to ``n - w`` and ``min = 2 (C - w) - max`` (the reference code's rule, which keeps the mean). Layer
    ``l`` of ``L`` keeps ``w + max - l (max - min) / (L - 1)``. None when no pyramid applies (one layer, or a
    budget no larger than the window, or nothing to remove): every layer then keeps ``C``.
    """
    share = ratio_kept - window
    if num_layers < 2 or share <= 0 or ratio_kept >= n:
        return None
    low = share / beta
    high = 2 * share - low
    if high > n - window:
        high = n - window
        low = 2 * share - high
    return [window + high - layer * (high - low) / (num_layers - 1) for layer in range(num_layers)]


def check_budgets(budgets: list[int], shares: list[float] | None, uniform: int, what: str) -> None:
    """Integer budgets of real ``shares``: each within one entry of its share, adding up to the uniform total."""
    if shares is None:
        assert budgets == [uniform] * len(budgets), f"{what}: {budgets}, want uniform {uniform}"
        return
    assert sum(budgets) == uniform * len(budgets), f"{what}: total {sum(budgets)} != {len(budgets)} x {uniform}"
    for b, s in zip(budgets, shares):
        assert abs(b - s) < 1, f"{what}: budgets {budgets} vs pyramid {[round(x, 2) for x in shares]}"


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize(
    "ratio, fields",
    [(0.5, {}), (0.25, {}), (0.9, {}), (0.5, {"window_size": 4, "beta": 2.0}), (0.5, {"beta": 1.0})],
    ids=["r0.5", "r0.25-clipped", "r0.9-no-room-beyond-window", "r0.5-w4-beta2", "r0.5-beta1"],
)
def test_pyramidkv_layer_budgets_follow_the_pyramid(model_name, ratio, fields, recorded):
    """Per-layer budgets of a real prefill: the ranks are the compressible (full-attention) layers, bottom first
    (one layer in the Gemma-3 hybrid: uniform)."""
    press = make_press("pyramidkv", compression_ratio=ratio, **fields)
    layers = recorded(model_name).layers
    uniform = math.floor(SEQ_LEN * (1 - ratio) + 1e-9)  # the ratio's budget, window included (press docstring)
    window = min(press.window_size, SEQ_LEN - 1)
    budgets = [press.layer_budget(layer) for layer in layers]
    shares = pyramid_shares(SEQ_LEN, uniform, window, len(layers), press.beta)
    check_budgets(budgets, shares, uniform, f"{model_name} ratio {ratio} {fields}")
    if shares is not None and press.beta > 1:
        assert budgets[0] > uniform > budgets[-1], f"{model_name}: {budgets} is not a pyramid"
    if ratio == 0.9:  # 8 entries per layer: all window, no pyramid
        assert shares is None
    if ratio == 0.25 and len(layers) > 1:  # 60 of 80 per layer: max (2·52 − 2.6) exceeds the 72 entries beyond the window
        assert shares is not None and shares[0] == SEQ_LEN, "the clipped case was not exercised"


def test_pyramid_budget_schedule_over_many_shapes():
    """The schedule on many (length, budget, window, layers, beta), including clipped and degenerate pyramids."""
    checked = 0
    for n in (17, 40, 80, 257):
        for ratio_kept in sorted({1, 2, n // 8, n // 3, n // 2, (3 * n) // 4, n - 1, n}):
            for window in (1, 4, 8, 64):
                w = min(window, n - 1)
                for num_layers in (1, 2, 3, 7, 32):
                    for beta in (1.0, 2.0, 20.0):
                        budgets = pyramid_budgets(ratio_kept, w, n, num_layers, beta)
                        shares = pyramid_shares(n, ratio_kept, w, num_layers, beta)
                        check_budgets(budgets, shares, ratio_kept, f"n={n} C={ratio_kept} w={w} L={num_layers} b={beta}")
                        checked += shares is not None
    assert checked > 500


# ----------------------------------------------------------------------------------------------------------------
# TOVA and observed attention (H2O)
# ----------------------------------------------------------------------------------------------------------------


def tova_reference(attn: torch.Tensor) -> torch.Tensor:
    """TOVA's score (arXiv 2401.06104), ``(bsz, n)``: the last query's attention averaged over all query heads."""
    bsz, heads, n, _ = attn.shape
    out = torch.zeros(bsz, n, dtype=torch.float64)
    for h in range(heads):
        out += attn[:, h, n - 1] / heads
    return out


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_tova_scores_match_reference(model_name, recorded):
    """One score per layer shared by every KV head; the last token is kept first (documented departure)."""
    press = make_press("tova", compression_ratio=0.5)
    with torch.inference_mode():
        for layer in recorded(model_name).layers:
            want = tova_reference(reference_attention(layer))
            for path, variant in both_paths(layer).items():
                what = f"{model_name} L{layer.layer_idx} {path}"
                scores = press.score(variant)
                assert scores.shape == layer.keys.shape[:-1], what
                for k in range(scores.shape[1]):
                    assert_scores_close(scores[:, k, :-1], want[:, :-1], f"{what} kv head {k}")
                assert bool((scores[..., -1] > scores[..., :-1].amax(-1)).all()), f"{what}: last token not first"


def observed_attention_reference(attn: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Observed attention (H2O, arXiv 2306.14048, as the peer library's prefill variant), ``(bsz, kv_heads, n)``.

    Per query head, key ``i`` gets the attention it received from every query ``t >= i``, divided by the number of
    those queries, ``n - i``; then the mean over the query heads of each GQA group.
    """
    bsz, heads, n, _ = attn.shape
    per_head = torch.empty(bsz, heads, n, dtype=torch.float64)
    for i in range(n):
        per_head[..., i] = attn[:, :, i:, i].sum(dim=-1) / (n - i)
    return group_average(per_head, num_kv_heads)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_observed_attention_scores_match_reference(model_name, recorded):
    press = make_press("observed_attention", compression_ratio=0.5)
    with torch.inference_mode():
        for layer in recorded(model_name).layers:
            want = observed_attention_reference(reference_attention(layer), layer.keys.shape[1])
            got = press.score(layer)
            assert got.shape == want.shape, f"{model_name} L{layer.layer_idx}"
            assert_scores_close(got, want, f"{model_name} L{layer.layer_idx}")


# ----------------------------------------------------------------------------------------------------------------
# Expected Attention with calibrated statistics
# ----------------------------------------------------------------------------------------------------------------


class _WithQueryMoments:
    """``layer`` whose pre-RoPE queries are replaced by points with exactly the given per-head moments.

    ``tests/test_expected_attention.reference_scores`` (the float64 closed form of arXiv 2510.00636 eqs. 6–9) takes
    the mean and the covariance (divided by N) of ``layer.queries(rope=False)`` after its first ``n_sink`` rows.
    With ``Σ = Σ_j λ_j v_j v_jᵀ`` the ``2d`` points ``μ ± √(d λ_j) v_j`` have mean ``μ`` and covariance ``Σ``
    exactly, so the reference then evaluates the closed form with those moments instead of the context's.
    """

    def __init__(self, layer, mean: torch.Tensor, cov: torch.Tensor, n_sink: int):
        self._layer = layer
        evals, evecs = torch.linalg.eigh(cov.double())  # (heads, d), (heads, d, d), columns are eigenvectors
        d = mean.shape[-1]
        spread = (evecs * (d * evals.clamp(min=0)).sqrt().unsqueeze(-2)).transpose(-1, -2)  # rows √(dλ_j) v_j
        points = torch.cat([mean.double().unsqueeze(1) + spread, mean.double().unsqueeze(1) - spread], dim=1)
        points = torch.cat([torch.zeros(mean.shape[0], n_sink, d, dtype=torch.float64), points], dim=1)
        self._queries = points.expand(layer.keys.shape[0], *points.shape)  # (bsz, heads, n_sink + 2d, d)

    def __getattr__(self, name):
        return getattr(self._layer, name)

    def queries(self, rope: bool = True, last: int | None = None, first: int = 0) -> torch.Tensor:
        assert not rope and last is None and first == 0, "the closed form only reads all pre-RoPE queries"
        return self._queries


def test_query_points_have_the_requested_moments():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 8, 8, generator=gen, dtype=torch.float64)
    cov = a @ a.transpose(-1, -2) / 8
    mean = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    layer = type("L", (), {"keys": torch.zeros(2, 1, 5, 8)})()
    q = _WithQueryMoments(layer, mean, cov, n_sink=2).queries(rope=False)[:, :, 2:]
    centred = q - q.mean(dim=2, keepdim=True)
    torch.testing.assert_close(q.mean(dim=2), mean.expand(2, -1, -1))
    torch.testing.assert_close(centred.transpose(-1, -2) @ centred / q.shape[2], cov.expand(2, -1, -1, -1))


EA_STATS_FIELDS = [{}, {"use_covariance": False, "n_sink": 0, "epsilon": 0.02, "n_future_positions": 64},
                   {"use_vnorm": False, "n_sink": 2}]


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("fields", EA_STATS_FIELDS, ids=["defaults", "no-cov-no-sink-eps", "no-vnorm"])
def test_expected_attention_stats_is_the_closed_form_with_the_artifact_moments(
    model_name, fields, recorded, calibration_artifact
):
    """``(softmax_i(s·μ̄ᵀk_i + s²·k_iᵀΣ̄k_i/2) + ε)·‖v_i‖`` averaged over each GQA group, ``μ̄ = R̄μ``,
    ``Σ̄ = R̄ΣR̄ᵀ``, with ``μ``, ``Σ`` the artifact's per-(layer, head) pre-RoPE moments (read from the file here);
    the first ``n_sink`` entries kept first."""
    path = calibration_artifact(model_name, "expected_attention_stats")
    moments = load_file(str(path))
    press = make_press("expected_attention_stats", compression_ratio=0.5, artifact=str(path), **fields)
    with torch.inference_mode():
        for layer in recorded(model_name).layers:
            n_sink = min(press.n_sink, layer.seq_len - 1)
            i = layer.layer_idx
            proxy = _WithQueryMoments(layer, moments["mean"][i], moments["covariance"][i], n_sink)
            want = expected_attention_reference(proxy, n_sink, press.n_future_positions, press.use_covariance,
                                                press.use_vnorm, press.epsilon)
            got = press.score(layer)
            assert got.shape == want.shape == layer.keys.shape[:-1]
            assert_scores_close(got, want, f"{model_name} L{i} {fields}")


# ----------------------------------------------------------------------------------------------------------------
# CriticalKV
# ----------------------------------------------------------------------------------------------------------------


def output_norms_reference(layer) -> torch.Tensor:
    """``‖W_o^h v_i‖₁`` averaged over the query heads ``h`` of each GQA group, ``(bsz, kv_heads, n)`` float64.

    ``W_o^h`` is the ``hidden × d`` block of ``o_proj.weight`` whose columns ``h·d … (h+1)·d − 1`` read query head
    ``h``'s attention output; query head ``h`` attends with KV head ``h // group``'s values.
    """
    values = layer.values.double()
    bsz, kv_heads, n, d = values.shape
    weight = layer.module.o_proj.weight.double()
    heads = weight.shape[1] // d
    per_head = torch.empty(bsz, heads, n, dtype=torch.float64)
    for h in range(heads):
        block = weight[:, h * d : (h + 1) * d]  # (hidden, d)
        per_head[:, h] = (values[:, h // (heads // kv_heads)] @ block.T).abs().sum(-1)
    return group_average(per_head, kv_heads)


def criticalkv_reference(base: torch.Tensor, vnorm: torch.Tensor, n_kept: int, first_stage_ratio: float,
                         epsilon: float) -> torch.Tensor:
    """CriticalKV's two-stage selection (arXiv 2502.03805), keep mask ``(bsz, kv_heads, n)``, head by head.

    Stage 1 keeps the ``⌊first_stage_ratio · n_kept⌋`` highest base scores; stage 2 fills the rest of the budget
    with the highest ``(score + ε)·‖W_o v‖₁`` among the other entries. Ties at either cut make the selection
    ambiguous, so they are refused.
    """
    keep = torch.zeros(base.shape, dtype=torch.bool)
    n1 = int(first_stage_ratio * n_kept)
    for b in range(base.shape[0]):
        for k in range(base.shape[1]):
            order = base[b, k].argsort(descending=True)
            if 0 < n1 < order.numel():
                assert base[b, k, order[n1 - 1]] > base[b, k, order[n1]], "tie at the stage-1 cut"
            keep[b, k, order[:n1]] = True
            critical = ((base[b, k] + epsilon) * vnorm[b, k]).masked_fill(keep[b, k], float("-inf"))
            rest = critical.argsort(descending=True)
            if n_kept < rest.numel():
                assert critical[rest[n_kept - n1 - 1]] > critical[rest[n_kept - n1]], "tie at the stage-2 cut"
            keep[b, k, rest[: n_kept - n1]] = True
    return keep


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize(
    "inner, fields",
    [("snapkv", {}), ("expected_attention", {"first_stage_ratio": 0.25})],
    ids=["snapkv", "expected_attention-stage1-0.25"],
)
def test_criticalkv_selection_matches_two_stages(model_name, inner, fields, recorded):
    """The wrapped press's scores are the base (SnapKV's and Expected Attention's are non-negative, so the press's
    documented shift of negative scores does not apply); the value norm is computed independently."""
    inner_fields = {"window_size": 8, "kernel_size": 3} if inner == "snapkv" else {"use_vnorm": False}
    press = make_press("criticalkv", press=make_press(inner, **inner_fields), compression_ratio=0.5, **fields)
    with torch.inference_mode():
        for layer in recorded(model_name).layers:
            what = f"{model_name} L{layer.layer_idx}"
            vnorm = output_norms_reference(layer)
            assert_scores_close(layer.adapter.value_output_norms(layer.module, layer.values), vnorm, what)
            n_kept = press.layer_budget(layer)
            assert n_kept == SEQ_LEN // 2, what
            base = press.press.score(layer).double()
            assert bool((base >= 0).all()), what
            want = criticalkv_reference(base, vnorm, n_kept, press.first_stage_ratio, press.epsilon)
            got = torch.zeros_like(want).scatter(-1, keep_top(press.score(layer), n_kept), True)
            assert torch.equal(got, want), f"{what}: {int((got & ~want).sum())} kept entries are not the reference's"
