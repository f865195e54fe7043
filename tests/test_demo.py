"""The demo pipeline's wiring, on a tiny model and synthetic data (the real run is `examples/run_demo.sh`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
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


@pytest.fixture
def tiny_demo(tmp_path, monkeypatch):
    """The demo on a tiny saved model and synthetic distributions instead of SmolLM2 and the real data."""
    base = save_model(make_llama(), tmp_path / "base", make_tokenizer())
    monkeypatch.setattr(pipeline, "prepare_smollm2", lambda cache_dir: base)
    monkeypatch.setattr(pipeline, "prepare_distributions", synthetic_distributions)


def test_demo_runs_end_to_end_and_caches_every_stage(tmp_path, tiny_demo):
    config = DemoConfig(
        output_dir=str(tmp_path / "demo"), distributions=["a", "b"], n_train=8, n_val=4, n_test=2, max_steps=2,
        batch_size=2, learning_rate=1e-2, max_length=32, lora_r=2, lora_alpha=4, strategy="random", n_trials=2,
        eval_batch_size=2, group_steps=2, group_init="per_vector",
    )
    results = run_demo(config)
    assert set(results["test_perplexity"]) == {"base", "warm start", "a only", "b only", "DEM per vector", "DEM per layer",
                                               "uniform mixture"}
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
    assert again["timings_s"]["search per layer"] < 1.0 and again["timings_s"]["warm start"] < 5.0
    assert "merge and save" not in again["timings_s"] and again["timings_s"]["uniform mixture"] < 5.0
    assert (Path(results["model_dir"]) / "README.md").read_text() == card  # the section is replaced, not repeated


def test_the_uniform_mixture_trains_on_dem_s_tokens_from_the_warm_start(tmp_path, tiny_demo):
    """The table's data-mixing run: the uniform mixture, from the warm start, for as many steps as DEM's runs together;
    its model is the warm start plus its adapter. Without it nothing else changes and the searches are reused."""
    import json

    import torch

    from dem_hf.demo.mixing import mixture_model

    config = DemoConfig(
        output_dir=str(tmp_path / "demo"), distributions=["a", "b", "c"], n_train=8, n_val=4, n_test=2, max_steps=4,
        batch_size=2, learning_rate=1e-2, max_length=32, lora_r=2, lora_alpha=4, strategy="random", n_trials=2,
        eval_batch_size=2, granularity="vector", warm_start=0.5,
    )
    results = run_demo(config)
    mixing, warm = results["mixture"], results["warm_start"]
    assert mixing["steps"] == 3 * warm["run_steps"] == mixing["compute"]["global_step"] == 6
    assert mixing["compute"]["tokens_seen"] == pytest.approx(sum(c["tokens_seen"] for c in results["compute"].values()),
                                                             rel=0.5)
    info = json.loads((Path(mixing["model_dir"]).parent / "run_info.json").read_text())
    assert info["probabilities"] == {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}
    assert Path(info["base_model"]).resolve() == Path(warm["model_dir"]).resolve()
    model = mixture_model(warm["model_dir"], mixing["model_dir"])
    warm_model = AutoModelForCausalLM.from_pretrained(warm["model_dir"])
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), warm_model.state_dict().values()))
    row = results["test_perplexity"]["uniform mixture"]
    assert row != results["test_perplexity"]["warm start"] and "| uniform mixture |" in format_results(results)
    card = (Path(results["model_dir"]) / "README.md").read_text().split(pipeline.CARD_SECTION)[1]
    assert "the uniform mixture of the datasets trained for as many steps as DEM's runs together (6, from the warm" in card

    without = run_demo(replace(config, mixture_baseline=False))
    assert "uniform mixture" not in without["test_perplexity"] and without["mixture"] is None
    assert without["timings_s"]["search"] < 1.0  # the search's cache does not depend on the mixture
    assert {k: v for k, v in without["test_perplexity"].items()} == {
        k: v for k, v in results["test_perplexity"].items() if k != "uniform mixture"}


def test_a_uniform_start_fits_per_layer_from_one_over_k_without_a_per_vector_search(tmp_path, tiny_demo):
    """`group_init="uniform"`: no per-vector search; the per-layer fit starts at ω = 1/k on every group, its cache
    lives beside the per-vector-started one (switching back reuses that), and the table shows the start's model."""
    import json

    config = DemoConfig(
        output_dir=str(tmp_path / "demo"), distributions=["a", "b", "c"], n_train=8, n_val=4, n_test=2, max_steps=2,
        batch_size=2, learning_rate=1e-2, max_length=32, lora_r=2, lora_alpha=4, strategy="random", n_trials=2,
        eval_batch_size=2, group_steps=2, warm_start=0.0, group_init="per_vector",
    )
    started = run_demo(config)
    per_vector_fit = json.loads((tmp_path / "demo" / "search_layer.json").read_text())

    uniform = run_demo(replace(config, group_init="uniform"))
    assert list(uniform["searches"]) == ["per layer"] and "search" not in uniform["timings_s"]
    assert uniform["coefficients_per_vector"] == {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}
    fit = json.loads((tmp_path / "demo" / "search_layer_from_uniform.json").read_text())["value"]
    first = fit["candidates"][0]["coefficients"]
    assert all(value == pytest.approx(1 / 3) for groups in first.values() for value in groups.values())
    assert set(uniform["test_perplexity"]) == {"base", "a only", "b only", "c only", "DEM at ω = 1/k", "DEM per layer",
                                               "uniform mixture"}
    assert DEMMerger.from_pretrained(uniform["model_dir"]).config.coefficients == uniform["coefficients"]
    assert "every coefficient at 1/k" in (Path(uniform["model_dir"]) / "README.md").read_text()
    assert uniform["searches"]["per layer"]["compute_forward_passes"] == fit["compute"]

    assert json.loads((tmp_path / "demo" / "search_layer.json").read_text()) == per_vector_fit  # kept, not replaced
    again = run_demo(config)
    assert again["coefficients"] == started["coefficients"] and again["timings_s"]["search per layer"] < 1.0


