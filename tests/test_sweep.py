"""Shared-prefill evaluation sweeps: the same predictions as one prefill per press × ratio, results directories
keyed by the configuration, resume after an interruption, and bad input refused before any model work."""

from __future__ import annotations

import json

import pytest

from kvsqueeze.evaluation import sweep as S
from kvsqueeze.evaluation.sweep import run_sweep

from conftest import MODEL_NAMES
from eval_helpers import TinyNeedles
from press_matrix import PRESS_KWARGS

pytestmark = pytest.mark.usefixtures("single_thread")

#: knorm/streaming_llm/snapkv/expected_attention share the recording; pyramidkv keeps different lengths per layer;
#: observed_attention needs attention weights, so it gets its own prefill on the eager model.
PRESSES = ["knorm", "streaming_llm", "snapkv", "expected_attention", "pyramidkv", "observed_attention"]
OPTIONS = {name: PRESS_KWARGS[name][0] for name in PRESSES if PRESS_KWARGS[name][0]}
RATIOS = [0.25, 0.5]
TIMING = ("prefill_seconds", "compression_seconds", "decode_seconds", "shared_prefill")


def comparable(rows):
    """Rows without timings, keyed by unit and question."""
    return {
        (r["sample_id"], r["press"], r["ratio"], r["question_index"]): {k: v for k, v in r.items() if k not in TIMING}
        for r in rows
    }


def sweep(model, tokenizer, tmp_path, **kwargs):
    args = dict(benchmark=TinyNeedles(), presses=PRESSES, ratios=RATIOS, limit=2, output_dir=tmp_path,
                press_options=OPTIONS, progress=False)
    args.update(kwargs)
    if "press_options" not in kwargs:
        args["press_options"] = {k: v for k, v in OPTIONS.items() if k in args["presses"]}
    return run_sweep(model, tokenizer, **args)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_shared_prefill_gives_the_predictions_of_one_prefill_per_press(model_name, tiny_model, tokenizer, tmp_path):
    model = tiny_model(model_name)
    shared = sweep(model, tokenizer, tmp_path / "shared")
    naive = sweep(model, tokenizer, tmp_path / "naive", naive=True)
    n_units = 4 * (1 + len(PRESSES) * len(RATIOS))  # 2 tasks x limit 2, baseline + presses x ratios
    assert shared.units_run == naive.units_run == n_units
    # One prefill per sample, plus one per eager press x ratio; the naive loop prefills every unit.
    assert shared.prefills == 4 * (1 + len(RATIOS)) and naive.prefills == n_units
    a = S.read_predictions(shared.directory / "predictions.jsonl")
    b = S.read_predictions(naive.directory / "predictions.jsonl")
    assert len(a) == len(b) == 6 * (1 + len(PRESSES) * len(RATIOS))  # 2 + 2x2 questions per config
    assert comparable(a) == comparable(b)
    assert shared.directory.name == naive.directory.name  # the mode is not part of the key
    for row in a:
        assert row["shared_prefill"] == (row["press"] != "observed_attention")
        if row["press"] == "none":
            assert row["cache_bytes"] == row["full_cache_bytes"]
        else:
            assert row["cache_bytes"] < row["full_cache_bytes"]
    assert model.config._attn_implementation == "sdpa"  # switched back after the eager presses


def test_explicit_eager_model_matches_switching_in_place(tiny_model, tokenizer, tmp_path):
    model = tiny_model("llama")
    kwargs = dict(presses=["observed_attention"], ratios=[0.5], limit=1)
    switched = sweep(model, tokenizer, tmp_path / "a", **kwargs)
    explicit = sweep(model, tokenizer, tmp_path / "b", eager_model=tiny_model("llama", "eager"), **kwargs)
    a = S.read_predictions(switched.directory / "predictions.jsonl")
    b = S.read_predictions(explicit.directory / "predictions.jsonl")
    assert comparable(a) == comparable(b)


