"""Invariants of every registered press on six tiny seeded models (Llama GQA, Gemma3 hybrid, Qwen3 QK-norm,
Mistral, Qwen2 with projection biases, Phi-3 with fused qkv and partial rotary).

For each press of the matrix (``tests/press_matrix.py``) and each model:

* ratio 0 gives a cache bit-identical to no press;
* the kept count per layer is exact (``⌊L · (1 - r)⌋``, chained for compositions, ``min(budget, L)``), per-layer
  budgets sum to the uniform total, sliding-window layers are untouched;
* the kept entries are exactly the top-scored ones, in positional order (re-rotated keys sit at ``0 … n-1``);
* a recorded prefill compresses to exactly the cache the hooks produce;
* hooks are gone after the block, also when it raises;
* the next token gets the position it would have had without compression (or ``n_kept`` for presses that change
  positions).
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from transformers.cache_utils import DynamicLayer

import kvsqueeze
from kvsqueeze import adapter as A
from kvsqueeze.presses import ScorerPress, keep_top
from kvsqueeze.presses.base import Capabilities, LayerInputs, Press
from kvsqueeze.record import record_prefill

from conftest import MODEL_NAMES, ForwardCounter, hook_counts, prefill, token_ids
from press_matrix import CASES, FIRST_CASES, PRESS_KWARGS, PROTECTED, RATIOS, ROW_DEPENDENT, WRAPPERS, PressCase

SEQ_LEN = 48

pytestmark = pytest.mark.usefixtures("single_thread")

case_params = [pytest.param(c, id=c.id) for c in CASES]
first_case_params = [pytest.param(c, id=c.id) for c in FIRST_CASES]


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def setup(model_for, calibration_artifact):
    """``setup(case, model_name, ratio=..., budget=...) -> (press, expected_kept, model)``."""

    def make(case: PressCase, model_name: str, ratio: float | None = 0.0, budget: int | None = None):
        press, expected = case.build(ratio, budget, artifact=lambda method: calibration_artifact(model_name, method))
        return press, expected, model_for(model_name, press)

    return make


def assert_layers_equal(a, b, layers=None, what: str = "") -> None:
    layers = range(len(a.layers)) if layers is None else layers
    for i in layers:
        ka, va, la = A.layer_entries(a, i)
        kb, vb, lb = A.layer_entries(b, i)
        assert torch.equal(la, lb), f"{what}layer {i}: entries per head {la.tolist()} vs {lb.tolist()}"
        assert ka.shape == kb.shape, f"{what}layer {i}: keys {tuple(ka.shape)} vs {tuple(kb.shape)}"
        assert torch.equal(ka, kb), f"{what}layer {i}: keys differ"
        assert torch.equal(va, vb), f"{what}layer {i}: values differ"
        assert a.layers[i].get_seq_length() == b.layers[i].get_seq_length(), f"{what}layer {i}: logical length"


def match_rows(kept: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Index in ``full`` ``(bsz, heads, L, d)`` of every row of ``kept`` ``(bsz, heads, n, d)`` (exact match)."""
    eq = (kept.unsqueeze(3) == full.unsqueeze(2)).all(dim=-1)  # (bsz, heads, n, L)
    hits = eq.sum(dim=-1)
    assert (hits == 1).all(), f"kept rows not found exactly once among the original rows ({hits.unique().tolist()})"
    return eq.float().argmax(dim=-1)


def assert_top_scored(idx: torch.Tensor, scores: torch.Tensor, what: str) -> None:
    """Kept ``idx`` ``(bsz, heads, n)`` hold top scores: every kept score >= every dropped score, per head."""
    seq_len = scores.shape[-1]
    kept_mask = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, idx, True)
    if idx.shape[-1] == seq_len:
        return
    lowest_kept = scores.masked_fill(~kept_mask, float("inf")).amin(dim=-1)
    highest_dropped = scores.masked_fill(kept_mask, float("-inf")).amax(dim=-1)
    bad = lowest_kept < highest_dropped
    assert not bad.any(), (
        f"{what}: a dropped entry scores higher than a kept one "
        f"(lowest kept {lowest_kept[bad].tolist()} < highest dropped {highest_dropped[bad].tolist()})"
    )


def assert_positional_order(idx: torch.Tensor, what: str) -> None:
    assert (idx[..., 1:] > idx[..., :-1]).all(), f"{what}: kept entries are not in increasing positional order"


# ----------------------------------------------------------------------------------------------------------------
# The matrix itself
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", case_params)
def test_matrix_covers_every_press(case: PressCase, setup):
    """Every registered press is buildable from the matrix (an unlisted one from defaults + ratio)."""
    assert case.error is None, case.error
    press, expected = setup(case, "llama", ratio=0.5)[:2]
    assert isinstance(press.capabilities, Capabilities)
    assert expected(SEQ_LEN) < SEQ_LEN


def test_matrix_names_are_registered():
    """Stale matrix entries (a renamed or removed press) fail instead of silently testing nothing."""
    registered = set(kvsqueeze.list_presses())
    stale = (set(PRESS_KWARGS) | set(WRAPPERS)) - registered
    assert not stale, f"tests/press_matrix.py lists presses that are not registered: {sorted(stale)}"
    assert {c.name for c in CASES} == registered


# ----------------------------------------------------------------------------------------------------------------
# Ratio 0, kept counts, sliding layers
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("case", case_params)
def test_ratio_zero_is_bit_identical(case, model_name, setup):
    press, _, model = setup(case, model_name, ratio=0.0)
    ids = token_ids(SEQ_LEN, seed=1)
    base, _, base_logits = prefill(model, ids)
    cache, report, logits = prefill(model, ids, press)
    assert_layers_equal(cache, base, what=f"{case.id} at ratio 0: ")
    assert torch.equal(logits, base_logits)
    assert report.measured_ratio == 0.0


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("budget", [SEQ_LEN, 10 * SEQ_LEN])
@pytest.mark.parametrize("case", first_case_params)
def test_budget_at_least_length_is_bit_identical(case, model_name, budget, setup):
    press, _, model = setup(case, model_name, ratio=None, budget=budget)
    ids = token_ids(SEQ_LEN, seed=2)
    base, _, _ = prefill(model, ids)
    cache, _, _ = prefill(model, ids, press)
    assert_layers_equal(cache, base, what=f"{case.id} with budget {budget} >= {SEQ_LEN}: ")


