"""Merge benchmark: dem_hf streaming merge vs the plain Transformers approach vs mergekit `task_arithmetic`.

    python benchmarks/bench_merge.py [--size 265m|3b] [--rounds 3] [--contenders dem_hf,transformers,mergekit,extract]
                                     [--compare-src DIR] [--keep-outputs]

What it does (idempotent: generated models, vectors and the mergekit environment are reused):

1. Generates a random-weight Llama base and three "fine-tuned" copies (base + small noise) under
   `benchmarks/.work/<size>/`, tensor by tensor from the names and shapes of a `LlamaForCausalLM` built on
   the `meta` device, so even the 3B checkpoints never sit in memory whole. No download.
   - `265m`: fp32 base + 3 fine-tuned models; dem_hf's vectors come from `dem-hf extract` (timed once,
     reported as a one-off cost).
   - `3b`: bf16 base + 3 distribution vectors written directly (the fine-tuned models would need another
     20 GB of disk and only dem_hf runs at this size: the plain way needs 4 x 6.9 GB in RAM).
2. Runs every contender as its own subprocess: one warm-up round (so every input is in the page cache),
   then `--rounds` timed rounds, the order rotating each round. Wall time is measured around the child,
   peak RSS is the child's `ru_maxrss` from `os.wait4` (whole process, including everything it imports),
   collected by a small launcher process (see `run_measured`). Results: median wall, min-max, max RSS.
   - dem_hf:       `python -m dem_hf merge --base B --vector V1=w1 ... --no-save-vectors --output O`
   - transformers: load base and fine-tuned models with `AutoModelForCausalLM`, add the weighted deltas,
                   `save_pretrained` (this file, `_transformers_merge` mode).
   - mergekit:     `mergekit-yaml config.yml O --no-copy-tokenizer`, `task_arithmetic`, `dtype: float32`,
                   from its own virtualenv `benchmarks/.work/mergekit-venv` (torch==2.13.0 pinned).
   - extract:      `python -m dem_hf extract --base B --finetuned FT1 --name ft1 --output O`, the streaming
                   extraction of one vector, against the dem_hf merge of the same rounds (per-round ratios).
   - dem_hf_startup: `python -m dem_hf merge --help`, the CLI's startup cost alone (default table only).
   With `--compare-src DIR`, the dem_hf rows (merge, extract, startup) are also timed from the dem_hf package in DIR (marked [alt]),
   interleaved with the others: an A/B of a change to dem_hf in one run.
3. Checks that the outputs agree with the exact merge on a few tensors (and that every extraction wrote the files of
   `vectors/ft1`, byte for byte) and prints a Markdown table.
Results are recorded by hand in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / ".work"
MERGEKIT_VENV = WORK / "mergekit-venv"
sys.path.insert(0, str(REPO))  # the working tree's dem_hf, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import base_tensor, meta_specs, noise_tensor, numel, write_checkpoint, write_vector_directly  # noqa: E402
TORCH_PIN = "torch==2.13.0"
MERGEKIT_PIN = "mergekit"
GENERATOR_VERSION = 2

SIZES = {
    # 264.8M parameters, fp32 (1.06 GB per checkpoint).
    "265m": dict(
        config=dict(
            vocab_size=32000, hidden_size=1024, intermediate_size=2688, num_hidden_layers=16,
            num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False,
        ),
        dtype="float32",
        finetuned=True,
    ),
    # 3.43B parameters (the OpenLLaMA-3B shape), bf16 (6.85 GB per checkpoint).
    "3b": dict(
        config=dict(
            vocab_size=32000, hidden_size=3200, intermediate_size=8640, num_hidden_layers=26,
            num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False,
        ),
        dtype="bfloat16",
        finetuned=False,
    ),
}
WEIGHTS = {"ft1": 1.0, "ft2": 0.5, "ft3": 0.25}  # exactly representable, distinct: a wrong weight shows
CONTENDERS = ("dem_hf", "transformers", "mergekit", "extract")
# Not a merge: `dem-hf extract` of the first fine-tuned model (a vector like `vectors/ft1`), timed in the same rounds as
# the merges, so that its cost is measured against the 3-vector merge side by side (issue 17: at most 1.5x).
EXTRACT = "extract"
# Not a merge: `dem-hf merge --help`, the cost of starting the CLI (Python, torch, dem_hf's imports), a floor
# under the dem_hf row. Added to the table unless --contenders is given.
STARTUP = "dem_hf_startup"
ALT = "[alt]"  # suffix of the rows timed from --compare-src
CHECKED_TENSORS = (
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.3.mlp.down_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------------- measuring


def run_measured(command: list[str], log_file: Path, env: dict | None = None, cwd: Path = REPO) -> tuple[float, int, int]:
    """Run one child process; return (wall seconds, peak RSS bytes, exit status).

    The child is started by a small launcher process (`_measure` mode of this file), not by this process:
    Linux folds the peak RSS of the address space a child is forked from into the child's `ru_maxrss`, so a
    child started from this process (which holds whole tensors while generating models) would report this
    process's peak instead of its own.
    """
    launcher = [sys.executable, str(Path(__file__).resolve()), "_measure", str(log_file), "--", *command]
    result = subprocess.run(launcher, capture_output=True, text=True, cwd=cwd, env=env, check=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    return measured["wall_s"], measured["peak_rss_bytes"], measured["status"]


def measure(argv: list[str]) -> int:
    """Launcher: run `argv` (after `LOG --`), print wall time, peak RSS (`ru_maxrss` from `wait4`) and status."""
    log_file, separator, *command = argv
    assert separator == "--", argv
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


def ensure_models(size: str) -> dict:
    """Generate (or reuse) the inputs for one size. Returns paths and the one-off extraction costs."""
    import torch

    spec = SIZES[size]
    folder = WORK / size
    stamp = folder / "spec.json"
    wanted = {"generator": GENERATOR_VERSION, "weights": WEIGHTS, **spec}
    paths = {
        "base": folder / "base",
        "finetuned": {n: folder / n for n in WEIGHTS} if spec["finetuned"] else {},
        "vectors": {n: folder / "vectors" / n for n in WEIGHTS},
        "out": folder / "out",
    }
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        extraction = json.loads((folder / "extraction.json").read_text()) if (folder / "extraction.json").is_file() else {}
        return {**paths, "extraction": extraction}
    if folder.exists():
        log(f"removing stale {folder}")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    dtype = getattr(torch, spec["dtype"])
    specs = meta_specs(spec["config"])
    log(f"{size}: {sum(numel(s) for _, s in specs) / 1e6:.1f}M parameters, {len(specs)} tensors, {spec['dtype']}")

    started = time.perf_counter()
    write_checkpoint(paths["base"], spec["config"], spec["dtype"],
                     ((n, base_tensor(i, n, s, dtype)) for i, (n, s) in enumerate(specs)))
    log(f"base written in {time.perf_counter() - started:.0f} s")
    extraction = {}
    for stream, name in enumerate(WEIGHTS, start=1):
        started = time.perf_counter()
        if spec["finetuned"]:
            def tuned(stream=stream):
                for i, (n, s) in enumerate(specs):
                    yield n, (base_tensor(i, n, s, dtype).to(torch.float32) + noise_tensor(i, s, stream)).to(dtype)

            write_checkpoint(paths["finetuned"][name], spec["config"], spec["dtype"], tuned())
            log(f"{name} written in {time.perf_counter() - started:.0f} s")
            command = [
                *dem_cli(REPO), "extract", "--base", str(paths["base"]),
                "--finetuned", str(paths["finetuned"][name]), "--name", name, "--output", str(paths["vectors"][name]),
                "--overwrite",
            ]
            wall, rss, code = run_measured(command, folder / f"extract-{name}.log", env=dem_env())
            if code != 0:
                raise SystemExit(f"dem-hf extract failed, see {folder / f'extract-{name}.log'}")
            extraction[name] = {"wall_s": wall, "peak_rss_bytes": rss}
            log(f"dem-hf extract {name}: {wall:.1f} s, peak RSS {rss / 1e9:.2f} GB")
        else:
            write_vector_directly(paths["base"], paths["vectors"][name], name, specs, stream, dtype)
            log(f"vector {name} written in {time.perf_counter() - started:.0f} s")
    (folder / "extraction.json").write_text(json.dumps(extraction, indent=2) + "\n")
    stamp.write_text(json.dumps(wanted, indent=2) + "\n")
    return {**paths, "extraction": extraction}


# --------------------------------------------------------------------------------------------- contenders


def ensure_mergekit() -> Path:
    """The mergekit virtualenv (torch pinned first, from the local wheel), created once."""
    exe = MERGEKIT_VENV / "bin" / "mergekit-yaml"
    if exe.is_file():
        return exe
    log(f"creating {MERGEKIT_VENV} ({TORCH_PIN}, then {MERGEKIT_PIN})")
    subprocess.run([sys.executable, "-m", "venv", str(MERGEKIT_VENV)], check=True)
    pip = [str(MERGEKIT_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [TORCH_PIN], check=True)
    subprocess.run(pip + [MERGEKIT_PIN], check=True)
    return exe


def mergekit_config(paths: dict, dtype: str) -> Path:
    lines = [
        "merge_method: task_arithmetic",
        f"base_model: {paths['base']}",
        "models:",
    ]
    for name, weight in WEIGHTS.items():
        lines += [f"  - model: {paths['finetuned'][name]}", "    parameters:", f"      weight: {weight}"]
    lines += [f"dtype: {dtype}", ""]
    path = WORK / "mergekit-task-arithmetic.yml"
    path.write_text("\n".join(lines))
    return path


def dem_cli(source: Path) -> list[str]:
    """How to start `dem-hf` from the source tree `source` (`python -m dem_hf`, or the older `dem_hf.cli`)."""
    module = "dem_hf" if (source / "dem_hf" / "__main__.py").exists() else "dem_hf.cli"
    return [sys.executable, "-m", module]


def commands(paths: dict, contenders: list[str], dtype: str, compare: Path | None) -> dict[str, tuple[list[str], dict | None, Path]]:
    """`{contender: (command, environment, working directory)}`; dem_hf runs from its source tree, since
    `python -m` puts the working directory ahead of PYTHONPATH."""
    out = paths["out"]
    result = {}
    for suffix, source in [("", REPO)] + ([(ALT, compare)] if compare else []):
        cli = dem_cli(source)
        if "dem_hf" + suffix in contenders:
            command = [*cli, "merge", "--base", str(paths["base"])]
            for name, weight in WEIGHTS.items():
                command += ["--vector", f"{paths['vectors'][name]}={weight}"]
            if (source / "dem_hf" / "__main__.py").exists():  # vectors are copied into the output by default there
                command.append("--no-save-vectors")
            result["dem_hf" + suffix] = (command + ["--output", str(out / ("dem_hf" + suffix))], dem_env(source), source)
        if EXTRACT + suffix in contenders:
            first = next(iter(WEIGHTS))
            result[EXTRACT + suffix] = ([
                *cli, "extract", "--base", str(paths["base"]), "--finetuned", str(paths["finetuned"][first]), "--name", first,
                "--output", str(out / (EXTRACT + suffix)),
            ], dem_env(source), source)
        if STARTUP + suffix in contenders:
            result[STARTUP + suffix] = ([*cli, "merge", "--help"], dem_env(source), source)
    if "transformers" in contenders:
        command = [sys.executable, str(Path(__file__).resolve()), "_transformers_merge", str(paths["base"]), str(out / "transformers")]
        command += [f"{paths['finetuned'][name]}={weight}" for name, weight in WEIGHTS.items()]
        result["transformers"] = (command, None, REPO)
    if "mergekit" in contenders:
        exe = ensure_mergekit()
        command = [str(exe), str(mergekit_config(paths, dtype)), str(out / "mergekit"), "--no-copy-tokenizer"]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        result["mergekit"] = (command, env, WORK)
    return result


def transformers_merge(argv: list[str]) -> int:
    """The plain way: load base and every fine-tuned model, add the weighted deltas, save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM

    base_path, output, *models = argv
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype="auto")
    tuned = []
    for item in models:
        path, weight = item.rsplit("=", 1)
        tuned.append((AutoModelForCausalLM.from_pretrained(path, dtype="auto").state_dict(), float(weight)))
    with torch.no_grad():
        for name, parameter in base.state_dict().items():
            if not parameter.dtype.is_floating_point:
                continue
            delta = sum(weight * (state[name].to(torch.float32) - parameter.to(torch.float32)) for state, weight in tuned)
            parameter.copy_((parameter.to(torch.float32) + delta).to(parameter.dtype))
    base.save_pretrained(output)
    return 0


