"""The shared-prefill sweep on the embedded default model (SmolLM2-135M-Instruct): one ~300-token needle sample,
two presses at one ratio, the same predictions and cache sizes as one prefill per press."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from kvsqueeze.evaluation.base import Benchmark, Prediction, Sample
from kvsqueeze.evaluation.sweep import read_predictions, run_sweep
from kvsqueeze.needles import needle_cases

pytestmark = pytest.mark.real_model


class OneNeedle(Benchmark):
    """One needle case of about 300 tokens."""

    name = "one_needle"
    tasks = ("needle",)

    def samples(self, tokenizer, limit=None, seed=0):
        case = needle_cases(tokenizer, n_cases=1, n_tokens=300, seed=seed)[0]
        yield Sample("needle-0", "needle", case.context, (case.question,), ((case.answer,),),
                     answer_prefix=case.answer_prefix, max_new_tokens=8)

    def score(self, predictions: Sequence[Prediction]) -> dict[str, float]:
        hits = [any(a in p.prediction for a in p.answers) for p in predictions]
        return {"needle": 100.0 * sum(hits) / len(hits), "average": 100.0 * sum(hits) / len(hits)}


@pytest.mark.usefixtures("single_thread")  # a shared CPU: one thread
def test_shared_prefill_sweep_matches_naive_on_the_default_model(smollm, tmp_path):
    model, tokenizer = smollm
    kwargs = dict(presses=["knorm", "keydiff"], ratios=[0.5], limit=1, progress=False)
    shared = run_sweep(model, tokenizer, OneNeedle(), output_dir=tmp_path / "shared", **kwargs)
    naive = run_sweep(model, tokenizer, OneNeedle(), output_dir=tmp_path / "naive", naive=True, **kwargs)
    assert shared.prefills == 1 and naive.prefills == 3
    a = read_predictions(shared.directory / "predictions.jsonl")
    b = read_predictions(naive.directory / "predictions.jsonl")
    keep = ("press", "ratio", "prediction", "cache_bytes", "full_cache_bytes", "context_tokens")
    assert [{k: r[k] for k in keep} for r in a] == [{k: r[k] for k in keep} for r in b]
    assert 250 <= a[0]["context_tokens"] <= 400, a[0]["context_tokens"]
    baseline = shared.metrics[0]
    assert baseline["press"] == "none" and baseline["metrics"]["average"] == 100.0, a[0]["prediction"]
    for row in shared.metrics[1:]:
        assert 0.45 < row["saved_fraction"] < 0.55, row
