"""Chunked prefill: peak memory, time and needles of a block-wise compressed prefill against the one-pass prefill.

Each configuration runs in a fresh child process (so the resident set size, RSS, starts from the same point): it
loads the default model, warms up on a short text, then compresses needle cases of ``--tokens`` tokens of essays.
On the first case a thread samples the RSS every 2 ms during ``Pipeline.compress``; ``peak`` is its highest value
above the RSS before the prefill (what the prefill needed on top of the model), ``cache`` the measured bytes of the
compressed cache; the prefill is then timed again without the sampling thread. Every case is then answered, and the needles found are counted.

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


def child(config: str, tokens: int, budget: int, chunk: int, cases: int) -> dict:
    """Measure one configuration in this (fresh) process: ``none``, ``none+chunks``, ``<press>`` or
    ``decoding(<press>)+chunks``."""
    import torch

    import kvsqueeze
    from kvsqueeze.needles import haystack, needle_cases

    torch.set_num_threads(2)
    model, tokenizer = kvsqueeze.load_model()
    pipe = kvsqueeze.Pipeline(model, tokenizer)
    chunked = config.endswith("+chunks")
    name = config.removesuffix("+chunks")
    if name == "none":
        press = None
    elif name.startswith("decoding("):
        inner = kvsqueeze.make_press(name[len("decoding("):-1])
        press = kvsqueeze.make_press("decoding", press=inner, budget=budget, compression_interval=chunk)
    else:
        press = kvsqueeze.make_press(name, budget=budget)
    size = chunk if chunked else None
    with torch.inference_mode():  # warm-up: thread pools, kernels, RoPE tables
        pipe.compress(haystack(tokenizer, 2 * chunk, seed=1), press, prefill_chunk_size=size)
    found, row = 0, {}
    for i, case in enumerate(needle_cases(tokenizer, n_cases=cases, n_tokens=tokens)):
        if i == 0:
            _trim()
            before = _rss_mb()
            with PeakRSS() as rss, torch.inference_mode():
                ctx = pipe.compress(case.context, press, prefill_chunk_size=size)
            del ctx
            # Timed again without the sampling thread, which competes for the interpreter lock.
            start = time.perf_counter()
            with torch.inference_mode():
                ctx = pipe.compress(case.context, press, prefill_chunk_size=size)
            seconds = time.perf_counter() - start
            row = {
                "config": config,
                "tokens": ctx.n_tokens,
                "peak_mb": rss.peak - before,
                "cache_mb": ctx.cache_bytes / 1e6,
                "full_cache_mb": ctx.full_cache_bytes / 1e6,
                "max_layer_entries": max(ctx.layer_lengths),
                "seconds": seconds,
                "compressions_after_first_chunk": ctx.report.decoding_compressions,
            }
        else:
            with torch.inference_mode():
                ctx = pipe.compress(case.context, press, prefill_chunk_size=size)
        with torch.inference_mode():
            answer = ctx.answer(case.question, max_new_tokens=12, answer_prefix=case.answer_prefix)
        found += case.is_correct(answer)
        del ctx
    row["needles"] = found
    row["cases"] = cases
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--budget", type=int, default=1024, help="entries kept per head")
    parser.add_argument("--chunk", type=int, default=512, help="tokens per forward pass (and compression interval)")
    parser.add_argument("--cases", type=int, default=6, help="needle cases answered per configuration")
    parser.add_argument("--presses", default="knorm,keydiff,expected_attention")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.tokens, args.budget, args.chunk, args.cases)))
        return {}

    from tqdm.auto import tqdm

    from kvsqueeze.cli import format_table

    presses = [p.strip() for p in args.presses.split(",") if p.strip()]
    configs = ["none", "none+chunks"]
    for p in presses:
        configs += [p, f"decoding({p})+chunks"]
    rows = []
    for config in tqdm(configs, desc="configurations (one process each)", unit="config"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", config, "--tokens", str(args.tokens), "--budget", str(args.budget),
             "--chunk", str(args.chunk), "--cases", str(args.cases)],
            capture_output=True, text=True, check=False,
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode != 0 or not lines:
            raise SystemExit(f"{config}: child failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
        rows.append(json.loads(lines[-1]))

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
