"""The command line and the transformers ``"kv-compression"`` pipeline task."""

from __future__ import annotations

import copy
import json
import re
from shlex import split as shlex_split

import pytest
import torch
import transformers

import kvsqueeze
from conftest import build_model, build_tokenizer
from kvsqueeze import cli


def test_ls_json_lists_every_press_with_fields_and_capabilities(capsys):
    assert cli.main(["ls", "--json"]) in (0, None)
    listing = json.loads(capsys.readouterr().out)
    rows = listing["presses"] if isinstance(listing, dict) else listing
    names = {row["name"] for row in rows}
    assert names == set(kvsqueeze.list_presses())
    knorm = next(row for row in rows if row["name"] == "knorm")
    assert "compression_ratio" in json.dumps(knorm["fields"])
    assert knorm["capabilities"]["needs_attention_weights"] is False


def test_an_empty_standard_input_is_named_as_such(monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("  \n"))
    assert cli.main(["run", "--press", "knorm", "--ratio", "0.5", "--context", "-", "--question", "q"]) == 2
    assert "error: context is empty: standard input holds no text to compress" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--press", "knrom", "--ratio", "0.5", "--context", "README.md", "--question", "q"], "knorm"),
        (["run", "--press", "knorm", "--ratio", "1.5", "--context", "README.md", "--question", "q"], "1.5"),
        (["run", "--press", "knorm", "--ratio", "0.5", "--context", "missing.txt", "--question", "q"], "missing.txt"),
        (["calibrate", "--method", "qfilters", "--steps", "3"], "not used by --method qfilters: --steps"),
        (["calibrate", "--method", "duo_attention", "--n-sequences", "3"], "--n-sequences"),
        (["calibrate", "--method", "qfilters", "--duo-sink", "3", "--n-recent", "8"],
         "not used by --method qfilters: --duo-sink, --n-recent"),
        (["calibrate", "--method", "duo_attention", "--duo-sink", "-1"], "--duo-sink must be >= 0"),
        (["calibrate", "--method", "expected_attention_stats", "--n-samples", "3"], "--n-samples"),
        (["demo", "--model-option", "sliding_window"], "--model-option takes KEY=VALUE"),
        (["demo", "--model-option", "dtype=float16"], "'dtype' is not one"),
        (["calibrate", "--method", "qfilters", "--model-option", "rope_theta=1", "--model-option", "rope_theta=2"],
         "sets 'rope_theta' twice"),
        (["demo", "--model-option", "no_such_attribute=1"], "no config attribute 'no_such_attribute'"),
    ],
)
def test_bad_cli_input_is_one_error_line(argv, message, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exit_info:  # argparse-level errors exit directly
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error:") and message in err[-1], err


def test_transformers_pipeline_task_matches_kvsqueeze_pipeline(tiny_model, tokenizer):
    model = tiny_model("llama")
    context = "the quick brown fox jumps over the lazy dog " * 4
    press = kvsqueeze.make_press("knorm", compression_ratio=0.5)
    hf = transformers.pipeline("kv-compression", model=model, tokenizer=tokenizer)
    out = hf(context, question="what jumps?", press=press, max_new_tokens=5)
    ours = kvsqueeze.Pipeline(model, tokenizer).compress(context, press=press).answer("what jumps?", max_new_tokens=5)
    assert out == {"answer": ours}
    several = hf(context, question=["what jumps?", "who is lazy?"], press=press, max_new_tokens=5)
    assert [row["answer"] for row in several][0] == ours and len(several) == 2


def test_transformers_pipeline_task_call_arguments_replace_build_arguments(tiny_model, tokenizer):
    """An explicit ``press=None`` (keep everything) or ``seed=None`` at call time replaces what the pipeline was
    built with; they used to be dropped, so the build-time press still compressed."""
    model = tiny_model("llama")
    context = "the quick brown fox jumps over the lazy dog " * 4
    press = kvsqueeze.make_press("knorm", compression_ratio=0.75)
    hf = transformers.pipeline("kv-compression", model=model, tokenizer=tokenizer, press=press, max_new_tokens=6)
    pipe = kvsqueeze.Pipeline(model, tokenizer)
    compressed = pipe.compress(context, press=press).answer("what jumps?", max_new_tokens=6)
    full = pipe.compress(context).answer("what jumps?", max_new_tokens=6)
    assert compressed != full  # otherwise this test could not tell them apart
    assert hf(context, question="what jumps?") == {"answer": compressed}
    assert hf(context, question="what jumps?", press=None) == {"answer": full}

    seeded = transformers.pipeline("kv-compression", model=model, tokenizer=tokenizer, do_sample=True, seed=3,
                                   max_new_tokens=8)
    runs = {seeded(context, question="what jumps?")["answer"] for _ in range(2)}
    assert len(runs) == 1  # seeded at build time
    torch.manual_seed(0)  # unseeded sampling draws from the global generator: fixed here so the test is repeatable
    unseeded = {seeded(context, question="what jumps?", seed=None)["answer"] for _ in range(6)}
    assert len(unseeded) > 1
    assert hf(context, question="what jumps?", max_new_tokens=None) == {"answer": compressed}  # None: not given
    for bad in (dict(temperature=True), dict(top_p=True), dict(max_new_tokens="6"), dict(batch_size=0)):
        with pytest.raises((TypeError, ValueError)):
            hf(context, question="what jumps?", **bad)
    with pytest.raises(ValueError, match="empty list of contexts"):  # was an IndexError inside transformers
        hf([], question="what jumps?")


def test_ls_shows_capabilities_of_presses_whose_capabilities_depend_on_their_fields(capsys):
    """KVzip and SimLayerKV wrap nothing; their capabilities come from their fields and must be shown (KVzip's
    extra passes mean it cannot share a recorded prefill)."""
    assert cli.main(["ls", "--json"]) in (0, None)
    listing = json.loads(capsys.readouterr().out)
    rows = {row["name"]: row for row in (listing["presses"] if isinstance(listing, dict) else listing)}
    assert rows["kvzip"]["capabilities"]["extra_passes"] is True and rows["kvzip"]["capabilities"]["headwise"] is True
    assert rows["simlayerkv"]["capabilities"]["uniform_layers"] is False
    assert rows["composed"]["capabilities"] is None  # no default inner presses: nothing to show
    assert rows["kvzip"]["summary"].endswith("across layers and heads.")  # the first paragraph, not its first line


def test_model_option_lets_the_cli_compress_a_model_whose_every_layer_slides(tmp_path, capsys, single_thread):
    """A saved model with a sliding window on every layer (as Mistral-7B-v0.1) has nothing kvsqueeze compresses:
    the CLI says so and names the flag; with ``--model-option sliding_window=None`` it runs with full attention and
    halves the measured cache."""
    folder = tmp_path / "tiny-mistral"
    build_model("mistral", sliding_window=16).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    context = tmp_path / "context.txt"
    context.write_text("the quick brown fox jumps over the lazy dog", encoding="utf-8")
    argv = ["run", "--model", str(folder), "--press", "knorm", "--ratio", "0.5", "--context", str(context),
            "--question", "what jumps?", "--max-new-tokens", "3", "--json"]

    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "no full-attention layer" in err and "--model-option sliding_window=None" in err

    assert cli.main(argv + ["--model-option", "sliding_window=None"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model_options"] == {"sliding_window": None}
    n = result["context_tokens"]
    assert result["cache_bytes_after"] * n == result["cache_bytes_before"] * (n // 2)  # every layer keeps n // 2

    # The override is part of a sweep's results key (it changes every prediction); without one the key is as before.
    from kvsqueeze.evaluation.sweep import model_key
    from kvsqueeze.models import load_model

    assert model_key(load_model(str(folder), sliding_window=None)[0], None)["config_overrides"] == {"sliding_window": None}
    assert "config_overrides" not in model_key(load_model(str(folder))[0], None)


def test_model_names_resolve_or_fail_clearly(tmp_path, monkeypatch):
    """Embedded short names and aliases resolve; a local path is used as given (``~`` expanded); a path-shaped
    name that does not exist is an error naming it, not a hub lookup; ``org/name`` is left for the hub."""
    from kvsqueeze.models import DEFAULT_MODEL, resolve_name

    assert resolve_name(None) == DEFAULT_MODEL
    assert resolve_name(str(tmp_path)) == str(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "my-model").mkdir()
    assert resolve_name("~/my-model") == str(tmp_path / "my-model")
    for missing in ("./no/such/dir", "../models/x", "/no/such/model", "~/absent", "models/llama/8b", "missing_dir/"):
        with pytest.raises(ValueError, match=f"model directory not found: '{re.escape(missing)}'"):
            resolve_name(missing)
    assert resolve_name("someone/some-model") == "someone/some-model"
    with pytest.raises(ValueError, match="Did you mean"):
        resolve_name("smolm2-135m")
    for missing in ("path/to/model.Q4_K_M.gguf", "models/model.gguf", "model.GGUF"):  # not a directory, nor a hub id
        with pytest.raises(ValueError, match=f"GGUF file not found: '{re.escape(missing)}'"):
            resolve_name(missing)
    (tmp_path / "models" / "tiny.gguf").mkdir(parents=True)  # a folder that happens to be named *.gguf
    assert resolve_name("~/models/tiny.gguf") == str(tmp_path / "models" / "tiny.gguf")


def test_an_unreachable_hub_fails_at_once_naming_the_model_or_uses_the_local_cache(monkeypatch, capsys):
    """A hub id with the hub unreachable used to retry for about a minute, then fail without naming the model.
    Now a TCP probe (here against a closed local port) decides: a model in the local Hugging Face cache loads from
    it (``local_files_only``), any other is an error naming the model before transformers is called."""
    import socket

    import huggingface_hub
    from huggingface_hub import constants

    from kvsqueeze import models as M

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens on it
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed}")
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    assert M._hub_unreachable().startswith(f"127.0.0.1:{closed} is unreachable")
    with socket.socket() as server:  # a listening endpoint is reachable
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert M._hub_unreachable() is None
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed}")

    calls = []

    def recorder(source, **kwargs):
        calls.append((source, kwargs))
        raise RuntimeError("stop here")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recorder)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, file, **kw: None)
    with pytest.raises(OSError, match=r"cannot load model 'someone/some-model' from the Hugging Face hub: "
                       rf"127\.0\.0\.1:{closed} is unreachable .* not in the local Hugging Face cache"):
        kvsqueeze.load_model("someone/some-model")
    assert calls == []
    assert cli.main(["run", "--model", "someone/some-model", "--press", "knorm", "--ratio", "0.5",
                     "--context", __file__, "--question", "q"]) == 2
    assert "error: cannot load model 'someone/some-model'" in capsys.readouterr().err

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, file, **kw: f"/cache/{repo}/{file}")
    with pytest.raises(RuntimeError, match="stop here"):
        kvsqueeze.load_model("someone/some-model")
    assert calls == [("someone/some-model", {"local_files_only": True})]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert M._hub_unreachable() == "HF_HUB_OFFLINE is set"


