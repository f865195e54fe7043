"""Per-dataset TRL training, the vector callback, resume/increment, bad input, and the data-mixing baseline.

Every run is a few optimizer steps of the ~30k-parameter Llama from conftest on synthetic data, on CPU.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import Trainer, TrainerCallback, TrainingArguments
from trl import SFTConfig

from dem_hf import (
    DEMMerger,
    DistributionVector,
    DistributionVectorCallback,
    train_distributions,
    train_mixture,
    train_warm_start,
)
from dem_hf.commands.cli import build_parser, main
from dem_hf.training.trainers import RUN_INFO_NAME, mix_datasets

from .conftest import make_llama, make_tokenizer, save_model

CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }} </s> {% endfor %}"
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM")


# ============================================================================================ data & helpers


def cycle(start: int, offset: int, length: int) -> str:
    """`length` words cycling through w<start> ... w<start+9>: a distribution a tiny model learns in a few steps."""
    return " ".join(f"w{start + (offset + j) % 10}" for j in range(length))


def plain_data(start: int = 0, n: int = 24) -> Dataset:
    return Dataset.from_dict({"text": [cycle(start, i, 12) for i in range(n)]})


def chat_data(n: int = 24) -> Dataset:
    return Dataset.from_dict({"messages": [
        [{"role": "user", "content": cycle(10, i, 4)}, {"role": "assistant", "content": cycle(40, i, 8)}] for i in range(n)
    ]})


def qa_data(n: int = 24) -> Dataset:
    return Dataset.from_dict({"prompt": [cycle(20, i, 3) for i in range(n)], "completion": [" " + cycle(30, i, 10) for i in range(n)]})


def rendered(dataset: Dataset) -> list[str]:
    """The texts the model is trained on, for measuring its loss there."""
    if "messages" in dataset.column_names:
        return [" ".join(f"{m['content']} </s>" for m in row) for row in dataset["messages"]]
    if "prompt" in dataset.column_names:
        return [p + c for p, c in zip(dataset["prompt"], dataset["completion"])]
    return list(dataset["text"])


@torch.no_grad()
def mean_nll(model, tokenizer, texts: list[str]) -> float:
    """Token-weighted mean negative log-likelihood (log-perplexity) over `texts`."""
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return model.eval()(**batch, labels=labels).loss.item()


def sft_config(output_dir, **overrides) -> SFTConfig:
    settings = dict(
        output_dir=str(output_dir), use_cpu=True, bf16=False, report_to="none", max_steps=4, learning_rate=2e-2,
        per_device_train_batch_size=8, logging_steps=2, save_strategy="no", dataloader_num_workers=0,
        disable_tqdm=True, seed=0, lr_scheduler_type="constant",
    )
    settings.update(overrides)
    return SFTConfig(**settings)


def chat_tokenizer():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


class RunRecorder(TrainerCallback):
    """Records, per trainer run, its name (the dataset's), the step it started at and the steps it took."""

    def __init__(self) -> None:
        self.runs: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.runs.append({"name": args.run_name, "start": state.global_step, "steps": 0})

    def on_step_end(self, args, state, control, **kwargs):
        self.runs[-1]["steps"] += 1

    @property
    def names(self) -> list[str]:
        return [run["name"] for run in self.runs]


class Crash(TrainerCallback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise RuntimeError(f"simulated crash at step {self.at_step}")


def assert_same_vector(actual: DistributionVector, expected: DistributionVector) -> None:
    assert actual.vector_type == expected.vector_type
    assert sorted(actual.tensors.keys()) == sorted(expected.tensors.keys())
    for name in expected.tensors.keys():
        torch.testing.assert_close(actual.tensors.get(name), expected.tensors.get(name), rtol=0, atol=0)
    assert {n: m.scaling for n, m in actual.lora_modules.items()} == {n: m.scaling for n, m in expected.lora_modules.items()}
    assert actual.base_fingerprint == expected.base_fingerprint


# ============================================================================================ fixtures



@pytest.fixture(scope="module")
def trained_base(tmp_path_factory):
    return save_model(make_llama(seed=0), tmp_path_factory.mktemp("training") / "base", make_tokenizer())


@pytest.fixture(scope="module")
def full_runs(trained_base, tmp_path_factory):
    """Full fine-tunes on plain text and on chat messages (chat template applied by TRL)."""
    output = tmp_path_factory.mktemp("full")
    data = {"plain": plain_data(), "chat": chat_data()}
    vectors = train_distributions(
        trained_base, data, sft_config(output), None, output, processing_class=chat_tokenizer()
    )
    return output, data, vectors


@pytest.fixture(scope="module")
def lora_runs(trained_base, tmp_path_factory):
    """LoRA runs on plain text and on prompt/completion pairs."""
    output = tmp_path_factory.mktemp("lora")
    data = {"plain": plain_data(), "qa": qa_data()}
    vectors = train_distributions(trained_base, data, sft_config(output, max_steps=8, learning_rate=5e-2), LoraConfig(**LORA), output)
    return output, data, vectors


# ============================================================================================ acceptance 1


@pytest.mark.parametrize("runs", ["full_runs", "lora_runs"])
def test_one_vector_per_dataset_that_lowers_its_own_perplexity(runs, trained_base, request):
    _, data, vectors = request.getfixturevalue(runs)
    tokenizer = make_tokenizer()
    base_model = make_llama().from_pretrained(trained_base)
    assert [v.name for v in vectors] == list(data)
    for vector in vectors:
        assert vector.vector_type == ("lora" if runs == "lora_runs" else "full")
        merged = DEMMerger.from_pretrained(trained_base, vectors=[vector]).merge({vector.name: 1.0})
        texts = rendered(data[vector.name])
        before, after = mean_nll(base_model, tokenizer, texts), mean_nll(merged, tokenizer, texts)
        assert after < before - 0.1, f"{vector.name}: log-perplexity {before:.3f} -> {after:.3f}"  # >= 10% lower ppl


@pytest.mark.parametrize("runs", ["full_runs", "lora_runs"])
def test_run_folder_records_compute_and_finished_marker(runs, request):
    output, data, vectors = request.getfixturevalue(runs)
    for vector in vectors:
        run_dir = output / vector.name
        info = json.loads((run_dir / RUN_INFO_NAME).read_text())
        assert info["finished"] is True and list(info)[-1] == "finished"
        assert (run_dir / ("adapter" if runs == "lora_runs" else "model")).is_dir()
        compute = info["compute"]
        assert compute == vector.metadata["compute"]
        assert compute["global_step"] == (8 if runs == "lora_runs" else 4) and compute["tokens_seen"] > 0 and compute["total_flos"] > 0
        assert compute["flops_6nd"] == 6 * compute["num_parameters"] * compute["tokens_seen"]
        assert vector.metadata["dataset"] == vector.name and vector.metadata["num_examples"] == len(data[vector.name])
        assert vector.metadata["sft_config"]["learning_rate"] == info["sft_config"]["learning_rate"]
        assert isinstance(vector.metadata["compute"]["train_loss"], float)


def test_callback_vector_equals_vector_of_final_full_weights(full_runs, trained_base):
    output, _, vectors = full_runs
    for vector in vectors:
        recomputed = DistributionVector.from_models(trained_base, output / vector.name / "model", name=vector.name)
        assert_same_vector(vector, recomputed)


def test_callback_vector_equals_vector_of_final_adapter(lora_runs, trained_base):
    output, _, vectors = lora_runs
    for vector in vectors:
        recomputed = DistributionVector.from_peft(output / vector.name / "adapter", name=vector.name, base=trained_base)
        assert_same_vector(vector, recomputed)


@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "lora"])
def test_callback_works_with_a_plain_trainer_and_no_base(tmp_path, use_peft):
    """Any Trainer, no TRL, no base given (the callback keeps the starting weights, or reads the PeftModel's base)."""
    from peft import get_peft_model

    model, start, tokenizer = make_llama(seed=3), make_llama(seed=3), make_tokenizer()
    if use_peft:
        model = get_peft_model(model, LoraConfig(**LORA))
    ids = tokenizer([cycle(0, i, 10) for i in range(16)])["input_ids"]
    dataset = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(
        output_dir=str(tmp_path / "plain"), use_cpu=True, report_to="none", max_steps=2, save_steps=1,
        per_device_train_batch_size=8, learning_rate=1e-2, disable_tqdm=True,
    )
    callback = DistributionVectorCallback("plain")
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback]).train()
    assert [p.relative_to(tmp_path).as_posix() for p in callback.saved] == [
        "plain/checkpoint-1/vector", "plain/checkpoint-2/vector", "plain/vector"
    ]
    saved = DistributionVector.from_pretrained(tmp_path / "plain" / "vector")
    if use_peft:
        expected = DistributionVector.from_peft(model, name="plain", base=start)
    else:
        expected = DistributionVector.from_models(start, model, name="plain")
    assert_same_vector(saved, expected)
    assert saved.vector_type == ("lora" if use_peft else "full")
    assert saved.metadata["compute"]["tokens_seen"] > 0 and saved.metadata["step"] == 2


