"""Why a head-wise budget helps or hurts: what AdaKV(press) keeps compared with the uniform press, per head.

On needle cases (``kvsqueeze.needles``), the question is appended to the context and its real attention over the
context is computed at every layer (post-RoPE queries of the question tokens, softmax over the context). For the
uniform press and for ``adakv`` wrapping it, at each ratio:

* ``mass``: the share of the question's attention (mean over query heads and question tokens) that falls on kept
  entries — what head-wise budgets are designed to raise;
* ``needle``: the share of needle tokens kept, averaged over all (layer, KV head) pairs;
* ``top-k needle`` / ``top-k budget``: the same share and the entries kept, averaged over the ``--top`` KV heads that
  put the most question attention on the needle (the heads that retrieve it).

With ``--presses a,b,...`` the listed presses are compared with each other instead (the same columns), e.g. to
see whether a scorer keeps the attention mass and the needle better than Random on another model (``--model``).
Only the layers a press compresses count (Gemma 3's global layers).

Prints a table and one JSON line. ``python benchmarks/headwise_diagnosis.py [--cases 4] [--press expected_attention]
[--presses random,knorm,qfilters] [--model gemma3-270m]``
"""

from __future__ import annotations

import argparse
import json

import torch

import kvsqueeze
from kvsqueeze.needles import needle_cases
from kvsqueeze.presses import keep_top
from kvsqueeze.record import record_prefill


def keep_mask(press, layer) -> torch.Tensor:
    """The entries a press keeps at one layer, boolean ``(bsz, kv_heads, seq_len)``."""
    if hasattr(press, "keep_mask"):
        return press.keep_mask(layer)
    n = press.layer_budget(layer)
    keep = torch.zeros(layer.keys.shape[:3], dtype=torch.bool)
    return keep if n >= layer.seq_len else keep.scatter(-1, keep_top(press.score(layer), n), True)


def needle_positions(tokenizer, ids: list[int], answer: str) -> list[int]:
    """Context positions of the tokens that spell the needle's digits."""
    pieces = [tokenizer.decode([t]) for t in ids]
    text, starts = "", []
    for piece in pieces:
        starts.append(len(text))
        text += piece
    at = text.rfind(answer)
    if at < 0:
        raise ValueError(f"needle {answer} not found in the context tokens")
    return [i for i, s in enumerate(starts) if s < at + len(answer) and s + len(pieces[i]) > at]


@torch.inference_mode()
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1500)
    parser.add_argument("--press", default="expected_attention", help="the scorer AdaKV wraps")
    parser.add_argument("--ratios", default="0.25,0.5")
    parser.add_argument("--top", type=int, default=10, help="retrieval heads to average over")
    parser.add_argument("--presses", default=None, help="compare these presses instead of --press and adakv(--press)")
    parser.add_argument("--model", default=None, help="model name or path (default: the embedded default)")
    args = parser.parse_args(argv)
    model, tokenizer = kvsqueeze.load_model(args.model) if args.model else kvsqueeze.load_model()
    pipe = kvsqueeze.Pipeline(model, tokenizer)
    ratios = [float(r) for r in args.ratios.split(",")]
    presses = {}
    for r in ratios:
        if args.presses:
            for name in args.presses.split(","):
                presses[(name, r)] = kvsqueeze.make_press(name, compression_ratio=r)
            continue
        presses[(args.press, r)] = kvsqueeze.make_press(args.press, compression_ratio=r)
        presses[(f"adakv({args.press})", r)] = kvsqueeze.make_press(
            "adakv", press=kvsqueeze.make_press(args.press), compression_ratio=r
        )
    for press in presses.values():
        press.validate(pipe.adapter)  # a missing calibration artifact: say so before any prefill
    totals = {key: [0.0, 0.0, 0.0, 0.0] for key in presses}
    cases = needle_cases(tokenizer, n_cases=args.cases, n_tokens=args.tokens, seed=0)
    for case in cases:
        ctx_ids = pipe.context_ids(case.context)
        q_ids = pipe.question_ids(case.question, case.answer_prefix)
        n, m = ctx_ids.shape[1], q_ids.shape[1]
        with_question = record_prefill(model, torch.cat([ctx_ids, q_ids], dim=1))
        context_only = record_prefill(model, ctx_ids)
        pos = needle_positions(tokenizer, ctx_ids[0].tolist(), case.answer)
        attention = []
        for lf in with_question.layers:
            q = lf.queries(rope=True, last=m).float()
            groups = q.shape[1] // lf.keys.shape[1]
            k = lf.keys.float().repeat_interleave(groups, 1)
            logits = q @ k.transpose(-1, -2) * lf.adapter.scaling(lf.module)
            future = torch.arange(n + m)[None, :] > (n + torch.arange(m))[:, None]
            att = logits.masked_fill(future, float("-inf")).softmax(-1)[..., :n]
            attention.append((att / att.sum(-1, keepdim=True), groups))
        for key, press in presses.items():
            heads = []
            mass = needle = 0.0
            for (att, groups), layer in zip(attention, context_only.layers):
                keep = keep_mask(press, layer)[0]  # (kv_heads, n)
                mass += float((att[0] * keep.repeat_interleave(groups, 0)[:, None, :]).sum(-1).mean())
                needle += float(keep[:, pos].float().mean())
                on_needle = att[0][:, :, pos].sum(-1).mean(-1).view(keep.shape[0], groups).mean(-1)
                heads += [(float(on_needle[h]), float(keep[h, pos].float().mean()), int(keep[h].sum()))
                          for h in range(keep.shape[0])]
            top = sorted(heads, reverse=True)[: args.top]
            n_layers = len(attention)
            for i, v in enumerate((mass / n_layers, needle / n_layers, sum(t[1] for t in top) / len(top),
                                   sum(t[2] for t in top) / len(top))):
                totals[key][i] += v / len(cases)
    name = args.model or "the default model"
    print(f"{len(cases)} needle cases, ~{args.tokens} tokens, {name}; top {args.top} needle-retrieving KV heads")
    print(f"{'press':<32}{'ratio':>6}{'mass':>8}{'needle':>8}{'top-k needle':>14}{'top-k budget':>14}")
    for (name, r), (mass, needle, top_needle, top_budget) in totals.items():
        print(f"{name:<32}{r:>6.2f}{mass:>8.3f}{needle:>8.3f}{top_needle:>14.3f}{top_budget:>14.1f}")
    result = {"benchmark": "headwise_diagnosis", "model": args.model, "cases": len(cases), "tokens": args.tokens,
              "results": {f"{name}@{r}": dict(zip(("mass", "needle", "top_needle", "top_budget"), v))
                          for (name, r), v in totals.items()}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
