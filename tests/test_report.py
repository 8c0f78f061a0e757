"""Reports over sweep results: leaderboard rows (Markdown + CSV), score-vs-ratio plots and NIAH heatmaps."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from kvsqueeze.evaluation.report import plot_score_vs_ratio, write_report
from kvsqueeze.evaluation.sweep import run_sweep

from eval_helpers import TinyNeedles

pytestmark = pytest.mark.usefixtures("single_thread")

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_runs(tiny_model, tokenizer, tmp_path_factory, single_thread):
    """Two sweeps of the same configuration but different presses (merged into one section), and another length."""
    root = tmp_path_factory.mktemp("results")
    common = dict(benchmark=TinyNeedles(), limit=1, output_dir=root, progress=False)
    model = tiny_model("llama")
    a = run_sweep(model, tokenizer, presses=["knorm", "snapkv"], ratios=[0.25, 0.5],
                  press_options={"snapkv": {"window_size": 8}}, **common)
    b = run_sweep(model, tokenizer, presses=["streaming_llm"], ratios=[0.5], **common)
    c = run_sweep(model, tokenizer, presses=["knorm"], ratios=[0.5], **dict(common, benchmark=TinyNeedles(length=60)))
    return a.directory, b.directory, c.directory


def test_report_files_and_rows(two_runs, tmp_path):
    written = write_report(list(two_runs), tmp_path / "report")
    assert [p.name for p in written["markdown"]] == ["leaderboard.md"]
    assert [p.name for p in written["csv"]] == ["leaderboard.csv"]
    assert len(written["plots"]) == 2  # the two press lists share a section; length 60 gets its own
    for path in written["plots"] + written["heatmaps"]:
        assert path.read_bytes().startswith(PNG), path
    # NIAH heatmaps (TinyNeedles rows carry length and depth): one per press x ratio of each section.
    assert len(written["heatmaps"]) == (1 + 2 * 2 + 1) + (1 + 1)

    with written["csv"][0].open() as f:
        rows = list(csv.DictReader(f))
    keys = [(r["section"].split(" - ")[0], r["press"], float(r["ratio"])) for r in rows]
    first = "tiny_needles (length=100, tasks=['single', 'double'])"
    second = "tiny_needles (length=60, tasks=['single', 'double'])"
    assert keys == [
        (first, "none", 0.0), (first, "knorm", 0.25), (first, "knorm", 0.5), (first, "snapkv", 0.25),
        (first, "snapkv", 0.5), (first, "streaming_llm", 0.5), (second, "none", 0.0), (second, "knorm", 0.5),
    ]
    header = list(rows[0])
    assert header[4:7] == ["double", "single", "average"] and "saved_fraction" in header
    baseline = rows[0]
    assert float(baseline["saved_fraction"]) == 0.0 and float(baseline["cache_bytes"]) > 0
    assert 0.3 < float(rows[2]["saved_fraction"]) < 0.6

    markdown = written["markdown"][0].read_text()
    assert markdown.count("## tiny_needles") == 2
    assert "| press | ratio | double | single | average | cache MB | full MB | saved % | samples |" in markdown
    assert "| none | 0.00 |" in markdown and "| streaming_llm | 0.50 |" in markdown
    assert "score_vs_ratio-" in markdown and "niah-" in markdown


def test_report_refuses_unfinished_or_missing_directories(two_runs, tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((two_runs[0] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        write_report([unfinished], tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        write_report([tmp_path / "nowhere"], tmp_path / "out")
    with pytest.raises(ValueError, match="non-empty"):
        write_report([], tmp_path / "out")
    with pytest.raises(TypeError, match="list of results directories"):
        write_report(str(two_runs[0]), tmp_path / "out")


def test_a_damaged_results_file_is_named(two_runs, tmp_path):
    """A hand-edited metrics.json or predictions.jsonl is named with its line (json's message named no file)."""
    import shutil

    from kvsqueeze.evaluation.sweep import read_predictions

    copy = tmp_path / "copy"
    shutil.copytree(two_runs[0], copy)
    (copy / "metrics.json").write_text('{"rows": [}')
    with pytest.raises(ValueError, match=r"copy/metrics\.json: not valid JSON at line 1, column 11"):
        write_report([copy], tmp_path / "out")
    lines = (copy / "predictions.jsonl").read_text().splitlines(keepends=True)
    (copy / "predictions.jsonl").write_text("".join([lines[0], "not json\n", *lines[1:]]))
    with pytest.raises(ValueError, match=r"predictions\.jsonl: not valid JSON at line 2, column 1"):
        read_predictions(copy / "predictions.jsonl")


def _markdown_rows(path) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in path.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| press |")]


def _markdown_table(path) -> list[dict[str, str]]:
    """The rows of the (first) leaderboard table, keyed by column."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, row, strict=True)) for row in _markdown_rows(path)]


def test_leaderboard_rows_carry_each_configurations_cache_bytes_and_sample_count(two_runs, tmp_path):
    """cache (after compression), full (before) and samples (not predictions: a sample has several questions) are
    those of the row's own configuration in metrics.json, in the Markdown table and the CSV alike."""
    directory = two_runs[0]
    stored = {(r["press"], r["ratio"]): r for r in json.loads((directory / "metrics.json").read_text())["results"]}
    assert all(r["n_samples"] != r["n_predictions"] for r in stored.values())
    assert all(r["cache_bytes"] != r["full_cache_bytes"] for (press, _), r in stored.items() if press != "none")
    written = write_report([directory], tmp_path / "report")

    markdown = _markdown_table(written["markdown"][0])
    assert len(markdown) == len(stored)
    for row in markdown:
        expected = stored[(row["press"], float(row["ratio"]))]
        assert row["cache MB"] == f"{expected['cache_bytes'] / 1e6:.2f}"
        assert row["full MB"] == f"{expected['full_cache_bytes'] / 1e6:.2f}"
        assert row["samples"] == str(expected["n_samples"])
    with written["csv"][0].open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(stored)
    for row in table:
        expected = stored[(row["press"], float(row["ratio"]))]
        assert float(row["cache_bytes"]) == expected["cache_bytes"]
        assert float(row["full_cache_bytes"]) == expected["full_cache_bytes"]
        assert int(row["n_samples"]) == expected["n_samples"]


def test_average_column_is_the_benchmarks_own_average(two_runs, tmp_path):
    """The report shows the ``average`` the benchmark scored (it may weight its tasks, or add breakdown columns
    that are not tasks); it never recomputes it from the columns."""
    directory = tmp_path / two_runs[0].name
    shutil.copytree(two_runs[0], directory)
    data = json.loads((directory / "metrics.json").read_text())
    for row in data["results"]:
        row["metrics"]["average"] = 12.34
    (directory / "metrics.json").write_text(json.dumps(data))
    written = write_report([directory], tmp_path / "report")
    assert {row["average"] for row in _markdown_table(written["markdown"][0])} == {"12.3"}
    with written["csv"][0].open() as f:
        assert {float(row["average"]) for row in csv.DictReader(f)} == {12.34}


def test_score_vs_ratio_plot_draws_ratio_against_score_with_a_dashed_baseline(monkeypatch, tmp_path):
    import matplotlib.axes

    calls = {"plot": [], "axhline": []}
    for name in calls:
        original = getattr(matplotlib.axes.Axes, name)

        def method(self, *args, _original=original, _name=name, **kwargs):
            calls[_name].append((args, kwargs))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(matplotlib.axes.Axes, name, method)
    rows = [{"press": "none", "ratio": 0.0, "metrics": {"average": 80.0}},
            {"press": "knorm", "ratio": 0.5, "metrics": {"average": 40.0}},
            {"press": "knorm", "ratio": 0.25, "metrics": {"average": 60.0}}]
    assert plot_score_vs_ratio(rows, "title", tmp_path / "plot.png").read_bytes().startswith(PNG)
    ((args, kwargs),) = calls["plot"]  # one line per press; the baseline is not one of them
    assert (list(args[0]), list(args[1]), kwargs["label"]) == ([0.25, 0.5], [60.0, 40.0], "knorm")
    ((args, kwargs),) = calls["axhline"]
    assert args[0] == 80.0 and kwargs["linestyle"] == "--"


def test_same_press_with_other_options_gets_its_own_labelled_row(tiny_model, tokenizer, tmp_path):
    """Two directories that differ only in a press's options share a section; each configuration keeps its row,
    labelled with the options that differ (they used to collapse into the first directory's row)."""
    model = tiny_model("llama")
    common = dict(benchmark=TinyNeedles(), presses=["snapkv", "knorm"], ratios=[0.5], limit=1, output_dir=tmp_path,
                  progress=False)
    a = run_sweep(model, tokenizer, press_options={"snapkv": {"window_size": 4, "kernel_size": 1}}, **common)
    b = run_sweep(model, tokenizer, press_options={"snapkv": {"window_size": 16, "kernel_size": 3}}, **common)
    assert a.directory != b.directory
    written = write_report([a.directory, b.directory], tmp_path / "report")
    rows = _markdown_rows(written["markdown"][0])
    assert [r[:2] for r in rows] == [
        ["none", "0.00"], ["knorm", "0.50"], ["snapkv (kernel_size=1, window_size=4)", "0.50"],
        ["snapkv (kernel_size=3, window_size=16)", "0.50"],
    ]
    expected = {(r["press"], r["ratio"], r["press_config"]["window_size"]): r["metrics"]["average"]
                for run in (a, b) for r in run.metrics if r["press"] == "snapkv"}
    with written["csv"][0].open() as f:
        table = [r for r in csv.DictReader(f) if r["press"] == "snapkv"]
    assert [r["press_options"] for r in table] == ["kernel_size=1, window_size=4", "kernel_size=3, window_size=16"]
    assert {("snapkv", 0.5, w): float(r["average"]) for w, r in zip((4, 16), table)} == expected
    heatmaps = written["heatmaps"]
    assert len(heatmaps) == len({p.name for p in heatmaps}) == 4  # baseline, knorm and each snapkv configuration
    assert all(p.is_file() for p in heatmaps)


def test_a_press_recalibrated_between_two_sweeps_keeps_both_rows(tiny_model, tokenizer, tmp_path):
    """A recalibrated artifact (same path, new contents) gives new results in another directory; the report used
    to list one of the two rows only (same press, ratio and options). Each is labelled by its artifact."""
    from conftest import token_ids
    from kvsqueeze.calibration import calibrate

    model = tiny_model("llama")
    artifact = tmp_path / "qfilters.safetensors"
    common = dict(benchmark=TinyNeedles(), presses=["qfilters"], ratios=[0.75], limit=1, output_dir=tmp_path,
                  progress=False, press_options={"qfilters": {"artifact": str(artifact)}})
    runs = []
    for seeds in ((1,), (50, 51)):
        calibrate(model, None, "qfilters", input_ids_batches=[token_ids(96, seed=s) for s in seeds],
                  output=artifact, progress=False)
        runs.append(run_sweep(model, tokenizer, **common))
    assert runs[0].directory != runs[1].directory
    written = write_report([r.directory for r in runs], tmp_path / "report")
    labels = [r[0] for r in _markdown_rows(written["markdown"][0])]
    assert labels[0] == "none" and len(labels) == 3
    assert all(label.startswith("qfilters (artifact=qfilters@") for label in labels[1:]) and labels[1] != labels[2]


def test_ratios_that_round_alike_keep_their_digits(tiny_model, tokenizer, tmp_path):
    run = run_sweep(tiny_model("llama"), tokenizer, TinyNeedles(), ["knorm"], [0.12, 0.125], limit=1,
                    output_dir=tmp_path, progress=False)
    written = write_report([run.directory], tmp_path / "report")
    assert [r[:2] for r in _markdown_rows(written["markdown"][0])] == [
        ["none", "0.00"], ["knorm", "0.12"], ["knorm", "0.125"]]
    names = [p.name for p in written["heatmaps"]]
    assert len(names) == len(set(names)) == 3 and any(n.endswith("-0.125.png") for n in names)