def test_the_default_fits_per_layer_from_one_over_k_and_one_per_vector_searches_whatever_the_start():
    assert (DemoConfig().granularity, DemoConfig().group_init) == ("layer", "uniform")
    assert pipeline._fits_from_uniform(DemoConfig()) and not pipeline._fits_from_uniform(DemoConfig(granularity="vector"))
    assert not pipeline._fits_from_uniform(DemoConfig(group_init="per_vector"))
    with pytest.raises(ValueError, match="group_init"):
        DemoConfig(group_init="mean")


def test_caches_written_before_later_config_fields_existed_stay_valid(tmp_path):
    """A stage cached by an older DemoConfig (without the later fields) is reused while they hold the values it was
    computed with, and recomputed once one of them differs (a cosine schedule; a minibatch per-layer fit)."""
    from dataclasses import asdict

    config = DemoConfig(group_batch_sequences=None, warm_start=0.0, group_init="per_vector")
    old_config = {k: v for k, v in asdict(config).items() if k not in pipeline._LATER_FIELDS}
    path = tmp_path / "search.json"
    pipeline._write_json(path, {"key": {"config": old_config, "vectors": ["a"]}, "value": 1})
    calls = []
    assert pipeline._cached(path, {"config": asdict(config), "vectors": ["a"]}, lambda: calls.append(1) or 2) == 1
    assert not calls
    cosine = asdict(DemoConfig(lr_scheduler_type="cosine"))
    assert pipeline._cached(path, {"config": cosine, "vectors": ["a"]}, lambda: 3) == 3
    assert pipeline._cached(path, {"config": asdict(config), "vectors": ["a"]}, lambda: 4) == 4  # the new value replaced it


