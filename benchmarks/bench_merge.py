"""Merge benchmark: dem_hf streaming merge vs the plain Transformers approach vs mergekit `task_arithmetic`.

    python benchmarks/bench_merge.py [--size 265m|3b|7b] [--vectors N] [--rounds 3]
                                     [--contenders dem_hf,transformers,mergekit,extract] [--generate-only]
                                     [--compare-src DIR] [--keep-outputs]

What it does (idempotent: generated models, vectors and the mergekit environment are reused):

1. Checks that the disk can hold the run's files at their peak (`measuring.require_free_disk`: it says how much is
   needed and how much is free, before anything is generated), then generates a random-weight Llama base and
   `--vectors` "fine-tuned" copies (base + small noise; default: the size's own count) under
   `benchmarks/.work/<size>/`, tensor by tensor from the names and shapes of a `LlamaForCausalLM` built on the
   `meta` device, so even the 7B checkpoints never sit in memory whole. No download.
   - `265m`: fp32 base + fine-tuned models; dem_hf's vectors come from `dem-hf extract` (timed once, reported as a
     one-off cost).
   - `3b`: bf16 base + distribution vectors written directly (the fine-tuned models would need another 20 GB of disk
     and only dem_hf runs at this size: the plain way needs 4 x 6.9 GB in RAM).
   - `7b`: bf16 Llama-2-7B shape (13.5 GB a checkpoint), in two stages so that the disk holds at most
     base + `--vectors` + output (or base + fine-tuned + extracted vector): the `extract` rows run with the base and
     one fine-tuned model; the last extracted vector is kept as `vectors/ft1` and the fine-tuned model removed;
     the merge rows run on the base and the vectors (the others written directly).
2. Runs every contender as its own subprocess: one warm-up round (so every input is in the page cache),
   then `--rounds` timed rounds, the order rotating each round. Wall time is measured around the child,
   peak RSS is the child's `ru_maxrss` from `os.wait4` (whole process, including everything it imports),
   collected by a small launcher process (see `measuring.run_measured`). Results: median wall, min-max, max RSS.
   - dem_hf:       `python -m dem_hf merge --base B --vector V1=w1 ... --no-save-vectors --output O`
   - transformers: load base and fine-tuned models with `AutoModelForCausalLM`, add the weighted deltas,
                   `save_pretrained` (this file, `_transformers_merge` mode).
   - mergekit:     `mergekit-yaml config.yml O --no-copy-tokenizer`, `task_arithmetic`, `dtype: float32`,
                   from its own virtualenv `benchmarks/.work/mergekit-venv` (torch==2.13.0 pinned).
   - extract:      `python -m dem_hf extract --base B --finetuned FT1 --name ft1 --output O`, the streaming
                   extraction of one vector, against the dem_hf merge of the same rounds (per-round ratios).
   - dem_hf_startup: `python -m dem_hf merge --help`, the CLI's startup cost alone (default table only).
   With `--compare-src DIR`, the dem_hf rows (merge, extract, startup) are also timed from the dem_hf package in DIR (marked [alt]),
   interleaved with the others: an A/B of a change to dem_hf in one run. `--generate-only` stops after step 1 (for
   `7b`, after the inputs of the first stage the contenders need), so that generating and timing can be scheduled
   apart on a shared machine.
3. Checks that the outputs agree with the exact merge on a few tensors (`exactness.py`; every extraction against
   θ_ft − θ, and at 265m that it wrote the files of `vectors/ft1`, byte for byte) and prints a Markdown table.
Results are recorded by hand in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import (  # noqa: E402
    base_tensor, checkpoint_bytes, meta_specs, noise_tensor, numel, write_checkpoint, write_vector_directly,
)
from exactness import check_extracted, check_outputs, check_same_files  # noqa: E402
from measuring import GB, REPO, WORK, dem_cli, dem_env, log, machine, require_free_disk, run_measured, time_rounds  # noqa: E402

MERGEKIT_VENV = WORK / "mergekit-venv"
TORCH_PIN = "torch==2.13.0"
MERGEKIT_PIN = "mergekit"
GENERATOR_VERSION = 2


def llama_config(hidden: int, mlp: int, layers: int, heads: int) -> dict:
    """`LlamaConfig` arguments of an untied Llama with a 32000-token vocabulary and full multi-head attention."""
    return dict(vocab_size=32000, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=heads, tie_word_embeddings=False)


SIZES = {
    # 264.8M parameters, fp32 (1.06 GB per checkpoint).
    "265m": dict(config=llama_config(1024, 2688, 16, 16), dtype="float32", layout="finetuned", vectors=3),
    # 3.43B parameters (the OpenLLaMA-3B shape), bf16 (6.85 GB per checkpoint).
    "3b": dict(config=llama_config(3200, 8640, 26, 32), dtype="bfloat16", layout="vectors", vectors=3),
    # 6.74B parameters (the Llama-2-7B shape), bf16 (13.5 GB per checkpoint).
    "7b": dict(config=llama_config(4096, 11008, 32, 32), dtype="bfloat16", layout="staged", vectors=4),
}
# Layouts: "finetuned" (fine-tuned models + extracted vectors, every contender), "vectors" (vectors written directly,
# dem_hf only), "staged" (extraction from one fine-tuned model, then merges of vectors; dem_hf only).
CONTENDERS = ("dem_hf", "transformers", "mergekit", "extract")
# Not a merge: `dem-hf extract` of the first fine-tuned model (a vector like `vectors/ft1`), timed in the same rounds as
# the merges, so that its cost is measured against the 3-vector merge side by side (issue 17: at most 1.5x).
EXTRACT = "extract"
# Not a merge: `dem-hf merge --help`, the cost of starting the CLI (Python, torch, dem_hf's imports), a floor
# under the dem_hf row. Added to the table unless --contenders is given.
STARTUP = "dem_hf_startup"
ALT = "[alt]"  # suffix of the rows timed from --compare-src


def vector_weights(count: int) -> dict[str, float]:
    """`{ft1: 1.0, ft2: 0.5, ft3: 0.25, ...}`: exactly representable and distinct, so a wrong weight shows."""
    return {f"ft{i + 1}": 2.0 ** -i for i in range(count)}


def size_paths(size: str, weights: dict[str, float]) -> dict:
    folder = WORK / size
    return {
        "folder": folder,
        "base": folder / "base",
        "finetuned": {n: folder / n for n in weights},
        "vectors": {n: folder / "vectors" / n for n in weights},
        "out": folder / "out",
        "weights": weights,
    }


def disk_plan(size: str, weights: dict[str, float], contenders: list[str]) -> tuple[int, str]:
    """The most bytes the run keeps under `.work/<size>` at once, and what they are."""
    spec = SIZES[size]
    one = checkpoint_bytes(meta_specs(spec["config"]), spec["dtype"])
    n = len(weights)
    extracts = sum(c.startswith(EXTRACT) for c in contenders)
    merges = sum(not c.startswith((EXTRACT, STARTUP)) for c in contenders)
    if spec["layout"] == "finetuned":
        count, plan = 1 + 2 * n + merges + extracts, f"base + {n} fine-tuned + {n} vectors + {merges + extracts} outputs"
    elif spec["layout"] == "vectors" or not extracts:
        count, plan = 1 + n + merges, f"base + {n} vectors + {merges} outputs"
    elif not merges or 2 + extracts >= 1 + n + merges:
        count, plan = 2 + extracts, f"base + fine-tuned + {extracts} extracted vectors"
    else:
        count, plan = 1 + n + merges, f"base + {n} vectors + {merges} outputs, after the extraction"
    return count * one, f"{plan}, {count} x {one / GB:.1f} GB"


def ensure_base(size: str) -> Path:
    """Generate (or reuse) the base of one size; a base of another spec removes the whole folder."""
    import torch

    spec = SIZES[size]
    folder, wanted = WORK / size, {"generator": GENERATOR_VERSION, "config": spec["config"], "dtype": spec["dtype"]}
    stamp, base = folder / "base.json", folder / "base"
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted and base.is_dir():
        return base
    if folder.exists():
        log(f"removing stale {folder}")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    specs = meta_specs(spec["config"])
    log(f"{size}: {sum(numel(s) for _, s in specs) / 1e6:.1f}M parameters, {len(specs)} tensors, {spec['dtype']}")
    started, dtype = time.perf_counter(), getattr(torch, spec["dtype"])
    write_checkpoint(base, spec["config"], spec["dtype"], ((n, base_tensor(i, n, s, dtype)) for i, (n, s) in enumerate(specs)))
    log(f"base written in {time.perf_counter() - started:.0f} s")
    stamp.write_text(json.dumps(wanted, indent=2) + "\n")
    return base


def write_finetuned(size: str, target: Path, stream: int) -> None:
    """A "fine-tuned" copy of the base: base + seeded noise, rounded to the base dtype."""
    import torch

    spec = SIZES[size]
    dtype, specs = getattr(torch, spec["dtype"]), meta_specs(spec["config"])

    def tuned():
        for i, (n, s) in enumerate(specs):
            yield n, (base_tensor(i, n, s, dtype).to(torch.float32) + noise_tensor(i, s, stream)).to(dtype)

    started = time.perf_counter()
    write_checkpoint(target, spec["config"], spec["dtype"], tuned())
    log(f"{target.name} written in {time.perf_counter() - started:.0f} s")


def write_missing_vectors(size: str, paths: dict) -> None:
    """Write directly every vector of `paths` not on disk yet (the noise of its stream, in the base dtype)."""
    import torch

    spec = SIZES[size]
    specs = meta_specs(spec["config"])
    for stream, (name, target) in enumerate(paths["vectors"].items(), start=1):
        if not (target / "vector_config.json").is_file():
            started = time.perf_counter()
            write_vector_directly(paths["base"], target, name, specs, stream, getattr(torch, spec["dtype"]))
            log(f"vector {name} written in {time.perf_counter() - started:.0f} s")


def ensure_models(size: str, weights: dict[str, float]) -> dict:
    """Generate (or reuse) the inputs of the "finetuned" and "vectors" layouts. Returns paths and the one-off
    extraction costs."""
    spec = SIZES[size]
    ensure_base(size)
    paths = size_paths(size, weights)
    folder = paths["folder"]
    stamp, wanted = folder / "spec.json", {"generator": GENERATOR_VERSION, "weights": weights, "layout": spec["layout"]}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        extraction = json.loads((folder / "extraction.json").read_text()) if (folder / "extraction.json").is_file() else {}
        return {**paths, "extraction": extraction}
    extraction = {}
    if spec["layout"] == "vectors":
        write_missing_vectors(size, paths)
    for stream, name in enumerate(weights if spec["layout"] == "finetuned" else (), start=1):
        write_finetuned(size, paths["finetuned"][name], stream)
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
    (folder / "extraction.json").write_text(json.dumps(extraction, indent=2) + "\n")
    stamp.write_text(json.dumps(wanted, indent=2) + "\n")
    return {**paths, "extraction": extraction}


def ensure_stage(size: str, weights: dict[str, float], extraction: bool) -> dict:
    """The inputs of one stage of the "staged" layout: base + the first fine-tuned model for the extraction, base +
    the vectors for the merges (the fine-tuned model is removed first: both would not fit beside the vectors)."""
    ensure_base(size)
    paths = {**size_paths(size, weights), "extraction": {}}
    first = next(iter(weights))
    if extraction:
        if not (paths["finetuned"][first] / "config.json").is_file():
            write_finetuned(size, paths["finetuned"][first], stream=1)
        return paths
    if paths["finetuned"][first].exists():
        log(f"removing {paths['finetuned'][first]} to make room for the vectors")
        shutil.rmtree(paths["finetuned"][first])
    write_missing_vectors(size, paths)
    return paths


def keep_extracted_vector(paths: dict) -> None:
    """After the staged extraction rounds: the last extracted vector becomes `vectors/ft1` (if there is none yet)."""
    first = next(iter(paths["weights"]))
    target, extracted = paths["vectors"][first], paths["out"] / EXTRACT
    if not target.exists() and (extracted / "vector_config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        extracted.rename(target)
        log(f"kept the extracted vector as {target}")


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
    for name, weight in paths["weights"].items():
        lines += [f"  - model: {paths['finetuned'][name]}", "    parameters:", f"      weight: {weight}"]
    lines += [f"dtype: {dtype}", ""]
    path = WORK / "mergekit-task-arithmetic.yml"
    path.write_text("\n".join(lines))
    return path


def commands(paths: dict, contenders: list[str], dtype: str, compare: Path | None) -> dict[str, tuple[list[str], dict | None, Path]]:
    """`{contender: (command, environment, working directory)}`; dem_hf runs from its source tree, since
    `python -m` puts the working directory ahead of PYTHONPATH."""
    out = paths["out"]
    result = {}
    for suffix, source in [("", REPO)] + ([(ALT, compare)] if compare else []):
        cli = dem_cli(source)
        if "dem_hf" + suffix in contenders:
            command = [*cli, "merge", "--base", str(paths["base"])]
            for name, weight in paths["weights"].items():
                command += ["--vector", f"{paths['vectors'][name]}={weight}"]
            if (source / "dem_hf" / "__main__.py").exists():  # vectors are copied into the output by default there
                command.append("--no-save-vectors")
            result["dem_hf" + suffix] = (command + ["--output", str(out / ("dem_hf" + suffix))], dem_env(source), source)
        if EXTRACT + suffix in contenders:
            first = next(iter(paths["weights"]))
            result[EXTRACT + suffix] = ([
                *cli, "extract", "--base", str(paths["base"]), "--finetuned", str(paths["finetuned"][first]), "--name", first,
                "--output", str(out / (EXTRACT + suffix)),
            ], dem_env(source), source)
        if STARTUP + suffix in contenders:
            result[STARTUP + suffix] = ([*cli, "merge", "--help"], dem_env(source), source)
    if "transformers" in contenders:
        command = [sys.executable, str(Path(__file__).resolve()), "_transformers_merge", str(paths["base"]), str(out / "transformers")]
        command += [f"{paths['finetuned'][name]}={weight}" for name, weight in paths["weights"].items()]
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


def print_extraction_ratios(results: dict[str, list[tuple[float, int]]], contenders: list[str], vectors: int) -> None:
    """Each extraction's wall time over the dem_hf merge's of the same round (the two ran one after the other), as the
    median and min-max of the per-round ratios."""
    for suffix in ("", ALT):
        if EXTRACT + suffix not in contenders or "dem_hf" + suffix not in contenders:
            continue
        ratios = [e / m for (e, _), (m, _) in zip(results[EXTRACT + suffix], results["dem_hf" + suffix])]
        print(f"\n{EXTRACT + suffix} / dem_hf{suffix} merge (base + {vectors} vectors), per round: median "
              f"{statistics.median(ratios):.2f}x, min-max {min(ratios):.2f}-{max(ratios):.2f}x over {len(ratios)} rounds")


# --------------------------------------------------------------------------------------------- main



def check(paths: dict, contenders: list[str], layout: str) -> dict[str, str | None]:
    """How far every output of `contenders` is from the exact result (see `exactness.py`)."""
    out, first = paths["out"], next(iter(paths["weights"]))
    merges = [c for c in contenders if not c.startswith((STARTUP, EXTRACT))]
    extracts = [c for c in contenders if c.startswith(EXTRACT)]
    from_models = layout == "finetuned"
    sources = {n: (paths["finetuned" if from_models else "vectors"][n], w, from_models) for n, w in paths["weights"].items()}
    errors: dict[str, str | None] = dict.fromkeys(contenders)
    if merges:
        errors.update(check_outputs(paths["base"], sources, {c: out / c for c in merges}))
    for contender in extracts:
        errors[contender] = check_extracted(paths["base"], paths["finetuned"][first], out / contender) + " off θ_ft − θ"
    if layout == "finetuned" and extracts:
        same = check_same_files(paths["vectors"][first], {c: out / c for c in extracts})
        errors.update({c: f"{errors[c]}; {same[c]}" for c in extracts})
    return errors


def print_table(size: str, args, contenders: list[str], results: dict, errors: dict, vectors: int) -> None:
    spec = SIZES[size]
    print()
    print(f"size {size}: {spec['dtype']} Llama, base + {vectors} full vectors, weights "
          f"{list(vector_weights(vectors).values())}; {args.rounds} timed rounds after 1 warm-up, order rotated each round")
    print()
    reference = results.get("mergekit")
    print("| contender | wall median (s) | wall min-max (s) | peak RSS max (GB) | vs mergekit: speed-up | vs mergekit: RSS | off the exact result |")
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
    print_extraction_ratios(results, contenders, vectors)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="265m")
    parser.add_argument("--vectors", type=int, default=None, help="Vectors in the merge (default: the size's own).")
    parser.add_argument("--rounds", type=int, default=3, help="Timed rounds after one warm-up round.")
    parser.add_argument("--contenders", default=None, help="Comma-separated subset of dem_hf,transformers,mergekit,extract.")
    parser.add_argument("--generate-only", action="store_true", help="Check the disk, generate the inputs, stop.")
    parser.add_argument("--keep-outputs", action="store_true", help="Leave the merged models under .work/<size>/out.")
    parser.add_argument(
        "--compare-src", type=Path, default=None,
        help="Another source tree holding a dem_hf package: also time its merge (rows marked [alt]), side by side.",
    )
    args = parser.parse_args()
    layout = SIZES[args.size]["layout"]
    if args.vectors is not None and args.vectors < 1:
        parser.error(f"--vectors must be at least 1, got {args.vectors}")
    contenders = args.contenders.split(",") if args.contenders else (
        list(CONTENDERS) if layout == "finetuned" else ["dem_hf"] + ([EXTRACT] if layout == "staged" else [])
    )
    if not args.contenders:
        contenders.append(STARTUP)
    if args.compare_src:
        contenders += [c + ALT for c in contenders if c in ("dem_hf", EXTRACT, STARTUP)]
    unknown = {c.removesuffix(ALT) for c in contenders} - set(CONTENDERS) - {STARTUP}
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}")
    allowed = {"finetuned": set(CONTENDERS), "vectors": {"dem_hf"}, "staged": {"dem_hf", EXTRACT}}[layout] | {STARTUP}
    if {c.removesuffix(ALT) for c in contenders} - allowed:
        parser.error(f"--size {args.size} runs only {sorted(allowed)}, got {contenders}")
    return args, contenders


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_transformers_merge":
        return transformers_merge(sys.argv[2:])
    args, contenders = parse_args()
    spec = SIZES[args.size]
    weights = vector_weights(args.vectors or spec["vectors"])
    log(machine())
    peak, plan = disk_plan(args.size, weights, contenders)
    require_free_disk(WORK / args.size, peak, plan, hint="Pass fewer --vectors or --contenders." if spec["layout"] != "finetuned" else "")
    if spec["layout"] == "staged":  # the extraction first, then (the fine-tuned model removed) the merges
        stages = [[c for c in contenders if c.startswith(EXTRACT)], [c for c in contenders if not c.startswith(EXTRACT)]]
    else:
        stages = [contenders]
    for stage in (s for s in stages if s):
        extraction = spec["layout"] == "staged" and stage[0].startswith(EXTRACT)
        paths = ensure_stage(args.size, weights, extraction) if spec["layout"] == "staged" else ensure_models(args.size, weights)
        if args.generate_only:
            log(f"inputs generated under {paths['folder']} (--generate-only)")
            return 0
        runs = commands(paths, stage, spec["dtype"], args.compare_src)
        results = time_rounds(runs, stage, args.rounds, paths["out"], paths["folder"])
        if args.rounds < 1:
            log("no timed rounds (--rounds 0): inputs generated, warm-up done")
            continue
        print_table(args.size, args, stage, results, check(paths, stage, spec["layout"]), len(weights))
        if paths["extraction"]:
            print()
            print("one-off `dem-hf extract` per vector: " + ", ".join(
                f"{n} {v['wall_s']:.1f} s / {v['peak_rss_bytes'] / 1e9:.2f} GB" for n, v in paths["extraction"].items()))
        if extraction:
            keep_extracted_vector(paths)
        if not args.keep_outputs:
            shutil.rmtree(paths["out"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
