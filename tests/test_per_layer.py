"""Per-layer / per-module coefficients (issue 16 item 1): groups, merges, save/load, gradients, the search."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from dem_hf import DEMConfig, DEMMerger, DistributionVector
from dem_hf.io.tensors import untied_state_dict
from dem_hf.merging.groups import coefficient_for, group_names, tensor_group, tensor_groups

from .conftest import make_llama

LAYER_GROUPS = ["embeddings", "layer.0", "layer.1", "head"]


@pytest.fixture
def vector_dirs(tmp_path, base_dir, finetuned_dirs):
    return {
        name: DistributionVector.from_models(base_dir, folder, name=name, save_directory=tmp_path / "vectors" / name).path
        for name, folder in finetuned_dirs.items()
    }


def saved_weights(folder) -> dict[str, torch.Tensor]:
    weights = {}
    for file in sorted(folder.glob("model*.safetensors")):
        weights.update(load_file(file))
    return weights


# ------------------------------------------------------------------------------------------------ groups


def test_groups_follow_the_blocks_of_the_model():
    names = list(make_llama().state_dict())
    assert group_names(names, "layer") == LAYER_GROUPS
    assert group_names(names, "module") == [
        "embeddings", "layer.0.attention", "layer.0.mlp", "layer.0.norm",
        "layer.1.attention", "layer.1.mlp", "layer.1.norm", "head",
    ]
    assert tensor_group("model.layers.1.post_attention_layernorm.weight", "module") == "layer.1.norm"
    assert tensor_group("model.norm.weight", "layer") == "head"
    assert tensor_group("lm_head.weight", "module") == "head"
    # GPT-2 names (transformer.h.<i>), and the first index wins as in PEFT (experts of an MoE block)
    assert tensor_group("transformer.h.3.attn.c_attn.weight", "module") == "layer.3.attention"
    assert tensor_group("transformer.h.0.ln_1.weight", "module") == "layer.0.norm"
    assert tensor_group("transformer.wte.weight", "layer") == "embeddings"
    assert tensor_group("model.layers.2.mlp.experts.7.w1.weight", "layer") == "layer.2"


def test_a_model_without_blocks_is_refused_for_layer_granularity():
    with pytest.raises(ValueError, match="needs transformer blocks"):
        tensor_groups(["encoder.weight", "decoder.weight"], "layer")
    assert set(tensor_groups(["encoder.weight"], "vector").values()) == {"all"}


def test_a_tensor_takes_its_module_group_then_its_block_then_the_default():
    value = {"layer.0.mlp": 0.25, "layer.0": 0.5, "*": 0.75}
    assert coefficient_for(value, "model.layers.0.mlp.up_proj.weight") == 0.25
    assert coefficient_for(value, "model.layers.0.self_attn.q_proj.weight") == 0.5
    assert coefficient_for(value, "model.layers.1.self_attn.q_proj.weight") == 0.75
    assert coefficient_for({"layer.1": 2.0}, "lm_head.weight") == 1.0
    assert coefficient_for(0.3, "lm_head.weight") == 0.3


# ------------------------------------------------------------------------------------------------ merging


@pytest.mark.parametrize("weighting", ["sum", "average"])
def test_per_layer_coefficients_equal_to_per_vector_ones_merge_bit_for_bit(tmp_path, base_dir, vector_dirs, weighting):
    """(a) the same arithmetic per tensor: merge() and save_pretrained agree with today's merge exactly."""
    per_vector = {"math": 0.7, "chat": -0.3, "code": 1.3}
    per_layer = {n: {g: w for g in LAYER_GROUPS} for n, w in per_vector.items()}
    per_module = {"math": {"*": 0.7}, "chat": {"layer.0.mlp": -0.3, "*": -0.3}, "code": 1.3}
    merger = DEMMerger.from_pretrained(base_dir, vectors=vector_dirs.values(), config=DEMConfig(weighting=weighting))
    expected = untied_state_dict(merger.merge(per_vector))
    for coefficients in (per_layer, per_module):
        merged = untied_state_dict(merger.merge(coefficients))
        assert merged.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(merged[name], tensor), name
    merger.save_pretrained(tmp_path / "flat", per_vector)
    merger.save_pretrained(tmp_path / "grouped", per_layer)
    flat, grouped = saved_weights(tmp_path / "flat"), saved_weights(tmp_path / "grouped")
    assert flat.keys() == grouped.keys()
    for name, tensor in flat.items():
        assert torch.equal(grouped[name], tensor), name


