"""LoRA adapters merge exactly as PEFT means them: the oracle is PEFT's own `merge_and_unload()`.

Every configuration is trained into non-zero random weights (LoRA factors, biases, `modules_to_save`
copies), saved, turned into a vector both from the folder and from the in-memory `PeftModel`, merged with
coefficient 1.0 in memory and through a saved folder, and compared with PEFT's merged model; or it is
refused with a clear `ValueError` before anything is merged.
"""

from __future__ import annotations

import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from dem_hf import DEMMerger, DistributionVector

from .conftest import make_llama, save_model

INPUT_IDS = torch.tensor([[2, 5, 9, 17, 33, 8, 41, 3], [2, 60, 61, 7, 12, 13, 1, 3]])
BIASES = dict(attention_bias=True, mlp_bias=True)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = ATTENTION + ["gate_proj", "up_proj", "down_proj"]

# name: (LoraConfig arguments, model arguments, None for "equals PEFT" or the expected refusal's words)
CONFIGURATIONS = {
    "plain": (dict(target_modules=["q_proj", "v_proj", "down_proj"]), {}, None),
    "rslora": (dict(r=4, lora_alpha=8, target_modules=ATTENTION, use_rslora=True), {}, None),
    "patterns with regex keys": (
        dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR, rank_pattern={"q_proj|v_proj": 2}, alpha_pattern={"q_proj|v_proj": 32}),
        {}, None,
    ),
    "patterns with anchored keys": (
        dict(
            r=4, lora_alpha=8, target_modules=ATTENTION,
            rank_pattern={"model.layers.0.self_attn.q_proj": 2}, alpha_pattern={"model.layers.0.self_attn.q_proj": 3},
        ),
        {}, None,
    ),
    "patterns with suffix keys": (
        dict(r=4, target_modules=ALL_LINEAR, rank_pattern={"mlp.down_proj": 1}, alpha_pattern={"self_attn.o_proj": 2}),
        {}, None,
    ),
    "bias none on a model with biases": (dict(target_modules=ATTENTION, bias="none"), BIASES, None),
    "bias lora_only": (dict(target_modules=["q_proj", "up_proj"], bias="lora_only"), BIASES, None),
    "bias all": (dict(target_modules=["q_proj", "up_proj"], bias="all"), BIASES, None),
    "modules_to_save untied": (
        dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head", "norm"]), {"tie_word_embeddings": False}, None,
    ),
    "modules_to_save on tied embeddings": (
        dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]), {},
        "modules_to_save ['model.embed_tokens.weight'] unties",
    ),
    "modules_to_save on tied embeddings, weight tying kept": (
        dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True), {}, None,
    ),
    "LoRA on tied embeddings": (dict(target_modules=["embed_tokens", "q_proj"]), {}, None),
    "LoRA on a tied lm_head": (dict(target_modules=["lm_head", "v_proj"]), {}, None),
    "LoRA on tied embeddings, weight tying kept": (
        dict(target_modules=["embed_tokens", "q_proj"], ensure_weight_tying=True), {},
        "LoRA factors on both tied tensors",
    ),
    "LoRA on untied embeddings and lm_head": (
        dict(target_modules=["embed_tokens", "lm_head", "q_proj"]), {"tie_word_embeddings": False}, None,
    ),
    "target_modules as a regex string": (dict(target_modules=r".*\.layers\.1\.(self_attn\.(q|v)_proj|mlp\.up_proj)"), {}, None),
    "layers_to_transform": (dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]), {}, None),
    "layers_to_transform with layers_pattern": (
        dict(target_modules=["up_proj"], layers_to_transform=0, layers_pattern="layers"), {}, None,
    ),
    "exclude_modules": (
        dict(target_modules="all-linear", exclude_modules=["down_proj", "model.layers.0.self_attn.q_proj"]), {}, None,
    ),
    "exclude_modules as a regex": (dict(target_modules=ATTENTION, exclude_modules=r".*\.layers\.0\..*"), {}, None),
}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT_IDS).logits


def trained_peft_model(lora_kwargs: dict, model_kwargs: dict):
    """A PeftModel whose every trainable tensor (factors, biases, saved modules) is random and non-zero."""
    config = LoraConfig(**{"r": 2, "lora_alpha": 4, "init_lora_weights": False, **lora_kwargs})
    peft_model = get_peft_model(make_llama(**model_kwargs), config)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad and "lora_" not in name:  # biases and modules_to_save copies: move them
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return peft_model.eval()


