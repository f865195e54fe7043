"""Candidate switching for a merge operator other than task arithmetic (see [`dem_hf.merging.operators`]).

Every operator splits into a part that does not depend on the weights (each delta trimmed, or randomly dropped
and rescaled: `sparsify_torch`) and a weighted part (`merge_sparse_torch`). [`OperatorCandidateModel`] keeps the
sparsified deltas of every touched tensor in memory for the current density, rebuilt when the density changes:

- `dare_linear` and `breadcrumbs` are then linear in ω: the sparsified deltas replace the raw ones in
  [`CandidateModel`]'s exact in-place switching, resynchronisation and gradients (⟨∇θ L, sparsified Δ_i⟩);
- `ties` and `dare_ties` elect a sign per entry among the vectors with a non-zero weight (on the unweighted
  deltas), so each touched tensor whose weights changed is recomputed from the base checkpoint. While the set of
  vectors with a non-zero weight is fixed they are linear in ω too, Σ_i ω_i [sign_i agrees] Δ_i / #agreeing: the
  gradient uses those directions (`elected_directions_torch`, formed per tensor when needed). A vector at weight 0
  is absent, and entering the election makes the merge jump, so its gradient is reported as 0 (only the per-group
  fit's pull toward its start can move it back in).

LoRA vectors are switched as dense deltas (B·A·scaling formed once per tensor): a sparsified delta has no
low-rank form. Memory: one float32 copy of every vector's delta of every touched tensor, plus the sparsified copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import torch

from ..io.tensors import TensorSource
from ..merging.operators import (
    SIGN_ELECTION_METHODS,
    MergeOperator,
    elected_directions_torch,
    merge_sparse_torch,
    sparsify_torch,
)
from ..vectors.vector import DistributionVector
from .candidates import CandidateModel, _Unit


class OperatorCandidateModel(CandidateModel):
    """A [`CandidateModel`] whose candidates are θ + op(Δ, w) for a merge `operator`, at a density that can change.

    Args:
        model, base, vectors, granularity: as for [`CandidateModel`] (per-group weights: each tensor's group's
            weights enter the operator, as in the streaming merge).
        operator: the merge operator (not task arithmetic); its density is the starting one.

    Example:
        ```python
        >>> with OperatorCandidateModel(model, merger.base, vectors, MergeOperator("dare_linear", density=0.5)) as c:
        ...     c.set_density(0.3)
        ...     c.set_weights([0.5, 1.0])
        ```
    """

    def __init__(
        self,
        model: torch.nn.Module,
        base: TensorSource,
        vectors: Sequence[DistributionVector],
        operator: MergeOperator,
        *,
        granularity: str = "vector",
    ) -> None:
        if operator.is_task_arithmetic:
            raise ValueError("OperatorCandidateModel is for merge operators other than task_arithmetic; use CandidateModel.")
        super().__init__(model, base, vectors, lora_mode="update", cache_deltas=True, granularity=granularity)
        self.operator = operator
        # The raw deltas, in vector order per tensor (CandidateModel's cache holds the sparsified ones).
        self.raw = {name: sorted(unit.dense, key=lambda term: term[0]) for name, unit in self.units.items()}
        self._sparsify()

    @property
    def linear(self) -> bool:
        """Whether candidates are linear in the weights (no sign election)."""
        return self.operator.method not in SIGN_ELECTION_METHODS

    def set_density(self, density: float) -> None:
        """Switch to another density (validated like `DEMConfig.density`): the sparsified deltas are rebuilt and
        every touched tensor recomputed at the current weights."""
        if density == self.operator.density:
            return
        self.operator = dataclasses.replace(self.operator, density=density)
        self._sparsify()
        with torch.no_grad():
            for unit in self.units.values():
                self._resync(unit, [row[unit.group] for row in self.weights])

    def _sparsify(self) -> None:
        for name, terms in self.raw.items():
            unit = self.units[name]
            shape = tuple(unit.tensor.shape)
            masks = self.operator.keep_masks(name, [vector.name for _, vector, _ in terms], 0, shape)
            masks = None if masks is None else [torch.from_numpy(mask) for mask in masks]
            sparse = sparsify_torch(self.operator, [delta for _, _, delta in terms], masks)
            unit.dense = [(index, vector, delta) for (index, vector, _), delta in zip(terms, sparse)]

    def _switch_unit(self, unit: _Unit, changes: list[float], new: list[float]) -> None:
        if self.linear:
            super()._switch_unit(unit, changes, new)
        elif any(changes[index] for index, _, _ in unit.dense):
            self._resync(unit, new)

    def _resync(self, unit: _Unit, weights: list[float]) -> None:
        """θ + op(Δ, w) for one tensor from the base checkpoint, with the streaming merge's order: the vectors
        with a non-zero weight combined in float32, the base added last, rounded once."""
        active = [(delta, weights[index]) for index, _, delta in unit.dense if weights[index] != 0.0]
        exact = self._base_float32(unit.name, unit.device)
        if active:
            exact = merge_sparse_torch(self.operator, [d for d, _ in active], [w for _, w in active]).add_(exact)
        if unit.master is not None:
            unit.master.copy_(exact)
        unit.tensor.copy_(exact)

    def _dense_directions(self, unit: _Unit) -> Iterator[tuple[int, torch.Tensor]]:
        if self.linear:
            yield from super()._dense_directions(unit)
            return
        active = [(index, delta) for index, _, delta in unit.dense if self.weights[index][unit.group] != 0.0]
        if active:
            yield from zip([index for index, _ in active], elected_directions_torch([delta for _, delta in active]))
