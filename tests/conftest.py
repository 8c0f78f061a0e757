"""Tiny seeded models, a character-level tokenizer and calibration artifacts, all built offline inside the tests.

Six architectures cover what the adapter has to handle; every invariant test runs on each:

* ``llama``   — LlamaForCausalLM with GQA (4 query heads, 2 KV heads), every layer full attention;
* ``gemma3``  — Gemma3ForCausalLM hybrid: sliding-window layers (window 8) around one full-attention layer;
* ``qwen3``   — Qwen3ForCausalLM with QK-norm (``q_norm``/``k_norm`` before RoPE);
* ``mistral`` — MistralForCausalLM with ``sliding_window=None`` (with a window every layer is sliding, which
  ``test_architectures.py`` checks is refused);
* ``qwen2``   — Qwen2ForCausalLM: biases on the query, key and value projections;
* ``phi3``    — Phi3ForCausalLM: one fused ``qkv_proj``, partial rotary (half of each head rotated), and a
  sliding window longer than the maximum context (as Phi-3-mini-128k): the cache holds sliding-window layers that
  never slide, which the adapter treats as full attention.

Each is built from a fixed seed in milliseconds; the ``eager`` variant has the same weights (same seed), for presses
whose capabilities say ``needs_attention_weights``. Models are session-scoped and shared: tests must never modify
their weights or configs (presses only add hooks, which the press tests check are removed).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

SEED = 1234
VOCAB_SIZE = 128
MAX_POSITIONS = 256
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

# Small but not degenerate: initializer_range 0.1 gives peaked attention and well-separated logits, so greedy
# decoding is not decided by float noise.
_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=MAX_POSITIONS,
    initializer_range=0.1,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
)


#: name -> (config class, model class, config fields beyond ``_COMMON``); see the module docstring.
_ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "head_dim": 16,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "sliding_window": 8,
    }),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"head_dim": 16, "sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"partial_rotary_factor": 0.5, "sliding_window": 2 * MAX_POSITIONS}),
}
MODEL_NAMES = tuple(_ARCHITECTURES)


def build_model(name: str, attn_implementation: str = "sdpa", seed: int = SEED, **config_overrides):
    """A tiny random causal LM of architecture ``name`` (see module docstring), in eval mode, float32, CPU.

    ``config_overrides`` replace config fields (e.g. ``sliding_window=16``); the weights depend on the seed and
    the shapes only, so a variant with the same shapes has the same weights.
    """
    import transformers

    if name not in _ARCHITECTURES:
        raise ValueError(f"unknown tiny model {name!r}; known: {MODEL_NAMES}")
    config_name, model_name, defaults = _ARCHITECTURES[name]
    config_cls, model_cls = getattr(transformers, config_name), getattr(transformers, model_name)
    torch.manual_seed(seed)
    config = config_cls(**{**_COMMON, **defaults, **config_overrides}, attn_implementation=attn_implementation)
    model = model_cls(config).eval()
    model.name_or_path = f"tiny-{name}"
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.bos_token_id = BOS_ID
    assert model.config._attn_implementation == attn_implementation
    return model


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for the tiny models: their ops are far too small to split, and on a shared 2-core
    machine a second thread makes every forward ~10x slower. The previous setting is restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_model() -> Callable[..., torch.nn.Module]:
    """``tiny_model(name, attn="sdpa")``: the shared tiny model (built once per session and variant)."""
    models: dict[tuple[str, str], torch.nn.Module] = {}

    def get(name: str, attn: str = "sdpa") -> torch.nn.Module:
        key = (name, attn)
        if key not in models:
            models[key] = build_model(name, attn)
        return models[key]

    return get


@pytest.fixture(scope="session")
def model_for(tiny_model) -> Callable:
    """``model_for(name, press)``: the eager variant when the press needs attention weights, else sdpa."""

    def get(name: str, press) -> torch.nn.Module:
        attn = "eager" if press is not None and press.capabilities.needs_attention_weights else "sdpa"
        return tiny_model(name, attn)

    return get


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer: printable ASCII + newline, one token per character, BOS prepended, EOS id 2.
# ----------------------------------------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Bot:{% endif %}"
)


def build_tokenizer(chat_template: str | None = None):
    """A character-level ``PreTrainedTokenizerFast`` built in code (no files, no network)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    assert len(vocab) <= VOCAB_SIZE and vocab["<s>"] == BOS_ID and vocab["</s>"] == EOS_ID
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char, \n included
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    """Character-level tokenizer without a chat template (the pipeline uses plain text)."""
    return build_tokenizer()


@pytest.fixture(scope="session")
def chat_tokenizer():
    """The same tokenizer with a small jinja chat template (``<s>User: …\\nBot:``)."""
    return build_tokenizer(CHAT_TEMPLATE)