def test_in_memory_base_is_copied_per_run_and_never_modified(trained_base, tmp_path):
    base = make_llama(seed=0)  # the weights saved in trained_base, but no folder to find a tokenizer in
    before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    with pytest.raises(ValueError, match="processing_class"):
        train_distributions(base, {"plain": plain_data()}, sft_config(tmp_path), None, tmp_path / "nowhere")
    [vector] = train_distributions(
        base, {"plain": plain_data()}, sft_config(tmp_path, max_steps=2), None, tmp_path, processing_class=make_tokenizer()
    )
    assert all(torch.equal(before[name], tensor) for name, tensor in base.state_dict().items())
    merger = DEMMerger.from_pretrained(trained_base, vectors=[vector])  # same fingerprint as the saved base
    assert merger.vector_names == ["plain"] and vector.vector_type == "full"


# ============================================================================================ acceptance 2


def test_second_call_trains_only_the_new_dataset_and_merger_takes_it(full_runs, trained_base, tmp_path, caplog):
    output, data, _ = full_runs
    shutil.copytree(output, tmp_path / "runs")
    recorder = RunRecorder()
    vectors = train_distributions(
        trained_base, {**data, "extra": plain_data(start=50)}, sft_config(tmp_path / "runs"), None, tmp_path / "runs",
        processing_class=chat_tokenizer(), callbacks=[recorder],
    )
    assert recorder.names == ["extra"]
    assert [v.name for v in vectors] == ["plain", "chat", "extra"]
    merger = DEMMerger.from_pretrained(trained_base, vectors=vectors[:2])
    merger.add_vector(vectors[2])
    assert merger.vector_names == ["plain", "chat", "extra"]
    assert merger.merge({"plain": 1.0, "chat": 1.0, "extra": 1.0}) is not None

    runs = tmp_path / "runs"
    before, extra_before = tree_digest(runs), tree_digest(runs / "extra")
    with pytest.raises(ValueError, match=r"sft_config\.learning_rate: 0\.02 -> 0\.001.*retrain=True") as refused:
        train_distributions(  # same runs, other settings: refused before anything trains, nothing touched
            trained_base, data, sft_config(runs, learning_rate=1e-3), None, runs,
            processing_class=chat_tokenizer(), callbacks=[recorder],
        )
    assert "--retrain" in str(refused.value)
    assert recorder.names == ["extra"] and tree_digest(runs) == before

    with caplog.at_level(logging.INFO, logger="dem_hf"):
        again = train_distributions(
            trained_base, data, sft_config(runs, learning_rate=1e-3), None, runs,
            processing_class=chat_tokenizer(), callbacks=[recorder], retrain=True,
        )
    assert recorder.names == ["extra", "plain", "chat"] and [v.name for v in again] == ["plain", "chat"]
    assert "retraining" in caplog.text and "sft_config.learning_rate: 0.02 -> 0.001" in caplog.text
    for name in ("plain", "chat"):
        info = json.loads((runs / name / RUN_INFO_NAME).read_text())
        assert info["finished"] is True and info["sft_config"]["learning_rate"] == 1e-3
    assert sorted(p.name for p in runs.iterdir()) == ["chat", "extra", "plain"]  # no staging folder left
    assert tree_digest(runs / "extra") == extra_before


