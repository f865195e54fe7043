"""dem_hf: Distribution-Edited Models (DEM) for the Hugging Face ecosystem.

Train one model per dataset, turn each into a distribution vector, pick merging coefficients by
validation perplexity, and add the weighted vectors to the base model.
"""

__version__ = "0.1.0"

from .callbacks import DistributionVectorCallback  # noqa: E402
from .config import DEMConfig, SearchConfig  # noqa: E402
from .evaluation import compute_perplexity  # noqa: E402
from .merger import DEMMerger  # noqa: E402
from .search import SearchResult  # noqa: E402
from .training import train_distributions, train_mixture  # noqa: E402
from .vectors import DistributionVector  # noqa: E402

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
