"""Evaluation sweeps: every press × ratio on a benchmark, with ONE prefill per sample shared by all of them.

For each sample the context is prefilled once with its layer inputs recorded (:meth:`Pipeline.record`); the
uncompressed baseline and every press × ratio are then compressed from that recording
(:meth:`Pipeline.from_recorded`) and each question is decoded greedily against each compressed cache. Presses
whose capabilities say ``extra_passes`` or ``needs_attention_weights`` cannot share the recording: they get their
own prefill (:meth:`Pipeline.compress`), on the eager model when they need attention weights.

Results go to ``<output_dir>/<benchmark>-<model>-<hash>/``, keyed by a hash of the resolved configuration:
``predictions.jsonl`` (one line per question, appended and flushed per finished (sample, press, ratio) unit),
``metrics.json`` and ``config.json`` (the configuration, its hash, and under ``environment`` the versions, git
commit and date of the latest run, with ``runs`` listing those of every run). A rerun with the same configuration
skips finished units, so an interrupted sweep resumes where it stopped; a changed configuration goes to a different
directory. Finished predictions are never deleted because the benchmark did not produce their samples this time
(see :func:`_clean_predictions`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import platform
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvsqueeze import adapter as A
from kvsqueeze.evaluation.base import Benchmark, Prediction, Sample, parse_json
from kvsqueeze.presses.base import _check_ratio, check_int

#: The name of the uncompressed baseline in predictions and metrics (ratio 0).
BASELINE = "none"
#: Version of the layout of the results directory; part of the key.
RESULTS_SCHEMA = 1


@dataclass(frozen=True)
class SweepEntry:
    """One configuration of a sweep: a press (None for the baseline) at a compression ratio.

    ``shared`` says whether it compresses from the sample's shared recorded prefill; ``eager`` whether it needs
    the eager model (attention weights).
    """

    name: str
    ratio: float
    press: Any
    shared: bool
    eager: bool

    @property
    def key(self) -> tuple[str, float]:
        return (self.name, self.ratio)


@dataclass
class SweepResult:
    """What :func:`run_sweep` did.

    Attributes
    ----------
    directory : Path
        The results directory (``predictions.jsonl``, ``metrics.json``, ``config.json``).
    metrics : list of dict
        One row per press × ratio (baseline first), as written to ``metrics.json``.
    units_run, units_skipped : int
        (sample, press, ratio) units computed by this call, and those already finished in ``directory``.
    prefills : int
        Context prefills run by this call (recorded or with a press).
    prefill_seconds, compression_seconds, decode_seconds, wall_seconds : float
        Time spent by this call in prefills (compression excluded), in compression, in decoding the answers, and
        in total.
    """

    directory: Path
    metrics: list[dict[str, Any]]
    units_run: int = 0
    units_skipped: int = 0
    prefills: int = 0
    prefill_seconds: float = 0.0
    compression_seconds: float = 0.0
    decode_seconds: float = 0.0
    wall_seconds: float = 0.0


# ----------------------------------------------------------------------------------------------------------------
# Configuration: presses, the key, the directory
# ----------------------------------------------------------------------------------------------------------------


def check_ratios(ratios: Sequence[float]) -> list[float]:
    """``ratios`` as floats in ``[0, 1)`` without duplicates; a bad value raises naming it."""
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence):
        raise TypeError(f"ratios must be a list of numbers in [0, 1), got {ratios!r}")
    out = []
    for r in ratios:
        _check_ratio(r, "compression ratio")
        out.append(float(r))
    if len(set(out)) != len(out):
        raise ValueError(f"duplicate compression ratios in {list(ratios)!r}")
    return out


def build_entries(
    presses: Sequence[str], ratios: Sequence[float], press_options: Mapping[str, Mapping[str, Any]] | None = None
) -> list[SweepEntry]:
    """The baseline plus every press × ratio, built (and so validated) before any model work.

    Ratio 0 is the baseline itself (a press at ratio 0 keeps every entry), so it is not repeated per press.
    ``press_options`` maps a press name to extra constructor keyword arguments (e.g. ``{"snapkv": {"window_size":
    16}}``); ``compression_ratio`` is set by the sweep.
    """
    from kvsqueeze.presses import make_press, press_class

    if isinstance(presses, str) or not isinstance(presses, Sequence):
        raise TypeError(f"presses must be a list of press names, got {presses!r}")
    ratios = check_ratios(ratios)
    if press_options is not None and not isinstance(press_options, Mapping):
        raise TypeError(
            f"press_options must map a press name to its options, e.g. {{'snapkv': {{'window_size': 16}}}}, got "
            f"{press_options!r}"
        )
    options = dict(press_options or {})
    for name, kwargs in options.items():
        if not isinstance(kwargs, Mapping):
            raise TypeError(
                f"press_options[{name!r}] must be a mapping of field to value, e.g. {{'window_size': 16}}, got "
                f"{kwargs!r}"
            )
    names: list[str] = []
    for name in presses:
        if not isinstance(name, str) or not name.strip():
            raise TypeError(f"press names must be non-empty strings, got {name!r}")
        name = name.strip().lower()
        if name == BASELINE:
            continue  # the baseline is always part of the sweep
        press_class(name)  # unknown name: KeyError with close matches
        if name in names:
            raise ValueError(f"press {name!r} is listed twice in {list(presses)!r}")
        names.append(name)
    for name, kwargs in options.items():
        if name not in names:
            raise ValueError(f"press_options given for {name!r}, which is not among the presses {names}")
        if "compression_ratio" in kwargs:
            raise ValueError(f"press_options[{name!r}] sets compression_ratio; the sweep sets it from ratios")
        if "budget" in kwargs:  # with ratio 0 the press was silently left out; with others, a conflict at build
            raise ValueError(
                f"press_options[{name!r}] sets budget; a sweep compares compression ratios (the ratios list), not "
                "budgets: compress with a budget through the pipeline or `kvsqueeze run --press-option budget=N`"
            )
    entries = [SweepEntry(BASELINE, 0.0, None, shared=True, eager=False)]
    for name in names:
        for ratio in ratios:
            if ratio == 0.0:
                continue
            press = make_press(name, compression_ratio=ratio, **dict(options.get(name, {})))
            caps = press.capabilities
            entries.append(
                SweepEntry(
                    name,
                    ratio,
                    press,
                    shared=caps.shares_recording,
                    eager=caps.needs_attention_weights,
                )
            )
    return entries


def model_key(model: nn.Module, model_name: str | None) -> dict[str, Any]:
    """How the model enters the results key: name, weight fingerprint, dtype, attention implementation, and the
    config attributes :func:`~kvsqueeze.models.load_model` replaced (only when there are any)."""
    from kvsqueeze.calibration.artifacts import model_identity
    from kvsqueeze.models import config_overrides

    identity = model_identity(model)
    dtype = next(model.parameters()).dtype
    key = {
        "name": model_name or identity["name_or_path"],
        "model_type": identity["model_type"],
        "fingerprint": identity["fingerprint"],
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": A.text_attention_implementation(model),
    }
    overrides = config_overrides(model)
    if overrides:  # e.g. sliding_window=None changes every prediction; absent otherwise, so older keys still match
        key["config_overrides"] = overrides
    return key


def _entry_config(entry: SweepEntry, model: nn.Module) -> dict[str, Any]:
    from kvsqueeze.cli import press_config

    out = {"name": entry.name, "ratio": entry.ratio, "press": press_config(entry.press)}
    checksums = artifact_checksums(entry.press, model)
    if checksums:  # only for calibrated presses: other results keep their keys
        out["artifacts"] = checksums
    return out


def resolved_config(
    model: nn.Module,
    model_name: str | None,
    benchmark: Benchmark,
    entries: Sequence[SweepEntry],
    limit: int | None,
    seed: int,
    template: Any,
    max_new_tokens: int | None,
    prefill_chunk_size: int | None = None,
    eos_token_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The configuration that defines the predictions of a sweep (and so its results directory). The contents of
    local data files are part of it (through ``benchmark.config()``, see
    :func:`kvsqueeze.evaluation.base.data_digest`), and so are the
    tokens that stop an answer. The presses keep the order given (:func:`config_hash` ignores it)."""
    presses = [_entry_config(e, model) for e in entries]
    config = {
        "schema": RESULTS_SCHEMA,
        "model": model_key(model, model_name),
        "benchmark": {"name": benchmark.name, "config": benchmark.config()},
        "limit": limit,
        "seed": seed,
        "presses": presses,
        "generation": {
            "do_sample": False,
            "max_new_tokens": max_new_tokens if max_new_tokens is not None else "per sample",
            "prompt_template": {
                "prefix": template.prefix,
                "sep": template.sep,
                "suffix": template.suffix,
                "add_special_tokens": template.add_special_tokens,
            },
        },
    }
    if prefill_chunk_size is not None:  # only when set: one-pass sweeps keep their keys
        config["prefill_chunk_size"] = prefill_chunk_size
    if eos_token_ids is not None:
        config["generation"]["eos_token_ids"] = sorted(int(t) for t in eos_token_ids)
    return config


