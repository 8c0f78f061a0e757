"""Shared-prefill evaluation sweeps: the same predictions as one prefill per press × ratio, results directories
keyed by the configuration, resume after an interruption, and bad input refused before any model work."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from kvsqueeze.evaluation import sweep as S
from kvsqueeze.evaluation.base import data_digest
from kvsqueeze.evaluation.sweep import run_sweep
from kvsqueeze.pipeline import Pipeline

from conftest import EOS_ID, MODEL_NAMES
from eval_helpers import TinyNeedles, record_answers
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
               max_new_tokens=None, model_name=None, template=None):
    from kvsqueeze.pipeline import PromptTemplate

    entries = S.build_entries(presses, ratios, press_options)
    template = template or PromptTemplate.for_tokenizer(tokenizer)
    return S.resolved_config(model, model_name, benchmark or TinyNeedles(), entries, limit, seed, template,
                             max_new_tokens)


def test_the_key_ignores_the_order_of_presses_and_ratios_and_sees_the_stop_tokens(tiny_model, tokenizer, tmp_path):
    """The same press × ratio grid listed in another order finds its results (it redid every unit); the tokens that
    end an answer change the predictions, so they are part of the key (a changed eos_token_id reused old ones)."""
    model = tiny_model("llama")
    one = _config_of(model, tokenizer, presses=["knorm", "snapkv"], ratios=[0.25, 0.5], limit=1,
                     press_options={"snapkv": {"window_size": 8}})
    other = _config_of(model, tokenizer, presses=["snapkv", "knorm"], ratios=[0.5, 0.25], limit=1,
                       press_options={"snapkv": {"window_size": 8}})
    assert S.results_dir(tmp_path, one) == S.results_dir(tmp_path, other)
    assert [p["name"] for p in one["presses"]] == ["none", "knorm", "knorm", "snapkv", "snapkv"]  # as given
    swapped = _config_of(model, tokenizer, presses=["knorm"], ratios=[0.25], limit=1)
    assert S.results_dir(tmp_path, swapped) != S.results_dir(tmp_path, one)
    result = sweep(model, tokenizer, tmp_path, presses=["knorm"], ratios=[0.5], limit=1)
    recorded = json.loads((result.directory / "config.json").read_text())
    assert recorded["generation"]["eos_token_ids"] == sorted(Pipeline(model, tokenizer).eos_token_ids)
    model.generation_config.eos_token_id = [*Pipeline(model, tokenizer).eos_token_ids, 7]
    try:
        changed = sweep(model, tokenizer, tmp_path, presses=["knorm"], ratios=[0.5], limit=1)
    finally:
        model.generation_config.eos_token_id = EOS_ID
    assert changed.directory != result.directory and changed.units_run == 4


def test_data_files_rewritten_in_place_start_new_results(tmp_path):
    """A data file rewritten under the same path is new data: its contents are in the key (only the path was,
    and the old predictions were reused)."""
    data = tmp_path / "rows.jsonl"
    data.write_text('{"id": 1, "context": "old"}\n')
    before = data_digest(str(data))
    folder_before = data_digest(str(tmp_path))
    # (another length too: a file's digest is reused while its size, mtime and ctime are unchanged, and a rewrite
    # within the file system's timestamp granularity could keep both times)
    data.write_text('{"id": 1, "context": "newer"}\n')
    assert data_digest(str(data)) != before and data_digest(str(tmp_path)) != folder_before
    assert data_digest(str(data))["path"] == str(data)
    assert data_digest({"qa_1": str(data)}) == {"qa_1": data_digest(str(data))}
    assert data_digest("someone/dataset") == "someone/dataset"  # not a local path: as given


def test_prompt_template_dtype_and_attention_implementation_are_part_of_the_key(tiny_model, tokenizer, tmp_path):
    """Each changes every prediction, so each goes to another results directory."""
    from kvsqueeze.pipeline import PromptTemplate

    model = tiny_model("llama")
    base = dict(presses=["knorm"], ratios=[0.5], limit=1)
    configs = [
        _config_of(model, tokenizer, **base, template=PromptTemplate()),
        _config_of(model, tokenizer, **base, template=PromptTemplate(prefix="<|user|>")),
        _config_of(copy.deepcopy(model).to(torch.bfloat16), tokenizer, **base, template=PromptTemplate()),
        _config_of(tiny_model("llama", "eager"), tokenizer, **base, template=PromptTemplate()),
    ]
    assert len({S.results_dir(tmp_path, c) for c in configs}) == len(configs)


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


def test_resume_runs_the_ratios_an_interruption_left(tiny_model, tokenizer, tmp_path, monkeypatch):
    """A unit is a (sample, press, ratio): knorm finished at 0.25 is not knorm finished at 0.5."""
    model = tiny_model("llama")
    kwargs = dict(presses=["knorm"], ratios=[0.25, 0.5], limit=1)
    finish = S._finish_unit
    calls = {"n": 0}

    def interrupted(*args, **kw):
        if calls["n"] == 2:  # the first sample's baseline and knorm at 0.25 are done, knorm at 0.5 is not
            raise KeyboardInterrupt("simulated interruption")
        calls["n"] += 1
        return finish(*args, **kw)

    monkeypatch.setattr(S, "_finish_unit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep(model, tokenizer, tmp_path, **kwargs)
    monkeypatch.setattr(S, "_finish_unit", finish)
    resumed = sweep(model, tokenizer, tmp_path, **kwargs)
    assert resumed.units_skipped == 2 and resumed.units_run == 4
    rows = S.read_predictions(resumed.directory / "predictions.jsonl")
    assert len({S._unit(r) for r in rows}) == 2 * 3  # 2 samples x (baseline + 2 ratios)


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


def test_rerun_without_the_qa_data_keeps_the_finished_qa_results(tokenizer, tmp_path, monkeypatch):
    """A RULER sweep with qa_1 ran while its rows could be loaded; rerun when they cannot, the same command used to
    skip qa_1, drop its finished predictions and rewrite the metrics under the same key. qa_1 was asked for, so
    the rerun now fails before touching the results directory."""
    import conftest
    from kvsqueeze.corpus import essays
    from kvsqueeze.evaluation import hub
    from kvsqueeze.evaluation.ruler import QaDataUnavailable, Ruler

    words = " ".join(essays()[:2]).split()
    paragraphs = [" ".join(words[i * 12 : (i + 1) * 12]) for i in range(40)]
    rows = [{"id": f"x{i}", "context": p, "question": f"Word 4 of {i}?", "answers": {"text": [p.split()[3]]}}
            for i, p in enumerate(paragraphs)]
    monkeypatch.setitem(conftest._COMMON, "max_position_embeddings", 1024)  # a fresh tiny llama for 600 tokens
    model = conftest.build_model("llama")
    kwargs = dict(presses=["knorm"], ratios=[0.5], limit=1, max_new_tokens=2, press_options={},
                  benchmark=Ruler(length=600, tasks=["niah_single_1", "qa_1"], n_samples=1))
    monkeypatch.setattr(hub, "load_rows", lambda *a, **k: rows)
    first = sweep(model, tokenizer, tmp_path, **kwargs)
    files = {name: (first.directory / name).read_bytes() for name in ("predictions.jsonl", "metrics.json")}
    assert {r["task"] for r in S.read_predictions(first.directory / "predictions.jsonl")} == {"niah_single_1", "qa_1"}

    def unreachable(*args, **kw):
        raise hub.HubDataUnavailable("the Hugging Face hub is unreachable (simulated)")

    monkeypatch.setattr(hub, "load_rows", unreachable)
    kwargs["benchmark"] = Ruler(length=600, tasks=["niah_single_1", "qa_1"], n_samples=1)
    with pytest.raises(QaDataUnavailable, match="qa_1 were asked for.*unreachable"):
        sweep(model, tokenizer, tmp_path, **kwargs)
    assert {name: (first.directory / name).read_bytes() for name in files} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.directory.name]


def test_finished_units_of_samples_not_produced_this_time_are_never_deleted(tiny_model, tokenizer, tmp_path):
    class Fewer(TinyNeedles):  # the same configuration (and key), but fewer rows this time
        def samples(self, tokenizer, limit=None, seed=0):
            return (s for s in super().samples(tokenizer, limit, seed) if s.id != "double-1")

    model = tiny_model("llama")
    kwargs = dict(presses=["knorm"], ratios=[0.5], limit=2)
    first = sweep(model, tokenizer, tmp_path, **kwargs)
    path = first.directory / "predictions.jsonl"
    before = path.read_bytes()
    config_before = (first.directory / "config.json").read_bytes()
    with pytest.raises(ValueError, match=r"1 sample\(s\) that this run does not produce.*'double-1'.*Nothing was "
                                         r"deleted"):
        sweep(model, tokenizer, tmp_path, benchmark=Fewer(), **kwargs)
    assert path.read_bytes() == before
    assert (first.directory / "config.json").read_bytes() == config_before  # a refused rerun is not a recorded run


def test_config_json_records_every_run_and_keeps_the_key(tiny_model, tokenizer, tmp_path, monkeypatch):
    model = tiny_model("llama")
    kwargs = dict(presses=["knorm"], ratios=[0.5], limit=1)
    real = S.environment()
    runs = iter([{**real, "date": "2025-01-01T00:00:00+00:00", "git_commit": "a" * 40},
                 {**real, "date": "2025-02-02T00:00:00+00:00", "git_commit": "b" * 40}])
    monkeypatch.setattr(S, "environment", lambda: next(runs))
    first = sweep(model, tokenizer, tmp_path, **kwargs)
    config_one = json.loads((first.directory / "config.json").read_text())
    second = sweep(model, tokenizer, tmp_path, resume=False, **kwargs)
    config_two = json.loads((second.directory / "config.json").read_text())
    assert second.directory == first.directory and config_two["hash"] == config_one["hash"]
    assert {k: v for k, v in config_two.items() if k != "environment"} == {
        k: v for k, v in config_one.items() if k != "environment"}
    env = config_two["environment"]
    assert env["date"] == "2025-02-02T00:00:00+00:00" and env["git_commit"] == "b" * 40  # the latest run
    assert [r["git_commit"] for r in env["runs"]] == ["a" * 40, "b" * 40]
    assert {k: v for k, v in env.items() if k != "runs"} == env["runs"][-1]
    stored = {k: v for k, v in config_two.items() if k not in ("hash", "environment")}
    assert S.config_hash(stored) == config_two["hash"]


def test_a_press_at_ratio_zero_is_the_baseline(tiny_model, tokenizer, tmp_path):
    result = sweep(tiny_model("llama"), tokenizer, tmp_path, presses=["knorm"], ratios=[0.0, 0.5], limit=1)
    assert [(r["press"], r["ratio"]) for r in result.metrics] == [("none", 0.0), ("knorm", 0.5)]
    assert result.units_run == 2 * 2  # 2 samples x (baseline, knorm at 0.5)


def test_metrics_of_each_ratio_come_from_its_own_units(tiny_model, tokenizer, tmp_path):
    result = sweep(tiny_model("llama"), tokenizer, tmp_path, presses=["knorm"], ratios=[0.25, 0.5], limit=1)
    rows = S.read_predictions(result.directory / "predictions.jsonl")
    assert len(result.metrics) == 3
    for metrics in result.metrics:
        units = {r["sample_id"]: r for r in rows if (r["press"], r["ratio"]) == (metrics["press"], metrics["ratio"])}
        assert metrics["n_samples"] == len(units) == 2
        assert metrics["cache_bytes"] == sum(u["cache_bytes"] for u in units.values()) / len(units)
    assert result.metrics[1]["cache_bytes"] > result.metrics[2]["cache_bytes"]  # 0.25 keeps more than 0.5


@pytest.mark.parametrize("max_new_tokens", [None, 2])
def test_answers_get_the_samples_answer_prefix_and_token_budget(max_new_tokens, tiny_model, tokenizer, tmp_path,
                                                                monkeypatch):
    """Every question is decoded after its sample's answer prefix, for the sample's ``max_new_tokens`` unless the
    sweep overrides it."""
    calls = record_answers(monkeypatch)
    sweep(tiny_model("llama"), tokenizer, tmp_path, presses=["knorm"], ratios=[0.5], limit=1,
          max_new_tokens=max_new_tokens)
    sample = next(TinyNeedles().samples(tokenizer, limit=1))
    assert sample.max_new_tokens != 2
    assert len(calls) == 2 * 3  # (baseline, knorm) x 3 questions
    assert {(c["answer_prefix"], c["max_new_tokens"]) for c in calls} == {
        (sample.answer_prefix, max_new_tokens or sample.max_new_tokens)}


def test_each_question_is_scored_against_its_own_answers(tiny_model, tokenizer, tmp_path):
    result = sweep(tiny_model("llama"), tokenizer, tmp_path, presses=["knorm"], ratios=[0.5], limit=1)
    samples = {s.id: s for s in TinyNeedles().samples(tokenizer, limit=1)}
    rows = S.read_predictions(result.directory / "predictions.jsonl")
    assert {r["question_index"] for r in rows} == {0, 1}
    for row in rows:
        assert row["answers"] == list(samples[row["sample_id"]].answers[row["question_index"]])


def test_unreadable_benchmark_data_fails_before_the_results_directory_exists(tiny_model, tokenizer, tmp_path):
    from kvsqueeze.evaluation import hub, make_benchmark

    benchmark = make_benchmark("longbench", tasks=["hotpotqa"], data_files=tmp_path / "missing.jsonl")
    with pytest.raises(hub.HubDataUnavailable, match="missing.jsonl"):
        sweep(tiny_model("llama"), tokenizer, tmp_path / "out", benchmark=benchmark, presses=["knorm"], ratios=[0.5])
    assert not (tmp_path / "out").exists()


def test_samples_that_cannot_fit_fail_before_any_prefill_and_results_file(tiny_model, tokenizer, tmp_path,
                                                                          monkeypatch):
    """A length whose question and answer budget do not fit after the context used to be accepted, then fail on
    every unit after its prefill, leaving an empty results directory. Counted on the prompt as answered (template,
    question, answer prefix, the sample's budget)."""
    from kvsqueeze.pipeline import Pipeline

    model = tiny_model("llama")
    prefills = []
    monkeypatch.setattr(Pipeline, "record", lambda *a, **k: prefills.append(1))
    monkeypatch.setattr(Pipeline, "compress", lambda *a, **k: prefills.append(1))
    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=r"tiny_needles: 2 of 2 samples cannot be answered") as info:
        sweep(model, tokenizer, tmp_path / "out", presses=["knorm"], ratios=[0.5], limit=1,
              benchmark=TinyNeedles(tasks=["single", "double"]), max_new_tokens=limit - 20)
    assert f"exceed the model's maximum of {limit}" in str(info.value)
    assert not prefills and not (tmp_path / "out").exists()


