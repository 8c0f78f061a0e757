"""Benchmarks read from the Hugging Face hub through ``datasets``: LongBench, LongBench-v2, InfiniteBench, LooGLE,
ZeroSCROLLS, AIME25 and MATH500, each with its published metric implemented in :mod:`kvsqueeze.evaluation.metrics`.

Every loader keeps its dataset id, configs (tasks), split, metric and generation budget in one table
(``DATASET`` and ``TASKS`` on the class). Offline, point a loader at a downloaded copy with ``data_files=``: a
``.jsonl``/``.json``/``.parquet`` file (one task), a directory holding ``<task>.jsonl`` (or ``.json``,
``.parquet``) files, or a mapping ``{task: file}``. Without local files and without a reachable hub (or without
``datasets``), :meth:`~HubBenchmark.samples` fails at once with :class:`HubDataUnavailable`, naming the dataset.

The prompts (what goes in ``context``, ``questions`` and ``answer_prefix``) are kvsqueeze's own wording of each
benchmark's instructions; the document always goes in ``context`` and the question/instruction after it in
``questions``, so only the document is compressed.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import random
import re
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

from tqdm.auto import tqdm

from kvsqueeze.evaluation import metrics as M
from kvsqueeze.evaluation.base import (
    Benchmark,
    Prediction,
    Sample,
    data_digest,
    parse_json,
    read_json,
    register_benchmark,
)

INSTALL_HINT = "pip install 'kvsqueeze[eval]'  (or: pip install 'datasets>=3')"
#: Seconds the hub reachability probe may take before the hub counts as unreachable.
PROBE_TIMEOUT_S = 3.0


class HubDataUnavailable(ConnectionError):
    """A benchmark's rows cannot be read: ``datasets`` is missing, the hub is unreachable, or a file is absent."""


# ----------------------------------------------------------------------------------------------------------------
# Reading rows
# ----------------------------------------------------------------------------------------------------------------


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub endpoint (``$HF_ENDPOINT``, default huggingface.co:443) opens within
    ``timeout`` seconds. Name resolution runs in a daemon thread, so a stuck resolver cannot hang the caller."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def _read_file(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            return [parse_json(line, path, number) for number, line in enumerate(fh, 1) if line.strip()]
    if path.suffix == ".json":
        data = read_json(path)
        if isinstance(data, Mapping) and "data" in data:
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of rows")
        return data
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise HubDataUnavailable(f"reading {path} needs pyarrow; install it with: {INSTALL_HINT}") from exc
        return pq.read_table(path).to_pylist()
    raise ValueError(f"unsupported data file {path}: use .jsonl, .json or .parquet")


def _local_file(data_files: str | os.PathLike, config: str | None) -> Path:
    path = Path(data_files).expanduser()
    if path.is_dir():
        names = [config] if config else []
        for name in names:
            for ext in (".jsonl", ".json", ".parquet"):
                if (path / f"{name}{ext}").is_file():
                    return path / f"{name}{ext}"
        files = sorted(p for p in path.iterdir() if p.suffix in {".jsonl", ".json", ".parquet"})
        if config is None and len(files) == 1:
            return files[0]
        raise HubDataUnavailable(f"no file for {config or 'the dataset'} in {path} (expected {config}.jsonl)")
    if not path.is_file():
        raise HubDataUnavailable(f"data file {path} does not exist")
    return path


def _label(dataset_id: str, config: str | None, split: str) -> str:
    return dataset_id + (f" ({config})" if config else "") + f" split {split!r}"


def _offline() -> bool:
    return _truthy("HF_DATASETS_OFFLINE") or _truthy("HF_HUB_OFFLINE")


#: How the errors below tell a user to point a hub benchmark at a local copy.
LOCAL_COPY_ADVICE = "pass data_files= (kvsqueeze eval: --data-files) pointing at a downloaded copy"


def check_hub_access(dataset_id: str, config: str | None, split: str, advice: str = LOCAL_COPY_ADVICE) -> None:
    """Raise :class:`HubDataUnavailable` when ``datasets`` is missing or the hub cannot be reached (checked within
    a few seconds; skipped in the offline mode of ``datasets`` and behind a proxy), without loading anything.
    ``advice`` says how to use a local copy instead."""
    label = _label(dataset_id, config, split)
    try:
        import datasets  # noqa: F401
    except ImportError as exc:
        raise HubDataUnavailable(
            f"cannot load {label}: the `datasets` package is missing; install it with: {INSTALL_HINT}, or {advice}"
        ) from exc
    # Behind a proxy a direct connection says nothing; datasets' own timeouts apply then.
    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if not _offline() and not proxied and not hub_reachable():
        raise HubDataUnavailable(
            f"cannot load {label}: the Hugging Face hub is unreachable (no network?). {advice[0].upper()}"
            f"{advice[1:]}, or set HF_DATASETS_OFFLINE=1 to use the datasets cache"
        )


def load_rows(
    dataset_id: str, config: str | None, split: str, data_files: str | os.PathLike | None = None,
    advice: str = LOCAL_COPY_ADVICE,
) -> list[dict]:
    """Rows (dicts) of ``dataset_id``/``config``/``split``: from ``data_files`` when given, else from the hub
    (``advice``, in the errors, says how to use a local copy instead).

    Raises
    ------
    HubDataUnavailable
        ``datasets`` is not installed, the hub cannot be reached (checked first, within a few seconds), the
        offline mode of ``datasets`` has no cached copy, or a local file is missing.
    """
    if data_files is not None:
        return _read_file(_local_file(data_files, config))
    check_hub_access(dataset_id, config, split, advice)
    import datasets

    label = _label(dataset_id, config, split)
    offline = _offline()
    try:
        ds = datasets.load_dataset(dataset_id, config, split=split)
    except (ConnectionError, OSError, ValueError, RuntimeError) as exc:
        where = "offline mode, and not in the datasets cache" if offline else "loading failed"
        raise HubDataUnavailable(
            f"cannot load {label} ({where}: {type(exc).__name__}: {exc}). {advice[0].upper()}{advice[1:]}"
            + (", or dataset= naming a mirror in parquet/json form" if advice == LOCAL_COPY_ADVICE else "")
        ) from exc
    return [dict(row) for row in ds]


