"""Score functions of the attention-free scorer presses against slow float64 references written from the method
specifications (the reference notes ``methods.md`` §2.1 and ``papers.md`` §2, §3, §6), not from the presses'
code.

``tests/test_presses.py`` checks that a press keeps the top of its *own* score; these tests check the score itself
(sign, normalisation, windows, partitions) on every tiny architecture (GQA, Gemma-3 hybrid, QK-norm, biases,
fused qkv with partial rotary), on a batch of two different rows. Each reference loops over the (row, KV head)
pairs and writes the formula out explicitly in float64.

Presses covered: ``knorm``, ``keydiff``, ``qfilters`` (value-level comparison); ``streaming_llm`` (its score is
only defined up to a monotone transform, so the kept set is compared); ``lagkv`` (partition scores compared by
value with ``cross_scoring=True`` and by within-partition order with the default rank scores, plus the kept set);
``random`` (reproducibility, independence from the cache contents, uniformity of the kept sets).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MODEL_NAMES, token_ids
from safetensors import safe_open

from kvsqueeze import make_press
from kvsqueeze.record import record_prefill

pytestmark = pytest.mark.usefixtures("single_thread")

# 41 = 4 sinks + 4 partitions of 8 + a remainder of 5: LagKV with lag 8 scores 3 partitions and protects 4 + 13
# tokens; other lags and sink counts below leave other remainders. Two different rows per batch.
SEQ_LEN = 41
BATCH = 2


@pytest.fixture(scope="module")
def recorded(tiny_model, single_thread):
    """``recorded(model_name)``: the recorded prefill of a (2, 41) batch on that tiny model (computed once)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = record_prefill(tiny_model(name), token_ids(SEQ_LEN, seed=7, batch=BATCH))
        return cache[name]

    return get


def _layers(recorded, model_name):
    layers = recorded(model_name).layers
    assert layers, f"{model_name}: no compressible layer recorded"
    for layer in layers:
        assert layer.keys.shape[0] == BATCH and layer.seq_len == SEQ_LEN
        assert not torch.equal(layer.keys[0], layer.keys[1]), "the two rows must differ"
    return layers


def assert_keeps_top(press, layer, reference: torch.Tensor, what: str, tol: float | None = None) -> torch.Tensor:
    """The press's kept set (``keep_indices``) is a top set of ``reference`` ``(bsz, kv_heads, n)`` (higher = keep):
    every kept entry scores at least every dropped one, up to ``tol`` (exact ties may be broken either way), and
    it holds ``layer_budget`` entries per head. Returns the kept mask.

    ``tol`` defaults to 2e-6 × the largest |reference|: the press scores in float32, so entries closer than a few
    float32 ulps are ties for it (QK-norm models give every key the same norm up to ~1e-7)."""
    if tol is None:
        tol = 2e-6 * float(reference.abs().max())
    n_kept = press.layer_budget(layer)
    idx = press.keep_indices(layer)
    assert idx is not None and idx.shape == (*layer.keys.shape[:2], n_kept), what
    keep = torch.zeros(reference.shape, dtype=torch.bool)
    keep.scatter_(-1, idx.cpu(), True)
    assert bool((keep.sum(-1) == n_kept).all()), f"{what}: repeated indices"
    lowest_kept = reference.masked_fill(~keep, float("inf")).amin(-1)
    highest_dropped = reference.masked_fill(keep, float("-inf")).amax(-1)
    assert bool((lowest_kept >= highest_dropped - tol).all()), (
        f"{what}: a dropped entry outranks a kept one in the reference "
        f"(lowest kept {lowest_kept.tolist()}, highest dropped {highest_dropped.tolist()})"
    )
    return keep


# ----------------------------------------------------------------------------------------------------------------
# KNorm (papers.md §2.1; methods.md §2.1): score = -‖k‖₂ of the post-RoPE cached key, low-norm keys kept.
# ----------------------------------------------------------------------------------------------------------------


