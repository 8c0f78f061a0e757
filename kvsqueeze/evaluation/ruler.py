"""RULER: the 13 synthetic long-context tasks, generated locally at any length in the evaluated model's tokens.

Written from the task definitions of RULER (Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context
Language Models?", arXiv 2404.06654) — retrieval (8 needle-in-a-haystack variants), multi-hop tracing (``vt``),
aggregation (``cwe``, ``fwe``) and question answering (``qa_1``, ``qa_2``). The prompts are kvsqueeze's own wording.

Length control: every sample is built from a number of haystack *units* (noise sentences, essay words, distractor
needles, list entries, coded words, document words); a binary search on that number, measuring with the given
tokenizer, makes the context plus the question (tokenised separately, no special tokens — how the pipeline prefills
them) land within 2% of ``length`` tokens without exceeding it. Where a unit is too coarse for that (the
``needle`` haystack of distractor needles: one UUID needle is ~90 tokens), the remainder is filled with noise
words at the end of the haystack (``niah_single_1``, ``niah_multikey_2/3`` and ``vt``, whose haystacks are noise).

Deviations from the reference generator, all deliberate and listed here:

* words for keys are adjective–noun pairs from kvsqueeze's own lists (60 × 60; RULER uses the larger
  ``wonderwords`` lists); a sample that needs more distinct keys than the 3,600 pairs (``niah_multikey_2`` past
  ~70k tokens of a typical tokenizer) uses adjective–adjective–noun triples for all its keys, up to 106,200 keys
  (~2M tokens), and a longer target is a ``ValueError`` naming the task and length; ``cwe`` draws its words from the
  vocabulary of the shipped essays (RULER uses the ``wonderwords`` lists);
* the essay haystack starts at a seed-chosen sentence of the concatenated essays (RULER starts at the beginning);
* the one-shot examples are short so that 512-token samples remain possible: ``vt``'s is one chain in six noise
  sentences; ``cwe``'s is 25 list entries below 4k tokens (5 common words × 3 + 10 others) and 130 from 4k on
  (10 × 10 + 10 × 3); the list itself uses frequencies 6 vs 1 below 4k and 30 vs 3 from 4k on, as RULER does;
  ``fwe`` has no example. At 512 tokens the ``cwe`` list holds few words besides the 10 common ones, so the task
  is easier there than at 4k;
* ``fwe`` (vocabulary ``length // 50`` coded words, at least 8) gives every coded word its *expected* Zipf count
  (α = 2, rank 1 replaced by the noise token ``...``) instead of sampling the counts, so the three answers
  (ranks 2–4) are never tied with rank 5;
* ``qa_1`` uses SQuAD v1.1 validation (``rajpurkar/squad``), ``qa_2`` HotpotQA distractor validation
  (``hotpotqa/hotpot_qa``); distractor documents are other rows' paragraphs, the last one cut to fit the length.

Generation budgets (``max_new_tokens``) are RULER's: niah 128, vt 30, cwe 120, fwe 50, qa 32.
Scoring is RULER's string match (:func:`~kvsqueeze.evaluation.metrics.string_match_all` for niah/vt/cwe/fwe,
:func:`~kvsqueeze.evaluation.metrics.string_match_part` for qa), per task on 0–100, plus ``"average"``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import random
import re
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from kvsqueeze.corpus import essays
from kvsqueeze.evaluation.base import Benchmark, Prediction, Sample, data_digest, register_benchmark
from kvsqueeze.evaluation.metrics import score_predictions, string_match_all, string_match_part

log = logging.getLogger(__name__)

#: Allowed relative shortfall of a sample's length (context + question, in tokens) below the target.
TOLERANCE = 0.02

NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")

ADJECTIVES = (
    "amber", "ancient", "bitter", "brave", "bright", "brisk", "calm", "clever", "cozy", "crimson", "curious",
    "dusty", "eager", "elegant", "faded", "fancy", "fierce", "frozen", "gentle", "gleaming", "golden", "grumpy",
    "hollow", "humble", "icy", "jolly", "lazy", "little", "lonely", "lucky", "misty", "modest", "noble", "odd",
    "pale", "patient", "plain", "polite", "proud", "quiet", "rapid", "rusty", "shiny", "silent", "silver", "sleepy",
    "smooth", "sour", "spicy", "steady", "stormy", "sturdy", "swift", "tender", "tiny", "velvet", "vivid", "wild",
    "wise", "wooden",
)
NOUNS = (
    "anchor", "apple", "badger", "barrel", "basket", "beacon", "blanket", "bridge", "bucket", "cabin", "candle",
    "canyon", "castle", "cellar", "compass", "cottage", "crayon", "dolphin", "drum", "falcon", "feather", "fiddle",
    "garden", "glacier", "hammer", "harbor", "helmet", "island", "jacket", "kettle", "ladder", "lantern", "lemon",
    "meadow", "mirror", "monkey", "needle", "orchard", "otter", "paddle", "parrot", "pebble", "pillow", "quilt",
    "rabbit", "ribbon", "saddle", "shovel", "spoon", "stable", "teapot", "thimble", "tiger", "tractor", "trumpet",
    "tunnel", "violin", "wagon", "walnut", "window",
)


@dataclass(frozen=True)
class RulerTask:
    """How one RULER task is generated and scored.

    ``kind`` is the generator (``niah``, ``vt``, ``cwe``, ``fwe``, ``qa``); ``haystack`` the filler (``repeat``
    noise sentences, ``essay``, ``needle`` = distractor needles); ``keys``/``values`` the needle types
    (``words``, ``numbers``, ``uuids``); ``n_keys`` needles with distinct keys (the first is queried, or the
    first ``n_queries``), ``n_values`` values per queried key.
    """

    name: str
    kind: str
    max_new_tokens: int
    haystack: str = ""
    keys: str = "words"
    values: str = "numbers"
    n_keys: int = 1
    n_values: int = 1
    n_queries: int = 1

    @property
    def metric(self) -> Callable[[str, Sequence[str]], float]:
        return string_match_part if self.kind == "qa" else string_match_all


TASKS: dict[str, RulerTask] = {
    t.name: t
    for t in (
        RulerTask("niah_single_1", "niah", 128, "repeat"),
        RulerTask("niah_single_2", "niah", 128, "essay"),
        RulerTask("niah_single_3", "niah", 128, "essay", values="uuids"),
        RulerTask("niah_multikey_1", "niah", 128, "essay", n_keys=4),
        RulerTask("niah_multikey_2", "niah", 128, "needle"),
        RulerTask("niah_multikey_3", "niah", 128, "needle", keys="uuids", values="uuids"),
        RulerTask("niah_multivalue", "niah", 128, "essay", n_values=4),
        RulerTask("niah_multiquery", "niah", 128, "essay", n_keys=4, n_queries=4),
        RulerTask("vt", "vt", 30),
        RulerTask("cwe", "cwe", 120),
        RulerTask("fwe", "fwe", 50),
        RulerTask("qa_1", "qa", 32),
        RulerTask("qa_2", "qa", 32),
    )
}

#: RULER samples needle depths from 40 evenly spaced points between 0% and 100%.
DEPTHS = tuple(100 * i / 39 for i in range(40))

#: ``qa`` sources: task -> (dataset id, config, split). Loaded through ``datasets`` unless local files are given.
QA_DATASETS = {
    "qa_1": ("rajpurkar/squad", None, "validation"),
    "qa_2": ("hotpotqa/hotpot_qa", "distractor", "validation"),
}


class QaDataUnavailable(ConnectionError):
    """The SQuAD / HotpotQA rows that ``qa_1`` / ``qa_2`` need cannot be loaded (offline, or no ``datasets``)."""


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Built:
    """One generated sample before it is measured: context, question, references and task-specific metadata."""

    context: str
    question: str
    answers: tuple[str, ...]
    answer_prefix: str
    metadata: Mapping[str, Any]


@functools.lru_cache(maxsize=1)
def _essay_words() -> tuple[str, ...]:
    """The concatenated essays as whitespace-carrying words (``"word "``), so joining them restores the text."""
    return tuple(re.findall(r"\S+\s*", "\n\n".join(doc.strip() for doc in essays())))


@functools.lru_cache(maxsize=1)
def _sentence_starts() -> tuple[int, ...]:
    """Indices of the essay words that begin a sentence (haystacks start there)."""
    words = _essay_words()
    return tuple(i for i in range(len(words)) if i == 0 or words[i - 1].rstrip()[-1:] in ".!?")


@functools.lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    """Lower-case words of 5–9 letters that occur at least twice in the essays, sorted (the ``cwe`` word pool)."""
    counts: dict[str, int] = {}
    for doc in essays():
        for word in re.findall(r"\b[a-z]{5,9}\b", doc):
            counts[word] = counts.get(word, 0) + 1
    return tuple(sorted(w for w, n in counts.items() if n >= 2))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


#: Tries a rejection-sampling draw gets before it gives up. Callers keep every pool at most full (two-part word
#: keys) or half full (everything else), where the expected number of tries per draw is at most 3,600 and 2, so
#: the bound is never reached in practice; it only turns a pool that is (wrongly) exhausted into an error.
_MAX_TRIES = 1_000_000


def _fresh(make: Callable[[], str], taken: set[str], what: str) -> str:
    """``make()`` until it gives an item not in ``taken`` (which it joins), at most :data:`_MAX_TRIES` times."""
    for _ in range(_MAX_TRIES):
        item = make()
        if item not in taken:
            taken.add(item)
            return item
    raise ValueError(f"no new {what} in {_MAX_TRIES:,} draws: the pool of {what} is exhausted")


def word_key_capacity(parts: int) -> int:
    """How many distinct word keys of ``parts`` words a sample may draw: every adjective–noun pair (two parts);
    half of the adjective–adjective–noun triples (three parts), so that drawing them stays fast."""
    pairs = len(ADJECTIVES) * len(NOUNS)
    return pairs if parts == 2 else len(ADJECTIVES) * (len(ADJECTIVES) - 1) * len(NOUNS) // 2


def _word_key(rng: random.Random, parts: int) -> str:
    if parts == 2:
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    first, second = rng.sample(ADJECTIVES, 2)
    return f"{first}-{second}-{rng.choice(NOUNS)}"


def _draw(rng: random.Random, kind: str, taken: set[str], parts: int = 2) -> str:
    """A fresh key or value of ``kind`` (``words``, ``numbers``, ``uuids``) not in ``taken`` (which it joins);
    word keys have ``parts`` words (2: adjective-noun, 3: adjective-adjective-noun)."""
    if kind == "words":
        return _fresh(lambda: _word_key(rng, parts), taken, f"{parts}-word keys")
    if kind == "numbers":
        return _fresh(lambda: str(rng.randint(1_000_000, 9_999_999)), taken, "7-digit numbers")
    return _fresh(lambda: _uuid(rng), taken, "UUIDs")


def _noise(n: int) -> list[str]:
    return [NOISE[i % len(NOISE)] for i in range(n)]


_NOISE_WORDS = " ".join(NOISE).split()


def _noise_words(k: int) -> list[str]:
    """The first ``k`` words of the repeated noise text (fine-grained filler for the end of a haystack)."""
    return [" ".join(_NOISE_WORDS[i % len(_NOISE_WORDS)] for i in range(k))] if k else []


def _insert(units: list[str], items: Sequence[str], depths: Sequence[float]) -> list[str]:
    """``units`` with ``items[i]`` inserted at ``depths[i]`` percent of the way through (positions on the
    original list, so each depth is measured in the haystack alone)."""
    out = list(units)
    order = sorted(range(len(items)), key=lambda i: (-depths[i], -i))  # back to front; ties keep their order
    for i in order:
        out.insert(round(depths[i] / 100 * len(units)), items[i])
    return out


def _join_list(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ----------------------------------------------------------------------------------------------------------------
# Generators: (task, per-sample seed, number of units, fill) -> _Built. Deterministic in their arguments.
# ----------------------------------------------------------------------------------------------------------------


def _exhausted(reason: str) -> _Built:
    """A build that cannot exist (too many distinct keys, too few documents): the length search treats it as too
    long, and :func:`fit_length` names ``reason`` if the target cannot be reached without it."""
    return _Built("", "", (), "", {"exhausted": reason})


def _niah(task: RulerTask, seed: str, n: int, fill: int) -> _Built:
    rng = random.Random(seed)
    taken: set[str] = set()
    # Word keys are adjective-noun pairs while the sample needs at most all of them (always, but for the distractor
    # needles of niah_multikey_2 past 3,600 needles, ~70k tokens); beyond that every key of the sample is an
    # adjective-adjective-noun triple (a pair would be the tail of some triples), so its keys all look alike. Past
    # the usable triples the build is exhausted: fit_length then names the task and the length it cannot reach.
    parts = 2
    if task.keys == "words":
        needed = task.n_keys + (n if task.haystack == "needle" else 0)
        if needed > word_key_capacity(2):
            parts = 3
            if needed > word_key_capacity(3):
                return _exhausted(
                    f"{task.name} needs {needed:,} distinct keys for {n:,} distractor needles, more than the "
                    f"{word_key_capacity(3):,} it can draw"
                )
    keys = [_draw(rng, task.keys, taken, parts) for _ in range(task.n_keys)]
    per_key = [[_draw(rng, task.values, taken) for _ in range(task.n_values if i == 0 else 1)]
               for i in range(task.n_keys)]
    singular = task.values[:-1]
    needles = [f"A special magic {singular} for {key} is: {value}." for key, values in zip(keys, per_key)
               for value in values]
    rng.shuffle(needles)
    depths = sorted(rng.sample(DEPTHS, len(needles)))
    if task.haystack == "repeat":
        units = _noise(n)
    elif task.haystack == "essay":
        words = _essay_words()
        start = rng.choice(_sentence_starts())
        text = "".join(words[(start + i) % len(words)] for i in range(n)).strip()
        units = [s for s in re.split(r"(?<=[.!?])\s+", text) if s] if text else []
    else:  # distractor needles with other keys and values (noise words fill the rest)
        units = [f"A special magic {singular} for {_draw(rng, task.keys, taken, parts)} is: "
                 f"{_draw(rng, task.values, taken)}." for _ in range(n)]
    body = " ".join(_insert(units, needles, depths) + _noise_words(fill))
    queried = keys[: task.n_queries]
    answers = tuple(v for values in per_key[: task.n_queries] for v in values)
    many = len(answers) > 1
    what = f"special magic {task.values}" if many else f"special magic {singular}"
    context = (
        f"Some special magic {task.values} are hidden in the text below. Memorise them: you will be asked about "
        f"them afterwards.\n\n{body}"
    )
    question = f"What {'are all the' if many else 'is the'} {what} for {_join_list(queried)} in the text above?"
    prefix = f"The {what} for {_join_list(queried)} in the text above {'are' if many else 'is'}:"
    return _Built(context, question, answers, prefix, {"depths": depths, "keys": queried})


def _vt_chain(rng: random.Random, taken: set[str]) -> tuple[list[str], str, list[str]]:
    names = [
        _fresh(lambda: "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)), taken, "variable names")
        for _ in range(5)
    ]
    value = str(rng.randint(10_000, 99_999))
    statements = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(names)]
    return names, value, statements


def _vt(task: RulerTask, seed: str, n: int, fill: int) -> _Built:
    rng = random.Random(seed)
    taken: set[str] = set()
    ex_names, ex_value, ex_statements = _vt_chain(rng, taken)
    names, value, statements = _vt_chain(rng, taken)
    example = " ".join(_insert(_noise(6), ex_statements, [10, 30, 50, 70, 90]))
    positions = sorted(rng.sample(range(n + 1), 5)) if n >= 4 else [0] * 5
    depths = [100 * p / n if n else 0 for p in positions]
    body = " ".join(_insert(_noise(n), statements, depths) + _noise_words(fill))
    intro = (
        "Memorise and track the chains of variable assignments hidden in the text below; you will be asked which "
        "variables end up holding a given value."
    )
    answer_intro = "Answer: Following the assignments in the text above, the 5 variables that hold the value"
    context = (
        f"{intro}\n\nExample:\n{example}\nQuestion: Find every variable that is assigned the value {ex_value} in the "
        f"text above.\n{answer_intro} {ex_value} are: {' '.join(ex_names)}\n\n{intro}\n\n{body}"
    )
    question = f"Question: Find every variable that is assigned the value {value} in the text above."
    return _Built(context, question, tuple(names), f"{answer_intro} {value} are:", {"value": value})


class _VocabularyTooSmall(ValueError):
    """The essay vocabulary cannot give that many distinct words."""


def _pick_words(rng: random.Random, k: int, avoid: Sequence[str] = ()) -> list[str]:
    """``k`` distinct vocabulary words, none a substring of another chosen word or of ``avoid`` (and vice versa),
    so that string matching cannot credit a wrong word."""
    vocab = _vocabulary()
    chosen: list[str] = []
    pool = list(avoid)
    attempts = 0
    while len(chosen) < k:
        attempts += 1
        if attempts > 50 * k + 1000:
            raise _VocabularyTooSmall(
                f"the essay vocabulary ({len(vocab)} words) is too small for {k} distinct words"
            )
        word = rng.choice(vocab)
        if any(word in other or other in word for other in pool):
            continue
        chosen.append(word)
        pool.append(word)
    return chosen


def _numbered(words: Sequence[str]) -> str:
    return "\n".join(f"{i}. {w}" for i, w in enumerate(words, 1))


def _cwe(task: RulerTask, seed: str, n: int, fill: int, length: int) -> _Built:
    rng = random.Random(seed)
    big = length >= 4096
    freq_common, freq_other = (30, 3) if big else (6, 1)
    ex_common_n, ex_other_n, ex_freq = (10, 10, 10) if big else (5, 10, 3)
    ex_common = _pick_words(rng, ex_common_n)
    ex_other = _pick_words(rng, ex_other_n, avoid=ex_common)
    ex_list = ex_common * ex_freq + ex_other * (3 if big else 1)
    rng.shuffle(ex_list)
    common = _pick_words(rng, 10, avoid=ex_common + ex_other)
    try:
        other = _pick_words(rng, n, avoid=common) if n else []
    except _VocabularyTooSmall as exc:  # the length search probes past what it needs: too long, not an error
        return _exhausted(f"cwe needs {n:,} distinct distractor words: {exc}")
    words = common * freq_common + other * freq_other
    rng.shuffle(words)
    intro = "Below is a numbered list of words. Some of them appear more often than the others."
    context = (
        f"{intro}\n\n{_numbered(ex_list)}\nQuestion: What are the {ex_common_n} most common words in the list above?\n"
        f"Answer: The {ex_common_n} most common words in the list are: {', '.join(ex_common)}\n\n{intro}\n\n"
        f"{_numbered(words)}"
    )
    question = "Question: What are the 10 most common words in the list above?"
    prefix = "Answer: The 10 most common words in the list are:"
    return _Built(context, question, tuple(common), prefix, {"frequencies": [freq_common, freq_other]})


def _coded_word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6))


def _fwe(task: RulerTask, seed: str, n: int, fill: int, length: int, alpha: float = 2.0) -> _Built:
    rng = random.Random(seed)
    vocab_size = max(length // 50, 8)
    seen: set[str] = set()
    coded = [_fresh(lambda: _coded_word(rng), seen, "coded words") for _ in range(vocab_size)]
    weights = [k ** -alpha for k in range(1, vocab_size + 1)]
    total = sum(weights)
    counts = [int(n * w / total) for w in weights]
    for k in (3, 2, 1):  # ranks 2-4 strictly above rank 5, so the answer is never tied
        counts[k] = max(counts[k], counts[k + 1] + 1)
    counts[0] = max(n - sum(counts[1:]), counts[1] + 1)  # the rest is noise, rank 1
    stream = ["..."] * counts[0] + [w for w, c in zip(coded[1:], counts[1:]) for _ in range(c)]
    rng.shuffle(stream)
    context = (
        "Read the coded text below and keep track of how often each coded word occurs. The dots (...) are noise: "
        f"ignore them.\n\n{' '.join(stream)}"
    )
    question = (
        "Question: Which three coded words occur most often in the coded text above? Answer with the three words "
        "only, without any explanation."
    )
    prefix = "Answer: The three most frequent coded words in the text are:"
    return _Built(context, question, tuple(coded[1:4]), prefix, {"counts": counts[:5]})


@dataclass(frozen=True)
class _QaRow:
    question: str
    answers: tuple[str, ...]
    gold: tuple[str, ...]


@dataclass(frozen=True)
class _QaData:
    rows: tuple[_QaRow, ...]
    documents: tuple[str, ...]  # every distinct paragraph, the distractor pool


def _qa(task: RulerTask, seed: str, n: int, fill: int, data: _QaData, index: int) -> _Built:
    rng = random.Random(seed)
    row = data.rows[index % len(data.rows)]
    gold = set(row.gold)
    pool = [d for d in data.documents if d not in gold]
    rng.shuffle(pool)
    distractors, used = [], 0
    for doc in pool:  # ``n`` words of distractor documents, the last one cut
        if used >= n:
            break
        words = doc.split()
        take = words[: n - used]
        distractors.append(" ".join(take))
        used += len(take)
    if used < n:  # the pool has fewer words than asked: the fitter treats this as too long
        return _exhausted(f"its {len(pool):,} distractor documents hold fewer than {n:,} words")
    docs = list(row.gold) + distractors
    rng.shuffle(docs)
    body = "\n\n".join(f"Document {i}:\n{doc}" for i, doc in enumerate(docs, 1))
    context = (
        "Answer the question using the documents below. Give only the answer, with no other words.\n\n"
        f"The following are the given documents.\n\n{body}"
    )
    question = (
        "Answer the question using the documents above. Give only the answer, with no other words.\n\n"
        f"Question: {row.question}"
    )
    meta = {"n_documents": len(docs), "row": index % len(data.rows)}
    return _Built(context, question, row.answers, "Answer:", meta)


# ----------------------------------------------------------------------------------------------------------------
# QA data
# ----------------------------------------------------------------------------------------------------------------


def _read_rows(task: str, data_files: str | None) -> list[dict]:
    from kvsqueeze.evaluation.hub import HubDataUnavailable, load_rows

    dataset_id, config, split = QA_DATASETS[task]
    advice = f"pass qa_data_files={{{task!r}: FILE}} (kvsqueeze eval: --qa-data-files {task}=FILE) with a local copy"
    try:
        return load_rows(dataset_id, config, split, data_files=data_files, advice=advice)
    except HubDataUnavailable as exc:
        raise QaDataUnavailable(f"RULER {task} needs {dataset_id}: {exc}") from exc


def _squad(rows: list[dict]) -> _QaData:
    out, docs = [], {}
    for r in rows:
        answers = r["answers"]["text"] if isinstance(r["answers"], Mapping) else r["answers"]
        if not answers:
            continue  # SQuAD v2 unanswerable questions
        docs.setdefault(r["context"].strip(), None)
        refs = tuple(dict.fromkeys(a.strip() for a in answers))
        out.append(_QaRow(r["question"].strip(), refs, (r["context"].strip(),)))
    return _QaData(tuple(out), tuple(docs))


def _hotpot(rows: list[dict]) -> _QaData:
    out, docs = [], {}
    for r in rows:
        ctx = r["context"]
        titles, sentences = (ctx["title"], ctx["sentences"]) if isinstance(ctx, Mapping) else zip(*ctx)
        paragraphs = {t: f"{t}\n{''.join(s).strip()}" for t, s in zip(titles, sentences)}
        facts = r["supporting_facts"]
        gold_titles = facts["title"] if isinstance(facts, Mapping) else [f[0] for f in facts]
        gold = tuple(dict.fromkeys(paragraphs[t] for t in gold_titles if t in paragraphs))
        for p in paragraphs.values():
            docs.setdefault(p, None)
        out.append(_QaRow(r["question"].strip(), (r["answer"].strip(),), gold))
    return _QaData(tuple(out), tuple(docs))


def load_qa_data(task: str, data_files: str | None = None) -> _QaData:
    """The rows and distractor pool of ``qa_1`` (SQuAD) or ``qa_2`` (HotpotQA distractor setting).

    ``data_files`` is a local ``.json``/``.jsonl`` file (or directory) in the dataset's own schema; without it the
    rows come from the hub through ``datasets``. Raises :class:`QaDataUnavailable` when neither works.
    """
    if task not in QA_DATASETS:
        raise ValueError(f"unknown qa task {task!r}; known: {', '.join(QA_DATASETS)}")
    rows = _read_rows(task, data_files)
    data = _squad(rows) if task == "qa_1" else _hotpot(rows)
    if not data.rows:
        raise ValueError(f"no usable {task} rows in {data_files or QA_DATASETS[task][0]}")
    return data


# ----------------------------------------------------------------------------------------------------------------
# Length fitting
# ----------------------------------------------------------------------------------------------------------------


def _n_tokens(tokenizer, built: _Built) -> int:
    count = 0
    for text in (built.context, built.question):
        count += len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return count


def largest_fitting(measure: Callable[[int], int], target: int, start: int = 0) -> int:
    """Largest ``n >= start`` with ``measure(n) <= target`` (``measure`` is close to increasing), or ``start - 1``
    when even ``start`` is too long."""
    if measure(start) > target:
        return start - 1
    lo, hi = start, max(start + 1, 8)
    while measure(hi) <= target:
        lo, hi = hi, hi * 2
        if hi > 10_000_000:
            raise ValueError(f"cannot reach {target} tokens: the haystack does not grow")
    while hi - lo > 1:  # measure(lo) <= target < measure(hi)
        mid = (lo + hi) // 2
        if measure(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


def fit_length(
    build: Callable[[int, int], _Built], tokenizer, target: int, task: str, fillable: bool = False
) -> tuple[_Built, int]:
    """Build with the most haystack units whose context + question stays within ``target`` tokens; for a
    ``fillable`` task (noise-based haystacks), then append noise words (the ``fill`` argument) if that is still
    more than ``TOLERANCE`` short.

    A build whose metadata says ``exhausted`` (more distinct keys or distractor words than the task can supply)
    counts as too long; when that is what keeps the sample short of the target, the ``ValueError`` names the reason
    (noise words never stand in for missing needles or documents)."""
    cache: dict[tuple[int, int], int] = {}
    reasons: dict[tuple[int, int], str] = {}

    def measure(n: int, fill: int = 0) -> int:
        if (n, fill) not in cache:
            built = build(n, fill)
            if built.metadata.get("exhausted"):
                reasons[(n, fill)] = str(built.metadata["exhausted"])
                cache[(n, fill)] = 1 << 62
            else:
                cache[(n, fill)] = _n_tokens(tokenizer, built)
        return cache[(n, fill)]

    n = largest_fitting(measure, target)
    if n < 0:
        raise ValueError(
            f"length={target} is too short for RULER task {task!r}: its fixed parts alone take {measure(0)} tokens"
        )
    if measure(n) < (1 - TOLERANCE) * target and measure(n + 1) > target and (n + 1, 0) in reasons:
        raise ValueError(
            f"RULER task {task!r} cannot reach length={target} tokens (at most {measure(n)}): "
            f"{reasons[(n + 1, 0)]}"
        )
    fill = 0
    if fillable and measure(n) < (1 - TOLERANCE) * target:
        fill = max(largest_fitting(lambda f: measure(n, f), target), 0)
    built = build(n, fill)
    tokens = measure(n, fill)
    if not (1 - TOLERANCE) * target <= tokens <= target:
        raise ValueError(
            f"RULER task {task!r} could not be fitted to {target} tokens (got {tokens}): the tokenizer's units are "
            "too coarse for this length, or (qa) there are too few distractor documents"
        )
    return built, tokens


# ----------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return value


@register_benchmark("ruler")
class Ruler(Benchmark):
    """RULER's 13 synthetic tasks at one target length (Hsieh et al., arXiv 2404.06654; see the module docstring).

    Parameters
    ----------
    length : int
        Target length of context + question, in tokens of the evaluated model's tokenizer (e.g. 4096). Every
        sample lands within 2% below it.
    tasks : sequence of str, optional
        Subset of :data:`TASKS`. Default: all 13, in RULER's order, except that ``qa_1`` / ``qa_2`` are left out
        (with a warning) when their data cannot be loaded.
    n_samples : int, default 100
        Samples per task (RULER uses 500); ``samples(limit=...)`` can lower it further.
    qa_data_files : mapping of str to str, optional
        Local SQuAD / HotpotQA files for ``qa_1`` / ``qa_2`` (``{"qa_1": "squad.jsonl"}``), in the datasets'
        own schema. Without them the rows come from the hub.

    Which tasks run, and the results key
        A qa task named in ``tasks`` must run: when its data cannot be loaded, :meth:`check_data`, :meth:`config`
        and :meth:`samples` raise :class:`QaDataUnavailable` (pass ``qa_data_files``, or leave the task out).
        Only the default task list skips an unloadable qa task. Either way :meth:`config` — the benchmark's part
        of a sweep's results key — lists the tasks that actually run, so a run without the qa tasks goes to
        another results directory than a run with them and never replaces or deletes their results. The qa data
        is loaded once per instance (by whichever of those methods comes first), so the key and the samples agree.

    Each sample has one question; its ``metadata`` holds ``length`` (the target), ``n_tokens`` (measured) and
    task details (needle ``depths``, ...).
    """

    tasks = tuple(TASKS)

    def __init__(
        self,
        length: int,
        tasks: Sequence[str] | None = None,
        n_samples: int = 100,
        qa_data_files: Mapping[str, str] | None = None,
    ):
        self.length = _positive_int("length", length)
        if self.length < 128:
            raise ValueError(f"length must be >= 128 tokens, got {length}")
        self.n_samples = _positive_int("n_samples", n_samples)
        self.explicit_tasks = tasks is not None
        if tasks is None:
            chosen = tuple(TASKS)
        else:
            if isinstance(tasks, str):
                tasks = [tasks]
            chosen = tuple(dict.fromkeys(tasks))
            unknown = [t for t in chosen if t not in TASKS]
            if unknown or not chosen:
                raise ValueError(f"unknown RULER task(s) {unknown or tasks!r}; known: {', '.join(TASKS)}")
        self.selected = chosen
        if qa_data_files is None:
            qa_data_files = {}
        if not isinstance(qa_data_files, Mapping):
            raise TypeError(
                "qa_data_files must map a qa task to its local file, e.g. {'qa_1': 'squad.jsonl', 'qa_2': "
                f"'hotpotqa.jsonl'}}, got {qa_data_files!r}"
            )
        bad = [k for k in qa_data_files if k not in QA_DATASETS]
        if bad:
            raise ValueError(f"qa_data_files keys must be among {list(QA_DATASETS)}, got {bad}")
        files = {}
        for task, path in qa_data_files.items():
            if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
                raise TypeError(f"qa_data_files[{task!r}] must be a file path, got {path!r}")
            files[task] = os.fspath(path)
        self.qa_data_files = files
        self._qa: dict[str, _QaData] | None = None  # loaded once: see "Which tasks run" above

    def sample_lengths(self) -> tuple[str, list[int], float]:
        return "--length", [self.length], TOLERANCE

    def config(self) -> dict[str, Any]:
        """The options that define the rows; ``tasks`` are those that run (see the class docstring)."""
        return {"length": self.length, "tasks": list(self.running_tasks()), "n_samples": self.n_samples,
                "qa_data_files": data_digest(dict(self.qa_data_files))}

    def check_data(self) -> None:
        """Load the qa data of the selected qa tasks now; raises :class:`QaDataUnavailable` for a requested one."""
        self._qa_sources()

    def running_tasks(self) -> tuple[str, ...]:
        """The selected tasks minus the qa tasks skipped because their data cannot be loaded (default list only)."""
        qa = self._qa_sources()
        return tuple(t for t in self.selected if TASKS[t].kind != "qa" or t in qa)

    def _qa_sources(self) -> dict[str, _QaData]:
        if self._qa is not None:
            return self._qa
        wanted = [t for t in self.selected if TASKS[t].kind == "qa"]
        sources, missing = {}, {}
        for task in wanted:
            try:
                sources[task] = load_qa_data(task, self.qa_data_files.get(task))
            except QaDataUnavailable as exc:
                missing[task] = exc
        if missing and self.explicit_tasks:
            names = ", ".join(missing)
            raise QaDataUnavailable(
                f"RULER task(s) {names} were asked for but their data cannot be loaded (leave them out of tasks to "
                "run without them): " + "; ".join(str(e) for e in missing.values())
            )
        for task, exc in missing.items():
            log.warning("RULER: skipping %s (results go under a key without it): %s", task, exc)
        self._qa = sources
        return sources

    def builder(self, task: str, index: int, seed: int, qa: _QaData | None = None) -> Callable[[int, int], _Built]:
        """``build(n_units, fill)`` for sample ``index`` of ``task`` (for inspection and tests)."""
        spec = TASKS[task]
        sample_seed = f"ruler:{seed}:{task}:{index}"
        if spec.kind == "niah":
            return lambda n, f: _niah(spec, sample_seed, n, f)
        if spec.kind == "vt":
            return lambda n, f: _vt(spec, sample_seed, n, f)
        if spec.kind == "cwe":
            return lambda n, f: _cwe(spec, sample_seed, n, f, self.length)
        if spec.kind == "fwe":
            return lambda n, f: _fwe(spec, sample_seed, n, f, self.length)
        if qa is None:
            raise ValueError(f"{task} needs its qa data")
        row = random.Random(f"{sample_seed}:row").randrange(len(qa.rows))
        return lambda n, f: _qa(spec, sample_seed, n, f, qa, row)

    def samples(self, tokenizer, limit: int | None = None, seed: int = 0) -> Iterator[Sample]:
        if limit is not None:
            _positive_int("limit", limit)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if not callable(tokenizer):
            raise TypeError(f"RULER measures lengths with the evaluated model's tokenizer; got {tokenizer!r}")
        count = self.n_samples if limit is None else min(limit, self.n_samples)
        qa = self._qa_sources()
        tasks = self.running_tasks()
        with tqdm(total=count * len(tasks), desc=f"RULER {self.length}", unit="sample", disable=None) as bar:
            for task in tasks:
                spec = TASKS[task]
                for i in range(count):
                    built, n_tokens = fit_length(
                        self.builder(task, i, seed, qa.get(task)), tokenizer, self.length, task,
                        fillable=spec.haystack in ("repeat", "needle") or spec.kind == "vt",
                    )
                    yield Sample(
                        id=f"ruler-{self.length}-{task}-{seed}-{i}",
                        task=task,
                        context=built.context,
                        questions=(built.question,),
                        answers=(built.answers,),
                        answer_prefix=built.answer_prefix,
                        max_new_tokens=spec.max_new_tokens,
                        metadata={"length": self.length, "n_tokens": n_tokens, **built.metadata},
                    )
                    bar.update()

    def score(self, predictions: Sequence[Prediction]) -> dict[str, float]:
        """RULER string match per task (``all`` for niah/vt/cwe/fwe, ``part`` for qa), 0–100, plus ``average``."""

        def metric_of(task: str):
            if task not in TASKS:
                raise ValueError(f"prediction for unknown RULER task {task!r}")
            return TASKS[task].metric

        return score_predictions(predictions, metric_of)
