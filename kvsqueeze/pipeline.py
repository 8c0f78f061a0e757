"""Compress once, ask many: :class:`Pipeline` prefills and compresses a context, :class:`CompressedContext` answers.

The context is prefilled once (logits for its last position only) with the press's hooks active, so each
full-attention layer is compressed as soon as its keys and values exist. Every question is then appended to a
fork of the compressed cache — never modifying the context — and decoded greedily (or sampled on request) until
EOS or ``max_new_tokens``. The question is not compressed, except by a press that compresses during decoding
(``decoding``), which compresses the fork again every ``compression_interval`` tokens, question included.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from kvsqueeze import adapter as A
from kvsqueeze.presses.base import CompressionReport, Press, check_int, check_no_active_press, check_seed
from kvsqueeze.record import RecordedPrefill, record_prefill

_SLOT = "\u2063KVSQUEEZE_QUESTION\u2063"
#: Answer length when ``max_new_tokens`` is not given.
DEFAULT_MAX_NEW_TOKENS = 32
#: The options of :meth:`CompressedContext.answer` besides the question.
ANSWER_OPTIONS = ("max_new_tokens", "answer_prefix", "do_sample", "temperature", "top_p", "seed")


@dataclass(frozen=True)
class PromptTemplate:
    """How a context and a question become tokens: ``prefix + context`` is compressed, ``sep + question + suffix``
    is appended after it."""

    prefix: str = ""
    sep: str = "\n\n"
    suffix: str = "\n"
    add_special_tokens: bool = True

    @classmethod
    def for_tokenizer(cls, tokenizer, use_chat_template: bool | None = None) -> PromptTemplate:
        """The chat template's user turn when the tokenizer has one (and ``use_chat_template`` is not False)."""
        has_template = bool(getattr(tokenizer, "chat_template", None))  # None or "" means none
        if use_chat_template and not has_template:
            raise ValueError("use_chat_template=True, but the tokenizer has no chat template")
        if use_chat_template is False or not has_template:
            return cls()
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": _SLOT}], tokenize=False, add_generation_prompt=True
        )
        if rendered.count(_SLOT) != 1:
            raise ValueError("could not locate the user message in the tokenizer's chat template")
        prefix, suffix = rendered.split(_SLOT)
        # The rendered template already holds the special tokens (BOS) it needs.
        return cls(prefix=prefix, sep="\n\n", suffix=suffix, add_special_tokens=False)