def test_results_directory_files(tiny_model, tokenizer, tmp_path):
    result = sweep(tiny_model("llama"), tokenizer, tmp_path, presses=["knorm"], ratios=[0.5])
    files = sorted(p.name for p in result.directory.iterdir())
    assert files == ["config.json", "metrics.json", "predictions.jsonl"]
    config = json.loads((result.directory / "config.json").read_text())
    assert config["hash"] in result.directory.name and result.directory.name.startswith("tiny_needles-tiny-llama-")
    env = config["environment"]
    assert {"kvsqueeze", "torch", "transformers", "git_commit", "python", "date"} <= set(env)
    assert config["benchmark"] == {"name": "tiny_needles", "config": {"length": 100, "tasks": ["single", "double"]}}
    assert [p["name"] for p in config["presses"]] == ["none", "knorm"]
    assert config["presses"][1]["press"]["type"] == "knorm" and config["presses"][1]["press"]["compression_ratio"] == 0.5
    metrics = json.loads((result.directory / "metrics.json").read_text())
    rows = metrics["results"]
    assert [(r["press"], r["ratio"]) for r in rows] == [("none", 0.0), ("knorm", 0.5)]
    assert set(rows[0]["metrics"]) == {"single", "double", "average"}
    assert rows[0]["saved_fraction"] == 0.0 and 0.3 < rows[1]["saved_fraction"] < 0.6
    assert rows[1]["n_samples"] == 4 and rows[1]["n_predictions"] == 6


def test_changed_config_goes_to_another_directory(tiny_model, tokenizer, tmp_path):
    model = tiny_model("llama")
    base = dict(presses=["knorm"], ratios=[0.5], limit=1)
    first = sweep(model, tokenizer, tmp_path, **base)
    again = sweep(model, tokenizer, tmp_path, **base)
    assert again.directory == first.directory and again.units_run == 0 and again.units_skipped == 4
    changed = [
        dict(base, ratios=[0.25]),
        dict(base, limit=2),
        dict(base, seed=1),
        dict(base, presses=["knorm", "snapkv"], press_options={"snapkv": {"window_size": 8}}),
        dict(base, benchmark=TinyNeedles(length=80)),
        dict(base, max_new_tokens=2),
        dict(base, model_name="another-name"),
    ]
    dirs = {first.directory}
    for kwargs in changed:
        dirs.add(S.results_dir(tmp_path, _config_of(model, tokenizer, **kwargs)))
    assert len(dirs) == 1 + len(changed)
    other_model = sweep(tiny_model("qwen3"), tokenizer, tmp_path, **base)
    assert other_model.directory not in dirs


def _config_of(model, tokenizer, presses, ratios, limit, seed=0, press_options=None, benchmark=None,
               max_new_tokens=None, model_name=None):
    from kvsqueeze.pipeline import PromptTemplate

    entries = S.build_entries(presses, ratios, press_options)
    template = PromptTemplate.for_tokenizer(tokenizer)
    return S.resolved_config(model, model_name, benchmark or TinyNeedles(), entries, limit, seed, template,
                             max_new_tokens)


