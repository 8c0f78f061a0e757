"""Bad input is refused early, with a message naming the value, before any expensive work: the CLI (demo, eval,
calibrate, run), ``calibrate()`` and ``load_model()``.

Each test makes the expensive step it must come before fail loudly (a forward pass, building samples, recording a
prefill, loading weights), so a check that comes too late fails the test instead of passing by accident.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import kvsqueeze
from conftest import MAX_POSITIONS, VOCAB_SIZE, build_model, build_tokenizer, token_ids
from kvsqueeze import cli
from kvsqueeze.calibration import calibrate

pytestmark = pytest.mark.usefixtures("single_thread")


class TooLate(AssertionError):
    """Raised by the expensive step a check must come before."""


def _too_late(*args, **kwargs):
    raise TooLate("the expensive step ran before the input was checked")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny Llama (``MAX_POSITIONS`` positions, ``VOCAB_SIZE`` tokens) with its tokenizer."""
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    build_model("llama").save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def _cli_error(argv: list[str], capsys) -> str:
    """The one ``error: ...`` line of a CLI run that must exit with status 2."""
    try:
        code = cli.main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err and err[-1].startswith("error: "), err
    return err[-1]


# ----------------------------------------------------------------------------------------------------------------
# demo: the press is validated before the recorded prefill
# ----------------------------------------------------------------------------------------------------------------


def test_demo_validates_the_press_before_recording(model_dir, tmp_path, monkeypatch, capsys):
    """A calibration press without its artifact is refused right after loading, as run and eval do; it used to
    fail only after a full recorded prefill and the ratio-0 answer."""
    from kvsqueeze.pipeline import Pipeline

    monkeypatch.setenv("KVSQUEEZE_CACHE", str(tmp_path / "cache"))  # no artifact there
    monkeypatch.setattr(cli, "demo_text", lambda: "the access code is 4738215. " * 3)
    monkeypatch.setattr(Pipeline, "record", _too_late)
    monkeypatch.setattr(Pipeline, "compress", _too_late)
    error = _cli_error(["demo", "--model", str(model_dir), "--press", "qfilters"], capsys)
    assert "no qfilters calibration artifact" in error and "create it with: kvsqueeze calibrate" in error


@pytest.mark.parametrize("command", ["run", "demo"])
def test_run_and_demo_refuse_an_answer_that_cannot_fit_before_the_prefill(command, model_dir, tmp_path,
                                                                          monkeypatch, capsys):
    """A question and answer budget that cannot fit after the context used to be refused after a full prefill."""
    from kvsqueeze.pipeline import Pipeline

    context = tmp_path / "context.txt"
    context.write_text("the access code is 4738215. " * 3)
    monkeypatch.setattr(cli, "demo_text", lambda: context.read_text())
    monkeypatch.setattr(Pipeline, "record", _too_late)
    monkeypatch.setattr(Pipeline, "compress", _too_late)
    argv = {"run": ["run", "--press", "knorm", "--ratio", "0.5", "--context", str(context), "--question", "code?"],
            "demo": ["demo", "--press", "knorm", "--ratios", "0,0.5"]}[command]
    error = _cli_error([*argv, "--model", str(model_dir), "--max-new-tokens", "250"], capsys)
    assert "+ max_new_tokens (250) tokens exceed the model's maximum of 256" in error


