"""Needle-in-a-haystack benchmark: the grid, the needle in every context, per-cell scores and the heatmap."""

from __future__ import annotations

import pytest

from kvsqueeze.evaluation import Prediction, make_benchmark
from kvsqueeze.evaluation.niah import NeedleInAHaystack, cell_key, cell_scores, niah_heatmap

LENGTHS = (600, 1200)
DEPTHS = (0.0, 0.5, 1.0)


@pytest.fixture(scope="module")
def grid_samples(tokenizer):
    bench = make_benchmark("niah", lengths=LENGTHS, depths=DEPTHS, n_per_cell=2)
    return bench, list(bench.samples(tokenizer, seed=0))


def test_grid_covers_every_cell_with_the_needle_in_context(grid_samples, tokenizer):
    _, samples = grid_samples
    assert len(samples) == len(LENGTHS) * len(DEPTHS) * 2
    assert {(s.metadata["length"], s.metadata["depth"]) for s in samples} == {(n, d) for n in LENGTHS for d in DEPTHS}
    assert len({s.id for s in samples}) == len(samples)
    for s in samples:
        (value,) = s.answers[0]
        assert s.task == "niah" and len(value) == 7 and value in s.context
        assert f"is {value}." in s.context and s.answer_prefix
        measured = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (s.context, s.questions[0]))
        assert 0.98 * s.metadata["length"] <= measured == s.metadata["n_tokens"] <= s.metadata["length"]


def test_needle_depth_orders_its_position(grid_samples):
    _, samples = grid_samples
    for length in LENGTHS:
        cells = [s for s in samples if s.metadata["length"] == length and s.id.endswith("-0")]
        where = {s.metadata["depth"]: s.context.index("The special magic number") / len(s.context) for s in cells}
        assert where[0.0] == 0 and 0.35 < where[0.5] < 0.65  # first, then mid-way
        deepest = next(s for s in cells if s.metadata["depth"] == 1.0)
        assert deepest.context.endswith(f"is {deepest.answers[0][0]}.")  # last


def test_deterministic_by_seed(tokenizer):
    bench = NeedleInAHaystack(lengths=[600], depths=[0.5], n_per_cell=2)
    a, b = list(bench.samples(tokenizer, seed=1)), list(bench.samples(tokenizer, seed=1))
    c = list(bench.samples(tokenizer, seed=2))
    assert a == b and a != c
    assert len(list(bench.samples(tokenizer, limit=1))) == 1


def test_limit_above_n_per_cell_yields_n_per_cell(tokenizer):
    assert len(list(NeedleInAHaystack(lengths=[600], depths=[0.5]).samples(tokenizer, limit=3))) == 1


def test_samples_of_a_cell_start_their_haystacks_at_different_places(tokenizer):
    first, second = NeedleInAHaystack(lengths=[600], depths=[0.0], n_per_cell=2).samples(tokenizer)

    def after_needle(sample):
        return sample.context.split(f"is {sample.answers[0][0]}.", 1)[1][:200]

    assert after_needle(first) != after_needle(second)


def test_scores_per_cell_length_and_average(grid_samples, tmp_path):
    bench, samples = grid_samples
    # The needle is found in every sample at depth 0 and 1, and in one of the two samples at depth 0.5.
    preds = [
        Prediction.of(s, 0, s.answers[0][0] if s.metadata["depth"] != 0.5 or s.id.endswith("-0") else "not sure")
        for s in samples
    ]
    scores = bench.score(preds)
    for length in LENGTHS:
        assert scores[cell_key(length, 0.0)] == 100 and scores[cell_key(length, 1.0)] == 100
        assert scores[cell_key(length, 0.5)] == 50
        assert scores[f"niah_{length}"] == pytest.approx((100 + 50 + 100) / 3, abs=0.01)
    found = sum(p.answers[0] in p.prediction for p in preds)
    assert scores["niah"] == scores["average"] == pytest.approx(100 * found / len(preds), abs=0.01)
    assert cell_scores(preds)[(600, 0.5)] == 50

    png = niah_heatmap(preds, tmp_path / "plots" / "niah.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png2 = niah_heatmap(scores, tmp_path / "from_scores.png", title="from score()")
    assert png2.stat().st_size > 1000


def _prediction(length: int, depth: float, found: bool) -> Prediction:
    return Prediction(f"niah-{length}-{depth}", "niah", 0, "1234567" if found else "no idea", ("1234567",),
                      {"length": length, "depth": depth})


def test_per_length_score_averages_only_that_lengths_cells():
    scores = NeedleInAHaystack(lengths=[600, 1200], depths=[0.0]).score(
        [_prediction(600, 0.0, True), _prediction(1200, 0.0, False)])
    assert scores["niah_600"] == 100 and scores["niah_1200"] == 0 and scores["niah"] == 50


@pytest.fixture
def drawn(monkeypatch):
    """What heatmaps draw: the last image's values and the x and y tick labels."""
    import matplotlib.axes

    seen = {}

    def spy(name):
        original = getattr(matplotlib.axes.Axes, name)

        def method(self, *args, **kwargs):
            seen[name] = args[0] if name == "imshow" else list(args[1])
            return original(self, *args, **kwargs)

        monkeypatch.setattr(matplotlib.axes.Axes, name, method)

    for name in ("imshow", "set_xticks", "set_yticks"):
        spy(name)
    return seen


def test_heatmap_rows_are_depths_and_columns_lengths(drawn, tmp_path):
    niah_heatmap({(600, 0.0): 0, (1200, 0.0): 100, (600, 1.0): 50, (1200, 1.0): 25}, tmp_path / "h.png")
    assert drawn == {"imshow": [[0, 100], [50, 25]], "set_xticks": ["600", "1200"], "set_yticks": ["0%", "100%"]}


def test_heatmap_from_scores_draws_the_grid_of_the_predictions(grid_samples, drawn, tmp_path):
    """``score()`` names cells by depth in percent (``niah_600_50``); drawn from those scores, the heatmap shows
    the grid drawn from the predictions themselves."""
    bench, samples = grid_samples
    preds = [Prediction.of(s, 0, s.answers[0][0] if s.metadata["depth"] < 1 else "?") for s in samples]
    niah_heatmap(preds, tmp_path / "from_predictions.png")
    from_predictions = dict(drawn)
    niah_heatmap(bench.score(preds), tmp_path / "from_scores.png")
    assert drawn == from_predictions
    assert from_predictions["set_yticks"] == ["0%", "50%", "100%"]


def test_heatmap_rejects_data_without_cells(tmp_path):
    with pytest.raises(ValueError, match="no NIAH cells"):
        niah_heatmap({"ruler": 3.0}, tmp_path / "x.png")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"lengths": [10]}, "lengths must be ints >= 64"),
        ({"lengths": ["1k"]}, "lengths must be ints"),
        ({"depths": [1.5]}, r"depths must be fractions in \[0, 1\]"),
        ({"depths": []}, "at least one value"),
        ({"n_per_cell": 0}, "n_per_cell must be a positive int"),
    ],
)
def test_bad_options_raise_early(options, match):
    with pytest.raises(ValueError, match=match):
        NeedleInAHaystack(**options)


def test_unknown_name_suggests_niah():
    with pytest.raises(KeyError, match="Did you mean: niah"):
        make_benchmark("nia")