def _field(row: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    if default is not None:
        return default
    raise KeyError(f"row has none of the fields {names}; its fields: {sorted(row)}")


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (int, float)):
        return [str(value)]
    return [str(v) for v in value]


# ----------------------------------------------------------------------------------------------------------------
# The shared loader
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubTask:
    """One task of a hub benchmark: its dataset ``config`` and ``split``, ``metric`` name (see
    :data:`HUB_METRICS`), generation budget and family (which prompt it gets)."""

    config: str | None
    split: str
    metric: str
    max_new_tokens: int
    family: str = ""


Metric = Callable[[str, Sequence[str], Mapping[str, Any]], float]


class HubBenchmark(Benchmark):
    """Base of the hub loaders: options, data loading, seeded subsetting and scoring by each task's metric.

    Parameters
    ----------
    tasks : sequence of str, optional
        Subset of the benchmark's tasks (default: all).
    data_files : str, path or mapping, optional
        Local copy: one file (one task only), a directory of ``<task>.jsonl`` files, or ``{task: file}``.
    max_new_tokens : int, optional
        Overrides every task's published generation budget.
    dataset : str, optional
        Another hub id with the same schema and configs (a mirror, e.g. a parquet conversion), instead of
        ``DATASET``.
    max_context_tokens : int, optional
        Truncate longer contexts in the middle, keeping the first and the last ``max_context_tokens // 2`` tokens
        of the evaluated model's tokenizer (LongBench's truncation; then ``samples`` needs the tokenizer, and the
        sample's ``metadata["truncated_from"]`` holds the original length).
    """

    DATASET: ClassVar[str] = ""
    TASKS: ClassVar[dict[str, HubTask]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.tasks = tuple(cls.TASKS)

    def __init__(
        self,
        tasks: Sequence[str] | None = None,
        data_files: str | os.PathLike | Mapping[str, str | os.PathLike] | None = None,
        max_new_tokens: int | None = None,
        dataset: str | None = None,
        max_context_tokens: int | None = None,
    ):
        if max_context_tokens is not None and (
            isinstance(max_context_tokens, bool) or not isinstance(max_context_tokens, int) or max_context_tokens < 2
        ):
            raise ValueError(f"max_context_tokens must be an int >= 2 or None, got {max_context_tokens!r}")
        self.max_context_tokens = max_context_tokens
        if dataset is not None and (not isinstance(dataset, str) or not dataset.strip()):
            raise ValueError(f"dataset must be a hub dataset id such as {self.DATASET!r}, got {dataset!r}")
        self.dataset = dataset.strip() if dataset else self.DATASET
        if tasks is None:
            chosen = tuple(self.TASKS)
        else:
            if isinstance(tasks, str):
                tasks = [tasks]
            chosen = tuple(dict.fromkeys(tasks))
            unknown = [t for t in chosen if t not in self.TASKS]
            if unknown or not chosen:
                raise ValueError(
                    f"unknown {self.name} task(s) {unknown or list(tasks)!r}; known: {', '.join(self.TASKS)}"
                )
        self.selected = chosen
        if max_new_tokens is not None and (
            isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1
        ):
            raise ValueError(f"max_new_tokens must be a positive int or None, got {max_new_tokens!r}")
        self.max_new_tokens = max_new_tokens
        if data_files is not None and not isinstance(data_files, (str, os.PathLike, Mapping)):
            raise TypeError(f"data_files must be a path or a mapping of task to path, got {data_files!r}")
        if isinstance(data_files, Mapping):
            bad = [t for t in data_files if t not in self.TASKS]
            if bad:
                raise ValueError(f"data_files names unknown {self.name} task(s) {bad}; known: {', '.join(self.TASKS)}")
            data_files = {t: os.fspath(p) for t, p in data_files.items()}
        elif data_files is not None:
            data_files = os.fspath(data_files)
            if Path(data_files).is_file() and len(self.selected) > 1:
                raise ValueError(
                    f"data_files={data_files!r} is one file but {len(self.selected)} tasks are selected; pass "
                    "tasks=[...] with one task, a directory of <task>.jsonl files, or a {task: file} mapping"
                )
        self.data_files = data_files

    def config(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "tasks": list(self.selected), "data_files": data_digest(self.data_files),
                "max_new_tokens": self.max_new_tokens, "max_context_tokens": self.max_context_tokens}

    def _files_for(self, task: str):
        if isinstance(self.data_files, Mapping):
            return self.data_files.get(task)
        return self.data_files

    def _file_name(self, task: str) -> str:
        """The name of ``task``'s file in a ``data_files`` directory (``<name>.jsonl``)."""
        spec = self.TASKS[task]
        return task if spec.config is None else spec.config

    def rows(self, task: str) -> list[dict]:
        """The raw rows of ``task`` (local files or hub)."""
        spec = self.TASKS[task]
        files = self._files_for(task)
        if files is not None and Path(files).is_dir():
            return _read_file(_local_file(files, self._file_name(task)))
        return load_rows(self.dataset, spec.config, spec.split, data_files=files)

    def check_data(self) -> None:
        """Every selected task's local file exists, or (no local file) ``datasets`` is installed and the hub
        answers; raises :class:`HubDataUnavailable` naming the dataset otherwise. Nothing is loaded."""
        hub_checked = False
        for task in self.selected:
            files = self._files_for(task)
            if files is not None:
                _local_file(files, self._file_name(task))
            elif not hub_checked:
                spec = self.TASKS[task]
                check_hub_access(self.dataset, spec.config, spec.split)
                hub_checked = True

    def to_sample(self, task: str, row: Mapping[str, Any], index: int) -> Sample:  # pragma: no cover - abstract
        raise NotImplementedError

    def _sample(self, task: str, index: int, context: str, question: str, answers: Sequence[str], prefix: str = "",
                metadata: Mapping[str, Any] | None = None, row: Mapping[str, Any] | None = None) -> Sample:
        spec = self.TASKS[task]
        rid = str(_field(row, "_id", "id", "unique_id", default=index)) if row is not None else str(index)
        return Sample(
            id=f"{self.name}-{task}-{rid}",
            task=task,
            context=context,
            questions=(question,),
            answers=(tuple(answers),),
            answer_prefix=prefix,
            max_new_tokens=self.max_new_tokens or spec.max_new_tokens,
            metadata={"row": index, **(metadata or {})},
        )

    def samples(self, tokenizer=None, limit: int | None = None, seed: int = 0) -> Iterator[Sample]:
        """Rows of each selected task as samples; with ``limit``, a seeded random subset of ``limit`` rows per
        task (in dataset order). ``tokenizer`` is only needed with ``max_context_tokens``."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit must be a positive int or None, got {limit!r}")
        if self.max_context_tokens is not None and not callable(tokenizer):
            raise TypeError(
                f"max_context_tokens={self.max_context_tokens} needs the model's tokenizer, got {tokenizer!r}"
            )
        loaded = {task: self.rows(task) for task in self.selected}  # fail fast, before any sample is yielded
        total = sum(len(r) if limit is None else min(limit, len(r)) for r in loaded.values())
        with tqdm(total=total, desc=self.name, unit="sample", disable=None) as bar:
            for task, rows in loaded.items():
                indices = range(len(rows))
                if limit is not None and limit < len(rows):
                    indices = sorted(random.Random(f"{self.name}:{task}:{seed}").sample(range(len(rows)), limit))
                for i in indices:
                    yield self._truncated(self.to_sample(task, rows[i], i), tokenizer)
                    bar.update()

    def _truncated(self, sample: Sample, tokenizer) -> Sample:
        if self.max_context_tokens is None:
            return sample
        ids = tokenizer(sample.context, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.max_context_tokens:
            return sample
        half = self.max_context_tokens // 2
        context = tokenizer.decode(ids[:half], skip_special_tokens=True) + tokenizer.decode(
            ids[len(ids) - half :], skip_special_tokens=True
        )
        return dataclasses.replace(sample, context=context, metadata={**sample.metadata, "truncated_from": len(ids)})

    def score(self, predictions: Sequence[Prediction]) -> dict[str, float]:
        """Each task's published metric (0–100), plus ``average`` over the tasks present."""
        pairs = []
        for p in predictions:
            if not isinstance(p, Prediction):
                raise TypeError(f"score() expects Prediction rows, got {type(p).__name__}")
            if p.task not in self.TASKS:
                raise ValueError(f"prediction for unknown {self.name} task {p.task!r}")
            metric = HUB_METRICS[self.TASKS[p.task].metric]
            weight = getattr(metric, "weight", None)  # a metric whose task score pools its units (LooGLE cloze)
            value = metric(p.prediction, p.answers, p.metadata)
            pairs.append((p.task, value, weight(p.prediction, p.answers, p.metadata)) if weight else (p.task, value))
        return M.aggregate(pairs)


# ----------------------------------------------------------------------------------------------------------------
# Metrics (prediction, references, sample metadata) -> [0, 1]
# ----------------------------------------------------------------------------------------------------------------

_INT = re.compile(r"-?\d+")
#: LongBench's passage_count / passage_retrieval read unsigned digit runs ("2-3" is 2 and 3).
_DIGITS = re.compile(r"\d+")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _first_line(text: str) -> str:
    return text.lstrip("\n").split("\n")[0]


def classification_score(prediction: str, references: Sequence[str], meta: Mapping[str, Any]) -> float:
    """LongBench classification: the classes named in the prediction, not counting a class that is only a
    substring of the reference; 1/(number named) if the reference is among them, else 0."""
    classes = list(meta.get("all_classes") or [])
    best = 0.0
    for ref in references:
        named = [c for c in classes if c in prediction]
        named = [c for c in named if not (c in ref and c != ref)]
        if ref in named:
            best = max(best, 1 / len(named))
    return best


def retrieval_score(prediction: str, references: Sequence[str], meta: Mapping[str, Any]) -> float:
    """LongBench passage retrieval: share of the numbers in the prediction that equal the reference paragraph's
    number (``Paragraph 12`` / ``段落12``)."""
    best = 0.0
    for ref in references:
        found = re.findall(r"(?:Paragraph|段落)\s*(\d+)", ref)
        if not found:
            continue
        numbers = _DIGITS.findall(prediction)
        if numbers:
            best = max(best, sum(n == found[0] for n in numbers) / len(numbers))
    return best


def count_score(prediction: str, references: Sequence[str], meta: Mapping[str, Any]) -> float:
    """LongBench passage count: share of the numbers in the prediction that equal the reference count."""
    numbers = _DIGITS.findall(prediction)
    if not numbers:
        return 0.0
    return max(sum(n == str(ref).strip() for n in numbers) / len(numbers) for ref in references)


def code_similarity(prediction: str, references: Sequence[str], meta: Mapping[str, Any]) -> float:
    """LongBench code completion: edit similarity, in whole percents, of the prediction's first line that holds
    no backtick, ``#`` or ``//`` anywhere (LongBench's rule: a line with a trailing comment or a URL is skipped
    too) to the reference, neither stripped (as LongBench's ``fuzz.ratio(line, answer) / 100``)."""
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return max(round(100 * M.edit_similarity(line, ref)) / 100 for ref in references)


#: The option letter after an answer statement (whose words match in any case): ``(B)`` / ``[B]`` (either case), or
#: a capital ``B`` not followed by a letter (so "the answer is Alice" and "answer a question" give none).
_LETTER_AFTER = r"\s*:?\s*(?:[\(\[]([A-Da-d])[\)\]]|([A-D])(?![A-Za-z]))"
_ANSWER_STATEMENTS = (
    # LongBench-v2's official extraction: "The correct answer is (X)", then "The correct answer is X".
    re.compile(r"(?i:correct answer is)" + _LETTER_AFTER),
    # The answer prefixes InfiniteBench's scorer looks for ("answer is:", "answer:", "answer is", "option is").
    re.compile(r"(?i:\banswer(?:\s+is)?|\boption\s+is)" + _LETTER_AFTER),
)
#: A reply that starts with the letter: bracketed ("(B)", "[B]"); or followed by punctuation ("B.", "B)", "B:",
#: "B,", "B -"), a line break or the end; or, B-D only, by a space and more words ("C because ..."): "A" followed by
#: a word is the article ("A key point ...").
_LEADING_LETTER = re.compile(r"\s*(?:[\(\[]([A-D])[\)\]]|([A-D])(?=[ \t]*[\.\):,\-]|[ \t]*\n|\s*$)|([B-D])(?=\s))")
_PARENTHESISED = re.compile(r"\(([A-D])\)")


def choice_letter(prediction: str) -> str | None:
    """The option letter a multiple-choice answer gives, or None.

    In order: an answer statement (``The correct answer is (B)`` as LongBench-v2's scorer reads it, case-insensitive,
    then ``Answer: B`` / ``the answer is B`` / ``the option is B`` as InfiniteBench's does); a reply that starts with
    the letter (``B``, ``(B) text``, ``B. text``, ``B`` then a new line, ``C because ...``; not the article in
    ``A key point ...``); the one option letter in parentheses when only one appears (``... the correct one is
    (C)``). Markdown ``*`` is ignored.
    """
    text = prediction.replace("*", "")
    for pattern in _ANSWER_STATEMENTS:
        match = pattern.search(text)
        if match:
            return (match.group(1) or match.group(2)).upper()
    match = _LEADING_LETTER.match(text)
    if match:
        return match.group(1) or match.group(2) or match.group(3)
    letters = set(_PARENTHESISED.findall(text))
    return letters.pop() if len(letters) == 1 else None


_LONGBENCH_V2_ANSWER = (re.compile(r"The correct answer is \(([A-D])\)"), re.compile(r"The correct answer is ([A-D])"))


def longbench_v2_accuracy(prediction: str, references: Sequence[str], meta: Mapping[str, Any]) -> float:
    """LongBench-v2's own scoring: the letter of ``The correct answer is (X)``, else of ``The correct answer is
    X`` (case-sensitive, markdown ``*`` removed), equals the answer; a reply without that statement is wrong (the
    lenient :func:`choice_letter` would read ``B. Paris`` or ``Answer: B``)."""
    text = prediction.replace("*", "")
    for pattern in _LONGBENCH_V2_ANSWER:
        match = pattern.search(text)
        if match:
            return float(match.group(1) in [r.strip() for r in references])
    return 0.0


def choice_accuracy(prediction: str, references: Sequence[str], meta: Mapping[str, Any]) -> float:
    """Multiple choice: the letter extracted by :func:`choice_letter` equals the reference letter; else, when the
    options are known, the prediction names the correct option's text."""
    letter = choice_letter(prediction)
    refs = [r.strip() for r in references]
    if letter is not None:
        return float(letter in refs or any(r.startswith(f"({letter})") for r in refs))
    options = list(meta.get("options") or [])
    return float(any(r in options and r.lower() in prediction.lower() for r in refs))


# InfiniteBench's own scorer (``src/compute_scores.py`` of OpenBMB/InfiniteBench) reads numbers and words by
# simple splitting rules; the metrics below follow them, so scores compare with the paper's.

#: Characters InfiniteBench's kv_retrieval / longdialogue_qa_eng scoring turns into spaces before splitting words.
_INFBENCH_WORD_SEPARATORS = "\n:\"'.,?!{}"
#: Characters its code_run scoring turns into spaces before taking the last word.
_INFBENCH_CODE_SEPARATORS = "\n.`'\":"


def _digit_runs(text: str) -> list[str]:
    return re.findall(r"[0-9]+", text)


def _split_words(text: str, separators: str) -> list[str]:
    for c in separators:
        text = text.replace(c, " ")
    return text.split()


def first_digits_match(prediction: str, references: Sequence[str], meta: Mapping[str, Any]) -> float:
    """InfiniteBench passkey / number_string: the prediction's first run of digits, compared as a string, equals
    the answer (so ``0123`` is not ``123``, and ``71432.5`` reads ``71432``)."""
    runs = _digit_runs(prediction)
    return float(bool(runs) and any(runs[0] == str(r).strip() for r in references))


def first_number_match(prediction: str, references: Sequence[str], meta: Mapping[str, Any]) -> float:
    """InfiniteBench math_find: the prediction's first unsigned number (``12`` or ``12.5``) equals the answer."""
    match = re.search(r"\d+\.\d+|\d+", prediction)
    return float(match is not None and any(_same_number(match.group(0), r) for r in references))


def last_word_number(prediction: str, references: Sequence[str], meta: Mapping[str, Any]) -> float:
    """InfiniteBench code_run: the prediction's last word (after ``\\n . ` ' " :`` become spaces) is an integer
    equal to the answer; ``The output is x12`` is wrong."""
    words = _split_words(prediction.strip(), _INFBENCH_CODE_SEPARATORS)
    try:
        value = int(words[-1]) if words else None
    except ValueError:
        value = None
    return float(value is not None and any(_same_number(str(value), r) for r in references))


def _same_number(a: str, b: str) -> bool:
    try:
        return math.isclose(float(a), float(str(b).strip()), rel_tol=0, abs_tol=1e-9)
    except ValueError:
        return False


def word_match(prediction: str, references: Sequence[str], meta: Mapping[str, Any]) -> float:
    """InfiniteBench kv_retrieval: the answer (a UUID) is one of the prediction's words, case-sensitive (words are
    split at white space and ``\\n : " ' . , ? ! { }``)."""
    words = _split_words(prediction, _INFBENCH_WORD_SEPARATORS)
    return float(any(str(r).strip() in words for r in references if str(r).strip()))


def name_match(prediction: str, references: Sequence[str], meta: Mapping[str, Any]) -> float:
    """InfiniteBench longdialogue_qa_eng: the answer (the speaker's name, upper case in the data) is one of the
    prediction's words, compared in upper case (words split as in :func:`word_match`)."""
    words = {w.upper() for w in _split_words(prediction, _INFBENCH_WORD_SEPARATORS)}
    return float(any(str(r).strip().upper() in words for r in references if str(r).strip()))


def sequence_accuracy(prediction: str, references: Sequence[str], meta: Mapping[str, Any]) -> float:
    """InfiniteBench math_calc: the share of the reference numbers reproduced in order before the first error; the
    prediction's numbers are its runs of digits."""
    expected = [str(r).strip() for r in references]
    got = _digit_runs(prediction)
    correct = 0
    for a, b in zip(got, expected):
        if not _same_number(a, b):
            break
        correct += 1
    return correct / len(expected) if expected else 0.0


def _parse_mapping(text: str) -> dict[str, str]:
    """``<mask-i>: value`` pairs from a cloze answer or prediction (a dict literal or free text), without eval."""
    try:
        value = ast.literal_eval(text.strip())
        if isinstance(value, Mapping):
            return {str(k).strip(): str(v).strip() for k, v in value.items()}
    except (ValueError, SyntaxError):
        pass
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"(<mask-\d+>)[\"']?\s*:\s*[\"']?([^\"'\n,}]+)", text)}


