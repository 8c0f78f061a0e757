"""Calibration artifacts computed locally, once per model: Q-filters, query statistics for Expected Attention and
DuoAttention's retrieval/streaming head gates.

Typical use (what ``kvsqueeze calibrate --model NAME --method METHOD`` does)::

    from kvsqueeze import load_model
    from kvsqueeze.calibration import calibrate
    model, tok = load_model()
    path = calibrate(model, tok, "qfilters")   # written to default_artifact_path(model, "qfilters")

The presses ``qfilters``, ``expected_attention_stats`` and ``duo_attention`` then find the artifact at that default path.
"""

from kvsqueeze.calibration.artifacts import (
    METHODS,
    Artifact,
    calibrate_command,
    check_artifact_field,
    default_artifact_path,
    load_artifact,
    model_identity,
    save_artifact,
)
from kvsqueeze.calibration.qfilters import group_filters, qfilter_directions
from kvsqueeze.calibration.runner import calibrate, check_output_path, default_texts, essays_dir, text_sequences

__all__ = [
    "METHODS",
    "Artifact",
    "calibrate",
    "calibrate_command",
    "check_artifact_field",
    "check_output_path",
    "default_artifact_path",
    "default_texts",
    "essays_dir",
    "group_filters",
    "load_artifact",
    "model_identity",
    "qfilter_directions",
    "save_artifact",
    "text_sequences",
]