def test_cli_load_failures_are_one_error_line(model_dir, tmp_path, capsys):
    """A damaged weights file, or a config option the model cannot be built with, used to print a traceback
    (status 1); now one line naming the model and the option (status 2)."""
    import shutil

    context = tmp_path / "context.txt"
    context.write_text("the quick brown fox")
    damaged = tmp_path / "damaged"
    shutil.copytree(model_dir, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    argv = ["run", "--press", "knorm", "--ratio", "0.5", "--context", str(context), "--question", "q"]
    error = _cli_error([*argv, "--model", str(damaged)], capsys)
    assert error.startswith(f"error: cannot load model {str(damaged)!r}: ")
    error = _cli_error([*argv, "--model", str(model_dir), "--model-option", "hidden_act=no_such_act"], capsys)
    assert error.startswith(f"error: cannot load model {str(model_dir)!r} with --model-option hidden_act='no_such_act'")
    assert "no_such_act" in error.split("hidden_act=")[-1]


def test_run_takes_a_budget_instead_of_a_ratio(model_dir, tmp_path, capsys):
    context = tmp_path / "context.txt"
    context.write_text("the access code is 4738215. " * 3)
    argv = ["run", "--model", str(model_dir), "--press", "knorm", "--context", str(context), "--question", "code?",
            "--max-new-tokens", "2", "--json"]
    assert cli.main([*argv, "--press-option", "budget=10"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["press"]["budget"] == 10 and out["measured_ratio"] > 0
    error = _cli_error(argv, capsys)
    assert "--ratio is required with --press knorm" in error and "--press-option budget=N" in error


# ----------------------------------------------------------------------------------------------------------------
# eval: benchmark lengths beyond the model's maximum, before any sample is built
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_samples(monkeypatch):
    """Building benchmark samples fails loudly (it takes minutes for long lengths)."""
    from kvsqueeze.evaluation.niah import NeedleInAHaystack
    from kvsqueeze.evaluation.ruler import Ruler

    monkeypatch.setattr(NeedleInAHaystack, "samples", _too_late)
    monkeypatch.setattr(Ruler, "samples", _too_late)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--benchmark", "niah", "--lengths", "100000"], "--lengths 100000 cannot fit"),
        (["--benchmark", "ruler", "--tasks", "niah_single_1", "--length", "100000"], "--length 100000 cannot fit"),
        # The shortest sample of 261 tokens holds ceil(0.98 * 261) = 256: no room for one answer token.
        (["--benchmark", "niah", "--lengths", "261"], "--lengths 261 cannot fit"),
        (["--benchmark", "niah", "--lengths", "261"], "No length above 260 can fit"),  # ceil(0.98 * 260) = 255
        (["--benchmark", "niah", "--lengths", "1000,100000"], "--lengths 1000,100000 cannot fit"),
        # ceil(0.98 * 254) = 249 tokens leave room for 1 answer token, not for 8.
        (["--benchmark", "niah", "--lengths", "254", "--max-new-tokens", "8"], "no room for 8 answer token(s)"),
        (["--benchmark", "niah", "--lengths", "254", "--max-new-tokens", "8"],
         "No length above 253 can fit"),
        (["--benchmark", "niah", "--lengths", "254", "--max-new-tokens", "8"], "shorter lengths or a smaller --max-new"),  # ceil(0.98 * 253) = 248
    ],
)
def test_eval_refuses_lengths_beyond_the_model_maximum_before_building_samples(
    options, message, model_dir, tmp_path, no_samples, capsys
):
    argv = ["eval", "--model", str(model_dir), "--presses", "knorm", "--ratios", "0.5", "--limit", "1",
            "--output-dir", str(tmp_path / "results"), *options]
    error = _cli_error(argv, capsys)
    assert message in error and f"maximum of {MAX_POSITIONS} positions" in error, error


@pytest.mark.parametrize("options", [["--lengths", "260"], ["--lengths", "254"], ["--lengths", "250",
                                                                                  "--max-new-tokens", "8"]])
def test_eval_length_check_refuses_nothing_that_could_fit(options, model_dir, tmp_path, no_samples):
    """A length whose samples may land 2% short of it (ceil(0.98 * 260) = 255 tokens) can leave room for an
    answer: it goes on to the samples, where the pipeline decides per sample."""
    argv = ["eval", "--model", str(model_dir), "--benchmark", "niah", "--presses", "knorm", "--ratios", "0.5",
            "--limit", "1", "--output-dir", str(tmp_path / "results"), *options]
    with pytest.raises(TooLate):
        cli.main(argv)


# ----------------------------------------------------------------------------------------------------------------
# calibrate(): output, lengths, token ids and progress before any forward pass
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def guarded_model(monkeypatch):
    """A fresh tiny Llama whose forward fails loudly (the checks must come before any forward pass)."""
    model = build_model("llama")
    monkeypatch.setattr(model, "forward", _too_late)
    return model


def _unwritable_cases(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    return [
        (str(tmp_path), ValueError, "is a directory"),
        ("", ValueError, r"output is empty \(''\)"),
        (123, TypeError, "output must be a file path .* got 123"),
        (blocker / "q.safetensors", ValueError, r"cannot be written: '.*a-file' is not a directory"),
        ("/proc/no-such-folder/q.safetensors", ValueError, r"'/proc/no-such-folder' cannot be created in '/proc'"),
    ]


def test_calibrate_checks_output_before_any_forward(guarded_model, tmp_path):
    for output, error, message in _unwritable_cases(tmp_path):
        with pytest.raises(error, match=message):
            calibrate(guarded_model, None, "qfilters", input_ids_batches=[token_ids(32)], output=output,
                      progress=False)
    # A missing folder that can be created is fine (save_artifact creates it); the probe leaves nothing behind.
    from kvsqueeze.calibration import check_output_path

    target = tmp_path / "new" / "deeper" / "q.safetensors"
    assert check_output_path(target) == target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_eval_with_chunks_refuses_a_press_that_compresses_once_before_loading_the_model(tmp_path, monkeypatch,
                                                                                        capsys):
    from kvsqueeze import models

    monkeypatch.setattr(models, "load_model", _too_late)
    argv = ["eval", "--benchmark", "niah", "--presses", "knorm", "--ratios", "0.5", "--prefill-chunk-size", "8",
            "--output-dir", str(tmp_path)]
    error = _cli_error(argv, capsys)
    assert "--presses knorm with --prefill-chunk-size: KnormPress compresses once" in error
    error = _cli_error(argv[:-3] + ["0", "--output-dir", str(tmp_path)], capsys)
    assert "--prefill-chunk-size must be a positive integer, got 0" in error


def test_calibrate_command_checks_output_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from kvsqueeze import models

    monkeypatch.setattr(models, "load_model", _too_late)
    error = _cli_error(["calibrate", "--method", "qfilters", "--output", str(tmp_path)], capsys)
    assert f"--output: output={str(tmp_path)!r} is a directory" in error
    error = _cli_error(["calibrate", "--method", "qfilters", "--output", ""], capsys)
    assert "output is empty" in error
    # lengths no model can use: named by their flags, before the model loads (they used to come from calibrate())
    error = _cli_error(["calibrate", "--method", "qfilters", "--seq-len", "1"], capsys)
    assert "--seq-len must be at least 2 tokens, got 1" in error
    error = _cli_error(["calibrate", "--method", "duo_attention", "--seq-len", "80"], capsys)
    assert "--seq-len 80 must exceed the streaming window --duo-sink + --n-recent = 16 + 64" in error
    error = _cli_error(["calibrate", "--method", "duo_attention", "--seq-len", "40", "--n-recent", "30"], capsys)
    assert "= 16 + 30" in error


@pytest.mark.parametrize(
    "method, kwargs, message",
    [
        ("qfilters", dict(texts=["hello world " * 200], seq_len=2000, n_sequences=1), r"seq_len=2000 exceeds"),
        ("qfilters", dict(input_ids_batches=[token_ids(1000)]), r"input_ids_batches\[0\] has 1000 tokens"),
        ("expected_attention_stats", dict(input_ids_batches=[token_ids(32), token_ids(MAX_POSITIONS + 1)]),
         rf"input_ids_batches\[1\] has {MAX_POSITIONS + 1} tokens"),
        ("duo_attention", dict(texts=["hello world " * 200], seq_len=2000, steps=1), r"seq_len=2000 exceeds"),
        ("duo_attention", dict(input_ids_batches=[token_ids(300)], steps=1), r"input_ids_batches\[0\] has 300"),
    ],
)
def test_calibrate_refuses_sequences_beyond_the_model_maximum(method, kwargs, message, guarded_model, tmp_path):
    tokenizer = build_tokenizer() if "texts" in kwargs else None
    with pytest.raises(ValueError, match=rf"{message}.*maximum of {MAX_POSITIONS} positions"):
        calibrate(guarded_model, tokenizer, method, output=tmp_path / "a.safetensors", progress=False, **kwargs)
    assert not (tmp_path / "a.safetensors").exists()


def test_calibrate_accepts_sequences_of_exactly_the_model_maximum(tiny_model, tmp_path):
    path = calibrate(tiny_model("llama"), None, "qfilters", input_ids_batches=[token_ids(MAX_POSITIONS)],
                     output=tmp_path / "q.safetensors", progress=False, n_samples=64)
    assert path.is_file()


@pytest.mark.parametrize("bad_id", [5000, VOCAB_SIZE, -1])
def test_calibrate_refuses_token_ids_outside_the_vocabulary(bad_id, guarded_model, tmp_path):
    ids = token_ids(16)
    ids[0, 5] = bad_id
    for method in ("qfilters", "duo_attention"):
        with pytest.raises(ValueError, match=rf"input_ids_batches\[1\] holds token id {bad_id}, outside the "
                                             rf"model's vocabulary of {VOCAB_SIZE} tokens \[0, {VOCAB_SIZE}\)"):
            calibrate(guarded_model, None, method, input_ids_batches=[token_ids(16), ids],
                      output=tmp_path / "a.safetensors", progress=False)


def test_calibrate_progress_must_be_a_bool(guarded_model, tmp_path):
    with pytest.raises(TypeError, match="progress must be a bool, got 'no'"):
        calibrate(guarded_model, None, "qfilters", input_ids_batches=[token_ids(16)],
                  output=tmp_path / "a.safetensors", progress="no")


def test_calibrate_command_refuses_a_default_seq_len_beyond_the_model_maximum(model_dir, tmp_path, capsys):
    argv = ["calibrate", "--model", str(model_dir), "--method", "qfilters", "--output", str(tmp_path / "q.st")]
    error = _cli_error(argv, capsys)
    assert f"--seq-len 2048 (the default) exceeds the model's maximum of {MAX_POSITIONS} positions" in error


# ----------------------------------------------------------------------------------------------------------------
# load_model(): device and folder before the weights load; overrides that do not fit the weights
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device, error, message",
    [
        pytest.param("cuda", ValueError, r"device='cuda' is not available: torch.cuda.is_available\(\) is False",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
        pytest.param(0, ValueError, r"device=0 is not a usable torch device",
                     marks=pytest.mark.skipif(torch.accelerator.is_available(), reason="an accelerator is here")),
        ("gpu", ValueError, r"device='gpu' is not a usable torch device"),
        ("meta", ValueError, r"device='meta' holds no weights"),
        (torch.device("meta"), ValueError, r"holds no weights"),
        (True, TypeError, r"device must be .* got True"),
        (1.5, TypeError, r"device must be .* got 1.5"),
    ],
)
def test_load_model_checks_the_device_before_loading(device, error, message, model_dir, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _too_late)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", _too_late)
    with pytest.raises(error, match=message):
        kvsqueeze.load_model(str(model_dir), device=device)


def test_accelerator_devices_are_checked_against_the_machine(monkeypatch):
    """With one CUDA device (simulated: this may be a CPU-only torch), 'cuda' and 'cuda:0' pass and 'cuda:1' is
    refused naming the count; without CUDA every 'cuda' device is refused."""
    from kvsqueeze.models import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert check_device("cuda") == torch.device("cuda") and check_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"device='cuda:1' does not exist: this machine has 1 cuda device\(s\)"):
        check_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device='cuda:0' is not available"):
        check_device("cuda:0")


def test_load_model_still_takes_cpu_devices(model_dir):
    model, _ = kvsqueeze.load_model(str(model_dir), device=torch.device("cpu"))
    assert next(model.parameters()).device.type == "cpu"


def test_load_model_refuses_a_folder_without_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("no model here")
    with pytest.raises(ValueError, match=rf"no model found in directory '{re.escape(str(tmp_path))}': it has no "
                                         r"config\.json"):
        kvsqueeze.load_model(str(tmp_path))
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"it holds weights.gguf: give the GGUF file's path instead"):
        kvsqueeze.load_model(str(tmp_path))