def test_per_layer_coefficients_apply_per_tensor(base_dir, vector_dirs, base_model):
    merger = DEMMerger.from_pretrained(base_dir, vectors=[vector_dirs["math"], vector_dirs["chat"]])
    coefficients = {"math": {"layer.0": 2.0, "layer.1": -1.0, "*": 0.5}, "chat": {"layer.1.mlp": 3.0, "*": 0.0}}
    merged = untied_state_dict(merger.merge(coefficients))
    for name, tensor in untied_state_dict(base_model).items():
        expected = tensor + sum(
            coefficient_for(coefficients[v], name) * merger.vectors[v].delta(name) for v in coefficients
        )
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)


def test_average_weighting_normalises_per_group(base_dir, vector_dirs, base_model):
    merger = DEMMerger.from_pretrained(
        base_dir, vectors=[vector_dirs["math"], vector_dirs["chat"]], config=DEMConfig(weighting="average")
    )
    coefficients = {"math": {"layer.0": 1.0, "*": 3.0}, "chat": {"layer.0": 3.0, "*": 1.0}}
    merged = untied_state_dict(merger.merge(coefficients))
    name0, name1 = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    base = untied_state_dict(base_model)
    delta = {v: {n: merger.vectors[v].delta(n) for n in (name0, name1)} for v in coefficients}
    torch.testing.assert_close(merged[name0], base[name0] + 0.25 * delta["math"][name0] + 0.75 * delta["chat"][name0], rtol=0, atol=1e-6)
    torch.testing.assert_close(merged[name1], base[name1] + 0.75 * delta["math"][name1] + 0.25 * delta["chat"][name1], rtol=0, atol=1e-6)


def test_saved_loaded_merged_equals_in_memory(tmp_path, base_dir, vector_dirs):
    """(c) per-group coefficients go into dem_config.json (schema 2) and come back with from_pretrained."""
    merger = DEMMerger.from_pretrained(base_dir, vectors=vector_dirs.values())
    coefficients = {"math": {"layer.0": 0.2, "layer.1.attention": 1.7, "*": 0.9}, "chat": 0.4, "code": {"head": 0.0}}
    in_memory = untied_state_dict(merger.merge(coefficients))
    merger.save_pretrained(tmp_path / "dem")
    saved = json.loads((tmp_path / "dem" / "dem_config.json").read_text())
    assert saved["schema_version"] == 2
    assert saved["coefficients"]["math"] == {"layer.0": 0.2, "layer.1.attention": 1.7, "*": 0.9}
    restored = DEMMerger.from_pretrained(tmp_path / "dem")
    assert restored.config.coefficients == merger.config.coefficients
    again = untied_state_dict(restored.merge())
    on_disk = saved_weights(tmp_path / "dem")
    for name, tensor in in_memory.items():
        assert torch.equal(again[name], tensor), name
        assert torch.equal(on_disk[name], tensor), name


def test_old_configs_without_schema_version_still_load(tmp_path, base_dir, vector_dirs):
    merger = DEMMerger.from_pretrained(base_dir, vectors=vector_dirs.values())
    merger.save_pretrained(tmp_path / "dem", {"math": 0.5, "chat": 1.0, "code": 0.25})
    path = tmp_path / "dem" / "dem_config.json"
    values = json.loads(path.read_text())
    del values["schema_version"]
    path.write_text(json.dumps(values))
    restored = DEMMerger.from_pretrained(tmp_path / "dem")
    assert restored.config.coefficients == {"math": 0.5, "chat": 1.0, "code": 0.25}
    assert restored.config.schema_version == 2
    values["schema_version"] = 3
    path.write_text(json.dumps(values))
    with pytest.raises(ValueError, match="schema_version 3"):
        DEMMerger.from_pretrained(tmp_path / "dem")


def test_lora_vectors_take_per_group_coefficients(base_dir):
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], init_lora_weights=False)
    vector = DistributionVector.from_peft(get_peft_model(make_llama(), config), name="lora")
    merger = DEMMerger.from_pretrained(base_dir, vectors=[vector])
    flat = untied_state_dict(merger.merge({"lora": 0.6}))
    grouped = untied_state_dict(merger.merge({"lora": {"layer.0": 0.6, "layer.1": 0.6}}))
    for name, tensor in flat.items():
        assert torch.equal(grouped[name], tensor), name
    split = untied_state_dict(merger.merge({"lora": {"layer.0": 0.0, "*": 0.6}}))
    name0, name1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(split[name1], flat[name1])
    assert not torch.equal(split[name0], flat[name0])
