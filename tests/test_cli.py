"""The command line and the transformers ``"kv-compression"`` pipeline task."""

from __future__ import annotations

import json

import pytest
import transformers

import kvsqueeze
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


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--press", "knrom", "--ratio", "0.5", "--context", "README.md", "--question", "q"], "knorm"),
        (["run", "--press", "knorm", "--ratio", "1.5", "--context", "README.md", "--question", "q"], "1.5"),
        (["run", "--press", "knorm", "--ratio", "0.5", "--context", "missing.txt", "--question", "q"], "missing.txt"),
        (["calibrate", "--method", "qfilters", "--steps", "3"], "not used by --method qfilters: --steps"),
        (["calibrate", "--method", "duo_attention", "--n-sequences", "3"], "--n-sequences"),
        (["calibrate", "--method", "expected_attention_stats", "--n-samples", "3"], "--n-samples"),
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
