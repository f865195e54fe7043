"""Distribution vectors: exact full deltas, exact LoRA factors, persistence, base fingerprints."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from dem_hf import DistributionVector
from dem_hf.io.tensors import untied_state_dict

from .conftest import make_llama, perturbed, save_model


def ulp_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to the rounding of one float32 subtraction and one addition (a couple of ulps)."""
    scale = expected.abs().clamp_min(actual.abs()) + 1e-30
    assert ((actual - expected).abs() <= 4 * torch.finfo(torch.float32).eps * scale.max()).all()


def test_full_vector_adds_back_to_the_finetuned_weights(base_dir, finetuned_dirs, base_model):
    vector = DistributionVector.from_models(base_dir, finetuned_dirs["math"], name="math")
    tuned = untied_state_dict(make_llama().from_pretrained(finetuned_dirs["math"]))
    base = untied_state_dict(base_model)
    assert vector.vector_type == "full"
    assert sorted(vector.target_names) == sorted(base)
    for name, tensor in base.items():
        ulp_close(tensor + 1.0 * vector.delta(name), tuned[name])


def test_full_vector_from_in_memory_models_matches_folders(base_dir, finetuned_dirs, base_model):
    tuned = perturbed(base_model, seed=1)
    from_memory = DistributionVector.from_models(base_model, tuned, name="math")
    from_disk = DistributionVector.from_models(base_dir, finetuned_dirs["math"], name="math")
    assert from_memory.base_fingerprint == from_disk.base_fingerprint
    for name in from_disk.target_names:
        torch.testing.assert_close(from_memory.delta(name), from_disk.delta(name), rtol=0, atol=0)


def test_unchanged_tensors_are_not_stored(base_model):
    tuned = perturbed(base_model, seed=1)
    with torch.no_grad():
        tuned.model.norm.weight.copy_(base_model.model.norm.weight)
    vector = DistributionVector.from_models(base_model, tuned, name="math")
    assert "model.norm.weight" not in vector.target_names


def test_vector_round_trips_through_disk_and_streams_to_disk(tmp_path, base_dir, finetuned_dirs):
    in_memory = DistributionVector.from_models(base_dir, finetuned_dirs["chat"], name="chat", metadata={"dataset": "chat"})
    in_memory.save_pretrained(tmp_path / "v1")
    streamed = DistributionVector.from_models(
        base_dir, finetuned_dirs["chat"], name="chat", save_directory=tmp_path / "v2", max_shard_size=4000
    )
    assert len(list((tmp_path / "v2").glob("vector-*-of-*.safetensors"))) > 1
    loaded = DistributionVector.from_pretrained(tmp_path / "v1")
    assert loaded.name == "chat" and loaded.metadata == {"dataset": "chat"}
    assert loaded.base_fingerprint == in_memory.base_fingerprint == streamed.base_fingerprint
    for name in in_memory.target_names:
        assert torch.equal(loaded.delta(name), in_memory.delta(name))
        assert torch.equal(streamed.delta(name), in_memory.delta(name))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_vector_equals_b_a_scaling_for_every_module(use_rslora):
    model = make_llama(tie_word_embeddings=False)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        use_rslora=use_rslora,
        rank_pattern={"down_proj": 2},
        alpha_pattern={"v_proj": 16},
        init_lora_weights=False,  # random B, so every delta is non-zero
    )
    peft_model = get_peft_model(model, config)
    vector = DistributionVector.from_peft(peft_model, name="chat")
    lora_layers = {n: m for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert len(lora_layers) == 6 and len(vector.lora_modules) == 6
    for module_name, layer in lora_layers.items():
        target = module_name.removeprefix("base_model.model.") + ".weight"
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        scaling = layer.scaling["default"]
        expected_scaling = (16 if "v_proj" in target else 8) / ((a.shape[0] ** 0.5) if use_rslora else a.shape[0])
        assert scaling == pytest.approx(expected_scaling)
        torch.testing.assert_close(vector.delta(target), (b @ a * scaling).detach())
        torch.testing.assert_close(vector.delta(target), layer.get_delta_weight("default").detach())


def test_lora_vector_from_folder_matches_in_memory(tmp_path, base_dir, base_model):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], use_rslora=True, init_lora_weights=False)
    peft_model = get_peft_model(make_llama(), config)
    peft_model.save_pretrained(tmp_path / "adapter")
    from_folder = DistributionVector.from_peft(tmp_path / "adapter", name="x", base=base_dir)
    in_memory = DistributionVector.from_peft(peft_model, name="x")
    assert from_folder.base_fingerprint == in_memory.base_fingerprint
    assert from_folder.lora_modules["model.embed_tokens.weight"].transpose
    for name in in_memory.target_names:
        torch.testing.assert_close(from_folder.delta(name), in_memory.delta(name))
    embed = peft_model.base_model.model.model.embed_tokens
    torch.testing.assert_close(from_folder.delta("model.embed_tokens.weight"), embed.get_delta_weight("default").detach())