def dem_logits(tmp_path, base_dir, vector: DistributionVector, tag: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the coefficient-1.0 merge in memory and after save_pretrained + from_pretrained."""
    merger = DEMMerger.from_pretrained(base_dir, vectors=[vector])
    in_memory = logits(merger.merge({vector.name: 1.0}))
    saved = merger.save_pretrained(tmp_path / f"merged_{tag}", {vector.name: 1.0}, card=False)
    return in_memory, logits(AutoModelForCausalLM.from_pretrained(saved))


@pytest.mark.parametrize("case", list(CONFIGURATIONS), ids=list(CONFIGURATIONS))
def test_lora_merge_equals_peft_merge_and_unload(case, tmp_path):
    lora_kwargs, model_kwargs, refusal = CONFIGURATIONS[case]
    base_dir = save_model(make_llama(**model_kwargs), tmp_path / "base")
    peft_model = trained_peft_model(lora_kwargs, model_kwargs)
    peft_model.save_pretrained(tmp_path / "adapter")

    if refusal is not None:
        with pytest.raises(ValueError, match=re.escape(refusal)):
            DistributionVector.from_peft(tmp_path / "adapter", name="a", base=base_dir)
        with pytest.raises(ValueError, match=re.escape(refusal)):
            DistributionVector.from_peft(peft_model, name="a")
        return

    from_folder = DistributionVector.from_peft(tmp_path / "adapter", name="a", base=base_dir)
    trains_biases = lora_kwargs.get("bias", "none") != "none"
    if trains_biases:  # the in-memory model's own biases are the trained ones: the base must be named
        with pytest.raises(ValueError, match="pass base="):
            DistributionVector.from_peft(peft_model, name="a")
    from_memory = DistributionVector.from_peft(peft_model, name="a", base=base_dir if trains_biases else None)
    expected = logits(peft_model.merge_and_unload())

    assert (expected - logits(AutoModelForCausalLM.from_pretrained(base_dir))).abs().max() > 1e-2  # the adapter matters
    for tag, vector in {"folder": from_folder, "memory": from_memory}.items():
        for actual in dem_logits(tmp_path, base_dir, vector, tag):
            torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_saved_lora_vector_round_trips_with_biases_and_patterns(tmp_path):
    """A LoRA vector with bias deltas and pattern scalings loads back from disk unchanged."""
    base_dir = save_model(make_llama(**BIASES), tmp_path / "base")
    peft_model = trained_peft_model(
        dict(target_modules=ATTENTION, bias="lora_only", alpha_pattern={"q_proj|v_proj": 32}), BIASES
    )
    vector = DistributionVector.from_peft(peft_model, name="a", base=base_dir)
    vector.save_pretrained(tmp_path / "vector")
    loaded = DistributionVector.from_pretrained(tmp_path / "vector")
    assert loaded.lora_modules == vector.lora_modules
    assert "model.layers.0.self_attn.q_proj.bias" in loaded.target_names
    for name in vector.target_names:
        assert torch.equal(loaded.delta(name), vector.delta(name))


def test_embedding_weights_saved_with_an_embedding_adapter_are_merged_as_peft_loads_them(tmp_path):
    """PEFT saves an adapted embedding's own weight beside its factors and loads it back into the model: a changed
    one (e.g. new token rows) is part of the adapter's delta."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    model_kwargs = {"tie_word_embeddings": False}
    base_dir = save_model(make_llama(**model_kwargs), tmp_path / "base")
    trained_peft_model(dict(target_modules=["embed_tokens", "q_proj"]), model_kwargs).save_pretrained(tmp_path / "adapter")
    weights_file = tmp_path / "adapter" / "adapter_model.safetensors"
    weights = load_file(weights_file)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    weights[key][60:] += 0.5  # the last rows moved, as new tokens would
    save_file(weights, weights_file)

    vector = DistributionVector.from_peft(tmp_path / "adapter", name="a", base=base_dir)
    expected = logits(PeftModel.from_pretrained(make_llama(**model_kwargs), tmp_path / "adapter").merge_and_unload())
    assert vector.dense_names == ["model.embed_tokens.weight"]
    for actual in dem_logits(tmp_path, base_dir, vector, "embedding"):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_live_scaling_of_an_in_memory_peft_model_is_used(tmp_path):
    """`set_scale` changes a layer's scaling after the config was written: the vector follows the layer, as PEFT's merge does."""
    peft_model = trained_peft_model(dict(target_modules=["q_proj"]), {})
    for module in peft_model.modules():
        if hasattr(module, "set_scale") and "default" in getattr(module, "scaling", {}):
            module.set_scale("default", 0.25)
    vector = DistributionVector.from_peft(peft_model, name="a")
    base_dir = save_model(make_llama(), tmp_path / "base")
    expected = logits(peft_model.merge_and_unload())
    for actual in dem_logits(tmp_path, base_dir, vector, "scaled"):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_in_memory_vector_refuses_a_non_finite_lora_scaling():
    from dem_hf.io.tensors import TensorDict
    from dem_hf.vectors.config import LoraModule

    factors = TensorDict({"model.norm.weight.lora_A": torch.ones(1, 1), "model.norm.weight.lora_B": torch.ones(32, 1)})
    with pytest.raises(ValueError, match="the scaling nan; expected a finite number"):
        DistributionVector("x", factors, lora_modules={"model.norm.weight": LoraModule(scaling=float("nan"))})
