"""Evaluation: datasets given as objects or paths (one loader, shared with training), validation data in any TRL
format tokenised once into an `EvaluationSet`, token-weighted corpus
perplexity, and the packaged `evaluate` metric module.
"""


from ..lazy import lazy_exports

_EXPORTS = {
    "PERPLEXITY_METRIC_PATH": "perplexity",
    "PerplexityResult": "perplexity",
    "batch_nll": "perplexity",
    "compute_perplexities": "perplexity",
    "compute_perplexity": "perplexity",
    "EvaluationSet": "sets",
    "load_dataset_source": "loading",
    "tokenize_for_evaluation": "tokenization",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