def tree_digest(folder) -> dict[str, str]:
    import hashlib

    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_settings_that_do_not_change_the_result_reuse_the_run(full_runs, trained_base, tmp_path):
    output, data, vectors = full_runs
    shutil.copytree(output, tmp_path / "runs")
    recorder = RunRecorder()
    again = train_distributions(
        trained_base, data, sft_config(tmp_path / "runs", logging_steps=1, save_strategy="steps", save_steps=7,
                                       disable_tqdm=False, dataloader_num_workers=0, run_name="renamed"),
        None, tmp_path / "runs", processing_class=chat_tokenizer(), callbacks=[recorder],
    )
    assert recorder.runs == []
    for vector, old in zip(again, vectors):
        assert_same_vector(vector, old)


def test_run_info_records_the_content_fingerprint_and_the_full_settings(full_runs, tmp_path):
    from dem_hf.training.checks import dataset_fingerprint

    output, data, _ = full_runs
    info = json.loads((output / "plain" / RUN_INFO_NAME).read_text())
    fingerprint = info["data"]["fingerprint"]
    assert fingerprint == dataset_fingerprint(data["plain"], ["text"])
    data["plain"].to_json(tmp_path / "plain.jsonl")  # the same rows from a file: the same fingerprint
    from dem_hf.training.trainers import load_training_dataset

    assert dataset_fingerprint(load_training_dataset(tmp_path / "plain.jsonl", "plain"), ["text"]) == fingerprint
    texts = list(data["plain"]["text"])
    edited = Dataset.from_dict({"text": texts[:5] + [texts[5].replace("w1", "w2", 1)] + texts[6:]})
    assert len(edited) == len(data["plain"]) and dataset_fingerprint(edited, ["text"]) != fingerprint
    assert dataset_fingerprint(Dataset.from_dict({"text": texts[::-1]}), ["text"]) != fingerprint  # order is trained on
    assert dataset_fingerprint(data["plain"].add_column("id", list(range(24))), ["text"]) == fingerprint  # unused column
    settings = info["sft_config"]
    for key in ("learning_rate", "adam_beta2", "max_grad_norm", "weight_decay", "optim", "lr_scheduler_type",
                "max_length", "seed", "num_train_epochs", "eos_token", "total_train_batch_size"):
        assert key in settings, key
    for key in ("output_dir", "logging_steps", "save_strategy", "hub_token", "report_to", "run_name", "disable_tqdm"):
        assert key not in settings, key


