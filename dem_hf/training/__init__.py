"""Training: one TRL `SFTTrainer` run per dataset (`train_distributions`) and the data-mixing baseline
(`train_mixture`), the distribution runs' shared warm start (`train_warm_start`); dataset loading and checks, run folders (reuse, resume), callbacks.
"""


from ..lazy import lazy_exports

_EXPORTS = {
    "bf16_available": "trainers",
    "train_distributions": "trainers",
    "train_mixture": "mixture",
    "train_warm_start": "warm_start",
    "load_training_dataset": "data",
    "mix_datasets": "data",
    "DistributionVectorCallback": "callbacks",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