def check_lengths(case, press, expected_kept, model, cache, base, report, seq_len: int, compressed: bool = True):
    """Kept counts, logical lengths, untouched sliding layers and the report, for one compressed prefill."""
    adapter = A.ModelAdapter(model)
    caps = press.capabilities
    full = adapter.compressible_layers
    n_layers = len(cache.layers)
    assert len(base.layers) == n_layers
    counts = {}
    for i in range(n_layers):
        if i not in full:  # sliding-window layer: the very same tensors as without a press
            assert_layers_equal(cache, base, [i], what=f"{case.id} sliding ")
            assert type(cache.layers[i]) is type(base.layers[i])
            continue
        k, v, lengths = A.layer_entries(cache, i)
        kb, _ = A.layer_kv(base, i)
        if caps.headwise:  # heads keep different counts: the layer's mean per head is the budget
            n = float(lengths.double().mean())
            assert bool((lengths >= 1).all()), f"{case.id} layer {i}: a head kept nothing ({lengths.tolist()})"
        else:
            assert bool((lengths == lengths.reshape(-1)[0]).all()), f"{case.id} layer {i}: ragged {lengths.tolist()}"
            n = A.layer_physical_length(cache, i)
        counts[i] = n
        assert tuple(lengths.shape) == tuple(kb.shape[:2]) and k.shape[-1] == kb.shape[-1] and v.shape[0] == k.shape[0]
        assert k.dtype == kb.dtype and k.device == kb.device
        logical = cache.layers[i].get_seq_length()
        assert logical == seq_len, f"{case.id} layer {i}: logical length {logical}, stored {n}, context {seq_len}"
    want = expected_kept(seq_len)
    per_layer = getattr(expected_kept, "per_layer", None)  # a case that knows each layer's own budget
    if per_layer is not None:
        assert counts == {i: per_layer(seq_len, i) for i in full}, f"{case.id}: kept per layer {counts}"
    if caps.uniform_layers:
        assert counts == {i: want for i in full}, f"{case.id}: kept per layer {counts}, expected {want} each"
    else:
        assert all(1 <= n <= seq_len for n in counts.values()), counts
        total = sum(counts.values())
        assert abs(total - want * len(full)) <= len(full), (
            f"{case.id}: non-uniform budgets total {total}, uniform total {want * len(full)} (±{len(full)})"
        )
    if report is not None:
        assert report.kept == counts, f"report.kept {report.kept} vs cache {counts}"
        assert report.seen == {i: seq_len for i in full}
        assert set(report.bytes_before) == set(full)
        kb, vb = A.layer_kv(base, full[0])
        assert report.bytes_before[full[0]] == kb.numel() * kb.element_size() + vb.numel() * vb.element_size()
    return counts


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("case", case_params)
def test_kept_count_per_layer(case, model_name, ratio, setup):
    seq_len = 53  # not a multiple of 4: int() rounding is exercised
    press, expected, model = setup(case, model_name, ratio=ratio)
    ids = token_ids(seq_len, seed=3)
    base, _, _ = prefill(model, ids)
    cache, report, _ = prefill(model, ids, press)
    counts = check_lengths(case, press, expected, model, cache, base, report, seq_len)
    if not press.capabilities.uniform_layers and len(counts) >= 2 and ratio == 0.5:
        assert len(set(counts.values())) > 1, f"{case.id} declares uniform_layers=False but kept {counts}"
    # Physically smaller: the kept entries own their storage (memory is really freed, not a view of the full cache).
    for i, n in counts.items():
        if n < seq_len:
            layer = cache.layers[i]
            k, v = (layer.ctx_keys, layer.ctx_values) if A.is_ragged_layer(cache, i) else A.layer_kv(cache, i)
            assert k.untyped_storage().nbytes() == k.numel() * k.element_size(), f"layer {i}: keys are a view"
            assert v.untyped_storage().nbytes() == v.numel() * v.element_size(), f"layer {i}: values are a view"


@pytest.mark.parametrize("seq_len", [1, 2, 3])
@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("case", first_case_params)
def test_short_context_keeps_at_least_one_entry(case, model_name, seq_len, setup):
    """At ratio 0.75 a 1-3 token context would round to zero entries: every head keeps at least one."""
    press, expected, model = setup(case, model_name, ratio=0.75)
    assert expected(seq_len) == 1
    ids = token_ids(seq_len, seed=15)
    base, _, _ = prefill(model, ids)
    cache, report, _ = prefill(model, ids, press)
    check_lengths(case, press, expected, model, cache, base, report, seq_len)
    adapter = A.ModelAdapter(model)
    with torch.inference_mode(), press(model):
        out = model(input_ids=torch.tensor([[9]]), use_cache=True, **adapter.model_call_kwargs(cache))
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("budget", [1, 20])
@pytest.mark.parametrize("case", case_params)
def test_budget_keeps_absolute_count(case, model_name, budget, setup):
    press, expected, model = setup(case, model_name, ratio=None, budget=budget)
    ids = token_ids(SEQ_LEN, seed=4)
    base, _, _ = prefill(model, ids)
    cache, report, _ = prefill(model, ids, press)
    check_lengths(case, press, expected, model, cache, base, report, SEQ_LEN)


