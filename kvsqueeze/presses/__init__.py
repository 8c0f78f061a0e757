"""Every press, registered by short name on import."""

from kvsqueeze.presses.base import (
    Capabilities,
    CompressionReport,
    KV,
    RaggedKV,
    LayerInputs,
    Press,
    ScorerPress,
    derived_capabilities,
    gather_kv,
    keep_top,
)
from kvsqueeze.presses.registry import list_presses, make_press, press_class, register_press

# Importing a press module registers it.
from kvsqueeze.presses import composed, key_rerotation  # noqa: F401  isort: skip
from kvsqueeze.presses import adakv, criticalkv, decoding, duo_attention, kvzip, per_layer, simlayerkv  # noqa: F401  isort: skip
from kvsqueeze.presses import expected_attention, expected_attention_stats, qfilters  # noqa: F401  isort: skip
from kvsqueeze.presses import keydiff, knorm, lagkv, observed_attention, pyramidkv, random, snapkv, streaming_llm, tova  # noqa: F401  isort: skip

__all__ = [
    "Capabilities",
    "CompressionReport",
    "KV",
    "RaggedKV",
    "LayerInputs",
    "Press",
    "ScorerPress",
    "derived_capabilities",
    "gather_kv",
    "keep_top",
    "list_presses",
    "make_press",
    "press_class",
    "register_press",
]
