"""Why compression inside the prefill costs more than the same work repeated: the first kernels after a gap.

A press compresses each layer in a hook that runs once per layer, ~50 ms after the previous call at 1k tokens on
the default model, with the model's own kernels in between. This script times small torch operations right after
such a gap, against the same operations run back to back:

* ``gap`` is what runs before the timed operations: nothing, a 20 ms pure-Python busy loop, a 20 ms sleep, or one
  linear layer of the default model's MLP shape (1024 tokens × 576 → 1536);
* ``first``/``second`` time the first and second operation after the gap, ``op`` names the operation (an add of 16
  floats, or one of the kernels a press runs: top-k + sort of 3×1024 scores, ``index_select`` of 1536 rows);
* everything is on tensors allocated before the gap, so nothing here allocates memory or touches new data.

On the 2026-11-29 machine a gap with no torch work in it (the busy loop) was enough to make the first operation
many times slower, which points at code and data of the kernel path being evicted between calls, not at anything
a press computes; on the 2026-11-30 machine the busy loop costs little (``index_select`` aside) and a model layer
4-10x for the first small kernel. The penalty depends on the virtual machine. Prints a table, then one JSON line. Usage::

    python benchmarks/cold_kernels.py [--repeats 40]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from kvsqueeze.cli import format_table


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=40, help="timed repetitions per row (median reported)")
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error(f"--repeats must be >= 3, got {args.repeats}")
    torch.set_grad_enabled(False)
    torch.manual_seed(0)

    hidden, weight = torch.randn(1024, 576), torch.randn(1536, 576)
    out = torch.empty(1024, 1536)
    small = torch.ones(16)
    scores = torch.randn(1, 3, 1024)
    rows_src, rows_idx = torch.randn(3 * 1024, 64), torch.randperm(3 * 1024)[:1536]

    gaps = {
        "none": lambda: None,
        "python busy loop 20 ms": lambda: busy(0.02),
        "sleep 20 ms": lambda: time.sleep(0.02),
        "linear 1024x576->1536": lambda: torch.matmul(hidden, weight.T, out=out),
    }
    ops = {
        "add (16 floats)": lambda: small + 1,
        "topk+sort (3x1024)": lambda: scores.topk(512, dim=-1, sorted=False).indices.sort(dim=-1),
        "index_select (1536 rows)": lambda: rows_src.index_select(0, rows_idx),
    }
    results = []
    for op_name, op in ops.items():
        for gap_name, gap in gaps.items():
            first, second = [], []
            for _ in range(args.repeats + 1):
                gap()
                t0 = time.perf_counter()
                op()
                t1 = time.perf_counter()
                op()
                t2 = time.perf_counter()
                first.append(t1 - t0)
                second.append(t2 - t1)
            first, second = first[1:], second[1:]  # the very first call also pays one-off set-up
            results.append({"op": op_name, "gap": gap_name, "first_us": statistics.median(first) * 1e6,
                            "second_us": statistics.median(second) * 1e6})

    base = {r["op"]: r["second_us"] for r in results if r["gap"] == "none"}
    table = [
        (r["op"], r["gap"], f"{r['first_us']:.1f}", f"{r['second_us']:.1f}", f"{r['first_us'] / base[r['op']]:.1f}")
        for r in results
    ]
    print(f"median of {args.repeats} repetitions, {torch.get_num_threads()} torch threads, {platform.processor() or platform.machine()}")
    print(format_table(["op", "gap before it", "first us", "second us", "first / warm"], table))
    print("first / warm: the first operation after the gap over the same operation run back to back (gap none, second).")
    print(json.dumps({"benchmark": "cold_kernels", "repeats": args.repeats, "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "python": platform.python_version(), "rows": results}))


if __name__ == "__main__":
    main()
