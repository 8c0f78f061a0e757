"""Run calibration text through a model, capture its queries with forward hooks, and save the artifact.

``calibrate`` is what ``kvsqueeze calibrate`` calls. The text defaults to the Paul Graham essays shipped with the
package; pre-tokenized ``input_ids`` can be given instead (tests calibrate tiny random models that way).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvsqueeze.adapter import ModelAdapter
from kvsqueeze.corpus import essays, essays_dir  # noqa: F401  essays_dir is re-exported
from kvsqueeze.calibration.artifacts import _check_method, default_artifact_path, save_artifact
from kvsqueeze.calibration.qfilters import QFilterCollector
from kvsqueeze.models import nearest_existing
from kvsqueeze.calibration.query_stats import QueryMomentCollector
from kvsqueeze.presses.base import check_int, check_seed


def default_texts() -> list[str]:
    """The shipped Paul Graham essays, sorted by file name (the default calibration text)."""
    return essays()


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    check_int(value, name, minimum)
    return value


def check_texts(texts: Any) -> None:
    """Calibration texts must be a list of strings (a bare string would be read character by character)."""
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")


def text_sequences(tokenizer, texts: Sequence[str], n_sequences: int, seq_len: int) -> list[torch.Tensor]:
    """Up to ``n_sequences`` token sequences ``(1, <= seq_len)`` cut from ``texts``.

    Each text is tokenized and cut into consecutive chunks; chunks are taken round-robin (the first chunk of
    every text, then the second, ...) so a few sequences already span many texts. A chunk that does not start its
    text still gets the special prefix tokens (BOS) the tokenizer puts in front of a text.
    """
    check_texts(texts)
    probe = tokenizer("a", add_special_tokens=True).input_ids
    bare = tokenizer("a", add_special_tokens=False).input_ids
    prefix = probe[: len(probe) - len(bare)] if probe[len(probe) - len(bare) :] == bare else []
    body = seq_len - len(prefix)
    if body < 1:
        raise ValueError(f"seq_len={seq_len} leaves no room after the {len(prefix)} special prefix tokens")
    per_text = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        per_text.append([prefix + ids[i : i + body] for i in range(0, len(ids), body)])
    chunks = []
    for round_ in range(max((len(c) for c in per_text), default=0)):
        chunks.extend(c[round_] for c in per_text if round_ < len(c))
    chunks = [c for c in chunks if len(c) > len(prefix)][:n_sequences]
    if not chunks:
        raise ValueError("the calibration texts produced no tokens")
    return [torch.tensor([c], dtype=torch.long) for c in chunks]


def check_output_path(output: Any) -> Path | None:
    """``output`` as a ``Path`` (None stays None: the default location), refused before any calibration work when
    the artifact could not be written there.

    Raises
    ------
    TypeError
        ``output`` is neither a path (``str`` or ``os.PathLike``) nor None.
    ValueError
        ``output`` is empty, an existing directory, or lies in a directory that does not exist and cannot be created
        or that is not writable (checked by creating and removing a temporary file or directory there).
    """
    if output is None:
        return None
    text = os.fspath(output) if isinstance(output, (str, os.PathLike)) else None
    if not isinstance(text, str):
        raise TypeError(f"output must be a file path (str or os.PathLike) or None, got {output!r}")
    if not text.strip():
        raise ValueError(f"output is empty ({text!r}); give the artifact's file path, e.g. 'qfilters.safetensors'")
    path = Path(text)
    if path.is_dir():
        example = str(path / "qfilters.safetensors")
        raise ValueError(f"output={text!r} is a directory; give the artifact's file path, e.g. {example!r}")
    existing = nearest_existing(path.parent)
    if not existing.is_dir():
        raise ValueError(f"output={text!r} cannot be written: {str(existing)!r} is not a directory")
    try:
        if existing == path.parent:  # what save_artifact does: a temporary file next to the artifact
            fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", dir=existing)
            os.close(fd)
            os.unlink(probe)
        else:  # the missing folders must be creatable
            os.rmdir(tempfile.mkdtemp(prefix=f".{path.name}.", dir=existing))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if existing == path.parent:
            problem = f"its directory {str(existing)!r} is not writable ({reason})"
        else:
            problem = f"its directory {str(path.parent)!r} cannot be created in {str(existing)!r} ({reason})"
        raise ValueError(f"output={text!r} cannot be written: {problem}") from None
    return path


def check_calibration_lengths(model: nn.Module, seq_len: int, batches: list[torch.Tensor] | None) -> None:
    """Refuse sequences longer than the model's ``max_position_embeddings`` (``seq_len`` when the sequences are cut
    from text or are passkey samples, otherwise each given batch's length) and token ids outside its vocabulary,
    before any forward pass."""
    adapter = ModelAdapter(model)
    max_positions = adapter.shape.max_position_embeddings
    if batches is None:
        if max_positions is not None and seq_len > max_positions:
            raise ValueError(
                f"seq_len={seq_len} exceeds the model's maximum of {max_positions} positions "
                f"(config.max_position_embeddings); use seq_len <= {max_positions}"
            )
        return
    for i, ids in enumerate(batches):
        if max_positions is not None and ids.shape[1] > max_positions:
            raise ValueError(
                f"input_ids_batches[{i}] has {ids.shape[1]} tokens per sequence, more than the model's maximum of "
                f"{max_positions} positions (config.max_position_embeddings)"
            )
        adapter.check_token_ids(ids, f"input_ids_batches[{i}]")


def _check_input_ids(batches: Any) -> list[torch.Tensor]:
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    if not isinstance(batches, (list, tuple)) or not batches:
        raise TypeError("input_ids_batches must be a LongTensor (bsz, seq_len) or a non-empty list of them")
    out = []
    for i, ids in enumerate(batches):
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.long, torch.int):
            raise TypeError(f"input_ids_batches[{i}] must be an integer tensor, got {type(ids).__name__}")
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.numel() == 0:
            raise ValueError(f"input_ids_batches[{i}] must be (bsz, seq_len) and non-empty, got {tuple(ids.shape)}")
        out.append(ids.long())
    return out


def calibrate(
    model: nn.Module,
    tokenizer,
    method: str,
    texts: Sequence[str] | None = None,
    n_sequences: int | None = None,
    seq_len: int = 1024,
    n_samples: int | None = None,
    output: str | os.PathLike | None = None,
    progress: bool = True,
    input_ids_batches: torch.Tensor | Sequence[torch.Tensor] | None = None,
    n_sink: int | None = None,
    seed: int = 0,
    **method_options: Any,
) -> Path:
    """Compute and save the calibration artifact ``method`` for ``model``.

    Parameters
    ----------
    model : PreTrainedModel
        A causal LM of a supported architecture; every attention layer is calibrated (sliding-window layers of
        hybrid models too, although presses only use the full-attention ones).
    tokenizer : PreTrainedTokenizer or None
        Needed unless ``input_ids_batches`` is given (then pass None); with ``texts`` too.
    method : str
        One of :data:`METHODS`: ``"qfilters"`` (filters ``(num_layers, num_kv_heads, head_dim)`` from the
        first right singular vector of post-RoPE queries), ``"expected_attention_stats"`` (mean and covariance
        of pre-RoPE queries per layer and query head) or ``"duo_attention"`` (DuoAttention's gates
        ``(num_layers, num_kv_heads)``, trained on synthetic passkey samples; see
        :mod:`kvsqueeze.calibration.duo_attention`).
    texts : list of str or None, default None
        Calibration text; None uses :func:`default_texts` (the shipped essays).
    n_sequences : int or None, default None (16)
        Sequences cut from ``texts``. The Q-Filters paper uses 20 of 2,048 tokens; 16 of 1,024 keep a CPU run
        to minutes and still give >5x more tokens than the 3,000 samples the SVD needs. With
        ``input_ids_batches`` (used as given) it may only repeat their number of sequences.
    seq_len : int, default 1024
        Tokens per sequence (at most; the last chunk of a text may be shorter).
    n_samples : int or None, default None (3000)
        ``qfilters``: query vectors sampled per head (uniformly over all calibration positions) for the SVD.
    output : path or None, default None
        Where to write; None is :func:`default_artifact_path` (where the presses look by default). Checked before
        any forward pass (:func:`check_output_path`): an existing directory, an empty path or an unwritable folder
        is refused.
    progress : bool, default True
        Show a tqdm bar over the forward passes.
    input_ids_batches : LongTensor or list of LongTensor, optional
        Pre-tokenized ``(bsz, seq_len)`` batches used as given, instead of ``texts`` (no padding allowed). Ids must
        lie in the model's vocabulary and sequences within its ``max_position_embeddings`` (as must ``seq_len``
        otherwise); both are checked before any forward pass.
    n_sink : int or None, default None (4)
        ``expected_attention_stats``: leading positions of each sequence left out of the statistics.
    seed : int, default 0
        Seed of the Q-filter sample positions (``duo_attention``: of the passkey samples).
    **method_options
        ``duo_attention`` only: ``steps``, ``lr``, ``l1_weight``, ``n_recent``, ``n_passkeys``, ``passkey_digits``
        and ``duo_sink`` (the streaming window's sink tokens), see
        :func:`kvsqueeze.calibration.duo_attention.calibrate_duo_attention`. ``n_sequences``, ``n_samples`` and
        ``n_sink`` do not apply to it (one fresh passkey sample per step; its sinks are ``duo_sink``). An option
        the method does not use raises a TypeError (``n_samples`` is qfilters-only, ``n_sink`` is
        expected_attention_stats-only, ``n_passkeys``/``passkey_digits`` have no use with ``input_ids_batches``)
        instead of being ignored. The press must use the same window (``duo_sink`` is its ``n_sink``).

    Returns
    -------
    Path
        The written artifact.
    """
    _check_method(method)
    seq_len = _positive_int(seq_len, "seq_len", 2)
    check_seed(seed)
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {progress!r}")
    path = check_output_path(output)
    if path is None:  # the default location, checked like an explicit one before any work (not after training)
        default = default_artifact_path(model, method)
        try:
            check_output_path(default)
        except ValueError as exc:
            reason = str(exc).split("cannot be written: ", 1)[-1]
            raise ValueError(
                f"the default artifact location {str(default)!r} cannot be written ({reason}); set KVSQUEEZE_CACHE to "
                "a writable folder or pass output=<file path>"
            ) from None
        path = default
    batches = None
    if input_ids_batches is not None:
        if texts is not None:
            raise ValueError("give either texts or input_ids_batches, not both")
        batches = _check_input_ids(input_ids_batches)
    else:
        if texts is not None:
            check_texts(texts)
        if tokenizer is None:
            raise ValueError(f"{method} calibration from text needs a tokenizer (or pass input_ids_batches)")
        if not callable(tokenizer):
            raise TypeError(f"tokenizer must be a Hugging Face tokenizer (callable), got {type(tokenizer).__name__}")
    check_calibration_lengths(model, seq_len, batches)
    if batches is not None and n_sequences is not None and method != "duo_attention":
        check_int(n_sequences, "n_sequences", 1)
        given_rows = sum(b.shape[0] for b in batches)
        if n_sequences != given_rows:
            raise ValueError(
                f"n_sequences={n_sequences} conflicts with input_ids_batches, which hold {given_rows} sequences and "
                "are used as given; pass only the sequences to use, or leave n_sequences out"
            )
    applies = {"qfilters": ("n_sequences", "n_samples"), "expected_attention_stats": ("n_sequences", "n_sink")}
    given = {"n_sequences": n_sequences, "n_samples": n_samples, "n_sink": n_sink}
    unused = [name for name, value in given.items() if value is not None and name not in applies.get(method, ())]
    if unused:
        raise TypeError(f"{', '.join(unused)} not used by {method!r} calibration"
                        + (" (its streaming sinks are duo_sink)" if "n_sink" in unused and method == "duo_attention" else ""))
    if method == "duo_attention":
        tensors, settings = _calibrate_duo(model, tokenizer, texts, seq_len, progress, batches, seed, method_options)
    else:
        if method_options:
            raise TypeError(f"unexpected options for {method!r} calibration: {sorted(method_options)}")
        tensors, settings = _calibrate_queries(
            model, tokenizer, method, texts, 16 if n_sequences is None else n_sequences, seq_len,
            3000 if n_samples is None else n_samples, progress, batches, 4 if n_sink is None else n_sink, seed,
        )
    import transformers

    import kvsqueeze

    settings.update(
        dtype=str(next(model.parameters()).dtype),
        kvsqueeze_version=kvsqueeze.__version__,
        transformers_version=transformers.__version__,
    )
    return save_artifact(path, tensors, model, method, settings)


def _calibrate_duo(model, tokenizer, texts, seq_len, progress, batches, seed, options) -> tuple[dict, dict]:
    """DuoAttention's gate training (needs gradients, so it runs outside inference mode)."""
    from kvsqueeze.calibration.duo_attention import calibrate_duo_attention

    known = {"steps", "lr", "l1_weight", "n_recent", "n_passkeys", "passkey_digits", "duo_sink"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unexpected options for 'duo_attention' calibration: {unknown}; known: {sorted(known)}")
    passkey_only = sorted({"n_passkeys", "passkey_digits"} & set(options))
    if batches is not None and passkey_only:
        raise TypeError(f"{', '.join(passkey_only)} not used by 'duo_attention' calibration on input_ids_batches "
                        "(their sequences replace the passkey samples)")
    if "duo_sink" in options:
        options = dict(options)
        options["n_sink"] = options.pop("duo_sink")
    return calibrate_duo_attention(
        model, tokenizer, texts=texts, input_ids_batches=batches, seq_len=seq_len, seed=seed, progress=progress,
        **options,
    )


@torch.inference_mode()
def _calibrate_queries(
    model, tokenizer, method, texts, n_sequences, seq_len, n_samples, progress, batches, n_sink, seed
) -> tuple[dict, dict]:
    n_sequences = _positive_int(n_sequences, "n_sequences")
    n_samples = _positive_int(n_samples, "n_samples")
    n_sink = _positive_int(n_sink, "n_sink", 0)
    adapter = ModelAdapter(model)
    if batches is not None:
        source = "input_ids"
    else:
        source = "essays" if texts is None else "texts"
        batches = text_sequences(tokenizer, default_texts() if texts is None else texts, n_sequences, seq_len)

    shape = adapter.shape
    if method == "qfilters":
        collector: QFilterCollector | QueryMomentCollector = QFilterCollector(
            shape.num_layers, shape.num_key_value_heads
        )
        # The same positions for every layer and head: n_samples drawn uniformly over all (batch, row, token).
        sizes = [b.numel() for b in batches]
        total = sum(sizes)
        picked = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[: min(n_samples, total)]
        picked = picked.sort().values
        offsets = torch.tensor([0, *sizes]).cumsum(0)
        sample_index = [picked[(picked >= lo) & (picked < hi)] - lo for lo, hi in zip(offsets[:-1], offsets[1:])]
    else:
        collector = QueryMomentCollector(shape.num_layers, shape.num_attention_heads, shape.head_dim)
        if all(b.shape[1] <= n_sink for b in batches):
            raise ValueError(f"every calibration sequence is at most n_sink={n_sink} tokens long")

    current: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        hidden = adapter.hidden_states_from_call(args, kwargs)
        if collector.rope:
            q = adapter.query_states(module, hidden, kwargs["position_embeddings"])  # (bsz, heads, n, head_dim)
            q = q.transpose(0, 1).flatten(1, 2)  # (heads, bsz * n, head_dim), the flat order of input_ids
            idx = current["index"]
            if idx.numel():
                collector.add(module.layer_idx, q[:, idx.to(q.device)])
        else:
            q = adapter.query_states(module, hidden)[:, :, n_sink:]  # pre-RoPE, sinks left out
            if q.shape[2]:
                collector.add(module.layer_idx, q.transpose(0, 1).flatten(1, 2))

    device = next(model.parameters()).device
    handles = adapter.register_attention_hooks(hook, layers=list(range(shape.num_layers)))
    try:
        from tqdm.auto import tqdm

        for i, ids in enumerate(tqdm(batches, desc=f"calibrating {method}", unit="seq", disable=not progress)):
            if method == "qfilters":
                current["index"] = sample_index[i]
                if not sample_index[i].numel():
                    continue
            model(input_ids=ids.to(device), use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    settings = {
        "source": source,
        "n_sequences": sum(b.shape[0] for b in batches),
        "seq_len": max(b.shape[1] for b in batches),
        "n_tokens": sum(b.numel() for b in batches),
    }
    if method == "qfilters":
        settings.update(n_samples=int(picked.numel()), seed=seed, queries="post-rope")
    else:
        settings.update(n_sink=n_sink, queries="pre-rope", covariance="divided by N")
    return collector.finish(), settings
