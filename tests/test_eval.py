"""The ``kvsqueeze eval`` and ``kvsqueeze report`` subcommands, on the tiny llama model (injected in place of
``kvsqueeze.models.load_model``) and the test benchmark ``tiny_needles``."""

from __future__ import annotations

import json

import pytest

from kvsqueeze import cli
from kvsqueeze.evaluation.base import Benchmark, register_benchmark

import eval_helpers  # noqa: F401  registers "tiny_needles"

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def tiny_load(monkeypatch, tiny_model, tokenizer):
    """Replace model loading by the tiny llama; records the names it was asked for."""
    import kvsqueeze.models

    calls = []

    def load(name=None, attn_implementation="sdpa", **kwargs):
        calls.append((name, attn_implementation))
        return tiny_model("llama"), tokenizer

    monkeypatch.setattr(kvsqueeze.models, "load_model", load)
    return calls


def run(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exit_info:  # argparse-level errors exit directly
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_then_report(tiny_load, tmp_path, capsys):
    argv = ["eval", "--benchmark", "tiny_needles", "--length", "80", "--presses", "knorm,snapkv,observed_attention",
            "--ratios", "0.25,0.5", "--limit", "1", "--tasks", "single", "--output-dir", str(tmp_path),
            "--press-option", "snapkv.window_size=8", "--json"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert tiny_load == [("smollm2-135m", "sdpa")]  # one sdpa model; eager presses switch it in place
    assert summary["units_run"] == 1 + 3 * 2 and summary["units_skipped"] == 0
    assert summary["prefills"] == 1 + 2  # the shared recording + observed_attention at each ratio
    assert [(r["press"], r["ratio"]) for r in summary["results"]] == [
        ("none", 0.0), ("knorm", 0.25), ("knorm", 0.5), ("snapkv", 0.25), ("snapkv", 0.5),
        ("observed_attention", 0.25), ("observed_attention", 0.5),
    ]
    directory = summary["directory"]
    with open(f"{directory}/config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert config["benchmark"]["config"] == {"length": 80, "tasks": ["single"]}
    assert config["model"]["name"] == "smollm2-135m"
    snapkv = next(p for p in config["presses"] if p["name"] == "snapkv")
    assert snapkv["press"]["window_size"] == 8

    code, out, err = run(argv[:-1], capsys)  # the same command again: everything is skipped, table printed
    assert code == 0, err
    assert "0 units run, 7 already done" in out
    rows = [line.split() for line in out.splitlines()]
    assert any(r[:2] == ["knorm", "0.25"] for r in rows if len(r) > 1), out  # the results table, one row per unit
    assert "observed_attention" in out.split("prefills (")[1]  # names the presses that got their own prefill

    code, out, err = run(["report", directory, "--output", str(tmp_path / "report")], capsys)
    assert code == 0, err
    assert "| knorm | 0.25 |" in out and "leaderboard.md" in out
    assert (tmp_path / "report" / "leaderboard.csv").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--benchmark", "tiny_needle"], "Did you mean: tiny_needles"),
        (["--presses", "knrom"], "knorm"),
        (["--presses", "knorm,,snapkv"], "--presses"),
        (["--presses", "knorm,knorm"], "duplicates"),
        (["--ratios", "0.5,1"], "'1'"),
        (["--ratios", "abc"], "'abc'"),
        (["--limit", "0"], "--limit"),
        (["--length", "-3"], "--length"),
        (["--tasks", "singel"], "Did you mean: single"),
        (["--press-option", "snapkv.window_size=8"], "not in --presses"),
        (["--press-option", "window_size=8"], "PRESS.KEY=VALUE"),
        (["--press-option", "knorm.compression_ratio=0.1"], "--ratio"),
        (["--seed", "-1"], "--seed"),
    ],
)
def test_bad_eval_input_fails_before_loading_a_model(extra, message, tiny_load, tmp_path, capsys):
    argv = ["eval", "--benchmark", "tiny_needles", "--presses", "knorm", "--output-dir", str(tmp_path)]
    flags = {extra[i]: extra[i + 1] for i in range(0, len(extra), 2)}
    for flag, value in flags.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    code, _, err = run(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error:") and message in lines[-1], lines
    assert tiny_load == [], "a model was loaded before the input was validated"
    assert not any(tmp_path.iterdir())


@register_benchmark("tiny_fixed")
class Fixed(Benchmark):
    """A benchmark without options."""

    tasks = ("only",)

    def samples(self, tokenizer, limit=None, seed=0):
        return iter(())

    def score(self, predictions):
        return {"average": 0.0}


def test_length_refused_by_a_benchmark_without_that_option(tiny_load, tmp_path, capsys):
    code, _, err = run(["eval", "--benchmark", "tiny_fixed", "--presses", "knorm", "--length", "512",
                          "--output-dir", str(tmp_path)], capsys)
    assert code == 2 and "no 'length' option" in err and "--length" in err
    assert tiny_load == []


def test_report_of_a_missing_directory(tmp_path, capsys):
    code, _, err = run(["report", str(tmp_path / "nope")], capsys)
    assert code == 2 and "results directory not found" in err and "nope" in err
