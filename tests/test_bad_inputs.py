"""Every bad input of the pipeline, one parametrised case each: a clear error naming the offending item,
raised before any heavy work (no output folder is created, no weight shard is written).

New features add their cases here (see CONTRIBUTING.md).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from dem_hf import DEMConfig, DEMMerger, DistributionVector, SearchConfig
from dem_hf.card import build_model_card
from dem_hf.commands.push import push_saved_folder
from dem_hf.io import ShardedWriter
from dem_hf.tensors import TensorDict

from .conftest import make_llama, perturbed, save_model


@pytest.fixture
def world(tmp_path, base_dir, finetuned_dirs, base_model, tokenizer):
    """Everything a case may need: the base, fine-tunes, saved vectors, an output path, oddities."""
    vectors = {
        name: DistributionVector.from_models(base_dir, path, name=name, save_directory=tmp_path / "vec" / name)
        for name, path in finetuned_dirs.items()
    }
    other_base = save_model(make_llama(seed=7), tmp_path / "other_base", tokenizer)
    wide = save_model(make_llama(seed=0, intermediate_size=96), tmp_path / "wide", tokenizer)
    bigger_vocab = save_model(make_llama(seed=0, vocab_size=80), tmp_path / "bigger_vocab", tokenizer)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("precious")
    return dict(
        tmp=tmp_path, base=base_dir, tuned=finetuned_dirs, vectors=vectors, base_model=base_model,
        other_base=other_base, wide=wide, bigger_vocab=bigger_vocab, occupied=occupied, out=tmp_path / "out",
    )


def merger(w) -> DEMMerger:
    return DEMMerger.from_pretrained(w["base"], vectors=list(w["vectors"].values()))


def nan_vector(w) -> DistributionVector:
    deltas = {name: torch.zeros(shape) for name, shape in [("model.norm.weight", (32,))]}
    deltas["model.norm.weight"][3] = math.nan
    return DistributionVector("nan", TensorDict(deltas), base_fingerprint=w["vectors"]["math"].base_fingerprint)


def missing_module_adapter(w):
    model = make_llama(seed=0)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    vector = DistributionVector.from_peft(peft_model, name="x")
    renamed = {k.replace("q_proj", "qkv_proj"): v for k, v in vector.tensors.tensors.items()}
    modules = {k.replace("q_proj", "qkv_proj"): m for k, m in vector.lora_modules.items()}
    return DistributionVector("x", TensorDict(renamed), lora_modules=modules)


def shape_mismatch_vector(w):
    return DistributionVector("odd", TensorDict({"model.norm.weight": torch.ones(31)}))


def push_without_token(w):
    """Push to a loopback Hub that demands a token, with none configured."""
    from .hub_server import HubServer, point_clients_at

    with HubServer(require_token="hf_secret") as hub, pytest.MonkeyPatch.context() as patch:
        point_clients_at(patch, hub.url, w["tmp"] / "hf_home")
        merger(w).push_to_hub("org/dem-model")


CASES = {
    # vectors
    "vector from another base": (
        lambda w: merger(w).add_vector(DistributionVector.from_models(w["other_base"], perturbed(make_llama(seed=7), 1), name="x")),
        ValueError, "computed against another base model",
    ),
    "vector shape differs from base": (lambda w: merger(w).add_vector(shape_mismatch_vector(w)), ValueError, "shape"),
    "LoRA target modules absent from base": (
        lambda w: merger(w).add_vector(missing_module_adapter(w)), ValueError, "LoRA target modules that do not exist",
    ),
    "finetuned model of another architecture": (
        lambda w: DistributionVector.from_models(w["base"], w["wide"], name="x"), ValueError, "Shape of",
    ),
    "vocab-size mismatch base vs finetuned": (
        lambda w: DistributionVector.from_models(w["base"], w["bigger_vocab"], name="x"), ValueError, "vocab-size mismatch",
    ),
    "vector with a non-float (integer) delta": (
        lambda w: merger(w).add_vector(DistributionVector("ints", TensorDict({"model.norm.weight": torch.ones(32, dtype=torch.int64)}))),
        ValueError, "deltas must be float",
    ),
    "unsafe vector name": (
        lambda w: DistributionVector.from_models(w["base"], w["tuned"]["math"], name="../escape"), ValueError, "Invalid name",
    ),
    "vector folder does not exist": (
        lambda w: DistributionVector.from_pretrained(w["tmp"] / "nowhere"), FileNotFoundError, "nowhere",
    ),
    "PEFT adapter passed as a saved vector": (
        lambda w: DistributionVector.from_pretrained(w["base"]), FileNotFoundError, "not a saved distribution vector",
    ),
    # merge
    "unknown vector in coefficients": (
        lambda w: merger(w).save_pretrained(w["out"], {"math": 1.0, "poetry": 0.5}), ValueError, "poetry",
    ),
    "non-finite coefficient": (lambda w: merger(w).save_pretrained(w["out"], {"math": math.inf}), ValueError, "finite"),
    "NaN in an in-memory vector": (
        lambda w: DEMMerger.from_pretrained(w["base"], vectors=[nan_vector(w)]).save_pretrained(w["out"]),
        ValueError, "NaN or infinite values in 'model.norm.weight'",
    ),
    "output folder exists and is not empty": (
        lambda w: merger(w).save_pretrained(w["occupied"]), ValueError, "not empty",
    ),
    "output folder inside the base model": (
        lambda w: merger(w).save_pretrained(w["base"] / "merged"), ValueError, "overlaps the input base model",
    ),
    "duplicate vector name": (
        lambda w: merger(w).add_vector(w["vectors"]["math"].path), ValueError, "already in the merger",
    ),
    "average weighting with coefficients summing to zero": (
        lambda w: DEMMerger.from_pretrained(w["base"], vectors=list(w["vectors"].values()), config=DEMConfig(weighting="average"))
        .save_pretrained(w["out"], {"math": 1.0, "chat": -1.0, "code": 0.0}),
        ValueError, "sum of the coefficients",
    ),
    "unknown weighting": (lambda w: DEMConfig(weighting="median"), ValueError, "median"),
    "merger without vectors": (lambda w: DEMMerger.from_pretrained(w["base"]).merge(), ValueError, "no distribution vectors"),
    "base model folder does not exist": (lambda w: DEMMerger.from_pretrained(w["tmp"] / "no_base"), FileNotFoundError, "no_base"),
    "base folder without safetensors": (
        lambda w: DEMMerger.from_pretrained(w["occupied"]), FileNotFoundError, "No model.safetensors",
    ),
    # Hub and model card
    "push to an invalid Hub repo id": (
        lambda w: merger(w).push_to_hub("my org/model"), ValueError, "Invalid Hub repo id 'my org/model'",
    ),
    "push as a pull request to a branch": (
        lambda w: merger(w).push_to_hub("org/dem-model", revision="dev", create_pr=True), ValueError, "create_pr=True",
    ),
    "push with a coefficient for an unknown vector": (
        lambda w: merger(w).push_to_hub("org/dem-model", {"poetry": 1.0}), ValueError, "poetry",
    ),
    "push without a token where the Hub demands one": (push_without_token, PermissionError, "No Hugging Face token"),
    "push vectors of a folder that is not a DEM model": (
        lambda w: push_saved_folder(w["base"], "org/x", push_vectors=True),
        ValueError, "needs a DEM folder",
    ),
    "load a Hub id that is neither local nor cached, offline": (
        lambda w: DEMMerger.from_pretrained("org/never-pushed"), FileNotFoundError, "'org/never-pushed' is not a local folder",
    ),
    "model card of something that is not a merger": (
        lambda w: build_model_card(w["base"]), ValueError, "DEMMerger or a DEMConfig",
    ),
    # coefficient search
    "search: validation set named after no vector": (
        lambda w: merger(w).search({"poetry": ["w1 w2 w3"]}), ValueError, "match no vector; the vectors are",
    ),
    "search: empty validation set": (
        lambda w: merger(w).search({"math": []}), ValueError, "Validation set 'math': The evaluation dataset is empty",
    ),
    "search: max_length longer than the model allows": (
        lambda w: merger(w).search({"math": ["w1 w2"]}, SearchConfig(max_length=4096)), ValueError,
        "exceeds the model's max_position_embeddings=128",
    ),
    "search: bounds with low > high": (lambda w: SearchConfig(bounds=(2.0, 1.0)), ValueError, "low > high"),
    "search: unknown strategy": (lambda w: SearchConfig(strategy="annealing"), ValueError, "Unknown search strategy 'annealing'"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_is_refused_clearly_and_early(case, world, monkeypatch):
    call, error, message = CASES[case]
    writes = []
    monkeypatch.setattr(ShardedWriter, "add", lambda self, name, tensor: writes.append(name))
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        call(world)
    assert not writes
    assert not world["out"].exists()
    assert (world["occupied"] / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in Path(world["base"]).iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    )


def test_bad_input_case_count():
    """Issue 9 asks for at least 25 distinct cases across the pipeline; this file grows with each feature."""
    print(f"\nbad-input cases: {len(CASES)}")
    assert len(CASES) >= 25
