"""The ``kvsqueeze eval`` and ``kvsqueeze report`` subcommands, on the tiny llama model (injected in place of
``kvsqueeze.models.load_model``) and the test benchmark ``tiny_needles``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvsqueeze import cli
from kvsqueeze.evaluation.base import Benchmark, register_benchmark

from conftest import build_model, build_tokenizer
from eval_helpers import record_answers  # importing eval_helpers registers "tiny_needles"

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


TINY_EVAL = ["eval", "--benchmark", "tiny_needles", "--presses", "knorm", "--ratios", "0.5", "--limit", "1", "--tasks",
             "single", "--json"]


def test_naive_flag_prefills_every_unit(tiny_load, tmp_path, capsys):
    code, out, err = run(TINY_EVAL + ["--output-dir", str(tmp_path), "--naive"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["prefills"] == summary["units_run"] == 2  # baseline and knorm, each its own prefill


def test_seed_flag_reaches_the_sweep(tiny_load, tmp_path, capsys):
    code, out, err = run(TINY_EVAL + ["--output-dir", str(tmp_path), "--seed", "3"], capsys)
    assert code == 0, err
    config = json.loads(Path(json.loads(out)["directory"], "config.json").read_text())
    assert config["seed"] == 3


def test_max_new_tokens_flag_reaches_the_answers(tiny_load, tmp_path, capsys, monkeypatch):
    calls = record_answers(monkeypatch)
    code, out, err = run(TINY_EVAL + ["--output-dir", str(tmp_path), "--max-new-tokens", "3"], capsys)
    assert code == 0, err
    assert len(calls) == 2 and {c["max_new_tokens"] for c in calls} == {3}  # tiny_needles samples ask for 4
    config = json.loads(Path(json.loads(out)["directory"], "config.json").read_text())
    assert config["generation"]["max_new_tokens"] == 3


def test_model_options_load_the_model_with_them(tmp_path, capsys):
    """``--model-option`` reaches the loaded model, and so the results key."""
    folder = tmp_path / "tiny-llama"
    build_model("llama").save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    code, out, err = run(TINY_EVAL + ["--output-dir", str(tmp_path / "results"), "--model", str(folder),
                                      "--model-option", "max_position_embeddings=512"], capsys)
    assert code == 0, err
    config = json.loads(Path(json.loads(out)["directory"], "config.json").read_text())
    assert config["model"]["config_overrides"] == {"max_position_embeddings": 512}


def test_report_goes_next_to_the_results_directories_by_default(tiny_load, tmp_path, capsys):
    code, out, err = run(TINY_EVAL + ["--output-dir", str(tmp_path / "results")], capsys)
    assert code == 0, err
    code, _, err = run(["report", json.loads(out)["directory"]], capsys)
    assert code == 0, err
    assert (tmp_path / "results" / "report" / "leaderboard.md").is_file()


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
        (["--benchmark", "niah", "--lengths", "1000,abc"], "--lengths must be comma-separated ints"),
        (["--benchmark", "niah", "--depths", "0.33333,0.333334"], "both reported as 33.33%"),
        (["--benchmark", "niah", "--n-per-cell", "0"], "--n-per-cell"),
        (["--benchmark", "ruler", "--qa-data-files", "squad.jsonl"], "--qa-data-files takes TASK=PATH"),
        (["--benchmark", "ruler", "--length", "1024", "--qa-data-files", "qa_3=x.jsonl"], "qa_data_files keys"),
        (["--benchmark", "ruler"], "benchmark 'ruler' needs --length"),
        (["--benchmark", "ruler", "--length", "1024", "--lengths", "1000"], "no 'lengths' option"),
        (["--benchmark", "math500", "--data-files", "=x.jsonl"], "--data-files takes PATH or TASK=PATH"),
        (["--benchmark", "math500", "--data-files", "nowhere/math500.jsonl"], "does not exist"),
        (["--benchmark", "niah", "--data-files", "x.jsonl"], "no 'data_files' option"),
        (["--output-dir", f"{__file__}/results"], f"--output-dir {__file__}/results cannot hold results"),  # a file
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


def test_offline_hub_benchmark_fails_before_loading_a_model(unreachable_hub, tiny_load, tmp_path, capsys):
    code, _, err = run(["eval", "--benchmark", "longbench", "--presses", "knorm", "--output-dir", str(tmp_path)],
                       capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and "THUDM/LongBench" in last and "unreachable" in last
    assert tiny_load == [], "the model was loaded before the data was found missing"
    assert not any(tmp_path.iterdir()), "a results directory was created"


def test_requested_ruler_qa_task_offline_fails_before_loading_a_model(unreachable_hub, tiny_load, tmp_path, capsys):
    code, _, err = run(["eval", "--benchmark", "ruler", "--length", "1024", "--tasks", "niah_single_1,qa_1",
                        "--presses", "knorm", "--output-dir", str(tmp_path)], capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and "qa_1 were asked for" in last and "--qa-data-files" in last
    assert tiny_load == [] and not any(tmp_path.iterdir())


@pytest.fixture
def captured_sweep(monkeypatch, tmp_path):
    """``run_sweep`` replaced by a recorder of the benchmark it is given (an empty result, no model work)."""
    import kvsqueeze.evaluation.sweep

    seen = []

    def fake(model, tokenizer, benchmark, presses, ratios, **kwargs):
        seen.append(benchmark)
        return kvsqueeze.evaluation.sweep.SweepResult(tmp_path / "results", [])

    monkeypatch.setattr(kvsqueeze.evaluation.sweep, "run_sweep", fake)
    return seen


def test_benchmark_data_and_grid_flags_reach_the_benchmark(captured_sweep, tiny_load, tmp_path, capsys):
    fixtures = Path(__file__).parent / "fixtures"
    squad = str(fixtures / "ruler" / "squad.jsonl")
    longbench = fixtures / "hub" / "longbench"
    cases = [
        # Lengths within the tiny model's 256 positions (longer ones are refused before any sample is built).
        (["--benchmark", "niah", "--lengths", "100,200", "--depths", "0,0.5", "--n-per-cell", "2"],
         {"lengths": [100, 200], "depths": [0.0, 0.5], "n_per_cell": 2}),
        (["--benchmark", "ruler", "--length", "200", "--tasks", "niah_single_1,qa_1", "--n-samples", "3",
          "--qa-data-files", f"qa_1={squad}"],
         {"length": 200, "tasks": ["niah_single_1", "qa_1"], "n_samples": 3, "qa_data_files": {"qa_1": squad}}),
        (["--benchmark", "math500", "--data-files", str(fixtures / "hub" / "math500"), "--max-context-tokens", "64",
          "--dataset", "someone/MATH-500-parquet"],
         {"dataset": "someone/MATH-500-parquet", "tasks": ["math500"], "data_files": str(fixtures / "hub" / "math500"),
          "max_new_tokens": None, "max_context_tokens": 64}),
        (["--benchmark", "longbench", "--tasks", "trec,hotpotqa", "--data-files", f"trec={longbench / 'trec.jsonl'}",
          "--data-files", f"hotpotqa={longbench / 'hotpotqa.jsonl'}"],
         {"tasks": ["trec", "hotpotqa"],
          "data_files": {"trec": str(longbench / "trec.jsonl"), "hotpotqa": str(longbench / "hotpotqa.jsonl")}}),
    ]
    def paths(value):  # local data files appear in the config with the sha256 of their contents
        if isinstance(value, dict) and set(value) == {"path", "sha256"}:
            assert len(value["sha256"]) == 64
            return value["path"]
        return {k: paths(v) for k, v in value.items()} if isinstance(value, dict) else value

    for flags, expected in cases:
        code, _, err = run(["eval", "--presses", "knorm", "--output-dir", str(tmp_path), *flags], capsys)
        assert code == 0, err
        config = captured_sweep[-1].config()
        assert {k: paths(config[k]) for k in expected} == expected, flags


def test_eval_of_a_hub_benchmark_from_local_files(tiny_load, tmp_path, capsys):
    data = Path(__file__).parent / "fixtures" / "hub" / "math500"
    code, out, err = run(["eval", "--benchmark", "math500", "--data-files", str(data), "--presses", "knorm",
                          "--ratios", "0.5", "--limit", "1", "--max-new-tokens", "2", "--output-dir",
                          str(tmp_path), "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["units_run"] == 2 and [r["press"] for r in summary["results"]] == ["none", "knorm"]
    with open(f"{summary['directory']}/config.json", encoding="utf-8") as f:
        assert json.load(f)["benchmark"]["config"]["data_files"]["path"] == str(data)


def test_data_files_is_one_path_or_task_items(tiny_load, tmp_path, capsys):
    for items in (["a.jsonl", "b.jsonl"], ["a.jsonl", "trec=b.jsonl"]):
        argv = ["eval", "--benchmark", "longbench", "--presses", "knorm", "--output-dir", str(tmp_path)]
        code, _, err = run(argv + [x for item in items for x in ("--data-files", item)], capsys)
        assert code == 2 and err.startswith("error: --data-files takes one PATH or TASK=PATH items"), err
    assert tiny_load == [] and not any(tmp_path.iterdir())


def test_eval_table_keeps_every_digit_of_a_ratio(tiny_load, tmp_path, capsys):
    code, out, err = run(["eval", "--benchmark", "tiny_needles", "--presses", "knorm", "--ratios", "0.12,0.125",
                          "--limit", "1", "--tasks", "single", "--output-dir", str(tmp_path)], capsys)
    assert code == 0, err
    rows = [line.split()[:2] for line in out.splitlines() if line.startswith("knorm")]
    assert rows == [["knorm", "0.12"], ["knorm", "0.125"]]


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


def test_eval_with_a_chunked_prefill_says_nothing_was_shared(tiny_load, tmp_path, capsys):
    """With --prefill-chunk-size every unit prefills on its own (the prefill depends on the press); the summary
    line used to claim one prefill per sample shared by every press."""
    argv = ["eval", "--benchmark", "tiny_needles", "--length", "80", "--presses", "decoding", "--ratios", "0.5",
            "--limit", "1", "--tasks", "single", "--output-dir", str(tmp_path), "--prefill-chunk-size", "16",
            "--press-option", "decoding.compression_interval=16"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert "each unit its own prefill, in chunks of 16" in out and "shared by" not in out, out


def test_eval_can_prompt_without_the_chat_template(monkeypatch, tiny_model, chat_tokenizer, tmp_path, capsys):
    """--no-chat-template gives plain prompts with a chat tokenizer (a base model, or LongBench's few-shot and code
    tasks, which its pred.py runs without a template); the template is part of the results key."""
    import kvsqueeze.models

    monkeypatch.setattr(kvsqueeze.models, "load_model", lambda *a, **k: (tiny_model("llama"), chat_tokenizer))
    argv = ["eval", "--benchmark", "tiny_needles", "--length", "80", "--presses", "knorm", "--ratios", "0.5",
            "--limit", "1", "--tasks", "single", "--output-dir", str(tmp_path), "--json"]
    prefixes = []
    for extra in ([], ["--no-chat-template"]):
        code, out, err = run(argv + extra, capsys)
        assert code == 0, err
        with open(f"{json.loads(out)['directory']}/config.json", encoding="utf-8") as f:
            prefixes.append(json.load(f)["generation"]["prompt_template"]["prefix"])
    assert prefixes[0].startswith("<s>User:") and prefixes[1] == "", prefixes