# --------------------------------------------------------------------------------------------- checking


def read_output(folder: Path, name: str):
    from dem_hf.io.reader import CheckpointReader

    return CheckpointReader(folder).get(name)


def check_outputs(paths: dict, contenders: list[str], finetuned: bool) -> dict[str, str]:
    """How far each output is from the exact merge (computed in float64, rounded once to the base dtype)
    over a few tensors: the largest difference in units in the last place of the output dtype at the scale
    of the largest input or result value at that position (a float32 computation rounds at the scale of its
    inputs, however much they cancel), and how many values differ at all. Also whether the contenders'
    outputs are bitwise identical to each other."""
    import torch

    from dem_hf.io.reader import CheckpointReader

    base = CheckpointReader(paths["base"])
    sources = (
        {n: (CheckpointReader(p), True) for n, p in paths["finetuned"].items()}
        if finetuned
        else {n: (CheckpointReader(p, stem="vector"), False) for n, p in paths["vectors"].items()}
    )
    worst = {c: 0.0 for c in contenders}
    wrong = {c: 0 for c in contenders}
    same = {c: True for c in contenders}
    total = 0
    for tensor in CHECKED_TENSORS:
        theta = base.get(tensor).to(torch.float64)
        exact, largest = theta.clone(), theta.abs()
        for name, (reader, is_model) in sources.items():
            other = reader.get(tensor).to(torch.float64)
            term = WEIGHTS[name] * ((other - theta) if is_model else other)
            exact += term
            largest = torch.maximum(largest, (other if is_model else term).abs())
        outputs = {}
        for contender in contenders:
            merged = outputs[contender] = read_output(paths["out"] / contender, tensor)
            if merged.dtype != base.dtype(tensor):
                raise AssertionError(f"{contender} wrote {tensor} as {merged.dtype}, base is {base.dtype(tensor)}")
            rounded = exact.to(merged.dtype)
            scale = torch.maximum(rounded.abs(), largest.to(merged.dtype))
            ulp = (torch.nextafter(scale, torch.full_like(scale, float("inf"))) - scale).to(torch.float64)
            difference = (merged.to(torch.float64) - rounded.to(torch.float64)).abs()
            worst[contender] = max(worst[contender], (difference / ulp).max().item())
            wrong[contender] += int((difference > 0).sum())
        total += exact.numel()
        for contender in contenders:
            same[contender] &= torch.equal(outputs[contender], outputs[contenders[0]])
    if len(contenders) > 1:
        log(f"outputs bitwise identical to {contenders[0]}'s over the checked tensors: "
            + ", ".join(f"{c} {'yes' if same[c] else 'NO'}" for c in contenders[1:]))
    return {c: f"{worst[c]:.2g} ulp, {wrong[c]} of {total / 1e6:.0f}M values" for c in contenders}


