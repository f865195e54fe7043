"""dem_hf: Distribution-Edited Models (DEM) for the Hugging Face ecosystem.

Train one model per dataset, turn each into a distribution vector, pick merging coefficients by
validation perplexity, and add the weighted vectors to the base model.
"""

__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING

# Public names, imported on first use: `dem-hf merge` or `from dem_hf import DEMMerger` need not import TRL.
_EXPORTS = {
    "AblationResult": "ablation.report",
    "DEMConfig": "merging.config",
    "DEMMerger": "merging.merger",
    "DistributionVector": "vectors.vector",
    "DistributionVectorCallback": "training.callbacks",
    "PartitionPool": "ablation.pool",
    "ProxyValidation": "ablation.report",
    "SearchConfig": "search.config",
    "SearchResult": "search.result",
    "compute_perplexity": "evaluation.perplexity",
    "evaluate_mixtures": "ablation.pool",
    "split_partitions": "ablation.partitions",
    "train_distributions": "training.trainers",
    "train_mixture": "training.mixture",
    "train_warm_start": "training.warm_start",
    "validate_proxy": "ablation.validation",
}

__all__ = [
    "AblationResult",
    "DEMConfig",
    "DEMMerger",
    "DistributionVector",
    "DistributionVectorCallback",
    "PartitionPool",
    "ProxyValidation",
    "SearchConfig",
    "SearchResult",
    "__version__",
    "compute_perplexity",
    "evaluate_mixtures",
    "split_partitions",
    "train_distributions",
    "train_mixture",
    "train_warm_start",
    "validate_proxy",
]

if TYPE_CHECKING:
    from .ablation.partitions import split_partitions
    from .ablation.pool import PartitionPool, evaluate_mixtures
    from .ablation.report import AblationResult, ProxyValidation
    from .ablation.validation import validate_proxy
    from .evaluation.perplexity import compute_perplexity
    from .merging.config import DEMConfig
    from .merging.merger import DEMMerger
    from .search.config import SearchConfig
    from .search.result import SearchResult
    from .training.callbacks import DistributionVectorCallback
    from .training.mixture import train_mixture
    from .training.trainers import train_distributions
    from .training.warm_start import train_warm_start
    from .vectors.vector import DistributionVector


def __getattr__(name: str):
    if name == "logging":  # `dem_hf.logging.set_verbosity_info()`, as `transformers.logging`
        return importlib.import_module(".logging", __name__)
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, "logging"})
