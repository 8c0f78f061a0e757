"""DuoAttention (arXiv 2410.10819): gate calibration, gated attention, the head plan and the press's budget."""

from __future__ import annotations

import random

import pytest
import torch

import kvsqueeze
from kvsqueeze import adapter as A
from kvsqueeze.calibration import calibrate, load_artifact
from kvsqueeze.calibration.duo_attention import duo_loss, given_sequence_sample, passkey_sample
from kvsqueeze.presses.base import kept_for_ratio

from conftest import DUO_WINDOW, MODEL_NAMES, build_tokenizer, hook_counts, prefill, token_ids

pytestmark = pytest.mark.usefixtures("single_thread")


def _press(calibration_artifact, model_name, **kwargs):
    """A press on the fixture's gates, with the window they were trained for unless told otherwise."""
    kwargs.setdefault("n_sink", DUO_WINDOW[0])
    kwargs.setdefault("n_recent", DUO_WINDOW[1])
    artifact = str(calibration_artifact(model_name, "duo_attention"))
    return kvsqueeze.make_press("duo_attention", artifact=artifact, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_calibration_writes_a_loadable_artifact(model_name, tiny_model, tmp_path):
    model = tiny_model(model_name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    path = calibrate(
        model, None, "duo_attention", input_ids_batches=[token_ids(64, seed=s) for s in range(2)],
        output=tmp_path / "duo.safetensors", progress=False, steps=3, n_recent=8, duo_sink=2, l1_weight=5.0,
    )
    artifact = load_artifact(path, model, "duo_attention")
    adapter = A.ModelAdapter(model)
    gates = artifact.tensors["gates"]
    assert gates.shape == (adapter.shape.num_layers, adapter.shape.num_key_value_heads)
    assert ((gates >= 0) & (gates <= 1)).all()
    full = adapter.compressible_layers
    others = [i for i in range(adapter.shape.num_layers) if i not in full]
    assert (gates[others] == 1).all(), "sliding-window layers are not gated"
    assert (gates[full] < 1).any(), "three Adam steps with a strong L1 term must lower some gates"
    assert artifact.settings["steps"] == 3 and artifact.settings["n_sink"] == 2 and artifact.settings["n_recent"] == 8
    assert artifact.identity["fingerprint"]
    # The model is left as it was: weights, requires_grad, eval mode, attention implementation.
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == grads[n]
    assert not model.training and model.config._attn_implementation == "sdpa"


def test_calibration_rejects_bad_options(tiny_model, tmp_path):
    model = tiny_model("llama")
    ids = [token_ids(32, seed=0)]
    with pytest.raises(ValueError, match=r"steps.*0"):
        calibrate(model, None, "duo_attention", input_ids_batches=ids, output=tmp_path / "a", steps=0)
    with pytest.raises(TypeError, match=r"lr.*'fast'"):
        calibrate(model, None, "duo_attention", input_ids_batches=ids, output=tmp_path / "a", lr="fast")
    with pytest.raises(TypeError, match="n_epochs"):
        calibrate(model, None, "duo_attention", input_ids_batches=ids, output=tmp_path / "a", n_epochs=3)
    with pytest.raises(TypeError, match="steps"):
        calibrate(model, None, "qfilters", input_ids_batches=ids, output=tmp_path / "a", steps=3)
    with pytest.raises(ValueError, match="tokenizer"):
        calibrate(model, None, "duo_attention", output=tmp_path / "a")
    # Options another method uses are refused, not ignored; so are non-finite numbers and a bare string of text.
    with pytest.raises(TypeError, match=r"n_sink not used by 'duo_attention'.*duo_sink"):
        calibrate(model, None, "duo_attention", input_ids_batches=ids, output=tmp_path / "a", n_sink=8)
    with pytest.raises(TypeError, match=r"n_samples not used by 'expected_attention_stats'"):
        calibrate(model, None, "expected_attention_stats", input_ids_batches=ids, output=tmp_path / "a", n_samples=9)
    with pytest.raises(ValueError, match=r"l1_weight must be finite, got nan"):
        calibrate(model, None, "duo_attention", input_ids_batches=ids, output=tmp_path / "a", l1_weight=float("nan"))
    with pytest.raises(TypeError, match=r"texts must be a list of strings, got str"):
        calibrate(model, build_tokenizer(), "duo_attention", texts="one essay", output=tmp_path / "a")
    with pytest.raises(TypeError, match=r"seed must be an int, got '0'"):
        calibrate(model, None, "duo_attention", input_ids_batches=ids, output=tmp_path / "a", seed="0")
    assert not (tmp_path / "a").exists()


def test_passkey_sample_layout():
    tok = build_tokenizer()
    hay = tok("lorem ipsum dolor sit amet " * 40, add_special_tokens=False).input_ids
    sample = passkey_sample(tok, hay, seq_len=400, n_passkeys=3, passkey_digits=5, rng=random.Random(0))
    ids = sample.input_ids[0]
    assert ids.shape == (400,) and ids[0] == tok.bos_token_id
    answer = tok.decode(ids[sample.answer_positions])
    assert len(sample.answer_positions) == 3 * 5 + 2 * 2 + 1  # " k1", ", k2", ", k3" in characters
    keys = [k for k in answer.replace(",", " ").split()]
    text = tok.decode(ids)
    assert len(keys) == 3 and all(f"The pass key is {k}." in text for k in keys)
    assert sample.answer_positions[-1] == 399
    with pytest.raises(ValueError, match="seq_len=40"):
        passkey_sample(tok, hay, seq_len=40, n_passkeys=3, passkey_digits=5, rng=random.Random(0))


# ----------------------------------------------------------------------------------------------------------------
# Gated attention
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_gradients_reach_every_gate(model_name, tiny_model):
    model = tiny_model(model_name)
    adapter = A.ModelAdapter(model)
    gates = torch.nn.Parameter(torch.full((adapter.shape.num_layers, adapter.shape.num_key_value_heads), 0.7))
    sample = given_sequence_sample(token_ids(64, seed=4))
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        loss, distill = duo_loss(model, sample, gates, n_sink=2, n_recent=4, l1_weight=0.0)
        loss.backward()
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(grads[n])
    assert distill > 0
    full = adapter.compressible_layers
    assert (gates.grad[full] != 0).all(), gates.grad
    others = [i for i in range(adapter.shape.num_layers) if i not in full]
    assert (gates.grad[others] == 0).all()
    assert model.config._attn_implementation == "sdpa"


def test_distillation_loss_is_the_mean_squared_distance(tiny_model):
    """The paper's "mean squared distance" (and its reference code): averaged over the hidden dimension and the
    answer positions. Summed over the hidden dimension it was ``hidden_size`` times larger, which made λ = 0.05 that
    much weaker than the paper's and left the gates near 1."""
    model = tiny_model("llama")
    adapter = A.ModelAdapter(model)
    gates = torch.full((adapter.shape.num_layers, adapter.shape.num_key_value_heads), 0.3)
    sample = given_sequence_sample(token_ids(64, seed=4))
    with torch.no_grad():
        loss, distill = duo_loss(model, sample, gates, n_sink=2, n_recent=4, l1_weight=0.05)

        def final_hidden():
            out = model(input_ids=sample.input_ids, use_cache=False, output_hidden_states=True)
            return out.hidden_states[-1][:, sample.answer_positions]

        reference = final_hidden()
        with A.gated_attention(model, gates, 2, 4):
            mixed = final_hidden()
    squared = (mixed - reference).pow(2)
    assert squared.shape[-1] == model.config.hidden_size and squared.shape[1] == len(sample.answer_positions) > 1
    torch.testing.assert_close(distill, squared.mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(loss, squared.mean() + 0.05 * gates.sum(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_gates_at_one_and_zero(model_name, tiny_model):
    """α = 1 reproduces the model and α = 0 with a window covering everything too; α = 0 with a short window
    changes the output (the exact streaming attention is checked in ``test_gated_attention_matches_masked_reference``)."""
    model = tiny_model(model_name)
    adapter = A.ModelAdapter(model)
    ids = token_ids(40, seed=6)
    shape = (adapter.shape.num_layers, adapter.shape.num_key_value_heads)
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=False).logits
        with A.gated_attention(model, torch.ones(shape), 2, 4):
            gated = model(input_ids=ids, use_cache=False).logits
        with A.gated_attention(model, torch.zeros(shape), 40, 1):  # sinks cover everything: full attention
            wide = model(input_ids=ids, use_cache=False).logits
        with A.gated_attention(model, torch.zeros(shape), 2, 4):
            streaming = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(gated, plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(wide, plain, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(streaming, plain, atol=1e-3)


def test_gated_attention_matches_masked_reference():
    torch.manual_seed(0)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for q_len, kv_len, n_sink, n_recent in [(300, 300, 4, 16), (7, 50, 2, 5), (1, 60, 0, 3)]:
        q, k, v = torch.randn(2, 6, q_len, 8), torch.randn(2, 3, kv_len, 8), torch.randn(2, 3, kv_len, 8)
        gates = torch.rand(3)
        out = A.gated_attention_forward(q, k, v, gates, n_sink, n_recent)
        causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
        window = causal.clone()  # written out here, not with A.streaming_visibility (which the function uses)
        for i in range(q_len):
            pos = kv_len - q_len + i
            for j in range(kv_len):
                window[i, j] &= j < n_sink or pos - j < n_recent
        full = sdpa(q, k, v, attn_mask=causal, enable_gqa=True)
        stream = sdpa(q, k, v, attn_mask=window, enable_gqa=True)
        want = stream + gates.repeat_interleave(2)[None, :, None, None] * (full - stream)
        torch.testing.assert_close(out, want.transpose(1, 2), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# The press
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.75, 0.95])
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_kept_counts_follow_head_plan_and_budget(model_name, ratio, tiny_model, calibration_artifact):
    model = tiny_model(model_name)
    adapter = A.ModelAdapter(model)
    seq_len = 61
    press = _press(calibration_artifact, model_name, compression_ratio=ratio)
    plan = press.head_plan(adapter, seq_len)
    ids = token_ids(seq_len, seed=7)
    base, _, _ = prefill(model, ids)
    cache, report, _ = prefill(model, ids, press)
    full = adapter.compressible_layers
    n_heads = len(full) * adapter.shape.num_key_value_heads
    kept = plan.kept(seq_len)
    # Exactly the uniform total.
    assert int(kept[full].sum()) == kept_for_ratio(seq_len, ratio) * n_heads
    # Streaming heads are those with the lowest gates.
    gates = press.gates(adapter)[full]
    streaming = plan.streaming[full]
    if streaming.any() and (~streaming).any():
        assert gates[streaming].max() <= gates[~streaming].min()
    for i in full:
        lengths = A.layer_head_lengths(cache, i)[0]
        assert lengths.tolist() == kept[i].tolist(), f"layer {i}"
        assert cache.layers[i].get_seq_length() == seq_len
        # The entries are the sinks and the recent window of streaming heads, everything for retrieval heads.
        keys, values = A.layer_kv(base, i)
        packed_k, packed_v, entry_lengths = A.layer_entries(cache, i)  # any layout, one segment per head (batch 1)
        key_segments = packed_k.split(entry_lengths.reshape(-1).tolist())
        value_segments = packed_v.split(entry_lengths.reshape(-1).tolist())
        for h in range(keys.shape[1]):
            n_s, n_r = int(plan.sinks[i, h]), int(plan.recent[i, h])
            want = list(range(seq_len)) if not plan.streaming[i, h] else [*range(n_s), *range(seq_len - n_r, seq_len)]
            assert torch.equal(value_segments[h], values[0, h, want]), f"layer {i} head {h}"
            assert torch.equal(key_segments[h], keys[0, h, want])
    assert report.measured_ratio == pytest.approx(1 - kept_for_ratio(seq_len, ratio) / seq_len)


def test_window_shrinks_when_all_streaming_exceeds_budget(tiny_model, calibration_artifact):
    model = tiny_model("llama")
    adapter = A.ModelAdapter(model)
    # The plan's arithmetic for a 4 + 16 window; the ranking of the gates (trained for DUO_WINDOW) does not matter.
    press = _press(calibration_artifact, "llama", compression_ratio=0.88, n_sink=4, n_recent=16,
                   allow_window_mismatch=True)
    assert press.n_kept(50) == 6
    plan = press.head_plan(adapter, 50)
    assert plan.streaming.all()
    assert int(plan.kept(50).sum()) == 6 * 6
    assert (plan.sinks == 4).all() and (plan.recent == 2).all()
    # A context shorter than the window: streaming cannot save anything, so every head shrinks.
    plan = press.head_plan(adapter, 12)
    assert press.n_kept(12) == 1 and (plan.kept(12) == 1).all() and (plan.sinks == 1).all()


def test_plan_is_deterministic_and_stateless(tiny_model, calibration_artifact):
    model = tiny_model("qwen3")
    adapter = A.ModelAdapter(model)
    press = _press(calibration_artifact, "qwen3", compression_ratio=0.5)
    before = dict(vars(press))
    a = press.head_plan(adapter, 80)
    prefill(model, token_ids(80, seed=8), press)
    b = press.head_plan(adapter, 80)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert vars(press) == before


@pytest.mark.parametrize("model_name", ["llama", "gemma3"])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_measured_bytes_follow_ratio(model_name, ratio, tiny_model, calibration_artifact):
    model = tiny_model(model_name)
    adapter = A.ModelAdapter(model)
    ids = token_ids(200, seed=9)
    press = _press(calibration_artifact, model_name, compression_ratio=ratio)
    base, _, _ = prefill(model, ids)
    cache, _, _ = prefill(model, ids, press)
    full = adapter.compressible_layers
    before = sum(A.layer_nbytes(base, i) for i in full)
    after = sum(A.layer_nbytes(cache, i) for i in full)
    assert after <= ((1 - ratio) + 0.02) * before, (after / before, ratio)
    # And the compressed cache still decodes.
    with torch.inference_mode(), press(model):
        out = model(input_ids=torch.tensor([[9]]), use_cache=True, **adapter.model_call_kwargs(cache))
    assert torch.isfinite(out.logits).all()


def test_missing_artifact_names_the_command(tiny_model, tmp_path):
    model = tiny_model("llama")
    press = kvsqueeze.make_press("duo_attention", compression_ratio=0.5, artifact=str(tmp_path / "none.safetensors"))
    with pytest.raises(FileNotFoundError, match="kvsqueeze calibrate .*--method duo_attention"):
        with press(model):
            pass


def test_foreign_artifact_is_refused(tiny_model, calibration_artifact):
    press = _press(calibration_artifact, "llama", compression_ratio=0.5)
    with pytest.raises(ValueError, match="another model"):
        with press(tiny_model("qwen3")):
            pass


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"n_sink": -1}, ValueError, r"n_sink.*-1"),
        ({"n_recent": "8"}, TypeError, r"n_recent.*'8'"),
        ({"n_sink": 0, "n_recent": 0}, ValueError, r"n_recent must be an int >= 1, got 0"),
        ({"n_sink": 16, "n_recent": 0}, ValueError, r"n_recent must be an int >= 1, got 0"),
        ({"artifact": 3}, TypeError, r"artifact.*3"),
        ({"allow_window_mismatch": "yes"}, TypeError, r"allow_window_mismatch must be a bool, got 'yes'"),
        ({"compression_ratio": 1.0}, ValueError, r"compression_ratio.*1\.0"),
    ],
)
def test_bad_fields(kwargs, error, match):
    with pytest.raises(error, match=match):
        kvsqueeze.make_press("duo_attention", **kwargs)


def test_press_refuses_gates_trained_for_another_window(tiny_model, calibration_artifact):
    """Gates rank heads for the streaming window they were trained with: another window is refused, naming both
    windows and the calibration for the press's window, unless the press is told to accept it."""
    model = tiny_model("llama")
    adapter = A.ModelAdapter(model)
    assert load_artifact(calibration_artifact("llama", "duo_attention"), model, "duo_attention").settings[
        "n_sink"] == DUO_WINDOW[0]
    other = _press(calibration_artifact, "llama", compression_ratio=0.5, n_sink=4, n_recent=16)
    message = (rf"trained with the streaming window n_sink={DUO_WINDOW[0]}, n_recent={DUO_WINDOW[1]}, but this press "
               r"streams n_sink=4, n_recent=16.*calibrate\(model, tokenizer, \"duo_attention\", duo_sink=4, "
               r"n_recent=16.*allow_window_mismatch=True")
    with pytest.raises(ValueError, match=message) as refused:
        other.head_plan(adapter, 50)
    assert "kvsqueeze calibrate" in str(refused.value) and "--duo-sink 4 --n-recent 16" in str(refused.value)
    hooks = hook_counts(model)
    with pytest.raises(ValueError, match=message):  # before the prefill, no hook left behind
        with other(model):
            pass
    assert hook_counts(model) == hooks
    # Opting out, or the trained window, runs.
    accepted = _press(calibration_artifact, "llama", compression_ratio=0.5, n_sink=4, n_recent=16,
                      allow_window_mismatch=True)
    assert int(accepted.head_plan(adapter, 50).kept(50)[adapter.compressible_layers].sum()) == 25 * 6
    prefill(model, token_ids(50, seed=3), _press(calibration_artifact, "llama", compression_ratio=0.5))


def test_calibration_refuses_sequences_within_the_streaming_window(tiny_model, tmp_path):
    """A streaming head that sees the whole sequence matches full attention: the loss is 0 and every gate ends
    where the L1 term alone puts it. Such sequences are refused, naming their lengths and the window."""
    model = tiny_model("llama")
    out = tmp_path / "duo.safetensors"
    with pytest.raises(ValueError, match=r"2 of the 3 given sequences .* n_sink \+ n_recent = 16 \+ 64 "
                                         r"\(#0: 60 tokens, #2: 80 tokens\)"):
        calibrate(model, None, "duo_attention", input_ids_batches=[token_ids(60), token_ids(81), token_ids(80)],
                  output=out, progress=False, steps=1)
    with pytest.raises(ValueError, match=r"seq_len=20 must exceed the streaming window n_sink \+ n_recent = 4 \+ 16"):
        calibrate(model, build_tokenizer(), "duo_attention", texts=["lorem ipsum " * 50], seq_len=20, duo_sink=4,
                  n_recent=16, output=out, progress=False, steps=1)
    # Passkey options do not apply to given sequences.
    with pytest.raises(TypeError, match=r"n_passkeys not used by 'duo_attention' calibration on input_ids_batches"):
        calibrate(model, None, "duo_attention", input_ids_batches=[token_ids(90)], n_passkeys=3, output=out,
                  progress=False, steps=1)
    assert not out.exists()


def test_calibration_records_the_settings_it_used(tiny_model, tmp_path):
    model = tiny_model("llama")
    path = calibrate(model, None, "duo_attention", input_ids_batches=[token_ids(40, batch=2), token_ids(24)],
                     output=tmp_path / "duo.safetensors", progress=False, steps=2, duo_sink=2, n_recent=8)
    settings = load_artifact(path, model, "duo_attention").settings
    assert settings["source"] == "input_ids"
    assert (settings["seq_len"], settings["min_seq_len"], settings["n_sequences"]) == (40, 24, 3)
    assert (settings["n_sink"], settings["n_recent"], settings["steps"]) == (2, 8, 2)
    assert "n_passkeys" not in settings and "passkey_digits" not in settings
    assert settings["final_distill_loss"] > 0
    # Passkey samples record their length and passkey options.
    tok = build_tokenizer()
    path = calibrate(model, tok, "duo_attention", texts=["lorem ipsum dolor sit amet " * 20], seq_len=256, steps=1,
                     duo_sink=2, n_recent=8, n_passkeys=2, passkey_digits=4, output=tmp_path / "p.safetensors",
                     progress=False)
    settings = load_artifact(path, model, "duo_attention").settings
    assert (settings["seq_len"], settings["n_passkeys"], settings["passkey_digits"]) == (256, 2, 4)
    assert settings["source"] == "passkeys in texts" and "min_seq_len" not in settings


@pytest.mark.real_model
def test_default_model_press_with_calibrated_gates(smollm, smollm_duo_artifact):
    """SmolLM2-135M with gates from a short calibration run (the budget and memory do not depend on how well the
    gates are trained): exact budget and real memory savings on ~600 tokens of essays."""
    from kvsqueeze.corpus import essays

    model, tokenizer = smollm
    artifact = smollm_duo_artifact
    text = essays()[0][:2400]
    pipe = kvsqueeze.Pipeline(model, tokenizer)
    press = kvsqueeze.make_press("duo_attention", compression_ratio=0.5, artifact=str(artifact))
    ctx = pipe.compress(text, press)
    assert ctx.report.measured_ratio == pytest.approx(1 - int(ctx.n_tokens * 0.5) / ctx.n_tokens)
    assert ctx.cache_bytes <= 0.52 * ctx.full_cache_bytes
    assert ctx.answer("What is this text about?", max_new_tokens=4)


def test_cli_calibrate_accepts_duo_options(capsys):
    from kvsqueeze.cli import build_parser, main

    args = build_parser().parse_args(["calibrate", "--method", "duo_attention", "--steps", "7", "--seq-len", "512"])
    assert (args.method, args.steps, args.seq_len) == ("duo_attention", 7, 512)
    assert main(["calibrate", "--method", "duo_attention", "--steps", "0"]) == 2  # refused before loading a model
    assert "--steps must be a positive integer, got 0" in capsys.readouterr().err
