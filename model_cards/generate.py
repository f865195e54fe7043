"""Render the example model cards in this folder through the real code path.

    python model_cards/generate.py            # rewrite full_vectors.md and lora_vectors.md
    python model_cards/generate.py --check    # exit 1 if they are out of date

Each example builds a tiny Llama base (saved with a `README.md` carrying its license), real distribution vectors
(full deltas of stand-in fine-tunes; LoRA factors of PEFT adapters), a merger, and a search result recorded the way
`DEMMerger.search` records it (a `dem_hf.search.run.SearchResult`, with made-up but plausible numbers: no model is
evaluated here). The card is then produced by `DEMMerger.save_pretrained`, exactly as `push_to_hub` produces it,
and copied here. `tests/test_card.py` re-renders both and compares them with the files (version numbers aside).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing dem_hf

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from dem_hf import DEMConfig, DEMMerger, DistributionVector  # noqa: E402
from dem_hf.merging.card.render import CARD_NAME
from dem_hf.search.run import SearchResult
from dem_hf.search.strategies import Candidate

BASE_HUB_ID = "HuggingFaceTB/SmolLM2-135M"
BASE_CARD = "---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# A tiny stand-in for SmolLM2-135M\n"
VOCAB = ["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(60)]
SETS = ("math", "chat", "bible")
DATASETS = {"math": "openai/gsm8k", "chat": "anon8231489123/ShareGPT_Vicuna_unfiltered", "bible": "data/kjv.jsonl"}
# The calibration run of MISSION.md: base and best-DEM validation perplexities per set.
BASE_PPL = {"math": 7.63, "chat": 9.23, "bible": 20.35}
BEST_PPL = {"math": 5.62, "chat": 8.57, "bible": 15.03}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    return LlamaForCausalLM(config).eval()


def save_base(folder: Path) -> Path:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tiny_llama().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / CARD_NAME).write_text(BASE_CARD)
    return folder


def finetune_stand_in(seed: int) -> LlamaForCausalLM:
    model = tiny_llama()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    return model


def metadata(name: str, steps: int) -> dict:
    return {"dataset": DATASETS[name], "compute": {"global_step": steps, "tokens_seen": steps * 4 * 256}}


def perplexities(coefficients: dict[str, float], best: dict[str, float]) -> dict[str, float]:
    """Plausible perplexities: the best candidate's, growing smoothly as the coefficients move away from `best`."""
    spread = {name: sum((coefficients[v] - best[v]) ** 2 * (2.0 if v == name else 0.3) for v in SETS) for name in SETS}
    return {name: round(BEST_PPL[name] * math.exp(0.25 * spread[name]), 4) for name in SETS}


def search_result(strategy: str, metric: str, grid: list[dict[str, float]], best: dict[str, float], weighting: str,
                  seconds: float) -> dict:
    """A `SearchResult` as `DEMMerger.search` records it, over the candidates `grid`."""
    candidates = []
    for coefficients in grid:
        ppl = perplexities(coefficients, best)
        per_set = {n: ppl[n] / BASE_PPL[n] if metric == "relative_perplexity" else math.log(ppl[n]) for n in SETS}
        candidates.append(Candidate(
            coefficients=coefficients, objective=round(sum(per_set.values()) / len(SETS), 6), perplexities=ppl,
            losses={n: round(math.log(ppl[n]), 6) for n in SETS}, compute=1.0, seconds=round(seconds / len(grid), 3),
        ))
    winner = min(candidates, key=lambda c: c.objective)
    return SearchResult(
        best_coefficients=dict(winner.coefficients), best_objective=winner.objective,
        objective=f"mean {metric} over {list(SETS)}", strategy=strategy, candidates=candidates, wall_time_s=seconds,
        compute=float(len(candidates) + (1 if metric == "relative_perplexity" else 0)),
        base_perplexities=dict(BASE_PPL) if metric == "relative_perplexity" else None,
        eval_sets={n: {"num_sequences": 16, "num_tokens": 16 * 230 + 7 * i, "num_truncated": 0}
                   for i, n in enumerate(SETS)},
        weighting=weighting, search_config={"strategy": strategy, "metric": metric, "objective": "mean"},
    ).to_dict()


def full_vectors_merger(root: Path) -> DEMMerger:
    base = save_base(root / "base")
    merger = DEMMerger.from_pretrained(base)
    for seed, name in enumerate(SETS, start=1):
        merger.add_vector(DistributionVector.from_models(
            base, finetune_stand_in(seed), name=name, save_directory=root / "vectors" / name,
            metadata=metadata(name, steps=30),
        ))
    grid = [dict(zip(SETS, values)) for values in itertools.product((0.5, 1.0, 1.5), repeat=3)]
    merger.config.search_result = search_result(
        "grid", "relative_perplexity", grid, {"math": 0.5, "chat": 0.5, "bible": 1.0}, "sum", 486.2
    )
    merger.config.coefficients = dict(merger.config.search_result["best_coefficients"])
    return merger


def lora_vectors_merger(root: Path) -> DEMMerger:
    base = save_base(root / "base")
    merger = DEMMerger.from_pretrained(base, config=DEMConfig(weighting="average"))
    for seed, name in enumerate(SETS, start=1):
        torch.manual_seed(seed)
        lora = LoraConfig(r=8 if name != "bible" else 4, lora_alpha=16, init_lora_weights=False,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        adapter = get_peft_model(tiny_llama(), lora)
        merger.add_vector(DistributionVector.from_peft(adapter, name=name, metadata=metadata(name, steps=60)))
    trials = [
        {"math": 1.0, "chat": 1.0, "bible": 1.0}, {"math": 0.62, "chat": 1.41, "bible": 0.33},
        {"math": 1.77, "chat": 0.28, "bible": 1.12}, {"math": 1.18, "chat": 0.74, "bible": 0.95},
        {"math": 1.31, "chat": 0.69, "bible": 1.02}, {"math": 1.26, "chat": 0.71, "bible": 0.98},
    ]
    merger.config.search_result = search_result(
        "bayesian", "log_perplexity", trials, {"math": 1.26, "chat": 0.71, "bible": 0.98}, "average", 73.4
    )
    merger.config.coefficients = dict(merger.config.search_result["best_coefficients"])
    return merger


EXAMPLES = {
    "full_vectors.md": (full_vectors_merger, "your-org/dem-smollm2-135m-full", {"base_model": BASE_HUB_ID}),
    "lora_vectors.md": (lora_vectors_merger, "your-org/dem-smollm2-135m-lora", {"base_model": BASE_HUB_ID}),
}


def render_examples() -> dict[str, str]:
    """`{file name: card text}` for every example, rendered through `DEMMerger.save_pretrained`."""
    cards = {}
    for file_name, (build, repo_id, card_kwargs) in EXAMPLES.items():
        with tempfile.TemporaryDirectory(prefix="dem_hf-card-example-") as tmp:
            merger = build(Path(tmp))
            saved = merger.save_pretrained(
                Path(tmp) / "out", save_vectors=True, model_card_kwargs={"model_id": repo_id, **card_kwargs}
            )
            cards[file_name] = (saved / CARD_NAME).read_text(encoding="utf-8")
    return cards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Only check that the files are current.")
    args = parser.parse_args(argv)
    stale = []
    for file_name, text in render_examples().items():
        path = HERE / file_name
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(file_name)
        if not args.check:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if args.check and stale:
        print(f"out of date: {stale}; run `python model_cards/generate.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
