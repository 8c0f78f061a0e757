"""Presses inside other presses: where the budget is held, what a composition passes on, and what is refused.

* A scorer gives the same selection whether it holds the ratio itself or a wrapper holds it for it (per-layer
  ratios, AdaKV, CriticalKV): scores that depend on the budget (StreamingLLM's window, CriticalKV's two stages)
  read the wrapper's budget.
* A composition passes later presses the original positions of the kept entries: window attention masks the
  future by position, Expected Attention averages RoPE over the positions after the context, and what a press
  protects by position (sinks, SnapKV's window, TOVA's last token) is found by position, not by index; given
  the identity positions, every press selects exactly what it selects from the context itself.
* Combinations that cannot work are refused when the press is built, naming the press.
* The kept count is the exact floor of ``n · (1 − r)``.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

import kvsqueeze
from kvsqueeze import adapter as A
from kvsqueeze.presses import ScorerPress, list_presses, press_class
from kvsqueeze.presses.base import Capabilities, kept_for_ratio
from kvsqueeze.presses.expected_attention import (
    average_rope,
    average_rope_matrix,
    expected_attention,
    query_moments,
    rotate_moments,
)
from kvsqueeze.presses.utils import window_attention
from kvsqueeze.record import record_prefill

from conftest import MODEL_NAMES, token_ids

SEQ_LEN = 48
pytestmark = pytest.mark.usefixtures("single_thread")


def _plain_scorers() -> list[str]:
    """Every registered scorer that runs from the prefill alone with its defaults (no artifact, no eager weights,
    one budget for every layer)."""
    names = []
    for name in list_presses():
        cls = press_class(name)
        caps = getattr(cls, "capabilities", None)
        if not (issubclass(cls, ScorerPress) and isinstance(caps, Capabilities)):
            continue  # wrappers derive their capabilities from the press they wrap
        if caps.calibration or caps.needs_attention_weights or caps.extra_passes or not caps.uniform_layers:
            continue
        names.append(name)
    return names


PLAIN = _plain_scorers()


def _compress(model, ids, press):
    recorded = record_prefill(model, ids, keep_attentions=press.capabilities.needs_attention_weights)
    cache, _ = recorded.compress(press)
    return cache


def _assert_same_cache(a, b, layers, what: str) -> None:
    for i in layers:
        ka, va, la = A.layer_entries(a, i)
        kb, vb, lb = A.layer_entries(b, i)
        assert torch.equal(la, lb), f"{what}: layer {i} head lengths {la.tolist()} vs {lb.tolist()}"
        assert torch.equal(ka, kb) and torch.equal(va, vb), f"{what}: layer {i} kept different entries"


def test_plain_scorers_are_found():
    assert {"knorm", "streaming_llm", "snapkv", "expected_attention", "keydiff"} <= set(PLAIN), PLAIN


@pytest.mark.filterwarnings("ignore:.*counts the value norm a second time")  # the combination is the point here
@pytest.mark.parametrize("model_name", ["llama", "gemma3"])
@pytest.mark.parametrize("name", PLAIN)
def test_budget_held_by_a_wrapper_selects_the_same(name, model_name, tiny_model):
    """``per_layer(p, [r]*L) == p(r)``, ``adakv(p, r) == adakv(p(r))``, ``criticalkv(p, r) == criticalkv(p(r))``:
    the selection does not depend on which press holds the ratio."""
    model = tiny_model(model_name)
    adapter = A.ModelAdapter(model)
    ids = token_ids(SEQ_LEN, seed=21)
    layers = adapter.compressible_layers
    make = kvsqueeze.make_press
    r = 0.5
    pairs = {
        "per_layer": (
            make("per_layer", press=make(name), compression_ratios=[r] * adapter.shape.num_layers),
            make(name, compression_ratio=r),
        ),
        "adakv": (make("adakv", press=make(name), compression_ratio=r), make("adakv", press=make(name, compression_ratio=r))),
        "criticalkv": (
            make("criticalkv", press=make(name), compression_ratio=r),
            make("criticalkv", press=make(name, compression_ratio=r)),
        ),
    }
    for wrapper, (held_by_wrapper, held_by_inner) in pairs.items():
        with torch.inference_mode():
            a = _compress(model, ids, held_by_wrapper)
            b = _compress(model, ids, held_by_inner)
        _assert_same_cache(a, b, layers, f"{wrapper}({name})")


def test_streaming_window_keeps_its_sinks_under_a_wrapper(tiny_model):
    """StreamingLLM's sinks + recent window must follow the budget the wrapper holds (it used to be computed from
    the inner press's unset ratio: the whole sequence, so only a recent window survived and the sinks were lost)."""
    model = tiny_model("llama")
    adapter = A.ModelAdapter(model)
    ids = token_ids(SEQ_LEN, seed=22)
    make = kvsqueeze.make_press
    n = kept_for_ratio(SEQ_LEN, 0.5)
    want = [*range(4), *range(SEQ_LEN - (n - 4), SEQ_LEN)]
    base = record_prefill(model, ids)
    presses = [
        make("per_layer", press=make("streaming_llm", n_sink=4), compression_ratios=[0.5] * adapter.shape.num_layers),
        make("adakv", press=make("streaming_llm", n_sink=4), compression_ratio=0.5),
    ]
    for press in presses:
        with torch.inference_mode():
            cache, _ = base.compress(press)
        for layer in base.layers:
            _, values, lengths = A.layer_entries(cache, layer.layer_idx)
            expected = layer.values[:, :, want].reshape(-1, layer.values.shape[-1])
            assert lengths.unique().tolist() == [n], (type(press).__name__, lengths.tolist())
            assert torch.equal(values, expected), f"{type(press).__name__}: layer {layer.layer_idx}"