def _cloze_gold(references: Sequence[str]) -> dict[str, str]:
    return next((gold for gold in map(_parse_mapping, references) if gold), {})


def cloze_match(prediction: str, references: Sequence[str], meta: Mapping[str, Any]) -> float:
    """LooGLE cloze, exact match as its ``get_exact_match`` counts it: the share of the reference's masks whose
    predicted entity is exactly the reference's (case and punctuation count). The task score pools the masks of
    all samples (its ``get_match_score``: matches over masks), through :attr:`weight`: a sample with three masks
    weighs three times one with one."""
    gold = _cloze_gold(references)
    if not gold:
        return 0.0
    predicted = _parse_mapping(prediction)
    return sum(predicted.get(k) == v for k, v in gold.items()) / len(gold)


cloze_match.weight = lambda prediction, references, meta: max(1, len(_cloze_gold(references)))  # masks pooled


def exponential_similarity(prediction: str, references: Sequence[str], meta: Mapping[str, Any]) -> float:
    """ZeroSCROLLS SpaceDigest: predicted percentage ``p`` vs reference ``g`` scores ``0.5 ** (|p - g| / 10)`` —
    full credit when exact, halved for every 10 points off (our reading of the paper's exponential similarity)."""
    numbers = _NUMBER.findall(prediction)
    if not numbers:
        return 0.0
    p = float(numbers[0])
    return max(0.5 ** (abs(p - float(_NUMBER.findall(r)[0])) / 10) for r in references if _NUMBER.findall(r))


