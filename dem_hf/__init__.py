"""dem_hf: Distribution-Edited Models (DEM) for the Hugging Face ecosystem.

Train one model per dataset, turn each into a distribution vector, pick merging coefficients by
validation perplexity, and add the weighted vectors to the base model.
"""

__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING

# Public names, imported on first use: `dem-hf merge` or `from dem_hf import DEMMerger` need not import TRL.
_EXPORTS = {
    "AblationResult": "ablation_report",
    "DEMConfig": "config",
    "DEMMerger": "merger",
    "DistributionVector": "vectors",
    "DistributionVectorCallback": "callbacks",
    "PartitionPool": "ablation",
    "ProxyValidation": "ablation_report",
    "SearchConfig": "config",
    "SearchResult": "search",
    "compute_perplexity": "evaluation",
    "evaluate_mixtures": "ablation",
    "split_partitions": "ablation_data",
    "train_distributions": "training",
    "train_mixture": "training",
    "validate_proxy": "ablation_validation",
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
    "validate_proxy",
]

if TYPE_CHECKING:
    from .ablation import PartitionPool, evaluate_mixtures
    from .ablation_data import split_partitions
    from .ablation_report import AblationResult, ProxyValidation
    from .ablation_validation import validate_proxy
    from .callbacks import DistributionVectorCallback
    from .config import DEMConfig, SearchConfig
    from .evaluation import compute_perplexity
    from .merger import DEMMerger
    from .search import SearchResult
    from .training import train_distributions, train_mixture
    from .vectors import DistributionVector


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
