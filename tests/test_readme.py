"""The README's API tour, executed: what it shows must run and give what it says.

The tour's Python block is taken from README.md as it is and run in a folder that holds tiny stand-ins under the
names the tour uses: `base` (a tiny Llama built from a config, as in conftest.py), `base-sft-math` (a stand-in full
fine-tune), `adapters/chat` and `adapters/code` (PEFT LoRA adapters), `data/chat.jsonl`, and the datasets `math_ds`,
`math_val`, `chat_val`, `code_val`. The push goes to the loopback Hub (hub_server.py) through the real client.

Only two things are changed in the code, both named in `SUBSTITUTIONS`: training runs 2 steps instead of 500 on the
CPU (it still runs, with TRL's SFTTrainer), and the search, Bayesian as written, keeps its 25 trials. A line that
ends with a comment holding a Python literal (`expr  # {'math': 0.7, ...}`) becomes `assert expr == literal`, so
the values the README prints are checked. The test then checks what the tour claims in prose: the saved folder and
the pushed repo hold exactly the model `merge` returned, the folder restores the merged coefficients, and the
search recorded its best coefficients before the explicit merge replaced them.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from .conftest import perturbed, save_model

README = Path(__file__).resolve().parents[1] / "README.md"
INPUT_IDS = torch.tensor([[2, 5, 9, 17, 33, 8, 41, 3]])
# (what the README says, what the test runs instead): training that takes hours on a real model takes 2 steps here.
SUBSTITUTIONS = [
    (
        'SFTConfig(output_dir="runs", max_steps=500)',
        'SFTConfig(output_dir="runs", max_steps=2, use_cpu=True, report_to="none", save_strategy="no", '
        "per_device_train_batch_size=4, disable_tqdm=True)",
    ),
]


def python_blocks(markdown: str, section: str) -> list[str]:
    """The ```python blocks of one `## section` of a Markdown text."""
    body = markdown.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.DOTALL)


def with_printed_values_checked(code: str) -> str:
    """`expr   # <Python literal>` lines become `assert expr == literal` (other comments are left alone)."""
    lines = []
    for line in code.splitlines():
        expression, _, comment = line.partition("  #")
        try:
            expected = ast.literal_eval(comment.strip())
            ast.parse(expression.strip(), mode="eval")
        except (ValueError, SyntaxError):
            lines.append(line)
            continue
        lines.append(f"assert ({expression.strip()}) == {expected!r}, ({expression.strip()}, {expected!r})")
    return "\n".join(lines)


def tour_code() -> str:
    blocks = python_blocks(README.read_text(encoding="utf-8"), "API tour")
    code = blocks[0]  # the tour; the data-ablation block after it is exercised by tests/test_ablation.py
    for readme_text, test_text in SUBSTITUTIONS:
        assert readme_text in code, f"the README no longer says {readme_text!r}: update SUBSTITUTIONS"
        code = code.replace(readme_text, test_text)
    return with_printed_values_checked(code)


def save_adapter(base_model, seed: int, folder: Path) -> Path:
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(perturbed(base_model, 0, scale=0.0), config).save_pretrained(folder)
    return folder


def texts(offset: int, n: int = 8) -> list[str]:
    return [" ".join(f"w{(offset + i + j) % 60}" for j in range(6)) for i in range(n)]


@pytest.fixture
def tour_folder(tmp_path, monkeypatch, base_model, tokenizer) -> Path:
    """The names the tour uses, as tiny local stand-ins, in the working directory."""
    monkeypatch.chdir(tmp_path)
    save_model(base_model, tmp_path / "base", tokenizer)
    save_model(perturbed(base_model, seed=1), tmp_path / "base-sft-math", tokenizer)
    save_adapter(base_model, 2, tmp_path / "adapters" / "chat")
    save_adapter(base_model, 3, tmp_path / "adapters" / "code")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "chat.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(20)))
    return tmp_path


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(INPUT_IDS).logits


def test_readme_api_tour_runs_and_gives_what_it_shows(tour_folder, hub_server):
    from dem_hf import DEMMerger

    namespace = {
        "math_ds": Dataset.from_dict({"text": texts(0)}),
        "math_val": Dataset.from_dict({"text": texts(5, 4)}),
        "chat_val": texts(25, 4),
        "code_val": texts(40, 4),
    }
    exec(compile(tour_code(), str(README) + " (API tour)", "exec"), namespace)  # noqa: S102 - the README's own code

    merger, model, result = namespace["merger"], namespace["model"], namespace["result"]
    merged_with = {"math": 0.7, "chat": 0.5, "code": 0.3}
    # 1b: one vector per dataset, trained (2 steps) with TRL
    assert sorted(v.name for v in namespace["vectors"]) == ["chat", "math"]
    # 1c: the warm start is the uniform mixture's run with its adapter merged in: a model folder to start runs from
    warm = namespace["warm"]
    assert warm.info["probabilities"] == {"math": 0.5, "chat": 0.5} and warm.info["compute"]["global_step"] == 2
    assert warm.model_dir.resolve().parent.parent == tour_folder / "warm"
    AutoModelForCausalLM.from_pretrained(warm.model_dir)
    # 2b: the search's best became the merger's coefficients (the per-layer fit's start), until the explicit merge
    # of step 3 replaced them
    assert result.strategy == "bayesian" and len(result.candidates) > 10  # past Optuna's random start: GP (SciPy)
    # 2c: the per-layer fit started from that best and its result is the one recorded
    per_layer = namespace["per_layer"]
    start = per_layer.candidates[0].coefficients
    assert all(value == pytest.approx(result.best_coefficients[name]) for name in start for value in start[name].values())
    assert set(start["math"]) == {"embeddings", "layer.0", "layer.1", "head"}
    assert merger.config.search_result["best_coefficients"] == per_layer.best_coefficients
    assert merger.config.coefficients == merged_with
    # 3: the saved folder and the pushed repo hold exactly the merged model; the folder restores the coefficients
    saved = tour_folder / "dem-model"
    assert {"config.json", "dem_config.json", "tokenizer.json", "README.md", "vectors"} <= {p.name for p in saved.iterdir()}
    assert sorted(p.name for p in (saved / "vectors").iterdir()) == ["chat", "code", "math"]
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(saved)), logits(model), rtol=0, atol=0)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained("org/dem-model")), logits(model), rtol=0, atol=0)
    assert len(hub_server.commits) == 1
    # 4: the restored merger merges the same model again
    restored = DEMMerger.from_pretrained(saved)
    assert restored.config.coefficients == merged_with
    torch.testing.assert_close(logits(restored.merge()), logits(model), rtol=0, atol=0)


def test_printed_values_become_assertions():
    code = "x = {'a': 1}\nx   # {'a': 1}\nprint(x)   # now the merger's coefficients\n"
    assert with_printed_values_checked(code).splitlines() == [
        "x = {'a': 1}", "assert (x) == {'a': 1}, (x, {'a': 1})", "print(x)   # now the merger's coefficients",
    ]
