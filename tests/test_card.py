"""Model cards: golden example cards, valid Hub metadata, offline and deterministic rendering, README handling."""

from __future__ import annotations

import importlib.util
import re
import socket
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from dem_hf import DEMConfig, DEMMerger, DistributionVector
from dem_hf.commands.cli import main
from dem_hf.hub.push import validate_repo_id
from dem_hf.merging.card.facts import card_metadata
from dem_hf.merging.card.render import (
    CARD_TAGS,
    build_model_card,
    card_for_folder,
    framework_versions,
    hub_id_of,
    is_hub_dataset_id,
    render_model_card,
    save_card_text,
    write_model_card,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "model_cards"
SEARCH = {
    "best_coefficients": {"math": 0.5, "chat": 1.0},
    "best_objective": 7.1,
    "objective": "mean perplexity over ['math', 'chat']",
    "strategy": "grid",
    "candidates": [
        {"coefficients": {"math": 1.0, "chat": 1.0}, "objective": 7.4, "perplexities": {"math": 5.9, "chat": 8.9}},
        {"coefficients": {"math": 0.5, "chat": 1.0}, "objective": 7.1, "perplexities": {"math": 5.6, "chat": 8.6}},
    ],
    "wall_time_s": 12.5,
    "compute": 2.0,
    "base_perplexities": {"math": 7.6, "chat": 9.2},
    "eval_sets": {"math": {"num_sequences": 4, "num_tokens": 100}, "chat": {"num_sequences": 4, "num_tokens": 90}},
}


def load_generator():
    spec = importlib.util.spec_from_file_location("model_cards_generate", EXAMPLES / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def normalise_versions(text: str) -> str:
    """Blank the version numbers of the "Framework versions" section, which change with the environment."""
    head, sep, versions = text.partition("## Framework versions")
    return head + sep + re.sub(r"(?m)^- ([^:\n]+): .*$", r"- \1: <version>", versions)


def check_model_card_metadata(card: ModelCard) -> dict:
    """What the Hub requires of model-card metadata, checked offline; returns the metadata as a dict."""
    data = card.data.to_dict()
    for base in [data["base_model"]] if isinstance(data.get("base_model"), str) else data.get("base_model") or []:
        validate_repo_id(base)
    for dataset in data.get("datasets") or []:
        validate_repo_id(dataset)
        assert "/" in dataset
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert all(tag in data["tags"] for tag in CARD_TAGS)
    if "license" in data:
        assert re.fullmatch(r"[a-z0-9][a-z0-9.\-]*", data["license"])
    if "model-index" in data:
        name, results = model_index_to_eval_results(data["model-index"])  # raises on a malformed model-index
        assert name and results
        for result in results:
            assert result.metric_type == "perplexity" and isinstance(result.metric_value, float)
            assert result.task_type == "text-generation" and result.dataset_split == "validation"
    return data


# ------------------------------------------------------------------------------------------------ golden files


@pytest.fixture(scope="module")
def rendered_examples() -> dict[str, str]:
    return load_generator().render_examples()


def test_example_cards_are_current(rendered_examples):
    assert sorted(rendered_examples) == ["full_vectors.md", "lora_vectors.md"]
    for name, text in rendered_examples.items():
        stored = (EXAMPLES / name).read_text(encoding="utf-8")
        assert normalise_versions(text) == normalise_versions(stored), (
            f"model_cards/{name} is out of date: run `python model_cards/generate.py` to update it"
        )


@pytest.mark.parametrize("name", ["full_vectors.md", "lora_vectors.md"])
def test_example_card_metadata_is_valid(name, rendered_examples):
    card = ModelCard(rendered_examples[name])
    data = check_model_card_metadata(card)

    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert data["license"] == "apache-2.0"  # read from the base folder's README.md
    assert data["datasets"] == ["openai/gsm8k", "anon8231489123/ShareGPT_Vicuna_unfiltered"]  # no local file
    assert [r.dataset_name for r in card.data.eval_results] == ["math", "chat", "bible"]
    assert "data/kjv.jsonl" in card.text and "/tmp" not in card.text
    assert ModelCard(str(card)).data.to_dict() == data  # round trip
    assert "AutoModelForCausalLM.from_pretrained(\"your-org/" in card.text


def test_example_cards_cover_both_vector_types_and_weightings(rendered_examples):
    full, lora = rendered_examples["full_vectors.md"], rendered_examples["lora_vectors.md"]
    assert "| full |" in full and "21 tensors" in full and "θ_DEM = θ + Σ_i ω_i · Δ_i" in full
    assert "| 7.63 | 5.62 | -26.3% |" in full and "… and 17 more candidates" in full
    assert "LoRA r=8 on 14 modules" in lora and "LoRA r=4" in lora and "(ω_i / Σ_j ω_j)" in lora
    assert "base model's perplexities were not computed" in lora


def test_version_normalisation_only_touches_versions():
    card = build_model_card(DEMConfig(base_model_name_or_path="org/base"), versions={"dem_hf": "9.9", "PyTorch": "1"})
    assert "- dem_hf: 9.9\n- PyTorch: 1\n" in str(card)
    assert normalise_versions(str(card)).endswith("- dem_hf: <version>\n- PyTorch: <version>\n")
    assert list(framework_versions())[:2] == ["dem_hf", "Transformers"]


# ------------------------------------------------------------------------------------------------ card content


@pytest.fixture
def merger(tmp_path, base_dir, finetuned_dirs) -> DEMMerger:
    merger = DEMMerger.from_pretrained(base_dir)
    for name in ["math", "chat"]:
        merger.add_vector(
            DistributionVector.from_models(
                base_dir, finetuned_dirs[name], name=name, save_directory=tmp_path / "vec" / name,
                metadata={"dataset": "openai/gsm8k" if name == "math" else str(tmp_path / "data" / "chat.jsonl")},
            )
        )
    merger.config.coefficients = {"math": 0.5, "chat": 1.0}
    merger.config.search_result = SEARCH
    return merger


def test_card_from_a_merger_never_touches_the_network(merger, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the card tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    card = build_model_card(merger, model_id="org/dem")

    data = check_model_card_metadata(card)
    assert "base_model" not in data  # the base is a local folder: named in the body only
    assert data["datasets"] == ["openai/gsm8k"]  # the chat data is a local file
    assert "license" not in data
    assert "a local model (`base`)" in card.text and "`chat.jsonl`" in card.text
    assert str(tmp_path) not in str(card)
    assert {r.dataset_name: r.metric_value for r in card.data.eval_results} == {"math": 5.6, "chat": 8.6}
    assert card.data.eval_results[0].dataset_type == "openai/gsm8k"
    assert "| `math` | 100 | 7.6 | 5.6 | -26.3% |" in card.text
    assert "| Strategy | grid |" in card.text and "| Candidates evaluated | 2 |" in card.text
    assert "| Best objective | 7.1 |" in card.text and "12.5 s" in card.text


def test_rendered_text_is_the_model_card_s_text(merger, tmp_path):
    """`render_model_card` + `save_card_text` (what `save_pretrained` uses, without the Hub client) write exactly
    the bytes `build_model_card(...).save` writes."""
    card = build_model_card(merger, model_id="org/dem", vectors_included=True)
    text = render_model_card(merger, model_id="org/dem", vectors_included=True)
    assert text == str(card) and text.endswith("\n")
    card.save(tmp_path / "card" / "README.md")
    assert save_card_text(text, tmp_path / "text" / "README.md") == tmp_path / "text" / "README.md"
    assert (tmp_path / "text" / "README.md").read_bytes() == (tmp_path / "card" / "README.md").read_bytes()


def test_custom_templates_get_the_card_data_and_the_extra_arguments(tmp_path):
    """As in `ModelCard.from_template`: `card_data` is the YAML metadata, the card data's fields and the extra keyword
    arguments are variables; the rendered text is written as it is."""
    config = DEMConfig(base_model_name_or_path="org/base", vectors={"math": {"vector_type": "full"}})
    template = tmp_path / "card.md.j2"
    template.write_text("---\n{{ card_data }}\nlanguage: en\n---\n# {{ model_title }} for {{ base_model }}: {{ note }}")
    text = render_model_card(config, versions={}, template_path=template, note="custom")
    metadata = build_model_card(config, versions={}).data.to_yaml()
    assert text == f"---\n{metadata}\nlanguage: en\n---\n# dem-model for org/base: custom\n"
    assert ModelCard(text).data.language == "en"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("---\nlicense: mit\ntags: [a, b]\n---\n# body\n", {"license": "mit", "tags": ["a", "b"]}),
        ("---\r\nlicense: mit\r\n---\r\n# body\r\n", {"license": "mit"}),
        ("\n---\nlicense: other\nlicense_name: tiny\n---   \nbody", {"license": "other", "license_name": "tiny"}),
        ("---\n---\nempty metadata", {}),
        ("# no metadata block\n---\nlicense: mit\n---\n", {}),
    ],
)
def test_card_metadata_reads_the_yaml_block_the_hub_reads(content, expected):
    assert card_metadata(content) == expected == ModelCard(content).data.to_dict()


@pytest.mark.parametrize("content", ["---\n- a list\n---\n", "---\nlicense: [\n---\n"])
def test_card_metadata_refuses_a_block_that_is_not_a_mapping(content):
    with pytest.raises((ValueError, yaml.YAMLError)):
        card_metadata(content)


def test_card_is_deterministic(merger):
    first = str(build_model_card(merger, model_id="org/dem"))
    assert str(build_model_card(merger, model_id="org/dem")) == first
    from_config = build_model_card(merger.config, model_id="org/dem")  # without the loaded vectors: no sizes
    assert from_config.data.to_dict() == build_model_card(merger, model_id="org/dem").data.to_dict()
    gsm8k = "[openai/gsm8k](https://huggingface.co/datasets/openai/gsm8k)"
    assert f"| `math` | full | {gsm8k} | 0.5 | 0.5 | - |" in from_config.text


def test_card_without_a_search_result(base_dir, tmp_path, finetuned_dirs):
    merger = DEMMerger.from_pretrained(base_dir)
    merger.add_vector(DistributionVector.from_models(base_dir, finetuned_dirs["math"], name="math"), coefficient=0.7)
    card = build_model_card(merger)

    data = check_model_card_metadata(card)
    assert "model-index" not in data and "datasets" not in data
    assert "No coefficient search was recorded" in card.text
    assert "| `math` | full | `math` | 0.7 | 0.7 |" in card.text
    assert 'from_pretrained("path/to/dem-model")' in card.text


@pytest.mark.parametrize(
    "search_result",
    [
        {},
        {"strategy": "grid"},
        {"candidates": [{"coefficients": {"math": 1.0}}, {"coefficients": {"math": 2.0}, "objective": float("nan")}]},
        {"candidates": "garbage", "best_coefficients": [1, 2], "base_perplexities": {"math": "high"}},
        {"best_coefficients": {"math": 1.0}, "best_objective": 3.0, "wall_time_s": 7200.0},
    ],
)
def test_card_renders_partial_or_odd_search_results(search_result):
    config = DEMConfig(
        base_model_name_or_path="org/base", vectors={"math": {"vector_type": "full"}}, search_result=search_result
    )
    card = build_model_card(config, versions={})
    check_model_card_metadata(ModelCard(str(card)))
    assert "## Coefficient search" in card.text


def test_hub_base_and_license_from_the_hugging_face_cache_layout(tmp_path):
    snapshot = tmp_path / "hub" / "models--org--base-model" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: other\nlicense_name: tiny\nlicense_link: LICENSE\n---\n")
    config = DEMConfig(base_model_name_or_path=str(snapshot), vectors={"x": {"vector_type": "lora", "metadata": {}}})

    data = build_model_card(config, versions={}).data.to_dict()

    assert data["base_model"] == "org/base-model"
    assert (data["license"], data["license_name"], data["license_link"]) == ("other", "tiny", "LICENSE")
    assert build_model_card(config, license="mit", base_model="org/other").data.to_dict()["license"] == "mit"


def test_broken_base_card_is_ignored(base_dir):
    (base_dir / "README.md").write_text("---\n- not: [a mapping\n---\n")
    merger = DEMMerger.from_pretrained(base_dir)
    assert "license" not in build_model_card(merger).data.to_dict()


def test_bad_card_source_or_ids():
    with pytest.raises(ValueError, match="DEMMerger or a DEMConfig"):
        build_model_card({"base_model_name_or_path": "org/base"})
    with pytest.raises(ValueError, match="Invalid Hub repo id"):
        build_model_card(DEMConfig(), base_model="not a repo")


@pytest.mark.parametrize(
    ("name", "expected"),
    [("openai/gsm8k", True), ("gsm8k", False), ("data/math.jsonl", False), ("a b/c", False), (None, False)],
)
def test_only_namespaced_hub_ids_are_dataset_ids(name, expected):
    assert is_hub_dataset_id(name) is expected


def test_hub_id_of(tmp_path):
    assert hub_id_of("org/name") == "org/name"
    assert hub_id_of(str(tmp_path)) is None and hub_id_of("./relative") is None and hub_id_of(None) is None
    assert hub_id_of("/c/hub/models--a--b/snapshots/123abc") == "a/b"


def test_average_weighting_shows_effective_weights():
    config = DEMConfig(
        weighting="average", coefficients={"a": 1.0, "b": 3.0},
        vectors={"a": {"vector_type": "full"}, "b": {"vector_type": "full"}},
    )
    text = build_model_card(config, versions={}).text
    assert "| `a` | full | `a` | 1 | 0.25 |" in text and "| `b` | full | `b` | 3 | 0.75 |" in text
    config.coefficients = {"a": 1.0, "b": -1.0}
    assert "| `a` | full | `a` | 1 | - |" in build_model_card(config, versions={}).text


# ------------------------------------------------------------------------------------------------ README.md handling


def test_save_pretrained_writes_the_card_and_keeps_an_existing_one(merger, tmp_path):
    out = merger.save_pretrained(tmp_path / "dem-model")
    card = ModelCard.load(out / "README.md")
    assert 'from_pretrained("dem-model")' in card.text and card.data.tags == list(CARD_TAGS)
    assert "stored under `vectors/`" in card.text  # copied by default, and the card says so
    assert sorted(p.name for p in (out / "vectors").iterdir()) == ["chat", "math"]

    (out / "README.md").write_text("# my own card\n")
    merger.save_pretrained(out, {"math": 2.0, "chat": 1.0}, overwrite=True)
    assert (out / "README.md").read_text() == "# my own card\n"  # kept

    merger.save_pretrained(out, overwrite=True, regenerate_card=True, model_card_kwargs={"model_id": "org/x"})
    assert 'from_pretrained("org/x")' in (out / "README.md").read_text()

    merger.save_pretrained(tmp_path / "no-card", card=False)
    assert not (tmp_path / "no-card" / "README.md").exists()


def test_save_with_vectors_mentions_re_merging(merger, tmp_path):
    out = merger.save_pretrained(tmp_path / "with-vectors", save_vectors=True)
    text = (out / "README.md").read_text()
    assert 'DEMMerger.from_pretrained("with-vectors")' in text and "under `vectors/`" in text
    rebuilt = build_model_card(merger, model_id="with-vectors", vectors_included=True, versions={})
    assert str(card_for_folder(out, versions={})) == str(rebuilt)  # the folder alone gives the same card


def test_card_tells_where_vectors_are_when_they_are_not_saved(merger, tmp_path, caplog, base_dir, finetuned_dirs):
    """save_vectors=False: no `vectors/`, and the card says the vectors are not there and where they were (a local
    folder by its last component only, a Hub repo at its commit, or nowhere for a vector held in memory)."""
    merger.add_vector(DistributionVector.from_models(base_dir, finetuned_dirs["code"], name="code"))  # in memory
    merger.config.vectors["chat"].update(source="org/vectors", revision="0123456789abcdef" * 2 + "01234567",
                                         subfolder="vectors/chat")
    out = merger.save_pretrained(tmp_path / "no-vectors", save_vectors=False)
    text = (out / "README.md").read_text()

    assert not (out / "vectors").exists() and "stored under `vectors/`" not in text
    assert "The distribution vectors are **not** stored with this model" in text
    assert "- `math`: a local folder (`math`) on the machine that saved the model" in text
    assert "- `chat`: folder `vectors/chat` of the Hub repo [org/vectors](https://huggingface.co/org/vectors) at " \
           "commit `0123456789ab`" in text
    assert "- `code`: nowhere on disk: it was built in memory and not saved" in text
    assert str(tmp_path) not in text
    assert "['code'] exist only in memory and are not saved with the model" in caplog.text
    assert card_for_folder(out, versions={}).text.count("on the machine that saved the model") == 1  # the folder agrees


def test_card_command_rewrites_only_when_asked(merger, tmp_path, capsys):
    out = merger.save_pretrained(tmp_path / "m", card=False)

    assert main(["card", str(out), "--model-id", "org/m", "--base-model", "org/base", "--license", "mit"]) == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "org/base" and card.data.license == "mit" and "org/m" in card.text

    (out / "README.md").write_text("# hand written\n")
    assert main(["card", str(out)]) == 0
    assert (out / "README.md").read_text() == "# hand written\n" and "Kept" in capsys.readouterr().out
    assert write_model_card(out, regenerate=True) == out / "README.md"
    assert 'from_pretrained("m")' in (out / "README.md").read_text()

    assert main(["card", str(tmp_path / "nowhere")]) == 2
    assert "dem_config.json" in capsys.readouterr().err


def test_jinja_rendering_equals_model_card_from_template(merger, monkeypatch):
    """dem_hf renders its cards with Jinja itself (start-up time: `huggingface_hub.repocard` imports the Hub client);
    the text is exactly what `huggingface_hub.ModelCard.from_template` renders from the same data and template."""
    from dem_hf.merging.card.context import card_data_for, template_context
    from dem_hf.merging.card.facts import CardFacts, SearchSummary
    from dem_hf.merging.card.render import TEMPLATE_PATH
    from dem_hf.vectors import folder

    def from_template(card_data, template_path, **variables) -> str:
        text = str(ModelCard.from_template(card_data, template_path=template_path, **variables))
        return text if text.endswith("\n") else text + "\n"  # as ModelCard.save writes it

    merger.config.search_result = SEARCH
    versions = {"dem_hf": "0.1.0"}
    facts = CardFacts.collect(merger.config, merger, merger.vectors, base_model="org/base", base_folder=None)
    search = SearchSummary.read(merger.config.search_result)
    card_data = card_data_for(merger.config, facts, search, "org/dem", facts.license)
    context = template_context(merger.config, facts, search, "org/dem", True, versions)
    ours = render_model_card(merger, model_id="org/dem", base_model="org/base", vectors_included=True, versions=versions)
    assert ours == from_template(card_data, TEMPLATE_PATH, **context)

    calls = []  # the vector card's data and variables, as its renderer passes them to the template
    render = folder.render_card_template
    monkeypatch.setattr(folder, "render_card_template", lambda *args, **kwargs: (calls.append((args, kwargs)), render(*args, **kwargs))[1])
    vector = merger.vectors["math"]
    text = folder.render_vector_card(vector.config_dict(), vector.tensors, model_id="org/math", base_model="org/base")
    (template_path, card_data), variables = calls[0]
    assert template_path == folder.VECTOR_CARD_TEMPLATE and "Distribution vector `math`" in text
    assert text == from_template(card_data, template_path, **variables)