def test_criticalkv_stages_follow_the_outer_budget(tiny_model):
    """CriticalKV splits its budget into two stages; inside per-layer ratios or AdaKV the split must use the budget
    the outer press holds (it used the inner press's unset ratio: stage 1 took everything, plain SnapKV)."""
    model = tiny_model("llama")
    adapter = A.ModelAdapter(model)
    ids = token_ids(SEQ_LEN, seed=26)
    make = kvsqueeze.make_press
    snap = dict(window_size=4, kernel_size=3)
    L = adapter.shape.num_layers
    with torch.inference_mode():
        outer = _compress(model, ids, make("per_layer", press=make("criticalkv", press=make("snapkv", **snap)),
                                           compression_ratios=[0.5] * L))
        inner = _compress(model, ids, make("criticalkv", press=make("snapkv", **snap), compression_ratio=0.5))
        plain = _compress(model, ids, make("snapkv", compression_ratio=0.5, **snap))
        ada = _compress(model, ids, make("adakv", press=make("criticalkv", press=make("snapkv", **snap)),
                                         compression_ratio=0.5))
        ada_inner = _compress(model, ids, make("adakv", press=make("criticalkv", press=make("snapkv", **snap),
                                                                   compression_ratio=0.5)))
    layers = adapter.compressible_layers
    _assert_same_cache(outer, inner, layers, "per_layer(criticalkv)")
    _assert_same_cache(ada, ada_inner, layers, "adakv(criticalkv)")
    differs = [not torch.equal(A.layer_entries(inner, i)[1], A.layer_entries(plain, i)[1]) for i in layers]
    assert any(differs), "CriticalKV's second stage changed nothing on any layer: the test would not see the bug"


@pytest.mark.parametrize(
    "inner",
    [
        lambda L: kvsqueeze.make_press("per_layer", press=kvsqueeze.make_press("knorm"), compression_ratios=[0.5] * L),
        lambda L: kvsqueeze.make_press("pyramidkv"),
        lambda L: kvsqueeze.make_press("criticalkv", press=kvsqueeze.make_press("pyramidkv")),
    ],
    ids=["per_layer", "pyramidkv", "criticalkv(pyramidkv)"],
)
@pytest.mark.parametrize("wrapper", ["adakv", "criticalkv", "critical_adakv"])
def test_uniform_ratio_on_a_wrapper_of_per_layer_budgets_is_refused(wrapper, inner):
    """A uniform ratio on the wrapper would replace the per-layer budgets of the press inside, silently."""
    press = inner(4)
    with pytest.raises(ValueError, match=rf"{type(press).__name__}.*gives each layer its own budget"):
        kvsqueeze.make_press(wrapper, press=press, compression_ratio=0.5)
    kvsqueeze.make_press(wrapper, press=press)  # without a ratio of its own it follows the inner budgets


