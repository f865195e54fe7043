"""Interference-aware merge operators: how the deltas τ_1..τ_n of ONE tensor and their weights w_i become the
change added to the base, θ' = θ + op(τ, w).

- `task_arithmetic`: Σ w_i τ_i (DEM's own merge; the streaming engine keeps its own code path for it).
- `ties` (Yadav et al., 2023): each τ_i trimmed to its `density` fraction of largest magnitudes, one sign elected
  per entry (the sign of Σ_i trimmed τ_i, + on ties), then the *disjoint mean* of the agreeing weighted entries:
  Σ_i [sign agrees] w_i τ_i / max(1, #agreeing).
- `dare_linear` (Yu et al., 2024): each entry dropped with probability 1 − `density`, survivors divided by
  `density`, then Σ w_i τ_i.
- `dare_ties`: DARE's random drop and rescale, then TIES's sign election and disjoint mean.
- `breadcrumbs` (Davari & Belilovsky, 2024): per τ_i the `gamma` fraction of largest magnitudes is removed and
  only the next `density` fraction kept (the smallest are dropped too), then Σ w_i τ_i, without rescaling.

The definitions follow `peft.utils.merge_utils` (`ties`, `dare_linear`, `dare_ties`, `magnitude_prune`,
`calculate_majority_sign_mask` with `"total"`, `disjoint_merge`: the sign is elected on the *unweighted*
trimmed deltas, the mean divides by the number of agreeing vectors) and mergekit's `magnitude_outliers` for
breadcrumbs (k = int(density · numel), n_top = int(gamma · numel)). Where PEFT and mergekit leave the order of
equal magnitudes to the sort, here ties between equal magnitudes are broken by position (the lower flat index
is kept first), so the NumPy and torch versions select the same entries. A vector whose weight is 0 takes no
part at all (as if absent: it neither votes in the sign election nor counts in the mean).

DARE's randomness is a pure function of (`seed`, tensor name, vector name, entry index): each entry's keep/drop
draw is the entry-th 64-bit output of a PCG64 stream seeded from the three, reached with `advance`, so a row
block of a tensor gets exactly the draws of those entries whatever the block size, thread or worker count.

Each operator exists twice, on NumPy arrays (the streaming merge and `DEMMerger.merge`) and on torch tensors
(any device: the coefficient search), doing the same float32 operations in the same order: the two agree bit
for bit (tests/test_operators.py). torch is imported only inside the torch versions.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

MERGE_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs")
# Operators that need statistics of the whole tensor (its top-k magnitudes): the streaming merge reads every
# vector's whole delta of that tensor at once for them, so memory grows to about (vectors + 2) × the tensor in
# float32 per worker thread.
WHOLE_TENSOR_METHODS = ("ties", "breadcrumbs")
RANDOM_METHODS = ("dare_linear", "dare_ties")
SIGN_ELECTION_METHODS = ("ties", "dare_ties")
DEFAULT_GAMMA = 0.01  # mergekit's default for breadcrumbs
DEFAULT_SEED = 0


@dataclass(frozen=True)
class MergeOperator:
    """A merge method and its parameters, validated (see [`check_merge_operator`]).

    Args:
        method: one of `MERGE_METHODS`.
        density: fraction of each delta's entries kept, in (0, 1]; every method but `task_arithmetic` needs it.
        gamma: fraction of largest magnitudes removed by `breadcrumbs` (default 0.01); only for `breadcrumbs`.
        seed: seed of DARE's random drop (default 0); only for `dare_linear` and `dare_ties`.

    Example:
        ```python
        >>> op = MergeOperator("ties", density=0.5)
        >>> op.combine([np.array([1.0, -2.0], np.float32), np.array([3.0, 1.0], np.float32)], [1.0, 1.0])
        array([ 3., -2.], dtype=float32)
        ```
    """

    method: str = "task_arithmetic"
    density: float | None = None
    gamma: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        density, gamma, seed = check_merge_operator(self.method, self.density, self.gamma, self.seed)
        object.__setattr__(self, "density", density)
        object.__setattr__(self, "gamma", gamma)
        object.__setattr__(self, "seed", seed)

    @property
    def is_task_arithmetic(self) -> bool:
        return self.method == "task_arithmetic"

    @property
    def whole_tensor(self) -> bool:
        """Whether the operator needs each delta whole (top-k magnitudes), not row block by row block."""
        return self.method in WHOLE_TENSOR_METHODS

    @property
    def random(self) -> bool:
        return self.method in RANDOM_METHODS

    def describe(self) -> str:
        """One line naming the method and its parameters, e.g. `ties (density 0.5)`."""
        parts = [f"density {self.density:g}"] if self.density is not None else []
        parts += [f"gamma {self.gamma:g}"] if self.gamma is not None else []
        parts += [f"seed {self.seed}"] if self.seed is not None else []
        return self.method + (f" ({', '.join(parts)})" if parts else "")

    def keep_masks(self, tensor_name: str, vector_names: Sequence[str], offset: int, shape: tuple[int, ...]) -> list[np.ndarray] | None:
        """DARE's keep masks (`bool`, `shape`) for the entries `offset ...` of tensor `tensor_name`, one per vector;
        `None` for the deterministic operators."""
        if not self.random:
            return None
        count = math.prod(shape)
        return [dare_keep_mask(self.seed, tensor_name, vector, offset, count, self.density).reshape(shape) for vector in vector_names]

    def combine(self, deltas: Sequence[np.ndarray], weights: Sequence[float], masks: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """op(τ, w) on float32 NumPy arrays of one shape (the whole tensor for `whole_tensor` operators);
        `masks` are DARE's keep masks (see [`keep_masks`])."""
        return combine_numpy(self, deltas, weights, masks)

    def combine_torch(self, deltas: Sequence[torch.Tensor], weights: Sequence[float], masks: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """op(τ, w) on float32 torch tensors of one shape and device: bitwise [`combine`]."""
        return combine_torch(self, deltas, weights, masks)


def check_merge_operator(method: Any, density: Any, gamma: Any, seed: Any) -> tuple[float | None, float | None, int | None]:
    """Validate a merge method and its parameters; return `(density, gamma, seed)` with defaults filled in
    (`gamma` 0.01 for breadcrumbs, `seed` 0 for DARE). Raises `ValueError` saying what was expected and got."""
    if method not in MERGE_METHODS:
        raise ValueError(f"Unknown merge_method {method!r}; expected one of {list(MERGE_METHODS)}.")
    if method == "task_arithmetic":
        if density is not None:
            raise ValueError(f"merge_method='task_arithmetic' keeps every entry and takes no density; got density={density!r}.")
    elif density is None:
        raise ValueError(f"merge_method={method!r} needs density, the fraction of each delta kept, in (0, 1]; got None.")
    else:
        density = _fraction("density", density, low_open=True)
    if method == "breadcrumbs":
        gamma = DEFAULT_GAMMA if gamma is None else _fraction("gamma", gamma, high_open=True)
        if density + gamma > 1.0:
            raise ValueError(
                f"breadcrumbs removes the gamma={gamma} largest and keeps the next density={density}: "
                f"density + gamma must be at most 1, got {density + gamma}."
            )
    elif gamma is not None:
        raise ValueError(f"gamma (the largest magnitudes removed) applies only to merge_method='breadcrumbs', not {method!r}; got gamma={gamma!r}.")
    if method in RANDOM_METHODS:
        if seed is None:
            seed = DEFAULT_SEED
        elif isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
        seed = int(seed)
    elif seed is not None:
        raise ValueError(f"seed applies only to the random merge methods {list(RANDOM_METHODS)}, not {method!r}; got seed={seed!r}.")
    return density, gamma, seed


def _fraction(name: str, value: Any, low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    value = float(value)
    low_ok = value > 0.0 if low_open else value >= 0.0
    high_ok = value < 1.0 if high_open else value <= 1.0
    if not (low_ok and high_ok):
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ValueError(f"{name} must be in {interval}, got {value}.")
    return value


# ----------------------------------------------------------------------------------------- DARE's randomness


def dare_stream_seed(seed: int, tensor_name: str, vector_name: str) -> np.random.SeedSequence:
    """The seed of one (tensor, vector) pair's stream: `seed` and a SHA-256 of the two names (stable across runs
    and Python processes, unlike `hash`)."""
    digest = hashlib.sha256(f"{tensor_name}\0{vector_name}".encode()).digest()
    return np.random.SeedSequence([seed, *np.frombuffer(digest, dtype=np.uint32).tolist()])


def dare_keep_mask(seed: int, tensor_name: str, vector_name: str, offset: int, count: int, density: float) -> np.ndarray:
    """Which of the flat entries `offset ... offset + count − 1` DARE keeps (1-d `bool`): entry j is kept when
    the j-th 64-bit draw of its stream is below density · 2⁶⁴ (probability `density`)."""
    if density >= 1.0:
        return np.ones(count, dtype=bool)
    generator = np.random.PCG64(dare_stream_seed(seed, tensor_name, vector_name))
    if offset:
        generator.advance(offset)
    draws = generator.random_raw(count)
    return draws < np.uint64(int(density * 2.0**64))


# ----------------------------------------------------------------------------------------- NumPy


def largest_mask(values: np.ndarray, k: int) -> np.ndarray:
    """`bool` mask (shape of `values`) of the `k` largest `|values|`, equal magnitudes taken in flat order."""
    magnitude = np.abs(values).reshape(-1)
    n = magnitude.size
    if k <= 0 or k >= n:
        return np.full(values.shape, k > 0, dtype=bool)
    threshold = np.partition(magnitude, n - k)[n - k]  # the k-th largest
    mask = magnitude > threshold
    missing = k - int(np.count_nonzero(mask))
    mask[np.flatnonzero(magnitude == threshold)[:missing]] = True
    return mask.reshape(values.shape)


def trim_counts(method: str, n: int, density: float, gamma: float | None) -> tuple[int, int]:
    """How many of `n` entries TIES or breadcrumbs keep, and how many of the largest breadcrumbs drops first (0 for TIES)."""
    keep = int(density * n)
    return keep, (0 if method == "ties" else min(int(gamma * n), n - keep))


def trim_mask(method: str, delta: np.ndarray, density: float, gamma: float | None) -> np.ndarray:
    """Entries TIES (top `density`) or breadcrumbs (below the top `gamma`, within the next `density`) keep."""
    keep, top = trim_counts(method, delta.size, density, gamma)
    return largest_mask(delta, keep + top) & ~largest_mask(delta, top) if top else largest_mask(delta, keep)


def combine_numpy(op: MergeOperator, deltas: Sequence[np.ndarray], weights: Sequence[float], masks=None) -> np.ndarray:
    """See [`MergeOperator.combine`]: [`sparsify_numpy`], then [`merge_sparse_numpy`]."""
    _check_lengths(deltas, weights, masks, op)
    return merge_sparse_numpy(op, sparsify_numpy(op, deltas, masks), weights)


def sparsify_numpy(op: MergeOperator, deltas: Sequence[np.ndarray], masks=None) -> list[np.ndarray]:
    """The part of an operator that does not depend on the weights: each delta trimmed (TIES, breadcrumbs) or
    randomly dropped and rescaled (DARE, given its keep `masks`); unchanged for task arithmetic."""
    if op.method in WHOLE_TENSOR_METHODS:
        return [np.where(trim_mask(op.method, delta, op.density, op.gamma), delta, np.float32(0.0)) for delta in deltas]
    if op.random:
        density = np.float32(op.density)
        return [np.where(mask, delta / density, np.float32(0.0)) for delta, mask in zip(deltas, masks)]
    return list(deltas)


def merge_sparse_numpy(op: MergeOperator, deltas: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """The weighted part: TIES's sign election and disjoint mean, or the weighted sum, of sparsified deltas."""
    if op.method in SIGN_ELECTION_METHODS:
        total = np.zeros_like(deltas[0])
        for delta in deltas:
            total += delta
        majority = np.where(total >= 0, np.float32(1.0), np.float32(-1.0))
        numerator, count = np.zeros_like(total), np.zeros_like(total)
        for delta, weight in zip(deltas, weights):
            agree = np.sign(delta) == majority
            numerator += np.where(agree, delta * np.float32(weight), np.float32(0.0))
            count += agree
        return numerator / np.maximum(count, np.float32(1.0))
    total = np.zeros_like(deltas[0])
    for delta, weight in zip(deltas, weights):
        total += delta if weight == 1.0 else delta * np.float32(weight)
    return total


# ----------------------------------------------------------------------------------------- torch


def largest_mask_torch(values: torch.Tensor, k: int) -> torch.Tensor:
    """[`largest_mask`] in torch: the same entries."""
    import torch

    magnitude = values.abs().reshape(-1)
    n = magnitude.numel()
    if k <= 0 or k >= n:
        return torch.full(values.shape, k > 0, dtype=torch.bool, device=values.device)
    threshold = torch.kthvalue(magnitude, n - k + 1).values  # the k-th largest
    mask = magnitude > threshold
    missing = k - int(mask.sum())
    mask[torch.nonzero(magnitude == threshold).reshape(-1)[:missing]] = True
    return mask.reshape(values.shape)


def trim_mask_torch(method: str, delta: torch.Tensor, density: float, gamma: float | None) -> torch.Tensor:
    keep, top = trim_counts(method, delta.numel(), density, gamma)
    return largest_mask_torch(delta, keep + top) & ~largest_mask_torch(delta, top) if top else largest_mask_torch(delta, keep)


def combine_torch(op: MergeOperator, deltas: Sequence[torch.Tensor], weights: Sequence[float], masks=None) -> torch.Tensor:
    """See [`MergeOperator.combine_torch`]: [`sparsify_torch`], then [`merge_sparse_torch`]."""
    _check_lengths(deltas, weights, masks, op)
    return merge_sparse_torch(op, sparsify_torch(op, deltas, masks), weights)


def sparsify_torch(op: MergeOperator, deltas: Sequence[torch.Tensor], masks=None) -> list[torch.Tensor]:
    """[`sparsify_numpy`] in torch."""
    import torch

    zero = torch.zeros((), dtype=torch.float32, device=deltas[0].device)
    if op.method in WHOLE_TENSOR_METHODS:
        return [torch.where(trim_mask_torch(op.method, delta, op.density, op.gamma), delta, zero) for delta in deltas]
    if op.random:
        density = torch.tensor(op.density, dtype=torch.float32, device=zero.device)
        return [torch.where(mask.to(zero.device), delta / density, zero) for delta, mask in zip(deltas, masks)]
    return list(deltas)


def merge_sparse_torch(op: MergeOperator, deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """[`merge_sparse_numpy`] in torch."""
    import torch

    zero = torch.zeros((), dtype=torch.float32, device=deltas[0].device)
    if op.method in SIGN_ELECTION_METHODS:
        majority, count = _election_torch(deltas)
        numerator = torch.zeros_like(majority)
        for delta, weight in zip(deltas, weights):
            numerator += torch.where(torch.sign(delta) == majority, delta * _scalar(weight, zero), zero)
        return numerator / torch.clamp(count, min=1.0)
    total = torch.zeros_like(deltas[0])
    for delta, weight in zip(deltas, weights):
        total += delta if weight == 1.0 else delta * _scalar(weight, zero)
    return total


def elected_directions_torch(deltas: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """∂/∂w_i of [`merge_sparse_torch`] for `ties` / `dare_ties` over the vectors with a non-zero weight (`deltas`, the
    sparsified ones): the sign and the counts are elected on the unweighted deltas, so while that set of vectors is
    fixed the merge is linear in their weights, Σ_i w_i · [sign_i agrees] τ_i / max(1, #agreeing), and its derivative
    in w_i is [sign_i agrees] τ_i / max(1, #agreeing). (Where a weight reaches 0 the vector leaves the election and
    the merge jumps: the derivative holds on each side, not across.)"""
    import torch

    majority, count = _election_torch(deltas)
    count = torch.clamp(count, min=1.0)
    zero = torch.zeros((), dtype=torch.float32, device=majority.device)
    return [torch.where(torch.sign(delta) == majority, delta, zero) / count for delta in deltas]


def _election_torch(deltas: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES's elected sign per entry (+1 on ties) and the number of deltas agreeing with it."""
    import torch

    total = torch.zeros_like(deltas[0])
    for delta in deltas:
        total += delta
    majority = torch.where(total >= 0, 1.0, -1.0).to(torch.float32)
    count = torch.zeros_like(total)
    for delta in deltas:
        count += torch.sign(delta) == majority
    return majority, count


def _scalar(weight: float, like: torch.Tensor) -> torch.Tensor:
    """`weight` as a float32 0-d tensor: multiplying by it rounds `weight` to float32 first, as NumPy's
    `delta * np.float32(weight)` does (a Python float would be applied in double precision by some kernels)."""
    import torch

    return torch.tensor(weight, dtype=torch.float32, device=like.device)


def _check_lengths(deltas, weights, masks, op: MergeOperator) -> None:
    if len(deltas) == 0 or len(deltas) != len(weights):
        raise ValueError(f"Expected one weight per delta and at least one delta, got {len(deltas)} deltas and {len(weights)} weights.")
    if op.random and (masks is None or len(masks) != len(deltas)):
        raise ValueError(f"{op.method} needs one keep mask per delta (MergeOperator.keep_masks), got {None if masks is None else len(masks)}.")
