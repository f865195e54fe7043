"""DEM from a shared warm start (Branch-Train-Merge's seed phase), at the same training tokens as plain DEM.

Plain DEM trains every distribution from the base, so nothing one run learns reaches another except through the
merge; one mixture run shares everything. This splits DEM's step budget: a fraction `--warm-fraction` of all its
optimizer steps trains one uniform mixture of the distributions first; every distribution's run then starts from
that model for the rest (`(1 - f) · max_steps` steps each), and DEM merges their vectors into it. The total number
of training steps (and so, closely, of tokens) equals plain DEM's, so the mixtures of `dem_vs_mixing.py` at the same
settings stay the comparison. A new distribution still costs one run (from the same warm start).

    python benchmarks/dem_warm_start.py --warm-fraction 0.25 --max_length 128   # + any dem_vs_mixing.py option

This is the demo with `DemoConfig.warm_start` set (`dem-hf demo --warm_start 0.25`), in its own folder. Needs
`dem_vs_mixing.py` run first at the same settings (its result file holds the mixtures and plain DEM). Stages are
cached under benchmarks/.work/dem_vs_mixing/dem-<settings>-warm<fraction>/.
Its result joins the study's: `dem_vs_mixing.py` at the same settings lists these models in its table, its charts and
its off-distribution column.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dem_vs_mixing import WORK, _settings_tag, parse_args, warm_start_config, warm_start_result_file  # noqa: E402
from study_report import _means, dem_entries, warm_start_entries  # noqa: E402

from dem_hf.demo.pipeline import WARM_START_ROW, run_demo  # noqa: E402


def main() -> None:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--warm-fraction", type=float, default=0.25, help="Share of DEM's steps spent on the warm start.")
    args, sys.argv[1:] = own.parse_known_args()
    fraction = args.warm_fraction
    if not 0.0 < fraction < 1.0:
        raise SystemExit(f"--warm-fraction: expected a fraction in (0, 1), got {fraction}")
    config, _ = parse_args()  # every dem_vs_mixing.py option
    plain_file = WORK / f"result-{_settings_tag(config)}.json"
    if not plain_file.is_file():
        raise SystemExit(f"Run benchmarks/dem_vs_mixing.py with the same options first (no {plain_file}).")
    plain = json.loads(plain_file.read_text())
    dem = run_demo(warm_start_config(config, fraction))  # the demo, warm-started: `DemoConfig.warm_start`
    warm_compute, steps = dem["warm_start"]["compute"], dem["warm_start"]["run_steps"]
    names = plain["distributions"]
    run_flops = warm_compute["total_flos"] + sum(c["total_flos"] for c in dem["compute"].values())
    run_tokens = warm_compute["tokens_seen"] + sum(c["tokens_seen"] for c in dem["compute"].values())
    passes = sum(s["compute_forward_passes"] for s in dem["searches"].values())
    grid_flops = sum(m["compute"]["total_flos"] for m in plain["mixtures"].values())
    rows = {"base model": (plain["base"], None), "warm start (uniform mixture, ω = 0)": (dem["test_perplexity"][WARM_START_ROW], None)}
    rows.update({f"mixture: {k}": (m["test_perplexity"], m["compute"]["total_flos"]) for k, m in plain["mixtures"].items()})
    rows.update({f"plain {label}": (entry.row, entry.flops) for label, entry in dem_entries(plain).items()
                 if label in plain["dem_models"]})
    result = {"fraction": fraction, "warm_compute": warm_compute, "dem": dem, "training_tokens": run_tokens,
              "training_flops": run_flops, "search_passes": passes, "plain_result": str(plain_file)}
    rows.update({label: (entry.row, entry.flops)
                 for label, entry in warm_start_entries(result, plain["forward_pass_flops"]).items()})
    print(f"\n## DEM from a shared warm start ({fraction:g} of the steps)\n")
    print(f"Warm start: {warm_compute['global_step']} mixture steps; then {steps} steps per distribution; "
          f"{run_tokens:,} training tokens in all (plain DEM: {plain['dem_token_budget']:,}); searches {passes:.1f} "
          "forward-pass equivalents.\n")
    print("| model | " + " | ".join(names) + " | mean ppl | FLOPs | x grid |")
    print("|---|" + "---|" * (len(names) + 3))
    for label, (row, flops) in rows.items():
        cost = f"{flops:.3g} | {flops / grid_flops:.2f}" if flops and grid_flops else "- | -"
        print(f"| {label} | " + " | ".join(f"{row[n]:.3f}" for n in names) + f" | {_means(row, names)[0]:.3f} | {cost} |")
    warm_start_result_file(config, fraction).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
