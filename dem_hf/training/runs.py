"""Run folders of [`dem_hf.training.trainers`] (the layout is in its module docs): reuse, resume, retrain, `run_info.json`.

`run_info.json` records what a run is trained with: the base's fingerprint, each dataset's content fingerprint
and every setting that can change the result. It is written when the run starts (`"finished": false`) and again,
last, when it ends (`"finished": true`); both writes are atomic. [`open_run`] compares that record with what is
asked now, before any run trains, and applies one policy:

- same data, base and settings: a finished run is reused, an interrupted one resumes from its last *complete*
  checkpoint ([`last_complete_checkpoint`]: a `checkpoint-N` half-written by a kill or a full disk is skipped and
  removed);
- anything else (other data, even with the same number of rows; other settings; no readable record): a
  `ValueError` that lists the differences and says how to proceed. With `retrain=True` the run is trained again
  from the base into `.<name>.retrain/` beside it; the old folder stays until the new run has finished and is
  then replaced ([`finish_run`]). An interrupted retrain resumes there when asked again with the same settings.

A settings field the record does not have (added by a newer TRL or PEFT) is not counted as a difference.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__, logging
from ..io.outputs import write_file_atomic
from ..io.tensors import fingerprint, open_weights
from ..vectors.vector import VECTOR_CONFIG_NAME
from .callbacks import VECTOR_FOLDER

logger = logging.get_logger(__name__)

RUN_INFO_NAME = "run_info.json"
MODEL_FOLDER = "model"
ADAPTER_FOLDER = "adapter"
RETRAIN_SUFFIX = ".retrain"
TRAINER_STATE_NAME = "trainer_state.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
SETTINGS_KEYS = ("sft_config", "peft_config")


@dataclass
class RunFolder:
    """Where one run lives and where its trainer writes.

    Attributes:
        name: the run's name.
        run_dir: its folder, `output_dir/<name>`.
        work_dir: where the trainer writes: `run_dir`, or `.<name>.retrain/` beside it while it is retrained.
        info: the `run_info.json` of a finished run that is reused as it is; None when the run trains.
    """

    name: str
    run_dir: Path
    work_dir: Path
    info: dict[str, Any] | None = None

    @property
    def reused(self) -> bool:
        return self.info is not None

    @property
    def retraining(self) -> bool:
        return self.work_dir != self.run_dir


def final_model_dir(run_dir: Path, lora: bool) -> Path:
    """Where a run's final model goes: `adapter/` for a LoRA run, `model/` for a full fine-tune."""
    return run_dir / (ADAPTER_FOLDER if lora else MODEL_FOLDER)


def base_identity(base) -> tuple[str | None, dict[str, Any]]:
    """The base's name or path and its fingerprint (which is what identifies it: folders move)."""
    source, name, _ = open_weights(base)
    return name, fingerprint(source)


def retrain_dir(run_dir: Path) -> Path:
    """The hidden folder beside `run_dir` a run is retrained in before it replaces `run_dir`."""
    return run_dir.parent / f".{run_dir.name}{RETRAIN_SUFFIX}"


# ============================================================================================ records


