"""The benchmarks' own guards and oracles (the benchmarks are not part of the package; these checks are small).

- `bench_merge.py` refuses a run the disk cannot hold, saying what it needs and what is free, before generating.
- The generated LoRA adapters are what PEFT merges: `exactness.lora_terms` (the benchmark's float64 oracle) against
  PEFT's own `merge_and_unload` on a tiny base.
- The study's mixture runs decay their learning rate over the steps that reach DEM's token budget: the budget stops
  the run at the end of its schedule, not part-way (a run stopped at high learning rate would handicap mixing).
- DEM from a shared warm start is charged its warm start, its runs and its searches in sequence.
- The study names each setting (in its tables and the Pareto chart of all records) by what sets it apart, and reports
  mixing stopped early (the uniform mixture on fewer tokens) beside the grid, not in it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_merge  # noqa: E402
import dem_vs_mixing  # noqa: E402
import study_report  # noqa: E402
import measuring  # noqa: E402
from checkpoints import base_tensor, meta_specs, write_checkpoint, write_lora_adapter  # noqa: E402
from exactness import lora_terms  # noqa: E402

TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, tie_word_embeddings=False)


def test_bench_merge_refuses_a_run_the_disk_cannot_hold(tmp_path, monkeypatch, capsys):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(measuring.shutil, "disk_usage", lambda path: usage._replace(free=int(50e9)))
    monkeypatch.setattr(bench_merge, "WORK", tmp_path / ".work")
    monkeypatch.setattr(sys, "argv", ["bench_merge.py", "--size", "7b"])
    with pytest.raises(SystemExit) as refused:
        bench_merge.main()
    message = str(refused.value)
    # base + 4 vectors + the merged output, 6 checkpoints of 6.74B bf16 parameters; plus the margin for other jobs.
    assert "peak at 80.9 GB (base + 4 vectors + 1 outputs" in message
    assert "needs 84.9 GB free" in message and "50.0 GB are free" in message and "--vectors" in message
    assert not (tmp_path / ".work").exists()  # nothing generated


def test_generated_lora_adapter_merges_as_peft_merges_it(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    specs = meta_specs(TINY)
    write_checkpoint(tmp_path / "base", TINY, "float32",
                     ((n, base_tensor(i, n, s, torch.float32)) for i, (n, s) in enumerate(specs)))
    write_lora_adapter(tmp_path / "adapter", tmp_path / "base", specs, stream=1, rank=4, alpha=8)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float64)
    before = {n: t.clone() for n, t in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().state_dict()
    term = lora_terms(tmp_path / "adapter", weight=1.0)
    adapted = 0
    for name, value in merged.items():
        delta = term(name, slice(0, value.shape[0]))
        adapted += delta is not None
        expected = before[name] + (delta if delta is not None else 0)
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-15)
    assert adapted == 2 * 7  # every linear layer of both blocks, not lm_head


def test_mixture_schedule_ends_where_the_token_budget_stops_the_run(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig

    from dem_hf import train_mixture

    from .conftest import make_llama, make_tokenizer, save_model

    tokenizer = make_tokenizer()
    base = save_model(make_llama(seed=0), tmp_path / "base", tokenizer)

    def words(start: int, length: int) -> str:
        return " ".join(f"w{start + j % 10}" for j in range(length))

    # Long prompts and short completions: counting only the scored tokens would estimate ~4x the steps.
    data = {
        "long_prompts": Dataset.from_dict({"prompt": [words(i, 20) for i in range(40)],
                                           "completion": [" " + words(i, 6) for i in range(40)]}),
        "short": Dataset.from_dict({"prompt": [words(i, 3) for i in range(40)],
                                    "completion": [" " + words(i, 8) for i in range(40)]}),
    }
    weights, max_length, batch_size, budget = {"long_prompts": 1.0, "short": 1.0}, 32, 4, 1200
    seen = {n: dem_vs_mixing.input_tokens(d, tokenizer, max_length) for n, d in data.items()}
    steps = dem_vs_mixing.steps_for_budget(weights, seen, {n: len(d) for n, d in data.items()}, budget, batch_size)
    config = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_steps=steps,
                       per_device_train_batch_size=batch_size, max_length=max_length, save_strategy="no",
                       disable_tqdm=True, seed=0, lr_scheduler_type="cosine", dataloader_num_workers=0)
    run = train_mixture(base, data, weights, config, None, tmp_path / "runs",
                        callbacks=[dem_vs_mixing.StopAtTokenBudget(budget)])
    compute = run.info["compute"]
    assert compute["tokens_seen"] >= budget, "the schedule ended before the budget was seen"
    assert compute["global_step"] >= 0.9 * steps, f"stopped at step {compute['global_step']} of a {steps}-step schedule"


def test_the_mixing_grid_trains_four_distinct_mixtures_and_counts_each_once():
    names = ["a", "b", "c"]
    tokens, val_loss = {"a": 100, "b": 400, "c": 900}, {"a": 1.0, "b": 1.5, "c": 2.0}
    distinct = dem_vs_mixing.mixture_grid(names, tokens, {"a": 0.2, "b": 1.0, "c": 0.5}, val_loss)
    assert list(distinct) == ["uniform", "proportional to tokens", "proportional to DEM's coefficients",
                              "tilted to the hardest (base val loss^2)"]
    # Coefficients all equal sample the uniform mixture: one run, counted once; √tokens takes the free place.
    equal = dem_vs_mixing.mixture_grid(names, tokens, {"a": 1.3, "b": 1.3, "c": 1.3}, val_loss)
    assert list(equal) == ["uniform", "proportional to tokens", "tilted to the hardest (base val loss^2)",
                           "proportional to √tokens"]
    assert equal["proportional to √tokens"] == {"a": 10.0, "b": 20.0, "c": 30.0}
    # So do coefficients proportional to the tokens, and all-zero coefficients sample nothing.
    assert "proportional to DEM's coefficients" not in dem_vs_mixing.mixture_grid(names, tokens, {"a": 1, "b": 4, "c": 9}, val_loss)
    assert len(dem_vs_mixing.mixture_grid(names, tokens, {"a": 0.0, "b": 0.0, "c": 0.0}, val_loss)) == 4


def test_warm_started_dem_is_charged_its_warm_start_runs_and_searches_in_sequence():
    warm = {"fraction": 0.25, "training_tokens": 900, "training_flops": 1000.0,
            "dem": {"test_perplexity": {"DEM per vector": {"a": 2.0}, "DEM per layer": {"a": 1.5}},
                    "searches": {"per vector": {"compute_forward_passes": 12.0},
                                 "per layer": {"compute_forward_passes": 10.0}}}}
    entries = study_report.warm_start_entries(warm, pass_flops=5.0)
    label = study_report.warm_start_label
    assert entries == {
        label(warm, "per vector"): study_report.Entry({"a": 2.0}, 1000.0 + 12 * 5.0, 12.0, 900, 1000.0),
        label(warm, "per layer"): study_report.Entry({"a": 1.5}, 1000.0 + 22 * 5.0, 22.0, 900, 1000.0),
    }
    assert label(warm, "per layer") == "DEM warm-started (0.25 of the steps) per layer"


def test_warm_starts_with_their_own_run_schedule_are_kept_apart(tmp_path, monkeypatch):
    from dem_hf.demo.pipeline import DemoConfig

    monkeypatch.setattr(dem_vs_mixing, "WORK", tmp_path)
    config = DemoConfig(eval_steps=10, early_stopping_patience=3)
    plain, own = dem_vs_mixing.warm_start_config(config, 0.25), dem_vs_mixing.warm_start_config(config, 0.25, (5, 2))
    assert (plain.eval_steps, plain.early_stopping_patience, own.eval_steps, own.early_stopping_patience) == (10, 3, 5, 2)
    assert plain.output_dir != own.output_dir and own.warm_start == 0.25
    dem = {k: {} for k in ("test_perplexity", "searches", "coefficients", "coefficients_per_vector", "warm_start")}
    for schedule, group_init in ((None, None), ((5, 2), "per_vector"), ((5, 2), "uniform")):
        record = {"fraction": 0.25, "run_schedule": schedule, "training_tokens": 1, "training_flops": 1.0, "dem": dem}
        if group_init:  # results written before the uniform start existed have no "group_init"
            record["group_init"] = group_init
        dem_vs_mixing.warm_start_result_file(config, 0.25, schedule, group_init or "per_vector").write_text(json.dumps(record))
    found = dem_vs_mixing.warm_start_results(config)
    assert [(w["run_schedule"], w["group_init"]) for w in found] == [
        (None, "per_vector"), ([5, 2], "per_vector"), ([5, 2], "uniform")]
    assert study_report.warm_start_label(found[1], "per layer") == (
        "DEM warm-started (0.25 of the steps, runs evaluated every 5 steps, patience 2) per layer")
    assert study_report.warm_start_label(found[2], "per layer") == (
        "DEM warm-started (0.25 of the steps, runs evaluated every 5 steps, patience 2) per layer from ω = 1/k")
    assert dem_vs_mixing.warm_start_results(DemoConfig(eval_steps=5, early_stopping_patience=2)) == []  # other settings


def test_the_study_labels_each_setting_by_what_sets_it_apart():
    from dataclasses import asdict

    from dem_hf.demo.pipeline import DemoConfig

    def label(**changes):
        return study_report._regime({"config": asdict(DemoConfig(**changes))})

    demo_group = label(max_steps=120, lr_scheduler_type="cosine")
    assert demo_group == "LoRA r16, 120 steps/dataset, cosine lr"
    assert label(max_steps=120, lr_scheduler_type="cosine", n_train=100) == (
        "LoRA r16, 100 examples each, 120 steps/dataset, cosine lr")
    assert label(distributions=["bible", "pydocs", "jargon"]).startswith("bible+pydocs+jargon, LoRA r16, ")
    assert label(finetuning="full").startswith("full, ")
    assert label(n_train=100, eval_steps=10, early_stopping_patience=3) == (
        "LoRA r16, 100 examples each, up to 30 steps/dataset, constant lr, best checkpoint, patience 3")
    assert study_report._point_label(study_report.warm_start_label(
        {"fraction": 0.4, "run_schedule": [5, 2]}, "per layer")) == "warm 0.4 (runs 5/p2) per layer"
    assert study_report._point_label(study_report.warm_start_label({"fraction": 0.25}, "per vector")) == "warm 0.25 per vector"
    assert study_report._point_label("DEM, gradient:layer (12, batch 3)") == "gradient:layer (12, batch 3)"


def test_mixing_stopped_early_is_reported_beside_the_grid_not_in_it():
    def mixture(ppl, tokens):
        return {"test_perplexity": {"a": ppl, "b": ppl}, "compute": {"tokens_seen": tokens, "total_flos": 10.0 * tokens}}

    result = {"distributions": ["a", "b"], "base": {"a": 9.0, "b": 9.0}, "forward_pass_flops": 1.0,
              "mixtures": {"uniform": mixture(8.0, 100)}, "budget_mixtures": {"uniform, 0.25 of the tokens": mixture(5.0, 25)},
              "dem_runs": {"a": {"total_flos": 500.0, "tokens_seen": 50}, "b": {"total_flos": 500.0, "tokens_seen": 50}},
              "dem_models": {"DEM per vector": {"a": 6.0, "b": 6.0}}, "dem_search_passes": {"per vector": 10.0}}
    report = study_report.report_markdown(result)
    assert study_report.budget_mixture_label(0.25) == "uniform, 0.25 of the tokens"
    assert study_report.budget_mixture_label(2) == "uniform, 2x the tokens"
    assert "The uniform mixture at other budgets (outside the grid): uniform, 0.25 of the tokens: mean 5.000." in report
    assert "| mixture: uniform, 0.25 of the tokens | 5.000 | 5.000 | 5.000 |" in report
    assert "Mixing grid: 1 runs, 1e+03 FLOPs; best mixture: uniform (mean 8.000)" in report  # the grid alone
    assert ("- DEM per vector: mean 6.000, -25.00% vs the best mixture, at 1.01x the grid's compute; searches 10.0 "
            "forward-pass equivalents = 1.0% of its training compute; +20.00% vs the best mixture at any budget "
            "(uniform, 0.25 of the tokens).") in report


def test_evaluations_of_runs_kept_at_their_best_checkpoint_count_in_their_cost():
    def mixture(ppl, flops, eval_flops):
        return {"test_perplexity": {"a": ppl}, "compute": {"tokens_seen": 10, "total_flos": flops, "eval_flops": eval_flops}}

    result = {"distributions": ["a"], "base": {"a": 9.0}, "forward_pass_flops": 1.0,
              "mixtures": {"uniform": mixture(8.0, 900.0, 100.0)},
              "dem_runs": {"a": {"total_flos": 150.0, "eval_flops": 50.0, "tokens_seen": 10}},
              "dem_models": {"DEM per vector": {"a": 6.0}}, "dem_search_passes": {"per vector": 50.0}}
    assert study_report.run_cost(result["mixtures"]["uniform"]["compute"]) == 1000.0
    assert study_report.run_cost({"total_flos": 5.0}) == 5.0  # records from before evaluations were counted
    report = study_report.report_markdown(result)
    # DEM: 150 training + 50 evaluation + 50 search FLOPs = 0.25x the grid's 1000; its search is 25% of its runs' 200.
    assert "- DEM per vector: mean 6.000, -25.00% vs the best mixture, at 0.25x the grid's compute; searches 50.0 " \
           "forward-pass equivalents = 25.0% of its training compute" in report


def test_the_pareto_chart_draws_every_model_and_zooms_on_the_best(tmp_path):
    from dataclasses import asdict

    from dem_hf.demo.pipeline import DemoConfig

    pytest.importorskip("matplotlib")
    compute = {"total_flos": 10.0, "tokens_seen": 5}
    result = {"config": asdict(DemoConfig()), "distributions": ["a", "b"], "forward_pass_flops": 1.0,
              "mixtures": {"uniform": {"test_perplexity": {"a": 2.0, "b": 4.0}, "compute": compute}},
              "dem_runs": {"a": compute, "b": compute}, "dem_search_passes": {"per vector": 3.0},
              "dem_models": {"DEM per vector": {"a": 3.0, "b": 5.0}}}
    path = tmp_path / "pareto.png"
    study_report.pareto_chart([result], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".*tmp*"))
    figure = study_report._pyplot().figure()
    assert sorted(study_report._pareto_points(figure.gca(), [result], legend=False)) == [3.0, 4.0]


def test_settings_tags_name_the_settings_not_today_s_demo_defaults():
    """The records and caches of settings already run keep their names when a default of the demo changes."""
    from dem_hf.demo.pipeline import DemoConfig

    plain = DemoConfig(lr_scheduler_type="constant", warmup_ratio=0.0, learning_rate=5e-4, max_steps=30)
    assert dem_vs_mixing._settings_tag(plain) == "4d-n400-s30-l128-r16-seed0"
    cosine = DemoConfig(lr_scheduler_type="cosine", warmup_ratio=0.1, n_train=100, max_steps=120, eval_steps=10,
                        early_stopping_patience=3)
    assert dem_vs_mixing._settings_tag(cosine) == "4d-n100-s120-l128-r16-seed0-cosine-w0.1-eval10-p3"