def test_model_options_that_do_not_fit_the_weights_are_one_error_line(model_dir, tmp_path, capsys):
    context = tmp_path / "context.txt"
    context.write_text("the quick brown fox", encoding="utf-8")
    argv = ["run", "--model", str(model_dir), "--press", "knorm", "--ratio", "0.5", "--context", str(context),
            "--question", "q"]
    error = _cli_error(argv + ["--model-option", "num_attention_heads=7"], capsys)
    assert "--model-option num_attention_heads=7 does not match the weights of" in error
    error = _cli_error(argv + ["--model-option", "vocab_size=10", "--model-option", "hidden_act=gelu"], capsys)
    assert "--model-option vocab_size=10 --model-option hidden_act='gelu' do not match the weights" in error
    from kvsqueeze.models import ConfigMismatchError  # load_model's own error, a ValueError naming the overrides

    with pytest.raises(ConfigMismatchError, match=r"config overrides num_attention_heads=7 do not match") as info:
        kvsqueeze.load_model(str(model_dir), num_attention_heads=7)
    assert info.value.overrides == {"num_attention_heads": 7}


# ----------------------------------------------------------------------------------------------------------------
# Wrapper presses on the command line
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--press", "key_rerotation", "--ratio", "0.5"],
         "press 'key_rerotation' wraps another press, which the command line cannot build; build it in Python "
         "(make_press('key_rerotation', press=make_press(...)))"),
        (["run", "--press", "per_layer", "--ratio", "0.5"], "press 'per_layer' wraps another press"),
        (["run", "--press", "composed", "--ratio", "0.5"],
         "press 'composed' wraps another press, which the command line cannot build; build it in Python "
         "(make_press('composed', presses=[make_press(...), ...]))"),
        (["run", "--press", "composed"], "press 'composed' wraps another press"),  # the same with or without --ratio
        (["run", "--press", "adakv", "--ratio", "0.5", "--press-option", "press=knorm"],
         "--press-option press='knorm': press 'adakv' wraps another press, which the command line cannot build "
         "from a name; build it in Python (make_press('adakv', press=make_press(...)))"),
        (["demo", "--press", "per_layer", "--ratios", "0"], "press 'per_layer' wraps another press"),
        (["eval", "--benchmark", "niah", "--presses", "knorm,key_rerotation"],
         "press 'key_rerotation' wraps another press"),
        (["eval", "--benchmark", "niah", "--presses", "criticalkv", "--press-option", "criticalkv.press=snapkv"],
         "--press-option criticalkv.press='snapkv': press 'criticalkv' wraps another press"),
    ],
)
def test_wrapper_presses_the_cli_cannot_build_are_refused_clearly(argv, message, tmp_path, capsys, monkeypatch):
    from kvsqueeze import models

    monkeypatch.setattr(models, "load_model", _too_late)
    context = tmp_path / "context.txt"
    context.write_text("the quick brown fox", encoding="utf-8")
    if argv[0] == "run":
        argv = argv + ["--context", str(context), "--question", "q"]
    assert message in _cli_error(argv, capsys)


def test_cli_help_names_the_wrappers_without_a_default_inner_press(capsys):
    from kvsqueeze.presses import list_presses

    without_default = {name for name in list_presses() if any(cli.wrapped_press_fields(name).values())}
    assert without_default == set(cli.WRAPPERS_WITHOUT_DEFAULT)
    with_default = {name for name in list_presses() if cli.wrapped_press_fields(name)} - without_default
    assert with_default == {"adakv", "criticalkv", "critical_adakv", "decoding"}
    assert all(name in cli.WRAPPER_HELP for name in without_default | with_default)
    for command in ("run", "demo", "eval"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert " ".join(cli.WRAPPER_HELP.split()) in " ".join(capsys.readouterr().out.split())


def test_wrapper_presses_with_a_default_inner_press_still_run_from_the_cli(model_dir, tmp_path, capsys):
    context = tmp_path / "context.txt"
    context.write_text("the quick brown fox jumps over the lazy dog", encoding="utf-8")
    argv = ["run", "--model", str(model_dir), "--press", "adakv", "--ratio", "0.5", "--context", str(context),
            "--question", "what jumps?", "--max-new-tokens", "2", "--json"]
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["press"]["type"] == "adakv" and result["press"]["press"]["type"] == "expected_attention"
