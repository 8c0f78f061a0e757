"""The ``kvsqueeze`` command line: list presses, compress a context and answer, run the offline demo, calibrate.

Subcommands: ``ls`` (the press registry with fields and capabilities), ``models`` (embedded models), ``run``
(compress one context file, answer one question, report measured cache bytes and timings), ``demo`` (a shipped
document at several ratios), ``calibrate`` (write a calibration artifact), ``eval`` (a benchmark sweep over
presses × ratios, one prefill per sample) and ``report`` (leaderboard and plots from results directories). Bad input prints one
``error: ...`` line on stderr and exits with status 2; set ``KVSQUEEZE_DEBUG=1`` to get the traceback instead.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

#: The question asked about ``kvsqueeze/data/demo.txt`` (Paul Graham's "Life is Short" with one added paragraph,
#: at 40% of the text, stating a 7-digit access code), the start of the answer, and the code itself.
DEMO_QUESTION = "What is the access code for the archive room? Answer with the 7-digit code only."
DEMO_ANSWER_PREFIX = "The access code for the archive room is"
DEMO_ANSWER = "4738215"
#: KeyDiff is the press that keeps needles best on SmolLM2-135M (9/12 at ratio 0.5 in benchmarks/needles.py) and
#: keeps this document's code up to ratio 0.5; knorm, expected_attention and snapkv lose it at 0.5.
DEMO_PRESS = "keydiff"
DEMO_RATIOS = "0,0.25,0.5,0.75"

_MB = 1e6

#: The presses whose inner press has no default (:func:`wrapped_press_fields`), named in the ``--press`` help.
WRAPPERS_WITHOUT_DEFAULT = ("key_rerotation", "per_layer", "composed")
WRAPPER_HELP = (
    "presses that wrap another press run with their default inner press (adakv, criticalkv, critical_adakv, "
    "decoding: Expected Attention); "
    f"{', '.join(WRAPPERS_WITHOUT_DEFAULT)} have none and are built in Python (make_press)"
)


class CLIError(Exception):
    """A user error the CLI reports as one ``error: ...`` line (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one ``error: ...`` line like every other user error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


# ----------------------------------------------------------------------------------------------------------------
# Argument checks (all run before any model is loaded)
# ----------------------------------------------------------------------------------------------------------------


def parse_ratio(text: str, flag: str = "--ratio") -> float:
    """``text`` as a compression ratio in ``[0, 1)`` (the fraction of KV entries removed)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise CLIError(f"{flag} must be a number in [0, 1) (fraction of KV entries removed), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise CLIError(f"{flag} must be in [0, 1) (fraction of KV entries removed), got {text!r}")
    return value


def parse_ratios(text: str) -> list[float]:
    """A comma-separated list of ratios, e.g. ``"0,0.25,0.5"``; duplicates are refused."""
    parts = parse_list(text, "--ratios", "numbers in [0, 1)", DEMO_RATIOS)
    ratios = [parse_ratio(p, "--ratios") for p in parts]
    if len(set(ratios)) != len(ratios):  # also "0.5,0.50"
        raise CLIError(f"--ratios has duplicates: {text!r}")
    return ratios


def parse_key_values(items: Sequence[str] | None, flag: str, example: str) -> dict[str, Any]:
    """``KEY=VALUE`` items as a dict; values are Python literals (``8``, ``0.5``, ``True``, ``None``) or plain
    strings. A malformed item or a key given twice is refused, naming ``flag``."""
    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise CLIError(f"{flag} takes KEY=VALUE (e.g. {example}), got {item!r}")
        if key in options:
            raise CLIError(f"{flag} sets {key!r} twice")
        try:
            options[key] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            options[key] = raw.strip()
    return options


def parse_press_options(items: Sequence[str] | None) -> dict[str, Any]:
    """``--press-option KEY=VALUE`` items: press fields other than the ratio."""
    options = parse_key_values(items, "--press-option", "n_sink=8")
    if "compression_ratio" in options:
        raise CLIError("set the compression ratio with --ratio (eval: --ratios), not --press-option")
    return options


#: ``load_model`` arguments that are not config attributes (they have flags of their own, or none on purpose).
_LOAD_ARGUMENTS = ("name_or_path", "dtype", "attn_implementation", "device")


def parse_model_options(items: Sequence[str] | None) -> dict[str, Any]:
    """``--model-option KEY=VALUE`` items: model config attributes to replace when loading (``load_model``'s
    ``config_overrides``), e.g. ``sliding_window=None``."""
    options = parse_key_values(items, "--model-option", "sliding_window=None")
    for key in options:
        if key in _LOAD_ARGUMENTS:
            raise CLIError(f"--model-option sets model config attributes; {key!r} is not one")
    return options


def read_context(path: str) -> str:
    """The text of ``path`` (``-`` reads stdin); a missing, unreadable or blank file is refused."""
    if path == "-":
        text = sys.stdin.read()
    else:
        file = Path(path)
        if not file.exists():
            raise CLIError(f"context file not found: {path}")
        if not file.is_file():
            raise CLIError(f"context path is not a file: {path}")
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise CLIError(f"context file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise CLIError(f"context is empty: {'standard input' if path == '-' else path} holds no text to compress")
    return text


def _positive(value: int, flag: str) -> int:
    if value < 1:
        raise CLIError(f"{flag} must be a positive integer, got {value}")
    return value


def wrapped_press_fields(name: str) -> dict[str, bool]:
    """The fields of registered press ``name`` that hold other presses (``press``, ``presses``), each mapped to
    whether it must be given (no default inner press: ``key_rerotation``, ``per_layer``, ``composed``)."""
    from kvsqueeze.presses import press_class

    out = {}
    for f in dataclasses.fields(press_class(name)):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if "Press" in kind:
            required, default = _default_repr(f)
            out[f.name] = required or default is None or default == []
    return out


def check_cli_press(name: str, options: dict[str, Any], option_prefix: str = "") -> None:
    """Refuse what the command line cannot build: a press that wraps another press and has no default inner press,
    or an option that sets a wrapped press (the command line builds no inner presses; Python does).
    ``option_prefix`` is what precedes ``KEY=VALUE`` in ``--press-option`` (eval: ``"PRESS."``)."""
    from kvsqueeze.presses import press_class

    key = getattr(press_class(name), "registry_name", name)  # unknown name: KeyError with close matches
    fields = wrapped_press_fields(key)
    example = {f: "[make_press(...), ...]" if f == "presses" else "make_press(...)" for f in fields}
    for field, value in options.items():
        if field in fields:
            raise CLIError(
                f"--press-option {option_prefix}{field}={value!r}: press {key!r} wraps another press, which the "
                f"command line cannot build from a name; build it in Python (make_press({key!r}, "
                f"{field}={example[field]}))"
            )
    required = [f for f, needed in fields.items() if needed]
    if required:
        given = ", ".join(f"{f}={example[f]}" for f in required)
        raise CLIError(
            f"press {key!r} wraps another press, which the command line cannot build; build it in Python "
            f"(make_press({key!r}, {given}))"
        )


def build_press(name: str, ratio: float | None, options: dict[str, Any] | None = None):
    """A fresh press from the registry, or None for ``none`` (no compression); validates before any model loads.

    Presses that wrap another press run with their default inner press (``adakv``, ``criticalkv``); those without
    one, and options that would set one, are refused (:func:`check_cli_press`)."""
    from kvsqueeze.presses import make_press

    options = options or {}
    if name.strip().lower() == "none":
        if ratio:
            raise CLIError(f"--press none keeps every entry; it takes no --ratio (got {ratio})")
        if options:
            raise CLIError(f"--press none takes no --press-option (got {sorted(options)})")
        return None
    check_cli_press(name, options)  # before the ratio: a composition is refused with or without --ratio
    if ratio is None and options.get("budget") is None:
        raise CLIError(
            f"--ratio is required with --press {name} (fraction of KV entries removed, e.g. 0.5), or an absolute "
            "budget of kept tokens: --press-option budget=N"
        )
    kwargs = dict(options)
    if ratio:
        kwargs["compression_ratio"] = ratio
    return make_press(name, **kwargs)


def load_with_options(model_name: str | None, model_options: dict[str, Any] | None = None, **kwargs: Any):
    """``load_model(model_name, **kwargs)`` with the config attributes ``model_options`` replaced; options the
    checkpoint's weights do not fit (another number of heads, another vocabulary size) are one error naming them."""
    from kvsqueeze.models import ConfigMismatchError, load_model

    try:
        return load_model(model_name, **kwargs, **(model_options or {}))
    except ConfigMismatchError as exc:
        given = " ".join(f"--model-option {key}={value!r}" for key, value in exc.overrides.items())
        verb = "does" if len(exc.overrides) == 1 else "do"
        raise CLIError(
            f"{given} {verb} not match the weights of {exc.name}: the checkpoint's tensor shapes differ from what "
            "the changed config needs (see the load report above); keep the checkpoint's value"
        ) from None
    except (CLIError, ValueError, TypeError, OSError, ImportError):
        raise  # kvsqueeze's own checks, and transformers' errors that explain themselves
    except Exception as exc:  # e.g. a truncated safetensors file, or an option value the model cannot be built with
        given = "".join(f" --model-option {key}={value!r}" for key, value in (model_options or {}).items())
        text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise CLIError(
            f"cannot load model {model_name or 'smollm2-135m'!r}{' with' + given if given else ''}: "
            f"{type(exc).__name__}: {text}"
        ) from exc


def load_for(model_name: str | None, press, model_options: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """Load ``model_name`` with the attention implementation ``press`` needs (eager for attention weights) and the
    config attributes ``model_options`` replaced."""
    needs_eager = press is not None and press.capabilities.needs_attention_weights
    return load_with_options(model_name, model_options, attn_implementation="eager" if needs_eager else "sdpa")


# ----------------------------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with left-aligned columns."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _short(text: str, width: int = 48) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _jsonable(value: Any) -> Any:
    """Field values as JSON: presses become ``{"type": registry name, fields...}``, the rest stays or is ``str``."""
    from kvsqueeze.presses import Press

    if isinstance(value, Press):
        return press_config(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def press_config(press) -> dict[str, Any] | None:
    """``{"type": name, <field>: value, ...}`` for a press (None for no press)."""
    if press is None:
        return None
    out: dict[str, Any] = {"type": getattr(type(press), "registry_name", type(press).__name__)}
    for f in dataclasses.fields(press):
        out[f.name] = _jsonable(getattr(press, f.name))
    return out


def _default_repr(f: dataclasses.Field) -> tuple[bool, Any]:
    """``(required, default)`` of a dataclass field; factories are called to show what they produce."""
    if f.default is not dataclasses.MISSING:
        return False, f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return False, f.default_factory()  # type: ignore[misc]
    return True, None


def press_info(name: str) -> dict[str, Any]:
    """Everything ``kvsqueeze ls`` shows about one registered press."""
    from kvsqueeze.presses import press_class
    from kvsqueeze.presses.registry import press_fields

    cls = press_class(name)
    fields = []
    for f in press_fields(name):
        required, default = _default_repr(f)
        fields.append(
            {"name": f.name, "type": f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type)),
             "required": required, "default": None if required else _jsonable(default)}
        )
    caps = cls.capabilities  # None when they depend on the instance (its fields, or the presses it wraps)
    from_defaults = caps is None
    if from_defaults:
        from kvsqueeze.presses import make_press

        try:
            caps = make_press(name).capabilities  # what the defaults give (e.g. KVzip's, or AdaKV around its default)
        except (TypeError, ValueError):
            caps = None  # a wrapper with no default inner press: nothing to show without one
    capabilities = None
    if caps is not None:
        capabilities = {
            f.name: sorted(v) if isinstance(v := getattr(caps, f.name), frozenset) else v
            for f in dataclasses.fields(caps)
        }
    doc = (cls.__doc__ or "").strip().split("\n\n")[0]  # the first paragraph
    return {
        "name": name,
        "class": cls.__name__,
        "module": cls.__module__,
        "base": cls.__mro__[1].__name__,
        "summary": " ".join(doc.split()),
        "fields": fields,
        "capabilities": capabilities,
        "capabilities_depend_on_fields": from_defaults,
    }


def _format_press_info(info: dict[str, Any]) -> str:
    fields = ", ".join(
        f"{f['name']}: {f['type']}" + (" (required)" if f["required"] else f" = {f['default']!r}")
        for f in info["fields"]
    )
    if info["capabilities"] is None:
        caps = "computed from the wrapped press(es)"
    else:
        caps = " ".join(
            f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in info["capabilities"].items()
        )
        if info["capabilities_depend_on_fields"]:
            caps += "  (with the default fields; they depend on the fields or the wrapped press)"
    return (
        f"{info['name']}  ({info['class']}, a {info['base']})\n"
        f"  {info['summary']}\n"
        f"  fields:       {fields}\n"
        f"  capabilities: {caps}"
    )


# ----------------------------------------------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------------------------------------------


def cmd_ls(args: argparse.Namespace) -> int:
    """List every registered press with its fields (and defaults) and capabilities."""
    from kvsqueeze.presses import list_presses

    infos = [press_info(n) for n in list_presses()]
    if args.json:
        print(json.dumps({"presses": infos}, default=str))
        return 0
    print(f"{len(infos)} registered presses (kvsqueeze ls --json for machine-readable output)\n")
    print("\n\n".join(_format_press_info(i) for i in infos))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """List the embedded models ``--model`` accepts by short name."""
    from kvsqueeze.models import DEFAULT_MODEL, list_models

    models = list_models()
    if args.json:
        print(json.dumps({"default": DEFAULT_MODEL, "models": models}))
        return 0
    rows = [(n + (" (default)" if n == DEFAULT_MODEL else ""), d) for n, d in models.items()]
    print(format_table(["name", "description"], rows))
    print("\nAlso accepted: a GGUF file (converted once), a local model directory, or a hub id (needs network access).")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """Show what the cache holds (converted models, assembled GGUFs, artifacts) and remove what no load uses."""
    from kvsqueeze.models import cache_root, cache_usage, clean_cache

    if args.dry_run and not args.clean:
        raise CLIError("--dry-run only goes with --clean")
    entries = clean_cache(dry_run=args.dry_run) if args.clean else cache_usage()
    if args.json:
        rows = [{"kind": e.kind, "path": str(e.path), "bytes": e.bytes, "status": e.status, "reason": e.reason}
                for e in entries]
        key = "removed" if args.clean and not args.dry_run else ("would_remove" if args.clean else "entries")
        print(json.dumps({"root": str(cache_root()), key: rows}))
        return 0
    mib = 2**20
    if args.clean:
        verb = "would remove" if args.dry_run else "removed"
        for e in entries:
            print(f"{verb} {e.path} ({e.bytes / mib:.1f} MiB, {e.status}: {e.reason})")
        print(f"{verb} {len(entries)} item(s), {sum(e.bytes for e in entries) / mib:.1f} MiB under {cache_root()}")
        return 0
    rows = [(e.kind, str(e.path.relative_to(cache_root())), f"{e.bytes / mib:.1f}", e.status, e.reason)
            for e in entries if e.kind != "hash"]
    print(f"{cache_root()} (KVSQUEEZE_CACHE to move it)\n")
    print(format_table(["kind", "path", "MiB", "status", "why"], rows) if rows else "(empty)")
    removable = [e for e in entries if e.removable]
    total = sum(e.bytes for e in entries) / mib
    print(f"\n{total:.1f} MiB in all; {len(removable)} item(s), {sum(e.bytes for e in removable) / mib:.1f} MiB, "
          "superseded, damaged or abandoned (kvsqueeze cache --clean removes them)")
    return 0


def _bytes_summary(ctx) -> dict[str, Any]:
    before, after = ctx.full_cache_bytes, ctx.cache_bytes
    return {
        "cache_bytes_before": before,
        "cache_bytes_after": after,
        "saved_fraction": 1.0 - after / before if before else 0.0,
        "measured_ratio": ctx.measured_ratio,
    }


def cmd_run(args: argparse.Namespace) -> int:
    """Compress one context with one press, answer one question, report measured bytes and timings."""
    from kvsqueeze.pipeline import Pipeline, check_chunkable

    ratio = None if args.ratio is None else parse_ratio(args.ratio)
    press = build_press(args.press, ratio, parse_press_options(args.press_option))
    model_options = parse_model_options(args.model_option)
    _positive(args.max_new_tokens, "--max-new-tokens")
    if not args.question.strip():
        raise CLIError("--question is empty")
    if args.prefill_chunk_size is not None:
        _positive(args.prefill_chunk_size, "--prefill-chunk-size")
        try:
            check_chunkable(press, args.prefill_chunk_size)
        except ValueError as exc:
            raise CLIError(f"--press {args.press} with --prefill-chunk-size: {exc}") from exc
    context = read_context(args.context)

    model, tokenizer = load_for(args.model, press, model_options)
    pipe = Pipeline(model, tokenizer)
    # a question or answer budget that cannot fit after the context is refused before the prefill, not after it
    pipe.check_answerable(context, args.question, max_new_tokens=args.max_new_tokens, answer_prefix=args.answer_prefix)
    ctx = pipe.compress(context, press=press, prefill_chunk_size=args.prefill_chunk_size)
    answer = ctx.answer(args.question, max_new_tokens=args.max_new_tokens, answer_prefix=args.answer_prefix)

    compression = ctx.compression_seconds
    result = {
        "model": model.name_or_path,
        "model_options": model_options,
        "attn_implementation": pipe.adapter.attn_implementation,
        "press": press_config(press),
        "context_tokens": ctx.n_tokens,
        "prefill_chunk_size": ctx.prefill_chunk_size,
        "question": args.question,
        "answer": answer,
        **_bytes_summary(ctx),
        "prefill_seconds": ctx.prefill_seconds - compression,
        "compression_seconds": compression,
        "prefill_and_compression_seconds": ctx.prefill_seconds,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    press_text = "none (no compression)" if press is None else f"{args.press}: {press!r}"
    print(f"answer: {answer}\n")
    print(f"model:        {result['model']} ({result['attn_implementation']} attention)")
    print(f"press:        {press_text}")
    chunked = "" if ctx.prefill_chunk_size is None else f", prefilled in chunks of {ctx.prefill_chunk_size}"
    print(f"context:      {ctx.n_tokens} tokens{chunked}")
    print(
        f"cache:        {result['cache_bytes_before'] / _MB:.2f} MB -> {result['cache_bytes_after'] / _MB:.2f} MB "
        f"({100 * result['saved_fraction']:.1f}% saved, measured; "
        f"{100 * result['measured_ratio']:.1f}% of the entries of the compressed layers removed)"
    )
    print(f"prefill:      {result['prefill_seconds']:.3f} s")
    print(f"compression:  {compression:.3f} s (inside the prefill; total {ctx.prefill_seconds:.3f} s)")
    return 0


def demo_text() -> str:
    """The shipped demo document (``kvsqueeze/data/demo.txt``): essay text with one access code in it."""
    return (resources.files("kvsqueeze") / "data" / "demo.txt").read_text(encoding="utf-8")


def cmd_demo(args: argparse.Namespace) -> int:
    """Compress the shipped document at several ratios and answer the same question from each."""
    from tqdm.auto import tqdm

    from kvsqueeze.pipeline import Pipeline

    ratios = parse_ratios(args.ratios)
    press_name = args.press
    if press_name.strip().lower() == "none":
        if any(ratios):
            raise CLIError("--press none cannot compress; use --ratios 0 or pick a press (kvsqueeze ls)")
    else:
        check_cli_press(press_name, {})  # unknown name: KeyError with close matches
    _positive(args.max_new_tokens, "--max-new-tokens")
    model_options = parse_model_options(args.model_option)
    presses = [build_press(press_name, r) if r else None for r in ratios]
    pressed = [p for p in presses if p is not None]
    caps = pressed[0].capabilities if pressed else None

    model, tokenizer = load_for(args.model, pressed[0] if pressed else None, model_options)
    pipe = Pipeline(model, tokenizer)
    for press in pressed:  # as run and eval do: a missing calibration artifact fails here, before the prefill
        press.validate(pipe.adapter)
    text = demo_text()
    pipe.check_answerable(text, DEMO_QUESTION, max_new_tokens=args.max_new_tokens, answer_prefix=DEMO_ANSWER_PREFIX)
    # One shared prefill when the press can work from recorded layer inputs; otherwise one prefill per ratio.
    shared = caps is None or caps.shares_recording
    recorded = pipe.record(text) if shared else None

    rows, results = [], []
    steps = tqdm(list(zip(ratios, presses, strict=True)), desc=f"demo ({press_name})", unit="ratio", file=sys.stderr)
    for ratio, press in steps:
        ctx = pipe.from_recorded(recorded, press) if shared else pipe.compress(text, press=press)
        answer = ctx.answer(DEMO_QUESTION, max_new_tokens=args.max_new_tokens, answer_prefix=DEMO_ANSWER_PREFIX)
        sizes = _bytes_summary(ctx)
        compression = ctx.compression_seconds
        correct = DEMO_ANSWER in answer
        results.append(
            {"ratio": ratio, "answer": answer, "correct": correct, **sizes,
             "prefill_seconds": ctx.prefill_seconds - compression, "compression_seconds": compression}
        )
        rows.append(
            (f"{ratio:.2f}", "yes" if correct else "NO", _short(answer), f"{sizes['cache_bytes_after'] / _MB:.2f}",
             f"{100 * sizes['saved_fraction']:.1f}", f"{ctx.prefill_seconds - compression:.2f}", f"{compression:.3f}")
        )
    summary = {
        "model": model.name_or_path,
        "press": press_name,
        "context_tokens": recorded.n_tokens if recorded is not None else pipe.context_ids(text).shape[1],
        "question": DEMO_QUESTION,
        "answer_prefix": DEMO_ANSWER_PREFIX,
        "expected": DEMO_ANSWER,
        "shared_prefill": shared,
        "results": results,
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"model {summary['model']}, press {press_name}, {summary['context_tokens']} context tokens")
    print(f"question: {DEMO_QUESTION}\nanswer starts with: {DEMO_ANSWER_PREFIX!r}  (expected: {DEMO_ANSWER})\n")
    print(format_table(["ratio", "correct", "answer", "cache MB", "saved %", "prefill s", "compress s"], rows))
    note = "one prefill shared by every ratio" if shared else "one prefill per ratio"
    print(f"\ncache MB and saved % are measured tensor bytes of the KV cache; {note}.")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Compute a calibration artifact with ``kvsqueeze.calibration.calibrate`` and print where it was written."""
    for value, flag in ((args.n_sequences, "--n-sequences"), (args.seq_len, "--seq-len"),
                        (args.n_samples, "--n-samples"), (args.steps, "--steps"), (args.n_recent, "--n-recent")):
        if value is not None:
            _positive(value, flag)
    if args.duo_sink is not None and args.duo_sink < 0:
        raise CLIError(f"--duo-sink must be >= 0, got {args.duo_sink}")
    from kvsqueeze.calibration import METHODS, calibrate, check_output_path  # imported only for this command

    if args.method not in METHODS:
        raise CLIError(f"unknown calibration method {args.method!r}; known methods: {', '.join(METHODS)}")
    if args.output is not None:
        try:
            check_output_path(args.output)
        except ValueError as exc:
            raise CLIError(f"--output: {exc}") from None
    duo = args.method == "duo_attention"
    wrong = [flag for flag, value, applies in (("--n-sequences", args.n_sequences, not duo),
                                               ("--n-samples", args.n_samples, args.method == "qfilters"),
                                               ("--steps", args.steps, duo), ("--duo-sink", args.duo_sink, duo),
                                               ("--n-recent", args.n_recent, duo))
             if value is not None and not applies]
    if wrong:
        raise CLIError(f"not used by --method {args.method}: {', '.join(wrong)}")
    model_options = parse_model_options(args.model_option)
    if args.seq_len is not None and args.seq_len < 2:
        raise CLIError(f"--seq-len must be at least 2 tokens, got {args.seq_len}")
    if duo:
        options = {"seq_len": args.seq_len or 1024, "steps": 50 if args.steps is None else args.steps}
        options.update({k: v for k, v in (("duo_sink", args.duo_sink), ("n_recent", args.n_recent)) if v is not None})
        import inspect

        from kvsqueeze.calibration.duo_attention import calibrate_duo_attention

        defaults = inspect.signature(calibrate_duo_attention).parameters
        sink = defaults["n_sink"].default if args.duo_sink is None else args.duo_sink
        recent = defaults["n_recent"].default if args.n_recent is None else args.n_recent
        if options["seq_len"] <= sink + recent:  # calibrate() refuses it too, after the model loads
            raise CLIError(
                f"--seq-len {options['seq_len']} must exceed the streaming window --duo-sink + --n-recent = {sink} + "
                f"{recent}: a streaming head would see the whole sample and its gate learn nothing"
            )
    else:
        options = {"n_sequences": 20 if args.n_sequences is None else args.n_sequences,
                   "seq_len": args.seq_len or 2048, "n_samples": args.n_samples}
    model, tokenizer = load_with_options(args.model, model_options)
    from kvsqueeze.adapter import ModelAdapter

    maximum = ModelAdapter(model).shape.max_position_embeddings
    # calibrate() refuses it too; here the message can say the length was the command's default
    if maximum is not None and options["seq_len"] > maximum:
        given = f"{options['seq_len']}" if args.seq_len else f"{options['seq_len']} (the default)"
        raise CLIError(
            f"--seq-len {given} exceeds the model's maximum of {maximum} positions (config.max_position_embeddings); "
            f"pass --seq-len {maximum} or less"
        )
    path = calibrate(model, tokenizer, args.method, output=args.output, progress=True, **options)
    print(path)
    return 0


def parse_list(text: str, flag: str, what: str, example: str) -> list[str]:
    """The items of a comma-separated list (stripped); empty items and duplicates are refused, naming ``flag``."""
    parts = [p.strip() for p in str(text).split(",")]
    if any(not p for p in parts):
        raise CLIError(f"{flag} must be comma-separated {what}, e.g. {example}; got {text!r}")
    if len(set(parts)) != len(parts):
        raise CLIError(f"{flag} has duplicates: {text!r}")
    return parts


def parse_names(text: str, flag: str) -> list[str]:
    """A comma-separated list of names, e.g. ``"knorm,snapkv"``; empty items and duplicates are refused."""
    return parse_list(text, flag, "names", "knorm,snapkv")


def parse_sweep_press_options(items: Sequence[str] | None, presses: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``PRESS.KEY=VALUE`` items (e.g. ``snapkv.window_size=16``) as ``{press: {key: value}}``."""
    options: dict[str, dict[str, Any]] = {}
    for item in items or []:
        name, dot, rest = item.partition(".")
        if not dot or not name.strip():
            raise CLIError(f"--press-option takes PRESS.KEY=VALUE (e.g. snapkv.window_size=16), got {item!r}")
        name = name.strip().lower()
        if name not in presses:
            raise CLIError(f"--press-option {item!r} names {name!r}, which is not in --presses ({','.join(presses)})")
        options.setdefault(name, {}).update(parse_press_options([rest]))
    return options


def parse_numbers(text: str, flag: str, kind: type, example: str) -> list:
    """A comma-separated list of ints or floats (``kind``), e.g. ``"1000,2000"``; anything else is refused."""
    values = []
    for part in parse_list(text, flag, f"{kind.__name__}s", example):
        try:
            values.append(kind(part))
        except ValueError:
            raise CLIError(f"{flag} must be comma-separated {kind.__name__}s, e.g. {example}; got {part!r}") from None
    return values


def parse_data_files(items: Sequence[str], flag: str, need_task: bool, example: str) -> str | dict[str, str]:
    """``--data-files`` / ``--qa-data-files`` items: ``TASK=PATH`` (repeatable) as ``{task: path}``, or (when
    ``need_task`` is False) one plain ``PATH``: a file, or a directory of ``<task>.jsonl`` files."""
    mapping: dict[str, str] = {}
    plain: list[str] = []
    for item in items:
        task, sep, path = item.partition("=")
        if sep and task.strip() and path.strip():
            if task.strip() in mapping:
                raise CLIError(f"{flag} names task {task.strip()!r} twice")
            mapping[task.strip()] = path.strip()
        elif not sep and item.strip() and not need_task:
            plain.append(item.strip())
        else:
            raise CLIError(f"{flag} takes {example}, got {item!r}")
    if plain and (mapping or len(plain) > 1):
        raise CLIError(f"{flag} takes one PATH or TASK=PATH items, not both or several paths; got {list(items)!r}")
    return plain[0] if plain else mapping


#: ``kvsqueeze eval`` flags that become benchmark constructor options: (flag, argparse dest, option name).
BENCHMARK_FLAGS = (
    ("--length", "length", "length"),
    ("--tasks", "tasks", "tasks"),
    ("--n-samples", "n_samples", "n_samples"),
    ("--qa-data-files", "qa_data_files", "qa_data_files"),
    ("--lengths", "lengths", "lengths"),
    ("--depths", "depths", "depths"),
    ("--n-per-cell", "n_per_cell", "n_per_cell"),
    ("--data-files", "data_files", "data_files"),
    ("--dataset", "dataset", "dataset"),
    ("--max-context-tokens", "max_context_tokens", "max_context_tokens"),
)


def benchmark_options(cls, args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark flags (:data:`BENCHMARK_FLAGS`: ``--length``, ``--tasks``, ``--data-files``, ...) as
    constructor options of benchmark class ``cls``.

    A flag is passed only when given; a benchmark whose constructor has no such option refuses it by name.
    """
    import difflib
    import inspect

    params = inspect.signature(cls).parameters  # the constructor's options, without self
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    options: dict[str, Any] = {}
    for flag, dest, key in BENCHMARK_FLAGS:
        value = getattr(args, dest, None)
        if value is None:
            continue
        if key not in params and not accepts_any:
            known = list(params)
            raise CLIError(
                f"benchmark {cls.name!r} has no {key!r} option, so {flag} does not apply "
                f"(its options: {', '.join(known) or 'none'})"
            )
        options[key] = value
    for flag, dest in (("--length", "length"), ("--n-samples", "n_samples"), ("--n-per-cell", "n_per_cell"),
                       ("--max-context-tokens", "max_context_tokens")):
        if getattr(args, dest, None) is not None:
            _positive(getattr(args, dest), flag)
    if args.lengths is not None:
        options["lengths"] = parse_numbers(args.lengths, "--lengths", int, "1000,2000,4000")
    if args.depths is not None:
        options["depths"] = parse_numbers(args.depths, "--depths", float, "0,0.25,0.5,0.75,1")
    if args.data_files is not None:
        options["data_files"] = parse_data_files(args.data_files, "--data-files", False, "PATH or TASK=PATH")
    if args.qa_data_files is not None:
        options["qa_data_files"] = parse_data_files(
            args.qa_data_files, "--qa-data-files", True, "TASK=PATH (e.g. qa_1=squad.jsonl)"
        )
    if args.tasks is not None:
        tasks = parse_names(args.tasks, "--tasks")
        for task in tasks:
            if cls.tasks and task not in cls.tasks:
                close = difflib.get_close_matches(task, cls.tasks, n=3, cutoff=0.5)
                hint = f" Did you mean: {', '.join(close)}?" if close else ""
                raise CLIError(f"unknown task {task!r} for benchmark {cls.name!r}.{hint} Known: {', '.join(cls.tasks)}")
        options["tasks"] = tasks
    flags = {key: flag for flag, _, key in BENCHMARK_FLAGS}
    for key, param in params.items():
        required = param.default is inspect.Parameter.empty and param.kind not in (param.VAR_POSITIONAL,
                                                                                     param.VAR_KEYWORD)
        if required and key not in options:
            raise CLIError(f"benchmark {cls.name!r} needs {flags.get(key, repr(key))}")
    return options


def check_benchmark_lengths(benchmark, model, max_new_tokens: int | None = None) -> None:
    """Refuse the sample lengths (:meth:`Benchmark.sample_lengths`: ``niah``'s ``--lengths``, ``ruler``'s
    ``--length``) that cannot fit in ``model``'s ``max_position_embeddings``, before the (slow) sample building.

    A length is the target of context + question in tokens of the model's tokenizer: RULER refuses to build a
    sample more than ``TOLERANCE`` (2%) short of it, and NIAH cuts its haystack at a word, closer still. The
    pipeline refuses a sample whose context + question + answer tokens exceed the maximum; so only a length whose
    shortest possible sample leaves no room for ``max_new_tokens`` answer tokens (1 when not given) is refused here:
    every sample of it would be refused later. Other benchmarks are not checked (their lengths mean other things).
    """
    targets = benchmark.sample_lengths()
    if targets is None:
        return
    flag, lengths, tolerance = targets
    from kvsqueeze.adapter import ModelAdapter

    maximum = ModelAdapter(model).shape.max_position_embeddings
    if maximum is None:
        return
    answer = max_new_tokens or 1

    def fewest_tokens(length: int) -> int:  # the shortest sample a length may give (the benchmark's own bound)
        return math.ceil((1 - tolerance) * length)

    too_long = [n for n in lengths if fewest_tokens(n) + answer > maximum]
    if too_long:
        shortest = min(too_long)
        fits = math.floor((maximum - answer) / (1 - tolerance))  # ceil(x) <= k exactly when x <= k
        while fits > 0 and fewest_tokens(fits) + answer > maximum:  # float rounding of (1 - tolerance)
            fits -= 1
        raise CLIError(
            f"{flag} {','.join(map(str, too_long))} cannot fit in the model's maximum of {maximum} positions "
            f"(config.max_position_embeddings): a sample of length {shortest} holds at least "
            f"{fewest_tokens(shortest)} tokens of context and question (samples land within {tolerance:.0%} below "
            f"their length), which leaves no room for {answer} answer token(s). No length above {fits} can fit "
            "(and a sample also carries the prompt format's tokens, so lengths a little below may not either): use "
            "shorter lengths" + (" or a smaller --max-new-tokens" if max_new_tokens else "")
        )


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate presses × ratios on a benchmark (one shared prefill per sample) into a results directory."""
    from kvsqueeze.evaluation.base import benchmark_class
    from kvsqueeze.evaluation.sweep import BASELINE, build_entries

    # Everything is checked before the model loads.
    cls = benchmark_class(args.benchmark)  # unknown name: KeyError with close matches
    options = benchmark_options(cls, args)
    presses = parse_names(args.presses, "--presses")
    ratios = parse_ratios(args.ratios)
    press_options = parse_sweep_press_options(args.press_option, [p.lower() for p in presses])
    if args.limit is not None:
        _positive(args.limit, "--limit")
    if args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}")
    if args.max_new_tokens is not None:
        _positive(args.max_new_tokens, "--max-new-tokens")
    from kvsqueeze.models import nearest_existing

    existing = nearest_existing(Path(args.output_dir).expanduser())
    if not existing.is_dir():
        raise CLIError(f"--output-dir {args.output_dir} cannot hold results: {existing} is not a directory")
    model_options = parse_model_options(args.model_option)
    for name in (p.strip().lower() for p in presses):
        if name != BASELINE:  # unknown names: KeyError with close matches
            check_cli_press(name, press_options.get(name, {}), option_prefix=f"{name}.")
    entries = build_entries(presses, ratios, press_options)
    if args.prefill_chunk_size is not None:
        from kvsqueeze.pipeline import check_chunkable

        _positive(args.prefill_chunk_size, "--prefill-chunk-size")
        for entry in entries:
            try:
                check_chunkable(entry.press, args.prefill_chunk_size)
            except ValueError as exc:
                raise CLIError(f"--presses {entry.name} with --prefill-chunk-size: {exc}") from exc
    benchmark = cls(**options)
    benchmark.check_data()  # data files missing or the hub unreachable: fails here, before the model loads

    from kvsqueeze.evaluation.sweep import run_sweep
    from kvsqueeze.models import resolve_name

    name = resolve_name(args.model)
    model, tokenizer = load_with_options(name, model_options)
    check_benchmark_lengths(benchmark, model, args.max_new_tokens)  # before any sample is built
    result = run_sweep(
        model,
        tokenizer,
        benchmark,
        presses,
        ratios,
        limit=args.limit,
        seed=args.seed,
        output_dir=args.output_dir,
        model_name=name,
        press_options=press_options,
        naive=args.naive,
        max_new_tokens=args.max_new_tokens,
        prefill_chunk_size=args.prefill_chunk_size,
        use_chat_template=False if args.no_chat_template else None,
    )
    summary = {
        "directory": str(result.directory),
        "units_run": result.units_run,
        "units_skipped": result.units_skipped,
        "prefills": result.prefills,
        "prefill_seconds": result.prefill_seconds,
        "compression_seconds": result.compression_seconds,
        "decode_seconds": result.decode_seconds,
        "wall_seconds": result.wall_seconds,
        "results": result.metrics,
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    from kvsqueeze.evaluation.report import format_ratio

    rows = [
        (r["press"], format_ratio(r["ratio"]), f"{r['metrics'].get('average', float('nan')):.1f}",
         f"{r['cache_bytes'] / _MB:.2f}", f"{100 * r['saved_fraction']:.1f}", str(r["n_samples"]))
        for r in result.metrics
    ]
    print(format_table(["press", "ratio", "average", "cache MB", "saved %", "samples"], rows))
    own = sorted({e.name for e in entries if not e.shared})  # the baseline is always shared
    if args.prefill_chunk_size is not None:  # the prefill depends on the press: nothing is shared
        note = f"each unit its own prefill, in chunks of {args.prefill_chunk_size} (--prefill-chunk-size)"
    elif args.naive:
        note = "one prefill per press and ratio (--naive)"
    else:
        note = "one prefill per sample shared by " + (
            "every press" if not own else f"every press but {', '.join(own)} (own prefill)"
        )
    print(
        f"\n{result.units_run} units run, {result.units_skipped} already done; {result.prefills} prefills ({note}); "
        f"{result.wall_seconds:.1f} s (prefill {result.prefill_seconds:.1f} s, compression "
        f"{result.compression_seconds:.1f} s, decoding {result.decode_seconds:.1f} s)"
    )
    print(f"results: {result.directory}  (kvsqueeze report {result.directory})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write the leaderboard (Markdown + CSV) and plots for finished results directories."""
    from kvsqueeze.evaluation.report import write_report

    dirs = [Path(d) for d in args.results]
    for d in dirs:
        if not d.is_dir():
            raise CLIError(f"results directory not found: {d}")
    output = Path(args.output) if args.output else dirs[0].parent / "report"
    written = write_report(dirs, output)
    if args.json:
        print(json.dumps({k: [str(p) for p in v] for k, v in written.items()}))
        return 0
    markdown = written["markdown"][0]
    text = markdown.read_text(encoding="utf-8")
    print("\n".join(line for line in text.splitlines() if not line.startswith("![")).strip())
    n_plots = len(written["plots"]) + len(written["heatmaps"])
    print(f"\nwrote {markdown}, {written['csv'][0]} and {n_plots} plots in {output}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Parser and entry point
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``kvsqueeze`` command."""
    parser = _Parser(prog="kvsqueeze", description="Compress the KV cache of Hugging Face causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    model_help = "embedded model name (kvsqueeze models), GGUF file, local directory or hub id; default: smollm2-135m"

    def add_model_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--model-option", action="append", metavar="KEY=VALUE",
            help="replace a model config attribute when loading, e.g. sliding_window=None (repeatable)",
        )

    p = sub.add_parser("ls", help="list registered presses with their fields and capabilities")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("models", help="list the embedded models")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("cache", help="what the model/artifact cache holds; --clean removes what no load uses")
    p.add_argument("--clean", action="store_true",
                   help="remove superseded or damaged model conversions, abandoned temporary folders and stale "
                        "hash records, judged against this environment's packages (calibration artifacts, and "
                        "conversions of packages not installed here, are never removed)")
    p.add_argument("--dry-run", action="store_true", help="with --clean: list what would be removed, remove nothing")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("run", help="compress a context file and answer a question from the compressed cache")
    p.add_argument(
        "--press", required=True, help=f"press name (kvsqueeze ls), or 'none' for no compression; {WRAPPER_HELP}"
    )
    p.add_argument("--ratio", help="compression ratio in [0, 1): fraction of KV entries removed (or give an absolute "
                                   "budget of kept tokens instead: --press-option budget=N)")
    p.add_argument("--context", required=True, metavar="FILE", help="UTF-8 text file to compress ('-': stdin)")
    p.add_argument("--question", required=True, help="question answered from the compressed context")
    p.add_argument("--model", default=None, help=model_help)
    add_model_option(p)
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length limit (default 32)")
    p.add_argument("--answer-prefix", default="", help="text the answer starts with (e.g. 'The code is')")
    p.add_argument(
        "--press-option", action="append", metavar="KEY=VALUE",
        help="set another press field, e.g. n_sink=8 (not a wrapped press: those are built in Python)",
    )
    p.add_argument(
        "--prefill-chunk-size", type=int, default=None, metavar="N",
        help="prefill in forward passes of N tokens; with --press decoding and --press-option "
        "compression_interval=N the cache is compressed after every chunk (bounded by its budget + N)",
    )
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="offline demo: one shipped document at several compression ratios")
    p.add_argument("--model", default=None, help=model_help)
    add_model_option(p)
    p.add_argument("--press", default=DEMO_PRESS, help=f"press name (default {DEMO_PRESS}); {WRAPPER_HELP}")
    p.add_argument("--ratios", default=DEMO_RATIOS, help=f"comma-separated ratios (default {DEMO_RATIOS})")
    p.add_argument("--max-new-tokens", type=int, default=12, help="answer length limit (default 12)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "calibrate", help="compute a calibration artifact (Q-filters, query statistics, DuoAttention gates)"
    )
    p.add_argument("--model", default=None, help=model_help)
    add_model_option(p)
    p.add_argument("--method", required=True, help="qfilters, expected_attention_stats or duo_attention")
    p.add_argument("--output", default=None, help="where to write (default: where the presses look for it)")
    p.add_argument("--n-sequences", type=int, default=None, help="calibration sequences (default 20; not duo_attention)")
    p.add_argument(
        "--seq-len", type=int, default=None, help="tokens per sequence (default 2048; duo_attention: 1024)"
    )
    p.add_argument("--n-samples", type=int, default=None, help="qfilters: queries sampled per head (default 3000)")
    p.add_argument(
        "--steps", type=int, default=None, help="duo_attention: gate training steps, one passkey sample each (default 50)"
    )
    p.add_argument("--duo-sink", type=int, default=None,
                   help="duo_attention: sink tokens of the streaming window (default 16; the press's n_sink)")
    p.add_argument("--n-recent", type=int, default=None,
                   help="duo_attention: recent tokens of the streaming window (default 64; the press's n_recent)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("eval", help="evaluate presses x ratios on a benchmark (one shared prefill per sample)")
    p.add_argument("--benchmark", required=True, help="registered benchmark name (e.g. ruler, niah)")
    p.add_argument("--presses", required=True, help=f"comma-separated press names (kvsqueeze ls); {WRAPPER_HELP}")
    p.add_argument("--ratios", default="0.25,0.5,0.75", help="comma-separated ratios in [0, 1) (default 0.25,0.5,0.75)")
    p.add_argument("--limit", type=int, default=None, help="at most this many samples per task (default: all)")
    p.add_argument("--length", type=int, default=None, help="context length option of the benchmark (e.g. 4096)")
    p.add_argument("--tasks", default=None, help="comma-separated tasks of the benchmark (default: all)")
    p.add_argument("--n-samples", type=int, default=None, help="ruler: samples per task (default 100)")
    p.add_argument(
        "--qa-data-files", action="append", metavar="TASK=PATH",
        help="ruler: local SQuAD/HotpotQA rows for qa_1/qa_2, e.g. qa_1=squad.jsonl (repeatable)",
    )
    p.add_argument(
        "--lengths", default=None,
        help="niah: comma-separated context lengths (default 1000,2000,4000); each must fit the model's maximum",
    )
    p.add_argument(
        "--depths", default=None, help="niah: comma-separated needle depths in [0, 1] (default 0,0.25,0.5,0.75,1)"
    )
    p.add_argument("--n-per-cell", type=int, default=None, help="niah: samples per length x depth cell (default 1)")
    p.add_argument(
        "--data-files", action="append", metavar="PATH|TASK=PATH",
        help="hub benchmarks: a local copy, one file (one task), a directory of <task>.jsonl files, or TASK=PATH "
        "items (repeatable)",
    )
    p.add_argument("--dataset", default=None, help="hub benchmarks: another hub id with the same schema (a mirror)")
    p.add_argument(
        "--max-context-tokens", type=int, default=None,
        help="hub benchmarks: truncate longer contexts in the middle to this many tokens",
    )
    p.add_argument("--model", default=None, help=model_help)
    add_model_option(p)
    p.add_argument("--output-dir", default="results", help="parent of the results directory (default results)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the benchmark rows (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override every sample's answer length")
    p.add_argument(
        "--press-option", action="append", metavar="PRESS.KEY=VALUE", help="a press field, e.g. snapkv.window_size=16"
    )
    p.add_argument("--naive", action="store_true", help="one prefill per press and ratio (slow; same predictions)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="plain text prompts even when the tokenizer has a chat template (a base model, or LongBench's "
                        "few-shot and code tasks, which its own pred.py runs without one)")
    p.add_argument(
        "--prefill-chunk-size", type=int, default=None, metavar="N",
        help="prefill every unit in chunks of N tokens (its own prefill; presses must be 'decoding', e.g. "
        "--press-option decoding.compression_interval=N)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="leaderboard (Markdown + CSV) and plots from results directories")
    p.add_argument("results", nargs="+", metavar="RESULTS_DIR", help="results directories written by 'eval'")
    p.add_argument("--output", default=None, help="output folder (default: report/ next to the first results dir)")
    p.add_argument("--json", action="store_true", help="print the written paths as one JSON object")
    p.set_defaults(func=cmd_report)
    return parser


def _message(exc: BaseException) -> str:
    # KeyError's str() is the repr of its argument; show the message itself.
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(text).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kvsqueeze`` command line; returns the exit status (0 on success, 2 on a user error)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, TypeError, KeyError, OSError, ImportError) as exc:
        if os.environ.get("KVSQUEEZE_DEBUG"):
            raise
        print(f"error: {_message(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