class Pipeline:
    """Compress a context once and answer questions from the compressed cache.

    Parameters
    ----------
    model : PreTrainedModel
        A causal LM of a supported architecture.
    tokenizer : PreTrainedTokenizer
        Its tokenizer.
    use_chat_template : bool or None, default None
        Wrap context and question in the tokenizer's chat template (None: when it has one).

    Examples
    --------
    >>> pipe = Pipeline(model, tokenizer)
    >>> ctx = pipe.compress(text, press=make_press("knorm", compression_ratio=0.5))
    >>> ctx.answer("What is the magic number?", max_new_tokens=16)
    """

    def __init__(self, model: nn.Module, tokenizer, use_chat_template: bool | None = None):
        if not callable(tokenizer) or not hasattr(tokenizer, "decode"):
            raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
        if use_chat_template is not None and not isinstance(use_chat_template, bool):
            raise TypeError(f"use_chat_template must be True, False or None, got {use_chat_template!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.adapter = A.ModelAdapter(model)
        head = getattr(model, "get_output_embeddings", None)
        if head is None or head() is None:  # e.g. AutoModel's bare decoder: no logits to answer with
            raise TypeError(
                f"model must be a causal LM with a language-model head (AutoModelForCausalLM), got "
                f"{type(model).__name__}"
            )
        self.template = PromptTemplate.for_tokenizer(tokenizer, use_chat_template)

    # -- tokens ---------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_length(self) -> int | None:
        return self.adapter.shape.max_position_embeddings

    def context_ids(self, context: str) -> torch.Tensor:
        """Token ids ``(1, n)`` of the part that is prefilled and compressed."""
        if not isinstance(context, str):
            raise TypeError(f"context must be a string, got {type(context).__name__}")
        if not context.strip():
            raise ValueError(f"context is empty ({context!r}); there is nothing to compress")
        ids = self.tokenizer(
            self.template.prefix + context, add_special_tokens=self.template.add_special_tokens, return_tensors="pt"
        ).input_ids
        self._check_token_ids(ids)
        if self.max_length is not None:
            # the shortest question there is: the template's separator and suffix around an empty one
            least = self.question_ids("").shape[1] + 1  # and one answer token
            if ids.shape[1] + least > self.max_length:
                template = f" (with the {least - 1} tokens the prompt format puts around it)" if least > 1 else ""
                raise ValueError(
                    f"context has {ids.shape[1]} tokens, which leaves no room for a question{template} and one "
                    f"answer token within the model's maximum of {self.max_length} (config.max_position_embeddings)"
                )
        return ids.to(self.device)

    def question_ids(self, question: str, answer_prefix: str = "") -> torch.Tensor:
        """Token ids ``(1, m)`` appended after the compressed context."""
        if not isinstance(question, str):
            raise TypeError(f"question must be a string, got {type(question).__name__}")
        if not isinstance(answer_prefix, str):
            raise TypeError(f"answer_prefix must be a string, got {answer_prefix!r}")
        text = self.template.sep + question + self.template.suffix + answer_prefix
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        self._check_token_ids(ids)
        return ids.to(self.device)

    def _check_token_ids(self, ids: torch.Tensor) -> None:
        self.adapter.check_token_ids(
            ids, "the tokenized text", f": the tokenizer ({type(self.tokenizer).__name__}) does not belong to this model"
        )

    @property
    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        for value in (
            getattr(self.tokenizer, "eos_token_id", None),
            getattr(getattr(self.model, "generation_config", None), "eos_token_id", None),
        ):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return ids

    # -- compress -------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def compress(
        self, context: str, press: Press | None = None, prefill_chunk_size: int | None = None
    ) -> CompressedContext:
        """Prefill ``context`` once and compress it with ``press`` (None: keep everything).

        ``prefill_chunk_size``: prefill in forward passes of this many tokens instead of one (None), the first
        pass taking the remainder so that the last one ends the context. The activations then scale with the
        chunk, not the context. A press compresses once, at the end of its first forward pass, so a chunked
        prefill needs a press that compresses again as tokens are appended, ``make_press("decoding", ...)``:
        with ``compression_interval`` equal to the chunk size it compresses after every chunk, so no layer ever
        holds more than its budget plus one chunk — the block-wise prefill of the KeyDiff paper
        (arXiv 2504.15364), with each chunk's hidden states computed against the compressed cache. Other presses
        are refused with more than one chunk; without a press the cache equals the one-pass prefill's.
        """
        check_press(press)
        if prefill_chunk_size is not None:
            check_int(prefill_chunk_size, "prefill_chunk_size", minimum=1)
        ids = self.context_ids(context)
        chunks = _chunks(ids, prefill_chunk_size)
        if len(chunks) > 1:
            check_chunkable(press, prefill_chunk_size)
            interval = getattr(press, "compression_interval", None)
            if isinstance(interval, int) and interval > prefill_chunk_size:
                warnings.warn(
                    f"compression_interval={interval} is longer than prefill_chunk_size={prefill_chunk_size}: the "
                    f"cache is compressed every {interval} tokens, not after every chunk, so a layer may hold its "
                    f"budget plus up to {interval} entries during the prefill and after it; set "
                    f"compression_interval={prefill_chunk_size} to compress after every chunk",
                    stacklevel=3,
                )
        cache = self.adapter.new_cache()
        report = CompressionReport()
        start = time.perf_counter()
        if press is None:
            check_no_active_press(self.adapter)  # an open press block would compress this "keep everything" prefill
            for chunk in chunks:
                self._prefill(chunk, cache)
        else:
            with press(self.model) as report:
                for chunk in chunks:
                    self._prefill(chunk, cache)
        A.compact_cache(cache)  # sliding-window layers hold views of the whole prefill
        prefill_seconds = time.perf_counter() - start
        return CompressedContext(
            pipeline=self,
            cache=cache,
            n_tokens=ids.shape[1],
            press=press,
            report=report,
            prefill_seconds=prefill_seconds,
            prefill_chunk_size=prefill_chunk_size if len(chunks) > 1 else None,
        )

    def record(self, context: str, keep_attentions: bool = False) -> RecordedPrefill:
        """Prefill ``context`` once, uncompressed, recording every layer's inputs (see :mod:`kvsqueeze.record`)."""
        return record_prefill(self.model, self.context_ids(context), keep_attentions=keep_attentions)

    def from_recorded(self, recorded: RecordedPrefill, press: Press | None = None) -> CompressedContext:
        """Compress a recorded prefill with ``press``; many presses can share one recording."""
        if not isinstance(recorded, RecordedPrefill):
            raise TypeError(f"recorded must be a RecordedPrefill (Pipeline.record), got {type(recorded).__name__}")
        if recorded.adapter.model is not self.model:
            raise ValueError(
                "this recording was made on another model than the pipeline's; answering from it would read "
                "another model's cache: record the context with this pipeline (pipe.record(context))"
            )
        check_press(press)
        start = time.perf_counter()
        cache, report = recorded.compress(press)
        A.compact_cache(cache)  # its sliding-window layers are views of the recording's prefill
        seconds = recorded.prefill_seconds + time.perf_counter() - start
        return CompressedContext(self, cache, recorded.n_tokens, press, report, seconds)

    def check_room(self, n_context: int, n_question: int, max_new_tokens: int) -> None:
        """Raise when a question and its answer would not fit after the context in the model's positions."""
        limit = self.max_length
        if limit is not None and n_context + n_question + max_new_tokens > limit:
            raise ValueError(
                f"context ({n_context}) + question ({n_question}) + max_new_tokens ({max_new_tokens}) tokens "
                f"exceed the model's maximum of {limit}"
            )

    def check_answerable(self, context: str, questions: str | list[str], **answer_kwargs) -> None:
        """Raise, before any prefill, what answering ``questions`` about ``context`` with ``answer_kwargs`` (the
        options of :meth:`CompressedContext.answer`) would raise after it: a bad context, question or option, or a
        question that would not fit after the context. Costs one tokenization of each."""
        for name in answer_kwargs:
            if name not in ANSWER_OPTIONS:
                check_answer_option(name, None)  # names the unknown option, instead of a bare keyword TypeError
        check_answer_options(**answer_kwargs)
        n_context = self.context_ids(context).shape[1]
        prefix = answer_kwargs.get("answer_prefix", "")
        new_tokens = answer_kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        for question in [questions] if isinstance(questions, str) else questions:
            self.check_room(n_context, self.question_ids(question, prefix).shape[1], new_tokens)

    def _prefill(self, ids: torch.Tensor, cache) -> None:
        # Logits for the last position only: with a 262k vocabulary the output layer over every context token
        # would cost more than the transformer itself.
        self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **self.adapter.model_call_kwargs(cache))

    def __call__(
        self, context: str, questions: str | list[str], press: Press | None = None, **answer_kwargs
    ) -> str | list[str]:
        """Compress ``context`` and answer one question (returns a string) or several (returns a list)."""
        unknown = sorted(set(answer_kwargs) - set(ANSWER_OPTIONS))
        if unknown:
            raise TypeError(
                f"unexpected keyword {unknown[0]!r}; a Pipeline call takes context, questions, press and the answer "
                f"options {', '.join(ANSWER_OPTIONS)}"
            )
        questions = check_questions(questions)
        self.check_answerable(context, questions, **answer_kwargs)  # before the prefill, not after it
        ctx = self.compress(context, press=press)
        if isinstance(questions, str):
            return ctx.answer(questions, **answer_kwargs)
        return [ctx.answer(q, **answer_kwargs) for q in questions]


