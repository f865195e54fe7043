"""Checking the data-ablation proxy against reality: [`validate_proxy`].

For a few candidate mixtures, train a model on each for real ([`~dem_hf.training.mixture.train_mixture`]), evaluate it on
the same validation sets as the proxy, and report how well the proxy's ranking tracks the trained models' (Pearson
and Spearman correlations) and what each route costs: the pool's partition runs against one run per candidate.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..evaluation.perplexity import PerplexityResult, compute_perplexities
from .partitions import (
    CandidateSpec,
    check_eval_datasets,
    check_mixtures,
    check_training_partitions,
)
from .pool import PartitionPool, score_mixtures, scoring_config
from .report import (
    AblationResult,
    ProxyValidation,
    compute_ratios,
    pearson,
    plot_proxy_validation,
    spearman,
    sum_compute,
)

__all__ = ["validate_proxy"]

MIN_VALIDATION_CANDIDATES = 3


def validate_proxy(
    pool: PartitionPool,
    candidates: Sequence[CandidateSpec] | Mapping[str, CandidateSpec],
    eval_datasets: Mapping[str, Any],
    corpus_partitions: Mapping[str, Any] | None = None,
    sft_config=None,
    peft_config=None,
    output_dir: str | os.PathLike | None = None,
    *,
    tokenizer: Any | None = None,
    objective: str = "mean",
    metric: str = "perplexity",
    objective_weights: dict[str, float] | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    device: str | None = None,
    num_examples: int | None = None,
    seed: int | None = None,
    plot: str | os.PathLike | None = None,
    show_progress: bool | None = None,
    **tokenize_kwargs: Any,
) -> ProxyValidation:
    """Check the proxy against reality: train a model on each candidate mixture and correlate the perplexities.

    Each candidate is scored by the proxy ([`evaluate_mixtures`]) and trained for real with [`train_mixture`] on
    its partitions' data (examples drawn with the candidate's weights; `num_examples` defaults to the total size
    of those partitions, so a uniform candidate of equal-size partitions trains on as much data as their
    union), with the same `sft_config` / `peft_config` as the pool. Both are evaluated on the same validation
    sets, tokenised once. Finished mixture runs in `output_dir` are reused.

    Args:
        pool, candidates, eval_datasets, tokenizer, objective, metric, objective_weights, batch_size, max_length,
        device, show_progress, tokenize_kwargs: as in [`evaluate_mixtures`]; at least 3 candidates.
        corpus_partitions: `{partition: training dataset}`; default `pool.partitions` (set by
            [`PartitionPool.train`]).
        sft_config, peft_config, output_dir: as in [`train_mixture`] (use the pool's settings for a fair test).
        num_examples, seed: the mixture length and sampling seed, as in [`train_mixture`].
        plot: save a scatter plot (PNG) of proxy against trained objective here (needs matplotlib).

    Returns:
        [`ProxyValidation`]: both objectives per candidate, Pearson and Spearman correlations (over the
        objectives, and per validation set), and the compute of the pool against training every candidate.

    Example:
        ```python
        >>> check = validate_proxy(pool, ["web,code", "web,books", "code,books"], {"val": val},
        ...                        sft_config=SFTConfig(max_steps=200), output_dir="mixtures", plot="proxy.png")
        >>> print(check.table())
        ```
    """
    from ..search.run import load_search_model, prepare_eval_sets
    from ..search.strategies import Objective
    from ..training.mixture import train_mixture

    mixtures = check_mixtures(candidates, pool.names)
    if len(mixtures) < MIN_VALIDATION_CANDIDATES:
        raise ValueError(
            f"validate_proxy needs at least {MIN_VALIDATION_CANDIDATES} candidates for a meaningful correlation, "
            f"got {[m.name for m in mixtures]}."
        )
    check_eval_datasets(eval_datasets)
    partitions = check_training_partitions(corpus_partitions if corpus_partitions is not None else pool.partitions,
                                           mixtures, pool.names)
    if output_dir is None and getattr(sft_config, "output_dir", None) is None:
        raise ValueError("Pass output_dir= (or an SFTConfig with an output_dir) for the mixture runs.")
    if plot is not None:
        from ..search.plots import import_matplotlib

        import_matplotlib()  # fail now, not after the training, when matplotlib is missing
    config = scoring_config(eval_datasets, objective=objective, metric=metric, objective_weights=objective_weights,
                             batch_size=batch_size, max_length=max_length, device=device)
    merger = pool.merger()
    eval_sets = prepare_eval_sets(merger, eval_datasets, config, tokenizer, None, tokenize_kwargs)
    base_model = load_search_model(merger, config)
    proxy = score_mixtures(merger, pool.names, mixtures, eval_sets, config, base_model, show_progress)
    del base_model  # one model in memory at a time

    scorer = Objective(config, list(eval_sets))
    if scorer.needs_base:
        base_losses = [math.log(proxy.base_perplexities[n]) for n in eval_sets]
        scorer.base_losses = torch.tensor(base_losses, dtype=torch.float64)
    trained, runs = {}, {}
    for mixture in mixtures:
        weights = {n: w for n, w in mixture.weights.items() if w > 0}
        run = train_mixture(pool.base, {n: partitions[n] for n in weights}, weights, sft_config, peft_config,
                            output_dir, num_examples=num_examples, seed=seed, processing_class=tokenizer)
        model = _load_trained_model(pool.base, run, config.device)
        trained[mixture.name] = compute_perplexities(model, eval_sets, batch_size=batch_size, show_progress=False)
        runs[mixture.name] = run
        del model
    return _validation(proxy, trained, scorer, pool, runs, plot)


def _load_trained_model(base: str, run, device: str | None) -> torch.nn.Module:
    """A mixture run's final model: the full fine-tune, or the base with the LoRA adapter."""
    from transformers import AutoModelForCausalLM

    from ..search.run import resolve_device
    from ..training.runs import ADAPTER_FOLDER

    if run.model_dir.name == ADAPTER_FOLDER:
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype="auto"), run.model_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(run.model_dir, dtype="auto")
    return model.to(resolve_device(device)).eval()


def _validation(proxy: AblationResult, trained: dict[str, dict[str, PerplexityResult]], scorer, pool: PartitionPool,
                runs: dict[str, Any], plot: str | os.PathLike | None) -> ProxyValidation:
    names = proxy.ranking
    objectives = {name: scorer.value(trained[name]) for name in names}
    proxy_objectives = [proxy[name].objective for name in names]
    per_set = {}
    for set_name in proxy.eval_sets:
        xs = [proxy[name].perplexities[set_name] for name in names]
        ys = [trained[name][set_name].perplexity for name in names]
        per_set[set_name] = {"pearson": pearson(xs, ys), "spearman": spearman(xs, ys)}
    pool_compute = pool.training_compute()
    candidates_compute = sum_compute({run.name: run.info.get("compute") for run in runs.values()})
    validation = ProxyValidation(
        proxy=proxy,
        trained_perplexities={n: {s: r.perplexity for s, r in trained[n].items()} for n in names},
        trained_objectives=objectives,
        pearson=pearson(proxy_objectives, [objectives[n] for n in names]),
        spearman=spearman(proxy_objectives, [objectives[n] for n in names]),
        per_set=per_set,
        compute={"pool": pool_compute, "candidates": candidates_compute,
                 "candidates_over_pool": compute_ratios(candidates_compute, pool_compute)},
        runs={n: str(run.run_dir) for n, run in runs.items()},
        plot_path=str(plot) if plot is not None else None,
    )
    if plot is not None:
        plot_proxy_validation(validation, plot)
    return validation