def test_interrupted_sweep_resumes_without_repeating_a_unit(tiny_model, tokenizer, tmp_path, monkeypatch):
    model = tiny_model("gemma3")
    kwargs = dict(presses=["knorm", "snapkv", "observed_attention"], ratios=[0.5], limit=2)
    clean = sweep(model, tokenizer, tmp_path / "clean", **kwargs)
    total = clean.units_run

    finish = S._finish_unit
    calls = {"n": 0}

    def interrupted(*args, **kw):
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated interruption")
        calls["n"] += 1
        return finish(*args, **kw)

    monkeypatch.setattr(S, "_finish_unit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep(model, tokenizer, tmp_path / "resumed", **kwargs)
    monkeypatch.setattr(S, "_finish_unit", finish)
    directory = tmp_path / "resumed" / clean.directory.name
    assert len({S._unit(r) for r in S.read_predictions(directory / "predictions.jsonl")}) == 5
    assert model.config._attn_implementation == "sdpa"  # restored even though the eager block was interrupted

    resumed = sweep(model, tokenizer, tmp_path / "resumed", **kwargs)
    assert resumed.directory == directory
    assert resumed.units_skipped == 5 and resumed.units_run == total - 5
    rows = S.read_predictions(directory / "predictions.jsonl")
    keys = [(r["sample_id"], r["press"], r["ratio"], r["question_index"]) for r in rows]
    assert len(keys) == len(set(keys)), "a unit was repeated"
    assert comparable(rows) == comparable(S.read_predictions(clean.directory / "predictions.jsonl"))
    assert _same_scores(directory, clean.directory)


def _same_scores(a, b) -> bool:
    def scores(d):
        return [(r["press"], r["ratio"], r["metrics"], r["cache_bytes"]) for r in
                json.loads((d / "metrics.json").read_text())["results"]]

    return scores(a) == scores(b)


def test_partial_unit_and_truncated_line_are_dropped(tiny_model, tokenizer, tmp_path):
    model = tiny_model("llama")
    kwargs = dict(presses=["knorm"], ratios=[0.5], limit=1)
    clean = sweep(model, tokenizer, tmp_path, **kwargs)
    path = clean.directory / "predictions.jsonl"
    rows = S.read_predictions(path)
    # Keep the first question of the last two-question unit (a partial unit) and a truncated line after it.
    double = [r for r in rows if r["sample_id"].startswith("double") and r["press"] == "knorm"]
    kept = [r for r in rows if r not in double] + double[:1]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"sample_id": "dou', encoding="utf-8")
    resumed = sweep(model, tokenizer, tmp_path, **kwargs)
    assert resumed.units_run == 1 and resumed.units_skipped == 3
    assert comparable(S.read_predictions(path)) == comparable(rows)
    assert path.read_text().endswith("\n")


def test_resume_false_starts_afresh(tiny_model, tokenizer, tmp_path):
    model = tiny_model("llama")
    kwargs = dict(presses=["knorm"], ratios=[0.5], limit=1)
    sweep(model, tokenizer, tmp_path, **kwargs)
    again = sweep(model, tokenizer, tmp_path, resume=False, **kwargs)
    assert again.units_run == 4 and again.units_skipped == 0
    assert len(S.read_predictions(again.directory / "predictions.jsonl")) == 6


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(presses=["knrom"]), KeyError, "knorm"),
        (dict(presses="knorm"), TypeError, "'knorm'"),
        (dict(ratios=[1.0]), ValueError, "1.0"),
        (dict(ratios=[-0.1]), ValueError, "-0.1"),
        (dict(ratios=[0.5, 0.5]), ValueError, "duplicate"),
        (dict(ratios=["0.5"]), TypeError, "'0.5'"),
        (dict(limit=0), ValueError, "limit"),
        (dict(presses=["knorm", "knorm"]), ValueError, "twice"),
        (dict(press_options={"snapkv": {"window_size": 8}}), ValueError, "snapkv"),
        (dict(press_options={"knorm": {"compression_ratio": 0.1}}), ValueError, "compression_ratio"),
        (dict(benchmark="tiny_needles"), TypeError, "Benchmark"),
    ],
)
def test_bad_input_fails_before_any_model_work(kwargs, error, message, tokenizer, tmp_path):
    class Untouchable:  # any model access would fail loudly
        def __getattr__(self, name):
            raise AssertionError(f"the model was used ({name}) before the input was validated")

    args = dict(presses=["knorm"], ratios=[0.5], press_options=None)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        sweep(Untouchable(), tokenizer, tmp_path, **args)
    assert not any(tmp_path.iterdir())


def test_press_that_cannot_run_fails_before_any_prefill(tiny_model, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("KVSQUEEZE_CACHE", str(tmp_path / "empty-cache"))  # no calibration artifact anywhere
    with pytest.raises((FileNotFoundError, ValueError), match="qfilters|artifact|calibrat"):
        sweep(tiny_model("llama"), tokenizer, tmp_path / "out", presses=["knorm", "qfilters"], ratios=[0.5])
    assert not (tmp_path / "out").exists()


def test_eager_model_must_be_eager_and_hold_the_same_weights(tiny_model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="'sdpa'"):
        sweep(tiny_model("llama"), tokenizer, tmp_path, eager_model=tiny_model("llama"))
    with pytest.raises(ValueError, match="same weights"):
        sweep(tiny_model("llama"), tokenizer, tmp_path, eager_model=tiny_model("qwen3", "eager"))


def test_unnamed_benchmark_is_refused(tiny_model, tokenizer, tmp_path):
    class Unnamed(TinyNeedles):
        name = ""

    with pytest.raises(ValueError, match="Unnamed has no name"):
        sweep(tiny_model("llama"), tokenizer, tmp_path, benchmark=Unnamed())
