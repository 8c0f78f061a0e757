"""Reports over sweep results: a leaderboard (Markdown + CSV), score-vs-ratio plots and NIAH heatmaps (PNG).

:func:`write_report` reads results directories written by :func:`kvsqueeze.evaluation.sweep.run_sweep`. Directories
that differ only in their press lists (same model, benchmark, limit, seed, generation) are merged into one
leaderboard section and one plot; a press found with different options (e.g. two SnapKV window sizes) gets one row
per configuration, labelled with the options that tell them apart (``snapkv (window_size=4)``). Ratios print with
two decimals, or with every digit they need (``0.125``), in tables and file names alike. Plots are drawn with
matplotlib's Agg backend through ``Figure`` objects (no pyplot, no global backend switch), so reports work headless
and from threads.
"""

from __future__ import annotations

import csv
import json
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvsqueeze.evaluation.base import read_json
from kvsqueeze.evaluation.sweep import BASELINE, config_hash, read_predictions, slug

_MB = 1e6


@dataclass
class _Group:
    """Results sharing model, benchmark, limit, seed and generation settings (one section, one plot)."""

    title: str
    slug: str
    benchmark: Mapping[str, Any]
    directories: list[Path] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.json rows, one per press × ratio
    predictions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tasks(self) -> list[str]:
        names: list[str] = []
        for row in self.rows:
            names += [k for k in row["metrics"] if k != "average" and k not in names]
        return names


def _load(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    if not directory.is_dir():
        raise FileNotFoundError(f"results directory not found: {directory}")
    config_path, metrics_path = directory / "config.json", directory / "metrics.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} holds no config.json; is it a results directory written by a sweep?")
    if not metrics_path.is_file():
        raise FileNotFoundError(
            f"{directory} holds no metrics.json: the sweep did not finish; rerun the same command to resume it"
        )
    return read_json(config_path), read_json(metrics_path)


def _options(row: Mapping[str, Any]) -> dict[str, Any]:
    """The press options of a metrics row, flattened (``press.window_size`` for a wrapped press), without the ratio."""
    flat: dict[str, Any] = {}

    def walk(config: Mapping[str, Any], prefix: str) -> None:
        for key, value in config.items():
            if isinstance(value, Mapping):
                walk(value, f"{prefix}{key}.")
            elif not (prefix == "" and key == "compression_ratio"):
                flat[prefix + key] = value

    walk(row.get("press_config") or {}, "")
    return flat


def _options_key(row: Mapping[str, Any]) -> str:
    return json.dumps(_options(row), sort_keys=True, default=str)


def _format_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _label_rows(rows: list[dict[str, Any]]) -> None:
    """Set ``label`` (shown as the press) and ``options`` on every row: the press name, plus the options that tell
    its configurations apart when one press appears with several (e.g. ``snapkv (window_size=4)``)."""
    by_press: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_press.setdefault(row["press"], []).append(row)
    for name, group in by_press.items():
        configs = {_options_key(r): _options(r) for r in group}
        keys = sorted({k for c in configs.values() for k in c})
        differing = [
            k for k in keys if len({json.dumps(c.get(k, "<unset>"), default=str) for c in configs.values()}) > 1
        ]
        for row in group:
            opts = _options(row)
            text = ", ".join(f"{k}={_format_value(opts.get(k, '<unset>'))}" for k in differing)
            row["options"] = text
            row["label"] = f"{name} ({text})" if text else name


