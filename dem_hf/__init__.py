"""dem_hf: Distribution-Edited Models (DEM) for the Hugging Face ecosystem.

Train one model per dataset, turn each into a distribution vector, pick merging coefficients by
validation perplexity, and add the weighted vectors to the base model.
"""

__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING

# Public names, imported on first use: `dem-hf merge` or `from dem_hf import DEMMerger` need not import TRL.
_EXPORTS = {
    "DEMConfig": "config",
    "DEMMerger": "merger",
    "DistributionVector": "vectors",
    "DistributionVectorCallback": "callbacks",
    "SearchConfig": "config",
    "SearchResult": "search",
    "compute_perplexity": "evaluation",
    "train_distributions": "training",
    "train_mixture": "training",
}

__all__ = [
    "DEMConfig",
    "DEMMerger",
    "DistributionVector",
    "DistributionVectorCallback",
    "SearchConfig",
    "SearchResult",
    "__version__",
    "compute_perplexity",
    "train_distributions",
    "train_mixture",
]

if TYPE_CHECKING:
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
