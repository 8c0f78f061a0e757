"""RULER generator: answers really in the context, lengths on target, determinism, scoring, qa data handling."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
from collections import Counter
from pathlib import Path

import pytest

from kvsqueeze.corpus import essays
from kvsqueeze.evaluation import Prediction, make_benchmark, ruler
from kvsqueeze.evaluation.ruler import TASKS, TOLERANCE, QaDataUnavailable, Ruler
from kvsqueeze.evaluation.metrics import string_match_all, string_match_part

FIXTURES = Path(__file__).parent / "fixtures" / "ruler"
NON_QA = [t for t in TASKS if TASKS[t].kind != "qa"]
CHAR_LENGTH = 3000  # the character tokenizer needs ~4x the tokens of a real one for the same text


@pytest.fixture(scope="module")
def qa_files(tmp_path_factory) -> dict[str, str]:
    """The checked-in SQuAD / HotpotQA rows plus extra rows whose paragraphs are essay excerpts, so that the
    distractor pool is large enough for 2k-token samples. Every answer is extractive (HotpotQA's yes/no answers,
    which are not in any document, have no row here)."""
    root = tmp_path_factory.mktemp("qa")
    words = " ".join(essays()[:4]).split()
    paragraphs = [" ".join(words[i : i + 60]) for i in range(0, 60 * 60, 60)]  # 60 paragraphs of 60 words
    squad = (FIXTURES / "squad.jsonl").read_text().splitlines()
    for i, p in enumerate(paragraphs):
        word = p.split()[3]
        squad.append(json.dumps({
            "id": f"x{i}", "title": "essay", "context": p, "question": f"Which is word 4 of {i}?",
            "answers": {"text": [word], "answer_start": [p.index(word)]},
        }))
    hotpot = (FIXTURES / "hotpotqa.jsonl").read_text().splitlines()
    for i in range(0, len(paragraphs) - 1, 2):
        titles = [f"Essay part {i}", f"Essay part {i + 1}"]
        hotpot.append(json.dumps({
            "id": f"y{i}", "question": f"What links part {i} and part {i + 1}?", "answer": paragraphs[i].split()[5],
            "type": "bridge", "level": "easy", "supporting_facts": {"title": titles, "sent_id": [0, 0]},
            "context": {"title": titles, "sentences": [[paragraphs[i]], [paragraphs[i + 1]]]},
        }))
    files = {"qa_1": root / "squad.jsonl", "qa_2": root / "hotpotqa.jsonl"}
    files["qa_1"].write_text("\n".join(squad) + "\n")
    files["qa_2"].write_text("\n".join(hotpot) + "\n")
    return {k: str(v) for k, v in files.items()}


@pytest.fixture(scope="module")
def smollm_tokenizer():
    from kvsqueeze.models import load_tokenizer

    return load_tokenizer()


def _samples(tokenizer, length, tasks=None, n=2, seed=0, **kw):
    return list(make_benchmark("ruler", length=length, tasks=tasks, n_samples=n, **kw).samples(tokenizer, seed=seed))


def _count(tokenizer, sample) -> int:
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (sample.context, sample.questions[0]))


# ---------------------------------------------------------------------------------------------------------------
# Content: every reference is in the context, and it is the right answer by the task's definition
# ---------------------------------------------------------------------------------------------------------------


def test_every_answer_occurs_in_its_context(tokenizer, qa_files):
    samples = _samples(tokenizer, CHAR_LENGTH, qa_data_files=qa_files)
    assert Counter(s.task for s in samples) == {t: 2 for t in TASKS}
    for s in samples:
        assert len(s.questions) == 1 and len(s.answers) == 1 and s.answers[0]
        for ref in s.answers[0]:
            assert ref in s.context, (s.task, ref)
        assert s.max_new_tokens == {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}[TASKS[s.task].kind]
        assert s.answer_prefix and s.questions[0] not in s.context


def test_niah_needles_bind_the_queried_keys_to_the_answers(tokenizer):
    for s in _samples(tokenizer, CHAR_LENGTH, tasks=[t for t in TASKS if TASKS[t].kind == "niah"]):
        spec = TASKS[s.task]
        keys = s.metadata["keys"]
        assert len(keys) == spec.n_queries and all(k in s.questions[0] for k in keys)
        found = [v for k in keys for v in re.findall(rf"for {re.escape(k)} is: (\S+)\.", s.context)]
        assert sorted(found) == sorted(s.answers[0])
        assert len(found) == spec.n_values * spec.n_queries
        needles = re.findall(r"A special magic \w+ for (\S+) is: ", s.context)
        assert len(set(needles)) >= spec.n_keys  # distractor keys (multikey) are there too
        if spec.haystack == "needle":
            assert len(needles) > 5  # the haystack itself is made of distractor needles


def test_vt_answers_are_the_variables_holding_the_value(tokenizer):
    for s in _samples(tokenizer, CHAR_LENGTH, tasks=["vt"]):
        body = s.context.split("Example:")[1].split("\n\n", 2)[2]  # past the solved example
        value_of: dict[str, str] = {}
        for name, rhs in re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", body):
            value_of[name] = value_of[rhs[4:]] if rhs.startswith("VAR ") else rhs
        holders = sorted(n for n, v in value_of.items() if v == s.metadata["value"])
        assert holders == sorted(s.answers[0]) and len(holders) == 5


def test_cwe_answers_are_the_ten_most_common_words(tokenizer):
    for length in (CHAR_LENGTH, 8000):  # 6 vs 1 below 4096 tokens, 30 vs 3 from there on
        for s in _samples(tokenizer, length, tasks=["cwe"], n=1):
            listing = s.context.rsplit("appear more often than the others.\n\n", 1)[1]
            counts = Counter(re.findall(r"^\d+\. (\w+)$", listing, flags=re.MULTILINE))
            top = [w for w, _ in counts.most_common()]
            assert set(top[:10]) == set(s.answers[0])
            assert counts[top[9]] > counts[top[10]] if len(top) > 10 else True


def test_fwe_answers_are_ranks_two_to_four(tokenizer):
    for s in _samples(tokenizer, CHAR_LENGTH, tasks=["fwe"]):
        counts = Counter(s.context.split("\n\n", 1)[1].split())
        ranked = counts.most_common()
        assert ranked[0][0] == "..."
        assert {w for w, _ in ranked[1:4]} == set(s.answers[0])
        assert ranked[3][1] > ranked[4][1]  # no tie with rank 5


def test_niah_needle_sits_at_its_recorded_depth():
    """The needle of niah_single_1 follows ``depth`` percent of the haystack's noise sentences."""
    for index in range(5):
        built = Ruler(length=2000).builder("niah_single_1", index, 0)(200, 0)
        body = built.context.split("\n\n", 1)[1]
        (depth,) = built.metadata["depths"]
        assert body[: body.index("A special magic")].count(".") == round(depth / 100 * 200)  # one "." a sentence


