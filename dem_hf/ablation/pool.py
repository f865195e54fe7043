"""Data-ablation simulation: rank candidate data mixtures without training on them.

Na et al., "Scalable Data Ablation Approximations for Language Models through Modular Training and Merging"
(EMNLP 2024): train one model per partition of a corpus, all from the same base, and judge a candidate mixture
(a subset of partitions, or weights over them) by the perplexity of the **parameter average** of the matching
models, θ + Σ w_i Δ_i with Σ w_i = 1 (dem_hf's `"average"` weighting). That proxy perplexity tracks the
perplexity of a model trained on the mixture, so a pool of partition models ranks many mixtures for the price of
forward passes, and a new partition costs one more training run.

- [`PartitionPool`]: the base and one [`DistributionVector`] per partition; [`PartitionPool.train`] splits a
  corpus ([`split_partitions`]) and trains the partitions with [`train_distributions`] (finished runs are reused,
  so a pool grows by training only the new partitions).
- [`evaluate_mixtures`]: the proxy score of every candidate, switching one loaded model in place between the
  averages ([`~dem_hf.search.candidates.CandidateModel`], as the coefficient search does) and restoring the base exactly.
- [`~dem_hf.ablation.validation.validate_proxy`] (in `validation.py`) trains each candidate's mixture for
  real and reports how well the proxy ranks them (Pearson, Spearman) and what both routes cost.

The data side (partitions, candidate parsing) is in `partitions.py`; result tables, correlations and plots
in `report.py`.

Candidates are written `["web", "code"]` or `"web,code"` (uniform average), or `{"web": 0.7, "code": 0.3}` or
`"web=0.7,code=0.3"` (weights, normalised to sum to 1); pass a dict `{name: candidate}` to name them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import logging
from ..evaluation.perplexity import (
    EvaluationSet,
    PerplexityResult,
    compute_perplexities,
)
from ..merging.config import DEMConfig
from ..search.config import SearchConfig
from ..vectors.vector import DistributionVector
from .partitions import (
    CandidateSpec,
    Mixture,
    check_eval_datasets,
    check_mixtures,
    split_partitions,
)
from .report import AblationResult, MixtureScore, rank_scores, sum_compute

__all__ = ["AblationResult", "PartitionPool", "evaluate_mixtures", "score_mixtures", "split_partitions"]

logger = logging.get_logger(__name__)


# ---------------------------------------------------------------------------------------------- the pool


@dataclass
class PartitionPool:
    """A base model and one distribution vector per corpus partition, all trained from that base.

    Args:
        base: folder or Hub id of the base model.
        vectors: one [`DistributionVector`] per partition; its name is the partition's name.
        partitions: the training data of each partition, when known (used by `validate_proxy`).

    Example:
        ```python
        >>> pool = PartitionPool.train("HuggingFaceTB/SmolLM2-135M", corpus, SFTConfig(max_steps=200),
        ...                            output_dir="pool", partition_by="source")
        >>> evaluate_mixtures(pool, ["web,code", "web,books", "web=0.5,code=0.25,books=0.25"], {"val": val})
        ```
    """

    base: str
    vectors: list[DistributionVector]
    partitions: dict[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.base = _check_base(self.base)
        if not self.vectors:
            raise ValueError("A partition pool needs at least one partition vector.")
        names = [v.name for v in self.vectors]
        if len(set(names)) != len(names):
            raise ValueError(f"Two partition vectors share a name: {names}.")

    @property
    def names(self) -> list[str]:
        """Partition names, in pool order."""
        return [v.name for v in self.vectors]

    @classmethod
    def from_vectors(cls, base: str | os.PathLike, vectors: Sequence[DistributionVector | str | os.PathLike],
                     partitions: Mapping[str, Any] | None = None) -> PartitionPool:
        """A pool from vectors (objects or saved-vector folders) computed against `base`."""
        loaded = [v if isinstance(v, DistributionVector) else DistributionVector.from_pretrained(v) for v in vectors]
        return cls(base, loaded, dict(partitions) if partitions is not None else None)

    @classmethod
    def train(cls, base: str | os.PathLike, corpus, sft_config=None, peft_config=None,
              output_dir: str | os.PathLike | None = None, *, partition_by: str | None = None,
              num_partitions: int | None = None, seed: int = 0, **train_kwargs) -> PartitionPool:
        """Split `corpus` ([`split_partitions`]; a `{name: dataset}` dict is used as it is) and train one model
        per partition with [`train_distributions`] (`train_kwargs` go there). Finished runs in `output_dir` are
        reused, so adding a partition later trains only that one."""
        from ..training.trainers import train_distributions

        base = _check_base(base)
        if isinstance(corpus, Mapping):
            if partition_by is not None or num_partitions is not None:
                raise ValueError("corpus is already partitioned (a dict); do not pass partition_by or num_partitions.")
            partitions = dict(corpus)
        else:
            partitions = split_partitions(corpus, by=partition_by, num_partitions=num_partitions, seed=seed)
        vectors = train_distributions(base, partitions, sft_config, peft_config, output_dir, **train_kwargs)
        return cls(base, vectors, partitions)

    def merger(self):
        """A [`DEMMerger`] with `"average"` weighting over the pool (checks every vector against the base)."""
        from ..merging.merger import DEMMerger

        return DEMMerger.from_pretrained(self.base, vectors=self.vectors, config=DEMConfig(weighting="average"))

    def training_compute(self) -> dict[str, Any]:
        """The partition runs' recorded compute (vector `metadata["compute"]`), summed ([`sum_compute`])."""
        return sum_compute({v.name: v.metadata.get("compute") for v in self.vectors})