# ============================================================================================ acceptance 3


def test_interrupted_run_resumes_from_its_last_checkpoint(trained_base, tmp_path):
    config = sft_config(tmp_path, max_steps=6, save_strategy="steps", save_steps=2)
    data = {"plain": plain_data()}
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_distributions(trained_base, data, config, None, tmp_path, callbacks=[Crash(at_step=3)])
    assert (tmp_path / "plain" / "checkpoint-2").is_dir()
    assert json.loads((tmp_path / "plain" / RUN_INFO_NAME).read_text())["finished"] is False  # the setup, recorded first

    recorder = RunRecorder()
    [vector] = train_distributions(trained_base, data, config, None, tmp_path, callbacks=[recorder])
    assert recorder.runs == [{"name": "plain", "start": 2, "steps": 4}]
    assert vector.metadata["compute"]["global_step"] == 6
    assert json.loads((tmp_path / "plain" / RUN_INFO_NAME).read_text())["finished"] is True


def test_a_bad_dataset_listed_second_fails_before_the_first_trains(trained_base, tmp_path):
    """Every row of every dataset is read before the first run: a broken line far down the second file stops it all."""
    rows = [json.dumps({"text": cycle(0, i, 8)}) for i in range(30)]
    rows[26] = '{"text": "w1 w2'  # unterminated
    (tmp_path / "second.jsonl").write_text("\n".join(rows) + "\n")
    recorder = RunRecorder()
    with pytest.raises(ValueError, match=r"Dataset 'second': .*second\.jsonl, line 27: invalid JSON"):
        train_distributions(
            trained_base, {"first": plain_data(), "second": tmp_path / "second.jsonl"}, sft_config(tmp_path / "out"), None,
            tmp_path / "out", callbacks=[recorder],
        )
    assert recorder.runs == [] and not (tmp_path / "out").exists()
    chat = chat_data(n=6).to_list()
    chat[4]["messages"][1]["role"] = "robot"
    with pytest.raises(ValueError, match=r"Dataset 'chat', row 4, message 1: role 'robot'"):
        train_distributions(
            trained_base, {"first": plain_data(), "chat": Dataset.from_list(chat)}, sft_config(tmp_path / "out"), None,
            tmp_path / "out", processing_class=chat_tokenizer(), callbacks=[recorder],
        )
    assert recorder.runs == [] and not (tmp_path / "out").exists()


