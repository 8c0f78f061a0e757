"""Every press, registered by short name on import."""

from kvsqueeze.presses.base import (
    Capabilities,
    CompressionReport,
    KV,
    LayerInputs,
    Press,
    ScorerPress,
    gather_kv,
    keep_top,
)
from kvsqueeze.presses.registry import list_presses, make_press, press_class, register_press

# Importing a press module registers it.
from kvsqueeze.presses import knorm, random, streaming_llm  # noqa: F401  isort: skip

__all__ = [
    "Capabilities",
    "CompressionReport",
    "KV",
    "LayerInputs",
    "Press",
    "ScorerPress",
    "gather_kv",
    "keep_top",
    "list_presses",
    "make_press",
    "press_class",
    "register_press",
]
