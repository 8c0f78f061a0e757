"""The benchmark contract: rows in, named metrics out.

A benchmark is a small class that

* yields :class:`Sample` rows — a ``context`` that is prefilled and compressed once, one or more ``questions``
  asked against it, their reference ``answers``, the ``answer_prefix`` generation starts after, a
  ``max_new_tokens`` limit and the ``task`` it belongs to — from :meth:`Benchmark.samples`;
* turns a list of :class:`Prediction` rows into named metrics with :meth:`Benchmark.score`
  (``{task: score, ..., "average": score}``; scores on a 0–100 scale unless a metric says otherwise).

Benchmarks register themselves under a short name with :func:`register_benchmark`; :func:`make_benchmark` builds
one by name, and an unknown name raises an ``UnknownNameError`` (a ``KeyError`` and a ``ValueError``) suggesting
close matches.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from kvsqueeze.presses.registry import UnknownNameError


def _references(refs: Any, where: str, example: str) -> tuple[str, ...]:
    """``refs`` (a tuple or list of strings) as a tuple; anything else is a ``TypeError`` naming ``where``."""
    if isinstance(refs, str) or not isinstance(refs, (tuple, list)):
        raise TypeError(f"{where} must be a tuple of reference strings (e.g. {example}), got {refs!r}")
    for ref in refs:
        if not isinstance(ref, str):
            raise TypeError(f"{where} must hold strings, got {ref!r} in {refs!r}")
    return tuple(refs)


@dataclass(frozen=True)
class Sample:
    """One context with the questions asked about it.

    Attributes
    ----------
    id : str
        Unique within the benchmark (stable across runs with the same seed and options: results are keyed by it).
    task : str
        The task (sub-benchmark) the sample belongs to, e.g. ``"niah_single_1"``.
    context : str
        Text prefilled and compressed once.
    questions : tuple of str
        Asked one after the other against the same compressed context (never compressed themselves).
    answers : tuple of tuple of str
        Reference answers, one tuple per question.
    answer_prefix : str
        Text that generation starts after (as in RULER), for every question of the sample.
    max_new_tokens : int
        Generation limit for every question of the sample.
    metadata : mapping
        Anything a metric or a report needs (needle depth, target length, choices, ...). JSON-serialisable.
    """

    id: str
    task: str
    context: str
    questions: tuple[str, ...]
    answers: tuple[tuple[str, ...], ...]
    answer_prefix: str = ""
    max_new_tokens: int = 32
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.questions, tuple) or not isinstance(self.answers, tuple):
            raise TypeError(f"sample {self.id!r}: questions and answers must be tuples")
        if not self.questions:
            raise ValueError(f"sample {self.id!r} has no question")
        for question in self.questions:
            if not isinstance(question, str):
                raise TypeError(f"sample {self.id!r}: questions must be strings, got {question!r}")
        if len(self.answers) != len(self.questions):
            raise ValueError(
                f"sample {self.id!r}: {len(self.questions)} questions but {len(self.answers)} answer tuples"
            )
        # One tuple of reference strings per question; a list is accepted and stored as a tuple. A bare string is
        # refused: taken as a tuple it would be its characters, each one a reference that a single digit matches.
        object.__setattr__(
            self, "answers", tuple(_references(refs, f"sample {self.id!r}: answers[{i}]", "answers=(('4738215',),)")
                                   for i, refs in enumerate(self.answers))
        )
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"sample {self.id!r}: max_new_tokens must be a positive int, got {self.max_new_tokens!r}")


@dataclass(frozen=True)
class Prediction:
    """What the model answered to one question of one sample."""

    sample_id: str
    task: str
    question_index: int
    prediction: str
    answers: tuple[str, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "answers", _references(self.answers, f"prediction {self.sample_id!r}: answers", "('4738215',)")
        )

    @classmethod
    def of(cls, sample: Sample, question_index: int, prediction: str) -> Prediction:
        """The prediction for question ``question_index`` of ``sample``."""
        return cls(
            sample.id, sample.task, question_index, prediction, tuple(sample.answers[question_index]),
            dict(sample.metadata),
        )


def parse_json(text: str, where: str | Path, line: int | None = None) -> Any:
    """``json.loads(text)``; malformed JSON is a ValueError naming the file (and its line, for JSON Lines) and where
    in it the parser stopped (``json``'s own message names neither the file nor, for a JSONL row, its line)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        at = f"line {line}, column {exc.colno}" if line is not None else f"line {exc.lineno}, column {exc.colno}"
        raise ValueError(f"{where}: not valid JSON at {at} ({exc.msg})") from None


def read_json(path: str | Path) -> Any:
    """The JSON value in ``path`` (UTF-8); see :func:`parse_json` for malformed files."""
    return parse_json(Path(path).read_text(encoding="utf-8"), path)


class Benchmark(ABC):
    """Base class of every benchmark: rows (:meth:`samples`) and their scoring (:meth:`score`).

    Subclasses set ``name`` (via :func:`register_benchmark`) and ``tasks`` (the task names ``samples`` may yield),
    take their options as constructor keyword arguments, validate them there (clear ``ValueError``/``TypeError``),
    and hold no per-run state.
    """

    name: ClassVar[str] = ""
    tasks: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def samples(self, tokenizer, limit: int | None = None, seed: int = 0) -> Iterator[Sample]:
        """Yield at most ``limit`` samples per task, deterministically for a given ``seed``.

        ``tokenizer`` is the evaluated model's tokenizer (generated benchmarks measure lengths with it).
        """

    @abstractmethod
    def score(self, predictions: Sequence[Prediction]) -> dict[str, float]:
        """Named metrics for ``predictions``: one per task present plus ``"average"`` (mean over those tasks)."""

    def config(self) -> dict[str, Any]:
        """The options that define the rows (part of the results directory key). JSON-serialisable."""
        return {}

    def sample_lengths(self) -> tuple[str, list[int], float] | None:
        """For benchmarks whose samples have target lengths in tokens (context + question): ``(option, lengths,
        tolerance)``, where every sample of length ``n`` holds at least ``(1 - tolerance) · n`` tokens and
        ``option`` names the setting (the CLI flag); ``kvsqueeze eval`` refuses lengths that cannot fit in the
        model before building any sample. None (the default) when lengths mean something else or are not set."""
        return None

    def check_data(self) -> None:
        """Raise now if the rows cannot be had (data files missing, hub unreachable, ...), before any model work.

        Called by :func:`~kvsqueeze.evaluation.sweep.run_sweep` before it creates the results directory and by
        ``kvsqueeze eval`` before it loads the model. The default (generated benchmarks) checks nothing.
        """


B = TypeVar("B", bound=type[Benchmark])
_REGISTRY: dict[str, type[Benchmark]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def register_benchmark(name: str):
    """Class decorator registering a benchmark under ``name`` (lowercase, digits and underscores)."""
    if not _NAME.match(name):
        raise ValueError(f"benchmark names are lowercase identifiers, got {name!r}")

    def decorator(cls: B) -> B:
        if not (isinstance(cls, type) and issubclass(cls, Benchmark)):
            raise TypeError(f"only Benchmark subclasses can be registered, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"benchmark name {name!r} is already registered by {_REGISTRY[name].__name__}")
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return decorator


def _load_builtin() -> None:
    """Import the shipped benchmark modules so they register themselves."""
    import importlib

    for module in ("ruler", "niah", "hub"):
        try:
            importlib.import_module(f"kvsqueeze.evaluation.{module}")
        except ModuleNotFoundError as exc:  # a module not written yet; anything else is a real error
            if exc.name != f"kvsqueeze.evaluation.{module}":
                raise


def list_benchmarks() -> list[str]:
    """Names of every registered benchmark, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def benchmark_class(name: str) -> type[Benchmark]:
    """The class registered under ``name``; an unknown name raises ``UnknownNameError`` (a ``KeyError`` and a
    ``ValueError``) with close matches."""
    if not isinstance(name, str):
        raise TypeError(f"benchmark name must be a string, got {name!r}")
    _load_builtin()
    key = name.strip().lower().replace("-", "_")
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownNameError(f"unknown benchmark {name!r}.{hint} Known benchmarks: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def make_benchmark(name: str, **options: Any) -> Benchmark:
    """Build a benchmark by name, e.g. ``make_benchmark("ruler", length=2048, tasks=["niah_single_1"])``."""
    return benchmark_class(name)(**options)


def data_digest(files: Any) -> Any:
    """Local data files as a benchmark's ``config()`` (and so a sweep's results key) should name them: each with
    the sha256 of its contents (a directory: of every file in it, by relative path), so that rewriting a data file
    in place gives new results instead of reusing the old predictions. Accepts a path, a list of paths or a
    ``{task: path}`` mapping; a name that is not a local file or directory (a hub reference) is returned as given.
    File digests are computed once per state of the file (:func:`kvsqueeze.models.file_sha256`)."""
    from kvsqueeze.models import file_sha256

    if isinstance(files, Mapping):
        return {str(k): data_digest(v) for k, v in sorted(files.items(), key=lambda kv: str(kv[0]))}
    if isinstance(files, (list, tuple)):
        return [data_digest(f) for f in files]
    if files is None:
        return None
    path = Path(files).expanduser()
    if path.is_file():
        digest = file_sha256(path)
    elif path.is_dir():
        listing = "".join(f"{p.relative_to(path)}\0{file_sha256(p)}\n" for p in sorted(path.rglob("*")) if p.is_file())
        digest = hashlib.sha256(listing.encode()).hexdigest()
    else:
        return str(files)
    return {"path": str(files), "sha256": digest}