# ============================================================================================ acceptance 4


# Bad training input (refused before any run starts) is collected with the rest in tests/test_bad_inputs.py.


def test_datasets_load_from_local_files_folders_and_dataset_dicts(tmp_path):
    from datasets import DatasetDict

    from dem_hf.training.trainers import load_training_dataset

    data = plain_data(n=5)
    data.to_csv(tmp_path / "d.csv", index=False)
    data.to_json(tmp_path / "d.json", lines=False)
    data.to_json(tmp_path / "d.jsonl")
    data.to_parquet(tmp_path / "d.parquet")
    data.save_to_disk(tmp_path / "saved")
    DatasetDict({"train": data, "test": data.select([0])}).save_to_disk(tmp_path / "splits")
    sources = [tmp_path / f"d.{ext}" for ext in ("csv", "json", "jsonl", "parquet")]
    sources += [tmp_path / "saved", str(tmp_path / "splits"), DatasetDict({"only": data})]
    for source in sources:
        loaded = load_training_dataset(source, "d")
        assert list(loaded["text"]) == list(data["text"]), source
    with pytest.raises(ValueError, match=r"splits \['a', 'b'\] and no 'train' split"):
        load_training_dataset(DatasetDict({"a": data, "b": data}), "d")
    with pytest.raises(ValueError, match="cannot read"):
        (tmp_path / "d.xml").write_text("<x/>")
        load_training_dataset(tmp_path / "d.xml", "d")


def test_full_finetune_of_a_bf16_checkpoint_trained_in_float32_gives_a_vector_for_that_checkpoint(tmp_path):
    base = save_model(make_llama().to(torch.bfloat16), tmp_path / "bf16", make_tokenizer())
    (vector,) = train_distributions(base, {"ok": plain_data()}, sft_config(tmp_path / "out"), None, tmp_path / "out")
    DEMMerger.from_pretrained(base, vectors=[vector]).merge()


# ============================================================================================ acceptance 5


