"""Calibration artifacts on disk: which model they belong to, where they live, how they are saved and checked.

An artifact is one safetensors file of float32 tensors whose metadata holds the identity of the model it was
computed on, the method, the settings, a sha256 checksum of the tensor bytes and one of the metadata itself.
Loading verifies them, so the filters of one model are never applied to another, and a truncated or edited file
is refused.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shlex
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvsqueeze.adapter import ModelAdapter
from kvsqueeze.models import cache_root, config_overrides

#: Calibration methods and the artifact each one writes.
METHODS: tuple[str, ...] = ("qfilters", "expected_attention_stats", "duo_attention")

# "2": the model fingerprint samples every parameter tensor (format 1 read sign bits of a few); a format-1 file is
# refused with "recalibrate" rather than as another model's.
FORMAT_VERSION = "2"

# Config fields that define the function the model computes (shapes, activation, norms, positions, attention
# pattern, softcapping). Run-time settings (dtype, attention implementation, the path it was loaded from) are left
# out, so a model calibrated in float32 matches itself loaded in bfloat16 with sdpa.
_ARCH_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "hidden_act",
    "hidden_activation",
    "rms_norm_eps",
    "layer_norm_eps",
    "attention_bias",
    "mlp_bias",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "rope_local_base_freq",
    "partial_rotary_factor",
    "original_max_position_embeddings",
    "layer_types",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "use_bidirectional_attention",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "max_position_embeddings",
    "tie_word_embeddings",
)
_PROBE_ELEMENTS = 64  # values read from every parameter tensor, evenly strided over its elements

_IDENTITY_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()
_LOADED: dict[tuple[str, int, int, int], Artifact] = {}


def _check_method(method: Any) -> str:
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, one of {', '.join(METHODS)}; got {method!r}")
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; known methods: {', '.join(METHODS)}")
    return method


# ----------------------------------------------------------------------------------------------------------------
# Model identity
# ----------------------------------------------------------------------------------------------------------------


def model_name(model: nn.Module) -> str:
    """The name a user loads ``model`` by: the kvsqueeze short name, hub id or path (``""`` when unknown)."""
    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None) or ""
    return str(name)


def _weight_probe(model: nn.Module) -> bytes:
    """Shape and 64 evenly strided values (all of them when fewer) of every parameter tensor, rounded to bfloat16.

    float32 → bfloat16 rounds to nearest even and a bfloat16 value is its own rounding, so the same weights held in
    float32 or bfloat16 give the same bytes. Replacing or rescaling any tensor changes them (an edit confined to
    elements outside the sample is not seen). float16 rounds differently: a float16 copy does not match its
    float32 original. Cost: one small gather per tensor, a few milliseconds on the default model.

    Raises
    ------
    ValueError
        A parameter is on the meta device (offloaded or never loaded): its values cannot be read, and a probe of
        shapes alone would match any model of the same architecture.
    """
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            raise ValueError(
                f"cannot identify the model: parameter {name!r} is on the meta device (offloaded with a device_map "
                "or never loaded), so its weights cannot be read; load every weight onto a real device (CPU or GPU)"
            )
        digest.update(repr(tuple(p.shape)).encode())
        n = p.numel()
        if not n:
            continue
        flat = p.detach().reshape(-1)
        k = min(n, _PROBE_ELEMENTS)
        index = torch.arange(k, dtype=torch.long) * n // k  # strided over the whole tensor, first element included
        sample = flat[index.to(flat.device)].to(torch.bfloat16).cpu()
        digest.update(sample.view(torch.int16).numpy().tobytes())
    return digest.digest()


def model_identity(model: nn.Module) -> dict[str, Any]:
    """What an artifact records about the model it was computed on.

    Returns
    -------
    dict
        ``name_or_path``, ``model_type``, ``num_layers``, ``num_attention_heads``, ``num_key_value_heads``,
        ``head_dim`` and ``fingerprint``: 16 hex digits of a sha256 over the architecture fields of the config
        (:data:`_ARCH_KEYS`) and a weight probe (the shape and 64 strided values, rounded to bfloat16, of every
        parameter tensor). The same weights give the same fingerprint in float32 and bfloat16 and with any attention
        implementation (not in float16, whose rounding differs). Computed once per model object (weights edited in
        place afterwards are not noticed).

    Raises
    ------
    ValueError
        A parameter is on the meta device (see :func:`_weight_probe`).
    """
    cached = _IDENTITY_CACHE.get(model)
    if cached is not None:
        return dict(cached)
    adapter = ModelAdapter(model)
    config = adapter.config.to_dict()
    arch = {key: config[key] for key in _ARCH_KEYS if key in config}
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode())
    digest.update(_weight_probe(model))
    identity = {
        "name_or_path": model_name(model),
        "model_type": adapter.model_type,
        "num_layers": adapter.shape.num_layers,
        "num_attention_heads": adapter.shape.num_attention_heads,
        "num_key_value_heads": adapter.shape.num_key_value_heads,
        "head_dim": adapter.shape.head_dim,
        "fingerprint": digest.hexdigest()[:16],
    }
    _IDENTITY_CACHE[model] = identity
    return dict(identity)


def _safe_name(name: str, fallback: str) -> str:
    if name and (os.path.isabs(name) or os.path.isdir(name)):
        # A local directory: its last component, however the path is spelled (relative, "./", absolute), so one
        # model finds one folder.
        name = Path(name).resolve().name
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")
    return (safe or fallback)[:64]


def default_artifact_path(model: nn.Module, method: str) -> Path:
    """``cache_root()/calibration/<model name>-<fingerprint>/<method>.safetensors``."""
    _check_method(method)
    identity = model_identity(model)
    folder = f"{_safe_name(identity['name_or_path'], identity['model_type'])}-{identity['fingerprint']}"
    return cache_root() / "calibration" / folder / f"{method}.safetensors"


def _model_option(key: str, value: Any) -> str:
    """``--model-option KEY=VALUE`` that the CLI parses back to ``value`` (a Python literal, or a bare string that
    does not read as one), shell-quoted."""
    text = repr(value)
    if isinstance(value, str) and value == value.strip():
        try:
            ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            text = value  # read back as the plain string
    return f"--model-option {shlex.quote(f'{key}={text}')}"


def calibrate_command(model: nn.Module, method: str, path: Path | None = None) -> str:
    """The CLI command that writes the artifact ``load_artifact`` looks for.

    Config attributes :func:`kvsqueeze.models.load_model` replaced on ``model`` are part of its identity, so they
    are passed again (``--model-option KEY=VALUE``); without them the command would calibrate another model.
    """
    first = next(model.parameters(), None)
    if first is not None and first.dtype == torch.float16:  # the CLI loads float32/bfloat16, another fingerprint
        where = "" if path is None else f", output={str(path)!r}"
        return (f"kvsqueeze.calibration.calibrate(model, tokenizer, {method!r}{where}) in Python, with this float16 "
                "model (the CLI loads the model in float32, whose artifact a float16 model does not match)")
    name = model_name(model)
    command = f"kvsqueeze calibrate --model {shlex.quote(name) if name else '<model name or path>'} --method {method}"
    for key, value in config_overrides(model).items():
        command += " " + _model_option(key, value)
    if path is not None and Path(path) != default_artifact_path(model, method):
        command += f" --output {shlex.quote(str(path))}"
    return command


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------------------------


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``tensors``, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def metadata_checksum(metadata: dict[str, str]) -> str:
    """sha256 over every metadata entry but itself (format, method, identity, settings and the tensors' checksum),
    so an edited setting or a damaged identity is refused like damaged tensors."""
    digest = hashlib.sha256()
    for key in sorted(k for k in metadata if k != "metadata_checksum"):
        digest.update(f"{key}={metadata[key]}\n".encode())
    return digest.hexdigest()


@dataclass
class Artifact:
    """A verified calibration artifact.

    Attributes
    ----------
    path : Path
    method : str
    identity : dict
        :func:`model_identity` of the model it was computed on.
    settings : dict
        The calibration settings (sequences, tokens, samples, ...).
    tensors : dict of str to Tensor
        float32 tensors on the CPU.
    """

    path: Path
    method: str
    identity: dict[str, Any]
    settings: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    _on_device: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict, repr=False)

    def get(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """Tensor ``name`` on ``device`` (copied there once, then reused)."""
        key = (name, str(torch.device(device)))
        if key not in self._on_device:
            self._on_device[key] = self.tensors[name].to(device)
        return self._on_device[key]


def save_artifact(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    model: nn.Module,
    method: str,
    settings: dict[str, Any],
) -> Path:
    """Write ``tensors`` (as float32) with identity, method, settings and checksum metadata; atomic replace."""
    from safetensors.torch import save_file

    _check_method(method)
    path = Path(path)
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in tensors.items()}
    metadata = {
        "format": "kvsqueeze-calibration",
        "format_version": FORMAT_VERSION,
        "method": method,
        "identity": json.dumps(model_identity(model), sort_keys=True),
        "settings": json.dumps(settings, sort_keys=True, default=str),
        "checksum": tensor_checksum(tensors),
    }
    metadata["metadata_checksum"] = metadata_checksum(metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache may be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _LOADED.clear()  # a rewritten file must be read again
    return path


def _read(path: Path) -> Artifact:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors calibration artifact: {exc}") from exc
    if metadata.get("format") != "kvsqueeze-calibration":
        raise ValueError(f"{path} is not a kvsqueeze calibration artifact (metadata format={metadata.get('format')!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has artifact format version {metadata.get('format_version')!r}, this kvsqueeze reads "
            f"{FORMAT_VERSION!r}; recalibrate"
        )
    checksum = tensor_checksum(tensors)
    if checksum != metadata.get("checksum"):
        raise ValueError(
            f"{path} is corrupted: checksum of its tensors is {checksum[:12]}…, the file records "
            f"{str(metadata.get('checksum'))[:12]}…; delete it and recalibrate"
        )
    # Files written before the metadata had its own checksum have none: their tensors are still checked above.
    recorded = metadata.get("metadata_checksum")
    if recorded is not None and recorded != metadata_checksum(metadata):
        raise ValueError(f"{path} is corrupted: its metadata (method, model identity, settings) was changed or "
                         "damaged; delete it and recalibrate")
    try:
        return Artifact(
            path=path,
            method=metadata["method"],
            identity=json.loads(metadata["identity"]),
            settings=json.loads(metadata["settings"]),
            tensors=tensors,
        )
    except (KeyError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"{path} is corrupted: its metadata has no readable {exc if isinstance(exc, KeyError) else 'JSON'} "
            f"({type(exc).__name__}: {exc}); delete it and recalibrate"
        ) from None


def load_artifact(path: str | os.PathLike | None, model: nn.Module, method: str) -> Artifact:
    """Load and verify the ``method`` artifact for ``model`` (``path=None``: :func:`default_artifact_path`).

    Files are read and checksummed once per (path, size, modification time) and kept in a module-level cache;
    the method and model identity are checked on every call.

    Raises
    ------
    FileNotFoundError
        The file does not exist; the message gives the ``kvsqueeze calibrate`` command that creates it.
    ValueError
        The file is not an artifact, is corrupted, holds another method, or was computed on another model.
    """
    _check_method(method)
    path = default_artifact_path(model, method) if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no {method} calibration artifact at {path}; create it with: {calibrate_command(model, method, path)}"
        )
    stat = path.stat()
    # ctime too: a copy that keeps size and mtime (cp -p) over the file still changes it
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    artifact = _LOADED.get(key)
    if artifact is None:
        artifact = _read(path)
        _LOADED[key] = artifact
    if artifact.method != method:
        raise ValueError(f"{path} holds a {artifact.method!r} artifact, not {method!r}")
    identity = model_identity(model)
    theirs = artifact.identity
    mismatched = [k for k in identity if k != "name_or_path" and theirs.get(k) != identity[k]]
    if mismatched:
        details = ", ".join(f"{k}: artifact {theirs.get(k)!r} vs model {identity[k]!r}" for k in mismatched)
        dtype = next(model.parameters()).dtype
        if mismatched == ["fingerprint"] and dtype == torch.float16 and artifact.settings.get("dtype") != str(dtype):
            details += (f"; the artifact was computed in {artifact.settings.get('dtype')}: float16 weights do not "
                        "match their float32/bfloat16 originals, load the model in one of those or calibrate it in "
                        "float16")
        raise ValueError(
            f"{path} was calibrated on another model ({theirs.get('name_or_path') or 'unnamed'}; {details}); "
            f"calibrate this one with: {calibrate_command(model, method, path)}"
        )
    _check_tensors(artifact, model, method)
    return artifact


def load_artifact_once(adapter: ModelAdapter, path: str | os.PathLike | None, method: str) -> Artifact:
    """:func:`load_artifact` through ``adapter.memoized``: loaded and checked once per state of the file (path,
    size, modification and status-change times) for as long as the adapter lives (a press block, a recording),
    instead of on every layer (a full check costs about a millisecond). A file rewritten since (recalibrated) is
    loaded again."""
    resolved = default_artifact_path(adapter.model, method) if path is None else Path(path)
    try:
        st = resolved.stat()
    except OSError:
        return load_artifact(path, adapter.model, method)  # missing: the error that names the calibrate command
    key = ("artifact", method, str(resolved), st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return adapter.memoized(key, lambda: load_artifact(path, adapter.model, method))


def expected_tensors(model: nn.Module, method: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors a ``method`` artifact holds for ``model``."""
    shape = ModelAdapter(model).shape
    layers, heads, kv_heads, head_dim = (
        shape.num_layers, shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim
    )
    return {
        "qfilters": {"filters": (layers, kv_heads, head_dim)},
        "expected_attention_stats": {"mean": (layers, heads, head_dim), "covariance": (layers, heads, head_dim, head_dim)},
        "duo_attention": {"gates": (layers, kv_heads)},
    }[_check_method(method)]


def _check_tensors(artifact: Artifact, model: nn.Module, method: str) -> None:
    """Refuse an artifact whose tensors are missing or shaped for another model, before any prefill uses them."""
    for name, want in expected_tensors(model, method).items():
        tensor = artifact.tensors.get(name)
        got = None if tensor is None else tuple(tensor.shape)
        if got != want:
            what = "has no tensor" if got is None else f"holds a tensor of shape {got} as"
            raise ValueError(
                f"{artifact.path} {what} {name!r}; a {method} artifact for this model needs shape {want}; "
                f"recalibrate with: {calibrate_command(model, method, artifact.path)}"
            )


def check_artifact_field(value: Any) -> None:
    """Validate a press's ``artifact`` field: a path (str or PathLike) or None (the model's default location)."""
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"artifact must be a path (str) or None for the model's default location, got {value!r}")
    if isinstance(value, str) and not value.strip():
        raise ValueError(f"artifact must be a non-empty path or None, got {value!r}")