def concordance_index(prediction: str, references: Sequence[str], meta: Mapping[str, Any]) -> float:
    """ZeroSCROLLS BookSumSort: share of pairs of summaries whose relative order in the predicted permutation
    matches the reference order; a summary missing from the prediction makes its pairs discordant."""
    best = 0.0
    for ref in references:
        gold = [int(x) for x in _INT.findall(ref)]
        if len(gold) < 2:
            continue
        position: dict[int, int] = {}
        for x in (int(v) for v in _INT.findall(prediction)):
            if x in gold and x not in position:
                position[x] = len(position)
        pairs = [(a, b) for i, a in enumerate(gold) for b in gold[i + 1 :]]
        good = sum(a in position and b in position and position[a] < position[b] for a, b in pairs)
        best = max(best, good / len(pairs))
    return best


def boxed(text: str, last: bool = True) -> str | None:
    r"""The content of the last (or first) ``\boxed{...}`` / ``\fbox{...}`` in ``text``, nested braces included."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    start = starts[-1] if last else starts[0]
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None


def _integer_answer(text: str) -> int | None:
    r"""``text`` as one integer once thousands separators (``1{,}024``, ``1,024``), ``$``, spaces, ``	ext{}``
    wrappers, degrees and a trailing period are dropped; None when anything else is left (``3.5``, ``rac{7}{3}``,
    ``x = 5``)."""
    s = re.sub(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}", r"\1", text)
    for piece in ("{,}", ",", "\\!", "\\,", "$", "^\\circ", "^{\\circ}", " "):
        s = s.replace(piece, "")
    s = s.rstrip(".")
    return int(s) if re.fullmatch(r"[+-]?\d+", s) else None


def aime_match(prediction: str, references: Sequence[str], meta: Mapping[str, Any]) -> float:
    r"""AIME: the final answer equals the reference integer. The final answer is the last ``oxed{}``, which must
    hold exactly one integer (:func:`_integer_answer`: ``oxed{3.5}`` or ``oxed{rac{7}{3}}`` is wrong, not
    their last digits); without a box, the last integer of the prediction."""
    answer = boxed(prediction)
    if answer is not None:
        value = _integer_answer(answer)
    else:
        numbers = _INT.findall(prediction)
        value = int(numbers[-1]) if numbers else None
    if value is None:
        return 0.0
    return float(any(value == int(_INT.findall(str(r))[0]) for r in references if _INT.findall(str(r))))


def normalize_math(answer: str) -> str:
    """Normalise a LaTeX final answer for comparison: drop spaces, ``$`` and ``\\$``, ``\\left``/``\\right``, the
    thin spaces ``\\!``/``\\,``/``\\;``, degrees, ``\\text{}`` wrappers and a trailing period; ``{,}`` → ``,``;
    ``dfrac``/``tfrac`` → ``frac``; ``\\frac12`` → ``\\frac{1}{2}``; ``0.50`` → ``0.5``; a leading ``x =`` is
    dropped. Commas stay (``32,000`` and ``32000`` are compared by value, see :func:`math_equivalent`)."""
    s = answer.strip()
    s = s.replace("\\$", "").replace("{,}", ",")  # an escaped dollar (\$18.90) goes before "$" alone is dropped
    s = re.sub(r"\\text\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\mbox\s*\{([^{}]*)\}", r"\1", s)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("$", ""),
                     ("dfrac", "frac"), ("tfrac", "frac"), ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""),
                     ("%", "")):
        s = s.replace(old, new)
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"^[a-zA-Z]\w*=", "", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{(\d+)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)
    if re.fullmatch(r"-?\d+\.\d*", s):
        s = s.rstrip("0").rstrip(".") or "0"
    return s


_PLAIN_NUMBER = re.compile(r"-?\d*\.?\d+")
#: Thousands separators only when every group after the first has exactly three digits.
_GROUPED_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _math_value(s: str) -> float | None:
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(\d+)\}", s)
    if m:
        return (-1 if m.group(1) else 1) * int(m.group(2)) / int(m.group(3)) if int(m.group(3)) else None
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if m:
        return int(m.group(1)) / int(m.group(2)) if int(m.group(2)) else None
    if _PLAIN_NUMBER.fullmatch(s):
        return float(s)
    if _GROUPED_NUMBER.fullmatch(s):  # 32,000 / 1,234,567.5; "1,2" and "3,5,7" are lists, not numbers
        return float(s.replace(",", ""))
    return None


def math_equivalent(a: str, b: str) -> bool:
    """Equal after :func:`normalize_math`, or both simple numbers / fractions with the same value. A comma counts
    as a thousands separator only between groups of three digits (``32,000`` = 32000; ``1,2`` is a list)."""
    na, nb = normalize_math(a), normalize_math(b)
    if na == nb:
        return True
    va, vb = _math_value(na), _math_value(nb)
    return va is not None and vb is not None and math.isclose(va, vb, rel_tol=1e-9, abs_tol=1e-9)


def math_match(prediction: str, references: Sequence[str], meta: Mapping[str, Any]) -> float:
    """MATH500: the last ``\\boxed{}`` of the prediction is equivalent (:func:`math_equivalent`) to a reference."""
    answer = boxed(prediction)
    if answer is None:
        return 0.0
    return float(any(math_equivalent(answer, r) for r in references))


def _refs(fn: Callable[[str, Sequence[str]], float], first_line: bool = False) -> Metric:
    def metric(prediction: str, references: Sequence[str], meta: Mapping[str, Any]) -> float:
        return fn(_first_line(prediction) if first_line else prediction, references)

    metric.__doc__ = fn.__doc__
    return metric


#: Metric name -> function(prediction, references, metadata) in [0, 1].
HUB_METRICS: dict[str, Metric] = {
    "qa_f1": _refs(M.qa_f1),
    "qa_f1_zh": _refs(M.qa_f1_zh),
    "qa_f1_first_line": _refs(M.qa_f1, first_line=True),
    "rouge_l": _refs(M.max_rouge_l),
    "rouge_l_loogle": _refs(M.max_loogle_rouge_l),
    "rouge_lsum": _refs(M.max_rouge_lsum),
    "rouge_l_longbench_zh": _refs(M.max_longbench_rouge_l_zh),
    "rouge_l_longbench": _refs(M.max_longbench_rouge_l),
    "rouge_l_longbench_first_line": _refs(M.max_longbench_rouge_l, first_line=True),
    "rouge_gm": _refs(M.rouge_geometric_mean),
    "classification": classification_score,
    "classification_first_line": lambda p, r, m: classification_score(_first_line(p), r, m),
    "retrieval": retrieval_score,
    "count": count_score,
    "code_sim": code_similarity,
    "choice": choice_accuracy,
    "choice_longbench_v2": longbench_v2_accuracy,
    "first_digits": first_digits_match,
    "first_number": first_number_match,
    "last_number": last_word_number,
    "word_match": word_match,
    "name_match": name_match,
    "sequence": sequence_accuracy,
    "cloze": cloze_match,
    "exp_similarity": exponential_similarity,
    "concordance": concordance_index,
    "aime": aime_match,
    "math": math_match,
}


# ----------------------------------------------------------------------------------------------------------------
# LongBench (Bai et al., arXiv 2308.14508)
# ----------------------------------------------------------------------------------------------------------------


def _lb(config: str, metric: str, budget: int, family: str) -> HubTask:
    return HubTask(config, "test", metric, budget, family)


@register_benchmark("longbench")
class LongBench(HubBenchmark):
    """LongBench (Bai et al., arXiv 2308.14508): 21 tasks, each scored by the paper's task→metric mapping —
    QA F1 (English; Chinese counted per character instead of jieba words), ROUGE-L F for summarisation (as
    LongBench computes it: on the raw text, case kept, summary-level, :func:`kvsqueeze.evaluation.metrics.
    longbench_rouge_l`),
    classification accuracy (trec, lsht), passage retrieval / count accuracy, code edit similarity (lcc,
    repobench-p). trec, triviaqa, samsum and lsht are scored on the prediction's first line, as LongBench does.
    Generation budgets are the paper's (``TASKS``). Rows: ``context``, ``input`` (question), ``answers``,
    ``all_classes``. Options: see :class:`HubBenchmark`."""

    DATASET = "THUDM/LongBench"
    TASKS: ClassVar[dict[str, HubTask]] = {
        "narrativeqa": _lb("narrativeqa", "qa_f1", 128, "qa"),
        "qasper": _lb("qasper", "qa_f1", 128, "qa"),
        "multifieldqa_en": _lb("multifieldqa_en", "qa_f1", 64, "qa"),
        "multifieldqa_zh": _lb("multifieldqa_zh", "qa_f1_zh", 64, "qa"),
        "hotpotqa": _lb("hotpotqa", "qa_f1", 32, "qa"),
        "2wikimqa": _lb("2wikimqa", "qa_f1", 32, "qa"),
        "musique": _lb("musique", "qa_f1", 32, "qa"),
        "dureader": _lb("dureader", "rouge_l_longbench_zh", 128, "qa"),
        "gov_report": _lb("gov_report", "rouge_l_longbench", 512, "summary"),
        "qmsum": _lb("qmsum", "rouge_l_longbench", 512, "query_summary"),
        "multi_news": _lb("multi_news", "rouge_l_longbench", 512, "summary"),
        "vcsum": _lb("vcsum", "rouge_l_longbench_zh", 512, "summary"),
        "trec": _lb("trec", "classification_first_line", 64, "few_shot"),
        "triviaqa": _lb("triviaqa", "qa_f1_first_line", 32, "few_shot"),
        "samsum": _lb("samsum", "rouge_l_longbench_first_line", 128, "few_shot"),
        "lsht": _lb("lsht", "classification_first_line", 64, "few_shot"),
        "passage_count": _lb("passage_count", "count", 32, "count"),
        "passage_retrieval_en": _lb("passage_retrieval_en", "retrieval", 32, "retrieval"),
        "passage_retrieval_zh": _lb("passage_retrieval_zh", "retrieval", 32, "retrieval"),
        "lcc": _lb("lcc", "code_sim", 64, "code"),
        "repobench-p": _lb("repobench-p", "code_sim", 64, "code"),
    }
    #: family -> (context preface, question template, answer prefix)
    PROMPTS: ClassVar[dict[str, tuple[str, str, str]]] = {
        "qa": ("Read the text below; a question about it follows.\n\n", ("Answer the question from the text above "
               "as briefly as possible, without explanation.\n\nQuestion: {input}"), "Answer:"),
        "summary": ("", "Write a one-page summary of the text above.", "Summary:"),
        "query_summary": ("", "Answer the query about the transcript above in one or more sentences.\n\nQuery: {input}",
                          "Answer:"),
        "few_shot": ("Here are examples of the task.\n\n", "{input}", ""),
        "count": ("", ("How many distinct paragraphs are in the text above, once repeated ones are removed? Answer "
                  "with one number only."), "The number of distinct paragraphs is:"),
        "retrieval": ("Below are paragraphs, each with its number.\n\n", ("Which paragraph above is this abstract "
                      "taken from? Answer in the form \"Paragraph N\".\n\nAbstract: {input}"), "The answer is:"),
        "code": ("", "{input}Next line of code:", ""),
    }

    def to_sample(self, task: str, row: Mapping[str, Any], index: int) -> Sample:
        spec = self.TASKS[task]
        preface, template, prefix = self.PROMPTS[spec.family]
        question = template.format(input=str(_field(row, "input", default="")).strip()) or "Answer:"
        meta = {"all_classes": list(row.get("all_classes") or []), "length": row.get("length")}
        return self._sample(task, index, preface + str(_field(row, "context")), question,
                            _as_list(_field(row, "answers", "answer")), prefix, meta, row)


# ----------------------------------------------------------------------------------------------------------------
# LongBench-v2 (Bai et al., arXiv 2412.15204)
# ----------------------------------------------------------------------------------------------------------------


@register_benchmark("longbench_v2")
class LongBenchV2(HubBenchmark):
    """LongBench-v2 (Bai et al., arXiv 2412.15204): 503 multiple-choice questions over long contexts; accuracy
    of the option letter as its scorer extracts it (``The correct answer is (X)``, see
    :func:`longbench_v2_accuracy`). Rows: ``context``,
    ``question``, ``choice_A``–``choice_D``, ``answer`` (a letter), ``difficulty``, ``length``, ``domain``."""

    DATASET = "THUDM/LongBench-v2"
    TASKS: ClassVar[dict[str, HubTask]] = {"longbench_v2": HubTask(None, "train", "choice_longbench_v2", 128)}

    def to_sample(self, task: str, row: Mapping[str, Any], index: int) -> Sample:
        choices = "\n".join(f"({c}) {row.get(f'choice_{c}', '')}" for c in "ABCD")
        question = (
            f"What is the correct answer to this question: {row['question']}\nChoices:\n{choices}\n\n"
            "Reply in the form \"The correct answer is (X)\", where X is the letter of the answer."
        )
        meta = {k: row.get(k) for k in ("difficulty", "length", "domain")}
        context = f"Read the text below, then answer the question that follows it.\n\n<text>\n{row['context']}\n</text>"
        return self._sample(task, index, context, question, [str(row["answer"]).strip()], "", meta, row)


# ----------------------------------------------------------------------------------------------------------------
# InfiniteBench (Zhang et al., arXiv 2402.13718)
# ----------------------------------------------------------------------------------------------------------------


@register_benchmark("infinitebench")
class InfiniteBench(HubBenchmark):
    """InfiniteBench (Zhang et al., ∞Bench, arXiv 2402.13718): one split per task; metrics per the paper and its
    scorer (``compute_scores.py``) — first digit run equal as a string (passkey, number_string), first number
    (math_find), last word an equal integer (code_run), key among the words, case-sensitive (kv_retrieval), name
    among the words in upper case (longdialogue_qa_eng), option accuracy (longbook_choice_eng, code_debug), QA F1 (longbook_qa_eng; per
    character for longbook_qa_chn), ROUGE-Lsum F as ``evaluate``'s rouge computes it (longbook_sum_eng), in-order accuracy (math_calc). Budgets are the
    paper's. Rows: ``context``, ``input``, ``answer`` (list), ``options`` (list)."""

    DATASET = "xinrongzhang2022/InfiniteBench"
    TASKS: ClassVar[dict[str, HubTask]] = {
        "passkey": HubTask(None, "passkey", "first_digits", 6),
        "number_string": HubTask(None, "number_string", "first_digits", 12),
        "kv_retrieval": HubTask(None, "kv_retrieval", "word_match", 50),
        "longbook_sum_eng": HubTask(None, "longbook_sum_eng", "rouge_lsum", 1200),
        "longbook_choice_eng": HubTask(None, "longbook_choice_eng", "choice", 40),
        "longbook_qa_eng": HubTask(None, "longbook_qa_eng", "qa_f1", 40),
        "longbook_qa_chn": HubTask(None, "longbook_qa_chn", "qa_f1_zh", 40),
        "longdialogue_qa_eng": HubTask(None, "longdialogue_qa_eng", "name_match", 40),
        "math_find": HubTask(None, "math_find", "first_number", 3),
        "math_calc": HubTask(None, "math_calc", "sequence", 30000),
        "code_run": HubTask(None, "code_run", "last_number", 5),
        "code_debug": HubTask(None, "code_debug", "choice", 5),
    }

    def rows(self, task: str) -> list[dict]:
        files = self._files_for(task)
        if files is not None:
            return _read_file(_local_file(files, task))
        return load_rows(self.dataset, None, self.TASKS[task].split)

    def to_sample(self, task: str, row: Mapping[str, Any], index: int) -> Sample:
        options = _as_list(row.get("options") or [])
        answers = _as_list(_field(row, "answer", "answers"))
        question = str(row.get("input") or "").strip() or "Answer the question about the text above."
        meta: dict[str, Any] = {"options": options}
        if options:
            letters = "ABCD"[: len(options)]
            question += "\n\nOptions:\n" + "\n".join(f"({c}) {o}" for c, o in zip(letters, options))
            question += "\n\nAnswer with the letter of the correct option."
            answers = [letters[options.index(a)] for a in answers if a in options] + answers
        if task == "math_calc":
            answers = [str(a) for a in answers]
        return self._sample(task, index, str(row["context"]), question, answers, "Answer:", meta, row)


