"""The processes of one training call: one process group, and one writer per run folder.

Under `accelerate launch` or `torchrun` every process runs the same script and calls [`train_distributions`] /
[`train_mixture`] with the same `output_dir`. They train each run together as one process group, and only the
main process (`process_index` 0) writes run folders; the others only read them. Two ways processes can end up
sharing an output folder without being one group are refused before any run trains:

- a launch whose processes formed no group: the launcher started `WORLD_SIZE` > 1 processes, but each trainer
  runs alone (world size 1). Accelerate does this silently on a machine without a GPU unless `use_cpu=True`
  asks for a CPU (gloo) group. [`check_process_group`] raises a `ValueError` in every process.
- independent processes (two plain `python train.py` started at once, or two launches) on the same runs: the main
  process of a call holds the lock of each of its run folders (`output_dir/.<name>.lock`, see
  [`dem_hf.io.outputs.output_lock`]) from before it opens them until the call returns, so a second call on a run
  that is being trained fails at once with [`OutputInUseError`] instead of training it a second time into the
  same folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from ..io import outputs
from ..io.outputs import OutputInUseError, lock_path, output_lock

# Where launchers put the number of processes they started: torchrun / accelerate launch, then MPI implementations
# (the variables Accelerate itself reads).
LAUNCHER_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_processes() -> tuple[str, int] | None:
    """The launcher's variable and the number of processes it started, or None when no launcher started this one."""
    for variable in LAUNCHER_WORLD_SIZE_VARIABLES:
        value = os.environ.get(variable, "").strip()
        if value.isdigit():
            return variable, int(value)
    return None


def check_process_group(sft_config, output_dir: str | os.PathLike) -> None:
    """Refuse a launch of several processes whose trainers did not form one process group.

    Args:
        sft_config (`trl.SFTConfig`): the settings every run trains with (their `world_size` is the group's).
        output_dir (`str` or `os.PathLike`): the runs' folder, named in the error.

    Raises:
        ValueError: when a launcher started more than one process but the trainer runs alone (world size 1): each
            process would train every run into the same folder.

    Example:
        ```python
        >>> check_process_group(SFTConfig(output_dir="runs", use_cpu=True), "runs")  # plain `python`: nothing to check
        ```
    """
    launched = launched_processes()
    if launched is None or launched[1] <= 1 or sft_config.world_size != 1:
        return
    variable, count = launched
    if not sft_config.use_cpu and sft_config.device.type == "cpu":
        hint = ("On a machine without a GPU, Accelerate forms a CPU (gloo) group only when asked: pass "
                "SFTConfig(use_cpu=True) (dem-hf train --use_cpu, or ACCELERATE_USE_CPU=1 in the environment).")
    else:
        hint = "Check the launcher's configuration (accelerate config, or torchrun's options)."
    raise ValueError(
        f"This process is one of {count} processes started by a launcher ({variable}={count}), but its trainer runs "
        f"alone (world size 1): the processes formed no process group, so each one would train every run into the "
        f"same output folder {str(output_dir)!r}. {hint} Otherwise start one process (plain `python`), or give each "
        "process its own output_dir."
    )


@contextmanager
def hold_run_folders(run_dirs: Iterable[Path], main_process: bool) -> Iterator[None]:
    """Hold the lock of every run folder for the duration of the block, in the group's main process only.

    Args:
        run_dirs: the run folders (`output_dir/<name>`) this call may create, reuse, resume or replace.
        main_process: whether this is the main process of its group (the others never write run folders).

    Raises:
        OutputInUseError: when another call (another process, or this one) holds one of the locks; nothing has
            been read or written yet, and the locks taken so far are released.
    """
    with ExitStack() as stack:
        if main_process:
            for run_dir in run_dirs:
                try:
                    stack.enter_context(output_lock(run_dir))
                except OutputInUseError as error:
                    raise OutputInUseError(_in_use_message(run_dir)) from error
        yield


def _in_use_message(run_dir: Path) -> str:
    return (
        f"Run {run_dir.name!r} in {str(run_dir.parent)!r} is being trained by another process right now (its lock "
        f"{str(lock_path(run_dir))!r} is held), so this process does not train it a second time into the same folder. "
        "If you started several processes to train together, they did not form one process group: start them with "
        "`accelerate launch` or `torchrun` (with use_cpu=True on a machine without a GPU). Otherwise give each "
        "process its own output_dir, or wait for the other one to finish: its finished runs are then reused."
        + ("" if outputs.fcntl is not None else f" If no other process is training it, delete {str(lock_path(run_dir))!r}.")
    )
