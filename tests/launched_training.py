"""The script `tests/test_distributed_training.py` launches: `train_distributions` in one process of a launch.

Run as `python tests/launched_training.py BASE DATA_DIR OUTPUT_DIR LOG_DIR` (under `accelerate launch`, `torchrun` or
on its own). Every write of an output folder (`atomic_directory`'s final rename) and of `run_info.json` is recorded
by this process in `LOG_DIR/writes-<pid>.jsonl`, the optimizer steps it took per run and the world size its
trainers saw in `LOG_DIR/result-<pid>.json`, so the test counts writers from outside the code under test.
Extra arguments: `--no-cpu` leaves `use_cpu` off (a CPU launch then forms no process group), `--hold-file PATH`
waits after the first step of the first run until PATH exists (so two independent processes overlap for sure).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import SFTConfig  # noqa: E402

import dem_hf.io.outputs as outputs  # noqa: E402
import dem_hf.training.runs as runs  # noqa: E402
from dem_hf import train_distributions  # noqa: E402

DATASETS = ("plain", "other")


class Recorder(TrainerCallback):
    """Optimizer steps and world size per run, as this process's trainers saw them."""

    def __init__(self, hold_file: str | None) -> None:
        self.runs: dict[str, dict] = {}
        self.hold_file = hold_file

    def on_train_begin(self, args, state, control, **kwargs):
        self.runs[args.run_name] = {"steps": 0, "world_size": args.world_size, "process_index": args.process_index}

    def on_step_end(self, args, state, control, **kwargs):
        self.runs[args.run_name]["steps"] += 1
        while self.hold_file and not Path(self.hold_file).exists():
            time.sleep(0.1)
        self.hold_file = None


def launched_settings(output_dir, **overrides) -> SFTConfig:
    """Two optimizer steps of 4 rows per process (with two processes: the whole 8-row dataset per step)."""
    settings = dict(output_dir=str(output_dir), use_cpu=True, bf16=False, report_to="none", max_steps=2,
                    learning_rate=2e-2, per_device_train_batch_size=4, logging_steps=1, save_strategy="no",
                    dataloader_num_workers=0, disable_tqdm=True, seed=0, lr_scheduler_type="constant")
    return SFTConfig(**{**settings, **overrides})


def record_writes(log: Path) -> None:
    """Append one line per completed output write of this process to `log` (rank, pid, path)."""

    def note(kind: str, path) -> None:
        with open(log, "a") as handle:
            handle.write(json.dumps({"kind": kind, "path": str(path), "rank": os.environ.get("RANK")}) + "\n")

    move_into_place, write_json = outputs._move_into_place, runs.write_json_atomic

    def recorded_move(staging, target, overwrite):
        move_into_place(staging, target, overwrite)
        note("folder", target)

    def recorded_json(path, content):
        write_json(path, content)
        note("json", path)

    outputs._move_into_place = recorded_move  # looked up at call time by atomic_directory
    runs.write_json_atomic = recorded_json  # looked up at call time by record_start / finish_run


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("base", "data_dir", "output_dir", "log_dir"):
        parser.add_argument(name)
    parser.add_argument("--no-cpu", action="store_true")
    parser.add_argument("--hold-file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    log_dir = Path(args.log_dir)
    record_writes(log_dir / f"writes-{os.getpid()}.jsonl")
    recorder = Recorder(args.hold_file)
    config = launched_settings(args.output_dir, use_cpu=not args.no_cpu)
    result: dict = {"rank": os.environ.get("RANK"), "pid": os.getpid()}
    try:
        vectors = train_distributions(
            args.base, {name: str(Path(args.data_dir) / f"{name}.jsonl") for name in DATASETS}, config,
            output_dir=args.output_dir, callbacks=[recorder],
        )
        result["vectors"] = [vector.name for vector in vectors]
    except Exception as error:
        result["error"] = f"{type(error).__name__}: {error}"
    result["runs"] = recorder.runs
    (log_dir / f"result-{os.getpid()}.json").write_text(json.dumps(result))
    sys.exit(1 if "error" in result else 0)


if __name__ == "__main__":
    main()
