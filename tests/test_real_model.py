"""Real-model tests on the embedded default model (SmolLM2-135M-Instruct): needles in ~1.5k tokens of essays.

These run offline on the CPU. The per-press table is printed to the terminal (not asserted) because a 135M
model is fragile; what is asserted is that the uncompressed model finds the needle and that the calibrated
Q-filters and Expected Attention keep it more often than Random on the same cases.
"""

from __future__ import annotations

import pytest
import torch

import kvsqueeze
from kvsqueeze.needles import needle_cases

pytestmark = pytest.mark.real_model

N_CASES = 12
N_TOKENS = 1500
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def calibrated(smollm, smollm_duo_artifact):
    """Calibrate the default model's artifacts once (reused from the user cache on later runs)."""
    from kvsqueeze import calibration

    model, tokenizer = smollm
    paths = {}
    for method in ("qfilters", "expected_attention_stats"):
        path = calibration.default_artifact_path(model, method)
        if not path.exists():
            calibration.calibrate(model, tokenizer, method, progress=False)
        paths[method] = path
    paths["duo_attention"] = smollm_duo_artifact  # a short run, see conftest
    return paths


@pytest.fixture(scope="module")
def cases(smollm):
    return needle_cases(smollm[1], n_cases=N_CASES, n_tokens=N_TOKENS, seed=0)


def _answers(pipe, case, presses: dict[str, kvsqueeze.Press]) -> dict[str, str]:
    recorded = pipe.record(case.context)
    return {
        name: pipe.from_recorded(recorded, press).answer(case.question, max_new_tokens=MAX_NEW_TOKENS, answer_prefix=case.answer_prefix)
        for name, press in presses.items()
    }


def test_needle_found_uncompressed(smollm, cases):
    pipe = kvsqueeze.Pipeline(*smollm)
    case = cases[0]
    ctx = pipe.compress(case.context)
    assert 1200 <= ctx.n_tokens <= 1700, ctx.n_tokens
    answer = ctx.answer(case.question, max_new_tokens=MAX_NEW_TOKENS, answer_prefix=case.answer_prefix)
    assert case.is_correct(answer), f"expected {case.answer} in {answer!r}"


def test_which_presses_keep_the_needle_at_half(smollm, calibrated, cases, capsys):
    """Report (in the test output) which registered presses still answer at r = 0.5."""
    model, tokenizer = smollm
    pipe = kvsqueeze.Pipeline(model, tokenizer)
    case = cases[0]
    recorded = pipe.record(case.context)
    rows = []
    eager_pipe = None
    for name in kvsqueeze.list_presses():
        press = _default_press(name, 0.5, calibrated)
        if press.capabilities.needs_attention_weights:  # ObservedAttention: the same model with eager attention
            if eager_pipe is None:
                eager_pipe = kvsqueeze.Pipeline(*kvsqueeze.load_model(attn_implementation="eager"))
            ctx = eager_pipe.compress(case.context, press)
        elif press.capabilities.extra_passes:  # KVzip: its own prefill and reconstruction passes
            ctx = pipe.compress(case.context, press)
        else:
            ctx = pipe.from_recorded(recorded, press)
        answer = ctx.answer(case.question, max_new_tokens=MAX_NEW_TOKENS, answer_prefix=case.answer_prefix)
        rows.append((name, answer, case.is_correct(answer)))
        assert ctx.cache_bytes < ctx.full_cache_bytes, name
    with capsys.disabled():
        print(f"\nneedle {case.answer} at r=0.5 ({recorded.n_tokens} tokens):")
        for name, answer, ok in rows:
            print(f"  {name:<26} {'KEEPS' if ok else 'loses':<6} {answer!r}")
    assert eager_pipe is not None, "no eager-only press in the table"
    assert any(ok for _, _, ok in rows), "no press keeps the needle at r=0.5"


def _default_press(name: str, ratio: float, artifacts: dict | None = None) -> kvsqueeze.Press:
    if name == "duo_attention" and artifacts:
        return kvsqueeze.make_press(name, compression_ratio=ratio, artifact=str(artifacts["duo_attention"]))
    if name == "per_layer":  # ratios rising with depth, mean `ratio`
        n = 30
        ratios = [min(0.95, max(0.0, ratio + 0.2 * (2 * i / (n - 1) - 1))) for i in range(n)]
        return kvsqueeze.make_press(name, press=kvsqueeze.make_press("knorm"), compression_ratios=ratios)
    if name == "composed":
        keep = 1 - ratio
        inner = 1 - keep**0.5
        return kvsqueeze.make_press(
            name,
            presses=[
                kvsqueeze.make_press("expected_attention", compression_ratio=inner),
                kvsqueeze.make_press("knorm", compression_ratio=inner),
            ],
        )
    if name == "key_rerotation":
        return kvsqueeze.make_press(name, press=kvsqueeze.make_press("streaming_llm", compression_ratio=ratio))
    return kvsqueeze.make_press(name, compression_ratio=ratio)