def check_samples_fit(pipe, benchmark: str, samples: Sequence[Sample], max_new_tokens: int | None) -> None:
    """Refuse samples whose questions and answers would not fit after their context in the model's positions
    (prompt template, answer prefix and each sample's answer budget included), naming how many and the first,
    before any prefill: otherwise every unit of such a sample fails after its prefill."""
    bad = []
    for sample in samples:
        budget = sample.max_new_tokens if max_new_tokens is None else max_new_tokens
        try:
            pipe.check_answerable(
                sample.context, list(sample.questions), answer_prefix=sample.answer_prefix, max_new_tokens=budget
            )
        except ValueError as exc:
            bad.append((sample.id, str(exc)))
    if bad:
        raise ValueError(
            f"{benchmark}: {len(bad)} of {len(samples)} samples cannot be answered within the model's positions "
            f"(first: {bad[0][0]}: {bad[0][1]}); use a shorter length or a smaller max_new_tokens"
        )


def artifact_checksums(press, model: nn.Module) -> dict[str, str]:
    """``{method: checksum}`` of the calibration artifacts ``press`` and the presses it wraps read on ``model``:
    part of a sweep's results key, so that recalibrating (same path, new contents) starts new results."""
    from kvsqueeze.calibration.artifacts import load_artifact, tensor_checksum
    from kvsqueeze.presses.base import Press

    found: dict[str, str] = {}
    stack = [press]
    while stack:
        p = stack.pop()
        if not isinstance(p, Press):
            continue
        method = p.capabilities.calibration
        if method and hasattr(p, "artifact"):
            found[method] = tensor_checksum(load_artifact(p.artifact, model, method).tensors)
        for f in dataclasses.fields(p):
            value = getattr(p, f.name)
            stack.extend(value if isinstance(value, (list, tuple)) else [value])
    return found


