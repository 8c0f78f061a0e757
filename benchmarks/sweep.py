"""Sweep speed: one shared prefill per sample (``run_sweep``) against the naive loop (one prefill per press × ratio).

Both modes evaluate the same samples with the same presses × ratios in the same process, after one warm-up
prefill, each into a fresh temporary results directory (nothing is resumed). Reported per mode: wall time, number
of prefills, and where the time goes — prefill, compression, decoding, and the rest (tokenisation, cache forks,
bookkeeping). Decoding costs the same in both modes (the same questions are decoded against the same caches), so
the end-to-end speed-up is bounded by ``(prefill + decode) / decode``; the prefill-only speed-up is reported too.
The predictions of both modes are compared (they must be identical).

Rows: needle-in-a-haystack cases from ``kvsqueeze.needles`` (a 7-digit number in essay text) wrapped as a
benchmark, or any registered benchmark with ``--benchmark`` (``--length`` then sets its ``length`` option).
Prints a table, then one JSON line. Usage::

    python benchmarks/sweep.py                                   # 3 samples x ~2k tokens, 5 presses x 3 ratios
    python benchmarks/sweep.py --samples 2 --tokens 1024 --presses knorm,snapkv --ratios 0.5
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

import kvsqueeze
from kvsqueeze.cli import format_table
from kvsqueeze import Pipeline, load_model
from kvsqueeze.evaluation.base import Benchmark, Prediction, Sample, make_benchmark
from kvsqueeze.evaluation.sweep import check_ratios, read_predictions, run_sweep
from kvsqueeze.needles import needle_cases
from kvsqueeze.presses import press_class

DEFAULT_PRESSES = "knorm,expected_attention,snapkv,keydiff,streaming_llm"
TARGET_SPEEDUP = 5.0


class NeedleRows(Benchmark):
    """``kvsqueeze.needles.needle_cases`` as benchmark rows: one question per haystack, string-match score."""

    name = "needles"
    tasks = ("needle",)

    def __init__(self, n_tokens: int = 2048, max_new_tokens: int = 8):
        if n_tokens < 64:
            raise ValueError(f"n_tokens must be >= 64, got {n_tokens}")
        self.n_tokens = n_tokens
        self.max_new_tokens = max_new_tokens

    def samples(self, tokenizer, limit: int | None = None, seed: int = 0) -> Iterator[Sample]:
        for i, case in enumerate(needle_cases(tokenizer, n_cases=limit or 3, n_tokens=self.n_tokens, seed=seed)):
            yield Sample(
                id=f"needle-{i}", task="needle", context=case.context, questions=(case.question,),
                answers=((case.answer,),), answer_prefix=case.answer_prefix, max_new_tokens=self.max_new_tokens,
                metadata={"length": self.n_tokens, "depth": round(case.depth, 3)},
            )

    def score(self, predictions: Sequence[Prediction]) -> dict[str, float]:
        hits = [any(a in p.prediction for a in p.answers) for p in predictions]
        score = 100.0 * sum(hits) / len(hits) if hits else 0.0
        return {"needle": score, "average": score}

    def config(self) -> dict[str, Any]:
        return {"n_tokens": self.n_tokens, "max_new_tokens": self.max_new_tokens}


def run_mode(model, tokenizer, benchmark, args, naive: bool) -> dict[str, Any]:
    """One sweep in a fresh temporary directory; its timings and predictions."""
    with tempfile.TemporaryDirectory(prefix="kvsqueeze-sweep-bench-") as tmp:
        start = time.perf_counter()
        result = run_sweep(
            model, tokenizer, benchmark, args.presses, args.ratios, limit=args.samples, seed=args.seed,
            output_dir=tmp, naive=naive, resume=False, progress=True,
        )
        wall = time.perf_counter() - start
        rows = read_predictions(result.directory / "predictions.jsonl")
    accounted = result.prefill_seconds + result.compression_seconds + result.decode_seconds
    return {
        "mode": "naive" if naive else "shared",
        "wall_s": wall,
        "prefills": result.prefills,
        "units": result.units_run,
        "prefill_s": result.prefill_seconds,
        "compression_s": result.compression_seconds,
        "decode_s": result.decode_seconds,
        "other_s": wall - accounted,
        "scores": {f"{r['press']}@{r['ratio']:g}": r["metrics"]["average"] for r in result.metrics},
        "predictions": {(r["sample_id"], r["press"], r["ratio"], r["question_index"]): r["prediction"] for r in rows},
        "context_tokens": sorted({r["context_tokens"] for r in rows}),
    }


def format_rows(runs: list[dict[str, Any]]) -> str:
    headers = ["mode", "prefills", "wall s", "prefill s", "compression s", "decode s", "other s"]
    body = [[r["mode"], str(r["prefills"]), f"{r['wall_s']:.1f}", f"{r['prefill_s']:.1f}", f"{r['compression_s']:.2f}",
             f"{r['decode_s']:.1f}", f"{r['other_s']:.1f}"] for r in runs]
    return format_table(headers, body)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name or path (default: the embedded default model)")
    parser.add_argument("--presses", default=DEFAULT_PRESSES, help=f"comma-separated presses (default {DEFAULT_PRESSES})")
    parser.add_argument("--ratios", default="0.25,0.5,0.75", help="comma-separated ratios (default 0.25,0.5,0.75)")
    parser.add_argument("--samples", type=int, default=3, help="samples (per task) evaluated (default 3)")
    parser.add_argument("--tokens", type=int, default=2048, help="needle haystack length in tokens (default 2048)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="answer length limit (default 8)")
    parser.add_argument("--benchmark", default=None, help="a registered benchmark instead of the needle rows")
    parser.add_argument("--length", type=int, default=None, help="with --benchmark: its length option")
    parser.add_argument("--seed", type=int, default=0, help="row seed (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    args.presses = [p.strip() for p in args.presses.split(",") if p.strip()]
    for name in args.presses:
        press_class(name)  # unknown names fail here, before the model loads
    try:
        args.ratios = check_ratios([float(r) for r in args.ratios.split(",")])
    except (TypeError, ValueError) as exc:
        parser.error(f"--ratios: {exc}")
    for flag, value, minimum in (("--samples", args.samples, 1), ("--tokens", args.tokens, 64),
                                 ("--max-new-tokens", args.max_new_tokens, 1)):
        if value < minimum:
            parser.error(f"{flag} must be >= {minimum}, got {value}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.length is not None and args.benchmark is None:
        parser.error("--length applies to --benchmark; the needle rows take --tokens")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.benchmark:
        options = {"length": args.length} if args.length is not None else {}
        benchmark = make_benchmark(args.benchmark, **options)
    else:
        benchmark = NeedleRows(args.tokens, args.max_new_tokens)
    model, tokenizer = load_model(args.model)
    # Warm-up: the first forward passes of a process pay one-off costs that would otherwise hit one mode only.
    Pipeline(model, tokenizer).compress("warm up " * 128).answer("ok?", max_new_tokens=2)

    runs = [run_mode(model, tokenizer, benchmark, args, naive=False),
            run_mode(model, tokenizer, benchmark, args, naive=True)]
    shared, naive = runs
    mismatches = sorted(k for k in naive["predictions"] if naive["predictions"][k] != shared["predictions"].get(k))
    speedup = naive["wall_s"] / shared["wall_s"]
    prefill_speedup = (naive["prefill_s"] + naive["compression_s"]) / (shared["prefill_s"] + shared["compression_s"])
    bound = (naive["wall_s"]) / (naive["wall_s"] - naive["prefill_s"] - naive["compression_s"])

    print(f"\nmodel {model.name_or_path}, {benchmark.name} ({args.samples} samples, context tokens "
          f"{shared['context_tokens']}), presses {','.join(args.presses)} x ratios {args.ratios} + baseline, "
          f"{torch.get_num_threads()} torch threads")
    print(format_rows(runs))
    print(f"\nspeed-up (wall): {speedup:.2f}x (target >= {TARGET_SPEEDUP}x: "
          f"{'ok' if speedup >= TARGET_SPEEDUP else 'MISSED'}); prefill + compression only: {prefill_speedup:.1f}x; "
          f"upper bound with this decode time (zero-cost shared prefill): {bound:.2f}x")
    print(f"predictions identical in both modes: {'yes' if not mismatches else f'NO, {len(mismatches)} differ'}")
    print(json.dumps({
        "benchmark": "sweep",
        "model": model.name_or_path,
        "rows": benchmark.name,
        "samples": args.samples,
        "context_tokens": shared["context_tokens"],
        "max_new_tokens": args.max_new_tokens,
        "presses": args.presses,
        "ratios": args.ratios,
        "threads": torch.get_num_threads(),
        "kvsqueeze": kvsqueeze.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "runs": [{k: v for k, v in r.items() if k not in ("predictions",)} for r in runs],
        "speedup": speedup,
        "prefill_speedup": prefill_speedup,
        "speedup_bound": bound,
        "target_speedup": TARGET_SPEEDUP,
        "mismatches": [list(k) for k in mismatches],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