def _groups(result_dirs: Sequence[str | Path]) -> list[_Group]:
    groups: dict[str, _Group] = {}
    seen: set[Path] = set()
    for item in result_dirs:
        directory = Path(item)
        if directory.resolve() in seen:
            continue
        seen.add(directory.resolve())
        config, metrics = _load(directory)
        shared = {k: v for k, v in config.items() if k not in ("presses", "hash", "environment")}
        key = config_hash(shared)
        if key not in groups:
            bench = config["benchmark"]
            options = ", ".join(f"{k}={v}" for k, v in bench.get("config", {}).items())
            title = f"{bench['name']}" + (f" ({options})" if options else "") + f" - {config['model']['name']}"
            title += f", limit {config['limit']}, seed {config['seed']}"
            name = f"{bench['name']}-{Path(config['model']['name']).name}-{key}"
            groups[key] = _Group(title, slug(name, "results"), bench)
        group = groups[key]
        group.directories.append(directory)
        # The calibration artifacts a press read are part of its configuration: a press recalibrated between two
        # sweeps is two rows (labelled by the artifact's checksum), not one row hiding the other.
        artifacts = {(p.get("name"), float(p.get("ratio", 0.0))): p["artifacts"]
                     for p in config.get("presses", []) if isinstance(p, Mapping) and p.get("artifacts")}
        for r in metrics["results"]:
            found = artifacts.get((r["press"], float(r["ratio"])))
            if found:
                r["press_config"] = {**(r.get("press_config") or {}),
                                     "artifact": ", ".join(f"{m}@{c[:12]}" for m, c in sorted(found.items()))}
        # A press x ratio with the same options in two directories is the same configuration of the same section,
        # so its predictions are the same: it is listed once. Other options make another row (labelled below).
        have = {(r["press"], r["ratio"], _options_key(r)) for r in group.rows}
        new = [dict(r) for r in metrics["results"] if (r["press"], r["ratio"], _options_key(r)) not in have]
        group.rows += new
        wanted = {(r["press"], r["ratio"]): _options_key(r) for r in new}
        for p in read_predictions(directory / "predictions.jsonl"):
            if (p["press"], p["ratio"]) in wanted:
                group.predictions.append({**p, "_options": wanted[(p["press"], p["ratio"])]})
    for group in groups.values():
        _label_rows(group.rows)
        labels = {(r["press"], r["ratio"], _options_key(r)): r["label"] for r in group.rows}
        for p in group.predictions:
            p["label"] = labels[(p["press"], p["ratio"], p.pop("_options"))]
    return list(groups.values())


def format_ratio(ratio: float) -> str:
    """A compression ratio for tables and file names: two decimals (``0.50``), or every digit it needs when two
    would round it (``0.125``, ``0.333``), so that distinct ratios never print alike."""
    text = f"{ratio:.2f}"
    return text if float(text) == ratio else repr(float(ratio))


def _sorted_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (r["press"] != BASELINE, r["press"], r["label"], r["ratio"]))


def _table_rows(group: _Group) -> tuple[list[str], list[list[str]]]:
    tasks = group.tasks
    headers = ["press", "ratio", *tasks, "average", "cache MB", "full MB", "saved %", "samples"]
    body = []
    for r in _sorted_rows(group.rows):
        scores = r["metrics"]
        body.append(
            [r["label"], format_ratio(r["ratio"]), *(f"{scores[t]:.1f}" if t in scores else "" for t in tasks),
             f"{scores.get('average', float('nan')):.1f}", f"{r['cache_bytes'] / _MB:.2f}",
             f"{r['full_cache_bytes'] / _MB:.2f}", f"{100 * r['saved_fraction']:.1f}", str(r["n_samples"])]
        )
    return headers, body