def test_several_needles_are_placed_by_their_depth_in_the_haystack_alone():
    """Each depth is a position in the haystack before any needle goes in, as in RULER's reference: needles
    inserted before it do not push a needle deeper."""
    assert ruler._insert(list("abcd"), ["X", "Y"], [75, 100]) == ["a", "b", "c", "X", "d", "Y"]
    assert ruler._insert(list("abcd"), ["X", "Y", "Z"], [0, 50, 50]) == ["X", "a", "b", "Y", "Z", "c", "d"]


def test_cwe_frequencies_switch_at_4096_tokens():
    """Common words appear 6 times against 1 below 4096 tokens, 30 against 3 from there on."""
    assert ruler._cwe(TASKS["cwe"], "s", 5, 0, 4095).metadata["frequencies"] == [6, 1]
    assert ruler._cwe(TASKS["cwe"], "s", 5, 0, 4096).metadata["frequencies"] == [30, 3]


def test_cwe_distractor_words_are_distinct_and_never_part_of_another_word():
    """Every uncommon word appears exactly its frequency, and no listed word contains another (which would make a
    substring match credit it)."""
    for seed in range(3):
        built = ruler._cwe(TASKS["cwe"], f"s{seed}", 300, 0, 8000)
        listing = built.context.rsplit("appear more often than the others.\n\n", 1)[1]
        counts = Counter(re.findall(r"^\d+\. (\w+)$", listing, flags=re.MULTILINE))
        assert {c for w, c in counts.items() if w not in built.answers} == {3}
        words = list(counts)
        assert not [(a, w) for a in words for w in words if a != w and a in w]