def check_chunkable(press: Press | None, prefill_chunk_size: int) -> None:
    """Refuse a press that would compress only the first chunk of a chunked prefill (one without a decoding
    phase: it compresses once, at the end of its first forward pass)."""
    if press is not None and "decoding" not in press.capabilities.phases:
        raise ValueError(
            f"{type(press).__name__} compresses once, at the end of its first forward pass: with "
            f"prefill_chunk_size={prefill_chunk_size} it would compress the first chunk and keep the rest; wrap "
            f"it, make_press('decoding', press=..., budget=..., compression_interval={prefill_chunk_size}), to "
            "compress after every chunk, or prefill in one pass"
        )


def _chunks(ids: torch.Tensor, size: int | None) -> list[torch.Tensor]:
    """``ids`` ``(1, n)`` in forward passes of ``size`` tokens, the first one holding the remainder (so the last
    pass ends the context); one pass when ``size`` is None."""
    n = ids.shape[1]
    if size is None or size >= n:
        return [ids]
    first = n % size or size
    return [ids[:, :first]] + [ids[:, i : i + size] for i in range(first, n, size)]


def check_press(press: object) -> None:
    """``press`` is a kvsqueeze press or None (keep everything); anything else is a TypeError."""
    if press is not None and not isinstance(press, Press):
        raise TypeError(
            f"press must be a kvsqueeze Press (kvsqueeze.make_press(...)) or None, got {type(press).__name__}"
        )