@pytest.mark.parametrize(
    "inner",
    [
        lambda L: kvsqueeze.make_press("per_layer", press=kvsqueeze.make_press("knorm"), compression_ratios=[0.9] * L),
        lambda L: kvsqueeze.make_press("pyramidkv"),
    ],
    ids=["per_layer", "pyramidkv"],
)
def test_per_layer_ratios_over_per_layer_budgets_are_refused(inner):
    """per_layer's ratios would replace the inner press's own per-layer budgets (its allocation silently unused)."""
    press = inner(4)
    with pytest.raises(ValueError, match=rf"wrapped {type(press).__name__} gives each layer its own budget"):
        kvsqueeze.make_press("per_layer", press=press, compression_ratios=[0.1] * 4)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_window_attention_over_kept_entries_masks_by_original_position(model_name, tiny_model):
    """Window attention over a subset of the keys (what an earlier press of a composition kept) equals the
    full window attention restricted to that subset and renormalised: the causal mask follows the kept entries'
    original positions, not their index in the kept list."""
    model = tiny_model(model_name)
    recorded = record_prefill(model, token_ids(SEQ_LEN, seed=23))
    gen = torch.Generator().manual_seed(0)
    w = 8
    for layer in recorded.layers:
        bsz, kv_heads = layer.keys.shape[:2]
        # A different subset per head that always includes entries inside the window (future of some queries).
        keep = torch.stack([torch.randperm(SEQ_LEN, generator=gen)[:30].sort().values for _ in range(kv_heads)])
        keep = keep.unsqueeze(0).expand(bsz, -1, -1)
        gather = keep.unsqueeze(-1).expand(-1, -1, -1, layer.keys.shape[-1])
        subset = layer.replace(
            keys=layer.keys.gather(2, gather), values=layer.values.gather(2, gather), key_positions=keep
        )
        with torch.inference_mode():
            full = window_attention(layer, w)  # (bsz, num_heads, w, SEQ_LEN)
            sub = window_attention(subset, w)  # (bsz, num_heads, w, 30)
        group = full.shape[1] // kv_heads
        cols = keep.repeat_interleave(group, dim=1).unsqueeze(2).expand(-1, -1, w, -1)
        want = full.gather(-1, cols)
        want = want / want.sum(-1, keepdim=True)
        torch.testing.assert_close(sub, want, rtol=1e-5, atol=1e-6)