def test_fwe_answers_are_never_tied_with_the_next_word_at_any_size():
    """However few coded words a haystack holds, the three answers each occur more often than any other coded
    word (down to haystacks where the frequencies would all round to zero)."""
    for n in range(300):
        built = ruler._fwe(TASKS["fwe"], "s", n, 0, 512)
        counts = Counter(built.context.split("\n\n", 1)[1].split())
        others = [c for w, c in counts.items() if w != "..." and w not in built.answers]
        assert min(counts[a] for a in built.answers) > max(others, default=0), (n, counts)


def test_qa_documents_contain_the_gold_paragraph(tokenizer, qa_files):
    for s in _samples(tokenizer, CHAR_LENGTH, tasks=["qa_1", "qa_2"], qa_data_files=qa_files):
        assert s.context.count("Document ") == s.metadata["n_documents"]
        assert "Question:" in s.questions[0]


def test_qa_gold_paragraph_appears_once_when_every_document_is_used():
    """The gold paragraph is never drawn again as a distractor, even when the sample takes the whole pool."""
    data = ruler.load_qa_data("qa_1", str(FIXTURES / "squad.jsonl"))
    for i, row in enumerate(data.rows):
        pool_words = sum(len(d.split()) for d in data.documents if d not in row.gold)
        built = ruler._qa(TASKS["qa_1"], f"s{i}", pool_words, 0, data, i)
        assert [built.context.count(g) for g in row.gold] == [1] * len(row.gold)


# ---------------------------------------------------------------------------------------------------------------
# Length control
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [2000, 3000])
def test_lengths_within_tolerance_char_tokenizer(tokenizer, qa_files, length):
    for s in _samples(tokenizer, length, n=1, qa_data_files=qa_files):
        measured = _count(tokenizer, s)
        assert measured == s.metadata["n_tokens"]
        assert (1 - TOLERANCE) * length <= measured <= length, (s.task, measured)


@pytest.mark.real_model
@pytest.mark.parametrize("length", [512, 1024, 2048])
def test_lengths_within_tolerance_real_tokenizer(smollm_tokenizer, qa_files, length):
    samples = _samples(smollm_tokenizer, length, n=1, qa_data_files=qa_files)
    assert {s.task for s in samples} == set(TASKS)
    for s in samples:
        measured = _count(smollm_tokenizer, s)
        assert measured == s.metadata["n_tokens"]
        assert (1 - TOLERANCE) * length <= measured <= length, (s.task, measured)
        for ref in s.answers[0]:
            assert ref in s.context


def test_a_length_the_units_cannot_reach_within_tolerance_is_an_error(tokenizer):
    """When the largest build that fits falls more than ``TOLERANCE`` short (units of 100 tokens for 150 here),
    the sample is refused, never returned short."""

    def build(n, fill):
        return ruler._Built("x" * (100 * n), "", ("a",), "", {})

    with pytest.raises(ValueError, match="could not be fitted to 150 tokens"):
        ruler.fit_length(build, tokenizer, 150, "coarse")


def test_a_tokenizer_is_required():
    with pytest.raises(TypeError, match="tokenizer"):
        next(iter(Ruler(length=1024, tasks=["fwe"]).samples(None)))