def check_questions(questions: object, name: str = "questions") -> str | list[str]:
    """One question (a string) or a non-empty list of them (returned as a list); anything else is a TypeError."""
    if isinstance(questions, str):
        return questions
    if isinstance(questions, (list, tuple)) and questions and all(isinstance(q, str) for q in questions):
        return list(questions)
    raise TypeError(f"{name} must be a string or a non-empty list of strings, got {questions!r}")


@dataclass
class CompressedContext:
    """A prefilled, compressed context that answers questions without ever changing.

    Attributes
    ----------
    cache : Cache
        The compressed cache (kept entries only, logical positions preserved).
    n_tokens : int
        Context length in tokens (the logical length of the cache).
    report : CompressionReport
        Per-layer kept/seen counts, compression seconds and bytes before compression.
    prefill_seconds : float
        Wall time of the prefill, compression included.
    prefill_chunk_size : int or None
        Tokens per forward pass of a chunked prefill (None: one pass).
    """

    pipeline: Pipeline
    cache: object
    n_tokens: int
    press: Press | None
    report: CompressionReport = field(default_factory=CompressionReport)
    prefill_seconds: float = 0.0
    prefill_chunk_size: int | None = None

    @property
    def cache_bytes(self) -> int:
        """Measured bytes of the compressed cache's key and value tensors."""
        return A.cache_nbytes(self.cache)

    @property
    def full_cache_bytes(self) -> int:
        """Measured bytes the same cache held before compression (per layer, taken just before it was pruned).

        After a chunked prefill no layer ever held the whole context: a compressed layer counts the bytes of its
        stored entries per entry times its logical length, the bytes the one-pass prefill's layer holds."""
        if self.prefill_chunk_size is None:
            return sum(
                self.report.bytes_before.get(i, A.layer_nbytes(self.cache, i)) for i in range(len(self.cache.layers))
            )
        total = 0
        for i in range(len(self.cache.layers)):
            nbytes = A.layer_nbytes(self.cache, i)  # compacted: the bytes of the stored entries only
            if A.is_compressed_layer(self.cache, i):  # dense under decoding-time compression: bytes per entry
                nbytes = nbytes * A.layer_logical_length(self.cache, i) // A.layer_physical_length(self.cache, i)
            total += nbytes
        return total

    @property
    def measured_ratio(self) -> float:
        """Fraction of the entries of the compressed layers that the cache no longer stores: from the compression
        report, or, after a chunked prefill (compressed again after each chunk), from stored against logical
        lengths."""
        if self.prefill_chunk_size is None:
            return self.report.measured_ratio
        layers = [i for i in range(len(self.cache.layers)) if A.is_compressed_layer(self.cache, i)]
        seen = sum(A.layer_logical_length(self.cache, i) for i in layers)
        stored = sum(A.layer_physical_length(self.cache, i) for i in layers)
        return 1.0 - stored / seen if seen else 0.0

    @property
    def compression_seconds(self) -> float:
        return self.report.seconds

    @property
    def layer_lengths(self) -> list[int]:
        return A.layer_lengths(self.cache)

    def fork_cache(self):
        """A cache sharing this context's tensors; appending to it leaves the context untouched."""
        return A.fork_cache(self.cache)

    @torch.inference_mode()
    def answer(
        self,
        question: str,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        answer_prefix: str = "",
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> str:
        """Answer ``question`` from the compressed context; greedy unless ``do_sample``; stops at EOS."""
        tokens = self.generate_ids(question, max_new_tokens, answer_prefix, do_sample, temperature, top_p, seed)
        return self.pipeline.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def generate_ids(
        self,
        question: str,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        answer_prefix: str = "",
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[int]:
        """The generated token ids (EOS excluded) for ``question``.

        Greedy unless ``do_sample``; ``temperature``, ``top_p`` and ``seed`` only apply when sampling, and giving
        them without ``do_sample=True`` is an error rather than silently ignored.
        """
        check_answer_options(max_new_tokens, answer_prefix, do_sample, temperature, top_p, seed)
        pipe = self.pipeline
        ids = pipe.question_ids(question, answer_prefix)
        pipe.check_room(self.n_tokens, ids.shape[1], max_new_tokens)
        generator = torch.Generator(device=ids.device).manual_seed(seed) if seed is not None else None
        cache = self.fork_cache()
        A.mark_answer_cache(cache)  # another thread's press block leaves it alone
        eos = pipe.eos_token_ids
        kwargs = pipe.adapter.model_call_kwargs(cache)
        out: list[int] = []
        # A press that compresses during decoding (phases) keeps compressing the fork, and only the fork: no press
        # block is opened on the model, so other callers (threads) are left alone.
        recompress = self.press is not None and "decoding" in self.press.capabilities.phases
        with pipe.adapter.attention_for_cache(cache), (
            self.press.continuing(pipe.model, cache) if recompress else contextlib.nullcontext()
        ):
            logits = pipe.model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs).logits[:, -1]
            for _ in range(max_new_tokens):
                token = _next_token(logits, do_sample, temperature, top_p, generator)
                if token in eos:
                    break
                out.append(token)
                if len(out) == max_new_tokens:
                    break
                step = torch.tensor([[token]], device=ids.device)
                logits = pipe.model(input_ids=step, use_cache=True, logits_to_keep=1, **kwargs).logits[:, -1]
        return out


def check_answer_options(
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    answer_prefix: str = "",
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> None:
    """Validate the options of :meth:`CompressedContext.answer`; each error names the option and its value.

    ``temperature``, ``top_p`` and ``seed`` only apply when sampling: giving them with greedy decoding is an error
    rather than silently ignored."""
    for name, value in (("max_new_tokens", max_new_tokens), ("answer_prefix", answer_prefix),
                        ("do_sample", do_sample), ("temperature", temperature), ("top_p", top_p), ("seed", seed)):
        check_answer_option(name, value)
    if not do_sample:
        ignored = [f"{name}={value!r}" for name, value, default in
                   (("temperature", temperature, 1.0), ("top_p", top_p, 1.0), ("seed", seed, None)) if value != default]
        if ignored:  # greedy decoding would silently ignore them
            raise ValueError(f"{', '.join(ignored)} only apply when sampling; pass do_sample=True (greedy by default)")


def check_answer_option(name: str, value: object) -> None:
    """Validate one option of :meth:`CompressedContext.answer` on its own (an unknown name is a TypeError)."""
    if name == "max_new_tokens":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {value!r}")
    elif name == "answer_prefix":
        if not isinstance(value, str):
            raise TypeError(f"answer_prefix must be a string, got {value!r}")
    elif name == "do_sample":
        if not isinstance(value, bool):
            raise TypeError(f"do_sample must be a bool, got {value!r}")
    elif name in ("temperature", "top_p"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {value!r}")
        if name == "temperature" and not (math.isfinite(value) and value > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {value!r}")
        if name == "top_p" and not 0 < value <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {value!r}")
    elif name == "seed":
        if value is not None:
            check_seed(value)
    else:
        raise TypeError(f"unexpected answer option {name!r}; answer() takes {', '.join(ANSWER_OPTIONS)}")


def _next_token(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """Greedy argmax, or nucleus sampling at ``temperature`` (one sequence; one host sync per step)."""
    logits = logits[0].float()
    if not do_sample:
        return int(logits.argmax())
    # Shifted first, so a tiny temperature gives the argmax instead of inf - inf = NaN; the scale is capped at
    # float32's largest value, or 0 · (1 / 1e-300 → inf) would make the top logit NaN.
    scale = min(1.0 / temperature, torch.finfo(logits.dtype).max)
    probs = torch.softmax((logits - logits.max()) * scale, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