def knorm_reference(keys: torch.Tensor) -> torch.Tensor:
    """``-‖k‖₂`` per (row, KV head, token): the square root of the sum of squared channels, negated so that the
    keys with the LOWEST norm score highest (KNorm keeps them)."""
    bsz, heads, n, _ = keys.shape
    out = torch.empty(bsz, heads, n, dtype=torch.float64)
    for b in range(bsz):
        for h in range(heads):
            k = keys[b, h].double()
            out[b, h] = -torch.sqrt((k * k).sum(dim=-1))
    return out


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("fields", [{"compression_ratio": 0.5}, {"budget": 7}], ids=["ratio", "budget"])
def test_knorm_matches_reference(model_name, fields, recorded):
    press = make_press("knorm", **fields)
    for layer in _layers(recorded, model_name):
        want = knorm_reference(layer.keys)
        got = press.score(layer)
        assert got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
        keep = assert_keeps_top(press, layer, want, f"knorm {model_name} layer {layer.layer_idx}")
        # Spelled out: the kept keys are the low-norm ones (up to float32 ties).
        norms = -want
        tol = 2e-6 * float(norms.max())
        assert bool((norms.masked_fill(~keep, -1).amax(-1) <= norms.masked_fill(keep, 1e9).amin(-1) + tol).all())


# ----------------------------------------------------------------------------------------------------------------
# KeyDiff (papers.md §6 "KeyDiff"; methods.md §2.1): anchor = mean of the L2-normalised keys of the head;
# score = -cos(k_i, anchor); distinctive keys (least similar to the anchor) are kept.
# ----------------------------------------------------------------------------------------------------------------


def keydiff_reference(keys: torch.Tensor) -> torch.Tensor:
    """``-cos(k_i, a)`` with ``a = mean_j k_j / ‖k_j‖`` over the tokens of the same (row, KV head)."""
    bsz, heads, n, _ = keys.shape
    out = torch.empty(bsz, heads, n, dtype=torch.float64)
    for b in range(bsz):
        for h in range(heads):
            k = keys[b, h].double()  # (n, d)
            norms = torch.sqrt((k * k).sum(dim=-1))
            anchor = (k / norms[:, None]).mean(dim=0)
            anchor_norm = torch.sqrt((anchor * anchor).sum())
            for i in range(n):
                out[b, h, i] = -(k[i] @ anchor) / (norms[i] * anchor_norm)
    return out


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_keydiff_matches_reference(model_name, recorded):
    press = make_press("keydiff", compression_ratio=0.5)
    for layer in _layers(recorded, model_name):
        want = keydiff_reference(layer.keys)
        got = press.score(layer)
        assert got.shape == want.shape
        assert bool((want.abs() <= 1 + 1e-12).all())
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
        assert_keeps_top(press, layer, want, f"keydiff {model_name} layer {layer.layer_idx}")


