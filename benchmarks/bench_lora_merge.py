"""LoRA merge benchmark: `dem-hf merge` of LoRA vectors, wall time and start-up, this tree against another.

    python benchmarks/bench_lora_merge.py [--compare-src ../dem_hf-before] [--rounds 5] [--base DIR] [--vector DIR ...]
    python benchmarks/bench_lora_merge.py --size 3b [--adapters 4] [--rank 16] [--rounds 3] [--generate-only]

Every row is its own process, started by `measuring.py`'s launcher (wall time around the child, the child's own
peak RSS); one warm-up round (inputs in the page cache), then `--rounds` timed rounds, the order rotated each round,
so the rows are measured side by side on the same (shared, noisy) machine. Medians and the min-max spread.

- `lora merge`: `python -m dem_hf merge --base B --vector V=w ... --no-save-vectors --output O` from this tree;
- `lora merge [alt]`: the same from `--compare-src` (e.g. the checkout before a change), if given;
- `startup`: `python -m dem_hf merge --help`, the CLI's start-up alone;
- `import torch`: `python -c "import torch"`, the start-up a merge that imports torch pays on top.

Defaults: the demo's converted SmolLM2-135M-Instruct and its four rank-16 LoRA vectors, equal weights. Inputs are only
read; outputs go to `benchmarks/.work/lora/` and are removed. The two merges' outputs are compared at the end.

With `--size` (a size of `bench_merge.py`, e.g. `3b`), the inputs are generated instead, after a check of the disk:
that size's random bf16 base (reused from `benchmarks/.work/<size>/base`), `--adapters` PEFT-format LoRA adapters of
rank `--rank` on every linear layer of the blocks (`checkpoints.write_lora_adapter`, under `.work/<size>/lora/`),
each converted once with `dem-hf extract --adapter` (a one-off cost, printed). The merged output is then checked
against base + Σ w·(alpha/r)·B·A computed in float64 from the adapters' own files (`exactness.check_lora_merge`).
Results are recorded by hand in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import SIZES, ensure_base  # noqa: E402
from checkpoints import LINEAR_MODULES, checkpoint_bytes, meta_specs, write_lora_adapter  # noqa: E402
from exactness import CHECKED_TENSORS, check_lora_merge  # noqa: E402
from dem_hf.demo.pipeline import DemoConfig, runs_dir  # noqa: E402

from measuring import GB, REPO, WORK, dem_cli, dem_env, folder_bytes, log, machine, require_free_disk, run_measured, time_rounds  # noqa: E402

# The demo's LoRA runs (`bash examples/run_demo.sh` makes them once) and, by default, the model they were trained from
# (their `vector_config.json` names it: the demo's warm start, or the converted SmolLM2).
DEMO_RUNS = REPO / runs_dir(DemoConfig())
ALT = " [alt]"


def merge_command(source: Path, base: Path, vectors: list[Path], out: Path) -> list[str]:
    weight = 1.0 / len(vectors)
    command = [*dem_cli(source), "merge", "--base", str(base)]
    for vector in vectors:
        command += ["--vector", f"{vector}={weight}"]
    return command + ["--no-save-vectors", "--output", str(out)]


def compare_outputs(first: Path, second: Path) -> str:
    """Max |difference| and the share of bitwise-equal values between two merged checkpoints (float32), one tensor at
    a time (single-file or sharded)."""
    from dem_hf.io.reader import CheckpointReader

    a, b = CheckpointReader(first), CheckpointReader(second)
    if sorted(a.keys()) != sorted(b.keys()):
        return "different tensors"
    equal = total = 0
    largest = 0.0
    for name in a.keys():
        size = int(np.prod(a.shape(name)))
        x, y = a.head_float32(name, size), b.head_float32(name, size)
        equal, total = equal + int((x == y).sum()), total + x.size
        largest = max(largest, float(np.abs(x - y).max(initial=0.0)))
    return f"max |difference| {largest:.3g}, {100 * equal / total:.2f}% of values bitwise equal"


def ensure_lora_inputs(size: str, count: int, rank: int, outputs: int) -> tuple[Path, dict[Path, Path]]:
    """Generate (or reuse) the base of `size` and `count` rank-`rank` adapters with their converted vectors.
    Returns the base and `{adapter folder: vector folder}`."""
    spec = SIZES[size]
    specs = meta_specs(spec["config"])
    folder = WORK / size / "lora"
    one = checkpoint_bytes(specs, spec["dtype"])
    factors = sum(rank * sum(s) for n, s in specs if n.removesuffix(".weight").rsplit(".", 1)[-1] in LINEAR_MODULES)
    peak = (1 + outputs) * one + 2 * count * 4 * factors  # base, merged outputs, adapters and vectors (float32)
    already = folder_bytes(WORK / size) - folder_bytes(WORK / size / "base")  # other inputs of the size stay
    require_free_disk(WORK / size, peak + already, f"base + {outputs} merged outputs, {one / GB:.1f} GB each, "
                      f"+ {count} adapters and vectors of {4 * factors / GB:.2f} GB")
    base = ensure_base(size)
    pairs = {}
    for stream in range(1, count + 1):
        adapter, vector = folder / "adapters" / f"lora{stream}", folder / "vectors" / f"lora{stream}"
        wanted = {"rank": rank, "stream": stream}
        stamp = folder / "adapters" / f"lora{stream}.json"
        if not (stamp.is_file() and json.loads(stamp.read_text()) == wanted and (vector / "vector_config.json").is_file()):
            write_lora_adapter(adapter, base, specs, stream, rank=rank)
            command = [*dem_cli(REPO), "extract", "--base", str(base), "--adapter", str(adapter), "--name", f"lora{stream}",
                       "--output", str(vector), "--overwrite"]
            wall, rss, code = run_measured(command, folder / f"extract-lora{stream}.log", env=dem_env())
            if code != 0:
                raise SystemExit(f"dem-hf extract --adapter failed, see {folder / f'extract-lora{stream}.log'}")
            log(f"adapter lora{stream} written and converted (dem-hf extract --adapter: {wall:.1f} s, peak RSS {rss / GB:.2f} GB)")
            stamp.write_text(json.dumps(wanted) + "\n")
        pairs[adapter] = vector
    return base, pairs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare-src", type=Path, default=None, help="Another source tree with a dem_hf package.")
    parser.add_argument("--rounds", type=int, default=5, help="Timed rounds after one warm-up round.")
    parser.add_argument("--base", type=Path, default=None, help="Default: the base the vectors were trained from.")
    parser.add_argument("--vector", type=Path, action="append", default=None, help="A saved LoRA vector (repeat).")
    parser.add_argument("--size", choices=SIZES, default=None, help="Generate the base and adapters (bench_merge's sizes).")
    parser.add_argument("--adapters", type=int, default=4, help="With --size: how many LoRA adapters.")
    parser.add_argument("--rank", type=int, default=16, help="With --size: their rank.")
    parser.add_argument("--generate-only", action="store_true", help="With --size: check the disk, generate, stop.")
    args = parser.parse_args()
    if args.size and (args.vector or args.base is not None):
        parser.error("--size generates the base and the vectors: pass neither --base nor --vector with it")
    if args.adapters < 1 or args.rank < 1:
        parser.error(f"--adapters and --rank must be at least 1, got {args.adapters} and {args.rank}")
    log(machine())
    adapters = {}
    if args.size:
        args.base, adapters = ensure_lora_inputs(args.size, args.adapters, args.rank, outputs=1 + bool(args.compare_src))
        args.vector = list(adapters.values())
        if args.generate_only:
            log(f"inputs generated: {args.base} and {len(adapters)} adapters (--generate-only)")
            return 0
    if not args.vector and not DEMO_RUNS.is_dir():
        parser.error(f"no --vector given and no demo runs in {DEMO_RUNS}: run `bash examples/run_demo.sh` once, or pass "
                     "--base and --vector")
    vectors = args.vector or sorted(path / "vector" for path in DEMO_RUNS.iterdir() if (path / "vector").is_dir())
    if args.base is None:
        args.base = REPO / json.loads((vectors[0] / "vector_config.json").read_text())["base_model_name_or_path"]
    out = WORK / "lora"
    merged, before = out / "lora merge", out / ("lora merge" + ALT)
    rows = {"lora merge": (merge_command(REPO, args.base, vectors, merged), dem_env(REPO), REPO)}
    if args.compare_src:
        rows["lora merge" + ALT] = (merge_command(args.compare_src, args.base, vectors, before), dem_env(args.compare_src), args.compare_src)
    rows["startup"] = ([*dem_cli(REPO), "merge", "--help"], dem_env(REPO), REPO)
    rows["import torch"] = ([sys.executable, "-c", "import torch"], None, REPO)
    names = list(rows)
    results = time_rounds(rows, names, args.rounds, out, out)
    walls = {name: [wall for wall, _ in results[name]] for name in names}
    peaks = {name: max(rss for _, rss in results[name]) for name in names}
    print()
    print(f"base {args.base}, {len(vectors)} LoRA vectors, equal weights; {args.rounds} timed rounds after 1 warm-up, "
          f"order rotated each round" + (f"; [alt] = {args.compare_src}" if args.compare_src else ""))
    print()
    print("| row | wall median (s) | wall min-max (s) | peak RSS max (GB) |")
    print("|---|---|---|---|")
    for name in names:
        print(f"| {name} | {statistics.median(walls[name]):.2f} | {min(walls[name]):.2f}-{max(walls[name]):.2f} | "
              f"{peaks[name] / 1e9:.2f} |")
    print()
    if args.compare_src:
        print(f"speed-up of the merge (medians): {statistics.median(walls['lora merge' + ALT]) / statistics.median(walls['lora merge']):.1f}x; "
              f"outputs: {compare_outputs(merged, before)}")
    if adapters:
        weight = 1.0 / len(adapters)
        print("merged output against base + Σ w·(alpha/r)·B·A in float64 from the adapters' files, over "
              f"{', '.join(CHECKED_TENSORS)}: {check_lora_merge(args.base, dict.fromkeys(adapters, weight), merged, list(CHECKED_TENSORS))}")
    shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