RATIOS = (0.25, 0.5)
COMPARED = ("random", "qfilters", "expected_attention")


@pytest.fixture(scope="module")
def needle_hits(smollm, calibrated, cases):
    """Needles kept per press and ratio over the same cases; each case is prefilled once for all of them."""
    pipe = kvsqueeze.Pipeline(*smollm)
    presses = {
        (name, ratio): kvsqueeze.make_press(name, compression_ratio=ratio) for name in COMPARED for ratio in RATIOS
    }
    hits = dict.fromkeys(presses, 0)
    for case in cases:
        for key, answer in _answers(pipe, case, presses).items():
            hits[key] += case.is_correct(answer)
    return hits


QFILTERS_AT_HALF = (
    "On SmolLM2-135M the needle's digit tokens are among the keys least aligned with the calibrated query "
    "direction, so Q-filters evicts them first: at r=0.5 it keeps 0/12 needles, like Random (0/12), while KeyDiff "
    "keeps 9/12 (benchmarks/needles.py). Sign, post-RoPE calibration and GQA averaging were checked: the filter "
    "keeps 92% of the question's real attention mass at r=0.5 (Random 49%) but 36% of the needle tokens "
    "(Random 49%; benchmarks/headwise_diagnosis.py --presses ...), and the flipped sign keeps 17% of the mass. "
    "Gemma-3-270M shows the same (mass 0.89, needle 0.25; needles 0/12 vs Random 0/12). Leaving layers 0-1 "
    "uncompressed, as the paper's needle test does, changes nothing (0/12). Model behaviour, not a bug; kept "
    "strict so a change in outcome is noticed."
)


@pytest.mark.parametrize(
    "name, ratio",
    [
        ("qfilters", 0.25),
        pytest.param("qfilters", 0.5, marks=pytest.mark.xfail(strict=True, reason=QFILTERS_AT_HALF)),
        ("expected_attention", 0.25),
        ("expected_attention", 0.5),
    ],
)
def test_calibrated_qfilters_and_expected_attention_beat_random(needle_hits, name, ratio, capsys):
    hits = {press: needle_hits[press, ratio] for press in COMPARED}
    with capsys.disabled():
        print(f"\nneedles kept over {N_CASES} cases at r={ratio}: {hits}")
    assert hits[name] > hits["random"], hits


def test_generate_under_press_matches_positions(smollm, cases):
    """``with press(model): model.generate(...)`` compresses the prompt and keeps logical positions."""
    model, tokenizer = smollm
    pipe = kvsqueeze.Pipeline(model, tokenizer)
    case = cases[1]
    ids = torch.cat([pipe.context_ids(case.context), pipe.question_ids(case.question)], dim=1)
    press = kvsqueeze.make_press("knorm", compression_ratio=0.5)
    with torch.inference_mode(), press(model) as report:
        out = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = kvsqueeze.adapter.ModelAdapter.cache_from_output(out)
    n_prompt, n_new = ids.shape[1], out.sequences.shape[1] - ids.shape[1]
    # The last generated token is not fed back, so the cache has seen prompt + n_new - 1 tokens ...
    assert cache.get_seq_length() == n_prompt + n_new - 1
    # ... but stores only the kept half of the prompt plus the appended tokens.
    kept = int(n_prompt * 0.5)
    assert report.kept and all(k == kept for k in report.kept.values())
    assert kvsqueeze.adapter.layer_lengths(cache) == [kept + n_new - 1] * len(cache.layers)


def test_load_model_config_overrides():
    """``load_model(**overrides)`` replaces config fields; one the config does not have is an error naming it."""
    model, _ = kvsqueeze.load_model(max_position_embeddings=4096)
    assert model.config.max_position_embeddings == 4096
    with pytest.raises(ValueError, match=r"no config attribute 'sliding_window'"):
        kvsqueeze.load_model(sliding_window=None)
