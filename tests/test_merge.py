"""DEMMerger: exact merges (full and LoRA), both weighting conventions, streaming save, round trips."""

from __future__ import annotations

import json
import math
import re
import shutil
from fractions import Fraction

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from dem_hf import DEMConfig, DEMMerger, DistributionVector
from dem_hf.io.tensors import untied_state_dict
from dem_hf.merging.config import check_coefficients

from .conftest import make_llama, perturbed

INPUT_IDS = torch.tensor([[2, 5, 9, 17, 33, 8, 41, 3]])


@pytest.fixture
def vector_dirs(tmp_path, base_dir, finetuned_dirs):
    return {
        name: DistributionVector.from_models(base_dir, folder, name=name, save_directory=tmp_path / "vectors" / name).path
        for name, folder in finetuned_dirs.items()
    }


def lora_vector(seed: int, name: str) -> DistributionVector:
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    return DistributionVector.from_peft(get_peft_model(make_llama(), config), name=name)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT_IDS).logits


def test_merge_with_weight_one_reproduces_the_finetuned_model(base_dir, finetuned_dirs, vector_dirs):
    merger = DEMMerger.from_pretrained(base_dir, vectors=[vector_dirs["math"]])
    merged = untied_state_dict(merger.merge({"math": 1.0}))
    tuned = untied_state_dict(AutoModelForCausalLM.from_pretrained(finetuned_dirs["math"]))
    for name, tensor in tuned.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6)


def test_sum_weighting_is_base_plus_weighted_deltas(base_dir, vector_dirs, base_model):
    merger = DEMMerger.from_pretrained(base_dir, vectors=vector_dirs.values())
    weights = {"math": 0.5, "chat": -0.25, "code": 1.5}
    merged = untied_state_dict(merger.merge(weights))
    for name, tensor in untied_state_dict(base_model).items():
        expected = tensor + sum(w * merger.vectors[v].delta(name) for v, w in weights.items())
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)


def test_average_weighting_is_the_parameter_average(base_dir, finetuned_dirs, vector_dirs):
    merger = DEMMerger.from_pretrained(base_dir, vectors=vector_dirs.values(), config=DEMConfig(weighting="average"))
    weights = {"math": 1.0, "chat": 2.0, "code": 1.0}
    merged = untied_state_dict(merger.merge(weights))
    tuned = {n: untied_state_dict(AutoModelForCausalLM.from_pretrained(f)) for n, f in finetuned_dirs.items()}
    for name, tensor in merged.items():
        average = sum(weights[n] * tuned[n][name] for n in tuned) / sum(weights.values())
        torch.testing.assert_close(tensor, average, rtol=0, atol=1e-6)


def test_two_lora_vectors_merge_to_the_exact_dense_sum(base_dir, base_model):
    math, chat = lora_vector(1, "math"), lora_vector(2, "chat")
    merger = DEMMerger.from_pretrained(base_dir, vectors=[math, chat])
    merged = untied_state_dict(merger.merge({"math": 0.7, "chat": -0.3}))
    for name, tensor in untied_state_dict(base_model).items():
        expected = tensor.clone()
        for vector, weight in ((math, 0.7), (chat, -0.3)):
            module = vector.lora_modules.get(name)
            if module is not None:
                a, b = vector.tensors.get(name + ".lora_A"), vector.tensors.get(name + ".lora_B")
                expected += weight * (b @ a) * module.scaling
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)


def test_peft_linear_combination_is_not_the_weighted_sum():
    """Documents the peer trap: PEFT's `linear` combination gives (Σ√w B)(Σ√w A), with cross terms."""
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    model = get_peft_model(make_llama(), config, adapter_name="math")
    model.add_adapter("chat", config)
    for name, param in model.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(param, std=0.5)
    math = DistributionVector.from_peft(model, name="math", adapter_name="math")
    chat = DistributionVector.from_peft(model, name="chat", adapter_name="chat")
    model.add_weighted_adapter(["math", "chat"], [0.7, 0.3], adapter_name="mix", combination_type="linear")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    peft_delta = layer.get_delta_weight("mix")
    name = "model.layers.0.self_attn.q_proj.weight"
    exact = 0.7 * math.delta(name) + 0.3 * chat.delta(name)
    assert not torch.allclose(peft_delta, exact, atol=1e-3)


def test_saved_folder_loads_with_transformers_and_matches_in_memory_merge(tmp_path, base_dir, vector_dirs):
    merger = DEMMerger.from_pretrained(base_dir, vectors=vector_dirs.values())
    weights = {"math": 0.6, "chat": 0.3, "code": 0.9}
    out = merger.save_pretrained(tmp_path / "dem", weights, max_shard_size=20_000)
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files and "config.json" in files and "generation_config.json" in files
    assert "tokenizer.json" in files and "dem_config.json" in files
    assert len([f for f in files if f.startswith("model-")]) > 1
    loaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(loaded), logits(merger.merge(weights)), rtol=0, atol=0)