@contextlib.contextmanager
def _deadline(seconds: float):
    """Fail (instead of hanging) when the block runs longer than ``seconds``."""

    def expired(*_):
        raise TimeoutError(f"still running after {seconds} s (an endless draw loop?)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _needle_keys(context: str) -> list[str]:
    return re.findall(r"A special magic \w+ for (\S+) is: ", context)


def test_multikey_2_haystack_beyond_the_adjective_noun_pairs_terminates():
    """niah_multikey_2's haystack is distractor needles with distinct keys; past the 3,600 adjective-noun pairs
    (~70k tokens of a real tokenizer) the draw used to loop forever. Its keys are now adjective-adjective-noun
    triples there, all distinct; below that they are the pairs they always were."""
    build = Ruler(length=65536, tasks=["niah_multikey_2"]).builder("niah_multikey_2", 0, 0)
    pairs = len(ruler.ADJECTIVES) * len(ruler.NOUNS)
    assert pairs == 3600
    with _deadline(30):
        small, full, large = build(100, 0), build(pairs - 1, 0), build(4096, 0)
    for built, n, words in ((small, 100, 2), (full, pairs - 1, 2), (large, 4096, 3)):
        keys = _needle_keys(built.context)
        assert len(keys) == len(set(keys)) == n + 1
        assert {len(k.split("-")) for k in keys} == {words}
        queried = built.metadata["keys"][0]
        assert queried in keys
        assert re.findall(rf"for {re.escape(queried)} is: (\d+)\.", built.context) == list(built.answers)


def test_multikey_2_past_every_key_is_a_clear_error(tokenizer, monkeypatch):
    # 4 adjectives x 3 nouns: 12 pairs, 18 triples usable; a 2000-token haystack needs ~30 distractor needles.
    monkeypatch.setattr(ruler, "ADJECTIVES", ruler.ADJECTIVES[:4])
    monkeypatch.setattr(ruler, "NOUNS", ruler.NOUNS[:3])
    with _deadline(30), pytest.raises(ValueError, match=r"'niah_multikey_2' cannot reach length=2000 tokens.*"
                                                          r"distinct keys.*more than the 18"):
        _samples(tokenizer, 2000, tasks=["niah_multikey_2"], n=1)


def test_too_short_a_length_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="too short for RULER task 'vt'"):
        _samples(tokenizer, 300, tasks=["vt"], n=1)


# ---------------------------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------------------------


def test_same_seed_same_samples_different_seed_different(tokenizer):
    a = _samples(tokenizer, 2000, tasks=NON_QA, n=1, seed=3)
    b = _samples(tokenizer, 2000, tasks=NON_QA, n=1, seed=3)
    c = _samples(tokenizer, 2000, tasks=NON_QA, n=1, seed=4)
    assert a == b
    assert len({s.id for s in a}) == len(a)
    for x, y in zip(a, c):
        assert x.task == y.task and x.context != y.context and x.answers != y.answers


def test_limit_caps_samples_per_task(tokenizer):
    bench = Ruler(length=2000, tasks=["niah_single_1", "fwe"], n_samples=5)
    assert Counter(s.task for s in bench.samples(tokenizer, limit=2)) == {"niah_single_1": 2, "fwe": 2}
    assert bench.config() == {"length": 2000, "tasks": ["niah_single_1", "fwe"], "n_samples": 5, "qa_data_files": {}}


def test_samples_of_a_task_differ_from_each_other(tokenizer):
    samples = _samples(tokenizer, 2000, tasks=NON_QA, n=2)
    for task in NON_QA:
        a, b = [s for s in samples if s.task == task]
        assert a.context != b.context and a.answers != b.answers, task


def test_limit_above_n_samples_yields_n_samples(tokenizer):
    assert len(list(Ruler(length=2000, tasks=["fwe"], n_samples=1).samples(tokenizer, limit=3))) == 1


# ---------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------


def _pred(task, prediction, answers):
    return Prediction(f"{task}-x", task, 0, prediction, tuple(answers))


