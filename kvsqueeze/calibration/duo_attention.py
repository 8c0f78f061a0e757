"""DuoAttention calibration: learn one gate per (layer, KV head) that says whether the head needs the full context.

Paper: "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads",
https://arxiv.org/abs/2410.10819, §3.1 ("Retrieval-oriented head identification").

Every KV head of every full-attention layer gets a gate ``α ∈ [0, 1]``, initialised to 1. During training the
head's attention output is ``α · full + (1 − α) · streaming``, where the streaming branch sees only the first
``n_sink`` and the last ``n_recent`` tokens. The model weights stay frozen. The loss is the squared distance between
the final hidden states of the full model and of the gated model at the answer positions of synthetic passkey
retrieval samples (the mean squared difference, averaged over the hidden dimension and the answer positions, as the
paper's "mean squared distance" and its reference code ``duo_attn/train.py`` compute it: summed over the hidden
dimension instead, the distillation term would be ``hidden_size`` times larger and λ that much weaker, leaving
the gates near 1), plus ``λ · Σ|α|``; after
each Adam step the gates are clipped to [0, 1]. Heads the model can replace by a streaming window lose their gate
to the L1 term; heads that retrieve the passkeys keep theirs.

Scaled down for CPUs (defaults; all exposed by :func:`calibrate_duo_attention`): sequences of 1,024 tokens instead
of 1K–32K, 50 steps instead of 2,000, 5 passkeys of 16 digits instead of 10 passkeys of 32 tokens, essay haystacks
(the shipped Paul Graham essays) instead of BookSum, and a window of 16 sink + 64 recent tokens instead of
128 + 256 (the window is the same fraction of the sequence as the paper's at its shorter lengths).

Cost on the default SmolLM2-135M (float32, one CPU thread): each step is one full forward for the reference plus
a gated forward and backward, ~11 s per 1,024-token step on an idle core; the default 50 steps took 21 min wall
on a shared 2-core machine (peak RSS 2.8 GB). Lower ``seq_len``/``steps`` for a quicker, coarser ranking.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kvsqueeze import adapter as A
from kvsqueeze.presses.base import check_int, check_number

PASSKEY_SENTENCE = " The pass key is {key}. Remember it. {key} is the pass key. "
RECALL_PROMPT = "\n\nWhat are the pass keys mentioned in the text above? The pass keys are:"


@dataclass
class PasskeySample:
    """One training sample: ``input_ids`` ``(1, seq_len)`` and the positions whose hidden states are compared."""

    input_ids: torch.Tensor
    answer_positions: torch.Tensor


def passkey_sample(
    tokenizer, haystack_ids: list[int], seq_len: int, n_passkeys: int, passkey_digits: int, rng: random.Random
) -> PasskeySample:
    """A multi-passkey retrieval sample of ``seq_len`` tokens (DuoAttention's synthetic training data).

    ``n_passkeys`` random digit strings are inserted at random depths of an essay haystack; the sample ends with a
    question asking for them, followed by the passkeys themselves (teacher-forced). The answer positions are the
    tokens of those recalled passkeys.
    """
    keys = ["".join(rng.choice("0123456789") for _ in range(passkey_digits)) for _ in range(n_passkeys)]
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    probe = tokenizer("a", add_special_tokens=True).input_ids
    bare = encode("a")
    prefix = probe[: len(probe) - len(bare)] if probe[len(probe) - len(bare) :] == bare else []
    needles = [encode(PASSKEY_SENTENCE.format(key=k)) for k in keys]
    recall = encode(RECALL_PROMPT)
    answers: list[list[int]] = []
    for i, k in enumerate(keys):
        answers.append(encode((" " if i == 0 else ", ") + k))
    overhead = len(prefix) + sum(map(len, needles)) + len(recall) + sum(map(len, answers))
    n_hay = seq_len - overhead
    if n_hay < n_passkeys:
        raise ValueError(
            f"seq_len={seq_len} is too short for {n_passkeys} passkeys of {passkey_digits} digits "
            f"({overhead} tokens without any haystack)"
        )
    if len(haystack_ids) < n_hay:
        raise ValueError(f"the haystack text has {len(haystack_ids)} tokens, {n_hay} are needed")
    start = rng.randrange(0, len(haystack_ids) - n_hay + 1)
    hay = haystack_ids[start : start + n_hay]
    depths = sorted(rng.sample(range(n_hay + 1), n_passkeys))
    ids = list(prefix)
    last = 0
    for depth, needle in zip(depths, needles):
        ids += hay[last:depth] + needle
        last = depth
    ids += hay[last:] + recall
    positions = []
    for answer in answers:
        positions += range(len(ids), len(ids) + len(answer))
        ids += answer
    return PasskeySample(torch.tensor([ids], dtype=torch.long), torch.tensor(positions, dtype=torch.long))


def given_sequence_sample(ids: torch.Tensor) -> PasskeySample:
    """A sample from pre-tokenized ids (tests, custom data): the answer positions are the last quarter of the
    sequence, at most 32 tokens, at least one."""
    n = ids.shape[1]
    n_answer = max(1, min(32, n // 4))
    return PasskeySample(ids, torch.arange(n - n_answer, n))


def _final_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1]  # after the final norm: what the LM head reads


def duo_loss(
    model: nn.Module,
    sample: PasskeySample,
    gates: torch.Tensor,
    n_sink: int,
    n_recent: int,
    l1_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(total loss, distillation loss)`` of one sample (see the module docstring); the reference is the full
    model's final hidden states at the answer positions."""
    device = gates.device
    ids = sample.input_ids.to(device)
    pos = sample.answer_positions.to(device)
    with torch.no_grad():
        reference = _final_hidden(model, ids)[:, pos]
    with A.gated_attention(model, gates, n_sink, n_recent):
        mixed = _final_hidden(model, ids)[:, pos]
    distill = (mixed.float() - reference.float()).pow(2).mean()  # over answer positions and hidden dimension
    return distill + l1_weight * gates.abs().sum(), distill


def calibrate_duo_attention(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str] | None = None,
    input_ids_batches: list[torch.Tensor] | None = None,
    seq_len: int = 1024,
    steps: int = 50,
    lr: float = 0.02,
    l1_weight: float = 0.05,
    n_sink: int = 16,
    n_recent: int = 64,
    n_passkeys: int = 5,
    passkey_digits: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Train DuoAttention's gates; returns ``({"gates": (num_layers, num_kv_heads)}, settings)``.

    Parameters
    ----------
    model, tokenizer
        The causal LM (weights left untouched) and its tokenizer (None with ``input_ids_batches``).
    texts : list of str or None
        Haystack text (default: the shipped essays).
    input_ids_batches : list of LongTensor or None
        Pre-tokenized ``(bsz, n)`` batches whose rows are used instead of passkey samples, one per step, cycled;
        the answer positions are their last tokens (:func:`given_sequence_sample`). Every row must be longer than
        ``n_sink + n_recent``. ``seq_len``, ``n_passkeys`` and ``passkey_digits`` do not apply; the settings record
        the rows' lengths (``seq_len`` the longest, ``min_seq_len`` the shortest) and their number.
    seq_len : int, default 1024
        Tokens per passkey sample (paper: 1K–32K); must exceed ``n_sink + n_recent``.
    steps : int, default 50
        Adam steps, one fresh sample each (paper: 2,000).
    lr : float, default 0.02
        Adam learning rate (paper: 0.02).
    l1_weight : float, default 0.05
        λ of the L1 penalty on the gates (paper: 0.05).
    n_sink, n_recent : int, default 16, 64
        The streaming branch's window during training (paper: 128 and 256).
    n_passkeys, passkey_digits : int, default 5, 16
        Passkeys per sample and digits per passkey (paper: 10 passkeys of 32 tokens).
    seed : int, default 0
        Seed of the samples.
    progress : bool, default True
        tqdm bar over the steps (loss shown).

    Gates of layers that are not full attention (sliding-window layers of hybrid models) are not trained and
    stay 1: presses never compress those layers.
    """
    for value, name, minimum in ((steps, "steps", 1), (seq_len, "seq_len", 2), (n_sink, "n_sink", 0),
                                 (n_recent, "n_recent", 1), (n_passkeys, "n_passkeys", 1),
                                 (passkey_digits, "passkey_digits", 1), (seed, "seed", None)):
        check_int(value, name, minimum)
    check_number(lr, "lr", positive=True)
    check_number(l1_weight, "l1_weight", minimum=0)
    if texts is not None:
        from kvsqueeze.calibration.runner import check_texts

        check_texts(texts)
    adapter = A.ModelAdapter(model)
    if adapter.attention_softcap(adapter.attention_modules[0]) is not None:
        raise A.UnsupportedModelError(
            f"{adapter.model_type} applies attention-logit softcapping, which gated DuoAttention training does not"
        )
    window = n_sink + n_recent
    rng = random.Random(seed)
    if input_ids_batches is None:
        if tokenizer is None:
            raise ValueError("duo_attention calibration from text needs a tokenizer (or pass input_ids_batches)")
        if seq_len <= window:
            raise ValueError(
                f"seq_len={seq_len} must exceed the streaming window n_sink + n_recent = {n_sink} + {n_recent}: a "
                "streaming head then sees the whole sample, the loss is 0 and the gates learn nothing"
            )
        from kvsqueeze.corpus import essays

        haystack = tokenizer("\n\n".join(essays() if texts is None else list(texts)), add_special_tokens=False)
        haystack_ids = haystack.input_ids

        def sample(step: int) -> PasskeySample:
            return passkey_sample(tokenizer, haystack_ids, seq_len, n_passkeys, passkey_digits, rng)

        source = "passkeys in essays" if texts is None else "passkeys in texts"
        used = {"seq_len": seq_len, "n_passkeys": n_passkeys, "passkey_digits": passkey_digits}
    else:
        rows = [row[None] for ids in input_ids_batches for row in ids]
        if not rows:
            raise ValueError("input_ids_batches hold no sequence")
        short = [(i, row.shape[1]) for i, row in enumerate(rows) if row.shape[1] <= window]
        if short:
            listed = ", ".join(f"#{i}: {n} tokens" for i, n in short[:5]) + (", ..." if len(short) > 5 else "")
            raise ValueError(
                f"{len(short)} of the {len(rows)} given sequences are not longer than the streaming window "
                f"n_sink + n_recent = {n_sink} + {n_recent} ({listed}): a streaming head sees all of such a "
                "sequence, so it teaches the gates nothing; give longer sequences or a smaller window"
            )

        def sample(step: int) -> PasskeySample:
            return given_sequence_sample(rows[step % len(rows)])

        source = "input_ids"
        lengths = [row.shape[1] for row in rows]
        used = {"seq_len": max(lengths), "min_seq_len": min(lengths), "n_sequences": len(rows)}

    device = next(model.parameters()).device
    shape = adapter.shape
    gates = torch.ones(shape.num_layers, shape.num_key_value_heads, device=device, dtype=torch.float32)
    trained = torch.zeros(shape.num_layers, dtype=torch.bool)
    trained[adapter.compressible_layers] = True
    gates = nn.Parameter(gates)
    optimizer = torch.optim.Adam([gates], lr=lr)
    frozen = {name: p.requires_grad for name, p in model.named_parameters()}
    training = model.training
    history: list[float] = []
    from tqdm.auto import tqdm

    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        untrained = (~trained).to(device)  # sliding-window layers: gates stay 1
        with torch.inference_mode(False), torch.enable_grad():
            bar = tqdm(range(steps), desc="calibrating duo_attention", unit="step", disable=not progress)
            for step in bar:
                optimizer.zero_grad(set_to_none=True)
                loss, distill = duo_loss(model, sample(step), gates, n_sink, n_recent, l1_weight)
                loss.backward()
                gates.grad[untrained] = 0.0
                optimizer.step()
                with torch.no_grad():
                    gates.clamp_(0.0, 1.0)
                    gates[untrained] = 1.0
                history.append(float(distill.detach()))
                bar.set_postfix(distill=f"{history[-1]:.3g}", retrieval=int((gates[trained] > 0.5).sum()))
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(frozen[name])
        model.train(training)
    settings = {
        "source": source,
        **used,
        "steps": steps,
        "lr": lr,
        "l1_weight": l1_weight,
        "n_sink": n_sink,
        "n_recent": n_recent,
        "seed": seed,
        "final_distill_loss": history[-1],
        "gated_layers": adapter.compressible_layers,
    }
    return {"gates": gates.detach().float().cpu()}, settings
