"""Evaluation: benchmarks (RULER, needle-in-a-haystack, hub loaders), shared-prefill sweeps and reports.

Every benchmark follows one contract (:mod:`kvsqueeze.evaluation.base`): it yields :class:`Sample` rows and
scores :class:`Prediction` rows into named metrics. Benchmarks register themselves by name. :func:`run_sweep`
evaluates every press × ratio from one prefill per sample into a results directory; :func:`write_report` turns
results directories into a leaderboard and plots.
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
from kvsqueeze.evaluation.report import write_report
from kvsqueeze.evaluation.sweep import SweepResult, run_sweep

__all__ = [
    "Benchmark",
    "Prediction",
    "Sample",
    "benchmark_class",
    "list_benchmarks",
    "make_benchmark",
    "register_benchmark",
    "run_sweep",
    "SweepResult",
    "write_report",
]
