"""The ``"kv-compression"`` task for ``transformers.pipeline``, delegating to :class:`kvsqueeze.Pipeline`.

Importing this module registers the task in transformers' ``PIPELINE_REGISTRY`` (an added registry entry; no
transformers function is patched)::

    import kvsqueeze  # registers "kv-compression"
    from transformers import pipeline

    pipe = pipeline("kv-compression", model=model, tokenizer=tokenizer)
    pipe(context, question="What is the code?", press=make_press("knorm", compression_ratio=0.5))
    # {"answer": "..."}; several questions (question=[...]) give [{"answer": ...}, ...]

The context is prefilled and compressed once per call, then every question is answered from that one compressed
cache (see :class:`kvsqueeze.pipeline.CompressedContext`).
"""

from __future__ import annotations

from typing import Any

from transformers import AutoModelForCausalLM
from transformers import Pipeline as _HFPipeline
from transformers.pipelines import PIPELINE_REGISTRY

from kvsqueeze.pipeline import ANSWER_OPTIONS, Pipeline, check_answer_option, check_press, check_questions
from kvsqueeze.presses.base import Press

TASK = "kv-compression"

#: "Not given" (an explicit None means "no press").
_UNSET = object()


class KVCompressionPipeline(_HFPipeline):
    """Answer questions about a context from its compressed KV cache.

    Call it as ``pipe(context, question=..., press=..., max_new_tokens=...)``.

    Parameters (of the call)
    ------------------------
    context : str
        The text that is prefilled and compressed (a list of strings runs each one in turn).
    question : str or list of str
        One question (returns ``{"answer": str}``) or several (returns ``[{"answer": str}, ...]``, all
        answered from the same compressed cache). ``questions=`` is accepted as an alias.
    press : kvsqueeze.Press or None, default None
        The compression method (``kvsqueeze.make_press(...)``); None keeps the whole cache.
    max_new_tokens : int, default 32
    answer_prefix : str, default ""
        Text the answer starts with (not part of the returned answer).
    do_sample, temperature, top_p, seed
        Sampling settings of :meth:`kvsqueeze.pipeline.CompressedContext.answer` (greedy by default).
    use_chat_template : bool or None, default None
        Given when building the pipeline: wrap context and question in the tokenizer's chat template (None: when
        the tokenizer has one).

    Notes
    -----
    Batching (``batch_size > 1``) is not supported: each context is compressed on its own. A press that needs
    attention weights requires a model loaded with ``attn_implementation="eager"``; the press says so when it
    is not.
    """

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False
    _pipeline_calls_generate = False

    def __init__(self, *args: Any, use_chat_template: bool | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.tokenizer is None:
            raise ValueError(f"the {TASK!r} pipeline needs a tokenizer; pass tokenizer=... to transformers.pipeline")
        self.kv_pipeline = Pipeline(self.model, self.tokenizer, use_chat_template=use_chat_template)

    def __call__(self, context: str | list[str], **kwargs: Any) -> dict[str, str] | list:
        """Answer ``question`` about ``context`` (see the class docstring for the parameters)."""
        batch_size = kwargs.get("batch_size", self._batch_size)
        if batch_size not in (None, 1) or isinstance(batch_size, bool):
            raise ValueError(f"the {TASK!r} pipeline compresses one context at a time; got batch_size={batch_size}")
        if isinstance(context, (list, tuple)):  # every context checked before the first one is prefilled
            if not context:
                raise ValueError(f"the {TASK!r} pipeline got an empty list of contexts; give at least one")
            for item in context:
                self.preprocess(item)
        return super().__call__(context, **kwargs)

    def _sanitize_parameters(
        self,
        question: str | list[str] | None = None,
        questions: str | list[str] | None = None,
        press: Press | None | object = _UNSET,
        **answer_kwargs: Any,
    ) -> tuple[dict, dict, dict]:
        # Called with the arguments given when the pipeline is built, then with those of each call; the call's
        # values replace the build's, so an explicit ``press=None`` / ``seed=None`` must be kept, not dropped.
        forward: dict[str, Any] = {}
        if question is not None and questions is not None:
            raise ValueError("give either question= or questions=, not both")
        asked = question if question is not None else questions
        if asked is not None:
            forward["questions"] = check_questions(asked, "question")
        if press is not _UNSET:
            check_press(press)
            forward["press"] = press
        for key, value in answer_kwargs.items():
            if key not in ANSWER_OPTIONS:
                raise TypeError(
                    f"unexpected argument {key!r} for the {TASK!r} pipeline; it takes question, press and "
                    f"{', '.join(ANSWER_OPTIONS)}"
                )
            if value is None:
                if key == "seed":  # unseeded sampling, replacing a seed given at build time
                    forward[key] = value
                continue  # None for the others: not given (the build-time value or the default)
            check_answer_option(key, value)  # type and range: refused when given, not after a prefill
            forward[key] = value  # one forward parameter each, so call-time values override build-time ones
        return {}, forward, {}

    def preprocess(self, context: str) -> dict[str, Any]:
        if not isinstance(context, str):
            raise TypeError(f"context must be a string, got {type(context).__name__}")
        if not context.strip():
            raise ValueError(f"context is empty ({context!r}); there is nothing to compress")
        return {"context": context}

    def _forward(
        self,
        model_inputs: dict[str, Any],
        questions: str | list[str] | None = None,
        press: Press | None = None,
        **answer_kwargs: Any,
    ) -> dict[str, Any]:
        if questions is None:
            raise ValueError(f"the {TASK!r} pipeline needs a question: pipe(context, question='...')")
        # Options that only conflict once the build's and the call's are merged (sampling settings without
        # do_sample) and questions too long for the context: refused before the prefill.
        self.kv_pipeline.check_answerable(model_inputs["context"], questions, **answer_kwargs)
        ctx = self.kv_pipeline.compress(model_inputs["context"], press=press)
        asked = [questions] if isinstance(questions, str) else questions
        answers = [ctx.answer(q, **answer_kwargs) for q in asked]
        return {"answers": answers, "single": isinstance(questions, str)}

    def postprocess(self, model_outputs: dict[str, Any]) -> dict[str, str] | list[dict[str, str]]:
        answers = [{"answer": a} for a in model_outputs["answers"]]
        return answers[0] if model_outputs["single"] else answers


def register() -> None:
    """Register the ``"kv-compression"`` task (idempotent; done when :mod:`kvsqueeze` is imported)."""
    impl = PIPELINE_REGISTRY.supported_tasks.get(TASK)
    if impl is not None and impl.get("impl") is KVCompressionPipeline:
        return
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=KVCompressionPipeline, pt_model=AutoModelForCausalLM, type="text"
    )


register()