def test_merger_round_trips_through_save_pretrained(tmp_path, base_dir, vector_dirs):
    merger = DEMMerger.from_pretrained(base_dir, vectors=vector_dirs.values(), config=DEMConfig(weighting="average"))
    weights = {"math": 0.2, "chat": 0.3, "code": 0.5}
    out = merger.save_pretrained(tmp_path / "dem", weights)
    restored = DEMMerger.from_pretrained(out)
    assert restored.config.base_model_name_or_path == str(base_dir)
    assert restored.vector_names == ["math", "chat", "code"]
    assert restored.config.coefficients == weights and restored.config.weighting == "average"
    torch.testing.assert_close(logits(restored.merge()), logits(AutoModelForCausalLM.from_pretrained(out)), rtol=0, atol=0)


def test_in_memory_vectors_are_saved_with_the_model(tmp_path, base_dir):
    merger = DEMMerger.from_pretrained(base_dir, vectors=[lora_vector(1, "math")])
    out = merger.save_pretrained(tmp_path / "dem", {"math": 0.5})
    assert (out / "vectors" / "math" / "vector_config.json").is_file()
    restored = DEMMerger.from_pretrained(out)
    assert restored.vectors["math"].vector_type == "lora"
    torch.testing.assert_close(logits(restored.merge()), logits(merger.merge()), rtol=0, atol=0)


def test_incremental_add_vector(base_dir, vector_dirs, base_model):
    merger = DEMMerger.from_pretrained(base_dir, vectors=[vector_dirs["math"]])
    merger.add_vector(vector_dirs["chat"], coefficient=0.5)
    assert merger.config.coefficients == {"math": 1.0, "chat": 0.5}
    merged = untied_state_dict(merger.merge())
    name = "model.layers.1.mlp.up_proj.weight"
    expected = untied_state_dict(base_model)[name] + merger.vectors["math"].delta(name) + 0.5 * merger.vectors["chat"].delta(name)
    torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)


def test_tied_embeddings_stay_tied_and_are_merged_once(tmp_path, base_dir, vector_dirs):
    merger = DEMMerger.from_pretrained(base_dir, vectors=vector_dirs.values())
    model = merger.merge()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    out = merger.save_pretrained(tmp_path / "dem")
    index = json.loads((out / "model.safetensors.index.json").read_text()) if (out / "model.safetensors.index.json").exists() else None
    names = set(index["weight_map"]) if index else set(__import__("safetensors").safe_open(out / "model.safetensors", "pt").keys())
    assert "lm_head.weight" not in names
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out).lm_head.weight, model.lm_head.weight, rtol=0, atol=0)


def test_bf16_merge_is_within_one_rounding_of_fp32(tmp_path):
    base = make_llama().to(torch.bfloat16)
    tuned = make_llama(seed=3).to(torch.bfloat16)
    tuned.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in base.state_dict().items()})
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    vector = DistributionVector.from_models(base, tuned, name="x")
    merged = untied_state_dict(DEMMerger.from_pretrained(base_dir, vectors=[vector]).merge({"x": 0.37}))
    for name, tensor in untied_state_dict(base).items():
        exact = tensor.float() + 0.37 * vector.delta(name)
        assert merged[name].dtype == torch.bfloat16
        assert torch.equal(merged[name], exact.to(torch.bfloat16))


def test_finetune_saved_in_another_float_dtype_still_gives_an_exact_vector(tmp_path, base_dir, base_model):
    """TRL loads a bf16 checkpoint in float32 by default: deltas are taken in float32, whatever the dtypes."""
    tuned = perturbed(base_model, seed=1).to(torch.float16)
    vector = DistributionVector.from_models(base_dir, tuned, name="half")
    merged = untied_state_dict(DEMMerger.from_pretrained(base_dir, vectors=[vector]).merge({"half": 1.0}))
    for name, tensor in untied_state_dict(tuned).items():
        torch.testing.assert_close(merged[name], tensor.float(), rtol=0, atol=1e-3)


def test_merge_records_the_coefficients_it_merged_with(tmp_path, base_dir, vector_dirs):
    """One rule for what gets saved: the last merge(), save_pretrained() or search() sets config.coefficients."""
    merger = DEMMerger.from_pretrained(base_dir, vectors=vector_dirs.values())
    merger.merge({"math": 0.1})
    assert merger.config.coefficients == {"math": 0.1, "chat": 1.0, "code": 1.0}
    with pytest.raises(ValueError, match="poetry"):
        merger.merge({"math": 0.2, "poetry": 1.0})
    assert merger.config.coefficients == {"math": 0.1, "chat": 1.0, "code": 1.0}  # a refused merge records nothing
    merger.save_pretrained(tmp_path / "dem", {"chat": 0.3})
    assert merger.config.coefficients == {"math": 0.1, "chat": 0.3, "code": 1.0}


