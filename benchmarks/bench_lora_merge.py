"""LoRA merge benchmark: `dem-hf merge` of LoRA vectors, wall time and start-up, this tree against another.

    python benchmarks/bench_lora_merge.py --compare-src ../dem_hf-before [--rounds 5] [--base DIR] [--vector DIR ...]

Every row is its own process, started by `bench_merge.py`'s launcher (wall time around the child, the child's own
peak RSS); one warm-up round (inputs in the page cache), then `--rounds` timed rounds, the order rotated each round,
so the rows are measured side by side on the same (shared, noisy) machine. Medians and the min-max spread.

- `lora merge`: `python -m dem_hf merge --base B --vector V=w ... --no-save-vectors --output O` from this tree;
- `lora merge [alt]`: the same from `--compare-src` (e.g. the checkout before a change);
- `startup`: `python -m dem_hf merge --help`, the CLI's start-up alone;
- `import torch`: `python -c "import torch"`, the start-up a merge that imports torch pays on top.

Defaults: the demo's converted SmolLM2-135M-Instruct and its four rank-16 LoRA vectors, equal weights. Inputs are only
read; outputs go to `benchmarks/.work/lora/` and are removed. The two merges' outputs are compared at the end.
Results are recorded by hand in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import REPO, WORK, dem_cli, dem_env, log, machine, run_measured  # noqa: E402

# The demo's converted model and its LoRA runs (`bash examples/run_demo.sh` makes them once).
DEMO_RUNS = REPO / "examples" / ".cache" / "demo" / "runs"
DEFAULT_BASE = REPO / "examples" / ".cache" / "SmolLM2-135M-Instruct"
ALT = " [alt]"


def merge_command(source: Path, base: Path, vectors: list[Path], out: Path) -> list[str]:
    weight = 1.0 / len(vectors)
    command = [*dem_cli(source), "merge", "--base", str(base)]
    for vector in vectors:
        command += ["--vector", f"{vector}={weight}"]
    return command + ["--no-save-vectors", "--output", str(out)]


def compare_outputs(first: Path, second: Path) -> str:
    """Max |difference| and the share of bitwise-equal values between two merged checkpoints (float32)."""
    from safetensors.numpy import load_file

    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    if sorted(a) != sorted(b):
        return "different tensors"
    equal = total = 0
    largest = 0.0
    for name in a:
        x, y = a[name].astype(np.float32), b[name].astype(np.float32)
        equal, total = equal + int((x == y).sum()), total + x.size
        largest = max(largest, float(np.abs(x - y).max(initial=0.0)))
    return f"max |difference| {largest:.3g}, {100 * equal / total:.2f}% of values bitwise equal"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare-src", type=Path, required=True, help="Another source tree with a dem_hf package.")
    parser.add_argument("--rounds", type=int, default=5, help="Timed rounds after one warm-up round.")
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE)
    parser.add_argument("--vector", type=Path, action="append", default=None, help="A saved LoRA vector (repeat).")
    args = parser.parse_args()
    if not args.vector and not DEMO_RUNS.is_dir():
        parser.error(f"no --vector given and no demo runs in {DEMO_RUNS}: run `bash examples/run_demo.sh` once, or pass "
                     "--base and --vector")
    vectors = args.vector or sorted(path / "vector" for path in DEMO_RUNS.iterdir() if (path / "vector").is_dir())
    out = WORK / "lora"
    outputs = {"lora merge": out / "after", "lora merge" + ALT: out / "before"}
    rows = {
        "lora merge": (merge_command(REPO, args.base, vectors, outputs["lora merge"]), dem_env(REPO), REPO),
        "lora merge" + ALT: (
            merge_command(args.compare_src, args.base, vectors, outputs["lora merge" + ALT]), dem_env(args.compare_src), args.compare_src,
        ),
        "startup": ([*dem_cli(REPO), "merge", "--help"], dem_env(REPO), REPO),
        "import torch": ([sys.executable, "-c", "import torch"], None, REPO),
    }
    log(machine())
    names = list(rows)
    walls: dict[str, list[float]] = {name: [] for name in names}
    peaks: dict[str, int] = dict.fromkeys(names, 0)
    for round_number in range(args.rounds + 1):
        for name in names[round_number % len(names):] + names[: round_number % len(names)]:
            command, env, cwd = rows[name]
            if name in outputs:  # outside the timing
                shutil.rmtree(outputs[name], ignore_errors=True)
            out.mkdir(parents=True, exist_ok=True)
            wall, rss, code = run_measured(command, out / f"{name.replace(' ', '_')}.log", env=env, cwd=cwd)
            if code != 0:
                raise SystemExit(f"{name} failed with status {code}: {' '.join(command)}")
            label = "warm-up" if round_number == 0 else f"round {round_number}"
            log(f"{label:8s} {name:18s} {wall:7.2f} s  peak RSS {rss / 1e9:5.2f} GB")
            if round_number:
                walls[name].append(wall)
                peaks[name] = max(peaks[name], rss)
    agreement = compare_outputs(out / "after", out / "before")
    print()
    print(f"base {args.base}, {len(vectors)} LoRA vectors, equal weights; {args.rounds} timed rounds after 1 warm-up, "
          f"order rotated each round; [alt] = {args.compare_src}")
    print()
    print("| row | wall median (s) | wall min-max (s) | peak RSS max (GB) |")
    print("|---|---|---|---|")
    for name in names:
        print(f"| {name} | {statistics.median(walls[name]):.2f} | {min(walls[name]):.2f}-{max(walls[name]):.2f} | "
              f"{peaks[name] / 1e9:.2f} |")
    print()
    print(f"speed-up of the merge (medians): {statistics.median(walls['lora merge' + ALT]) / statistics.median(walls['lora merge']):.1f}x; "
          f"outputs: {agreement}")
    shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