def test_lora_modules_to_save_become_dense_deltas(tmp_path):
    base = make_llama(tie_word_embeddings=False)
    base_dir = save_model(base, tmp_path / "base")
    peft_model = get_peft_model(make_llama(tie_word_embeddings=False), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        peft_model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    vector = DistributionVector.from_peft(tmp_path / "adapter", name="x", base=base_dir)
    torch.testing.assert_close(vector.delta("lm_head.weight"), torch.full_like(base.lm_head.weight, 0.5))
    assert "model.layers.0.self_attn.q_proj.weight" in vector.lora_modules


def test_lora_vector_saves_low_rank(tmp_path):
    peft_model = get_peft_model(make_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    vector = DistributionVector.from_peft(peft_model, name="lowrank")
    vector.save_pretrained(tmp_path / "v")
    loaded = DistributionVector.from_pretrained(tmp_path / "v")
    assert loaded.vector_type == "lora"
    stored = {name: loaded.tensors.shape(name) for name in loaded.tensors.keys()}
    assert all(2 in shape for shape in stored.values()), stored  # only rank-2 factors on disk
    for name in vector.target_names:
        torch.testing.assert_close(loaded.delta(name), vector.delta(name))


# ------------------------------------------------------------------------------------------------ the card


def test_every_saved_vector_folder_has_a_card_saying_what_it_is(tmp_path, base_dir, finetuned_dirs, base_model):
    from huggingface_hub import ModelCard

    metadata = {"dataset": "org/math-data", "num_examples": 120, "step": 30, "compute": {"num_input_tokens_seen": 4096}}
    vector = DistributionVector.from_models(base_dir, finetuned_dirs["math"], name="math", metadata=metadata)
    vector.base_model_name_or_path = "org/tiny-base"
    vector.save_pretrained(tmp_path / "math")
    streamed = DistributionVector.from_models(base_dir, finetuned_dirs["chat"], name="chat", save_directory=tmp_path / "chat")

    card = ModelCard.load(tmp_path / "math" / "README.md")
    assert card.data.to_dict() == {
        "base_model": "org/tiny-base", "datasets": ["org/math-data"], "library_name": "dem_hf",
        "tags": ["dem", "dem_hf", "distribution-vector"],
    }
    parameters = sum(p.numel() for p in base_model.parameters())  # tied embeddings counted once, as stored
    tensors = len(dict(base_model.named_parameters()))
    for line in [
        "# Distribution vector `math`",
        "| Base model | [`org/tiny-base`](https://huggingface.co/org/tiny-base) |",
        "| Training data | [`org/math-data`](https://huggingface.co/datasets/org/math-data) |",
        "| Vector type | full (dense deltas) |",
        f"| Base tensors changed | {tensors:,} |",
        f"| Parameters changed | {parameters:,} |",
        f"| Numbers stored | {parameters:,} |",
        "| Training | 120 examples, 30 optimizer steps, 4,096 tokens seen |",
        'vector = DistributionVector.from_pretrained("math")',
        'merger = DEMMerger.from_pretrained("org/tiny-base", vectors=[vector])',
        'model = merger.merge(coefficients={"math": 1.0})',
    ]:
        assert line in card.text, line
    assert "LoRA rank" not in card.text

    chat = ModelCard.load(streamed.path / "README.md")  # streamed to disk: the same card, from the headers
    assert chat.data.base_model is None and "`base` (a local folder)" in chat.text and str(tmp_path) not in chat.text
    assert "| Training data | the `chat` data |" in chat.text


def test_a_lora_vector_card_gives_the_rank_and_the_low_rank_size(tmp_path):
    from huggingface_hub import ModelCard

    model = make_llama(seed=0)  # q_proj 32x32, v_proj 16x32 (2 of 4 heads for keys and values), 2 layers
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    vector = DistributionVector.from_peft(peft_model, name="chat")
    vector.save_pretrained(tmp_path / "chat", model_card_kwargs={"model_id": "org/chat-vector", "base_model": "org/b"})

    card = ModelCard.load(tmp_path / "chat" / "README.md")
    assert card.data.tags == ["dem", "dem_hf", "distribution-vector", "lora"] and card.data.base_model == "org/b"
    changed = 2 * (32 * 32 + 16 * 32)  # B·A has the shape of the base weight
    stored = 2 * ((2 * 32 + 32 * 2) + (2 * 32 + 16 * 2))  # A: r x in, B: out x r
    for line in [
        "| Vector type | LoRA (low-rank factors) |", "| LoRA rank | 2 |", "| Base tensors changed | 4 |",
        f"| Parameters changed | {changed:,} |", f"| Numbers stored | {stored:,} |",
        'vector = DistributionVector.from_pretrained("org/chat-vector")',
    ]:
        assert line in card.text, line


def test_vectors_copied_into_a_dem_folder_get_their_card(tmp_path, base_dir, finetuned_dirs):
    from dem_hf import DEMMerger

    saved = DistributionVector.from_models(base_dir, finetuned_dirs["math"], name="math", save_directory=tmp_path / "v")
    merger = DEMMerger.from_pretrained(base_dir, vectors=[saved])
    merger.add_vector(DistributionVector.from_models(base_dir, finetuned_dirs["chat"], name="chat"))  # in memory
    out = merger.save_pretrained(tmp_path / "dem")
    for name in ["math", "chat"]:
        text = (out / "vectors" / name / "README.md").read_text()
        assert f"# Distribution vector `{name}`" in text and f'from_pretrained("{name}")' in text