def test_score_is_rulers_string_match():
    values = ("1111111", "2222222", "3333333", "4444444")
    preds = [
        # niah_multivalue: 3 of the 4 values -> 3/4; 0 of 4 -> 0; mean 37.5
        _pred("niah_multivalue", "1111111, 2222222 and 4444444", values),
        _pred("niah_multivalue", "no idea", values),
        # cwe: matching is case-insensitive, 2 of 2 -> 1
        _pred("cwe", "APPLE, Pear", ("apple", "pear")),
        # qa: any reference counts (part) -> 1, then none -> 0: mean 50
        _pred("qa_1", "It is Bristol.", ("Bristol", "London")),
        _pred("qa_1", "Paris", ("Bristol", "London")),
    ]
    expected = {"niah_multivalue": 100 * (3 / 4 + 0) / 2, "cwe": 100.0, "qa_1": 100 * (1 + 0) / 2}
    expected["average"] = sum(expected.values()) / 3
    assert Ruler(length=1024).score(preds) == pytest.approx(expected)


def test_score_post_processes_predictions_as_rulers_evaluator():
    """RULER's evaluator turns every control character (ASCII 0-31, tab and newline too) into a newline before
    matching: a control character inside the number splits it (no match), one around it changes nothing, and DEL
    (127) is not a control character there."""
    number = ("4738215",)
    cases = {
        "4738215": 1.0,
        "\x00 4738215\x1f\n": 1.0,
        "47382\x0715": 0.0,
        "47382\t15": 0.0,
        "47382\n15": 0.0,
        "47382\x7f15": 0.0,
    }
    for prediction, hit in cases.items():
        assert string_match_all(prediction, number) == hit, repr(prediction)
        assert string_match_part(prediction, number) == hit, repr(prediction)
    # A reference that spans a line break matches the newline the control character became.
    assert string_match_all("alpha\x0bbeta", ("alpha\nbeta",)) == 1.0
    preds = [_pred("niah_single_1", p, number) for p in cases]
    assert Ruler(length=1024).score(preds)["niah_single_1"] == round(100 * 2 / 6, 2)  # RULER rounds task scores to 2 decimals


def test_score_rejects_unknown_task():
    with pytest.raises(ValueError, match="unknown RULER task 'nope'"):
        Ruler(length=1024).score([_pred("nope", "x", ("x",))])


# ---------------------------------------------------------------------------------------------------------------
# qa data and options
# ---------------------------------------------------------------------------------------------------------------


def test_default_tasks_skip_unloadable_qa_and_the_key_says_so(tokenizer, unreachable_hub, caplog):
    """Only the default task list skips qa tasks whose data cannot be loaded, and then its config (the results key)
    lists the tasks that run: a run without the qa data never shares a results directory with a run that had it."""
    bench = Ruler(length=2000, n_samples=1)
    with caplog.at_level(logging.WARNING, logger="kvsqueeze.evaluation.ruler"):
        assert bench.config()["tasks"] == NON_QA
    text = caplog.text
    assert "skipping qa_1" in text and "skipping qa_2" in text
    assert "rajpurkar/squad" in text and "unreachable" in text
    assert [s.task for s in bench.samples(tokenizer, limit=1)] == NON_QA


def test_default_tasks_with_qa_data_keep_the_full_key(qa_files):
    from kvsqueeze.evaluation.base import data_digest

    config = Ruler(length=2000, qa_data_files=qa_files).config()
    assert config == {"length": 2000, "tasks": list(TASKS), "n_samples": 100, "qa_data_files": data_digest(qa_files)}
    assert set(config["qa_data_files"]) == set(qa_files)  # each file's path and the sha256 of its contents


