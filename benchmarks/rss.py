"""Process memory: does the resident set of a compressed context match the bytes its cache reports?

``CompressedContext.cache_bytes`` is measured from the cache tensors' storage. This checks it from the outside, by
the process's resident set size (RSS, ``/proc/self/statm``): each press runs in a fresh child process, which loads
the model, warms up on a short text, then compresses ~4k tokens of the shipped essays and reads its RSS

* right after ``Pipeline.compress`` (glibc may keep freed prefill buffers mapped: this includes them),
* after ``gc.collect()`` and ``malloc_trim(0)``, which returns freed heap pages to the system: what the context
  really holds,
* after deleting the context (and trimming again): back to the start if nothing leaked.

``held`` is the rise of the trimmed RSS over the RSS before the prefill; a press frees what it evicts when
``held`` matches ``cache_bytes`` rather than ``full_cache_bytes``. Prints a table, then one JSON line.

    python benchmarks/rss.py [--tokens 4000] [--ratio 0.5] [--presses none,knorm,adakv,...]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import subprocess
import sys
import time

DEFAULT_PRESSES = "none,knorm,expected_attention,snapkv,pyramidkv,adakv,kvzip"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _trim() -> bool:
    """``gc.collect()`` then glibc's ``malloc_trim(0)``; False where there is no glibc."""
    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        return False
    return True


def child(name: str, tokens: int, ratio: float) -> dict:
    """Measure one press in this (fresh) process."""
    import torch

    import kvsqueeze
    from kvsqueeze.needles import haystack

    torch.set_num_threads(2)
    model, tokenizer = kvsqueeze.load_model()
    pipe = kvsqueeze.Pipeline(model, tokenizer)
    extra = {"tokenizer": tokenizer} if name == "kvzip" else {}
    press = None if name == "none" else kvsqueeze.make_press(name, compression_ratio=ratio, **extra)
    text = haystack(tokenizer, tokens, seed=0)
    with torch.inference_mode():
        pipe.compress(haystack(tokenizer, 256, seed=1), press)  # warm-up: thread pools, kernels, RoPE tables
    trimmed = _trim()
    before = _rss_mb()
    start = time.perf_counter()
    with torch.inference_mode():
        ctx = pipe.compress(text, press)
    seconds = time.perf_counter() - start
    gc.collect()
    after = _rss_mb()
    _trim()
    after_trim = _rss_mb()
    row = {
        "press": name,
        "tokens": ctx.n_tokens,
        "cache_mb": ctx.cache_bytes / 1e6,
        "full_cache_mb": ctx.full_cache_bytes / 1e6,
        "rss_before_mb": before,
        "rise_mb": after - before,
        "held_mb": after_trim - before,
        "seconds": seconds,
        "trimmed": trimmed,
    }
    del ctx
    _trim()
    row["after_delete_mb"] = _rss_mb() - before
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--presses", default=DEFAULT_PRESSES, help=f"comma-separated (default {DEFAULT_PRESSES})")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.tokens, args.ratio)))
        return {}

    from tqdm.auto import tqdm

    from kvsqueeze.cli import format_table

    names = [n.strip() for n in args.presses.split(",") if n.strip()]
    rows = []
    for name in tqdm(names, desc="presses (one process each)", unit="press"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", name, "--tokens", str(args.tokens), "--ratio", str(args.ratio)],
            capture_output=True, text=True, check=False,
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode != 0 or not lines:
            raise SystemExit(f"{name}: child failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
        rows.append(json.loads(lines[-1]))

    print(f"\nRSS of a compressed context, default model, ratio {args.ratio}, one process per press (MB)")
    table = [
        (r["press"], str(r["tokens"]), f"{r['full_cache_mb']:.2f}", f"{r['cache_mb']:.2f}", f"{r['rise_mb']:+.1f}",
         f"{r['held_mb']:+.1f}", f"{r['held_mb'] - r['cache_mb']:+.1f}", f"{r['after_delete_mb']:+.1f}")
        for r in rows
    ]
    print(format_table(
        ["press", "tokens", "full cache", "cache_bytes", "RSS rise", "held (trimmed)", "held - cache", "after del"],
        table,
    ))
    print("\nRSS rise: right after compress; held: after gc + malloc_trim (freed pages returned); after del: "
          "the context deleted and trimmed again. All relative to the RSS before the prefill.")
    result = {"benchmark": "rss", "ratio": args.ratio, "tokens": args.tokens, "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