def test_save_after_merge_writes_exactly_the_merged_model(tmp_path, base_dir, vector_dirs):
    """The README's tour: `model = merger.merge(c)` then `merger.save_pretrained(d)` saves that model, and the folder
    restores c (the oracle is the in-memory model, loaded by Transformers from the saved folder)."""
    merger = DEMMerger.from_pretrained(base_dir, vectors=vector_dirs.values())
    coefficients = {"math": 0.7, "chat": 0.5, "code": 0.3}
    model = merger.merge(coefficients=coefficients)
    out = merger.save_pretrained(tmp_path / "dem-model")
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out)), logits(model), rtol=0, atol=0)
    assert json.loads((out / "dem_config.json").read_text())["coefficients"] == coefficients
    restored = DEMMerger.from_pretrained(out)
    assert restored.config.coefficients == coefficients
    torch.testing.assert_close(logits(restored.merge()), logits(model), rtol=0, atol=0)


def test_streaming_merge_does_not_depend_on_threads_or_block_size(tmp_path, base_dir, vector_dirs, monkeypatch):
    """Worker threads and block sizes change how a merge is scheduled, never its bytes; every variant also equals
    the in-memory merge exactly (full and LoRA vectors, many blocks per tensor, several shards)."""
    import dem_hf.merging.arithmetic

    vectors = [DistributionVector.from_pretrained(path) for path in vector_dirs.values()] + [lora_vector(2, "lora")]
    weights = {"math": 0.6, "chat": -0.3, "code": 0.9, "lora": 0.7}
    outputs = {}
    for workers, block_values in [(1, 1 << 18), (3, 1 << 18), (3, 1000)]:
        monkeypatch.setattr(dem_hf.merging.arithmetic, "MERGE_WORKERS", workers)
        monkeypatch.setattr(dem_hf.merging.arithmetic, "MERGE_BLOCK_VALUES", block_values)
        merger = DEMMerger.from_pretrained(base_dir, vectors=vectors)
        out = merger.save_pretrained(tmp_path / f"dem-{workers}-{block_values}", weights, max_shard_size=50_000)
        outputs[workers, block_values] = {p.name: p.read_bytes() for p in sorted(out.glob("model*"))}
        assert len(outputs[workers, block_values]) > 2  # shards and an index
        loaded = AutoModelForCausalLM.from_pretrained(out)
        torch.testing.assert_close(logits(loaded), logits(merger.merge(weights)), rtol=0, atol=0)
    assert outputs[1, 1 << 18] == outputs[3, 1 << 18]


@pytest.mark.parametrize(
    "weight",
    [np.float32(0.5), np.float64(0.5), np.float16(0.5), torch.tensor(0.5), torch.tensor(0.5, dtype=torch.bfloat16),
     torch.tensor([0.5]), np.array(0.5), Fraction(1, 2)],
    ids=["np.float32", "np.float64", "np.float16", "torch 0-d", "torch bf16 0-d", "torch one element", "np 0-d", "Fraction"],
)
def test_numpy_and_torch_scalar_coefficients_are_plain_floats(weight, tmp_path, base_dir, vector_dirs):
    """What a search loop or a NumPy grid hands over is accepted as the number it holds, and stored as a float."""
    assert check_coefficients({"math": weight}) == {"math": 0.5} and type(check_coefficients({"math": weight})["math"]) is float
    assert type(check_coefficients({"math": np.int64(2)})["math"]) is float
    merger = DEMMerger.from_pretrained(base_dir, vectors=[vector_dirs["math"]])
    out = merger.save_pretrained(tmp_path / "dem", {"math": weight}, card=False)
    assert json.loads((out / "dem_config.json").read_text())["coefficients"] == {"math": 0.5}
    torch.testing.assert_close(logits(merger.merge({"math": weight})), logits(merger.merge({"math": 0.5})), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        (True, "got True"), (np.bool_(True), "got True"), (torch.tensor(True), "got True"),
        (np.float32("nan"), "got nan"), (torch.tensor(math.inf), "got inf"), ("0.5", "got '0.5'"),
        (np.array([0.5, 0.5]), "one number, got an array of shape (2,)"),
        (torch.tensor([[0.5, 1.0]]), "one number, got an array of shape (1, 2)"), (1 + 0j, "got (1+0j)"),
    ],
)
def test_coefficients_that_are_not_one_finite_number_are_refused(weight, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_coefficients({"math": weight})


# ------------------------------------------------------------------------------------------------ folders that restore anywhere


def relative_merger(tmp_path, monkeypatch, names=("math", "chat")) -> DEMMerger:
    """A merger built from paths relative to `tmp_path`, the working directory."""
    monkeypatch.chdir(tmp_path)
    return DEMMerger.from_pretrained("base", vectors=[f"vectors/{name}" for name in names])


@pytest.mark.parametrize("save_vectors", [True, False])
def test_saved_folder_restores_from_another_working_directory(save_vectors, tmp_path, monkeypatch, base_dir, vector_dirs):
    merger = relative_merger(tmp_path, monkeypatch)
    model = merger.merge({"math": 0.4, "chat": 1.2})
    out = merger.save_pretrained("dem", save_vectors=save_vectors)
    recorded = json.loads((out / "dem_config.json").read_text())
    assert recorded["base_model_name_or_path"] == str(base_dir) and recorded["base_revision"] is None
    assert {n: v["source"] for n, v in recorded["vectors"].items()} == {n: str(vector_dirs[n]) for n in ["math", "chat"]}

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    restored = DEMMerger.from_pretrained(tmp_path / "dem")
    assert restored.config.coefficients == {"math": 0.4, "chat": 1.2}
    where = tmp_path / "dem" / "vectors" if save_vectors else tmp_path / "vectors"
    assert {n: v.path for n, v in restored.vectors.items()} == {n: where / n for n in ["math", "chat"]}
    torch.testing.assert_close(logits(restored.merge()), logits(model), rtol=0, atol=0)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "dem")), logits(model), rtol=0, atol=0)


