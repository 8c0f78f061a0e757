"""Head-wise budgets against uniform ones: measured cache bytes, prefill + compression time, decode speed.

For each head-wise press (AdaKV(ExpectedAttention), CriticalAdaKV, DuoAttention, KVzip) and each ratio, the same
context (essays, ``--length`` tokens of the model's own tokenizer) is compressed by the head-wise press and
by a uniform press at the same ratio (its natural counterpart), and both are timed side by side:

* ``bytes``: measured bytes of the compressed cache / measured bytes of the uncompressed cache (the ragged
  layout's per-head length index included);
* ``prefill+c``: wall time of ``Pipeline.compress`` (prefill, scoring, extra passes, compression);
* ``decode tok/s``: greedy decoding of ``--decode`` tokens after a short question, EOS ignored, from a fork of the
  compressed cache (median over ``--repeats`` runs).

Configurations are interleaved per round so a noisy machine slows all of them alike. Prints a table and ends with
one JSON line. Usage::

    python benchmarks/headwise.py                        # 4096 tokens, ratios 0.5 and 0.75
    python benchmarks/headwise.py --length 2048 --ratios 0.5 --presses adakv,critical_adakv
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from tqdm.auto import tqdm

import kvsqueeze
from kvsqueeze.cli import CLIError, format_table, parse_ratios
from kvsqueeze.needles import haystack

#: head-wise press (default fields) -> the uniform press it is compared with
PAIRS: dict[str, str] = {
    "adakv": "expected_attention",  # AdaKV(ExpectedAttention), as the EA paper evaluates it
    "critical_adakv": "criticalkv",
    "duo_attention": "streaming_llm",
    "kvzip": "expected_attention",
}
QUESTION = "What is the main point of the text above? Answer in one sentence."


def decode_speed(ctx, n_tokens: int) -> float:
    """Tokens per second of ``n_tokens`` greedy steps after the question (EOS ignored)."""
    pipe = ctx.pipeline
    model = pipe.model
    ids = pipe.question_ids(QUESTION)
    cache = ctx.fork_cache()
    kwargs = pipe.adapter.model_call_kwargs(cache)
    with torch.inference_mode(), pipe.adapter.attention_for_cache(cache):
        logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs).logits[:, -1]
        start = time.perf_counter()
        for _ in range(n_tokens):
            step = logits.argmax(-1, keepdim=True)
            logits = model(input_ids=step, use_cache=True, logits_to_keep=1, **kwargs).logits[:, -1]
        return n_tokens / (time.perf_counter() - start)



def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name or path (default: the embedded default)")
    parser.add_argument("--length", type=int, default=4096, help="context tokens (default 4096)")
    parser.add_argument("--ratios", default="0.5,0.75")
    parser.add_argument("--presses", default=",".join(PAIRS), help=f"head-wise presses (default {','.join(PAIRS)})")
    parser.add_argument("--decode", type=int, default=32, help="decoded tokens per timing (default 32)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds (default 2)")
    args = parser.parse_args(argv)
    try:
        ratios = parse_ratios(args.ratios)
    except CLIError as exc:
        parser.error(str(exc))
    names = [n.strip() for n in args.presses.split(",") if n.strip()]
    unknown = [n for n in names if n not in PAIRS]
    if unknown:
        parser.error(f"no uniform counterpart defined for {unknown}; known: {', '.join(PAIRS)}")

    model, tokenizer = kvsqueeze.load_model(args.model)
    pipe = kvsqueeze.Pipeline(model, tokenizer)
    context = haystack(tokenizer, args.length, seed=0)
    n_tokens = pipe.context_ids(context).shape[1]

    configs = []  # (label, headwise name, ratio, press)
    skipped = {}
    for name in names:
        uniform = PAIRS[name]
        for ratio in ratios:
            try:
                press = kvsqueeze.make_press(name, compression_ratio=ratio)
                press.validate(pipe.adapter)
            except (FileNotFoundError, ValueError, KeyError) as exc:
                skipped[name] = f"{type(exc).__name__}: {exc}"
                break
            configs.append((name, name, ratio, press))
            configs.append((uniform, name, ratio, kvsqueeze.make_press(uniform, compression_ratio=ratio)))
    full_ctx = pipe.compress(context)
    full_bytes = full_ctx.cache_bytes
    timings: dict[tuple[str, str, float], dict] = {}
    rounds = tqdm(range(args.repeats), desc="rounds", file=sys.stderr)
    for r in rounds:
        order = configs[r % len(configs):] + configs[: r % len(configs)] if configs else []
        for label, name, ratio, press in tqdm(order, desc=f"round {r + 1}", leave=False, file=sys.stderr):
            start = time.perf_counter()
            ctx = pipe.compress(context, press=press)
            seconds = time.perf_counter() - start
            speed = decode_speed(ctx, args.decode)
            entry = timings.setdefault((label, name, ratio), {"prefill": [], "speed": [], "bytes": ctx.cache_bytes})
            entry["prefill"].append(seconds)
            entry["speed"].append(speed)
        base = decode_speed(full_ctx, args.decode)
        timings.setdefault(("none", "none", 0.0), {"prefill": [], "speed": [], "bytes": full_bytes})["speed"].append(base)

    rows, results = [], []
    for name in names:
        if name in skipped:
            continue
        uniform = PAIRS[name]
        for ratio in ratios:
            h = timings[(name, name, ratio)]
            u = timings[(uniform, name, ratio)]
            row = {
                "press": name, "uniform": uniform, "ratio": ratio,
                "bytes_ratio": h["bytes"] / full_bytes, "uniform_bytes_ratio": u["bytes"] / full_bytes,
                "target_bytes_ratio": 1 - ratio + 0.02,
                "prefill_s": statistics.median(h["prefill"]), "uniform_prefill_s": statistics.median(u["prefill"]),
                "decode_tok_s": statistics.median(h["speed"]), "uniform_decode_tok_s": statistics.median(u["speed"]),
            }
            results.append(row)
            rows.append([
                name, f"{ratio:.2f}", f"{row['bytes_ratio']:.4f}", "yes" if row["bytes_ratio"] <= row["target_bytes_ratio"] else "NO",
                f"{row['prefill_s']:.2f}", f"{row['decode_tok_s']:.1f}", uniform, f"{row['uniform_bytes_ratio']:.4f}",
                f"{row['uniform_prefill_s']:.2f}", f"{row['uniform_decode_tok_s']:.1f}",
                f"{row['decode_tok_s'] / row['uniform_decode_tok_s']:.2f}",
            ])
    base_speed = statistics.median(timings[("none", "none", 0.0)]["speed"])
    headers = ["press", "ratio", "bytes", "<=1-r+.02", "prefill+c s", "decode tok/s", "uniform", "bytes",
               "prefill+c s", "decode tok/s", "decode h/u"]

    print(f"model {model.name_or_path}, {n_tokens} context tokens, {torch.get_num_threads()} threads, "
          f"{args.repeats} rounds; uncompressed cache {full_bytes / 1e6:.2f} MB, decode {base_speed:.1f} tok/s")
    print(format_table(headers, rows))
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    summary = {
        "benchmark": "headwise", "model": model.name_or_path, "context_tokens": n_tokens,
        "full_cache_bytes": full_bytes, "uncompressed_decode_tok_s": base_speed, "results": results,
        "skipped": skipped, "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