@pytest.mark.parametrize("name", sorted(PRESS_KWARGS))
def test_budget_validation_names_the_value(name):
    if name not in kvsqueeze.list_presses():
        pytest.fail(f"{name} is in the matrix but not registered")
    kwargs = dict(PRESS_KWARGS[name][0])
    with pytest.raises(ValueError, match=r"0\.5.*\b4\b"):
        kvsqueeze.make_press(name, compression_ratio=0.5, budget=4, **kwargs)
    with pytest.raises(ValueError, match=r"budget.*\b0\b"):
        kvsqueeze.make_press(name, budget=0, **kwargs)
    with pytest.raises(TypeError, match=r"budget.*2\.5"):
        kvsqueeze.make_press(name, budget=2.5, **kwargs)
    with pytest.raises(TypeError, match=r"budget.*True"):
        kvsqueeze.make_press(name, budget=True, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Kept entries are the top-scored ones, in positional order
# ----------------------------------------------------------------------------------------------------------------


def _plain_scorer(press: Press) -> bool:
    """A ScorerPress using the base top-k selection (the contract this test checks)."""
    return isinstance(press, ScorerPress) and type(press).compress is ScorerPress.compress


def _chain_indices(presses: list[Press], layer: LayerInputs) -> torch.Tensor:
    """Indices into ``layer`` kept by applying ``presses`` one after the other (each on what the last kept, with
    the kept entries' original positions)."""
    current = torch.arange(layer.seq_len).expand(*layer.keys.shape[:2], layer.seq_len)
    for i, p in enumerate(presses):
        step = layer if i == 0 else layer.replace(
            keys=_gather(layer.keys, current), values=_gather(layer.values, current), attentions=None,
            key_positions=current,
        )
        n = p.layer_budget(step)
        if n >= step.seq_len:
            continue
        scores = p.score(step)
        local = keep_top(scores, n)
        assert_top_scored(local, scores, f"composed step {i} ({type(p).__name__})")
        current = current.gather(-1, local)
    return current


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(2, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("case", case_params)
def test_kept_entries_are_top_scored_in_order(case, model_name, ratio, setup):
    press, expected, model = setup(case, model_name, ratio=ratio)
    caps = press.capabilities
    ids = token_ids(SEQ_LEN, seed=5)
    recorded = record_prefill(model, ids, keep_attentions=caps.needs_attention_weights)
    cache, _, _ = prefill(model, ids, press)
    adapter = recorded.adapter
    assert [layer.layer_idx for layer in recorded.layers] == adapter.compressible_layers
    with torch.inference_mode():  # recorded tensors are inference tensors
        if caps.extra_passes:
            checked = _check_reconstruction_selection(case, press, ratio, recorded, ids, cache)
        else:
            checked = _check_selection(case, press, ratio, recorded, cache)
        if hasattr(press, "head_plan"):
            _check_duo_plan(press, recorded, SEQ_LEN)
    assert checked == len(recorded.layers), f"{case.id}: no selection contract checked for this press"


def _check_selection(case, press, ratio, recorded, cache) -> int:
    caps = press.capabilities
    adapter = recorded.adapter
    checked = 0
    for layer in recorded.layers:
        i = layer.layer_idx
        what = f"{case.id} ratio {ratio} layer {i}"
        if caps.headwise:
            checked += _check_headwise_selection(press, layer, cache, what)
            continue
        kept_k, kept_v = A.layer_kv(cache, i)
        if caps.changes_positions:
            # Values are not moved: they identify the kept entries; keys must be the pre-RoPE keys re-rotated to
            # the last n positions of the context, seq_len - n … seq_len - 1.
            idx = match_rows(kept_v, layer.values)
            assert_positional_order(idx, what)
            inner = getattr(press, "press", None)
            if isinstance(inner, ScorerPress):
                assert_top_scored(idx, inner.score(layer), what)
            pre = adapter.key_states(layer.module, layer.hidden_states)  # (bsz, kv_heads, L, d), QK-norm applied
            positions = torch.arange(layer.seq_len - idx.shape[-1], layer.seq_len).unsqueeze(0)
            cos, sin = adapter.rope(i, positions, pre)
            want = A.apply_rope(_gather(pre, idx), cos, sin)
            torch.testing.assert_close(kept_k, want, rtol=1e-4, atol=1e-5, msg=f"{what}: keys not at L-n…L-1")
            checked += 1
            continue
        idx = match_rows(kept_k, layer.keys)
        assert_positional_order(idx, what)
        assert torch.equal(kept_v, _gather(layer.values, idx)), f"{what}: values do not follow their keys"
        if _plain_scorer(press):
            n = press.layer_budget(layer)
            assert idx.shape[-1] == n
            scores = press.score(layer)
            assert scores.shape == layer.keys.shape[:-1], f"{what}: scores {tuple(scores.shape)}"
            assert_top_scored(idx, scores, what)
            checked += 1
        elif hasattr(press, "lazy_mass"):  # SimLayerKV: lazy layers keep sinks + recent, the others everything
            n = press.layer_budget(layer)
            lazy = n < layer.seq_len and bool((press.lazy_mass(layer, n) >= press.lazy_threshold).all())
            n_sink = min(press.n_initial, n)  # sinks, then the most recent n - n_sink (test_simlayerkv.py checks
            recent = range(layer.seq_len - (n - n_sink), layer.seq_len)  # the lazy decision on its own)
            want = torch.tensor([*range(n_sink), *recent]) if lazy else torch.arange(layer.seq_len)
            assert torch.equal(idx, want.expand_as(idx)), f"{what}: lazy={lazy}, kept {idx[0, 0].tolist()}"
            checked += 1
        elif isinstance(getattr(press, "presses", None), list):
            chained = _chain_indices(press.presses, layer)
            assert torch.equal(idx, chained), f"{what}: kept entries differ from chaining the inner presses"
            checked += 1
    return checked


def _check_reconstruction_selection(case, press, ratio, recorded, ids, cache) -> int:
    """KVzip: the cache holds exactly the entries of the global (or per-layer) top reconstruction scores, sinks
    included, and ``heads × layers × n_kept`` of them in all."""
    scores = press.scores(recorded.adapter, ids, A.fork_cache(recorded.cache))
    masks = press.keep_masks(scores, SEQ_LEN)
    layers = recorded.adapter.compressible_layers
    n = press.n_kept(SEQ_LEN)
    heads = recorded.layers[0].keys.shape[1]
    sinks = min(press.n_sink, n)
    kept_scores, dropped_scores = [], []
    for layer in recorded.layers:
        i = layer.layer_idx
        what = f"{case.id} ratio {ratio} layer {i}"
        keys, values, lengths = A.layer_entries(cache, i)
        keep = masks[i]
        assert torch.equal(lengths, keep.sum(-1)), f"{what}: stored {lengths.tolist()} vs {keep.sum(-1).tolist()}"
        assert torch.equal(keys, layer.keys[keep]) and torch.equal(values, layer.values[keep]), what
        assert bool(keep[..., :sinks].all()), f"{what}: a sink was dropped"
        if press.layerwise:
            assert int(keep.sum()) == heads * n, f"{what}: {int(keep.sum())} kept, layer budget {heads * n}"
        free = keep.clone()
        free[..., :sinks] = False
        kept_scores.append(scores[i][free])
        dropped_scores.append(scores[i][~keep])
        if press.layerwise and kept_scores[-1].numel() and dropped_scores[-1].numel():
            assert kept_scores[-1].min() >= dropped_scores[-1].max(), f"{what}: not the layer's top scores"
    total = sum(int(masks[i].sum()) for i in layers)
    assert total == heads * len(layers) * n, f"{case.id}: {total} kept, budget {heads * len(layers) * n}"
    kept_all, dropped_all = torch.cat(kept_scores), torch.cat(dropped_scores)
    if not press.layerwise and kept_all.numel() and dropped_all.numel():
        assert kept_all.min() >= dropped_all.max(), f"{case.id}: a dropped entry outscores a kept one globally"
    return len(recorded.layers)


def _check_duo_plan(press, recorded, seq_len: int) -> None:
    """DuoAttention: streaming heads are those with the lowest calibrated gates, and the model-wide total is the
    budget of ``n_kept`` entries per head."""
    adapter = recorded.adapter
    plan = press.head_plan(adapter, seq_len)
    gates = press.gates(adapter)
    layers = adapter.compressible_layers
    streaming = plan.streaming[layers]
    g = gates[layers]
    if streaming.any() and (~streaming).any():
        assert g[streaming].max() <= g[~streaming].min(), "a streaming head has a higher gate than a retrieval head"
    total = int(plan.kept(seq_len)[layers].sum())
    assert total == press.n_kept(seq_len) * streaming.numel(), f"plan keeps {total}"


def _check_headwise_selection(press, layer, cache, what: str) -> int:
    """Head-wise presses: the cache stores exactly ``keys[keep_mask]`` (hence in positional order), the layer keeps
    ``heads × n_kept`` entries per sequence, and the mask follows the press's selection rule."""
    from kvsqueeze.presses.criticalkv import base_scores

    keys, values, lengths = A.layer_entries(cache, layer.layer_idx)
    keep = press.keep_mask(layer)
    assert torch.equal(lengths, keep.sum(-1)), f"{what}: stored {lengths.tolist()} vs mask {keep.sum(-1).tolist()}"
    assert torch.equal(keys, layer.keys[keep]) and torch.equal(values, layer.values[keep]), f"{what}: entries"
    heads = layer.keys.shape[1]
    if hasattr(press, "head_plan"):  # DuoAttention: retrieval heads keep all, streaming heads sinks + recent
        plan = press.head_plan(layer.adapter, layer.seq_len)
        pos = torch.arange(layer.seq_len)
        for h in range(heads):
            row = keep[0, h]
            if not plan.streaming[layer.layer_idx, h]:
                assert bool(row.all()), f"{what} head {h}: a retrieval head dropped entries"
                continue
            n_s, n_r = int(plan.sinks[layer.layer_idx, h]), int(plan.recent[layer.layer_idx, h])
            assert n_s <= press.n_sink
            want = (pos < n_s) | (pos >= layer.seq_len - n_r)
            assert torch.equal(row, want), f"{what} head {h}: not {n_s} sinks + {n_r} recent"
        return 1
    n = min(press.layer_budget(layer), layer.seq_len)
    assert keep.sum((1, 2)).tolist() == [heads * n] * keep.shape[0], f"{what}: layer total {keep.sum((1, 2))}"
    if n >= layer.seq_len:
        return 1
    scores = base_scores(press.press, layer) if hasattr(press, "epsilon") else press.press.score(layer).float()
    floor = max(1, int(press.alpha_safeguard * n))
    per_head_top = keep_top(scores, floor)
    assert bool((keep.sum(-1) >= floor).all()), f"{what}: a head kept fewer than the safeguard's {floor}"
    if hasattr(press, "epsilon"):  # CriticalAdaKV: two stages inside each head's budget
        vnorm = layer.adapter.value_output_norms(layer.module, layer.values)
        for b in range(keep.shape[0]):
            for h in range(heads):
                n_h = int(keep[b, h].sum())
                n1 = int(n_h * press.first_stage_ratio)
                stage1 = scores[b, h].topk(n1).indices if n1 else torch.empty(0, dtype=torch.long)
                assert keep[b, h, stage1].all(), f"{what} head {h}: stage-1 entry dropped"
                rest = torch.ones(layer.seq_len, dtype=torch.bool)
                rest[stage1] = False
                critical = (scores[b, h] + press.epsilon) * vnorm[b, h]
                kept_rest, dropped = critical[keep[b, h] & rest], critical[~keep[b, h]]
                if kept_rest.numel() and dropped.numel():
                    assert kept_rest.min() >= dropped.max(), f"{what} head {h}: stage 2 is not the top critical"
    else:  # AdaKV: each head keeps its own top entries, then the layer's highest scores across heads
        assert keep.gather(-1, per_head_top).all(), f"{what}: a head lost one of its top {floor} (safeguard)"
        guarded = torch.zeros_like(keep).scatter(-1, per_head_top, True)
        free_kept = scores[keep & ~guarded]
        dropped = scores[~keep]
        if free_kept.numel() and dropped.numel():
            assert free_kept.min() >= dropped.max(), f"{what}: a dropped entry outscores a kept one across heads"
    return 1


def _scores_without_weights(case: PressCase) -> bool:
    """A plain scorer press that can score with or without eager attention weights."""
    from press_matrix import class_capabilities

    cls = kvsqueeze.presses.press_class(case.name)
    caps = class_capabilities(case.name)
    plain = case.builder is None and issubclass(cls, ScorerPress)
    return plain and caps is not None and not caps.needs_attention_weights


#: Plain scorers that read the prefill's eager attention weights when a layer has them (and recompute the window's
#: attention otherwise); every other plain scorer must ignore them (checked below, so this list stays complete).
WINDOW_SCORERS = {"snapkv", "pyramidkv", "tova"}


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("case", [p for p in first_case_params if _scores_without_weights(p.values[0])])
def test_eager_scores_match_recomputed_window(case, model_name, setup, tiny_model):
    """Presses that read eager attention weights when present and recompute them otherwise score the same both ways
    (checks the recomputed queries: RoPE, QK-norm, scaling, GQA grouping). Whether a press reads the weights is
    checked too, with weights replaced by noise: the window scorers' scores must change, the others' must not."""
    press, _, _ = setup(case, model_name, ratio=0.5)
    recorded = record_prefill(tiny_model(model_name, "eager"), token_ids(SEQ_LEN, seed=6), keep_attentions=True)
    noise = torch.Generator().manual_seed(6)
    for layer in recorded.layers:
        assert layer.attentions is not None and layer.attentions.shape[-1] == SEQ_LEN
        with torch.inference_mode():
            with_eager = press.score(layer)
            recomputed = press.score(layer.replace(attentions=None))
            noisy = torch.rand(layer.attentions.shape, generator=noise).softmax(-1)
            with_noise = press.score(layer.replace(attentions=noisy.to(layer.attentions.dtype)))
        torch.testing.assert_close(with_eager, recomputed, rtol=1e-4, atol=1e-6)
        reads_weights = not torch.allclose(with_noise, with_eager, rtol=1e-4, atol=1e-6)
        assert reads_weights == (case.name in WINDOW_SCORERS), f"{case.id} layer {layer.layer_idx}"


# ----------------------------------------------------------------------------------------------------------------
# Recorded prefill == hooks
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("case", case_params)
def test_recorded_prefill_equals_hooks(case, model_name, setup):
    press, _, model = setup(case, model_name, ratio=0.5)
    ids = token_ids(SEQ_LEN, seed=7)
    recorded = record_prefill(model, ids, keep_attentions=press.capabilities.needs_attention_weights)
    base, _, _ = prefill(model, ids)
    hooked, hook_report, _ = prefill(model, ids, press)
    if press.capabilities.extra_passes:
        with pytest.raises(ValueError, match="prefill"):
            recorded.compress(press)
        return
    from_record, report = recorded.compress(press)
    assert_layers_equal(from_record, hooked, what=f"{case.id} recorded vs hooks: ")
    assert [type(x) for x in from_record.layers] == [type(x) for x in hooked.layers]
    assert report.kept == hook_report.kept and report.seen == hook_report.seen
    # The recording is untouched, and can be compressed again with the same result.
    assert_layers_equal(recorded.cache, base, what="recording after compress: ")
    again, _ = recorded.compress(press)
    assert_layers_equal(again, hooked, what="second compression of the recording: ")


# ----------------------------------------------------------------------------------------------------------------
# Hooks
# ----------------------------------------------------------------------------------------------------------------


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("case", first_case_params)
def test_hooks_removed_after_block_and_after_exception(case, model_name, setup):
    press, _, model = setup(case, model_name, ratio=0.5)
    adapter = A.ModelAdapter(model)
    before = hook_counts(model)
    ids = token_ids(16, seed=8)
    with press(model):
        inside = hook_counts(model)
        # At least one forward hook on every compressible attention module while the block runs.
        hooked = [len(adapter.attention_modules[i]._forward_hooks) for i in adapter.compressible_layers]
        model(input_ids=ids, use_cache=True, **adapter.model_call_kwargs(adapter.new_cache()))
    assert hook_counts(model) == before
    if press.capabilities.extra_passes:  # scores all layers after the prefill: a hook on the whole model
        assert inside["forward"] > before["forward"], "no forward hook installed"
    else:
        assert inside["forward"] - before["forward"] >= len(adapter.compressible_layers)
        assert min(hooked) >= 1, hooked
    with pytest.raises(_Boom):
        with press(model):
            assert hook_counts(model) == inside
            raise _Boom("raised inside the block")
    assert hook_counts(model) == before
    # An exception inside the forward pass (bad input) also leaves no hooks.
    with pytest.raises(Exception):
        with press(model):
            model(input_ids=torch.full((1, 4), 10_000), use_cache=True)
    assert hook_counts(model) == before
    # Presses do not nest (the inner one would find every layer already compressed and do nothing): a second
    # block on the same model is refused, also of the same press, and also on its inner decoder (model.model: the
    # same layers), or the other way round; closed blocks, raised or not, leave no mark.
    other = kvsqueeze.make_press("knorm", compression_ratio=0.5)
    decoder = adapter.decoder
    assert decoder is not model
    for outer, inner in ((model, model), (model, decoder)):
        with press(outer):
            for second in (other, press):
                with pytest.raises(ValueError, match="already active"):
                    with second(inner):
                        pass
            assert hook_counts(model) == inside
    with other(decoder):  # (KNorm: an artifact is bound to the whole model's fingerprint, not to its decoder's)
        for second in (other, press):
            with pytest.raises(ValueError, match="already active"):
                with second(model):
                    pass
    with other(model):
        pass
    assert hook_counts(model) == before


@pytest.mark.parametrize("case", first_case_params)
def test_padded_batch_is_refused_before_compression(case, setup):
    """A padding mask cannot follow per-head eviction, so a padded prefill under a press is an error naming the
    padded rows, raised before any layer runs; the same batch without padding compresses every row."""
    press, _, model = setup(case, "llama", ratio=0.5)
    ids = token_ids(16, seed=11, batch=3)
    mask = torch.ones_like(ids)
    mask[2, :5] = 0  # left padding on the last row
    with ForwardCounter(model) as counter:
        with pytest.raises(ValueError, match=r"padded batch.*row\(s\) \[2\] of 3"):
            with torch.inference_mode(), press(model):
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
        assert counter.calls == 0, "a layer ran before the padded batch was refused"
    with torch.inference_mode(), press(model) as report:
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    assert report.seen and all(n == 16 for n in report.seen.values())


@pytest.mark.parametrize("case", first_case_params)
def test_bare_forward_is_compressed_and_no_cache_is_refused(case, setup):
    """``model(input_ids)`` with no cache passed (the model makes its own) compresses exactly like a prefill into
    a given cache; a call without a KV cache has nothing to compress and is refused before any layer runs."""
    press, _, model = setup(case, "llama", ratio=0.5)
    ids = token_ids(16, seed=12)
    expected, _, _ = prefill(model, ids, press)
    with torch.inference_mode(), press(model) as report:
        out = model(input_ids=ids)
    assert report.kept, "nothing was compressed"
    assert_layers_equal(A.ModelAdapter.cache_from_output(out), expected, what="bare forward: ")
    with ForwardCounter(model) as counter:
        for call in (lambda: model(input_ids=ids, use_cache=False),
                     lambda: model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, use_cache=False)):
            with pytest.raises(ValueError, match="without a KV cache"):
                with torch.inference_mode(), press(model):
                    call()
    assert counter.calls == 0, "a layer ran before the call without a cache was refused"


@pytest.mark.parametrize("case", first_case_params)
def test_inner_model_calls_are_compressed_and_guarded(case, setup):
    """Calling the causal LM's inner decoder (``model.model``) directly under a press compresses exactly like the
    full model, and its padded batches are refused before any layer runs: the guards sit on the decoder."""
    press, _, model = setup(case, "llama", ratio=0.5)
    adapter = A.ModelAdapter(model)
    ids = token_ids(16, seed=13)
    expected, _, _ = prefill(model, ids, press)
    cache = adapter.new_cache()
    with torch.inference_mode(), press(model) as report:
        model.model(input_ids=ids, use_cache=True, **adapter.model_call_kwargs(cache))
    assert report.kept, "nothing was compressed"
    assert_layers_equal(cache, expected, what="inner model: ")
    ids = token_ids(16, seed=14, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with ForwardCounter(model) as counter:
        with pytest.raises(ValueError, match=r"padded batch.*row\(s\) \[1\] of 2"):
            with torch.inference_mode(), press(model):
                model.model(input_ids=ids, attention_mask=mask, use_cache=True)
    assert counter.calls == 0, "a layer ran before the padded batch was refused"


@pytest.mark.parametrize("case", first_case_params)
def test_a_cache_no_press_compressed_is_refused(case, setup):
    """A press compresses the prefill into an empty cache. A cache that already holds tokens no press compressed
    (a prefix cache, a prefill run before the block) is refused before any layer runs, whatever the call — the
    press would compress nothing. A cache a press compressed, in an earlier block, can be continued inside a block
    (the new tokens are appended, not compressed) with the same logits as outside one."""
    press, _, model = setup(case, "llama", ratio=0.5)
    adapter = A.ModelAdapter(model)
    ids = token_ids(24, seed=15)
    prefix, _, _ = prefill(model, ids[:, :10])
    with ForwardCounter(model) as counter:
        for call in (
            lambda: model(input_ids=ids[:, 10:], use_cache=True, **adapter.model_call_kwargs(A.fork_cache(prefix))),
            lambda: model(input_ids=ids[:, 10:11], use_cache=True, **adapter.model_call_kwargs(A.fork_cache(prefix))),
            lambda: model.generate(input_ids=ids, max_new_tokens=2, do_sample=False,
                                   **adapter.model_call_kwargs(A.fork_cache(prefix))),
        ):
            with pytest.raises(ValueError, match="already holds 10 tokens that no press compressed"):
                with torch.inference_mode(), press(model):
                    call()
    assert counter.calls == 0, "a layer ran before the uncompressed cache was refused"
    compressed, _, _ = prefill(model, ids[:, :16], press)
    follow_up = ids[:, 16:]
    ragged = A.has_ragged_layers(compressed)
    with torch.inference_mode():
        with adapter.aligned_masks(), (A.ragged_attention(model) if ragged else nullcontext()):
            outside = model(input_ids=follow_up, use_cache=True,
                            **adapter.model_call_kwargs(A.fork_cache(compressed))).logits
        with press(model) as report:
            inside = model(input_ids=follow_up, use_cache=True,
                           **adapter.model_call_kwargs(A.fork_cache(compressed))).logits
    assert not report.kept, "the appended tokens were compressed"
    torch.testing.assert_close(inside, outside)


def test_a_block_that_fails_to_open_leaves_nothing_behind(tiny_model, monkeypatch):
    """When installing a guard fails, the guards already installed are removed and the model is not marked: calls
    without a press (and later press blocks) behave as if the block had never been tried."""
    model = tiny_model("llama")
    press = kvsqueeze.make_press("knorm", compression_ratio=0.5)
    before = hook_counts(model)

    def broken(self, *args, **kwargs):
        raise _Boom("generate guard failed")

    monkeypatch.setattr(A.ModelAdapter, "register_generate_guard", broken)
    with pytest.raises(_Boom):
        with press(model):
            pass
    monkeypatch.undo()
    assert hook_counts(model) == before
    ids = token_ids(12, seed=16)
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False)  # no press open: nothing refuses it
        with press(model) as report:
            model(input_ids=ids, use_cache=True)
    assert report.kept


def test_a_press_on_the_bare_decoder(tiny_model):
    """A press opened on a model without ``generate`` (the bare decoder) needs no generate guard; it compresses
    like the causal LM's prefill and leaves no hook behind."""
    model = tiny_model("llama")
    press = kvsqueeze.make_press("knorm", compression_ratio=0.5)
    ids = token_ids(16, seed=17)
    expected, _, _ = prefill(model, ids, press)
    decoder = model.model
    before = hook_counts(decoder)
    cache = A.ModelAdapter(model).new_cache()
    with torch.inference_mode(), press(decoder) as report:
        decoder(input_ids=ids, use_cache=True, **A.ModelAdapter(model).model_call_kwargs(cache))
    assert report.kept
    assert_layers_equal(cache, expected, what="bare decoder: ")
    assert hook_counts(decoder) == before


def test_guarded_generate_keeps_the_methods_signature_and_docstring(tiny_model):
    import inspect

    model = tiny_model("llama")
    with kvsqueeze.make_press("knorm", compression_ratio=0.5)(model):
        assert "generate" in model.__dict__  # the guard is in place
        assert inspect.signature(model.generate) == inspect.signature(type(model).generate.__get__(model))
        assert model.generate.__doc__ == type(model).generate.__doc__ and model.generate.__doc__


def test_two_threads_opening_a_block_on_one_model(tiny_model):
    """Checking for an open block and marking one open happen in one step: of two threads entering at once, one
    gets the block and the other a clear error (or both run one after the other), and the model is left clean."""
    import sys
    import threading

    model = tiny_model("llama")
    press = kvsqueeze.make_press("knorm", compression_ratio=0.5)
    before = hook_counts(model)
    errors: list[Exception] = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(200):
            barrier = threading.Barrier(2)

            def enter():
                barrier.wait()
                try:
                    with press(model):
                        pass
                except ValueError as exc:
                    errors.append(exc)
                except Exception as exc:  # anything else is a bug
                    errors.append(RuntimeError(f"{type(exc).__name__}: {exc}"))

            threads = [threading.Thread(target=enter) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        sys.setswitchinterval(interval)
    assert all(isinstance(e, ValueError) and "already active" in str(e) for e in errors), errors[:3]
    assert hook_counts(model) == before
    assert not hasattr(model, "_kvsqueeze_active_press") and not hasattr(model.model, "_kvsqueeze_active_press")


def test_a_scorer_press_without_a_score_says_what_to_implement(tiny_model):
    with pytest.raises(NotImplementedError, match=r"ScorerPress without a score: subclasses implement score\(layer\)"):
        prefill(tiny_model("llama"), token_ids(16, seed=9), ScorerPress(compression_ratio=0.5))


def test_hooks_removed_when_compression_raises(tiny_model):
    """A press whose compression fails inside the hook leaves no hook behind and propagates the error."""

    class FailingPress(ScorerPress):
        def score(self, layer):
            raise _Boom(f"score failed at layer {layer.layer_idx}")

    model = tiny_model("llama")
    before = hook_counts(model)
    with pytest.raises(_Boom, match="layer 0"):
        prefill(model, token_ids(16, seed=9), FailingPress(compression_ratio=0.5))
    assert hook_counts(model) == before


# ----------------------------------------------------------------------------------------------------------------
# Positions after compression
# ----------------------------------------------------------------------------------------------------------------


def _plain_copy(cache):
    """The same stored tensors in plain ``DynamicLayer`` s (no logical offset: positions must be given)."""
    ref = A.fork_cache(cache)
    for i, layer in enumerate(cache.layers):
        if A.is_compressed_layer(cache, i):
            plain = DynamicLayer()
            plain.update(layer.keys, layer.values)
            ref.layers[i] = plain
    return ref


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("case", case_params)
def test_next_token_position_after_compression(case, model_name, setup):
    press, expected, model = setup(case, model_name, ratio=0.5)
    ids = token_ids(SEQ_LEN, seed=10)
    cache, _, _ = prefill(model, ids, press)
    adapter = A.ModelAdapter(model)
    n_kept = {i: A.layer_physical_length(cache, i) for i in adapter.compressible_layers}
    position = SEQ_LEN  # also for position-changing presses: they keep the context's end fixed
    logical = [layer.get_seq_length() for layer in cache.layers]
    assert cache.get_seq_length() == position, (
        f"{case.id}: the model will place the next token at {cache.get_seq_length()}, expected {position} "
        f"(per-layer logical lengths {logical}, kept {n_kept})"
    )
    assert set(logical) == {position}, f"{case.id}: layers disagree on the next position: {logical}"

    step = torch.tensor([[42]])
    ragged = A.has_ragged_layers(cache)
    with torch.inference_mode(), adapter.aligned_masks(), (A.ragged_attention(model) if ragged else nullcontext()):
        implicit = model(input_ids=step, use_cache=True, **adapter.model_call_kwargs(A.fork_cache(cache))).logits
        explicit = model(
            input_ids=step,
            position_ids=torch.tensor([[position]]),
            use_cache=True,
            **adapter.model_call_kwargs(A.fork_cache(cache)),
        ).logits
        elsewhere = model(
            input_ids=step,
            position_ids=torch.tensor([[position + 7]]),
            use_cache=True,
            **adapter.model_call_kwargs(A.fork_cache(cache)),
        ).logits
        # Ragged layers have no plain-layer equivalent; tests/test_ragged.py compares them with masked dense attention.
        plain = None if ragged else model(
            input_ids=step,
            position_ids=torch.tensor([[position]]),
            use_cache=True,
            **adapter.model_call_kwargs(_plain_copy(cache)),
        ).logits
    torch.testing.assert_close(implicit, explicit, rtol=0, atol=0)
    # The same kept entries in plain layers (every one visible, position given): the compressed layer's mask sizes
    # and offsets let the new token see every kept entry and nothing else.
    if plain is not None:
        torch.testing.assert_close(implicit, plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(implicit, elsewhere, atol=1e-4), "the position of the next token has no effect"


# ----------------------------------------------------------------------------------------------------------------
# Documented promises, batches, dtypes
# ----------------------------------------------------------------------------------------------------------------

protected_params = [pytest.param(c, id=c.id) for c in CASES if c.name in PROTECTED and c.builder is None]


@pytest.mark.parametrize("ratio", [0.25, 0.5])
@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("case", protected_params)
def test_protected_positions_are_kept(case, model_name, ratio, setup):
    """Windows, sinks and last tokens that a press promises to keep are kept (``PROTECTED`` in the matrix)."""
    press, _, model = setup(case, model_name, ratio=ratio)
    ids = token_ids(SEQ_LEN, seed=11)
    recorded = record_prefill(model, ids, keep_attentions=press.capabilities.needs_attention_weights)
    cache, _, _ = prefill(model, ids, press)
    checked = 0
    for layer in recorded.layers:
        kept_k, _ = A.layer_kv(cache, layer.layer_idx)
        idx = match_rows(kept_k, layer.keys)
        n_kept = idx.shape[-1]
        protected = PROTECTED[case.name](press, SEQ_LEN, n_kept)
        if len(protected) > n_kept:
            continue
        for b in range(idx.shape[0]):
            for h in range(idx.shape[1]):
                missing = protected - set(idx[b, h].tolist())
                where = f"{case.id} layer {layer.layer_idx} head {h}"
                assert not missing, f"{where}: protected positions {sorted(missing)} dropped"
        checked += 1
    assert checked, f"{case.id}: no layer could hold the protected positions at ratio {ratio}"


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("case", first_case_params)
def test_batch_rows_are_compressed_independently(case, model_name, setup):
    """A sequence compressed in a batch of two keeps what it keeps alone (no cross-row reduction in the scores)."""
    press, expected, model = setup(case, model_name, ratio=0.5)
    ids = token_ids(40, seed=12, batch=2)
    batched, report, _ = prefill(model, ids, press)
    if press.capabilities.uniform_layers:
        assert set(report.kept.values()) == {expected(40)}, report.kept
    for row in range(2):
        alone, _, _ = prefill(model, ids[row : row + 1], press)
        for i in range(len(alone.layers)):
            k1, v1, n1 = _row_entries(batched, i, row)
            k2, v2, n2 = _row_entries(alone, i, 0)
            assert torch.equal(n1, n2), f"row {row} layer {i}: entries per head {n1.tolist()} vs {n2.tolist()}"
            if case.uses & ROW_DEPENDENT:
                continue  # the same counts, but the choice may differ per row by design
            torch.testing.assert_close(k1, k2, rtol=1e-4, atol=1e-5, msg=f"row {row} layer {i}")
            torch.testing.assert_close(v1, v2, rtol=1e-4, atol=1e-5, msg=f"row {row} layer {i}")


def _row_entries(cache, layer_idx: int, row: int):
    """Packed entries and per-head counts of one batch row (rows are contiguous in the packed layout)."""
    keys, values, lengths = A.layer_entries(cache, layer_idx)
    per_row = lengths.sum(-1)
    start = int(per_row[:row].sum())
    end = start + int(per_row[row])
    return keys[start:end], values[start:end], lengths[row]


@pytest.mark.parametrize("model_name", ["llama", "gemma3"])
@pytest.mark.parametrize("case", first_case_params)
def test_bfloat16_model(case, model_name, setup, tiny_model):
    """Presses run on a bfloat16 model, keep the cache dtype and the exact counts; the next logits stay finite."""
    from conftest import build_model

    press, expected, model32 = setup(case, model_name, ratio=0.5)
    model = build_model(model_name, model32.config._attn_implementation).to(torch.bfloat16)
    ids = token_ids(SEQ_LEN, seed=13)
    base, _, _ = prefill(model, ids)
    cache, report, logits = prefill(model, ids, press)
    check_lengths(case, press, expected, model, cache, base, report, SEQ_LEN)
    assert all(layer.keys.dtype == torch.bfloat16 and layer.values.dtype == torch.bfloat16 for layer in cache.layers)
    assert torch.isfinite(logits).all()
    with torch.inference_mode(), press(model):
        nxt = model(input_ids=torch.tensor([[9]]), use_cache=True, **A.ModelAdapter(model).model_call_kwargs(cache))
    assert torch.isfinite(nxt.logits).all()


# ----------------------------------------------------------------------------------------------------------------
# Wrappers
# ----------------------------------------------------------------------------------------------------------------


def _kept_positions(cache, recorded, layer_pos: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(original indices, RoPE positions) of the kept keys of one layer, head 0 of row 0 (keys matched by value
    rows, positions by the rotation that reproduces each kept key from its pre-RoPE key)."""
    layer = recorded.layers[layer_pos]
    adapter = recorded.adapter
    with torch.inference_mode():
        kept_k, kept_v = A.layer_kv(cache, layer.layer_idx)
        idx = match_rows(kept_v, layer.values)[0, 0]
        pre = adapter.key_states(layer.module, layer.hidden_states)[0, 0]  # (L, d)
        cos, sin = adapter.rope(layer.layer_idx, torch.arange(layer.seq_len)[None], pre[None, None])
        positions = []
        for j, i in enumerate(idx.tolist()):
            at_every = A.apply_rope(pre[i].expand(1, 1, layer.seq_len, -1), cos, sin)[0, 0]  # (L, d)
            positions.append(int((at_every - kept_k[0, 0, j]).norm(dim=-1).argmin()))
    return idx, torch.tensor(positions)


@pytest.mark.parametrize("rerotation_first", [True, False], ids=["rerotation-first", "rerotation-last"])
def test_composition_refuses_position_changing_presses(rerotation_first):
    """Inside a composition, a later press would break re-rotated contiguous positions, and an earlier one hides
    the original positions the re-rotation needs: the composition must refuse rather than misplace keys."""
    rerotated = kvsqueeze.make_press("key_rerotation", press=kvsqueeze.make_press("knorm", compression_ratio=0.5))
    window = kvsqueeze.make_press("streaming_llm", compression_ratio=0.5, n_sink=2)
    presses = [rerotated, window] if rerotation_first else [window, rerotated]
    with pytest.raises(ValueError, match="KeyRerotationPress"):
        kvsqueeze.make_press("composed", presses=presses)


def test_rerotated_keys_sit_at_the_last_positions(tiny_model):
    """Re-rotated keys are contiguous and end at the context's last position, right before the next token."""
    model = tiny_model("llama")
    ids = token_ids(SEQ_LEN, seed=14)
    press = kvsqueeze.make_press("key_rerotation", press=kvsqueeze.make_press("knorm", compression_ratio=0.75))
    cache, _, _ = prefill(model, ids, press)
    n = A.layer_physical_length(cache, 0)
    assert n == int(SEQ_LEN * 0.25) and cache.get_seq_length() == SEQ_LEN
    _, positions = _kept_positions(cache, record_prefill(model, ids))
    assert positions.tolist() == list(range(SEQ_LEN - n, SEQ_LEN)), positions.tolist()


def test_key_rerotation_refuses_non_uniform_inner_press():
    inner = kvsqueeze.make_press("pyramidkv", compression_ratio=0.5)
    assert not inner.capabilities.uniform_layers
    with pytest.raises(ValueError, match="PyramidKVPress"):
        kvsqueeze.make_press("key_rerotation", press=inner)
    with pytest.raises(TypeError, match="NoneType"):
        kvsqueeze.make_press("key_rerotation")


def test_composed_refuses_attention_press_after_the_first():
    first = kvsqueeze.make_press("knorm", compression_ratio=0.5)
    second = kvsqueeze.make_press("observed_attention", compression_ratio=0.5)
    with pytest.raises(ValueError, match=r"presses\[1\].*ObservedAttentionPress"):
        kvsqueeze.make_press("composed", presses=[first, second])
    with pytest.raises(ValueError, match="non-empty"):
        kvsqueeze.make_press("composed", presses=[])
    with pytest.raises(ValueError, match=r"compression_ratio=0\.5"):
        kvsqueeze.make_press("composed", presses=[first], compression_ratio=0.5)


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def scratch_registry():
    """Names registered by a test are removed afterwards, so the matrix of the session is unchanged."""
    from kvsqueeze.presses import registry

    before = dict(registry._REGISTRY)
    yield registry
    registry._REGISTRY.clear()
    registry._REGISTRY.update(before)


def test_registry_checks_names_and_classes(scratch_registry):
    register = scratch_registry.register_press

    class Dummy(ScorerPress):
        def score(self, layer):
            return -layer.keys.float().norm(dim=-1)

    with pytest.raises(ValueError, match="'Bad-Name'"):
        register("Bad-Name")
    with pytest.raises(TypeError, match="int"):
        register("not_a_press")(int)
    with pytest.raises(ValueError, match=r"'knorm'.*KnormPress"):
        register("knorm")(Dummy)
    register("scratch_dummy")(Dummy)
    assert "scratch_dummy" in kvsqueeze.list_presses()
    a, b = kvsqueeze.make_press("scratch_dummy", compression_ratio=0.5), kvsqueeze.make_press("scratch_dummy")
    assert a is not b and a.compression_ratio == 0.5 and b.compression_ratio == 0.0  # fresh instances
    assert kvsqueeze.presses.press_class(" Scratch-Dummy ") is Dummy  # case, dashes and spaces are normalised


def test_matrix_handles_unlisted_presses(scratch_registry):
    """A new press without a matrix entry is tested with its defaults, or fails the matrix if it needs kwargs."""
    import dataclasses

    import press_matrix

    class Defaults(ScorerPress):
        def score(self, layer):
            return layer.keys.float().sum(dim=-1)

    @dataclasses.dataclass
    class NeedsKwargs(ScorerPress):
        required: int = None

        def __post_init__(self):
            super().__post_init__()
            if self.required is None:
                raise TypeError("required must be given")

    scratch_registry.register_press("scratch_defaults")(Defaults)
    scratch_registry.register_press("scratch_needs_kwargs")(NeedsKwargs)
    cases = {c.name: c for c in press_matrix.press_cases()}
    assert cases["scratch_defaults"].error is None and not cases["scratch_defaults"].registered_in_matrix
    press, expected = cases["scratch_defaults"].build(0.5)
    assert isinstance(press, Defaults) and expected(48) == 24
    error = cases["scratch_needs_kwargs"].error
    assert error is not None and "tests/press_matrix.py" in error and "required must be given" in error
    with pytest.raises(AssertionError, match="press_matrix"):
        cases["scratch_needs_kwargs"].build(0.5)


@pytest.mark.parametrize(
    "name, field, value, error",
    [
        ("streaming_llm", "n_sink", -1, ValueError),
        ("streaming_llm", "n_sink", "4", TypeError),
        ("snapkv", "window_size", 0, ValueError),
        ("snapkv", "kernel_size", 2.0, TypeError),
        ("lagkv", "lag_size", 1, ValueError),
        ("expected_attention", "n_future_positions", 0, ValueError),
        ("expected_attention", "n_sink", True, TypeError),
        ("random", "seed", "0", TypeError),
        ("random", "seed", 2**64, ValueError),
        ("random", "seed", -(2**63) - 1, ValueError),
        ("knorm", "budget", 0, ValueError),
    ],
)
def test_bad_integer_fields_name_the_field_and_value(name, field, value, error):
    with pytest.raises(error, match=rf"{field}.*{value!r}"):
        kvsqueeze.make_press(name, **{field: value})
