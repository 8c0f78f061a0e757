"""Evaluation: benchmarks (RULER, needle-in-a-haystack, hub loaders), shared-prefill sweeps and reports.

Every benchmark follows one contract (:mod:`kvsqueeze.evaluation.base`): it yields :class:`Sample` rows and
scores :class:`Prediction` rows into named metrics. Benchmarks register themselves by name.
"""

from kvsqueeze.evaluation.base import (
    Benchmark,
    Prediction,
    Sample,
    benchmark_class,
    list_benchmarks,
    make_benchmark,
    register_benchmark,
)

__all__ = [
    "Benchmark",
    "Prediction",
    "Sample",
    "benchmark_class",
    "list_benchmarks",
    "make_benchmark",
    "register_benchmark",
]
