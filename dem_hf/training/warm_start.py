"""A shared warm start for the distribution runs (Branch-Train-Merge's seed phase).

Plain DEM trains every distribution from the base model, so nothing one run learns reaches another except through
the merge. A warm start first trains one short run on a mixture of all the datasets; every distribution's run then
starts from that model, and DEM merges their vectors into it (the warm start is DEM's base). In the study of
`benchmarks/RESULTS.md`, a quarter of DEM's optimizer steps spent this way (the rest split among the runs, so the
same training tokens in all) lowered DEM's mean held-out perplexity by 3-4%. A new dataset still costs one run,
from the same warm start.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .. import logging
from .data import DatasetSource
from .mixture import train_mixture
from .trainers import TrainingRun

__all__ = ["train_warm_start", "WARM_START_MODEL_NAME"]

logger = logging.get_logger(__name__)

WARM_START_MODEL_NAME = "merged"  # inside the mixture's run folder: the base with the run's adapter merged in


def train_warm_start(
    base: str | os.PathLike,
    datasets: Mapping[str, DatasetSource] | Sequence[tuple[str, DatasetSource]],
    sft_config=None,
    peft_config=None,
    output_dir: str | os.PathLike | None = None,
    *,
    weights: Mapping[str, float] | None = None,
    name: str | None = None,
    processing_class=None,
    formatting_func: Callable | None = None,
    callbacks: Sequence | None = None,
    retrain: bool = False,
) -> TrainingRun:
    """Train the shared warm start of the distribution runs: one mixture run, saved as a full model folder.

    The run is [`train_mixture`] (same arguments, reused when finished, resumed when interrupted); set
    `sft_config.max_steps` to the warm start's share of the training (e.g. a quarter of all the runs' steps). With a
    `peft_config`, the adapter is merged into the base at weight 1 by DEM's own merge (equal to PEFT's
    `merge_and_unload`) and saved, with the tokenizer, in the run folder's `merged/`; a full fine-tune's `model/` is
    already such a folder. Pass the returned folder as the base of [`train_distributions`] and of [`DEMMerger`].

    Args:
        base (`str` or `os.PathLike`):
            The base model, a folder or Hub id (the merge reads its safetensors checkpoint).
        datasets, sft_config, peft_config, output_dir, processing_class, formatting_func, callbacks, retrain:
            as in [`train_mixture`]; the datasets must share one format.
        weights (`dict[str, float]`, *optional*):
            The mixture's weights; by default every dataset weighs the same (a uniform mixture).
        name (`str`, *optional*):
            The run's name; by default built from the weights, as in [`train_mixture`].

    Returns:
        [`TrainingRun`]: the mixture run (its `run_info.json` content, compute included) with `model_dir` the
        warm-start model folder, which loads with `AutoModelForCausalLM.from_pretrained`.

    Example:
        ```python
        >>> from trl import SFTConfig
        >>> from dem_hf import DEMMerger, train_distributions, train_warm_start
        >>> data = {"math": "data/math.jsonl", "code": "data/code.jsonl"}
        >>> warm = train_warm_start("HuggingFaceTB/SmolLM2-135M", data, SFTConfig(max_steps=100), lora, "warm")
        >>> vectors = train_distributions(warm.model_dir, data, SFTConfig(max_steps=150), lora, "runs")
        >>> merger = DEMMerger.from_pretrained(warm.model_dir, vectors=vectors)
        ```
    """
    if not isinstance(base, (str, os.PathLike)):
        raise ValueError(
            f"train_warm_start: expected the base model as a folder or Hub id (the warm start is saved as a model "
            f"folder merged from it), got {type(base).__name__}"
        )
    names = list(datasets) if isinstance(datasets, Mapping) else [pair[0] for pair in datasets]
    weights = dict(weights) if weights is not None else {name_: 1.0 for name_ in names}
    run = train_mixture(base, datasets, weights, sft_config, peft_config, output_dir, name=name,
                        processing_class=processing_class, formatting_func=formatting_func, callbacks=callbacks,
                        retrain=retrain)
    if peft_config is None:
        return run
    return dataclasses.replace(run, model_dir=_merged_model(base, run, processing_class))


def _merged_model(base: str | os.PathLike, run: TrainingRun, processing_class) -> Path:
    """The base with the run's adapter merged in at weight 1, saved once in the run folder (reused after)."""
    from transformers import AutoTokenizer

    from ..io.outputs import atomic_directory
    from ..merging.merger import DEMMerger
    from ..vectors.vector import DistributionVector

    target = run.run_dir / WARM_START_MODEL_NAME
    if (target / "config.json").is_file():  # built from this very run: a retrained run replaces its whole folder
        return target
    logger.info(f"Warm start {run.name!r}: merging its adapter into the base -> {target}")
    vector = DistributionVector.from_peft(run.model_dir, name="warm_start")
    model = DEMMerger.from_pretrained(base, vectors=[vector]).merge({"warm_start": 1.0})
    tokenizer = processing_class or AutoTokenizer.from_pretrained(run.model_dir)  # the trainer saved it there
    with atomic_directory(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target
