"""Data-ablation simulation on a real model: does the proxy perplexity rank mixtures like real training does?

SmolLM2-135M-Instruct (offline, the demo's converted copy) and a corpus of four real partitions, the demo's
distributions (GSM-style math, ShareGPT chat, CHAMP competition math, Python code), `--n-part` training
examples each. The pool: one LoRA run per partition (`--epochs` over its data). The candidates: every
subset of `--sizes` partitions (pairs and triples by default: 10 mixtures). Each candidate is scored twice on
the four validation splits:

- proxy: the uniform parameter average of its partition models (`dem_hf.evaluate_mixtures`, in place);
- trained: a LoRA run on the union of its partitions, same settings and epochs (so a pair trains twice as many
  steps as one partition), via `dem_hf.validate_proxy` -> `dem_hf.train_mixture`.

Reports Pearson and Spearman correlation between the two (over the mean perplexity, and per validation set),
a scatter plot, and the training compute of the pool against training every candidate.

Run from the repository root (after `bash examples/run_demo.sh` has set up the model and data once):

    python benchmarks/bench_ablation.py

Runs are cached in benchmarks/.work/ablation/ (git-ignored); the plot goes to benchmarks/ablation_proxy.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dem_hf import PartitionPool, validate_proxy  # noqa: E402
from dem_hf.demo import prepare_distributions, prepare_smollm2  # noqa: E402
from dem_hf.demo.distributions import to_prompt_completion  # noqa: E402

CACHE = ROOT / "examples" / ".cache"
WORK = ROOT / "benchmarks" / ".work" / "ablation"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--partitions", nargs="+", default=["math", "chat", "champ", "code"])
    parser.add_argument("--n-part", type=int, default=48, help="Training examples per partition.")
    parser.add_argument("--epochs", type=float, default=1.0, help="Epochs over each run's data (pool and candidates).")
    parser.add_argument("--sizes", nargs="+", type=int, default=[2, 3], help="Candidate sizes (partitions per mixture).")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def sft_config(args: argparse.Namespace, output_dir: Path):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir), num_train_epochs=args.epochs, per_device_train_batch_size=4,
        learning_rate=args.learning_rate, lr_scheduler_type="constant", max_length=args.max_length,
        use_cpu=not torch.cuda.is_available(), bf16=False, report_to=[], save_strategy="no", logging_steps=5,
        seed=args.seed, dataloader_num_workers=0,
    )


def main() -> None:
    from peft import LoraConfig

    args = parse_args()
    tag = f"{len(args.partitions)}p-n{args.n_part}-e{args.epochs:g}-l{args.max_length}-lr{args.learning_rate:g}-r{args.lora_r}"
    work = WORK / tag
    work.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_smollm2(CACHE)
    data = prepare_distributions(CACHE, args.partitions, n_train=400, n_val=16, n_test=32, seed=args.seed)
    # one format (an empty prompt trains on every token, as `text` does) so that partitions can be mixed
    partitions = {name: to_prompt_completion(splits["train"].select(range(args.n_part))) for name, splits in data.items()}
    validation = {name: splits["validation"] for name, splits in data.items()}
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear", task_type="CAUSAL_LM")

    pool = PartitionPool.train(model_dir, partitions, sft_config(args, work / "pool"), lora, work / "pool")
    candidates = [",".join(c) for size in args.sizes for c in itertools.combinations(args.partitions, size)]
    plot = ROOT / "benchmarks" / "ablation_proxy.png"
    check = validate_proxy(
        pool, candidates, validation, sft_config=sft_config(args, work / "mixtures"), peft_config=lora,
        output_dir=work / "mixtures", max_length=args.max_length, plot=plot, show_progress=True,
    )
    report = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}",
        "settings": vars(args),
        **check.to_dict(),
    }
    (work / "report.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"\n## Data-ablation proxy ({report['date']}, {report['machine']})\n\n`{report['command']}`\n")
    print(check.table())
    print(f"\nPearson {check.pearson:.3f}, Spearman {check.spearman:.3f} over {len(candidates)} candidates "
          f"(mean perplexity over {len(validation)} validation sets)")
    for name, corr in check.per_set.items():
        print(f"- {name}: Pearson {corr['pearson']:.3f}, Spearman {corr['spearman']:.3f}")
    print(f"\ncompute: {json.dumps(check.compute, default=str)}")
    print(f"plot: {plot.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