def test_a_changed_default_does_not_reuse_caches_computed_with_the_old_value(tmp_path):
    """Caches written before `group_batch_sequences` existed fitted on the full batch: a config asking for minibatches
    (whatever the default is today) recomputes, one asking for the full batch reuses."""
    from dataclasses import asdict

    path = tmp_path / "search_layer.json"
    old_config = {k: v for k, v in asdict(DemoConfig()).items() if k not in pipeline._LATER_FIELDS}
    pipeline._write_json(path, {"key": {"config": old_config}, "value": "full batch"})
    minibatch = asdict(DemoConfig(group_batch_sequences=4))
    full = asdict(DemoConfig(group_batch_sequences=None, warm_start=0.0, group_init="per_vector"))
    warm_started = asdict(DemoConfig(group_batch_sequences=None))  # today's default: a warm start, not the base
    assert pipeline._cached(path, {"config": full}, lambda: "recomputed") == "full batch"
    assert pipeline._cached(path, {"config": warm_started}, lambda: "warm") == "warm"
    pipeline._write_json(path, {"key": {"config": old_config}, "value": "full batch"})
    assert pipeline._cached(path, {"config": minibatch}, lambda: "minibatch") == "minibatch"


def test_the_demo_starts_every_run_from_a_given_base_model(tmp_path, tiny_demo, monkeypatch):
    """`base_model` (e.g. a model warm-started on a short mixture): the runs start from it, DEM merges into it, and
    the default model is not prepared at all."""
    import torch

    other = make_llama()
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.01)
    base = save_model(other, tmp_path / "warm", make_tokenizer())

    def not_the_default(cache_dir):
        raise AssertionError("the default model was prepared although base_model was given")

    monkeypatch.setattr(pipeline, "prepare_smollm2", not_the_default)
    config = DemoConfig(
        output_dir=str(tmp_path / "demo"), base_model=str(base), distributions=["a", "b"], n_train=8, n_val=4, n_test=2,
        max_steps=2, batch_size=2, learning_rate=1e-2, max_length=32, lora_r=2, lora_alpha=4, strategy="random",
        n_trials=2, eval_batch_size=2, granularity="vector", warm_start=0.0,
    )
    results = run_demo(config)
    merged = DEMMerger.from_pretrained(results["model_dir"])
    assert Path(merged.config.base_model_name_or_path).resolve() == Path(base).resolve()
    dem_model = AutoModelForCausalLM.from_pretrained(results["model_dir"])
    expected = merged.merge(results["coefficients"])
    for (name, got), want in zip(dem_model.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(got, want), name


def test_the_warm_started_demo_trains_as_many_steps_and_merges_into_its_warm_start(tmp_path, tiny_demo):
    """`warm_start=0.5`: half of all the steps train one uniform mixture first; each run starts from it for half its
    steps; DEM's vectors are deltas from it and the saved model is it plus the weighted vectors."""
    import json

    import torch

    from dem_hf.io.reader import CheckpointReader
    from dem_hf.io.tensors import fingerprint

    config = DemoConfig(
        output_dir=str(tmp_path / "demo"), distributions=["a", "b", "c"], n_train=8, n_val=4, n_test=2, max_steps=4,
        batch_size=2, learning_rate=1e-2, max_length=32, lora_r=2, lora_alpha=4, strategy="random", n_trials=2,
        eval_batch_size=2, granularity="vector", warm_start=0.5,
    )
    results = run_demo(config)
    warm = results["warm_start"]
    assert (warm["mixture_steps"], warm["run_steps"]) == (6, 2) and warm["compute"]["global_step"] == 6
    mixture = json.loads((Path(warm["model_dir"]).parent / "run_info.json").read_text())
    assert mixture["probabilities"] == {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}
    assert all(c["global_step"] == 2 for c in results["compute"].values())
    merged = DEMMerger.from_pretrained(results["model_dir"])
    assert Path(merged.config.base_model_name_or_path).resolve() == Path(warm["model_dir"]).resolve()
    assert all(v.base_fingerprint == fingerprint(CheckpointReader(warm["model_dir"])) for v in merged.vectors.values())
    dem_model = AutoModelForCausalLM.from_pretrained(results["model_dir"])
    for (name, got), want in zip(dem_model.state_dict().items(), merged.merge(results["coefficients"]).state_dict().values()):
        assert torch.equal(got, want), name
    assert results["test_perplexity"]["warm start"] != results["test_perplexity"]["base"]
    assert "| warm start |" in format_results(results)
    card = (Path(results["model_dir"]) / "README.md").read_text().split(pipeline.CARD_SECTION)[1]
    assert "the warm start (a uniform mixture of the datasets trained for 6 steps, 0.5 of all the steps" in card
    assert "| warm start |" in card


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_a_warm_start_share_outside_zero_to_one_is_refused(fraction):
    with pytest.raises(ValueError, match=r"warm_start: expected a fraction in \[0, 1\)"):
        DemoConfig(warm_start=fraction)


def test_a_base_model_that_is_not_a_model_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="base_model: expected a local model folder"):
        DemoConfig(base_model=str(tmp_path / "missing"))