def _markdown_table(headers: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_score_vs_ratio(rows: Sequence[Mapping[str, Any]], title: str, path: Path, metric: str = "average") -> Path:
    """Score against compression ratio, one line per press, the baseline as a dashed horizontal line."""
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    presses: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if metric in r["metrics"]:
            presses.setdefault(r.get("label", r["press"]), []).append((r["ratio"], r["metrics"][metric]))
    baseline = presses.pop(BASELINE, None)
    if baseline:
        ax.axhline(baseline[0][1], color="black", linestyle="--", linewidth=1, label="baseline (no compression)")
    for name, points in sorted(presses.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xlabel("compression ratio (fraction of KV entries removed)")
    ax.set_ylabel(f"score ({metric})")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _niah_heatmaps(group: _Group, output_dir: Path) -> list[Path]:
    """One length × depth heatmap per press × ratio when the predictions carry ``length`` and ``depth``
    (drawn by :func:`kvsqueeze.evaluation.niah.niah_heatmap`, scored per cell as the NIAH benchmark scores)."""
    from kvsqueeze.evaluation.niah import niah_heatmap
    from kvsqueeze.evaluation.sweep import to_prediction

    rows = [p for p in group.predictions if {"length", "depth"} <= set(p.get("metadata") or {})]
    by_config: dict[tuple[str, str, float], list] = {}
    for p in rows:
        by_config.setdefault((p["press"], p["label"], p["ratio"]), []).append(to_prediction(p))
    paths = []
    for (press, label, ratio), predictions in sorted(by_config.items(), key=lambda kv: (kv[0][0] != BASELINE, kv[0])):
        path = output_dir / f"niah-{group.slug}-{slug(label, 'results')}-{format_ratio(ratio)}.png"
        niah_heatmap(predictions, path, title=f"{label} at ratio {format_ratio(ratio)}\n"
                                              f"{textwrap.shorten(group.title, 90)}")
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------


def write_report(result_dirs: Sequence[str | Path], output_dir: str | Path) -> dict[str, list[Path]]:
    """Write ``leaderboard.md``, ``leaderboard.csv`` and the plots for ``result_dirs`` into ``output_dir``.

    Parameters
    ----------
    result_dirs : list of path
        Results directories of finished sweeps (each with ``config.json`` and ``metrics.json``).
    output_dir : path
        Created if missing.

    Returns
    -------
    dict
        ``{"markdown": [...], "csv": [...], "plots": [...], "heatmaps": [...]}``, the written paths.

    Notes
    -----
    Rows are press × ratio (baseline first), columns the per-task scores, their average, the mean measured cache
    bytes after and before compression and the fraction saved. A press run with different options in different
    directories gets a row per configuration, labelled with the differing options (CSV: ``press_options``). NIAH
    heatmaps are drawn when the predictions carry ``length`` and ``depth`` metadata; each cell is the mean RULER
    ``string_match_all`` score (case-insensitive, fraction of the reference answers found) of its predictions, as
    the NIAH benchmark scores.
    """
    if isinstance(result_dirs, (str, Path)) or not isinstance(result_dirs, Sequence):
        raise TypeError(f"result_dirs must be a list of results directories, got {result_dirs!r}")
    if not result_dirs:
        raise ValueError(f"result_dirs must be a non-empty list of results directories, got {result_dirs!r}")
    groups = _groups(result_dirs)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {"markdown": [], "csv": [], "plots": [], "heatmaps": []}

    sections = ["# kvsqueeze leaderboard", ""]
    csv_rows: list[dict[str, Any]] = []
    all_tasks: list[str] = []
    for group in groups:
        headers, body = _table_rows(group)
        plot = plot_score_vs_ratio(group.rows, group.title, out / f"score_vs_ratio-{group.slug}.png")
        written["plots"].append(plot)
        heatmaps = _niah_heatmaps(group, out)
        written["heatmaps"] += heatmaps
        sources = ", ".join(f"`{d}`" for d in group.directories)
        sections += [f"## {group.title}", "", f"Results: {sources}", "", _markdown_table(headers, body), "",
                     f"![score vs compression ratio]({plot.name})", ""]
        sections += [f"![{h.stem}]({h.name})" for h in heatmaps] + ([""] if heatmaps else [])
        all_tasks += [t for t in group.tasks if t not in all_tasks]
        for r in _sorted_rows(group.rows):
            csv_rows.append({"benchmark": group.benchmark["name"], "section": group.title, "press": r["press"],
                             "press_options": r["options"], "ratio": r["ratio"],
                             **{t: r["metrics"].get(t) for t in group.tasks},
                             "average": r["metrics"].get("average"), "cache_bytes": r["cache_bytes"],
                             "full_cache_bytes": r["full_cache_bytes"], "saved_fraction": r["saved_fraction"],
                             "n_samples": r["n_samples"]})
    note = ("Scores are 0-100 (the benchmark's metrics). cache MB: mean measured bytes of the key/value tensors "
            "after compression; full MB: before; saved %: 1 - after / before.")
    sections += [note, ""]
    markdown = out / "leaderboard.md"
    markdown.write_text("\n".join(sections), encoding="utf-8")
    written["markdown"].append(markdown)

    table = out / "leaderboard.csv"
    columns = ["benchmark", "section", "press", "ratio", *all_tasks, "average", "cache_bytes", "full_cache_bytes",
               "saved_fraction", "n_samples", "press_options"]
    with table.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(csv_rows)
    written["csv"].append(table)
    return written
