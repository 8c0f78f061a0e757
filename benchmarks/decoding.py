"""Decoding-time compression on the default model: cache bytes, speed and next-token agreement over a long output.

The uncompressed model writes ``--new-tokens`` greedy tokens after a prompt of ``--prompt-tokens`` tokens of the
shipped essays, and every press decodes the *same* tokens (teacher forcing) in lockstep with it, so every run
sees the same sequence and the same machine conditions: per step it records the measured cache bytes (keys and values, and the decoding state a ``decoding``
press keeps) and whether its greedy next token equals the uncompressed model's. Prompt-only presses (compressed
once, at the prefill) are shown for comparison. Prints a table, writes a plot of bytes per step
(``--plot``), then one JSON line.

    python benchmarks/decoding.py [--prompt-tokens 512] [--new-tokens 1024] [--budget 256] [--interval 128]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

import kvsqueeze
from kvsqueeze import adapter as A
from kvsqueeze import make_press
from kvsqueeze.needles import haystack
from kvsqueeze.presses.decoding import decoding_state_nbytes


def presses(budget: int, interval: int, prompt_tokens: int) -> dict[str, object]:
    ratio = 1 - budget / prompt_tokens
    return {
        "none": None,
        f"knorm r={ratio:.2f} (prompt only)": make_press("knorm", compression_ratio=ratio),
        f"expected_attention r={ratio:.2f} (prompt only)": make_press("expected_attention", compression_ratio=ratio),
        "decoding(knorm)": make_press("decoding", press=make_press("knorm"), budget=budget,
                                      compression_interval=interval),
        "decoding(expected_attention)": make_press("decoding", press=make_press("expected_attention"),
                                                   budget=budget, compression_interval=interval),
        "decoding(streaming_llm)": make_press("decoding", press=make_press("streaming_llm"), budget=budget,
                                              compression_interval=interval),
        "decoding(keydiff)": make_press("decoding", press=make_press("keydiff"), budget=budget,
                                        compression_interval=interval),
    }


@torch.inference_mode()
def run_side_by_side(model, configs: dict[str, object], prompt: torch.Tensor, n_new: int) -> dict[str, dict]:
    """Decode ``n_new`` tokens under every press *in lockstep*: at each step the uncompressed model picks the
    greedy token, then every press is fed that token. Only the forward calls are timed (each inside its press
    block), so a slow spell of the machine slows every press alike."""
    adapter = A.ModelAdapter(model)
    runs = {}
    for label, press in configs.items():
        cache = adapter.new_cache()
        kwargs = adapter.model_call_kwargs(cache)
        with press(model) if press is not None else adapter.attention_for_cache(cache):
            logits = model(input_ids=prompt, use_cache=True, logits_to_keep=1, **kwargs).logits[:, -1]
        runs[label] = {"press": press, "cache": cache, "kwargs": kwargs, "logits": logits, "seconds": 0.0,
                       "agree": [], "bytes": [], "state_bytes": []}
    reference = next(iter(runs.values()))
    for _ in tqdm(range(n_new), desc="decoding"):
        token = int(reference["logits"][0].argmax())
        step = torch.tensor([[token]])
        for r in runs.values():
            r["agree"].append(int(r["logits"][0].argmax()) == token)
            press, cache = r["press"], r["cache"]
            with press(model) if press is not None else adapter.attention_for_cache(cache):
                start = time.perf_counter()
                r["logits"] = model(input_ids=step, use_cache=True, logits_to_keep=1, **r["kwargs"]).logits[:, -1]
                r["seconds"] += time.perf_counter() - start
            r["bytes"].append(A.cache_nbytes(cache))
            r["state_bytes"].append(decoding_state_nbytes(cache))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--budget", type=int, default=256, help="entries per head a decoding press keeps")
    parser.add_argument("--interval", type=int, default=128, help="tokens between compressions")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", default="benchmarks/results/decoding.png")
    args = parser.parse_args()
    if not 0 < args.budget < args.prompt_tokens:
        parser.error(f"--budget must be in (0, --prompt-tokens={args.prompt_tokens}), got {args.budget}")
    torch.set_num_threads(args.threads)
    model, tokenizer = kvsqueeze.load_model()
    text = haystack(tokenizer, args.prompt_tokens)
    prompt = tokenizer(text, return_tensors="pt").input_ids[:, : args.prompt_tokens]

    results = run_side_by_side(model, presses(args.budget, args.interval, prompt.shape[1]), prompt, args.new_tokens)
    reference = results["none"]
    base_s = reference["seconds"]
    print(f"model smollm2-135m, prompt {prompt.shape[1]} tokens of the essays, {args.new_tokens} new tokens "
          f"(greedy, uncompressed; every press fed the same tokens in lockstep, forward calls timed), budget {args.budget} per head, interval "
          f"{args.interval}, {args.threads} threads\n")
    header = (f"{'press':<44} {'KV MB end':>9} {'KV MB max':>9} {'state MB':>8} {'agree %':>7} "
              f"{'agree 1st 256 %':>15} {'ms/token':>8} {'time vs none':>12}")
    print(header)
    print("-" * len(header))
    rows = []
    for label, r in results.items():
        row = {
            "press": label,
            "kv_bytes_end": r["bytes"][-1],
            "kv_bytes_max": max(r["bytes"]),
            "state_bytes_end": r["state_bytes"][-1],
            "agreement": sum(r["agree"]) / len(r["agree"]),
            "agreement_first_256": sum(r["agree"][:256]) / len(r["agree"][:256]),
            "ms_per_token": 1000 * r["seconds"] / args.new_tokens,
            "time_ratio": r["seconds"] / base_s,
        }
        rows.append(row)
        print(f"{label:<44} {row['kv_bytes_end'] / 1e6:>9.2f} {row['kv_bytes_max'] / 1e6:>9.2f} "
              f"{row['state_bytes_end'] / 1e6:>8.2f} {100 * row['agreement']:>7.1f} "
              f"{100 * row['agreement_first_256']:>15.1f} {row['ms_per_token']:>8.1f} {row['time_ratio']:>12.2f}")
    print("\nagree: the press's greedy next token equals the uncompressed model's, fed the same tokens; "
          "KV MB: measured key/value bytes (the state a decoding press keeps is listed apart)")

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for label, r in results.items():
            ax.plot(range(1, args.new_tokens + 1), [b / 1e6 for b in r["bytes"]], label=label)
        ax.set_xlabel("generated tokens")
        ax.set_ylabel("KV cache MB (measured)")
        ax.set_title(f"SmolLM2-135M, {prompt.shape[1]}-token prompt: cache bytes while decoding")
        ax.legend(fontsize=7)
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")

    print(json.dumps({
        "benchmark": "decoding", "model": "smollm2-135m", "prompt_tokens": prompt.shape[1],
        "new_tokens": args.new_tokens, "budget": args.budget, "interval": args.interval, "threads": args.threads,
        "kvsqueeze": kvsqueeze.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "rows": rows,
    }))


if __name__ == "__main__":
    main()
