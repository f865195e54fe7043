#!/usr/bin/env bash
# Issue 16's study: DEM against data mixing over two groups of distributions, two budgets, LoRA and full
# fine-tuning, with DEM's variants, four mixtures per setting and an off-distribution column. Every stage is cached
# (benchmarks/.work/dem_vs_mixing/, the demo's cache in examples/.cache/), so the script resumes where it stopped;
# each line prints its Markdown table for benchmarks/RESULTS.md and writes its setting's record to benchmarks/results/
# (committed), from which every run redraws the Pareto chart of all settings (benchmarks/dem_vs_mixing_pareto.png).
#
#   bash benchmarks/dem_vs_mixing_study.sh            # all settings, most important first (CPU: many hours)
#   STUDY_ONLY=2 bash benchmarks/dem_vs_mixing_study.sh   # one setting (its number below)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
VARIANTS=(--dem-variants gradient:layer gradient:layer:dare_linear:0.5 gradient:layer:breadcrumbs:0.8 gradient:layer:ties:0.5 gradient:module
          --dem-budget 12 --dem-batch-sequences 3)
COMMON=(--max_length 128 --off-distribution fortunes "${VARIANTS[@]}")
LONG=(--max_steps 120 --lr_scheduler_type cosine --warmup_ratio 0.1)
TEXT=(--distributions bible pydocs jargon)
settings=(
  "${LONG[*]}"                                                     # 1: demo group, LoRA, 4x budget, cosine
  ""                                                               # 2: demo group, LoRA, 30 steps, constant lr
  "${TEXT[*]} ${LONG[*]}"                                          # 3: plain-text group, LoRA, 4x budget
  "${TEXT[*]}"                                                     # 4: plain-text group, LoRA, 30 steps
  "--finetuning full --learning_rate 5e-5 --lr_scheduler_type cosine --warmup_ratio 0.1"  # 5: demo group, full, 30 steps
  "--n_train 100 --mixture-fractions 0.25 ${LONG[*]}"               # 6: demo group, 100 examples each, 4x budget:
                                                                   #    4.8 epochs; also mixing stopped at 1/4 of the tokens
  "--n_train 100 --max_steps 30 --lr_scheduler_type cosine --warmup_ratio 0.1 --mixtures uniform"  # 7: 6's data, both
                                                                   #    sides stopped at 1.2 epochs
  "--n_train 100 --eval_steps 10 --early_stopping_patience 3 ${LONG[*]}"  # 8: 6 with every run kept at its best
                                                                   #    checkpoint, stopped after 3 evaluations
  "${TEXT[*]} --n_train 100 --eval_steps 10 --early_stopping_patience 3 ${LONG[*]}"  # 9: 8's recipe, plain-text group
)
mkdir -p benchmarks/.work/dem_vs_mixing
for index in "${!settings[@]}"; do
  number=$((index + 1))
  if [[ -n "${STUDY_ONLY:-}" && "$STUDY_ONLY" != "$number" ]]; then continue; fi
  # shellcheck disable=SC2086  # each setting is a list of options
  $PYTHON benchmarks/dem_vs_mixing.py "${COMMON[@]}" ${settings[$index]} | tee "benchmarks/.work/study-$number.md"
done
# DEM from a shared warm start (a quarter of DEM's steps on one uniform mixture first, the demo's default) at settings
# 1, 2 and 8 (at 1 also half of the steps, and the warm start's own ω fitted per layer; at 8 also 0.4 of the steps
# with the runs from it stopped sooner; at 8 and 9 also the fit from ω = 1/k), then those settings' tables
# again (every stage cached), now with the warm-started models in them.
if [[ -z "${STUDY_ONLY:-}" ]]; then
  # shellcheck disable=SC2086
  $PYTHON benchmarks/dem_warm_start.py --warm-fraction 0.25 --search-warm-vector --max_length 128 --group_batch_sequences 3 ${settings[0]}
  # shellcheck disable=SC2086
  $PYTHON benchmarks/dem_warm_start.py --warm-fraction 0.5 --max_length 128 --group_batch_sequences 3 ${settings[0]}
  $PYTHON benchmarks/dem_warm_start.py --warm-fraction 0.25 --max_length 128
  # shellcheck disable=SC2086  # setting 8 warm-started: its warm start is 6's uniform mixture on a quarter of the tokens
  $PYTHON benchmarks/dem_warm_start.py --warm-fraction 0.25 --max_length 128 --group_batch_sequences 3 ${settings[7]}
  # and 0.4 of the steps, the runs from it evaluated every 5 steps and stopped after 2 (then 1) without progress
  for patience in 2 1; do  # each trains its own warm start, the same model (its folder may be copied over)
    # shellcheck disable=SC2086
    $PYTHON benchmarks/dem_warm_start.py --warm-fraction 0.4 --run-eval-steps 5 --run-patience $patience --group_steps 8 \
      --max_length 128 --group_batch_sequences 3 ${settings[7]}
  done
  # setting 9 warm-started the same way (0.4 of the steps, the runs from it stopped after 1 without progress)
  # shellcheck disable=SC2086
  $PYTHON benchmarks/dem_warm_start.py --warm-fraction 0.4 --run-eval-steps 5 --run-patience 1 --group_steps 8 \
    --max_length 128 --group_batch_sequences 3 ${settings[8]}
  # settings 8 and 9 again from the same runs, the per-layer fit started at ω = 1/k with no per-vector search
  # (7 steps: within 10% of their training compute)
  for index in 7 8; do
    # shellcheck disable=SC2086
    $PYTHON benchmarks/dem_warm_start.py --group-init uniform --warm-fraction 0.4 --run-eval-steps 5 --run-patience 1 \
      --group_steps 7 --max_length 128 --group_batch_sequences 3 ${settings[$index]}
  done
  for index in 0 1 7 8; do
    # shellcheck disable=SC2086
    $PYTHON benchmarks/dem_vs_mixing.py "${COMMON[@]}" ${settings[$index]} | tee "benchmarks/.work/study-$((index + 1)).md"
  done
fi
# Every run of dem_vs_mixing.py redraws benchmarks/dem_vs_mixing_pareto.png from all the records in benchmarks/results/.
