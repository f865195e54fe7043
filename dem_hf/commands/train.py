"""`dem-hf train`: one TRL SFT run per dataset, each turned into a distribution vector.

    dem-hf train --base HuggingFaceTB/SmolLM2-135M --dataset math=data/math.jsonl --dataset chat=data/chat.jsonl \\
        --output_dir runs --max_steps 200 --learning_rate 2e-4 --use_peft --lora_r 16 --lora_target_modules all-linear

dem-hf's own options come first: `--base`, `--dataset NAME=PATH` (repeat), `--eval_dataset NAME=PATH` (one validation
set per dataset, with `--eval_strategy steps --load_best_model_at_end true`: each run kept at its best checkpoint on
its own set), `--early_stopping_patience`, `--retrain`, `--checkpoint_vectors`, `--warm_start_steps` (a shared warm
start: one uniform mixture run that every run then starts from).
Then TRL's `ModelConfig` LoRA options, as TRL's own scripts take them (`--use_peft --lora_r --lora_alpha
--lora_dropout --lora_target_modules --use_rslora ...`, with TRL's defaults); giving any of them turns LoRA on, so
`--lora-r 16 --target-modules all-linear` (dem_hf 0.1's spelling) still works; a single target module is a module
name (`all-linear` is PEFT's keyword); without them the runs are full fine-tunes. Then every `trl.SFTConfig`
field, parsed by `transformers.HfArgumentParser` exactly as TRL's CLI parses it (`--learning_rate 2e-4`,
`--max_steps 500`, `--per_device_train_batch_size 8`, `--output_dir runs`; dashes work too: `--output-dir`).
`--debug` keeps its dem-hf meaning (full tracebacks), so TrainingArguments' own `debug` field is not available here.

Runs already in `--output_dir` are reused (finished) or resumed (interrupted) only when they were trained with
the same data (by content) and settings; otherwise the command stops, before training, with the differences.
`--retrain` trains such runs again from the base instead (each old run stays until its new one has finished).
Run it under `accelerate launch -m dem_hf train ...` to train each run on several GPUs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .options import add_command, add_config_options, add_option, add_switch

# TRL's ModelConfig fields that make a LoRA config (trl.get_peft_config reads them); the others (dtype, quantisation,
# attention implementation) load the base, which dem_hf does itself.
LORA_FIELDS = (
    "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_parameters",
    "lora_modules_to_save", "lora_task_type", "use_rslora", "use_dora",
)
LORA_ALIASES = {"lora_target_modules": ["--target-modules", "--target_modules"]}  # dem_hf 0.1's spelling


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

    sft_options = type("SFTConfigOptions", (SFTConfig,), {"_argument_group_name": "training (trl.SFTConfig)"})
    parser = add_command(
        subparsers, "train", __doc__, parents=[_lora_options(), HfArgumentParser(sft_options, add_help=False)],
        conflict_handler="resolve", usage="dem-hf train --base BASE --dataset NAME=PATH [--dataset NAME=PATH ...] "
        "--output_dir DIR [dem-hf options] [LoRA options] [trl.SFTConfig options]",
    )
    # dem-hf's own options go into the first group `--help` lists, before the parents' groups.
    add_option(parser, "base", required=True, help="Base model folder or Hub id.")
    add_option(
        parser, "dataset", action="append", required=True, type=parse_named_dataset, metavar="NAME=PATH",
        help="A training dataset: a .json/.jsonl/.csv/.parquet/.txt file, a folder or a Hub id; repeat per dataset.",
    )
    add_option(
        parser, "eval_dataset", action="append", default=None, type=parse_named_dataset, metavar="NAME=PATH",
        help="The validation set of the dataset NAME (repeat, one per --dataset), scored every --eval_steps with "
        "--eval_strategy steps; with --load_best_model_at_end true each vector is its run's best checkpoint there.",
    )
    add_option(
        parser, "early_stopping_patience", type=int, default=0, metavar="N",
        help="Stop a run after N evaluations without progress on its --eval_dataset (transformers' "
        "EarlyStoppingCallback; needs --load_best_model_at_end true). 0: never.",
    )
    add_switch(
        parser, "retrain",
        help="Train again, from the base, runs in --output_dir recorded with other data or settings (instead of "
        "stopping); each old run is replaced only once its new one has finished.",
    )
    add_switch(parser, "checkpoint_vectors", help="Also save a vector in every checkpoint.")
    add_option(
        parser, "warm_start_steps", type=int, default=0, metavar="STEPS",
        help="First train one uniform mixture of the datasets for STEPS steps (the same settings otherwise), saved "
        "merged as the shared warm start (`dem_hf.train_warm_start`); every run then starts from it, and the vectors "
        "merge into it (`dem-hf merge --base <its folder>`, printed at the end). 0: every run starts from --base.",
    )
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="Show full tracebacks on errors.")
    parser.set_defaults(run=run)


def _lora_options() -> argparse.ArgumentParser:
    """TRL's ModelConfig LoRA options; absent ones stay out of the namespace (TRL's defaults apply, LoRA stays off)."""
    from trl import ModelConfig

    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("LoRA (trl.ModelConfig; any of these turns LoRA on)")
    trl_fields = {f.name: f for f in dataclasses.fields(ModelConfig) if f.name in LORA_FIELDS}
    add_config_options(group, ModelConfig, LORA_FIELDS, aliases=LORA_ALIASES, **{
        name: {"default": argparse.SUPPRESS, "help": f"{f.metadata['help']} (TRL's default: {f.default})"}
        for name, f in trl_fields.items()
    })
    return parser


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


def model_config_from_args(args: argparse.Namespace):
    """TRL's `ModelConfig` from the LoRA options (TRL's defaults for the others), or None when none was given."""
    from trl import ModelConfig

    given = {name: getattr(args, name) for name in LORA_FIELDS if hasattr(args, name)}
    if not given:
        return None
    if given.get("use_peft") is False:
        raise ValueError(f"LoRA options {sorted(set(given) - {'use_peft'})} were given with --use_peft false.")
    config = ModelConfig(**{**given, "use_peft": True})
    targets = config.lora_target_modules  # ModelConfig makes one listed module a string, which PEFT reads as a regex
    if isinstance(targets, str) and targets != "all-linear":
        config.lora_target_modules = [targets]
    return config


def lora_config_from_args(args: argparse.Namespace):
    """The `peft.LoraConfig` TRL builds from the LoRA options (`trl.get_peft_config`), or None for full fine-tunes."""
    model_config = model_config_from_args(args)
    if model_config is None:
        return None
    from trl import get_peft_config

    return get_peft_config(model_config)


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
    from ..training.warm_start import train_warm_start

    from transformers import EarlyStoppingCallback

    if args.warm_start_steps < 0:
        raise ValueError(f"--warm_start_steps: expected a number of steps >= 0, got {args.warm_start_steps}")
    if args.early_stopping_patience < 0:
        raise ValueError(f"--early_stopping_patience: expected a number of evaluations >= 0, got {args.early_stopping_patience}")
    sft_config = sft_config_from_args(args)
    if args.early_stopping_patience and not sft_config.load_best_model_at_end:
        raise ValueError("--early_stopping_patience keeps the best checkpoint of a stopped run: expected "
                         "--load_best_model_at_end true (with --eval_strategy steps and --eval_dataset), got false.")
    callbacks = [EarlyStoppingCallback(args.early_stopping_patience)] if args.early_stopping_patience else []
    peft_config = lora_config_from_args(args)
    main_process = sft_config.process_index == 0  # under `accelerate launch`, report once
    base, warm = args.base, None
    with _progress_messages_shown(main_process):
        if args.warm_start_steps:
            warm_config = dataclasses.replace(sft_config, max_steps=args.warm_start_steps, eval_strategy="no",
                                              load_best_model_at_end=False)  # the warm start runs its steps in full
            warm = train_warm_start(args.base, args.dataset, warm_config, peft_config, sft_config.output_dir,
                                    retrain=args.retrain)
            base = warm.model_dir
        vectors = train_distributions(
            base, args.dataset, sft_config=sft_config, peft_config=peft_config,
            output_dir=sft_config.output_dir, checkpoint_vectors=args.checkpoint_vectors, retrain=args.retrain,
            eval_datasets=args.eval_dataset, callbacks=callbacks,
        )
    if main_process:
        print_summary(vectors)
        if warm:
            print(f"warm start ({warm.info['compute'].get('global_step')} mixture steps): {warm.model_dir}; the "
                  f"vectors are deltas from it: dem-hf merge --base {warm.model_dir} ...")
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