# ----------------------------------------------------------------------------------------------------------------
# LooGLE (Li et al., arXiv 2311.04939)
# ----------------------------------------------------------------------------------------------------------------


@register_benchmark("loogle")
class LooGLE(HubBenchmark):
    """LooGLE (Li et al., arXiv 2311.04939): short- and long-dependency QA and long-dependency summarisation
    (ROUGE-L recall as its automatic evaluation computes it, :func:`kvsqueeze.evaluation.metrics.loogle_rouge_l`;
    the paper also reports BLEU, METEOR and BERTScore, not computed here) and short-dependency cloze (exact match
    pooled over all masks, see :func:`cloze_match`; its partial match is not computed). Budgets from its
    ``config/task2maxlen.json``.
    Rows: ``context`` (or ``input``), ``question``, ``answer``."""

    DATASET = "bigainlp/LooGLE"
    TASKS: ClassVar[dict[str, HubTask]] = {
        "shortdep_qa": HubTask("shortdep_qa", "test", "rouge_l_loogle", 300, "qa"),
        "longdep_qa": HubTask("longdep_qa", "test", "rouge_l_loogle", 500, "qa"),
        "longdep_summarization": HubTask("longdep_summarization", "test", "rouge_l_loogle", 500, "summary"),
        "shortdep_cloze": HubTask("shortdep_cloze", "test", "cloze", 50, "cloze"),
    }
    QUESTIONS: ClassVar[dict[str, tuple[str, str]]] = {
        "qa": ("Answer the question from the document above, as briefly as possible.\n\nQuestion: {q}", "Answer:"),
        "summary": ("Summarise the document above.", "Summary:"),
        "cloze": (("Fill in the masks (<mask-0>, <mask-1>, ...) of the sentences below with entities from the "
                   "document above. Reply with a JSON object mapping each mask to its entity.\n\n{q}"), ""),
    }

    def to_sample(self, task: str, row: Mapping[str, Any], index: int) -> Sample:
        template, prefix = self.QUESTIONS[self.TASKS[task].family]
        question = template.format(q=str(row.get("question") or "").strip())
        answer = _field(row, "answer", "output")
        answers = [json.dumps(answer)] if isinstance(answer, Mapping) else _as_list(answer)
        return self._sample(task, index, str(_field(row, "context", "input")), question, answers, prefix,
                            {"title": row.get("title")}, row)