def test_a_recalibrated_artifact_starts_new_results(tiny_model, tokenizer, tmp_path):
    """Recalibrating into the same file changes every prediction of the press: the artifact's checksum is part of
    the results key (its path alone used to be, so a rerun reused the old predictions)."""
    from kvsqueeze.calibration import calibrate

    model = tiny_model("llama")
    path = tmp_path / "qfilters.safetensors"
    keys = []
    for seed in (0, 1):
        ids = torch.randint(5, 100, (2, 32), generator=torch.Generator().manual_seed(seed))
        calibrate(model, None, "qfilters", input_ids_batches=[ids], output=path, progress=False)
        config = _config_of(model, tokenizer, ["qfilters"], [0.5], 1, press_options={"qfilters": {"artifact": str(path)}})
        keys.append(S.results_dir(tmp_path, config))
        assert set(config["presses"][1]["artifacts"]) == {"qfilters"}
    assert keys[0] != keys[1]
    assert "artifacts" not in _config_of(model, tokenizer, ["knorm"], [0.5], 1)["presses"][1]  # keys of the others


def test_a_chunked_sweep_gives_the_pipelines_chunked_answers(tiny_model, tokenizer, tmp_path, monkeypatch):
    """``prefill_chunk_size``: every unit gets its own chunked prefill (the prefill depends on the press), the
    predictions and bytes are those of ``Pipeline.compress(..., prefill_chunk_size)``, the chunk size is part of
    the results key (one-pass keys unchanged), and a press that compresses once is refused before any work."""
    from kvsqueeze import make_press
    from kvsqueeze.pipeline import Pipeline

    model = tiny_model("llama")
    options = {"decoding": {"press": make_press("knorm"), "compression_interval": 8}}
    base = dict(presses=["decoding"], ratios=[0.5], limit=1, press_options=options)
    result = sweep(model, tokenizer, tmp_path, prefill_chunk_size=8, **base)
    assert result.prefills == result.units_run == 2 * 2  # 2 tasks x (baseline + decoding), none shared
    rows = S.read_predictions(result.directory / "predictions.jsonl")
    pipe = Pipeline(model, tokenizer)
    samples = {s.id: s for s in TinyNeedles().samples(tokenizer, limit=1)}
    for row in rows:
        sample = samples[row["sample_id"]]
        press = None if row["press"] == "none" else make_press("decoding", compression_ratio=0.5, **options["decoding"])
        ctx = pipe.compress(sample.context, press, prefill_chunk_size=8)
        question = sample.questions[row["question_index"]]
        answer = ctx.answer(question, max_new_tokens=sample.max_new_tokens, answer_prefix=sample.answer_prefix)
        assert row["prediction"] == answer and not row["shared_prefill"]
        assert (row["cache_bytes"], row["full_cache_bytes"]) == (ctx.cache_bytes, ctx.full_cache_bytes)
    one_pass = S.results_dir(tmp_path, _config_of(model, tokenizer, ["decoding"], [0.5], 1, press_options=options))
    assert one_pass != result.directory
    assert "prefill_chunk_size" not in _config_of(model, tokenizer, ["knorm"], [0.5], 1)

    prefills = []
    monkeypatch.setattr(Pipeline, "compress", lambda *a, **k: prefills.append(1))
    with pytest.raises(ValueError, match="KnormPress compresses once"):
        sweep(model, tokenizer, tmp_path / "refused", presses=["knorm"], ratios=[0.5], limit=1, prefill_chunk_size=8)
    assert not prefills and not (tmp_path / "refused").exists()