def check_extractions(paths: dict, extractions: list[str]) -> dict[str, str]:
    """Whether each extraction's output folder holds, byte for byte, the files of `vectors/ft1` (extracted by this
    tree's `dem-hf extract` when the inputs were generated)."""
    expected = paths["vectors"][next(iter(WEIGHTS))]
    names = sorted(p.name for p in expected.iterdir())
    result = {}
    for contender in extractions:
        out = paths["out"] / contender
        same = sorted(p.name for p in out.iterdir()) == names and filecmp.cmpfiles(out, expected, names, shallow=False)[0] == names
        result[contender] = f"files {'identical' if same else 'DIFFERENT'} to vectors/ft1"
    return result


def print_extraction_ratios(results: dict[str, list[tuple[float, int]]], contenders: list[str]) -> None:
    """Each extraction's wall time over the dem_hf merge's of the same round (the two ran one after the other), as the
    median and min-max of the per-round ratios."""
    for suffix in ("", ALT):
        if EXTRACT + suffix not in contenders or "dem_hf" + suffix not in contenders:
            continue
        ratios = [e / m for (e, _), (m, _) in zip(results[EXTRACT + suffix], results["dem_hf" + suffix])]
        print(f"\n{EXTRACT + suffix} / dem_hf{suffix} merge (base + {len(WEIGHTS)} vectors), per round: median "
              f"{statistics.median(ratios):.2f}x, min-max {min(ratios):.2f}-{max(ratios):.2f}x over {len(ratios)} rounds")


