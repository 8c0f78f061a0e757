"""kvsqueeze: compress the KV cache of Hugging Face causal LMs, and measure what it costs and saves.

Public API::

    from kvsqueeze import load_model, make_press, list_presses, Pipeline
"""

from kvsqueeze.adapter import ModelAdapter, UnsupportedModelError
from kvsqueeze.presses import Capabilities, LayerInputs, Press, ScorerPress, list_presses, make_press, register_press
from kvsqueeze.presses.registry import UnknownNameError
from kvsqueeze.pipeline import CompressedContext, Pipeline
from kvsqueeze.models import load_model
from kvsqueeze import hf_pipeline as _hf_pipeline  # noqa: F401  registers the "kv-compression" pipeline task

__version__ = "0.1.0"

__all__ = [
    "Capabilities",
    "CompressedContext",
    "LayerInputs",
    "ModelAdapter",
    "Pipeline",
    "Press",
    "ScorerPress",
    "UnknownNameError",
    "UnsupportedModelError",
    "list_presses",
    "load_model",
    "make_press",
    "register_press",
]
