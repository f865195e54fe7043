"""Data-ablation simulation (Na et al., 2024): a pool of per-partition models, proxy scores of candidate mixtures
from parameter averages, ranked reports, and checks of the proxy against models trained on the mixtures.
"""


from ..lazy import lazy_exports

_EXPORTS = {
    "PartitionPool": "pool",
    "evaluate_mixtures": "pool",
    "check_mixtures": "partitions",
    "split_partitions": "partitions",
    "AblationResult": "report",
    "MixtureScore": "report",
    "ProxyValidation": "report",
    "validate_proxy": "validation",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
