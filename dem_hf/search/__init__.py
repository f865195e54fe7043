"""Coefficient search by validation perplexity: `SearchConfig`, the name-only strategy registry, the strategies,
in-place candidate switching, `SearchResult` and plots.
"""


from ..lazy import lazy_exports

_EXPORTS = {
    "SearchConfig": "config",
    "get_strategy": "registry",
    "register_strategy": "registry",
    "strategy_names": "registry",
    "SearchResult": "result",
    "run_search": "run",
    "CandidateModel": "candidates",
    "OperatorCandidateModel": "operator_candidates",
    "import_matplotlib": "plots",
    "plot_search": "plots",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
