"""Needle retention: how often each press keeps a 7-digit needle hidden in ~1.5k tokens of essays.

Every case is prefilled once (``Pipeline.record``) and compressed by every press and ratio from that one
recording, so all presses are compared on identical inputs. Prints a table and ends with one JSON line.

    python benchmarks/needles.py [--cases 12] [--tokens 1500] [--ratios 0.25,0.5] [--presses a,b,...]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from tqdm import tqdm

import kvsqueeze
from kvsqueeze.needles import needle_cases


def default_presses() -> list[str]:
    """Every registered press usable on its own with the model's sdpa attention (wrappers need an inner press)."""
    names = []
    for name in kvsqueeze.list_presses():
        try:
            press = kvsqueeze.make_press(name, compression_ratio=0.5)
        except (TypeError, ValueError):
            continue  # wrappers: composed, key_rerotation
        if not press.capabilities.needs_attention_weights:
            names.append(name)
    return names


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name or path (default: the embedded default)")
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=1500)
    parser.add_argument("--ratios", default="0.25,0.5")
    parser.add_argument("--presses", default=None, help="comma-separated press names (default: all usable)")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args(argv)

    ratios = [float(r) for r in args.ratios.split(",")]
    names = args.presses.split(",") if args.presses else default_presses()
    model, tokenizer = kvsqueeze.load_model(args.model)
    pipe = kvsqueeze.Pipeline(model, tokenizer)
    cases = needle_cases(tokenizer, n_cases=args.cases, n_tokens=args.tokens)
    presses = {(n, r): kvsqueeze.make_press(n, compression_ratio=r) for n in names for r in ratios}
    hits = {key: 0 for key in presses}
    baseline = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for case in tqdm(cases, desc="needle cases", unit="case"):
            recorded = pipe.record(case.context)
            kwargs = {"max_new_tokens": args.max_new_tokens, "answer_prefix": case.answer_prefix}
            baseline += case.is_correct(pipe.from_recorded(recorded).answer(case.question, **kwargs))
            for key, press in presses.items():
                # Presses that cannot share the recording (KVzip's extra passes): their own prefill.
                if not press.capabilities.shares_recording:
                    ctx = pipe.compress(case.context, press)
                else:
                    ctx = pipe.from_recorded(recorded, press)
                answer = ctx.answer(case.question, **kwargs)
                hits[key] += case.is_correct(answer)
    seconds = time.perf_counter() - start

    n = len(cases)
    print(f"\nneedles kept out of {n} cases (~{args.tokens} tokens each), model {args.model or 'smollm2-135m'}")
    print(f"uncompressed: {baseline}/{n}")
    header = f"{'press':<26}" + "".join(f"{'r=' + str(r):>8}" for r in ratios)
    print(header)
    print("-" * len(header))
    for name in sorted(names, key=lambda x: -sum(hits[x, r] for r in ratios)):
        print(f"{name:<26}" + "".join(f"{hits[name, r]:>8}" for r in ratios))
    result = {
        "benchmark": "needles",
        "model": args.model or "smollm2-135m",
        "cases": n,
        "tokens": args.tokens,
        "uncompressed": baseline,
        "hits": {f"{name}@{r}": hits[name, r] for name, r in presses},
        "seconds": round(seconds, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