def test_resume_false_starts_afresh(tiny_model, tokenizer, tmp_path, monkeypatch):
    model = tiny_model("llama")
    kwargs = dict(presses=["knorm"], ratios=[0.5], limit=1)
    sweep(model, tokenizer, tmp_path, **kwargs)
    again = sweep(model, tokenizer, tmp_path, resume=False, **kwargs)
    assert again.units_run == 4 and again.units_skipped == 0
    assert len(S.read_predictions(again.directory / "predictions.jsonl")) == 6
    # Interrupted, a fresh run leaves no metrics of the earlier one for the report to present as its own.
    assert (again.directory / "metrics.json").exists()

    def interrupted(*args, **kw):
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(S, "_finish_unit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep(model, tokenizer, tmp_path, resume=False, **kwargs)
    assert not (again.directory / "metrics.json").exists()


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
        (dict(ratios=[0.0], press_options={"knorm": {"budget": 20}}), ValueError, r"sets budget; a sweep compares"),
        (dict(benchmark="tiny_needles"), TypeError, "Benchmark"),
        (dict(press_options={"knorm": 16}), TypeError, r"press_options\['knorm'\] must be a mapping.*got 16"),
        (dict(press_options=[("knorm", {})]), TypeError, "press_options must map a press name"),
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


def test_benchmark_rows_and_options_are_checked_early():
    from kvsqueeze.evaluation import Prediction, Sample, make_benchmark

    base = dict(id="x", task="t", context="The code is 4738215.", questions=("What is the code?",))
    # A bare string is not a tuple of references: its characters would each be one, matched by any digit.
    with pytest.raises(TypeError, match=r"answers\[0\] must be a tuple of reference strings.*got '4738215'"):
        Sample(**base, answers=("4738215",))
    with pytest.raises(TypeError, match="must hold strings, got 4738215"):
        Sample(**base, answers=((4738215,),))
    assert Sample(**base, answers=(["4738215"],)).answers == (("4738215",),)  # a list is stored as a tuple
    with pytest.raises(TypeError, match="answers must be a tuple of reference strings.*got '4738215'"):
        Prediction("x", "t", 0, "1", "4738215")
    with pytest.raises(TypeError, match=r"lengths must be a number or a list of numbers.*got '1000'"):
        make_benchmark("niah", lengths="1000")
    with pytest.raises(TypeError, match=r"depths must be a number or a list of numbers.*got '0.5'"):
        make_benchmark("niah", depths="0.5")
    with pytest.raises(ValueError, match=r"depths 0.33333 and 0.333334 are both reported as 33.33%.*niah_1000_33.33"):
        make_benchmark("niah", lengths=[1000], depths=[0.33333, 0.333334])
    assert make_benchmark("niah", lengths=[1000], depths=[0.3333, 0.3334]).depths == (0.3333, 0.3334)