@pytest.mark.parametrize("bad", [{"lr_scheduler_type": "step"}, {"finetuning": "qlora"}, {"warmup_ratio": 1.0},
                                 {"warmup_ratio": -0.1}, {"eval_steps": -1}, {"eval_steps": 2.5},
                                 {"early_stopping_patience": 2}, {"eval_steps": 2, "early_stopping_patience": -1}])
def test_bad_schedule_or_finetuning_is_refused(bad):
    with pytest.raises(ValueError, match="expected"):
        DemoConfig(**bad)


def test_the_demo_trains_full_fine_tunes_with_a_decaying_schedule(tmp_path, tiny_demo):
    import json

    from dem_hf import DistributionVector

    config = DemoConfig(
        output_dir=str(tmp_path / "demo"), distributions=["a", "b"], n_train=8, n_val=4, n_test=2, max_steps=4,
        batch_size=2, learning_rate=1e-3, max_length=32, strategy="random", n_trials=2, eval_batch_size=2,
        granularity="vector", finetuning="full", lr_scheduler_type="cosine", warmup_ratio=0.25,
    )
    results = run_demo(config)
    assert set(results["test_perplexity"]) == {"base", "warm start", "a only", "b only", "DEM", "uniform mixture"}
    runs = pipeline.runs_dir(config)
    vector = DistributionVector.from_pretrained(runs / "a" / "vector")
    assert vector.dense_names and not vector.lora_modules  # a full fine-tune's delta
    info = json.loads((runs / "a" / "run_info.json").read_text())
    text = json.dumps(info)
    assert '"lr_scheduler_type": "cosine"' in text and '"warmup_steps": 0.25' in text, text[:2000]


def test_the_demo_keeps_each_run_at_its_best_checkpoint_on_its_validation_split(tmp_path, tiny_demo):
    """`eval_steps`: every run is evaluated on its own validation split and its vector is its best checkpoint there;
    `early_stopping_patience` stops it once it stops improving (recorded in each run's compute)."""
    import json

    config = DemoConfig(
        output_dir=str(tmp_path / "demo"), distributions=["a", "b"], n_train=8, n_val=4, n_test=2, max_steps=6,
        batch_size=2, learning_rate=1e-2, max_length=32, lora_r=2, lora_alpha=4, strategy="random", n_trials=2,
        eval_batch_size=2, granularity="vector", warm_start=0.0, eval_steps=2, early_stopping_patience=1,
    )
    results = run_demo(config)
    for name, compute in results["compute"].items():
        info = json.loads((pipeline.runs_dir(config) / name / "run_info.json").read_text())
        assert info["sft_config"]["eval_steps"] == 2 and info["sft_config"]["load_best_model_at_end"] is True
        assert info["data"]["eval"]["num_examples"] == 4  # its own validation split
        assert compute["evaluations"] == compute["global_step"] // 2 >= 1
        assert compute["best_step"] is not None and compute["best_step"] <= compute["global_step"] <= 6
    again = run_demo(config)  # the runs are reused, not retrained
    assert again["compute"] == results["compute"]