def test_expected_attention_in_a_composition_averages_rope_after_the_context(tiny_model):
    """After an earlier press removed keys, Expected Attention still averages RoPE over the positions that follow
    the context (not over those that would follow the number of kept keys)."""
    model = tiny_model("llama")
    recorded = record_prefill(model, token_ids(SEQ_LEN, seed=24))
    press = kvsqueeze.make_press("expected_attention", n_sink=0, n_future_positions=64, use_vnorm=False)
    layer = recorded.layers[1]
    keep = torch.arange(0, SEQ_LEN, 2).expand(*layer.keys.shape[:2], -1)  # every other entry
    gather = keep.unsqueeze(-1).expand(-1, -1, -1, layer.keys.shape[-1])
    subset = layer.replace(keys=layer.keys.gather(2, gather), values=layer.values.gather(2, gather), key_positions=keep)
    with torch.inference_mode():
        got = press.score(subset)
        mean, cov = query_moments(layer.queries(rope=False))
        head_dim = mean.shape[-1]
        scores = {}
        for start in (SEQ_LEN, SEQ_LEN // 2):
            rope = average_rope(layer.adapter, layer.layer_idx, start, 64, torch.device("cpu"))
            rot = average_rope_matrix(*rope, head_dim)
            m, c = rotate_moments(rot, mean, cov)
            scores[start] = expected_attention(subset.keys, m, c, layer.adapter.scaling(layer.module))
    torch.testing.assert_close(got, scores[SEQ_LEN], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(scores[SEQ_LEN], scores[SEQ_LEN // 2], rtol=1e-3, atol=0)  # the start matters


def test_composition_chains_selections_with_original_positions(tiny_model):
    """``composed[knorm, snapkv]`` keeps what SnapKV selects among KNorm's survivors, with SnapKV's window
    attention masked by original position (checked against the per-step computation)."""
    model = tiny_model("llama")
    recorded = record_prefill(model, token_ids(SEQ_LEN, seed=25))
    first = kvsqueeze.make_press("knorm", compression_ratio=0.5)
    second = kvsqueeze.make_press("snapkv", compression_ratio=0.5, window_size=4, kernel_size=3)
    composed = kvsqueeze.make_press("composed", presses=[first, second])
    for layer in recorded.layers:
        with torch.inference_mode():
            got = composed.keep_indices(layer)
            i1 = first.keep_indices(layer)
            g1 = i1.unsqueeze(-1).expand(-1, -1, -1, layer.keys.shape[-1])
            step = layer.replace(keys=layer.keys.gather(2, g1), values=layer.values.gather(2, g1), key_positions=i1)
            want = i1.gather(-1, second.keep_indices(step))
        assert torch.equal(got, want), f"layer {layer.layer_idx}"
        assert (got.diff(dim=-1) > 0).all()  # positional order


#: Kwargs that make a press's position rules visible on 48 tokens (and SimLayerKV compress every layer).
SMALL = {
    "snapkv": {"window_size": 4, "kernel_size": 3},
    "pyramidkv": {"window_size": 4, "kernel_size": 3},
    "expected_attention": {"n_future_positions": 16},
    "simlayerkv": {"lazy_threshold": 0.0},
    "lagkv": {"lag_size": 8},
}


def _composable() -> list[str]:
    """Every registered press that stands on its own and that a composition accepts at a ratio (no artifact,
    no eager weights)."""
    names = []
    for name in list_presses():
        try:
            press = kvsqueeze.make_press(name, compression_ratio=0.5, **SMALL.get(name, {}))
        except (TypeError, ValueError):
            continue  # wrappers need a press to wrap
        caps = press.capabilities
        if type(press).keep_indices is kvsqueeze.Press.keep_indices or caps.headwise:
            continue  # no same-count-per-head selection
        if caps.calibration or caps.needs_attention_weights or caps.extra_passes or caps.changes_positions:
            continue
        if "decoding" in caps.phases:
            continue  # must be the outermost press
        names.append(name)
    return names


COMPOSABLE = _composable()


def _subset(layer, keep: torch.Tensor):
    """``layer`` as a later press of a composition sees it when the earlier ones kept ``keep`` (kv_heads, n)."""
    keep = keep.expand(layer.keys.shape[0], -1, -1)
    gather = keep.unsqueeze(-1).expand(-1, -1, -1, layer.keys.shape[-1])
    return layer.replace(keys=layer.keys.gather(2, gather), values=layer.values.gather(2, gather), key_positions=keep)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("name", COMPOSABLE)
def test_identity_positions_select_what_the_context_order_selects(name, model_name, tiny_model):
    """Handed every entry with its own positions (``key_positions = 0…n-1``), a press takes its by-position path
    and must select exactly what it selects from the context in order."""
    assert {"snapkv", "tova", "expected_attention", "streaming_llm", "simlayerkv"} <= set(COMPOSABLE), COMPOSABLE
    recorded = record_prefill(tiny_model(model_name), token_ids(SEQ_LEN, seed=26))
    press = kvsqueeze.make_press(name, compression_ratio=0.5, **SMALL.get(name, {}))
    for layer in recorded.layers:
        identity = torch.arange(SEQ_LEN).expand(*layer.keys.shape[:2], -1)
        with torch.inference_mode():
            want = press.keep_indices(layer)
            got = press.keep_indices(layer.replace(key_positions=identity))
        assert want is not None and got is not None, f"layer {layer.layer_idx} kept everything"
        assert torch.equal(got, want), f"layer {layer.layer_idx}: {got.tolist()} vs {want.tolist()}"


def _first_stage(kv_heads: int) -> torch.Tensor:
    """What an earlier press kept, ``(kv_heads, 36)`` ascending, different per head: two of the four first
    positions, every other one of the last eight (head 0 loses the last position, head 1 keeps it), and six
    positions removed from the middle."""
    rows = []
    for h in range(kv_heads):
        dropped = {h % 4, (h + 2) % 4}
        dropped |= {p for p in range(SEQ_LEN - 8, SEQ_LEN) if (p + h) % 2 == 1}
        dropped |= {10 + 5 * i + h % 3 for i in range(6)}
        rows.append(torch.tensor([p for p in range(SEQ_LEN) if p not in dropped]))
    return torch.stack(rows)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_a_later_press_protects_by_position(model_name, tiny_model):
    """After an earlier press removed some sinks, some of the last tokens and some of the middle, a later press
    raises exactly the kept entries its rule names by position (it used to raise the first or last stored
    entries, whatever their position): SnapKV's and PyramidKV's window (the last 4 positions), TOVA's last
    position, Expected Attention's sinks (positions < 4, also left out of its softmax). Attention-derived scores
    are at most 1 (use_vnorm=False for Expected Attention), raised ones above 1."""
    recorded = record_prefill(tiny_model(model_name), token_ids(SEQ_LEN, seed=27))
    make = kvsqueeze.make_press
    rules = {
        "snapkv": (make("snapkv", compression_ratio=0.5, window_size=4, kernel_size=3), lambda p: p >= SEQ_LEN - 4),
        "pyramidkv": (make("pyramidkv", compression_ratio=0.5, window_size=4, kernel_size=3), lambda p: p >= SEQ_LEN - 4),
        "tova": (make("tova", compression_ratio=0.5), lambda p: p == SEQ_LEN - 1),
        "expected_attention": (
            make("expected_attention", compression_ratio=0.5, n_future_positions=16, use_vnorm=False, n_sink=4),
            lambda p: p < 4,
        ),
    }
    for layer in recorded.layers:
        keep = _first_stage(layer.keys.shape[1])
        step = _subset(layer, keep)
        for name, (press, rule) in rules.items():
            with torch.inference_mode():
                scores = press.score(step)[0]  # (kv_heads, 36)
            for h in range(keep.shape[0]):
                protected = rule(keep[h])
                raised = scores[h] > 1
                assert torch.equal(raised, protected), (
                    f"{name}, layer {layer.layer_idx}, head {h}: raised positions {keep[h][raised].tolist()}, "
                    f"expected {keep[h][protected].tolist()}"
                )
                if name == "expected_attention":  # a distribution over the non-sinks, averaged over the group
                    total = scores[h][~protected].sum()
                    torch.testing.assert_close(total, torch.tensor(1.0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv"])
def test_a_later_window_longer_than_the_kept_entries_shrinks_to_them(name, tiny_model):
    """After an earlier press kept 10 entries, a 16-token window shrinks to 9 queries (as in a prefill of 10
    entries) instead of failing: every query then sees a stored key, and the scores stay finite."""
    recorded = record_prefill(tiny_model("llama"), token_ids(SEQ_LEN, seed=29))
    make = kvsqueeze.make_press
    composed = make("composed", presses=[make("knorm", budget=10), make(name, budget=5, window_size=16)])
    for layer in recorded.layers:
        with torch.inference_mode():
            kept = composed.keep_indices(layer)
            first = make("knorm", budget=10).keep_indices(layer)
            scores = make(name, budget=5, window_size=16).score(_subset(layer, first[0]))
        assert kept.shape[-1] == 5
        assert torch.isfinite(scores).all(), f"layer {layer.layer_idx}"


def test_tova_after_an_earlier_press_scores_each_token_by_position(tiny_model):
    """TOVA averages a token's attention over all query heads. After a per-head press, index j holds a different
    token in each KV head: the average is taken by position, so one head's choice does not depend on which other
    tokens the other heads hold (it used to average unrelated tokens that shared an index)."""
    recorded = record_prefill(tiny_model("llama"), token_ids(SEQ_LEN, seed=30))
    press = kvsqueeze.make_press("tova", budget=4)
    head1 = torch.tensor([0, 5, 9, 13, 17, 21, 25, SEQ_LEN - 1])
    choices = []
    for head0 in (torch.tensor([1, 2, 3, 4, 6, 7, 8, SEQ_LEN - 1]), torch.tensor([*range(10, 17), SEQ_LEN - 1])):
        layer = recorded.layers[1]
        keep = torch.stack([head0, head1] + [head1] * (layer.keys.shape[1] - 2))
        with torch.inference_mode():
            choices.append(keep[1][press.keep_indices(_subset(layer, keep))[0, 1]].tolist())
    assert choices[0] == choices[1] and choices[0][-1] == SEQ_LEN - 1, choices


@pytest.mark.parametrize("name", ["streaming_llm", "simlayerkv"])
def test_a_later_press_keeps_the_sinks_it_finds_and_the_most_recent(name, tiny_model):
    """StreamingLLM (and SimLayerKV's lazy layers) after an earlier press: the kept entries at positions < 4 and
    the most recent kept entries, filling the budget (it used to keep the first four stored entries)."""
    recorded = record_prefill(tiny_model("llama"), token_ids(SEQ_LEN, seed=28))
    fields = {"n_sink": 4} if name == "streaming_llm" else {"n_initial": 4, "lazy_threshold": 0.0}
    press = kvsqueeze.make_press(name, budget=12, **fields)
    for layer in recorded.layers:
        keep = _first_stage(layer.keys.shape[1])
        with torch.inference_mode():
            got = keep.gather(-1, press.keep_indices(_subset(layer, keep))[0])  # kept positions
        for h in range(keep.shape[0]):
            sinks = keep[h][keep[h] < 4]
            want = torch.cat([sinks, keep[h][-(12 - len(sinks)):]])
            assert got[h].tolist() == want.tolist(), f"layer {layer.layer_idx}, head {h}"


@pytest.mark.parametrize(
    "build",
    [
        lambda: kvsqueeze.make_press("adakv", press=kvsqueeze.make_press("knorm"), compression_ratio=0.5),
        lambda: kvsqueeze.make_press("critical_adakv", press=kvsqueeze.make_press("knorm"), compression_ratio=0.5),
        lambda: kvsqueeze.make_press("kvzip", compression_ratio=0.5),
    ],
    ids=["adakv", "critical_adakv", "kvzip"],
)
@pytest.mark.parametrize("position", [0, 1])
def test_composition_refuses_headwise_and_extra_pass_presses(build, position):
    """They keep different counts per head (or score with extra model passes): a later press would be handed
    packed entries as if they were dense, which used to fail mid-prefill with a shape error."""
    inner = build()
    other = kvsqueeze.make_press("knorm", compression_ratio=0.5)
    presses = [inner, other] if position == 0 else [other, inner]
    with pytest.raises(ValueError, match=rf"presses\[{position}\] \({type(inner).__name__}\) cannot be chained"):
        kvsqueeze.make_press("composed", presses=presses)


@pytest.mark.parametrize("name", ["criticalkv", "critical_adakv", "expected_attention", "expected_attention_stats"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.1])
def test_epsilon_must_be_finite_and_non_negative(name, value):
    with pytest.raises(ValueError, match=rf"epsilon.*{value!r}"):
        kvsqueeze.make_press(name, epsilon=value)


def test_kept_count_is_the_exact_floor():
    """``⌊n·(1 − r)⌋`` of the decimal ratio, not of its binary rounding (``20·(1 − 0.9)`` is 1.999… in floats)."""
    assert kept_for_ratio(20, 0.9) == 2 and kept_for_ratio(10, 0.8) == 2
    for r in (0.1, 0.2, 0.25, 0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.875, 0.9, 0.95):
        exact = 1 - Fraction(str(r))
        for n in range(1, 2049):
            assert kept_for_ratio(n, r) == min(n, max(1, int(n * exact))), (n, r)


@pytest.mark.filterwarnings("ignore:.*counts the value norm a second time")  # the combination is the point here
@pytest.mark.parametrize("inner", ["knorm", "keydiff", "expected_attention"])
def test_critical_adakv_splits_the_budget_like_adakv(inner, tiny_model):
    """CriticalAdaKV gives each head the budget AdaKV's rule gives on the wrapped press's own scores; it used to
    split on scores shifted per head to be non-negative, which moves budget between heads for scorers with
    negative scores (KNorm, KeyDiff)."""
    model = tiny_model("llama")
    adapter = A.ModelAdapter(model)
    ids = token_ids(SEQ_LEN, seed=27)
    make = kvsqueeze.make_press
    with torch.inference_mode():
        ada = _compress(model, ids, make("adakv", press=make(inner), compression_ratio=0.5))
        critical = _compress(model, ids, make("critical_adakv", press=make(inner), compression_ratio=0.5))
    for i in adapter.compressible_layers:
        assert torch.equal(A.layer_head_lengths(critical, i), A.layer_head_lengths(ada, i)), f"layer {i}"


@pytest.mark.parametrize("wrapper", ["criticalkv", "critical_adakv"])
def test_criticalkv_warns_when_the_value_norm_is_counted_twice(wrapper):
    with pytest.warns(UserWarning, match="value norm a second time"):
        kvsqueeze.make_press(wrapper, press=kvsqueeze.make_press("expected_attention"))
