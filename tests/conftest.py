"""Shared fixtures: everything offline, tiny Llama models built from configs, synthetic data."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from dem_hf import logging as dem_hf_logging  # noqa: E402

pytest_plugins = ["tests.hub_server"]

# dem_hf's messages also reach the root logger, where pytest's `caplog` listens (they do not by default, as
# Transformers' do not).
dem_hf_logging.enable_propagation()

# The models here are tiny: one thread beats two (thread hand-offs dominate), more so on a busy machine.
torch.set_num_threads(1)

VOCAB = ["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(60)]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `w0 ... w59`, with pad/unk/bos/eos."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def make_llama(seed: int = 0, tie_word_embeddings: bool = True, **overrides) -> LlamaForCausalLM:
    """A ~30k-parameter Llama built from a config, deterministic for a seed."""
    kwargs = dict(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**kwargs)).eval()


def perturbed(model: LlamaForCausalLM, seed: int, scale: float = 0.02) -> LlamaForCausalLM:
    """A copy of `model` with every float parameter nudged by seeded noise: a stand-in fine-tune."""
    clone = type(model)(model.config).eval()
    clone.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in clone.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return clone


def save_model(model, path: Path, tokenizer=None) -> Path:
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture
def base_model() -> LlamaForCausalLM:
    return make_llama(seed=0)


@pytest.fixture
def base_dir(tmp_path, base_model, tokenizer) -> Path:
    return save_model(base_model, tmp_path / "base", tokenizer)


@pytest.fixture
def finetuned_dirs(tmp_path, base_model, tokenizer) -> dict[str, Path]:
    """Three stand-in fine-tunes of `base_model`, saved as Transformers folders."""
    return {
        name: save_model(perturbed(base_model, seed), tmp_path / f"ft_{name}", tokenizer)
        for seed, name in enumerate(["math", "chat", "code"], start=1)
    }


def pytest_terminal_summary(terminalreporter):
    """Report how many failure cases the suite exercises (issue: nothing lost, nothing wrong)."""
    passed = terminalreporter.stats.get("passed", [])
    bad_inputs = sum("test_bad_inputs.py::" in r.nodeid and "[" in r.nodeid for r in passed)
    faults = sum("test_faults.py::" in r.nodeid and "case_count" not in r.nodeid for r in passed)
    if bad_inputs or faults:
        terminalreporter.write_line(f"failure cases passed: {bad_inputs} bad-input, {faults} fault")