def test_mixture_sampling_follows_the_weights():
    sources = {"a": plain_data(0, 50), "b": plain_data(10, 30), "c": plain_data(20, 20)}
    weights = {"a": 5, "b": 3, "c": 2}  # need not sum to 1
    mixture = mix_datasets(sources, weights, num_examples=4000, seed=0)
    assert len(mixture) == 4000
    first_word = [text.split()[0] for text in list(mixture["text"])]
    shares = {name: sum(int(w[1:]) // 10 == k for w in first_word) / 4000 for k, name in enumerate(sources)}
    for name, weight in weights.items():
        assert abs(shares[name] - weight / 10) < 0.03, shares
    assert len(mix_datasets(sources, {"a": 1, "b": 0, "c": 1}, seed=0)) == 100  # default: total size
    without_b = list(mix_datasets(sources, {"a": 1, "b": 0, "c": 1}, seed=0)["text"])
    assert not any(int(text.split()[0][1:]) // 10 == 1 for text in without_b)
    with pytest.raises(ValueError, match=r"missing \['c'\]"):
        mix_datasets(sources, {"a": 1, "b": 1})
    with pytest.raises(ValueError, match="finite number >= 0"):
        mix_datasets(sources, {"a": 1, "b": -1, "c": 1})


def test_train_mixture_records_weights_counts_and_compute(trained_base, tmp_path):
    data = {"plain": plain_data(), "other": plain_data(start=50)}
    run = train_mixture(trained_base, data, {"plain": 3, "other": 1}, sft_config(tmp_path, max_steps=2), None, tmp_path)
    assert run.name == "mixture_plain-3_other-1" and not run.reused
    info = json.loads((run.run_dir / RUN_INFO_NAME).read_text())
    assert info["finished"] is True and info["probabilities"] == {"plain": 0.75, "other": 0.25}
    assert sum(info["examples_per_dataset"].values()) == info["data"]["num_examples"] == 48
    assert info["compute"]["tokens_seen"] > 0 and info["compute"]["total_flos"] > 0
    assert (run.model_dir / "model.safetensors").is_file()
    again = train_mixture(trained_base, data, {"plain": 3, "other": 1}, sft_config(tmp_path, max_steps=2), None, tmp_path)
    assert again.reused and again.info == info
    with pytest.raises(ValueError, match="one format"):
        train_mixture(trained_base, {"plain": plain_data(), "qa": qa_data()}, {"plain": 1, "qa": 1}, sft_config(tmp_path), None, tmp_path)


def test_warm_start_is_the_uniform_mixture_merged_as_peft_merges_it_and_the_runs_start_from_it(trained_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dem_hf.io.reader import CheckpointReader
    from dem_hf.io.tensors import fingerprint

    data = {"plain": plain_data(), "other": plain_data(start=50)}
    run = train_warm_start(trained_base, data, sft_config(tmp_path, max_steps=3, learning_rate=5e-2), LoraConfig(**LORA), tmp_path / "warm")
    warm = run.model_dir
    assert run.info["compute"]["global_step"] == 3
    run_dir = tmp_path / "warm" / "mixture_plain-1_other-1"
    assert warm == run_dir / "merged"
    assert json.loads((run_dir / RUN_INFO_NAME).read_text())["probabilities"] == {"plain": 0.5, "other": 0.5}
    merged = AutoModelForCausalLM.from_pretrained(warm)
    peft_merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trained_base), run_dir / "adapter").merge_and_unload()
    expected = peft_merged.state_dict()
    assert any(not torch.equal(w, make_llama().from_pretrained(trained_base).state_dict()[n]) for n, w in expected.items())
    for name, weight in merged.state_dict().items():
        torch.testing.assert_close(weight, expected[name], rtol=1e-5, atol=1e-6)
    assert (warm / "tokenizer.json").is_file()

    stamp = (warm / "model.safetensors").stat().st_mtime_ns
    assert train_warm_start(trained_base, data, sft_config(tmp_path, max_steps=3, learning_rate=5e-2), LoraConfig(**LORA), tmp_path / "warm").model_dir == warm
    assert (warm / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not merged again

    vectors = train_distributions(warm, data, sft_config(tmp_path, max_steps=2, learning_rate=5e-2), LoraConfig(**LORA), tmp_path / "runs")
    assert all(v.base_fingerprint == fingerprint(CheckpointReader(warm)) for v in vectors)
    DEMMerger.from_pretrained(warm, vectors=vectors).merge({"plain": 0.5, "other": 0.5})  # the vectors apply to it

    with pytest.raises(ValueError, match="learning_rate"):  # other settings: refused before training, as a mixture is
        train_warm_start(trained_base, data, sft_config(tmp_path, max_steps=3), LoraConfig(**LORA), tmp_path / "warm")
    again = train_warm_start(trained_base, data, sft_config(tmp_path, max_steps=3), LoraConfig(**LORA), tmp_path / "warm", retrain=True).model_dir
    retrained = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert again == warm and any(not torch.equal(w, merged.state_dict()[n]) for n, w in retrained.items())


def test_warm_start_of_a_full_fine_tune_is_its_model_and_the_base_must_be_a_folder(trained_base, tmp_path):
    data = {"plain": plain_data(), "other": plain_data(start=50)}
    warm = train_warm_start(trained_base, data, sft_config(tmp_path, max_steps=1), None, tmp_path, weights={"plain": 3, "other": 1}).model_dir
    assert warm == tmp_path / "mixture_plain-3_other-1" / "model" and (warm / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="folder or Hub id.*got LlamaForCausalLM"):
        train_warm_start(make_llama(), data, sft_config(tmp_path), LoraConfig(**LORA), tmp_path)


# ============================================================================================ CLI


def test_cli_trains_lora_runs_from_local_files(trained_base, tmp_path, capsys):
    plain_data().to_json(tmp_path / "plain.jsonl")
    qa_data().to_parquet(tmp_path / "qa.parquet")
    argv = [
        "train", "--base", str(trained_base), "--dataset", f"plain={tmp_path / 'plain.jsonl'}",
        "--dataset", str(tmp_path / "qa.parquet"), "--output_dir", str(tmp_path / "runs"), "--max_steps", "2",
        "--use_cpu", "--report_to", "none", "--per-device-train-batch-size", "8",
        "--disable_tqdm", "true", "--lora-r", "2", "--target-modules", "q_proj", "v_proj",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "plain" in out and "qa" in out
    for name in ("plain", "qa"):
        vector = DistributionVector.from_pretrained(tmp_path / "runs" / name / "vector")
        assert vector.vector_type == "lora" and vector.metadata["compute"]["global_step"] == 2
        assert vector.metadata["peft_config"]["r"] == 2
    assert main([*argv, "--learning_rate", "1e-3"]) == 2  # other settings: refused, with the way out
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress messages
    assert last.startswith("dem-hf train: error: Run 'plain'") and "learning_rate" in last and "--retrain" in last
    assert "Traceback" not in err
    assert main([*argv, "--learning_rate", "1e-3", "--retrain"]) == 0
    for name in ("plain", "qa"):
        assert json.loads((tmp_path / "runs" / name / RUN_INFO_NAME).read_text())["sft_config"]["learning_rate"] == 1e-3


def test_cli_trains_the_runs_from_a_shared_warm_start(trained_base, tmp_path, capsys):
    from dem_hf.io.reader import CheckpointReader
    from dem_hf.io.tensors import fingerprint

    plain_data().to_json(tmp_path / "plain.jsonl")
    plain_data(start=50).to_json(tmp_path / "other.jsonl")
    argv = [
        "train", "--base", str(trained_base), "--dataset", f"plain={tmp_path / 'plain.jsonl'}", "--dataset",
        f"other={tmp_path / 'other.jsonl'}", "--output_dir", str(tmp_path / "runs"), "--max_steps", "1", "--use_cpu",
        "--report_to", "none", "--per-device-train-batch-size", "8", "--disable_tqdm", "true", "--lora-r", "2",
        "--target-modules", "q_proj", "v_proj", "--warm_start_steps", "2",
    ]
    assert main(argv) == 0
    warm = tmp_path / "runs" / "mixture_plain-1_other-1" / "merged"
    assert f"warm start (2 mixture steps): {warm}" in capsys.readouterr().out
    for name in ("plain", "other"):
        vector = DistributionVector.from_pretrained(tmp_path / "runs" / name / "vector")
        assert vector.base_fingerprint == fingerprint(CheckpointReader(warm)) and vector.metadata["compute"]["global_step"] == 1
    assert main([*argv[:-1], "-1"]) == 2
    assert "--warm_start_steps: expected a number of steps >= 0, got -1" in capsys.readouterr().err


def test_cli_parses_sft_config_options_and_keeps_debug(tmp_path, capsys):
    from dem_hf.commands.train import lora_config_from_args, sft_config_from_args

    argv = [
        "--debug", "train", "--base", "b", "--dataset", "x=data.csv", "--output-dir", str(tmp_path),
        "--learning_rate", "3e-4", "--no_gradient_checkpointing", "--use_cpu", "--bf16", "false",
    ]
    args = build_parser(argv).parse_args(argv)
    assert args.debug is True and args.dataset == [("x", "data.csv")]
    config = sft_config_from_args(args)
    assert config.learning_rate == 3e-4 and config.gradient_checkpointing is False
    assert config.output_dir == str(tmp_path) and lora_config_from_args(args) is None
    code = main(["train", "--base", "b", "--dataset", "a=x.csv", "--dataset", "a=y.csv", "--output_dir",
                 str(tmp_path), "--use_cpu", "--bf16", "false"])
    assert code == 2 and "Duplicate dataset name 'a'" in capsys.readouterr().err


def test_a_dataset_left_empty_by_truncation_is_refused_with_the_reason(trained_base, tmp_path):
    """Prompts longer than max_length: TRL drops every example (no completion token survives the cut); the run is
    refused with a ValueError naming max_length, not the sampler's `num_samples=0` deep inside the trainer."""
    long_prompts = Dataset.from_dict({"prompt": [cycle(20, i, 40) for i in range(8)], "completion": [" w1 w2"] * 8})
    with pytest.raises(ValueError, match="max_length=16"):
        train_distributions(trained_base, {"long": long_prompts}, sft_config(tmp_path / "runs", max_length=16),
                            LoraConfig(**LORA), tmp_path / "runs")

