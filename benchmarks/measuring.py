"""Measuring whole processes for the benchmarks: wall time and peak RSS of a child, and the disk a run needs.

`run_measured` starts each measured command through a small launcher process (this file run as a script), so that the
child's `ru_maxrss` is its own: Linux folds the peak RSS of the address space a child is forked from into the child's,
and the benchmark processes hold whole tensors while they generate checkpoints. `require_free_disk` refuses a run
that would fill the disk, before anything is generated.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / ".work"
sys.path.insert(0, str(REPO))  # the working tree's dem_hf, installed or not
GB = 1e9
# Room left to the machine's other jobs when a benchmark plans its disk use.
DISK_MARGIN_BYTES = int(4 * GB)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_measured(command: list[str], log_file: Path, env: dict | None = None, cwd: Path = REPO) -> tuple[float, int, int]:
    """Run one child process; return (wall seconds, peak RSS bytes, exit status).

    The child is started by a small launcher process (this file's `measure`), not by this process: Linux folds the
    peak RSS of the address space a child is forked from into the child's `ru_maxrss`, so a child started from this
    process (which holds whole tensors while generating models) would report this process's peak instead of its own.
    """
    launcher = [sys.executable, str(Path(__file__).resolve()), str(log_file), "--", *command]
    result = subprocess.run(launcher, capture_output=True, text=True, cwd=cwd, env=env, check=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    return measured["wall_s"], measured["peak_rss_bytes"], measured["status"]


def measure(argv: list[str]) -> int:
    """Launcher: run `argv` (after `LOG --`), print wall time, peak RSS (`ru_maxrss` from `wait4`) and status."""
    log_file, separator, *command = argv
    if separator != "--":
        raise SystemExit(f"usage: measuring.py LOG -- COMMAND..., got {argv}")
    with open(log_file, "w") as out:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
    print(json.dumps({"wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "status": os.waitstatus_to_exitcode(status)}))
    return 0


def dem_env(source: Path = REPO) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(source) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def dem_cli(source: Path) -> list[str]:
    """How to start `dem-hf` from the source tree `source` (`python -m dem_hf`, or the older `dem_hf.cli`)."""
    module = "dem_hf" if (source / "dem_hf" / "__main__.py").exists() else "dem_hf.cli"
    return [sys.executable, "-m", module]


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    memory = next((int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    return f"{os.cpu_count()} cores ({model}), {memory / 2**20:.0f} GiB RAM, no GPU"


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (0 if it does not exist)."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) if folder.exists() else 0


def require_free_disk(folder: Path, peak_bytes: int, plan: str, hint: str = "") -> None:
    """Refuse (`SystemExit`) a run whose files under `folder` would reach `peak_bytes` when the disk cannot hold them.

    What `folder` already holds counts as done (it is reused or replaced); `DISK_MARGIN_BYTES` stay free for the
    machine's other jobs. `plan` says what the peak is made of, `hint` how to need less.

    Example:
        ```python
        >>> require_free_disk(WORK / "7b", int(54e9), "base + 2 vectors + output, 4 x 13.5 GB")
        ```
    """
    existing = folder_bytes(folder)
    probe = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(probe).free
    needed = max(peak_bytes - existing, 0) + DISK_MARGIN_BYTES
    if needed > free:
        raise SystemExit(
            f"not enough disk for {folder}: its files peak at {peak_bytes / GB:.1f} GB ({plan}); {existing / GB:.1f} GB "
            f"are there already, so it needs {needed / GB:.1f} GB free (with {DISK_MARGIN_BYTES / GB:.0f} GB left to "
            f"other jobs) but {free / GB:.1f} GB are free on the disk of {probe}.{' ' + hint if hint else ''}"
        )
    log(f"disk: {folder.name} peaks at {peak_bytes / GB:.1f} GB ({plan}); {free / GB:.1f} GB free, "
        f"{existing / GB:.1f} GB already there")


def time_rounds(runs: dict, contenders: list[str], rounds: int, out: Path, logs: Path) -> dict[str, list[tuple[float, int]]]:
    """One warm-up round, then `rounds` timed ones, the order rotated each round: side by side on a shared machine.

    Args:
        runs: `{contender: (command, environment or None, working directory)}`.
        contenders: the contenders to run, in the order of the first round.
        rounds: timed rounds after the warm-up.
        out: each contender's output is `out/<contender>`, removed before it runs (outside the timing).
        logs: folder for `<contender>.log`, each child's output.

    Returns:
        `{contender: [(wall seconds, peak RSS bytes), ...]}` over the timed rounds.
    """
    results: dict[str, list[tuple[float, int]]] = {c: [] for c in contenders}
    for round_number in range(rounds + 1):
        order = contenders[round_number % len(contenders):] + contenders[: round_number % len(contenders)]
        for contender in order:
            command, env, cwd = runs[contender]
            shutil.rmtree(out / contender, ignore_errors=True)
            out.mkdir(parents=True, exist_ok=True)
            wall, rss, code = run_measured(command, logs / f"{contender.replace(' ', '_')}.log", env=env, cwd=cwd)
            if code != 0:
                print((logs / f"{contender.replace(' ', '_')}.log").read_text()[-4000:])
                raise SystemExit(f"{contender} failed with status {code}: {' '.join(command)}")
            label = "warm-up" if round_number == 0 else f"round {round_number}"
            log(f"{label:8s} {contender:12s} {wall:7.2f} s  peak RSS {rss / 1e9:6.2f} GB")
            if round_number > 0:
                results[contender].append((wall, rss))
    return results


if __name__ == "__main__":
    sys.exit(measure(sys.argv[1:]))
