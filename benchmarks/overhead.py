"""Compression overhead: prefill time without a press vs. prefill + compression with one, and the measured bytes.

For every registered score-based press that runs on a plain (sdpa) prefill — plus ``qfilters`` and
``expected_attention_stats`` when their calibration artifacts exist or can be computed — this times
``Pipeline.compress`` on essay text of 1k and 4k tokens at ``compression_ratio`` 0.5:

* runs are interleaved (each round times "no press" and every press, in a rotated order) after a warm-up round,
  so slow drift of a shared machine hits every configuration alike;
* ``ratio`` is the median over rounds of (prefill + compression) / (prefill without press of the same round);
  ``1 + c/p`` is the median compression time measured inside the hooks over the median plain prefill, a
  less noisy view of the same quantity;
* cache bytes are the measured bytes of the key/value tensors before and after compression.

Prints a table, then one JSON line. Usage::

    python benchmarks/overhead.py                       # default model, 1k and 4k tokens, 3 rounds
    python benchmarks/overhead.py --lengths 1024 --repeats 5 --presses knorm,expected_attention
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import kvsqueeze
from kvsqueeze.cli import format_table
from kvsqueeze import Pipeline, corpus, load_model, make_press
from kvsqueeze.models import cache_root, resolve_name
from kvsqueeze.presses import ScorerPress, list_presses, press_class

#: The issue's target for the presses that need no attention weights.
TARGET_RATIO = 1.05
TARGET_PRESSES = ("knorm", "expected_attention", "qfilters", "keydiff")
def essays_dir(explicit: str | None = None) -> Path:
    """The essay folder: ``explicit``, else the essays shipped as package data."""
    folder = Path(explicit) if explicit else corpus.essays_dir()
    if not (folder.is_dir() and any(folder.glob("*.txt"))):
        raise FileNotFoundError(f"no essays (*.txt) in {folder}")
    return folder


def essay_context(tokenizer, n_tokens: int, folder: Path) -> str:
    """The first ``n_tokens`` tokens of the essays (concatenated in name order), decoded back to text."""
    text = "\n\n".join(p.read_text(encoding="utf-8").strip() for p in sorted(folder.glob("*.txt")))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) < n_tokens:
        raise ValueError(f"the essays in {folder} hold {len(ids)} tokens, fewer than the {n_tokens} requested")
    return tokenizer.decode(ids[:n_tokens])


def _artifact_press(name: str, model, tokenizer, args) -> tuple[dict[str, Any] | None, str | None]:
    """Press kwargs for a calibrated press (``artifact``), or ``(None, reason)`` when it is skipped."""
    from kvsqueeze.calibration import calibrate, default_artifact_path, load_artifact

    method = press_class(name).capabilities.calibration
    default = default_artifact_path(model, method)
    try:
        load_artifact(None, model, method)
        return {}, None
    except FileNotFoundError:
        pass
    except ValueError as exc:
        return None, f"the artifact at {default} is unusable ({exc})"
    if args.no_calibrate:
        return None, f"no {method} artifact at {default} (run kvsqueeze calibrate, or drop --no-calibrate)"
    # Timing does not depend on the artifact's quality: a small private calibration is enough, and it stays out
    # of the default location so it is never mistaken for a real one.
    path = cache_root() / "benchmarks" / f"{resolve_name(args.model)}-{method}.safetensors"
    try:
        load_artifact(path, model, method)
    except (FileNotFoundError, ValueError):
        print(f"calibrating {method} ({args.calib_sequences} x {args.calib_seq_len} tokens) into {path}",
              file=sys.stderr)
        calibrate(model, tokenizer, method, n_sequences=args.calib_sequences, seq_len=args.calib_seq_len,
                  output=path, progress=True)
    return {"artifact": str(path)}, None


def select_presses(requested: list[str] | None, model, tokenizer, args) -> tuple[dict[str, dict], dict[str, str]]:
    """``{name: extra kwargs}`` of the presses to time, and ``{name: reason}`` of the skipped ones."""
    chosen: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for name in requested or list_presses():
        cls = press_class(name)
        caps = cls.capabilities  # None for wrappers
        if not issubclass(cls, ScorerPress) or caps is None:
            skipped[name] = "not a score-based press (a wrapper or composition)"
        elif caps.needs_attention_weights:
            skipped[name] = "needs eager attention weights (timed against sdpa it would not be comparable)"
        elif caps.extra_passes:
            skipped[name] = "needs model passes beyond the prefill"
        elif caps.calibration:
            kwargs, reason = _artifact_press(name, model, tokenizer, args)
            if kwargs is None:
                skipped[name] = reason or "calibration artifact missing"
            else:
                chosen[name] = kwargs
        else:
            chosen[name] = {}
    return chosen, skipped


def time_once(pipe: Pipeline, context: str, press) -> tuple[float, float, int, int, int]:
    """One ``compress``: (prefill+compression s, compression s, bytes before, bytes after, tokens)."""
    ctx = pipe.compress(context, press=press)
    return ctx.prefill_seconds, ctx.compression_seconds, ctx.full_cache_bytes, ctx.cache_bytes, ctx.n_tokens


def bench_length(pipe: Pipeline, context: str, presses: dict[str, dict], args) -> list[dict[str, Any]]:
    """Interleaved timings of "none" and every press on one context."""
    names = ["none", *presses]
    build = {n: (lambda n=n: None if n == "none" else make_press(n, compression_ratio=args.ratio, **presses[n]))
             for n in names}
    runs: dict[str, list[tuple]] = {n: [] for n in names}
    order = list(names)
    total = (args.warmup + args.repeats) * len(names)
    with tqdm(total=total, desc="overhead", unit="prefill", file=sys.stderr) as bar:
        for round_idx in range(args.warmup + args.repeats):
            for name in order:
                bar.set_postfix_str(f"round {round_idx + 1} {name}")
                result = time_once(pipe, context, build[name]())
                if round_idx >= args.warmup:  # warm-up rounds are discarded
                    runs[name].append(result)
                bar.update()
            order = order[1:] + order[:1]  # rotate, so no press always runs right after "none"
    base = [r[0] for r in runs["none"]]
    p = statistics.median(base)
    rows = []
    for name in names:
        totals = [r[0] for r in runs[name]]
        comp = [r[1] for r in runs[name]]
        paired = [t / b for t, b in zip(totals, base, strict=True)]
        _, _, before, after, tokens = runs[name][-1]
        rows.append({
            "press": name,
            "tokens": tokens,
            "prefill_s": p,
            "total_s": statistics.median(totals),
            "compression_s": statistics.median(comp),
            "ratio": statistics.median(paired),
            "ratio_from_compression": 1.0 + statistics.median(comp) / p,
            "ratio_min": min(paired),
            "ratio_max": max(paired),
            "bytes_before": before,
            "bytes_after": after,
            "saved_fraction": 1.0 - after / before if before else 0.0,
            "samples": len(totals),
        })
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    headers = ["tokens", "press", "prefill s", "pre+comp s", "comp s", "ratio", "1+c/p", "ratio range",
               "KV MB before", "KV MB after", "saved %", "target"]
    body = []
    for r in rows:
        target = ""
        if r["press"] in TARGET_PRESSES:
            target = "ok" if r["ratio_from_compression"] <= TARGET_RATIO else f"OVER {TARGET_RATIO}"
        body.append([
            str(r["tokens"]), r["press"], f"{r['prefill_s']:.3f}", f"{r['total_s']:.3f}", f"{r['compression_s']:.4f}",
            f"{r['ratio']:.3f}", f"{r['ratio_from_compression']:.3f}", f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}",
            f"{r['bytes_before'] / 1e6:.2f}", f"{r['bytes_after'] / 1e6:.2f}", f"{100 * r['saved_fraction']:.1f}",
            target,
        ])
    return format_table(headers, body)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name or path (default: the embedded default model)")
    parser.add_argument("--lengths", default="1024,4096", help="context lengths in tokens (default 1024,4096)")
    parser.add_argument("--ratio", type=float, default=0.5, help="compression ratio (default 0.5)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds, at least 3 (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="discarded warm-up rounds (default 1)")
    parser.add_argument("--presses", default=None, help="comma-separated press names (default: every eligible)")
    parser.add_argument("--essays", default=None, help="folder of *.txt essays (default: the package data)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-calibrate", action="store_true", help="skip calibrated presses lacking an artifact")
    parser.add_argument("--calib-sequences", type=int, default=4, help="sequences for a benchmark-only calibration")
    parser.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration sequence")
    args = parser.parse_args(argv)
    try:
        args.lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        parser.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
    if any(n < 16 for n in args.lengths):
        parser.error(f"--lengths must be >= 16 tokens each, got {args.lengths}")
    if not 0.0 < args.ratio < 1.0:
        parser.error(f"--ratio must be in (0, 1), got {args.ratio}")
    if args.repeats < 3:
        parser.error(f"--repeats must be >= 3 (medians of fewer runs are noise), got {args.repeats}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    args.presses = [p.strip() for p in args.presses.split(",")] if args.presses else None
    for name in args.presses or []:
        press_class(name)  # unknown names fail here, before the model loads
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = essays_dir(args.essays)
    model, tokenizer = load_model(args.model)
    pipe = Pipeline(model, tokenizer, use_chat_template=False)  # raw essay text, exactly the requested tokens
    presses, skipped = select_presses(args.presses, model, tokenizer, args)
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    for n_tokens in args.lengths:
        context = essay_context(tokenizer, n_tokens, folder)
        start = time.perf_counter()
        rows += bench_length(pipe, context, presses, args)
        print(f"{n_tokens} tokens done in {time.perf_counter() - start:.0f} s", file=sys.stderr)

    print(f"\nmodel {model.name_or_path}, compression_ratio {args.ratio}, median of {args.repeats} interleaved rounds "
          f"after {args.warmup} warm-up, {torch.get_num_threads()} torch threads, essays from {folder}")
    print(format_rows(rows))
    print(f"\nratio = (prefill + compression) / prefill, median over rounds of the paired runs; 1+c/p uses the "
          f"compression time measured inside the hooks. target: <= {TARGET_RATIO} for {', '.join(TARGET_PRESSES)} "
          "(judged on 1+c/p, the less noisy of the two).")
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    print(json.dumps({
        "benchmark": "overhead",
        "model": model.name_or_path,
        "compression_ratio": args.ratio,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "kvsqueeze": kvsqueeze.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "target_ratio": TARGET_RATIO,
        "rows": rows,
        "skipped": skipped,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