def test_vectors_are_copied_by_default_and_outlive_their_sources(tmp_path, base_dir, finetuned_dirs, vector_dirs):
    sharded = DistributionVector.from_models(
        base_dir, finetuned_dirs["code"], name="code", save_directory=tmp_path / "sharded", max_shard_size=20_000
    )
    merger = DEMMerger.from_pretrained(base_dir, vectors=[vector_dirs["math"], sharded])
    merger.add_vector(lora_vector(3, "lora"))  # in memory
    model = merger.merge({"math": 0.5, "code": -0.7, "lora": 1.5})
    out = merger.save_pretrained(tmp_path / "dem")

    assert sorted(p.name for p in (out / "vectors").iterdir()) == ["code", "lora", "math"]
    for name, source in [("math", vector_dirs["math"]), ("code", tmp_path / "sharded")]:
        copied = {p.name: p.read_bytes() for p in (out / "vectors" / name).iterdir()}
        assert copied == {p.name: p.read_bytes() for p in source.iterdir()}  # the same files, byte for byte
    assert len(list((out / "vectors" / "code").glob("vector-*.safetensors"))) > 1
    for source in [tmp_path / "vectors", tmp_path / "sharded"]:
        shutil.rmtree(source)
    restored = DEMMerger.from_pretrained(out)
    torch.testing.assert_close(logits(restored.merge()), logits(model), rtol=0, atol=0)


def test_a_renamed_vector_is_copied_under_its_merger_name(tmp_path, base_dir, vector_dirs):
    merger = DEMMerger.from_pretrained(base_dir, vectors=[DistributionVector.from_pretrained(vector_dirs["math"], name="gsm")])
    out = merger.save_pretrained(tmp_path / "dem")
    assert json.loads((out / "vectors" / "gsm" / "vector_config.json").read_text())["name"] == "gsm"
    assert DEMMerger.from_pretrained(out).vector_names == ["gsm"]


def test_old_configs_with_relative_paths_still_load(tmp_path, monkeypatch, vector_dirs):
    """dem_config.json files written before absolute paths: the base and sources relative to the working directory."""
    merger = relative_merger(tmp_path, monkeypatch)
    model = merger.merge({"math": 0.3, "chat": 0.9})
    out = merger.save_pretrained("dem", save_vectors=False)
    config = json.loads((out / "dem_config.json").read_text())
    config.pop("base_revision")
    config["base_model_name_or_path"] = "base"
    for name, info in config["vectors"].items():
        info["source"] = f"vectors/{name}"
    (out / "dem_config.json").write_text(json.dumps(config))

    restored = DEMMerger.from_pretrained("dem")
    assert restored.vector_names == ["math", "chat"] and restored.config.coefficients == {"math": 0.3, "chat": 0.9}
    torch.testing.assert_close(logits(restored.merge()), logits(model), rtol=0, atol=0)
    assert restored.config.base_model_name_or_path == str(tmp_path / "base")  # recorded absolute from now on


def test_save_vectors_must_be_a_bool(tmp_path, base_dir, vector_dirs):
    merger = DEMMerger.from_pretrained(base_dir, vectors=[vector_dirs["math"]])
    with pytest.raises(ValueError, match="save_vectors must be True or False, got None"):
        merger.save_pretrained(tmp_path / "dem", save_vectors=None)
    assert not (tmp_path / "dem").exists()