# --------------------------------------------------------------------------------------------- main


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    memory = next((int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    return f"{os.cpu_count()} cores ({model}), {memory / 2**20:.0f} GiB RAM, no GPU"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_transformers_merge":
        return transformers_merge(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "_measure":
        return measure(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="265m")
    parser.add_argument("--rounds", type=int, default=3, help="Timed rounds after one warm-up round.")
    parser.add_argument("--contenders", default=None, help="Comma-separated subset of dem_hf,transformers,mergekit.")
    parser.add_argument("--keep-outputs", action="store_true", help="Leave the merged models under .work/<size>/out.")
    parser.add_argument(
        "--compare-src", type=Path, default=None,
        help="Another source tree holding a dem_hf package: also time its merge (rows marked [alt]), side by side.",
    )
    args = parser.parse_args()
    contenders = args.contenders.split(",") if args.contenders else (
        list(CONTENDERS) if SIZES[args.size]["finetuned"] else ["dem_hf"]
    )
    if not args.contenders:
        contenders.append(STARTUP)
    if args.compare_src:
        contenders += [c + ALT for c in contenders if c in ("dem_hf", EXTRACT, STARTUP)]
    unknown = {c.removesuffix(ALT) for c in contenders} - set(CONTENDERS) - {STARTUP}
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}")
    if not SIZES[args.size]["finetuned"] and {c.removesuffix(ALT) for c in contenders} - {"dem_hf", STARTUP}:
        parser.error(f"--size {args.size} generates no fine-tuned models (vectors only): only dem_hf runs")

    log(machine())
    paths = ensure_models(args.size)
    runs = commands(paths, contenders, SIZES[args.size]["dtype"], args.compare_src)
    results: dict[str, list[tuple[float, int]]] = {c: [] for c in contenders}
    for round_number in range(args.rounds + 1):
        order = contenders[round_number % len(contenders):] + contenders[: round_number % len(contenders)]
        for contender in order:
            command, env, cwd = runs[contender]
            target = paths["out"] / contender
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            wall, rss, code = run_measured(command, WORK / args.size / f"{contender}.log", env=env, cwd=cwd)
            if code != 0:
                print((WORK / args.size / f"{contender}.log").read_text()[-4000:])
                raise SystemExit(f"{contender} failed with status {code}: {' '.join(command)}")
            label = "warm-up" if round_number == 0 else f"round {round_number}"
            log(f"{label:8s} {contender:12s} {wall:7.2f} s  peak RSS {rss / 1e9:6.2f} GB")
            if round_number > 0:
                results[contender].append((wall, rss))

    if args.rounds < 1:
        log("no timed rounds (--rounds 0): inputs generated, warm-up done")
        return 0
    merges = [c for c in contenders if not c.startswith((STARTUP, EXTRACT))]
    errors = check_outputs(paths, merges, SIZES[args.size]["finetuned"]) if merges else {}
    errors.update({c: None for c in contenders if c.startswith(STARTUP)})
    errors.update(check_extractions(paths, [c for c in contenders if c.startswith(EXTRACT)]))
    print()
    print(f"size {args.size}: {SIZES[args.size]['dtype']} Llama, base + {len(WEIGHTS)} full vectors, weights "
          f"{list(WEIGHTS.values())}; {args.rounds} timed rounds after 1 warm-up, order rotated each round")
    print()
    reference = results.get("mergekit")
    print("| contender | wall median (s) | wall min-max (s) | peak RSS max (GB) | vs mergekit: speed-up | vs mergekit: RSS | off the exact merge |")
    print("|---|---|---|---|---|---|---|")
    for contender in contenders:
        walls = [w for w, _ in results[contender]]
        rss = max(r for _, r in results[contender])
        speed = memory = "-"
        if reference and not contender.startswith((STARTUP, EXTRACT)):
            speed = f"{statistics.median(w for w, _ in reference) / statistics.median(walls):.1f}x"
            memory = f"{rss / max(r for _, r in reference):.2f}x"
        print(f"| {contender} | {statistics.median(walls):.2f} | {min(walls):.2f}-{max(walls):.2f} | {rss / 1e9:.2f} | "
              f"{speed} | {memory} | {errors[contender] or '-'} |")
    print_extraction_ratios(results, contenders)
    if paths["extraction"]:
        print()
        print("one-off `dem-hf extract` per vector: " + ", ".join(
            f"{n} {v['wall_s']:.1f} s / {v['peak_rss_bytes'] / 1e9:.2f} GB" for n, v in paths["extraction"].items()))
    if not args.keep_outputs:
        shutil.rmtree(paths["out"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
