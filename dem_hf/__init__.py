"""dem_hf: Distribution-Edited Models (DEM) for the Hugging Face ecosystem.

Train one model per dataset, turn each into a distribution vector, pick merging coefficients by
validation perplexity, and add the weighted vectors to the base model.
"""

__version__ = "0.1.0"

from .config import DEMConfig  # noqa: E402
from .merger import DEMMerger  # noqa: E402
from .vectors import DistributionVector  # noqa: E402

__all__ = ["DEMConfig", "DEMMerger", "DistributionVector", "__version__"]
