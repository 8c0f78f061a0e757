"""The text kvsqueeze ships: Paul Graham's essays (the standard needle-in-a-haystack corpus), as package data.

Used for haystacks (:mod:`kvsqueeze.needles`), calibration text and benchmarks, so nothing is downloaded.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def essays_dir() -> Path:
    """Directory of the essays shipped as package data."""
    return Path(str(resources.files("kvsqueeze") / "data" / "essays"))


def essays() -> list[str]:
    """The shipped essays, sorted by file name."""
    paths = sorted(essays_dir().glob("*.txt"))
    if not paths:
        raise FileNotFoundError(f"no essays in {essays_dir()}: the package data is missing; reinstall kvsqueeze")
    return [p.read_text(encoding="utf-8") for p in paths]