# ----------------------------------------------------------------------------------------------------------------
# ZeroSCROLLS (Shaham et al., arXiv 2305.14196)
# ----------------------------------------------------------------------------------------------------------------


@register_benchmark("zero_scrolls")
class ZeroScrolls(HubBenchmark):
    """ZeroSCROLLS (Shaham et al., arXiv 2305.14196), validation split (the test answers are hidden): ROUGE
    geometric mean of R-1/R-2/R-L (gov_report, summ_screen_fd, qmsum, squality), F1 (qasper, narrative_qa,
    musique), accuracy (quality), exponential similarity (space_digest, :func:`exponential_similarity`) and
    concordance index (book_sum_sort, :func:`concordance_index`). Rows: ``input`` with
    ``document_end_index``/``query_start_index``, ``output``; the input up to the end of the document is the
    context, the rest (query and instruction) the question."""

    DATASET = "tau/zero_scrolls"
    TASKS: ClassVar[dict[str, HubTask]] = {
        "gov_report": HubTask("gov_report", "validation", "rouge_gm", 1024),
        "summ_screen_fd": HubTask("summ_screen_fd", "validation", "rouge_gm", 512),
        "qmsum": HubTask("qmsum", "validation", "rouge_gm", 512),
        "squality": HubTask("squality", "validation", "rouge_gm", 512),
        "qasper": HubTask("qasper", "validation", "qa_f1", 128),
        "narrative_qa": HubTask("narrative_qa", "validation", "qa_f1", 64),
        "quality": HubTask("quality", "validation", "choice", 10),
        "musique": HubTask("musique", "validation", "qa_f1", 32),
        "space_digest": HubTask("space_digest", "validation", "exp_similarity", 10),
        "book_sum_sort": HubTask("book_sum_sort", "validation", "concordance", 128),
    }

    def to_sample(self, task: str, row: Mapping[str, Any], index: int) -> Sample:
        text = str(row["input"])
        end = row.get("document_end_index")
        end = int(end) if end is not None and 0 < int(end) <= len(text) else len(text)
        context, question = text[:end], text[end:].strip() or "Answer:"
        answers = _as_list(_field(row, "output", "outputs"))
        return self._sample(task, index, context, question, answers, "", {}, row)


