"""Needle in a haystack over the shipped Paul Graham essays: a grid of context lengths × needle depths.

The classic pressure test (G. Kamradt, 2023; the NIAH heatmaps of Q-Filters, arXiv 2503.02812 Fig. 6, and
Expected Attention, arXiv 2510.00636 Fig. 3): a one-sentence fact — here the 7-digit "special magic number" of
:mod:`kvsqueeze.needles` — is hidden at a given depth of an essay haystack of a given length, and the model is
asked for it. A cell scores the share of its samples whose answer contains the number; :func:`niah_heatmap` draws
the length × depth grid.
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from kvsqueeze.evaluation.base import Benchmark, Prediction, Sample, register_benchmark
from kvsqueeze.evaluation.metrics import aggregate, string_match_all
from kvsqueeze.evaluation.ruler import largest_fitting
from kvsqueeze.needles import ANSWER_PREFIX, KEYS, NEEDLE, QUESTION, haystack, insert_at_depth

TASK = "niah"
DEFAULT_LENGTHS = (1000, 2000, 4000)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
MAX_NEW_TOKENS = 16  # a 7-digit number after the answer prefix


def cell_key(length: int, depth: float) -> str:
    """Score key of one grid cell: ``niah_<length>_<depth in percent>``, e.g. ``niah_2000_25``."""
    return f"{TASK}_{length}_{_pct(depth)}"


def _pct(depth: float) -> str:
    return f"{round(depth * 100, 2):g}"


def _n_tokens(tokenizer, *texts: str) -> int:
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)


@register_benchmark("niah")
class NeedleInAHaystack(Benchmark):
    """Needle-in-a-haystack grid over the essays (see the module docstring).

    Parameters
    ----------
    lengths : sequence of int, default (1000, 2000, 4000)
        Target lengths of context + question in tokens of the evaluated model's tokenizer (each >= 64); the
        haystack is cut at a word so that a sample lands just below its length.
    depths : sequence of float, default (0, 0.25, 0.5, 0.75, 1)
        Needle depths as fractions of the haystack, in [0, 1]; the needle goes to the nearest sentence boundary
        (:func:`kvsqueeze.needles.insert_at_depth`). Scores and sample ids name a depth by its percentage rounded
        to 0.01, so depths that round alike are refused.
    n_per_cell : int, default 1
        Samples per (length, depth) cell, each with its own key, number and haystack start.

    Every sample has task ``"niah"`` and ``metadata`` ``length``, ``depth`` and ``n_tokens`` (measured).
    ``samples(limit=...)`` caps the samples per cell.
    """

    tasks = (TASK,)

    def __init__(
        self,
        lengths: Sequence[int] = DEFAULT_LENGTHS,
        depths: Sequence[float] = DEFAULT_DEPTHS,
        n_per_cell: int = 1,
    ):
        if isinstance(lengths, int) and not isinstance(lengths, bool):
            lengths = [lengths]
        if isinstance(depths, (int, float)) and not isinstance(depths, bool):
            depths = [depths]
        for name, value, example in (("lengths", lengths, "[1000, 2000]"), ("depths", depths, "[0.0, 0.5, 1.0]")):
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
                raise TypeError(f"{name} must be a number or a list of numbers (e.g. {example}), got {value!r}")
        lengths, depths = list(lengths), list(depths)
        if not lengths or not depths:
            raise ValueError("lengths and depths must each name at least one value")
        for n in lengths:
            if isinstance(n, bool) or not isinstance(n, int) or n < 64:
                raise ValueError(f"lengths must be ints >= 64 (tokens), got {n!r}")
        for d in depths:
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0:
                raise ValueError(f"depths must be fractions in [0, 1], got {d!r}")
        if isinstance(n_per_cell, bool) or not isinstance(n_per_cell, int) or n_per_cell < 1:
            raise ValueError(f"n_per_cell must be a positive int, got {n_per_cell!r}")
        self.lengths = tuple(sorted(set(lengths)))
        self.depths = tuple(sorted({float(d) for d in depths}))
        by_key: dict[str, float] = {}
        for d in self.depths:  # scores and sample ids name a depth by its percentage to 0.01
            if _pct(d) in by_key:
                raise ValueError(
                    f"depths {by_key[_pct(d)]!r} and {d!r} are both reported as {_pct(d)}% (score key "
                    f"{cell_key(self.lengths[0], d)!r}, sample ids likewise): depths must stay distinct when "
                    "rounded to 0.01%"
                )
            by_key[_pct(d)] = d
        self.n_per_cell = n_per_cell

    def sample_lengths(self) -> tuple[str, list[int], float]:
        # a sample falls short of its length by less than a word; RULER's 2% bound is a safe one here too
        return "--lengths", list(self.lengths), 0.02

    def config(self) -> dict[str, Any]:
        return {"lengths": list(self.lengths), "depths": list(self.depths), "n_per_cell": self.n_per_cell}

    def samples(self, tokenizer, limit: int | None = None, seed: int = 0) -> Iterator[Sample]:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit must be a positive int or None, got {limit!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if not callable(tokenizer):
            raise TypeError(f"NIAH measures lengths with the evaluated model's tokenizer; got {tokenizer!r}")
        per_cell = self.n_per_cell if limit is None else min(limit, self.n_per_cell)
        total = len(self.lengths) * len(self.depths) * per_cell
        with tqdm(total=total, desc="NIAH", unit="sample", disable=None) as bar:
            for length in self.lengths:
                for depth in self.depths:
                    for i in range(per_cell):
                        yield self._sample(tokenizer, length, depth, i, seed)
                        bar.update()

    def _sample(self, tokenizer, length: int, depth: float, index: int, seed: int) -> Sample:
        rng = random.Random(f"niah:{seed}:{length}:{depth}:{index}")
        key = rng.choice(KEYS)
        value = str(rng.randrange(1_000_000, 10_000_000))
        needle = NEEDLE.format(key=key, value=value)
        question = QUESTION.format(key=key)
        budget = length - _n_tokens(tokenizer, needle + " ", question)
        if budget < 16:
            raise ValueError(f"length {length} is too short for a needle and its question ({length - budget} tokens)")
        # A little more essay text than needed, then as many of its words as fit (context + question <= length).
        words = re.findall(r"\S+\s*", haystack(tokenizer, 2 * budget + 64, seed=rng.randrange(1 << 30)))

        def build(n: int) -> str:
            return insert_at_depth("".join(words[:n]).rstrip(), needle, depth)

        def measure(n: int) -> int:
            return _n_tokens(tokenizer, build(n), question) if n <= len(words) else 1 << 62

        context = build(largest_fitting(measure, length, start=1))
        return Sample(
            id=f"niah-{length}-{_pct(depth)}-{seed}-{index}",
            task=TASK,
            context=context,
            questions=(question,),
            answers=((value,),),
            answer_prefix=ANSWER_PREFIX.format(key=key),
            max_new_tokens=MAX_NEW_TOKENS,
            metadata={"length": length, "depth": depth, "n_tokens": _n_tokens(tokenizer, context, question)},
        )

    def score(self, predictions: Sequence[Prediction]) -> dict[str, float]:
        """``niah`` (share of needles found, 0–100) and ``average`` (the same: one task), plus the breakdowns
        ``niah_<length>`` per length and ``niah_<length>_<depth %>`` per cell (:func:`cell_key`)."""
        scores = cell_scores(predictions)
        result = aggregate((TASK, string_match_all(p.prediction, p.answers)) for p in predictions)
        for length in sorted({length for length, _ in scores}):
            cells = [scores[c] for c in scores if c[0] == length]
            result[f"{TASK}_{length}"] = round(sum(cells) / len(cells), 2)
        for (length, depth), value in sorted(scores.items()):
            result[cell_key(length, depth)] = value
        return result


def cell_scores(predictions: Sequence[Prediction]) -> dict[tuple[int, float], float]:
    """``{(length, depth): share of needles found, 0–100}`` over NIAH predictions (their metadata names the cell)."""
    cells: dict[tuple[int, float], list[float]] = {}
    for p in predictions:
        if not isinstance(p, Prediction):
            raise TypeError(f"expected Prediction rows, got {type(p).__name__}")
        try:
            cell = (int(p.metadata["length"]), float(p.metadata["depth"]))
        except KeyError as exc:
            raise ValueError(
                f"prediction {p.sample_id!r} has no {exc.args[0]!r} in its metadata: not a NIAH row"
            ) from exc
        cells.setdefault(cell, []).append(string_match_all(p.prediction, p.answers))
    return {cell: round(100 * sum(v) / len(v), 2) for cell, v in cells.items()}


_CELL = re.compile(rf"^{TASK}_(\d+)_(\d+(?:\.\d+)?)$")


def _grid(data) -> dict[tuple[int, float], float]:
    if isinstance(data, Mapping):
        grid = {}
        for key, value in data.items():
            if isinstance(key, tuple) and len(key) == 2:
                grid[(int(key[0]), float(key[1]))] = float(value)
            elif isinstance(key, str) and (m := _CELL.match(key)):
                grid[(int(m.group(1)), float(m.group(2)) / 100)] = float(value)
        if not grid:
            raise ValueError("no NIAH cells in the mapping: expected (length, depth) keys or 'niah_<len>_<depth%>'")
        return grid
    return cell_scores(list(data))


def niah_heatmap(predictions_or_scores, path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw the length × depth grid of NIAH scores as a PNG heatmap (matplotlib, Agg backend).

    Parameters
    ----------
    predictions_or_scores : sequence of Prediction, or mapping
        NIAH predictions, :func:`cell_scores` output, or :meth:`NeedleInAHaystack.score` output.
    path : str or path
        Where the PNG goes (parent directories are created).
    title : str, optional

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grid = _grid(predictions_or_scores)
    lengths = sorted({length for length, _ in grid})
    depths = sorted({depth for _, depth in grid})
    values = [[grid.get((length, depth), float("nan")) for length in lengths] for depth in depths]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A bare Figure on an Agg canvas: no pyplot, so no global backend switch and nothing left open.
    fig = Figure(figsize=(2.2 + 0.9 * len(lengths), 1.5 + 0.5 * len(depths)))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(values, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{_pct(d)}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for r, row in enumerate(values):
        for c, value in enumerate(row):
            if not math.isnan(value):
                ax.text(c, r, f"{value:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="needles found (%)")
    ax.set_title(title or "Needle in a haystack")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return path
