"""Chunked prefill: peak memory, time and needles of a block-wise compressed prefill against the one-pass prefill.

Each configuration runs in two fresh child processes, which load the default model and warm up on a short text.
The first compresses the first needle case (``--tokens`` tokens of essays) while a thread samples the resident set
size (RSS) every 2 ms: ``peak`` is its highest value above the RSS before the prefill (what the prefill needed on
top of the model), with glibc's mmap threshold fixed at 128 KiB so that the RSS follows the live buffers (by
default glibc raises the threshold as large buffers are freed and then keeps their pages, so the peak would
follow the allocation history more than what was live). ``cache`` is the measured bytes of the compressed cache.
The second process, with the default allocator, times the first case's prefill and answers every case, counting
the needles found.

Configurations: the one-pass prefill without a press, and chunked without a press (chunks of ``--chunk``); each
scorer at ``--budget`` entries per head in one pass (compressed layer by layer inside the prefill), and the same
scorer inside ``decoding`` with ``compression_interval = --chunk``, prefilled in chunks of ``--chunk`` (compressed
after every chunk: no layer ever holds more than budget + chunk entries). Prints a table, then one JSON line.

    python benchmarks/chunked_prefill.py [--tokens 4000] [--budget 1024] [--chunk 512] [--cases 6]
        [--presses knorm,keydiff,expected_attention]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rss import _rss_mb, _trim  # noqa: E402  (the same RSS reading as benchmarks/rss.py)


#: Bytes from which glibc serves an allocation with its own mapping (returned to the system when freed).
MMAP_THRESHOLD = 128 * 1024


class PeakRSS:
    """Highest RSS (MB) seen by a thread sampling every 2 ms while the block runs."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.002)

    def __enter__(self) -> PeakRSS:
        self.peak = _rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _press(config: str, budget: int, chunk: int):
    import kvsqueeze

    name = config.removesuffix("+chunks")
    if name == "none":
        return None
    if name.startswith("decoding("):
        inner = kvsqueeze.make_press(name[len("decoding("):-1])
        return kvsqueeze.make_press("decoding", press=inner, budget=budget, compression_interval=chunk)
    return kvsqueeze.make_press(name, budget=budget)


def child(config: str, mode: str, tokens: int, budget: int, chunk: int, cases: int) -> dict:
    """Measure one configuration in this (fresh) process: ``none``, ``none+chunks``, ``<press>`` or
    ``decoding(<press>)+chunks``. ``mode`` "memory": the peak RSS of the first case's prefill; "run": its time,
    then the needles of every case."""
    import torch

    import kvsqueeze
    from kvsqueeze.needles import haystack, needle_cases

    torch.set_num_threads(2)
    model, tokenizer = kvsqueeze.load_model()
    pipe = kvsqueeze.Pipeline(model, tokenizer)
    press = _press(config, budget, chunk)
    size = chunk if config.endswith("+chunks") else None
    with torch.inference_mode():  # warm-up: thread pools, kernels, RoPE tables
        pipe.compress(haystack(tokenizer, 2 * chunk, seed=1), press, prefill_chunk_size=size)
    all_cases = needle_cases(tokenizer, n_cases=cases, n_tokens=tokens)
    if mode == "memory":
        _trim()
        before = _rss_mb()
        with PeakRSS() as rss, torch.inference_mode():
            ctx = pipe.compress(all_cases[0].context, press, prefill_chunk_size=size)
        return {
            "config": config,
            "tokens": ctx.n_tokens,
            "peak_mb": rss.peak - before,
            "cache_mb": ctx.cache_bytes / 1e6,
            "full_cache_mb": ctx.full_cache_bytes / 1e6,
            "max_layer_entries": max(ctx.layer_lengths),
        }
    found, row = 0, {}
    for i, case in enumerate(all_cases):
        start = time.perf_counter()
        with torch.inference_mode():
            ctx = pipe.compress(case.context, press, prefill_chunk_size=size)
        if i == 0:
            row = {"seconds": time.perf_counter() - start,
                   "compressions_after_first_chunk": ctx.report.decoding_compressions}
        with torch.inference_mode():
            answer = ctx.answer(case.question, max_new_tokens=12, answer_prefix=case.answer_prefix)
        found += case.is_correct(answer)
        del ctx
    return {**row, "needles": found, "cases": cases}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--budget", type=int, default=1024, help="entries kept per head")
    parser.add_argument("--chunk", type=int, default=512, help="tokens per forward pass (and compression interval)")
    parser.add_argument("--cases", type=int, default=6, help="needle cases answered per configuration")
    parser.add_argument("--presses", default="knorm,keydiff,expected_attention")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="run", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.mode, args.tokens, args.budget, args.chunk, args.cases)))
        return {}

    from tqdm.auto import tqdm

    from kvsqueeze.cli import format_table

    presses = [p.strip() for p in args.presses.split(",") if p.strip()]
    configs = ["none", "none+chunks"]
    for p in presses:
        configs += [p, f"decoding({p})+chunks"]
    rows = []
    for config in tqdm(configs, desc="configurations (two processes each)", unit="config"):
        row = {}
        for mode in ("memory", "run"):
            # Memory: glibc's mmap threshold fixed, so freed large buffers go back to the system at once and the
            # RSS follows what is live. Time and needles: the default allocator.
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD)) if mode == "memory" else None
            out = subprocess.run(
                [sys.executable, __file__, "--child", config, "--mode", mode, "--tokens", str(args.tokens),
                 "--budget", str(args.budget), "--chunk", str(args.chunk), "--cases", str(args.cases)],
                capture_output=True, text=True, check=False, env=env,
            )
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if out.returncode != 0 or not lines:
                raise SystemExit(f"{config} ({mode}): child failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
            row.update(json.loads(lines[-1]))
        rows.append(row)

    base = rows[0]
    print(f"\nChunked prefill, default model, ~{args.tokens} tokens, budget {args.budget} entries per head, chunks of "
          f"{args.chunk}; peak: RSS above the level before the prefill (first case); needles: of {args.cases}")
    table = [
        (r["config"], str(r["tokens"]), f"{r['peak_mb']:.0f}", f"{r['peak_mb'] / base['peak_mb']:.2f}",
         f"{r['cache_mb']:.1f}", str(r["max_layer_entries"]), f"{r['seconds']:.2f}",
         f"{r['seconds'] / base['seconds']:.2f}", f"{r['needles']}/{r['cases']}")
        for r in rows
    ]
    print(format_table(
        ["configuration", "tokens", "peak MB", "peak vs none", "cache MB", "entries/layer", "prefill s",
         "time vs none", "needles"],
        table,
    ))
    result = {"benchmark": "chunked_prefill", "tokens": args.tokens, "budget": args.budget, "chunk": args.chunk,
              "cases": args.cases, "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