def test_requested_qa_tasks_that_cannot_be_loaded_are_an_error(tokenizer, unreachable_hub):
    bench = Ruler(length=2000, tasks=["niah_single_1", "qa_1", "qa_2"], n_samples=1)
    message = r"qa_1, qa_2 were asked for.*leave them out.*rajpurkar/squad.*unreachable.*qa_data_files=\{'qa_1'"
    for step in (bench.check_data, bench.config, lambda: next(iter(bench.samples(tokenizer)))):
        with pytest.raises(QaDataUnavailable, match=message):
            step()


def test_only_qa_tasks_offline_is_an_error(tokenizer, unreachable_hub):
    with pytest.raises(QaDataUnavailable, match="qa_2 were asked for.*hotpotqa/hotpot_qa.*unreachable"):
        _samples(tokenizer, 2000, tasks=["qa_2"], n=1)


def test_missing_datasets_package_is_named(tokenizer, no_datasets_package):
    with pytest.raises(QaDataUnavailable, match=r"`datasets` package is missing.*pip install"):
        _samples(tokenizer, 2000, tasks=["qa_1"], n=1)


def test_squad_unanswerable_rows_are_skipped(tmp_path):
    rows = [json.loads(line) for line in (FIXTURES / "squad.jsonl").read_text().splitlines()]
    rows.append({"id": "v2", "title": "t", "context": "A lake.", "question": "Unanswerable?",
                 "answers": {"text": [], "answer_start": []}})  # SQuAD v2's unanswerable form
    path = tmp_path / "squad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = ruler.load_qa_data("qa_1", str(path))
    assert len(data.rows) == len(rows) - 1 and all(r.answers for r in data.rows)
    assert "Unanswerable?" not in [r.question for r in data.rows]


def test_hotpotqa_gold_is_every_supporting_paragraph():
    rows = [json.loads(line) for line in (FIXTURES / "hotpotqa.jsonl").read_text().splitlines()]
    data = ruler.load_qa_data("qa_2", str(FIXTURES / "hotpotqa.jsonl"))
    for raw, row in zip(rows, data.rows, strict=True):
        titles = list(dict.fromkeys(raw["supporting_facts"]["title"]))
        assert len(titles) == 2 and [g.split("\n", 1)[0] for g in row.gold] == titles


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"length": "4k"}, TypeError, "length must be an int"),
        ({"length": 64}, ValueError, "length must be >= 128"),
        ({"length": 1024, "tasks": ["niah_single_9"]}, ValueError, "unknown RULER task"),
        ({"length": 1024, "n_samples": 0}, ValueError, "n_samples must be >= 1"),
        ({"length": 1024, "qa_data_files": {"qa_3": "x"}}, ValueError, "qa_data_files keys"),
        ({"length": 1024, "qa_data_files": "squad.jsonl"}, TypeError,
         r"qa_data_files must map a qa task to its local file, e.g. \{'qa_1': 'squad.jsonl'.*got 'squad.jsonl'"),
        ({"length": 1024, "qa_data_files": {"qa_1": 3}}, TypeError, r"qa_data_files\['qa_1'\] must be a file path"),
    ],
)
def test_bad_options_raise_early(options, error, match):
    with pytest.raises(error, match=match):
        Ruler(**options)


def test_unknown_benchmark_suggests_close_names():
    with pytest.raises(KeyError, match="Did you mean: ruler"):
        make_benchmark("rulr", length=1024)


def test_cwe_beyond_its_word_pool_names_the_task_and_the_length(tokenizer, monkeypatch):
    """When the length needs more distinct words than the vocabulary holds, the error names the task, the length
    and what is missing (the word picker's own error used to escape the length search, naming a probe size)."""
    from kvsqueeze.evaluation import ruler

    small = ruler._vocabulary()[:60]
    monkeypatch.setattr(ruler, "_vocabulary", lambda: small)
    from kvsqueeze.evaluation import make_benchmark

    benchmark = make_benchmark("ruler", tasks=["cwe"], length=3000)
    with pytest.raises(ValueError, match=r"RULER task 'cwe' cannot reach length=3000 tokens.*distinct distractor words"):
        next(iter(benchmark.samples(tokenizer, limit=1)))
