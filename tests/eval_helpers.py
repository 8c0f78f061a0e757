"""A small needle benchmark for the evaluation tests, built on the character tokenizer (no files, no network).

Two tasks: ``single`` (one question) and ``double`` (two questions on the same context, so a unit holds several
predictions). Contexts are ~100 characters (tokens) so the tiny models (256 positions) fit context + question +
answer. Rows carry ``length`` and ``depth`` metadata, like the "niah" benchmark, so the report draws heatmaps.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Iterator, Sequence

from kvsqueeze.evaluation.base import Benchmark, Prediction, Sample, register_benchmark

WORDS = ("apple", "river", "stone", "cloud", "maple", "ember", "frost", "lumen", "quartz", "delta")


@register_benchmark("tiny_needles")
class TinyNeedles(Benchmark):
    """Needle rows: filler words with "The code is NNN." at a seeded depth; string-match scores (0-100)."""

    tasks = ("single", "double")

    def __init__(self, length: int = 100, tasks: Sequence[str] | None = None):
        if isinstance(length, bool) or not isinstance(length, int) or length < 40:
            raise ValueError(f"length must be an int >= 40, got {length!r}")
        self.length = length
        self.selected = tuple(tasks) if tasks else self.tasks
        for task in self.selected:
            if task not in self.tasks:
                raise ValueError(f"unknown task {task!r}; known: {self.tasks}")

    def samples(self, tokenizer, limit: int | None = None, seed: int = 0) -> Iterator[Sample]:
        for task in self.selected:
            rng = random.Random(f"{task}-{seed}")
            for i in range(limit or 3):
                words = []
                while len(" ".join(words)) < self.length:
                    words.append(rng.choice(WORDS))
                depth = (i % 3) / 2
                code = str(rng.randrange(100, 1000))
                at = int(len(words) * depth)
                context = " ".join(words[:at] + [f"The code is {code}."] + words[at:])
                questions: tuple[str, ...] = ("What is the code?",)
                answers: tuple[tuple[str, ...], ...] = ((code,),)
                if task == "double":
                    questions += ("Which word comes first?",)
                    answers += ((words[0],),)
                yield Sample(
                    id=f"{task}-{i}", task=task, context=context, questions=questions, answers=answers,
                    answer_prefix=" Answer:", max_new_tokens=4,
                    metadata={"length": self.length, "depth": depth},
                )

    def score(self, predictions: Sequence[Prediction]) -> dict[str, float]:
        per_task: dict[str, list[float]] = {}
        for p in predictions:
            per_task.setdefault(p.task, []).append(100.0 * any(a in p.prediction for a in p.answers))
        scores = {task: sum(v) / len(v) for task, v in sorted(per_task.items())}
        scores["average"] = sum(scores.values()) / len(scores) if scores else 0.0
        return scores

    def config(self) -> dict:
        return {"length": self.length, "tasks": list(self.selected)}


def record_answers(monkeypatch) -> list[dict]:
    """Spy on ``CompressedContext.answer`` (still answering): the returned list gets the arguments of every call,
    defaults filled in (``question``, ``max_new_tokens``, ``answer_prefix``, ...)."""
    from kvsqueeze.pipeline import CompressedContext

    calls: list[dict] = []
    answer = CompressedContext.answer
    signature = inspect.signature(answer)

    def spy(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        calls.append({k: v for k, v in bound.arguments.items() if k != "self"})
        return answer(self, *args, **kwargs)

    monkeypatch.setattr(CompressedContext, "answer", spy)
    return calls
