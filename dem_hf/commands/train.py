"""`dem-hf train`: one TRL SFT run per dataset, each turned into a distribution vector.

Every `trl.SFTConfig` field is an option, parsed by `transformers.HfArgumentParser` exactly as TRL's own CLI
parses it (`--learning_rate 2e-4`, `--max_steps 500`, `--per_device_train_batch_size 8`, `--output_dir runs`,
...; dashes work too: `--output-dir`). dem_hf adds `--base`, `--dataset NAME=PATH` (repeat), and LoRA options;
without `--lora-r` / `--target-modules` the runs are full fine-tunes. `--debug` keeps its dem-hf meaning (full
tracebacks), so TrainingArguments' own `debug` field is not available here.

Runs already in `--output_dir` are reused (finished) or resumed (interrupted) only when they were trained with
the same data (by content) and settings; otherwise the command stops, before training, with the differences.
`--retrain` trains such runs again from the base instead (each old run stays until its new one has finished).

    dem-hf train --base HuggingFaceTB/SmolLM2-135M --dataset math=data/math.jsonl --dataset chat=data/chat.jsonl \\
        --output_dir runs --max_steps 200 --learning_rate 2e-4 --lora-r 16 --target-modules all-linear

Run it under `accelerate launch -m dem_hf.commands.cli train ...` to train each run on several GPUs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import HELP

OUR_OPTIONS = (
    "base", "dataset", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "checkpoint_vectors", "retrain",
)


def parse_named_dataset(text: str) -> tuple[str, str]:
    """Parse `NAME=PATH` for `--dataset`; a bare `PATH` is named after its file stem or last path part."""
    name, sep, path = text.partition("=")
    if not sep:
        path = text
        name = Path(text.rstrip("/")).stem if Path(text).suffix else Path(text.rstrip("/")).name
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (a data file, a folder or a Hub dataset id), got {text!r}")
    return name, path


def register(subparsers) -> None:
    from transformers import HfArgumentParser
    from trl import SFTConfig

    parser = subparsers.add_parser(
        "train",
        help=HELP["train"],
        description=__doc__.split("\n\n")[0] + " Every trl.SFTConfig field is an option (listed below).",
        parents=[HfArgumentParser(SFTConfig, add_help=False)],
        conflict_handler="resolve",
    )
    group = parser.add_argument_group("dem_hf")
    group.add_argument("--base", required=True, help="Base model folder or Hub id.")
    group.add_argument(
        "--dataset", action="append", required=True, type=parse_named_dataset, metavar="NAME=PATH",
        help="A training dataset: a .json/.jsonl/.csv/.parquet/.txt file, a folder or a Hub id; repeat per dataset.",
    )
    group.add_argument("--lora-r", type=int, help="Train LoRA adapters of this rank instead of full fine-tunes.")
    group.add_argument("--lora-alpha", type=float, help="LoRA alpha (PEFT's default if omitted).")
    group.add_argument("--lora-dropout", type=float, help="LoRA dropout (PEFT's default if omitted).")
    group.add_argument("--target-modules", nargs="+", help="LoRA target modules, e.g. q_proj v_proj, or all-linear.")
    group.add_argument("--use-rslora", action="store_true", help="Scale LoRA by alpha/sqrt(r) (rsLoRA).")
    group.add_argument("--checkpoint-vectors", action="store_true", help="Also save a vector in every checkpoint.")
    group.add_argument(
        "--retrain", action="store_true",
        help="Train again, from the base, runs in --output_dir recorded with other data or settings (instead of "
        "stopping); each old run is replaced only once its new one has finished.",
    )
    group.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="Show full tracebacks on errors.")
    parser.set_defaults(run=run)


def sft_config_from_args(args: argparse.Namespace):
    """The `SFTConfig` the parsed options describe (as `HfArgumentParser.parse_args_into_dataclasses` builds it)."""
    from trl import SFTConfig

    from ..training.trainers import bf16_available

    fields = {f.name for f in dataclasses.fields(SFTConfig) if f.init} - {"debug"}
    values = {key: value for key, value in vars(args).items() if key in fields}
    if not values.get("output_dir"):
        raise ValueError("dem-hf train needs --output_dir (or --output-dir): the folder for the runs.")
    if values.get("bf16") is None and not values.get("fp16"):
        values["bf16"] = bf16_available()  # TRL's default (bf16 on) only where the hardware has it
    return SFTConfig(**values)


def lora_config_from_args(args: argparse.Namespace):
    """A `peft.LoraConfig` from the LoRA options, or None for full fine-tunes."""
    if args.lora_r is None and args.target_modules is None:
        if args.lora_alpha is not None or args.lora_dropout is not None or args.use_rslora:
            raise ValueError("LoRA options were given without --lora-r or --target-modules.")
        return None
    from peft import LoraConfig

    given = {"r": args.lora_r, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout}
    kwargs = {key: value for key, value in given.items() if value is not None}
    if args.target_modules is not None:
        targets = args.target_modules
        kwargs["target_modules"] = targets[0] if len(targets) == 1 and targets[0] == "all-linear" else targets
    return LoraConfig(task_type="CAUSAL_LM", use_rslora=args.use_rslora, **kwargs)


@contextmanager
def _progress_messages_shown(shown: bool) -> Iterator[None]:
    """Show dem_hf's INFO messages (which run starts, resumes or is reused) next to TRL's progress bars while the
    command runs, unless the user asked for fewer (`TRANSFORMERS_VERBOSITY`, `dem_hf.logging.set_verbosity_*`)."""
    from .. import logging

    explicit = logging.get_logger().level  # dem_hf's own level; NOTSET: it follows Transformers'
    if shown and logging.get_verbosity() > logging.INFO and not os.getenv("TRANSFORMERS_VERBOSITY"):
        logging.set_verbosity_info()
    try:
        yield
    finally:
        logging.set_verbosity(explicit or None)


def run(args) -> int:
    from ..training.trainers import train_distributions

    sft_config = sft_config_from_args(args)
    peft_config = lora_config_from_args(args)
    main_process = sft_config.process_index == 0  # under `accelerate launch`, report once
    with _progress_messages_shown(main_process):
        vectors = train_distributions(
            args.base, args.dataset, sft_config=sft_config, peft_config=peft_config,
            output_dir=sft_config.output_dir, checkpoint_vectors=args.checkpoint_vectors, retrain=args.retrain,
        )
    if main_process:
        print_summary(vectors)
    return 0


def print_summary(vectors) -> None:
    """One line per run: examples, tokens seen, the trainer's FLOPs, the mean training loss, the vector's folder."""
    print(f"{'dataset':<20} {'vector':<5} {'examples':>9} {'tokens':>12} {'FLOPs':>10} {'loss':>8}  path")
    for vector in vectors:
        meta, compute = vector.metadata, vector.metadata.get("compute", {})
        loss = compute.get("train_loss")
        print(
            f"{vector.name:<20} {vector.vector_type:<5} {meta.get('num_examples') or '?':>9} "
            f"{compute.get('tokens_seen') or '?':>12} {compute.get('total_flos', 0):>10.3g} "
            f"{loss if loss is None else format(loss, '.4f'):>8}  {vector.path}"
        )