# ----------------------------------------------------------------------------------------------------------------
# AIME25 and MATH500 (reasoning: the problem is the context, compressed while decoding)
# ----------------------------------------------------------------------------------------------------------------

MATH_INSTRUCTION = "Reason step by step, and put your final answer within \\boxed{}."


@register_benchmark("aime25")
class Aime25(HubBenchmark):
    """AIME 2025 (30 problems, integer answers 0–999): exact match of the final integer (last ``\\boxed{}``, else
    the last integer of the output). Rows: ``problem`` (or ``question``), ``answer``. The problem is the context,
    the instruction the question; budget 32,000 tokens (kvpress' ``evaluate_aime`` default)."""

    DATASET = "math-ai/aime25"
    TASKS: ClassVar[dict[str, HubTask]] = {"aime25": HubTask(None, "test", "aime", 32000)}

    def to_sample(self, task: str, row: Mapping[str, Any], index: int) -> Sample:
        return self._sample(task, index, str(_field(row, "problem", "question")), MATH_INSTRUCTION,
                            [str(_field(row, "answer")).strip()], "", {}, row)


@register_benchmark("math500")
class Math500(HubBenchmark):
    """MATH-500 (the 500-problem subset of MATH, Hendrycks et al., arXiv 2103.03874, chosen by Lightman et al.,
    arXiv 2305.20050): the last ``\\boxed{}`` of the output, normalised (:func:`normalize_math`), equals the
    reference answer or has the same numeric value. Rows: ``problem``, ``answer``, ``subject``, ``level``."""

    DATASET = "HuggingFaceH4/MATH-500"
    TASKS: ClassVar[dict[str, HubTask]] = {"math500": HubTask(None, "test", "math", 32000)}

    def to_sample(self, task: str, row: Mapping[str, Any], index: int) -> Sample:
        meta = {k: row[k] for k in ("subject", "level") if k in row}
        return self._sample(task, index, str(_field(row, "problem", "question")), MATH_INSTRUCTION,
                            [str(_field(row, "answer")).strip()], "", meta, row)