def read_run_info(run_dir: Path) -> dict[str, Any] | None:
    """The `run_info.json` in `run_dir` (finished or not), or None when it is absent or unreadable."""
    info_file = run_dir / RUN_INFO_NAME
    if not info_file.is_file():
        return None
    try:
        info = json.loads(info_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
        logger.warning(f"{str(info_file)!r} is unreadable ({error}).")
        return None
    return info if isinstance(info, dict) else None


def _is_finished(info: dict[str, Any] | None, run_dir: Path, needs_vector: bool) -> bool:
    if info is None or info.get("finished") is not True:
        return False
    if needs_vector and not (run_dir / VECTOR_FOLDER / VECTOR_CONFIG_NAME).is_file():
        logger.warning(f"Run {run_dir.name!r} is marked finished but its vector is missing; it is trained again.")
        return False
    return True


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            found += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [f"{prefix.rstrip('.')}: {_short(old)} -> {_short(new)}"]


def setup_changes(info: dict[str, Any] | None, setup: dict[str, Any]) -> list[str]:
    """How the recorded setup of a run differs from `setup` (empty when the run matches what is asked now)."""
    if info is None:
        return ["it has no readable run_info.json recording what it was trained with"]
    recorded, asked = {key: info.get(key) for key in setup}, dict(setup)
    for key in SETTINGS_KEYS:  # fields only one side knows come from another TRL/PEFT version
        old, new = recorded.get(key), asked.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            recorded[key] = {k: v for k, v in old.items() if k in new}
            asked[key] = {k: v for k, v in new.items() if k in old}
    return _differences(recorded, asked)


def write_json_atomic(path: Path, content: dict[str, Any]) -> None:
    """Write a JSON file under a temporary name and rename it into place (complete or absent)."""
    write_file_atomic(path, lambda handle: handle.write(json.dumps(content, indent=2) + "\n"))


def library_versions() -> dict[str, str]:
    """Versions of dem_hf and the libraries a run was trained with (recorded in `run_info.json`)."""
    import datasets
    import peft
    import transformers
    import trl

    return {"dem_hf": __version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "peft": peft.__version__, "datasets": datasets.__version__, "torch": torch.__version__}


# ============================================================================================ the policy


def _stale_message(name: str, run_dir: Path, changes: list[str], finished: bool) -> str:
    shown = "; ".join(changes[:6]) + (f"; ... ({len(changes) - 6} more)" if len(changes) > 6 else "")
    state = "finished" if finished else "was started (not finished)"
    return (
        f"Run {name!r} in {str(run_dir)!r} {state} with other data or settings than asked now ({shown}), so it is "
        f"not {'reused' if finished else 'resumed'}. To train it again from the base model pass retrain=True "
        "(dem-hf train --retrain); the old run stays in place until the new one has finished. Otherwise use "
        "another output_dir, or the data and settings the run was trained with."
    )


def open_run(
    name: str, run_dir: Path, setup: dict[str, Any], *, retrain: bool = False, needs_vector: bool = True,
    main_process: bool = True,
) -> RunFolder:
    """Decide what happens to one run folder (see the module docs), before any run trains.

    Args:
        name: the run's name.
        run_dir: its folder, `output_dir/<name>`.
        setup: what the run is asked to train with (the part of `run_info.json` that is compared).
        retrain: train again from the base a run recorded with other data or settings, instead of refusing.
        needs_vector: a finished run must also have its `vector/` to be reused.
        main_process: whether this process may remove or move folders (the others only read).

    Raises:
        ValueError: when the folder holds a run with other data or settings and `retrain` is False.
    """
    staging = retrain_dir(run_dir)
    if main_process:
        _complete_interrupted_replacement(run_dir, staging)
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        if main_process and staging.is_dir():
            logger.info(f"Run {name!r}: removing {str(staging)!r}, left by a retrain of a run that is gone.")
            shutil.rmtree(staging, ignore_errors=True)
        return RunFolder(name, run_dir, run_dir)
    info = read_run_info(run_dir)
    changes = setup_changes(info, setup)
    if not changes:
        return RunFolder(name, run_dir, run_dir, info if _is_finished(info, run_dir, needs_vector) else None)
    finished = info is not None and info.get("finished") is True
    if not retrain:
        raise ValueError(_stale_message(name, run_dir, changes, finished))
    logger.warning(
        f"Run {name!r} in {str(run_dir)!r} was trained with other data or settings ({'; '.join(changes[:6])}); "
        f"retraining it from the base model in {str(staging)!r} as retrain=True asks. The old run stays in place "
        "until the new one has finished."
    )
    staged = read_run_info(staging) if staging.is_dir() else None
    if staging.is_dir() and main_process and setup_changes(staged, setup):
        shutil.rmtree(staging)  # an earlier retrain with yet other data or settings: not resumable
    elif main_process and _is_finished(staged, staging, needs_vector):
        replace_run(staging, run_dir)  # finished before the replacement was interrupted
        return RunFolder(name, run_dir, run_dir, staged)
    return RunFolder(name, run_dir, staging)


def _complete_interrupted_replacement(run_dir: Path, staging: Path) -> None:
    """Finish a replacement cut between its two renames; remove the old folders replacements left behind."""
    if not run_dir.exists() and staging.is_dir() and (read_run_info(staging) or {}).get("finished") is True:
        logger.warning(f"Completing the interrupted replacement of {str(run_dir)!r} by its finished retrain.")
        os.replace(staging, run_dir)
    if run_dir.exists():
        for leftover in run_dir.parent.glob(f".{run_dir.name}.old-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def replace_run(staging: Path, run_dir: Path) -> None:
    """Move a finished retrain into place: the old run is moved aside first and removed only afterwards."""
    retired = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.old-", dir=run_dir.parent))
    if run_dir.exists():
        os.replace(run_dir, retired / run_dir.name)
    os.replace(staging, run_dir)
    shutil.rmtree(retired, ignore_errors=True)
    logger.info(f"Run {run_dir.name!r}: the retrained run replaced the old one in {str(run_dir)!r}.")


def record_start(folder: RunFolder, info: dict[str, Any]) -> None:
    """Write `run_info.json` with `"finished": false` before training, so an interruption keeps the setup."""
    write_json_atomic(folder.work_dir / RUN_INFO_NAME, {**info, "finished": False})


def finish_run(folder: RunFolder, info: dict[str, Any]) -> None:
    """Write the final `run_info.json` (`"finished": true`, last) and move a retrain into place."""
    write_json_atomic(folder.work_dir / RUN_INFO_NAME, {**info, "finished": True})
    if folder.retraining:
        replace_run(folder.work_dir, folder.run_dir)


# ============================================================================================ checkpoints


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a `checkpoint-N` folder cannot be resumed from (None when it is complete).

    The trainer writes `trainer_state.json` last, so a checkpoint without a readable one was cut off; the
    weights' safetensors headers must match their file sizes, and every JSON file must parse.
    """
    from safetensors import SafetensorError, safe_open

    if not (checkpoint / TRAINER_STATE_NAME).is_file():
        return f"it has no {TRAINER_STATE_NAME}"
    for path in sorted(checkpoint.glob("*.json")):
        try:
            json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
            return f"{path.name} is unreadable ({error})"
    weights = sorted(checkpoint.glob("*.safetensors")) + sorted(checkpoint.glob("*.bin"))
    if not weights:
        return "it has no model weights"
    for path in weights:
        if path.suffix == ".bin":
            if path.stat().st_size == 0:
                return f"{path.name} is empty"
            continue
        try:
            with safe_open(path, framework="numpy"):  # checks the header against the file's size
                pass
        except (SafetensorError, OSError) as error:
            return f"{path.name} is unreadable ({error})"
    for path in checkpoint.glob("*.pt"):
        if path.stat().st_size == 0:
            return f"{path.name} is empty"
    return None


def last_complete_checkpoint(run_dir: Path, remove_broken: bool = True) -> Path | None:
    """The highest-numbered complete `checkpoint-N` in `run_dir`; incomplete ones above it are skipped (and removed)."""
    if not run_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    for _, checkpoint in sorted(found, reverse=True):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        logger.warning(
            f"Skipping {str(checkpoint)!r}: {problem}, so it was cut off while being written (a kill or a full disk)"
            f"{'; removing it' if remove_broken else ''}."
        )
        if remove_broken:
            shutil.rmtree(checkpoint, ignore_errors=True)
    return None


def train_or_resume(trainer, work_dir: Path, name: str) -> None:
    """Train, resuming from the last complete checkpoint in `work_dir` if an earlier attempt left one.

    Raises `ValueError` when TRL's preprocessing left no example to train on (it drops those whose every trained-on
    token lies past `max_length`), instead of the sampler's error deep inside the trainer.
    """
    dataset = trainer.train_dataset
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError(
            f"Run {name!r}: no training example is left after TRL's preprocessing: in every one, the tokens the loss is "
            f"taken on (the completion or assistant turns) start after max_length={trainer.args.max_length} tokens "
            "and were cut off. Raise max_length or shorten the prompts."
        )
    checkpoint = last_complete_checkpoint(work_dir, remove_broken=trainer.is_world_process_zero())
    trainer.accelerator.wait_for_everyone()  # every process resumes from the same checkpoint
    if checkpoint:
        logger.info(f"Run {name!r}: resuming from {checkpoint}.")
    else:
        logger.info(f"Run {name!r}: training from the base model.")
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
