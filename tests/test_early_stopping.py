"""Each run kept at its best checkpoint on its own validation set (`eval_datasets`), and stopped early.

Runs of the ~30k-parameter Llama from conftest on synthetic data, on CPU: one dataset is validated on its own
distribution (its loss keeps falling, so its best checkpoint is the last), the other on a distribution it never
sees (its loss rises after the first evaluation, so its best checkpoint is early).
"""

from __future__ import annotations

import json

import pytest
from peft import LoraConfig
from transformers import EarlyStoppingCallback

from dem_hf import DistributionVector, train_distributions, train_mixture
from dem_hf.training.trainers import RUN_INFO_NAME

from .conftest import make_llama, make_tokenizer, save_model
from .test_training import LORA, assert_same_vector, plain_data, sft_config

STEPS, EVERY = 8, 2


def evaluated_config(output_dir, **overrides):
    return sft_config(output_dir, max_steps=STEPS, learning_rate=5e-2, eval_strategy="steps", eval_steps=EVERY,
                      save_strategy="steps", save_steps=EVERY, load_best_model_at_end=True,
                      metric_for_best_model="eval_loss", per_device_eval_batch_size=8, **overrides)


def eval_losses(run_dir) -> dict[int, float]:
    """The validation loss at each evaluation of a run, from the trainer state of its last checkpoint."""
    last = max(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((last / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["eval_loss"] for entry in history if "eval_loss" in entry}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_model(make_llama(seed=0), tmp_path_factory.mktemp("early") / "base", make_tokenizer())


@pytest.fixture(scope="module")
def data():
    train = {"own": plain_data(start=0), "shifted": plain_data(start=20)}
    validation = {"own": plain_data(start=0, n=8), "shifted": plain_data(start=60, n=8)}
    return train, validation


@pytest.fixture(scope="module")
def kept_best(base, data, tmp_path_factory):
    output = tmp_path_factory.mktemp("best")
    train, validation = data
    vectors = train_distributions(base, train, evaluated_config(output), LoraConfig(**LORA), output,
                                  eval_datasets=validation)
    return output, vectors


def test_each_vector_is_its_run_best_checkpoint_on_its_own_validation_set(kept_best, base):
    output, vectors = kept_best
    best_steps = {}
    for vector in vectors:
        run_dir = output / vector.name
        losses = eval_losses(run_dir)
        assert sorted(losses) == list(range(EVERY, STEPS + 1, EVERY))
        best = min(losses, key=losses.get)
        info = json.loads((run_dir / RUN_INFO_NAME).read_text())
        assert info["compute"]["best_step"] == best == vector.metadata["step"]
        assert info["compute"]["best_metric"] == pytest.approx(losses[best])
        assert info["compute"]["global_step"] == STEPS and info["compute"]["evaluations"] == STEPS // EVERY
        assert info["data"]["eval"]["fingerprint"]  # the validation set is part of what a re-run compares
        kept = DistributionVector.from_peft(run_dir / f"checkpoint-{best}", name=vector.name, base=base)
        assert_same_vector(vector, kept)
        best_steps[vector.name] = best
    # Each run chose its own checkpoint: the last where validation tracks training, an early one where it does not.
    assert best_steps["own"] == STEPS and best_steps["shifted"] < STEPS, best_steps


def test_a_second_call_reuses_the_runs_and_other_validation_data_is_a_difference(kept_best, base, data):
    output, vectors = kept_best
    train, validation = data
    again = train_distributions(base, train, evaluated_config(output), LoraConfig(**LORA), output,
                                eval_datasets=validation)
    for vector, reused in zip(vectors, again):
        assert_same_vector(reused, vector)
    with pytest.raises(ValueError, match="eval"):
        train_distributions(base, train, evaluated_config(output), LoraConfig(**LORA), output,
                            eval_datasets={**validation, "own": plain_data(start=40, n=8)})


def test_early_stopping_stops_each_run_on_its_own(base, data, tmp_path):
    train, validation = data
    stop = EarlyStoppingCallback(early_stopping_patience=1)  # one instance shared by both runs, as users pass it
    vectors = train_distributions(base, train, evaluated_config(tmp_path), LoraConfig(**LORA), tmp_path,
                                  eval_datasets=validation, callbacks=[stop])
    compute = {v.name: json.loads((tmp_path / v.name / RUN_INFO_NAME).read_text())["compute"] for v in vectors}
    # Patience 1: the shifted run stops at its first evaluation that does not improve, and keeps the one before; the
    # run validated on its own data improves at every evaluation and trains to the end.
    assert compute["shifted"]["global_step"] == compute["shifted"]["best_step"] + EVERY < STEPS, compute["shifted"]
    assert compute["shifted"]["evaluations"] == compute["shifted"]["global_step"] // EVERY
    assert compute["own"]["global_step"] == compute["own"]["best_step"] == STEPS, compute["own"]
    with pytest.raises(ValueError, match="early_stopping"):  # where a run ends is part of what a re-run compares
        train_distributions(base, train, evaluated_config(tmp_path), LoraConfig(**LORA), tmp_path, eval_datasets=validation)


def test_a_mixture_keeps_its_best_checkpoint_on_all_validation_sets_together(base, data, tmp_path):
    train, validation = data
    run = train_mixture(base, train, {"own": 1.0, "shifted": 1.0}, evaluated_config(tmp_path), LoraConfig(**LORA),
                        tmp_path, eval_datasets=validation)
    losses = eval_losses(run.run_dir)
    best = min(losses, key=losses.get)
    assert run.info["compute"]["best_step"] == best
    assert sorted(run.info["data"]["eval"]) == ["own", "shifted"]
    final = DistributionVector.from_peft(run.model_dir, name="mixture", base=base)
    assert_same_vector(final, DistributionVector.from_peft(run.run_dir / f"checkpoint-{best}", name="mixture", base=base))


def test_cli_keeps_each_run_at_its_best_checkpoint_and_stops_it_early(base, data, tmp_path, capsys):
    from dem_hf.commands.cli import main

    train, validation = data
    for name in train:
        train[name].to_json(tmp_path / f"{name}.jsonl")
        validation[name].to_json(tmp_path / f"{name}-val.jsonl")
    argv = [
        "train", "--base", str(base), "--output_dir", str(tmp_path / "runs"), "--max_steps", str(STEPS),
        "--learning_rate", "5e-2", "--lr_scheduler_type", "constant", "--use_cpu", "--report_to", "none",
        "--per-device-train-batch-size", "8", "--disable_tqdm", "true", "--lora-r", "4", "--target-modules", "q_proj",
        "v_proj", "o_proj", "up_proj", "down_proj", "--eval_strategy", "steps", "--eval_steps", str(EVERY),
        "--save_steps", str(EVERY), "--load_best_model_at_end", "true",
        *[arg for name in train for arg in ("--dataset", f"{name}={tmp_path / f'{name}.jsonl'}",
                                             "--eval_dataset", f"{name}={tmp_path / f'{name}-val.jsonl'}")],
    ]
    assert main([*argv, "--early_stopping_patience", "1"]) == 0
    compute = {name: json.loads((tmp_path / "runs" / name / RUN_INFO_NAME).read_text())["compute"] for name in train}
    assert compute["shifted"]["global_step"] == compute["shifted"]["best_step"] + EVERY < STEPS, compute["shifted"]
    assert compute["own"]["best_step"] == STEPS
    kept = DistributionVector.from_pretrained(tmp_path / "runs" / "shifted" / "vector")
    assert kept.metadata["step"] == compute["shifted"]["best_step"]
    no_eval = [arg for arg in argv if not arg.endswith("-val.jsonl") and arg != "--eval_dataset"]
    assert main(no_eval) == 2
    assert "no eval_datasets were given" in capsys.readouterr().err
    assert main([*argv, "--early_stopping_patience", "2", "--load_best_model_at_end", "false"]) == 2
    assert "expected --load_best_model_at_end true" in capsys.readouterr().err
