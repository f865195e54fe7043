"""The demo pipeline's wiring, on a tiny model and synthetic data (the real run is `examples/run_demo.sh`)."""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, DatasetDict
from transformers import AutoModelForCausalLM

from dem_hf import DEMMerger
from dem_hf.demo import pipeline
from dem_hf.demo.pipeline import DemoConfig, format_results, run_demo

from .conftest import make_llama, make_tokenizer, save_model


def synthetic_distributions(cache_dir, names, n_train, n_val, n_test, seed):
    def split(offset: int, count: int) -> Dataset:
        return Dataset.from_dict({"text": [" ".join(f"w{(offset + i + k) % 60}" for k in range(8)) for i in range(count)]})

    return {
        name: DatasetDict(train=split(10 * d, n_train), validation=split(10 * d + 1, n_val), test=split(10 * d + 2, n_test))
        for d, name in enumerate(names)
    }


def test_demo_runs_end_to_end_and_caches_every_stage(tmp_path, monkeypatch):
    tokenizer = make_tokenizer()
    base = save_model(make_llama(), tmp_path / "base", tokenizer)
    monkeypatch.setattr(pipeline, "prepare_smollm2", lambda cache_dir: base)
    monkeypatch.setattr(pipeline, "prepare_distributions", synthetic_distributions)
    config = DemoConfig(
        output_dir=str(tmp_path / "demo"), distributions=["a", "b"], n_train=8, n_val=4, n_test=2, max_steps=2,
        batch_size=2, learning_rate=1e-2, max_length=32, lora_r=2, lora_alpha=4, strategy="random", n_trials=2,
        eval_batch_size=2, group_steps=2,
    )
    results = run_demo(config)
    assert set(results["test_perplexity"]) == {"base", "a only", "b only", "DEM per vector", "DEM per layer"}
    assert set(results["coefficients"]) == {"a", "b"}
    assert all(isinstance(value, dict) for value in results["coefficients"].values())  # the saved model: per layer
    assert set(results["coefficients_per_vector"]) == {"a", "b"}
    assert results["searches"]["per vector"]["candidates"] == 2
    assert results["searches"]["per layer"]["granularity"] == "layer"
    saved = DEMMerger.from_pretrained(results["model_dir"]).config.coefficients
    assert saved == results["coefficients"]
    table = format_results(results)
    assert "| DEM per vector |" in table and "| DEM per layer |" in table and "random search" in table
    assert isinstance(results["sample"]["completion"], str) and "Sample (greedy" in table  # the saved folder generates
    AutoModelForCausalLM.from_pretrained(results["model_dir"])
    card = (Path(results["model_dir"]) / "README.md").read_text()
    assert card.count(pipeline.CARD_SECTION) == 1 and "| DEM per layer |" in card.split(pipeline.CARD_SECTION)[1]
    assert all(f"{name}≈" in card for name in results["coefficients"])

    again = run_demo(config)  # everything comes from the caches
    assert again["test_perplexity"] == results["test_perplexity"]
    assert again["coefficients"] == results["coefficients"]
    assert again["timings_s"]["search"] < 1.0 and again["timings_s"]["evaluate"] < 1.0
    assert again["timings_s"]["search per layer"] < 1.0
    assert "merge and save" not in again["timings_s"]
    assert (Path(results["model_dir"]) / "README.md").read_text() == card  # the section is replaced, not repeated