def test_missing_artifact_command_keeps_the_model_options(tmp_path, monkeypatch, capsys, single_thread):
    """A model loaded with config overrides is another model for calibration (another default artifact folder):
    the command in the missing-artifact error repeats them as --model-option, so running it writes the artifact
    the press then finds."""
    from kvsqueeze.calibration import default_artifact_path
    from kvsqueeze.models import load_model

    monkeypatch.setenv("KVSQUEEZE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny llama"  # a space: the command quotes the path
    build_model("llama").save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    model, _ = load_model(str(folder), max_position_embeddings=512, hidden_act="gelu")
    assert default_artifact_path(model, "qfilters") != default_artifact_path(load_model(str(folder))[0], "qfilters")
    press = kvsqueeze.make_press("qfilters", compression_ratio=0.5)
    with pytest.raises(FileNotFoundError, match="create it with: kvsqueeze calibrate") as missing:
        with press(model):
            pass
    command = str(missing.value).split("create it with: ", 1)[1]
    argv = shlex_split(command)
    assert argv[:3] == ["kvsqueeze", "calibrate", "--model"] and argv[3] == str(folder)
    assert "--model-option max_position_embeddings=512" in command and "--model-option hidden_act=gelu" in command

    assert cli.main(argv[1:] + ["--n-sequences", "2", "--seq-len", "48"]) == 0
    assert capsys.readouterr().out.strip() == str(default_artifact_path(model, "qfilters"))
    with press(model):  # found where the press looks
        pass


def test_calibrate_command_round_trips_option_values(tiny_model):
    from kvsqueeze.calibration import calibrate_command

    model = copy.copy(tiny_model("llama"))  # the shared model itself is never modified
    values = {"sliding_window": None, "rope_parameters": {"rope_type": "linear", "factor": 2.0}, "hidden_act": "relu",
              "note": "8", "eps": 1e-06}
    model._kvsqueeze_config_overrides = values
    argv = shlex_split(calibrate_command(model, "qfilters"))
    items = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--model-option"]
    assert cli.parse_model_options(items) == values


def test_run_prefills_in_chunks_under_decoding_and_refuses_a_press_that_compresses_once(tmp_path, capsys,
                                                                                         single_thread, monkeypatch):
    """``--prefill-chunk-size`` with ``--press decoding``: the cache ends at ⌊(1 − r)·n⌋ entries, the bytes before
    are those of the whole context, and the ratio is read off the cache (the report saw the first chunk only). With a press that compresses once it is one error
    line, before the model loads."""
    folder = tmp_path / "tiny-llama"
    build_model("llama").save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    context = tmp_path / "context.txt"
    context.write_text(" ".join(f"w{i % 7}" for i in range(20)), encoding="utf-8")
    base = ["run", "--model", str(folder), "--context", str(context), "--question", "which?", "--max-new-tokens",
            "3", "--prefill-chunk-size", "8", "--json"]

    argv = base + ["--press", "decoding", "--ratio", "0.5", "--press-option", "compression_interval=8"]
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    n = result["context_tokens"]
    assert result["prefill_chunk_size"] == 8 and n > 16
    assert result["cache_bytes_after"] * n == result["cache_bytes_before"] * (n // 2)  # n // 2 entries per layer
    assert result["measured_ratio"] == pytest.approx(1 - (n // 2) / n)

    import kvsqueeze.cli as C

    monkeypatch.setattr(C, "load_for", lambda *a, **k: pytest.fail("the model must not load"))
    assert cli.main(base + ["--press", "knorm", "--ratio", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "--prefill-chunk-size" in err and "KnormPress compresses once" in err and "'decoding'" in err
    assert cli.main(base[:-2] + ["0", "--json", "--press", "none"]) == 2
    assert "--prefill-chunk-size must be a positive integer, got 0" in capsys.readouterr().err