def _check_base(base: Any) -> str:
    if not isinstance(base, (str, os.PathLike)):
        raise ValueError(
            f"The pool's base must be a model folder or Hub id (evaluation reloads it), got {type(base).__name__}."
        )
    return str(base)


# ---------------------------------------------------------------------------------------------- proxy scores


def scoring_config(eval_datasets: Mapping[str, Any], **options: Any) -> SearchConfig:
    config = SearchConfig(allow_extra_eval_sets=True, **options)
    if config.objective_weights and (unknown := sorted(set(config.objective_weights) - set(eval_datasets))):
        raise ValueError(
            f"objective_weights name unknown validation sets {unknown}; the sets are {list(eval_datasets)}."
        )
    return config


def evaluate_mixtures(
    pool: PartitionPool,
    candidates: Sequence[CandidateSpec] | Mapping[str, CandidateSpec],
    eval_datasets: Mapping[str, Any],
    *,
    tokenizer: Any | None = None,
    objective: str = "mean",
    metric: str = "perplexity",
    objective_weights: dict[str, float] | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    device: str | None = None,
    model: torch.nn.Module | None = None,
    show_progress: bool | None = None,
    **tokenize_kwargs: Any,
) -> AblationResult:
    """Rank candidate mixtures by the proxy perplexity of the parameter average of their partition models.

    Candidate `c` is scored on θ_c = θ + Σ_{i∈c} w_i Δ_i with its weights normalised to sum to 1 (uniform for a
    list of partitions). One base model is loaded and switched in place between candidates (only the vectors
    whose weight changes are touched); its weights are restored exactly at the end, also on error. Everything
    cheap (candidates, validation sets, objective, vectors against the base) is checked before the model loads.

    Args:
        pool: the [`PartitionPool`].
        candidates: a list of candidates or `{name: candidate}`; a candidate is partition names (`["a", "b"]`,
            `"a,b"`) or weights (`{"a": 0.7, "c": 0.3}`, `"a=0.7,c=0.3"`).
        eval_datasets: `{set name: dataset or EvaluationSet}`, any format TRL trains on.
        tokenizer: for raw datasets (default: the base folder's).
        objective, metric, objective_weights: the ranking objective, as in [`SearchConfig`] (default: mean
            perplexity over the sets; lower is better).
        batch_size, max_length, device: as in [`SearchConfig`].
        model: the base model already loaded (switched in place, restored exactly); default: loaded on `device`.
        show_progress: a progress bar over candidates (default: follows `transformers` logging settings).
        tokenize_kwargs: passed to `tokenize_for_evaluation` (`completion_only_loss`, `text_column`, ...).

    Returns:
        [`AblationResult`]: candidates best first, with weights, per-set perplexities, objective and rank.

    Example:
        ```python
        >>> result = evaluate_mixtures(pool, {"all": ["web", "code", "books"], "no-books": "web,code"}, {"val": val})
        >>> result.best.name, result.to_pandas()
        ```
    """
    from ..search.run import load_search_model, prepare_eval_sets

    mixtures = check_mixtures(candidates, pool.names)
    check_eval_datasets(eval_datasets)
    config = scoring_config(eval_datasets, objective=objective, metric=metric, objective_weights=objective_weights,
                             batch_size=batch_size, max_length=max_length, device=device)
    merger = pool.merger()
    eval_sets = prepare_eval_sets(merger, eval_datasets, config, tokenizer, model, tokenize_kwargs)
    model = model if model is not None else load_search_model(merger, config)
    return score_mixtures(merger, pool.names, mixtures, eval_sets, config, model, show_progress)


def score_mixtures(merger, partitions: list[str], mixtures: list[Mixture], eval_sets: dict[str, EvaluationSet],
                    config: SearchConfig, model: torch.nn.Module, show_progress: bool | None) -> AblationResult:
    from ..search.candidates import CandidateModel
    from ..search.run import resolve_lora_mode
    from ..search.strategies import Objective

    scorer = Objective(config, list(eval_sets))
    vectors = [merger.vectors[name] for name in partitions]
    evaluated: dict[tuple[float, ...], dict[str, PerplexityResult]] = {}
    scores, base, start = [], None, time.perf_counter()
    show = show_progress if show_progress is not None else logging.is_progress_bar_enabled()
    with CandidateModel(model, merger.base, vectors, lora_mode=resolve_lora_mode(config),
                        cache_deltas=config.cache_deltas) as switcher, \
            logging.tqdm(total=len(mixtures), desc="Mixtures", unit="cand", disable=not show) as bar:
        if scorer.needs_base:
            base = compute_perplexities(model, eval_sets, batch_size=config.batch_size, show_progress=False)
            scorer.base_losses = torch.tensor([base[n].loss for n in eval_sets], dtype=torch.float64)
        for mixture in mixtures:
            weights = mixture.vector_weights(partitions)
            key = tuple(round(w, 12) for w in weights)
            if key not in evaluated:
                switcher.set_weights(weights)
                evaluated[key] = compute_perplexities(
                    model, eval_sets, batch_size=config.batch_size, show_progress=False
                )
            results = evaluated[key]
            scores.append(MixtureScore(
                mixture.name, dict(mixture.weights), {n: r.perplexity for n, r in results.items()},
                {n: r.loss for n, r in results.items()}, scorer.value(results),
            ))
            bar.update(1)
    return AblationResult(
        scores=rank_scores(scores), objective=scorer.description, partitions=list(partitions),
        eval_sets={n: {"num_sequences": len(s), "num_tokens": s.num_tokens, "num_truncated": s.num_truncated}
                   for n, s in eval_sets.items()},
        base_perplexities={n: r.perplexity for n, r in base.items()} if base else None,
        compute=float(len(evaluated) + (base is not None)), wall_time_s=time.perf_counter() - start,
    )