def test_keydiff_is_invariant_to_key_scale(recorded):
    """A cosine score: rescaling each key by a positive factor changes nothing (a norm-weighted formula would)."""
    press = make_press("keydiff", compression_ratio=0.5)
    layer = _layers(recorded, "llama")[0]
    gen = torch.Generator().manual_seed(0)
    factors = torch.rand(*layer.keys.shape[:3], 1, generator=gen) * 9.5 + 0.5
    scaled = layer.replace(keys=layer.keys * factors)
    torch.testing.assert_close(press.score(scaled), press.score(layer), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Q-Filters (papers.md §3.1; methods.md §2.1 "QFilterPress"): per (layer, KV head) filter v₁⁺, the first right
# singular vector of the head's post-RoPE queries, oriented so that queries project positively on it on average,
# averaged over the query heads of the GQA group; keep the keys with the LARGEST ⟨k, v₁⁺⟩.
# ----------------------------------------------------------------------------------------------------------------


def _read_artifact(path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        metadata = f.metadata() or {}
    return tensors, metadata


def qfilters_reference(keys: torch.Tensor, query_head_filters: torch.Tensor) -> torch.Tensor:
    """``⟨k_i, f_h⟩`` with ``f_h`` the mean of the unit filters of the query heads that read KV head ``h``
    (query head ``q`` reads KV head ``q // group``), rescaled to unit norm. The rescaling is a positive factor per
    (layer, head) and changes no ranking; the press's docstring documents that its filters are unit vectors."""
    bsz, heads, n, _ = keys.shape
    num_q_heads = query_head_filters.shape[0]
    group = num_q_heads // heads
    out = torch.empty(bsz, heads, n, dtype=torch.float64)
    for h in range(heads):
        members = [query_head_filters[q].double() for q in range(num_q_heads) if q // group == h]
        assert len(members) == group
        f = sum(members) / group
        f = f / torch.sqrt((f * f).sum())
        for b in range(bsz):
            out[b, h] = keys[b, h].double() @ f
    return out


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_qfilters_matches_reference(model_name, recorded, calibration_artifact):
    path = calibration_artifact(model_name, "qfilters")
    tensors, _ = _read_artifact(path)
    per_query_head = tensors["query_head_filters"]  # (num_layers, num_heads, head_dim)
    press = make_press("qfilters", compression_ratio=0.5, artifact=str(path))
    for layer in _layers(recorded, model_name):
        query_head_filters = per_query_head[layer.layer_idx]
        norms = query_head_filters.double().norm(dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-5)
        want = qfilters_reference(layer.keys, query_head_filters)
        got = press.score(layer)
        assert got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        assert_keeps_top(press, layer, want, f"qfilters {model_name} layer {layer.layer_idx}")


def _top_query_direction(q: torch.Tensor) -> torch.Tensor:
    """The first right singular vector of ``q`` ``(n, d)`` (float64), as the top eigenvector of ``qᵀq``, oriented
    so that the queries' mean projection on it is positive (the paper's ``v₁⁺ = sgn(1ᵀu₁)·v₁``: ``u₁ ∝ q v₁``, so
    ``1ᵀu₁`` has the sign of ``Σ_t ⟨q_t, v₁⟩``)."""
    gram = q.T @ q
    eigvals, eigvecs = torch.linalg.eigh(gram)  # ascending
    v = eigvecs[:, -1]
    assert float(eigvals[-1] - eigvals[-2]) > 1e-3 * float(eigvals[-1]), "top direction is not well separated"
    return v if float((q @ v).mean()) >= 0 else -v


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_qfilters_artifact_direction_and_sign(model_name, tiny_model, calibration_artifact):
    """The filters the previous test reads are the spec's: recompute every query head's ``v₁⁺`` from ALL the
    post-RoPE calibration queries (the fixture calibrates on ``token_ids(96, seed=100 + i)``, ``i < 4``, fewer than
    the 3000 samples, so every query is used) and compare, sign included — a flipped sign would invert what the
    press keeps while the score formula still looked right."""
    path = calibration_artifact(model_name, "qfilters")
    tensors, metadata = _read_artifact(path)
    batches = [token_ids(96, seed=100 + i) for i in range(4)]
    settings = json.loads(metadata["settings"])
    assert settings["n_samples"] == settings["n_tokens"] == sum(b.numel() for b in batches), settings
    queries: dict[int, list[torch.Tensor]] = {}
    with torch.inference_mode():
        for ids in batches:
            for layer in record_prefill(tiny_model(model_name), ids).layers:
                queries.setdefault(layer.layer_idx, []).append(layer.queries(rope=True)[0].double())
    for layer_idx, chunks in queries.items():
        q = torch.cat(chunks, dim=1)  # (num_heads, 384, head_dim)
        stored = tensors["query_head_filters"][layer_idx].double()
        for head in range(q.shape[0]):
            want = _top_query_direction(q[head])
            where = f"{model_name} layer {layer_idx} head {head}"
            assert float((stored[head] - want).abs().max()) < 2e-4, f"{where}: {stored[head]} vs {want}"
        # The grouped filters the press loads are the normalised group means (the spec's GQA averaging).
        group = q.shape[0] // tensors["filters"].shape[1]
        mean = stored.view(-1, group, stored.shape[-1]).mean(dim=1)
        torch.testing.assert_close(tensors["filters"][layer_idx].double(), mean / mean.norm(dim=-1, keepdim=True),
                                   rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# StreamingLLM (papers.md §6 "StreamingLLM"; methods.md §2.1): keep the first n_sink tokens and the most recent
# n_kept - n_sink ones, drop the middle. kvpress's score is 1/0 with ties, ours rises with position inside each
# block; only the kept set is defined, so the kept set is what is compared.
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize(
    "fields",
    [{"compression_ratio": 0.5}, {"compression_ratio": 0.5, "n_sink": 0},
     {"compression_ratio": 0.75, "n_sink": 2}, {"budget": 9, "n_sink": 5}],
    ids=["defaults", "no-sink", "sink2-ratio0.75", "budget9-sink5"],
)
def test_streaming_llm_keeps_sinks_and_recent_window(model_name, fields, recorded):
    press = make_press("streaming_llm", **fields)
    n_sink = fields.get("n_sink", 4)
    assert press.n_sink == n_sink
    for layer in _layers(recorded, model_name):
        n = layer.seq_len
        n_kept = fields["budget"] if "budget" in fields else int(n * (1 - fields["compression_ratio"]))
        assert press.layer_budget(layer) == n_kept
        want = list(range(n_sink)) + list(range(n - (n_kept - n_sink), n))
        assert len(want) == n_kept and len(set(want)) == n_kept
        idx = press.keep_indices(layer)
        expected = torch.tensor(want).expand(*layer.keys.shape[:2], n_kept)
        assert torch.equal(idx.cpu(), expected), f"{fields} {model_name}: kept {idx[0, 0].tolist()}, want {want}"


def test_streaming_llm_ignores_the_cache_contents(recorded):
    """Position-only: other keys and values give the same kept set."""
    press = make_press("streaming_llm", compression_ratio=0.5)
    layer = _layers(recorded, "llama")[0]
    other = layer.replace(keys=torch.randn(layer.keys.shape), values=torch.randn(layer.values.shape))
    assert torch.equal(press.keep_indices(other), press.keep_indices(layer))


# ----------------------------------------------------------------------------------------------------------------
# LagKV (methods.md §2.1 "LagKVPress"; arXiv 2504.04704): after n_sink sinks, partitions of lag_size tokens; each
# partition but the last is min-max normalised channel-wise by the NEXT partition's range (keys and values
# separately), the std across channels is taken per token, softmaxed within the partition, and key and value
# scores are averaged. Default: the within-partition rank / lag_size. Sinks and the last lag_size + remainder
# tokens are always kept. Fewer than n_sink + 2·lag_size tokens: sinks + most recent (StreamingLLM).
# ----------------------------------------------------------------------------------------------------------------


def _lag_partition_score(x: torch.Tensor, start: int, lag: int) -> torch.Tensor:
    """Softmax (within the partition) of the per-token std across channels of partition ``[start, start + lag)``
    of ``x`` ``(n, d)`` normalised by the per-channel min and max of the next partition. The std is the sample
    std (divisor d - 1), as kvpress computes it; the paper does not say, and the rank scores do not depend on it."""
    ref = x[start + lag: start + 2 * lag]
    low, high = ref.min(dim=0).values, ref.max(dim=0).values
    normed = (x[start: start + lag] - low) / (high - low)  # (lag, d)
    d = normed.shape[-1]
    mean = normed.sum(dim=-1, keepdim=True) / d
    std = torch.sqrt(((normed - mean) ** 2).sum(dim=-1) / (d - 1))
    e = torch.exp(std - std.max())
    return e / e.sum()


def lagkv_reference(keys, values, n_sink: int, lag: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Combined (key + value) / 2 softmax scores ``(bsz, heads, n)`` (NaN outside the scored partitions) and the
    scored partitions as ``(start, end)``."""
    bsz, heads, n, _ = keys.shape
    n_parts = (n - n_sink) // lag
    partitions = [(n_sink + p * lag, n_sink + (p + 1) * lag) for p in range(n_parts - 1)]
    out = torch.full((bsz, heads, n), float("nan"), dtype=torch.float64)
    for b in range(bsz):
        for h in range(heads):
            k, v = keys[b, h].double(), values[b, h].double()
            for start, end in partitions:
                out[b, h, start:end] = (_lag_partition_score(k, start, lag) + _lag_partition_score(v, start, lag)) / 2
    return out, partitions


def _lagkv_keep_reference(want: torch.Tensor, partitions, n_sink: int, lag: int, ranks: bool) -> torch.Tensor:
    """A reference "keep priority": protected tokens (sinks, last partition + remainder) above everything, then the
    partition scores (their within-partition rank / lag when ``ranks``)."""
    ref = torch.full_like(want, 10.0)  # protected
    for start, end in partitions:
        part = want[..., start:end]
        if ranks:
            part = (part[..., :, None] > part[..., None, :]).sum(-1).double() / lag  # rank: how many it beats
        ref[..., start:end] = part
    return ref


LAGKV_FIELDS = [
    {"lag_size": 8},  # default n_sink 4: 3 scored partitions, 13 protected at the end
    {"lag_size": 5, "n_sink": 0},  # 7 scored partitions, remainder 1
    {"lag_size": 16, "n_sink": 2},  # 1 scored partition, remainder 7
]


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("fields", LAGKV_FIELDS, ids=lambda f: "-".join(f"{k}{v}" for k, v in f.items()))
def test_lagkv_cross_scores_match_reference(model_name, fields, recorded):
    """``cross_scoring=True``: the partition scores are the softmax values themselves, compared by value."""
    press = make_press("lagkv", compression_ratio=0.5, cross_scoring=True, **fields)
    n_sink, lag = press.n_sink, press.lag_size
    for layer in _layers(recorded, model_name):
        want, partitions = lagkv_reference(layer.keys, layer.values, n_sink, lag)
        got = press.score(layer).double()
        assert got.shape == want.shape
        scored = ~want.isnan()
        assert int(scored[0, 0].sum()) == len(partitions) * lag
        torch.testing.assert_close(got[scored], want[scored], rtol=1e-4, atol=1e-7)
        # Each partition's softmax sums to one.
        for start, end in partitions:
            torch.testing.assert_close(got[..., start:end].sum(-1), torch.ones(got.shape[:2], dtype=torch.float64))
        protected = ~scored
        assert bool((got.masked_fill(scored, float("inf")).amin(-1) > got.masked_fill(protected, -1).amax(-1)).all())
        assert_keeps_top(press, layer, _lagkv_keep_reference(want, partitions, n_sink, lag, ranks=False),
                         f"lagkv cross {fields} {model_name} layer {layer.layer_idx}", tol=1e-6)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("fields", LAGKV_FIELDS, ids=lambda f: "-".join(f"{k}{v}" for k, v in f.items()))
def test_lagkv_rank_scores_follow_reference_order(model_name, fields, recorded):
    """Default ``cross_scoring=False``: within each partition the scores are the ranks 0, 1/lag, …, (lag-1)/lag,
    ordered as the reference softmax scores (pairs closer than 1e-6 may come either way)."""
    press = make_press("lagkv", compression_ratio=0.5, **fields)
    n_sink, lag = press.n_sink, press.lag_size
    assert press.cross_scoring is False
    steps = torch.arange(lag, dtype=torch.float64) / lag
    for layer in _layers(recorded, model_name):
        want, partitions = lagkv_reference(layer.keys, layer.values, n_sink, lag)
        got = press.score(layer).double()
        for start, end in partitions:
            g, w = got[..., start:end], want[..., start:end]  # (bsz, heads, lag)
            torch.testing.assert_close(g.sort(dim=-1).values, steps.expand_as(g), rtol=0, atol=1e-6)
            above = g[..., :, None] > g[..., None, :]  # press ranks i above j ...
            consistent = w[..., :, None] >= w[..., None, :] - 1e-6  # ... so the reference must not rank j above i
            assert bool(consistent[above].all()), (
                f"lagkv {fields} {model_name} layer {layer.layer_idx} partition {start}: rank order differs")
        scored = ~want.isnan()
        assert bool((got.masked_fill(scored, float("inf")).amin(-1) > got.masked_fill(~scored, -1).amax(-1)).all())
        assert_keeps_top(press, layer, _lagkv_keep_reference(want, partitions, n_sink, lag, ranks=True),
                         f"lagkv rank {fields} {model_name} layer {layer.layer_idx}", tol=1e-9)


@pytest.mark.parametrize(
    "fields, n_kept",
    [({"lag_size": 128}, 20), ({"lag_size": 18, "n_sink": 3}, 20), ({"lag_size": 8, "budget": 10}, 10)],
    ids=["short-default-lag", "short-lag18", "budget-below-protected"],
)
def test_lagkv_sinks_and_recent_when_nothing_is_scored(fields, n_kept, recorded):
    """Fewer than ``n_sink + 2·lag_size`` tokens (41 < 4 + 256, 41 < 3 + 36): no partition has a reference, and the
    spec keeps the sinks and the most recent tokens. With a budget (10) below the protected set (4 sinks + 13), the
    press's docstring says it keeps the sinks first, then the most recent ones."""
    ratio = {} if "budget" in fields else {"compression_ratio": 0.5}
    press = make_press("lagkv", **ratio, **fields)
    n_sink = press.n_sink
    for layer in _layers(recorded, "llama"):
        n = layer.seq_len
        assert press.layer_budget(layer) == n_kept
        want = torch.tensor(list(range(n_sink)) + list(range(n - (n_kept - n_sink), n)))
        assert torch.equal(press.keep_indices(layer).cpu(), want.expand(*layer.keys.shape[:2], n_kept))


# ----------------------------------------------------------------------------------------------------------------
# Random (methods.md §2.1 "RandomPress"): i.i.d. uniform scores per (row, KV head, token), optionally seeded. The
# press's docstring adds: seeded with ``seed + layer_idx`` (reproducible, different per layer), CPU generator.
# ----------------------------------------------------------------------------------------------------------------


def test_random_is_reproducible_and_seed_dependent(recorded):
    layers = _layers(recorded, "llama")
    assert len(layers) >= 2
    a, b, other = (make_press("random", compression_ratio=0.5, seed=s) for s in (3, 3, 4))
    for layer in layers:
        sa = a.score(layer)
        assert sa.shape == layer.keys.shape[:3] and sa.is_floating_point()
        assert torch.equal(sa, a.score(layer)), "same press, second call: scores changed"
        assert torch.equal(sa, b.score(layer)), "same seed, another press object: scores differ"
        assert not torch.equal(sa, other.score(layer)), "another seed gives the same scores"
        assert torch.equal(a.keep_indices(layer), b.keep_indices(layer))
    # Layers, rows and heads each get their own draw (a shared draw would evict the same positions everywhere).
    s0, s1 = a.score(layers[0]), a.score(layers[1])
    assert not torch.equal(s0, s1), "two layers drew the same scores"
    assert not torch.equal(s0[0], s0[1]), "the two rows drew the same scores"
    assert not torch.equal(s0[:, 0], s0[:, 1]), "the two KV heads drew the same scores"


@pytest.mark.parametrize("model_name", ["llama", "gemma3"])
def test_random_ignores_the_cache_contents(model_name, recorded):
    """The scores depend on the seed, the layer and the shape only: random keys and values (or keys scaled by -3)
    give the same scores and the same kept set."""
    press = make_press("random", compression_ratio=0.5, seed=11)
    for layer in _layers(recorded, model_name):
        gen = torch.Generator().manual_seed(1)
        others = [layer.replace(keys=torch.randn(layer.keys.shape, generator=gen),
                                values=torch.randn(layer.values.shape, generator=gen)),
                  layer.replace(keys=-3 * layer.keys)]
        for other in others:
            assert torch.equal(press.score(other), press.score(layer))
            assert torch.equal(press.keep_indices(other), press.keep_indices(layer))


def test_random_scores_are_uniform_and_kept_sets_unbiased(recorded):
    """Over 300 seeds × 2 rows × 2 heads (1200 draws of 41 scores, 20 kept): the scores look U[0, 1) (mean, quartile
    counts), every position is kept about half the time (binomial bounds at ~4.5 σ), no half of the sequence is
    favoured, and the kept sets of two seeds overlap as independent draws do (20·20/41 ≈ 9.8 on average)."""
    layer = _layers(recorded, "llama")[0]
    n = layer.seq_len
    scores, keeps = [], []
    for seed in range(300):
        press = make_press("random", compression_ratio=0.5, seed=seed)
        s = press.score(layer).double().reshape(-1, n)
        scores.append(s)
        keep = torch.zeros_like(s, dtype=torch.bool)
        keep.scatter_(-1, press.keep_indices(layer).reshape(-1, press.layer_budget(layer)), True)
        keeps.append(keep)
    s = torch.cat(scores)  # (1200, 41)
    keep = torch.cat(keeps)
    draws = keep.shape[0]
    assert bool(((s >= 0) & (s < 1)).all())
    assert abs(float(s.mean()) - 0.5) < 0.01  # sd of the mean ≈ 0.29/√49200 ≈ 0.0013
    quartiles = torch.stack([((s >= q / 4) & (s < (q + 1) / 4)).double().mean() for q in range(4)])
    assert bool(((quartiles - 0.25).abs() < 0.01).all()), quartiles  # sd ≈ 0.002
    p = 20 / 41
    freq = keep.double().mean(dim=0)  # per position
    sd = (p * (1 - p) / draws) ** 0.5  # ≈ 0.0144
    assert bool(((freq - p).abs() < 4.5 * sd).all()), freq
    first, second = keep[:, : n // 2].double().sum(-1).mean(), keep[:, n // 2:].double().sum(-1).mean()
    assert abs(float(first) - 20 * (n // 2) / n) < 0.3 and abs(float(second) - 20 * (n - n // 2) / n) < 0.3
    overlap = (keep[: draws // 2] & keep[draws // 2:]).double().sum(-1).mean()
    assert abs(float(overlap) - 20 * 20 / 41) < 0.5, overlap