def token_ids(seq_len: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """Seeded random token ids ``(batch, seq_len)``: BOS, then distinct non-special tokens while the vocabulary
    allows (so that even layer-0 values, which depend on the token only, identify their position)."""
    gen = torch.Generator().manual_seed(seed)
    n_regular = VOCAB_SIZE - (UNK_ID + 1)
    rows = []
    for _ in range(batch):
        if seq_len - 1 <= n_regular:
            body = torch.randperm(n_regular, generator=gen)[: seq_len - 1] + UNK_ID + 1
        else:
            body = torch.randint(UNK_ID + 1, VOCAB_SIZE, (seq_len - 1,), generator=gen)
        rows.append(torch.cat([torch.tensor([BOS_ID]), body]))
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------------------------
# Calibration artifacts (qfilters, expected_attention_stats, ...) computed on the tiny models.
# ----------------------------------------------------------------------------------------------------------------


def prefill(model, ids: torch.Tensor, press=None):
    """Prefill ``ids`` into a fresh cache (with ``press`` active); returns ``(cache, report, last logits)``."""
    from kvsqueeze.adapter import ModelAdapter

    adapter = ModelAdapter(model)
    cache = adapter.new_cache()
    report = None
    with torch.inference_mode():
        if press is None:
            out = model(input_ids=ids, use_cache=True, **adapter.model_call_kwargs(cache))
        else:
            with press(model) as report:
                out = model(input_ids=ids, use_cache=True, **adapter.model_call_kwargs(cache))
    return cache, report, out.logits[:, -1]


#: The streaming window of the tiny models' DuoAttention gates (``n_sink``, ``n_recent``): the window the press
#: tests use, since a press refuses gates trained for another window unless told ``allow_window_mismatch=True``.
DUO_WINDOW = (2, 8)


def _calibrate(model, method: str, output: Path):
    """Run ``kvsqueeze.calibration.calibrate`` on seeded random batches into ``output`` (DuoAttention gates for the
    window :data:`DUO_WINDOW`)."""
    from kvsqueeze.calibration import calibrate

    batches = [token_ids(96, seed=100 + i) for i in range(4)]
    options = {"duo_sink": DUO_WINDOW[0], "n_recent": DUO_WINDOW[1]} if method == "duo_attention" else {}
    result = calibrate(model, None, method, input_ids_batches=batches, output=output, progress=False, **options)
    path = Path(result)
    assert path == Path(output), f"calibrate wrote to {result!r}, not to output={output}"
    assert path.is_file(), f"calibrate(..., {method!r}) wrote no artifact at {output} (returned {result!r})"
    return path


@pytest.fixture(scope="session")
def calibration_artifact(tiny_model, tmp_path_factory) -> Callable[[str, str], Path]:
    """``calibration_artifact(model_name, method)``: path of the artifact for that tiny model (computed once).

    Artifacts identify the model by its architecture and weights, not its attention implementation, so the sdpa
    model's artifact also serves the eager variant.
    """
    root = tmp_path_factory.mktemp("calibration")
    paths: dict[tuple[str, str], Path] = {}

    def get(name: str, method: str) -> Path:
        key = (name, method)
        if key not in paths:
            paths[key] = _calibrate(tiny_model(name, "sdpa"), method, root / name / f"{method}.safetensors")
        return paths[key]

    return get


# ----------------------------------------------------------------------------------------------------------------
# Hook accounting
# ----------------------------------------------------------------------------------------------------------------


def hook_counts(model: torch.nn.Module) -> dict[str, int]:
    """Number of forward hooks, forward pre-hooks and kwargs-hook registrations over every module of ``model``, and
    whether ``generate`` is shadowed on the instance (a press's generate guard)."""
    counts = {"forward": 0, "forward_pre": 0, "with_kwargs": 0, "generate_shadowed": int("generate" in model.__dict__)}
    for module in model.modules():
        counts["forward"] += len(module._forward_hooks)
        counts["forward_pre"] += len(module._forward_pre_hooks)
        counts["with_kwargs"] += len(module._forward_hooks_with_kwargs) + len(module._forward_pre_hooks_with_kwargs)
    return counts


# ----------------------------------------------------------------------------------------------------------------
# The Hugging Face hub, made unreachable or missing for the dataset loaders.
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def unreachable_hub(monkeypatch):
    """The hub answers no probe, and no environment variable short-cuts the check."""
    from kvsqueeze.evaluation import hub

    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=0: False)
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def no_datasets_package(monkeypatch):
    """``import datasets`` fails as if the package were not installed."""
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)


# ----------------------------------------------------------------------------------------------------------------
# The default real model (tests marked real_model), loaded once per session and never modified.
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm():
    """``(model, tokenizer)`` of the embedded default model, SmolLM2-135M-Instruct."""
    import kvsqueeze

    return kvsqueeze.load_model()


@pytest.fixture(scope="session")
def smollm_duo_artifact(smollm, tmp_path_factory) -> Path:
    """DuoAttention gates for the default model from a 3-step calibration on 512-token passkey samples, kept out
    of the default location (the full run takes ~10 CPU minutes). The gates' ranking is rough, but the press
    runs, budgets and frees memory exactly as with calibrated gates."""
    from kvsqueeze.calibration import calibrate

    model, tokenizer = smollm
    path = tmp_path_factory.mktemp("duo") / "duo_attention.safetensors"
    return calibrate(model, tokenizer, "duo_attention", seq_len=512, steps=3, progress=False, output=path)


class ForwardCounter:
    """Counts the forward passes of ``model``'s decoder layers while the ``with`` block runs."""

    def __init__(self, model):
        self.layer, self.calls = model.model.layers[0], 0

    def __enter__(self):
        self.handle = self.layer.register_forward_pre_hook(lambda *a: setattr(self, "calls", self.calls + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()
