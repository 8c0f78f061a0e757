"""Reports over sweep results: leaderboard rows (Markdown + CSV), score-vs-ratio plots and NIAH heatmaps."""

from __future__ import annotations

import csv

import pytest

from kvsqueeze.evaluation.report import write_report
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
