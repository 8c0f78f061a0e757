"""The press test matrix, generated from ``kvsqueeze.list_presses()`` so that a newly registered press is tested.

Every registered press gets one or more :class:`PressCase` (constructor kwargs ordered from mild to aggressive).
A press missing from :data:`PRESS_KWARGS` / :data:`WRAPPERS` is still tested with its defaults plus
``compression_ratio``; if it cannot be built that way, :func:`press_cases` returns a case whose ``error`` makes
``test_matrix_covers_every_press`` fail with an instruction to register its kwargs here — never a skip.

What the tests need from a case is read from the built press's ``capabilities`` (never ``isinstance``):
``needs_attention_weights`` selects the eager model, ``calibration`` adds ``artifact=<path>`` from the
calibration fixture, ``uniform_layers`` and ``changes_positions`` change the expected lengths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import kvsqueeze
from kvsqueeze import make_press
from kvsqueeze.presses import Capabilities, Press, press_class

from conftest import build_tokenizer

#: Ratios for the invariants that depend on the ratio (0 is tested separately: bit-identical).
RATIOS = (0.25, 0.5, 0.75)

#: Plain presses: name -> list of constructor kwargs (mild -> aggressive), sized for 48-64 token contexts.
#: ``compression_ratio`` / ``budget`` are added by the tests.
PRESS_KWARGS: dict[str, list[dict[str, Any]]] = {
    "knorm": [{}],
    "random": [{"seed": 0}, {"seed": 7}],
    "streaming_llm": [{"n_sink": 4}, {"n_sink": 0}],
    "keydiff": [{}],
    "snapkv": [
        {"window_size": 8, "kernel_size": 5},
        {"window_size": 4, "kernel_size": 1, "pooling": "max"},
    ],
    "pyramidkv": [
        {"window_size": 4, "kernel_size": 3, "beta": 2.0},
        {"window_size": 8, "kernel_size": 7, "pooling": "max", "beta": 20.0},
    ],
    "tova": [{}],
    "observed_attention": [{}],
    "lagkv": [
        {"n_sink": 2, "lag_size": 8},
        {"n_sink": 4, "lag_size": 6, "cross_scoring": True},
    ],
    "expected_attention": [
        {"n_future_positions": 16, "n_sink": 2},
        {"n_future_positions": 64, "n_sink": 4, "use_covariance": False, "use_vnorm": False},
        {"n_future_positions": 8, "n_sink": 0, "epsilon": 0.02},
    ],
    "expected_attention_stats": [
        {"n_future_positions": 16, "n_sink": 2},
        {"n_future_positions": 32, "n_sink": 0, "use_covariance": False},
    ],
    "qfilters": [{}],
    # Threshold 0: every layer is lazy (uniform budgets); tests/test_simlayerkv.py checks the lazy decision.
    "simlayerkv": [{"lazy_threshold": 0.0}, {"lazy_threshold": 0.0, "n_initial": 0, "n_last": 4}],
    # The fixture's gates are trained for the first window; the second reuses them on purpose (budget arithmetic).
    "duo_attention": [{"n_sink": 2, "n_recent": 8}, {"n_sink": 0, "n_recent": 4, "allow_window_mismatch": True}],
    "kvzip": [
        {"tokenizer": build_tokenizer()},
        {"tokenizer": build_tokenizer(), "chunk_size": 16, "n_overlap": 4, "n_sink": 0, "layerwise": True},
    ],
}


def _split_ratio(ratio: float, n: int) -> list[float]:
    """``n`` equal ratios whose kept fractions multiply to ``1 - ratio``."""
    return [1.0 - (1.0 - ratio) ** (1.0 / n)] * n


def _composed(inner: list[tuple[str, dict[str, Any]]]) -> Callable:
    def build(ratio: float | None, budget: int | None, extra: Callable[[str], dict]) -> tuple[Press, Callable]:
        if budget is not None:  # the budget goes to the first press, the others keep everything
            ratios: list[float | None] = [None] * len(inner)
        else:
            ratios = _split_ratio(ratio, len(inner))
        presses = []
        for i, ((name, kwargs), r) in enumerate(zip(inner, ratios)):
            size = {"budget": budget} if (budget is not None and i == 0) else {"compression_ratio": r or 0.0}
            presses.append(make_press(name, **kwargs, **size, **extra(name)))

        def expected(seq_len: int) -> int:
            n = seq_len
            for i, r in enumerate(ratios):
                n = min(budget, n) if (budget is not None and i == 0) else _kept(n, r or 0.0)
            return n

        return make_press("composed", presses=presses), expected

    build.uses = {name for name, _ in inner}
    return build


def _rerotated(name: str, kwargs: dict[str, Any]) -> Callable:
    def build(ratio: float | None, budget: int | None, extra: Callable[[str], dict]) -> tuple[Press, Callable]:
        size = {"budget": budget} if budget is not None else {"compression_ratio": ratio}
        inner = make_press(name, **kwargs, **size, **extra(name))
        return make_press("key_rerotation", press=inner), _plain_expected(ratio, budget)

    build.uses = {name}
    return build


def _headwise(name: str, inner: tuple[str, dict[str, Any]], **fields: Any) -> Callable:
    """A head-wise wrapper (AdaKV-style) whose ratio/budget is set on the wrapper itself."""

    def build(ratio: float | None, budget: int | None, extra: Callable[[str], dict]) -> tuple[Press, Callable]:
        size = {"budget": budget} if budget is not None else {"compression_ratio": ratio}
        inner_press = make_press(inner[0], **inner[1], **extra(inner[0]))
        return make_press(name, press=inner_press, **fields, **size), _plain_expected(ratio, budget)

    build.uses = {inner[0]}
    return build


def _per_layer(inner: tuple[str, dict[str, Any]]) -> Callable:
    """Per-layer ratios ``r - 0.1, r, r + 0.1, ...`` (mean ``r``) on every layer of the tiny models."""

    def build(ratio: float | None, budget: int | None, extra: Callable[[str], dict]) -> tuple[Press, Callable]:
        if budget is not None:
            ratios = [0.0, 0.0, 0.0]  # a budget has no per-layer form: keep everything, then the budget applies
            press = make_press(inner[0], **inner[1], **extra(inner[0]))
            return _BudgetedPerLayer(press, ratios, budget), _plain_expected(None, budget)
        r = ratio or 0.0
        ratios = [max(0.0, r - 0.1) if r else 0.0, r, min(0.95, r + 0.1) if r else 0.0]
        press = make_press("per_layer", press=make_press(inner[0], **inner[1], **extra(inner[0])),
                           compression_ratios=ratios)

        def expected(seq_len: int) -> int:
            return _kept(seq_len, r)

        expected.per_layer = lambda seq_len, layer_idx: _kept(seq_len, ratios[layer_idx])  # exact, layer by layer
        return press, expected

    build.uses = {inner[0]}
    return build


def _BudgetedPerLayer(inner: Press, ratios: list[float], budget: int) -> Press:
    """PerLayerCompression takes no budget; for budget tests its inner press is budgeted through AdaKV-free
    composition: per_layer at ratio 0 then the budgeted inner press."""
    first = make_press("per_layer", press=inner, compression_ratios=ratios)
    second = make_press(type(inner).registry_name, **{**_fields(inner), "budget": budget})
    return make_press("composed", presses=[first, second])


def _fields(press: Press) -> dict[str, Any]:
    import dataclasses

    return {f.name: getattr(press, f.name) for f in dataclasses.fields(press)
            if f.name not in ("compression_ratio", "budget")}


#: Wrapper presses: name -> list of builders ``(ratio, budget, extra) -> (press, expected_kept(seq_len))``.
#: ``extra(name)`` gives the kwargs an inner press needs from the fixtures (a calibration artifact).
WRAPPERS: dict[str, list[Callable]] = {
    "composed": [
        _composed([("knorm", {}), ("streaming_llm", {"n_sink": 2})]),
        _composed([("observed_attention", {}), ("snapkv", {"window_size": 4, "kernel_size": 3})]),
        _composed([("snapkv", {"window_size": 4, "kernel_size": 3}), ("keydiff", {}), ("random", {"seed": 1})]),
    ],
    "adakv": [
        _headwise("adakv", ("knorm", {})),
        _headwise("adakv", ("snapkv", {"window_size": 4, "kernel_size": 3}), alpha_safeguard=0.5),
        _headwise("adakv", ("expected_attention", {"n_future_positions": 16, "n_sink": 2}), alpha_safeguard=0.0),
    ],
    "critical_adakv": [
        _headwise("critical_adakv", ("expected_attention", {"n_future_positions": 16, "n_sink": 2, "use_vnorm": False})),
        _headwise("critical_adakv", ("knorm", {}), first_stage_ratio=0.0),
    ],
    "criticalkv": [
        _headwise("criticalkv", ("snapkv", {"window_size": 4, "kernel_size": 3})),
        _headwise("criticalkv", ("expected_attention", {"n_future_positions": 16, "n_sink": 2, "use_vnorm": False}),
                  first_stage_ratio=1.0),
    ],
    "per_layer": [_per_layer(("knorm", {})), _per_layer(("keydiff", {}))],
    # At the prefill a decoding press is its wrapped scorer at its budget; an interval longer than the matrix's
    # answers keeps the other invariants' counts. Compression during decoding: tests/test_decoding.py.
    "decoding": [
        _headwise("decoding", ("knorm", {}), compression_interval=64, hidden_states_buffer_size=16),
        _headwise("decoding", ("expected_attention", {"n_future_positions": 16, "n_sink": 2}),
                  compression_interval=64, hidden_states_buffer_size=8),
    ],
    "key_rerotation": [
        _rerotated("knorm", {}),
        _rerotated("streaming_llm", {"n_sink": 4}),
        _rerotated("snapkv", {"window_size": 4, "kernel_size": 3}),
    ],
}


#: Positions a press promises to keep whenever its budget can hold them all (from each press's docstring):
#: ``name -> f(press, seq_len, n_kept) -> set of positions``. Checked on every layer whose kept count holds them.
def _snap_window(p, seq_len, n_kept):
    return set(range(seq_len - max(0, min(p.window_size, seq_len - 1)), seq_len))


def _lag_protected(p, seq_len, n_kept):
    n_sink = min(p.n_sink, seq_len)
    n_parts = (seq_len - n_sink) // p.lag_size
    if n_parts < 2:
        return set(range(seq_len))
    return set(range(n_sink)) | set(range(n_sink + (n_parts - 1) * p.lag_size, seq_len))


PROTECTED: dict[str, Callable[[Press, int, int], set[int]]] = {
    "snapkv": _snap_window,
    "pyramidkv": _snap_window,
    "tova": lambda p, seq_len, n_kept: {seq_len - 1},
    # StreamingLLM keeps exactly the sinks and the most recent entries.
    "streaming_llm": lambda p, seq_len, n_kept: set(range(min(p.n_sink, n_kept)))
    | set(range(seq_len - (n_kept - min(p.n_sink, n_kept)), seq_len)),
    "lagkv": _lag_protected,
    "expected_attention": lambda p, seq_len, n_kept: set(range(min(p.n_sink, seq_len - 1))),
    "expected_attention_stats": lambda p, seq_len, n_kept: set(range(min(p.n_sink, seq_len - 1))),
}

#: Presses whose choice for one sequence depends on the other sequences of the batch (or their row index).
ROW_DEPENDENT = {"random"}


def _plain_expected(ratio: float | None, budget: int | None) -> Callable[[int], int]:
    if budget is not None:
        return lambda seq_len: min(budget, seq_len)
    return lambda seq_len: _kept(seq_len, ratio)


def _kept(seq_len: int, ratio: float) -> int:
    """``⌊seq_len · (1 - ratio)⌋`` entries of the decimal ratio, at least one (a press never empties a layer)."""
    return min(seq_len, max(1, int(seq_len * (1 - Fraction(str(ratio))))))


def class_capabilities(name: str) -> Capabilities | None:
    """Capabilities declared on the class (None when they depend on the instance, as for wrappers)."""
    caps = getattr(press_class(name), "capabilities", None)
    return caps if isinstance(caps, Capabilities) else None


@dataclass
class PressCase:
    """One way to build a registered press, for any ratio or budget."""

    name: str
    variant: int
    kwargs: dict[str, Any] | None = None  # plain presses
    builder: Callable | None = None  # wrappers
    registered_in_matrix: bool = True
    error: str | None = None  # set when an unlisted press cannot be built with defaults + compression_ratio
    marks: list = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.name}-{self.variant}"

    @property
    def uses(self) -> set[str]:
        """This press and the presses it wraps."""
        return {self.name} | set(getattr(self.builder, "uses", ()))

    def build(
        self,
        ratio: float | None = 0.0,
        budget: int | None = None,
        artifact: Callable[[str], Path] | None = None,
    ) -> tuple[Press, Callable[[int], int]]:
        """The press at ``ratio`` (or ``budget``) and the expected kept count per head for a ``seq_len`` layer.

        ``artifact(method)`` returns a calibration artifact path for the model under test.
        """
        if self.error is not None:
            raise AssertionError(self.error)

        def extra(name: str) -> dict[str, Any]:
            caps = class_capabilities(name)
            if caps is not None and caps.calibration:
                if artifact is None:
                    raise AssertionError(f"{name} needs a {caps.calibration!r} calibration artifact")
                return {"artifact": str(artifact(caps.calibration))}
            return {}

        if self.builder is not None:
            return self.builder(ratio, budget, extra)
        size = {"budget": budget} if budget is not None else {"compression_ratio": ratio}
        press = make_press(self.name, **self.kwargs, **size, **extra(self.name))
        return press, _plain_expected(ratio, budget)


def press_cases() -> list[PressCase]:
    """Every case of every registered press (in registry order)."""
    cases: list[PressCase] = []
    for name in kvsqueeze.list_presses():
        if name in WRAPPERS:
            cases += [PressCase(name, i, builder=b) for i, b in enumerate(WRAPPERS[name])]
        elif name in PRESS_KWARGS:
            cases += [PressCase(name, i, kwargs=dict(kw)) for i, kw in enumerate(PRESS_KWARGS[name])]
        else:
            case = PressCase(name, 0, kwargs={}, registered_in_matrix=False)
            try:
                caps = class_capabilities(name)
                if caps is None or not caps.calibration:  # calibration presses need the fixture: built later
                    make_press(name, compression_ratio=0.5)
            except Exception as exc:  # noqa: BLE001 - reported as a test failure with the cause
                case.error = (
                    f"press {name!r} is registered but has no entry in tests/press_matrix.py, and "
                    f"make_press({name!r}, compression_ratio=0.5) fails ({type(exc).__name__}: {exc}); add its "
                    "constructor kwargs to PRESS_KWARGS (or a builder to WRAPPERS)"
                )
            cases.append(case)
    return cases


CASES = press_cases()
#: The first (mildest) case of each press, for the more expensive tests.
FIRST_CASES = [c for c in CASES if c.variant == 0]
