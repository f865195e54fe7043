"""Run folders of [`dem_hf.training`] (the layout is in its module docs): reuse, resume, `run_info.json`.

A run whose `run_info.json` says `"finished": true` is reused ([`read_finished_run`]), with a warning when it was
trained with other data, base or settings than asked now ([`warn_if_changed`]); a run folder with checkpoints but
no such marker resumes from its last checkpoint ([`train_or_resume`]). `run_info.json` is written last and
atomically ([`write_json_atomic`]), so the marker is never half-written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from . import __version__
from .callbacks import VECTOR_FOLDER
from .outputs import write_file_atomic
from .tensors import fingerprint, open_weights
from .vectors import VECTOR_CONFIG_NAME

logger = logging.get_logger(__name__)

RUN_INFO_NAME = "run_info.json"
MODEL_FOLDER = "model"
ADAPTER_FOLDER = "adapter"


def final_model_dir(run_dir: Path, lora: bool) -> Path:
    """Where a run's final model goes: `adapter/` for a LoRA run, `model/` for a full fine-tune."""
    return run_dir / (ADAPTER_FOLDER if lora else MODEL_FOLDER)


def base_identity(base) -> tuple[str | None, dict[str, Any]]:
    """The base's name or path and its fingerprint (which is what identifies it: folders move)."""
    source, name, _ = open_weights(base)
    return name, fingerprint(source)


def read_finished_run(run_dir: Path, needs_vector: bool = True) -> dict[str, Any] | None:
    """The `run_info.json` of a finished run in `run_dir`, or None if the run has not finished."""
    info_file = run_dir / RUN_INFO_NAME
    if not info_file.is_file():
        return None
    try:
        info = json.loads(info_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        logger.warning(f"{str(info_file)!r} is unreadable ({error}); the run is treated as unfinished.")
        return None
    if not isinstance(info, dict) or info.get("finished") is not True:
        return None
    if needs_vector and not (run_dir / VECTOR_FOLDER / VECTOR_CONFIG_NAME).is_file():
        logger.warning(f"Run {run_dir.name!r} is marked finished but its vector is missing; it is trained again.")
        return None
    return info


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            found += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def warn_if_changed(name: str, run_dir: Path, info: dict[str, Any], setup: dict[str, Any]) -> None:
    """Warn when a finished run being reused was trained with other data, base or settings than asked now."""
    changes = _differences({k: info.get(k) for k in setup}, setup)
    if changes:
        logger.warning(
            f"Run {name!r} in {str(run_dir)!r} finished earlier with a different setup ({'; '.join(changes[:6])}"
            f"{' ...' if len(changes) > 6 else ''}); reusing it as it is. Delete the folder to train it again."
        )


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


def train_or_resume(trainer, run_dir: Path, name: str) -> None:
    """Train, resuming from the last checkpoint in `run_dir` if an earlier attempt left one."""
    from transformers.trainer_utils import get_last_checkpoint

    checkpoint = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
    if checkpoint:
        logger.info(f"Run {name!r}: resuming from {checkpoint}.")
    else:
        logger.info(f"Run {name!r}: training from the base model.")
    trainer.train(resume_from_checkpoint=checkpoint)
