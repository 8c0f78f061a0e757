"""Needle-in-a-haystack cases over the shipped Paul Graham essays: a 7-digit number hidden in filler text.

Used by the real-model tests and the demo to compare presses on identical cases. Deterministic by seed; the
haystack length is measured in tokens of the model's own tokenizer.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from kvsqueeze.corpus import essays

NEEDLE = "The special magic number for {key} is {value}."
QUESTION = "What is the special magic number for {key}? Answer with the number only."
ANSWER_PREFIX = "The special magic number for {key} is"
KEYS = ("the blue lighthouse", "the silver kettle", "the quiet orchard", "the paper tiger", "the winter garden",
        "the copper bridge", "the hidden harbor", "the amber forest", "the marble staircase", "the velvet river",
        "the iron compass", "the crimson lantern")


@dataclass(frozen=True)
class NeedleCase:
    """One haystack with one needle."""

    context: str
    question: str
    answer: str
    depth: float  # where the needle sits, as a fraction of the haystack
    answer_prefix: str = ""  # generation starts after it (as in RULER), so short budgets reach the number

    def is_correct(self, prediction: str) -> bool:
        return self.answer in prediction


def haystack(tokenizer, n_tokens: int, seed: int = 0) -> str:
    """About ``n_tokens`` tokens of essay text, starting at a seed-dependent essay, cut at a sentence end."""
    if n_tokens < 16:
        raise ValueError(f"n_tokens must be >= 16, got {n_tokens}")
    docs = essays()
    rng = random.Random(seed)
    start = rng.randrange(len(docs))
    text = ""
    i = start
    while len(tokenizer(text, add_special_tokens=False).input_ids) < n_tokens:
        text += docs[i % len(docs)].strip() + "\n\n"
        i += 1
        if i - start > 4 * len(docs):
            raise ValueError(f"the essays are too short for {n_tokens} tokens")
    ids = tokenizer(text, add_special_tokens=False).input_ids[:n_tokens]
    cut = tokenizer.decode(ids)
    end = cut.rfind(". ")
    return cut[: end + 1] if end > len(cut) // 2 else cut


def insert_needle(text: str, needle: str, depth: float) -> str:
    """``text`` with ``needle`` inserted after the sentence (split on ``". "``) at fraction ``depth`` of its
    sentences (at least after the first one)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a fraction in [0, 1], got {depth!r}")
    sentences = text.split(". ")
    at = max(1, int(len(sentences) * depth))
    return ". ".join(sentences[:at]) + ". " + needle + " " + ". ".join(sentences[at:])


def insert_at_depth(text: str, needle: str, depth: float) -> str:
    """``text`` with ``needle`` inserted at the sentence boundary (after ``.``, ``!`` or ``?``) nearest to
    fraction ``depth`` of its characters: 0 puts it first, 1 last."""
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a fraction in [0, 1], got {depth!r}")
    bounds = [0, *(m.end() for m in re.finditer(r"(?<=[.!?])\s+", text)), len(text)]
    at = min(bounds, key=lambda b: abs(b - depth * len(text)))
    if at == 0:
        return f"{needle} {text}"
    if at == len(text):
        return f"{text.rstrip()} {needle}"
    return f"{text[:at]}{needle} {text[at:]}"


def needle_cases(tokenizer, n_cases: int = 12, n_tokens: int = 1500, seed: int = 0) -> list[NeedleCase]:
    """``n_cases`` haystacks of about ``n_tokens`` tokens, each with a 7-digit needle at a spread of depths."""
    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}")
    rng = random.Random(seed)
    cases = []
    for i in range(n_cases):
        text = haystack(tokenizer, n_tokens, seed=seed + i)
        key = KEYS[i % len(KEYS)]
        value = str(rng.randrange(1_000_000, 10_000_000))
        depth = (i + 0.5) / n_cases * 0.9 + 0.05
        context = insert_needle(text, NEEDLE.format(key=key, value=value), depth)
        cases.append(NeedleCase(context, QUESTION.format(key=key), value, depth, ANSWER_PREFIX.format(key=key)))
    return cases