def config_hash(config: Mapping[str, Any]) -> str:
    """12 hex digits of the sha256 of the canonical JSON of ``config`` (sorted keys, no whitespace). The order of
    the press × ratio entries does not change the predictions, so they are hashed sorted: the same sweep listed in
    another order finds its results."""
    if isinstance(config.get("presses"), list):
        canonical = lambda c: json.dumps(c, sort_keys=True, separators=(",", ":"), default=str)  # noqa: E731
        config = {**config, "presses": sorted(config["presses"], key=canonical)}
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def slug(text: str, fallback: str, max_len: int | None = None) -> str:
    """``text`` as a file-name part: runs of other characters than ``A-Za-z0-9._-`` become ``-``, no leading or
    trailing ``-``/``.``, at most ``max_len`` characters; ``fallback`` when nothing is left."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:max_len] or fallback


def results_dir(output_dir: str | Path, config: Mapping[str, Any]) -> Path:
    """``<output_dir>/<benchmark>-<model>-<hash of config>``."""
    name = f"{config['benchmark']['name']}-{slug(Path(str(config['model']['name'])).name, 'model', 48)}-{config_hash(config)}"
    return Path(output_dir) / name


def git_commit() -> str | None:
    """``git rev-parse HEAD`` of the checkout kvsqueeze is imported from; None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if re.fullmatch(r"[0-9a-f]{40}", commit) else None


def environment() -> dict[str, Any]:
    """Versions, git commit, python version and the date, recorded next to the results (not part of the key)."""
    import transformers

    import kvsqueeze

    return {
        "kvsqueeze": kvsqueeze.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _record_run(path: Path, config: Mapping[str, Any]) -> None:
    """Write ``config.json``: the configuration, its hash and ``environment``, the environment of this run, whose
    ``runs`` lists the environments of every run into this directory, oldest first (this one last).

    Only ``environment`` changes from run to run; the configuration, and so the hash, stays the same.
    """
    runs: list[Any] = []
    if path.exists():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))["environment"]
            # Written before runs were recorded: its environment is the first run's.
            runs = list(previous["runs"]) if "runs" in previous else [dict(previous)]
        except (ValueError, KeyError, TypeError):
            runs = []  # unreadable: the history starts again; the results are untouched
    current = environment()
    _write_json(path, {**config, "hash": config_hash(config), "environment": {**current, "runs": [*runs, current]}})


# ----------------------------------------------------------------------------------------------------------------
# predictions.jsonl: appended per unit, read back on resume
# ----------------------------------------------------------------------------------------------------------------


def _unit(row: Mapping[str, Any]) -> tuple[str, str, float]:
    return (row["sample_id"], row["press"], float(row["ratio"]))


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a ``predictions.jsonl`` (a truncated last line, from an interrupted write, is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith("\n"):
                break  # an interrupted write; dropped by _clean_predictions before anything is appended
            rows.append(parse_json(line, path, number))
    return rows


def _clean_predictions(path: Path, n_questions: Mapping[str, int]) -> dict[tuple[str, str, float], list[dict]]:
    """Finished units of ``path`` (every question present); the file is rewritten when it holds partial units or a
    truncated last line.

    Rows of samples that this run does not produce are never dropped: the benchmark yielded other rows than when
    they were written under the same key (data that could not be loaded this time, a changed dataset), so the
    sweep stops with a ``ValueError`` and leaves the file as it is.
    """
    rows = read_predictions(path)
    foreign = sorted({row["sample_id"] for row in rows if row["sample_id"] not in n_questions})
    if foreign:
        raise ValueError(
            f"{path} holds predictions for {len(foreign)} sample(s) that this run does not produce (e.g. "
            f"{foreign[0]!r}): the benchmark's rows differ from those of the run that wrote them under the same "
            "configuration (data that could not be loaded this time, or a changed dataset?). Nothing was deleted; "
            "make the same rows available again, or use another output_dir (or resume=False to start afresh)"
        )
    units: dict[tuple[str, str, float], list[dict]] = {}
    for row in rows:
        units.setdefault(_unit(row), []).append(row)
    finished = {
        key: unit
        for key, unit in units.items()
        if key[0] in n_questions and sorted(r["question_index"] for r in unit) == list(range(n_questions[key[0]]))
    }
    kept = sum(len(u) for u in finished.values())
    raw = path.read_bytes() if path.exists() else b""
    if kept != len(rows) or (raw and not raw.endswith(b"\n")):
        # Drop partial units and a truncated line, so that appending starts on a clean line.
        tmp = path.with_suffix(".jsonl.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for unit in finished.values():
                for row in unit:
                    f.write(json.dumps(row) + "\n")
        tmp.replace(path)
    return finished


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


def to_prediction(row: Mapping[str, Any]) -> Prediction:
    """A :class:`Prediction` from a ``predictions.jsonl`` row."""
    return Prediction(
        row["sample_id"], row["task"], row["question_index"], row["prediction"], tuple(row["answers"]),
        dict(row.get("metadata") or {}),
    )


def compute_metrics(benchmark: Benchmark, rows: Sequence[Mapping[str, Any]], entries: Sequence[SweepEntry]):
    """Per press × ratio: the benchmark's metrics, mean measured cache bytes and the fraction saved, timings."""
    from kvsqueeze.cli import press_config

    grouped: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
    for row in rows:
        grouped.setdefault((row["press"], float(row["ratio"])), []).append(row)
    out = []
    for entry in entries:
        group = grouped.get(entry.key, [])
        if not group:
            continue
        units = {r["sample_id"]: r for r in group}.values()  # cache bytes and timings are per unit
        n = len(units)
        cache = sum(r["cache_bytes"] for r in units) / n
        full = sum(r["full_cache_bytes"] for r in units) / n
        out.append(
            {
                "press": entry.name,
                "ratio": entry.ratio,
                "press_config": press_config(entry.press),
                "metrics": benchmark.score([to_prediction(r) for r in group]),
                "n_samples": n,
                "n_predictions": len(group),
                "cache_bytes": cache,
                "full_cache_bytes": full,
                "saved_fraction": 1.0 - cache / full if full else 0.0,
                "prefill_seconds": sum(r["prefill_seconds"] for r in units) / n,
                "compression_seconds": sum(r["compression_seconds"] for r in units) / n,
                "shared_prefill": all(r["shared_prefill"] for r in units),
            }
        )
    return out


# ----------------------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` switched to eager attention for the duration of the block (same weights, no copy), restored after.

    Attention weights are only materialised by the eager implementation; switching in place avoids holding a
    second copy of the weights. The previous implementation is restored in ``finally``.
    """
    if A.text_attention_implementation(model) == "eager":
        yield model
        return
    with A.decoder_attention(model, "eager"):
        yield model


def run_sweep(
    model: nn.Module,
    tokenizer,
    benchmark: Benchmark,
    presses: Sequence[str],
    ratios: Sequence[float],
    limit: int | None = None,
    seed: int = 0,
    output_dir: str | Path = "results",
    model_name: str | None = None,
    press_options: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool = True,
    resume: bool = True,
    naive: bool = False,
    eager_model: nn.Module | None = None,
    use_chat_template: bool | None = None,
    max_new_tokens: int | None = None,
    prefill_chunk_size: int | None = None,
) -> SweepResult:
    """Evaluate the baseline and every press × ratio on ``benchmark``, sharing one prefill per sample.

    Parameters
    ----------
    model, tokenizer
        The evaluated causal LM (any attention implementation) and its tokenizer.
    benchmark : Benchmark
        Rows and scoring (:mod:`kvsqueeze.evaluation.base`).
    presses : list of str
        Registered press names; the uncompressed baseline (``"none"``, ratio 0) is always evaluated.
    ratios : list of float
        Compression ratios in ``[0, 1)``; ratio 0 is the baseline.
    limit : int or None
        At most this many samples per task (``Benchmark.samples``).
    seed : int
        Passed to ``Benchmark.samples``.
    output_dir : str or Path
        Parent of the results directory ``<benchmark>-<model>-<hash>``.
    model_name : str or None
        The name recorded for the model (default: ``model.name_or_path``).
    press_options : dict or None
        ``{press name: {field: value}}`` extra constructor arguments.
    progress : bool
        tqdm bars over samples and configurations (on stderr).
    resume : bool
        Skip (sample, press, ratio) units already in ``predictions.jsonl``; False starts the file afresh.
    naive : bool
        One prefill per press × ratio (:meth:`Pipeline.compress`) instead of one shared recording per sample.
        Same predictions; used to check the equivalence and to measure the speed-up.
    eager_model : nn.Module or None
        The eager-attention model for presses that need attention weights. None: ``model`` itself, switched to
        eager attention while those presses run (:func:`eager_attention`; same weights, no second copy).
    use_chat_template : bool or None
        As in :class:`~kvsqueeze.pipeline.Pipeline`.
    max_new_tokens : int or None
        Override every sample's ``max_new_tokens`` (part of the results key); None keeps the samples' values.
    prefill_chunk_size : int or None
        Prefill every unit in chunks of this many tokens (:meth:`Pipeline.compress`; part of the results key).
        Each unit then has its own prefill (a chunked prefill under a press depends on the press), and every press
        must compress again as chunks are appended (``decoding``); None: one pass, shared where possible.

    Returns
    -------
    SweepResult
    """
    from tqdm.auto import tqdm

    from kvsqueeze.pipeline import Pipeline

    if not isinstance(benchmark, Benchmark):
        raise TypeError(f"benchmark must be a kvsqueeze Benchmark, got {type(benchmark).__name__}")
    if not benchmark.name:
        raise ValueError(f"{type(benchmark).__name__} has no name; register it (register_benchmark) or set `name`")
    for value, name, minimum in ((limit, "limit", 1), (seed, "seed", 0), (max_new_tokens, "max_new_tokens", 1),
                                 (prefill_chunk_size, "prefill_chunk_size", 1)):
        if value is not None or name == "seed":
            check_int(value, name, minimum)
    entries = build_entries(presses, ratios, press_options)
    if prefill_chunk_size is not None:
        from kvsqueeze.pipeline import check_chunkable

        for entry in entries:
            check_chunkable(entry.press, prefill_chunk_size)
    pipe = Pipeline(model, tokenizer, use_chat_template=use_chat_template)
    if eager_model is not None:
        from kvsqueeze.calibration.artifacts import model_identity

        if A.text_attention_implementation(eager_model) != "eager":
            raise ValueError("eager_model must run attn_implementation='eager' (load_model(..., attn_implementation="
                             f"'eager')), it runs {A.text_attention_implementation(eager_model)!r}")
        if model_identity(eager_model)["fingerprint"] != model_identity(model)["fingerprint"]:
            raise ValueError("eager_model does not hold the same weights as model (their fingerprints differ)")
    for entry in entries:  # a missing calibration artifact fails here, before any prefill (eager-only presses are
        # validated when they run, on the eager model: against this sdpa model they would refuse it)
        if entry.press is not None and not entry.eager:
            entry.press.validate(pipe.adapter)
    benchmark.check_data()  # unreadable data fails here, before the results directory exists
    config = resolved_config(model, model_name, benchmark, entries, limit, seed, pipe.template, max_new_tokens,
                             prefill_chunk_size, pipe.eos_token_ids)
    directory = results_dir(output_dir, config)

    start = time.perf_counter()
    samples: list[Sample] = list(benchmark.samples(tokenizer, limit=limit, seed=seed))
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{benchmark.name}: sample ids are not unique ({len(ids) - len(set(ids))} repeated)")
    check_samples_fit(pipe, benchmark.name, samples, max_new_tokens)  # before any prefill and any results file
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "predictions.jsonl"
    if not resume and path.exists():
        path.unlink()
    # The metrics of an earlier run describe its predictions, not this run's: an interrupted run must not leave
    # them for the report to present (they are written again when this run finishes).
    (directory / "metrics.json").unlink(missing_ok=True)
    finished = _clean_predictions(path, {s.id: len(s.questions) for s in samples})
    _record_run(directory / "config.json", config)  # after the checks above: a refused rerun is not a run
    result = SweepResult(directory, [])
    result.units_skipped = sum(1 for s in samples for e in entries if (s.id, *e.key) in finished)

    # Presses that need attention weights run on eager_model when given, else on `model` switched to eager
    # attention in place (the pipeline reads the implementation live, so one pipeline serves both).
    eager_pipe = pipe if eager_model is None else Pipeline(eager_model, tokenizer, use_chat_template=use_chat_template)
    bar = tqdm(samples, desc=f"{benchmark.name} samples", unit="sample", disable=not progress, file=sys.stderr)
    with path.open("a", encoding="utf-8") as out:
        for sample in bar:
            todo = [e for e in entries if (sample.id, *e.key) not in finished]
            if not todo:
                continue
            sharing = not naive and prefill_chunk_size is None
            shared = [e for e in todo if e.shared and sharing]
            solo = [e for e in todo if not (e.shared and sharing)]
            steps = tqdm(
                total=len(todo), desc="configs", unit="config", leave=False, disable=not progress, file=sys.stderr
            )
            recorded = None
            if shared:
                recorded = pipe.record(sample.context)
                result.prefills += 1
                result.prefill_seconds += recorded.prefill_seconds
                for entry in shared:
                    steps.set_postfix_str(f"{entry.name} {entry.ratio:g} (shared prefill)")
                    ctx = pipe.from_recorded(recorded, entry.press)
                    _finish_unit(out, result, sample, entry, ctx, recorded.prefill_seconds, True, max_new_tokens)
                    steps.update()
                recorded = None  # free the recorded layer inputs before any further prefill
            for eager in (False, True):
                group = [e for e in solo if e.eager == eager]
                if not group:
                    continue
                with contextlib.ExitStack() as stack:
                    solo_pipe = eager_pipe if eager else pipe
                    if eager and eager_model is None:
                        stack.enter_context(eager_attention(model))
                    for entry in group:
                        steps.set_postfix_str(f"{entry.name} {entry.ratio:g} (own prefill)")
                        ctx = solo_pipe.compress(sample.context, press=entry.press,
                                                 prefill_chunk_size=prefill_chunk_size)
                        prefill = ctx.prefill_seconds - ctx.compression_seconds
                        result.prefills += 1
                        result.prefill_seconds += prefill
                        _finish_unit(out, result, sample, entry, ctx, prefill, False, max_new_tokens)
                        steps.update()
            steps.close()
    bar.close()

    rows = read_predictions(path)
    result.metrics = compute_metrics(benchmark, rows, entries)
    _write_json(
        directory / "metrics.json",
        {"benchmark": benchmark.name, "model": config["model"]["name"], "hash": config_hash(config),
         "n_samples": len(samples), "results": result.metrics},
    )
    result.wall_seconds = time.perf_counter() - start
    return result


def _finish_unit(
    out, result: SweepResult, sample: Sample, entry: SweepEntry, ctx, prefill_seconds: float, shared: bool,
    max_new_tokens: int | None,
) -> None:
    """Decode every question of ``sample`` against ``ctx`` and append the unit's rows (then flush)."""
    compression = ctx.compression_seconds
    result.compression_seconds += compression
    cache_bytes, full_cache_bytes = ctx.cache_bytes, ctx.full_cache_bytes  # measured once: the context is fixed
    lines = []
    for index, question in enumerate(sample.questions):
        start = time.perf_counter()
        answer = ctx.answer(
            question,
            max_new_tokens=max_new_tokens if max_new_tokens is not None else sample.max_new_tokens,
            answer_prefix=sample.answer_prefix,
        )
        seconds = time.perf_counter() - start
        result.decode_seconds += seconds
        prediction = Prediction.of(sample, index, answer)
        row = {
            "sample_id": sample.id,
            "task": sample.task,
            "question_index": index,
            "press": entry.name,
            "ratio": entry.ratio,
            "prediction": prediction.prediction,
            "answers": list(prediction.answers),
            "metadata": dict(prediction.metadata),
            "context_tokens": ctx.n_tokens,
            "cache_bytes": cache_bytes,
            "full_cache_bytes": full_cache_bytes,
            "prefill_seconds": prefill_seconds,
            "compression_seconds": compression,
            "decode_seconds": seconds,
            "shared_prefill": shared,
        }
        lines.append(json.dumps(row, default=str) + "\n")
    out.write("".join(lines))  # one write per unit: an interruption loses at most the unit in progress
    out.flush()
    result.units_run += 1
