"""Switching one loaded model between candidate merges θ + Σ w_i Δ_i in place, and back to θ exactly.

The coefficient search scores many candidates with one model in memory. [`CandidateModel`] moves it from
one candidate to the next without reloading or copying it:

- **Dense deltas** (full vectors, and LoRA vectors with `lora_mode="update"` or on a module the adapter
  path cannot hook) are applied by adding the *difference*: `W += Σ (w'_i − w_i) Δ_i`, only for the
  vectors whose weight changed (a grid changes one coefficient at a time, so most switches read one
  delta). Deltas are held in memory as float32 when they fit in half the free memory (`cache_deltas`);
  LoRA deltas switched this way are then formed once as B·A·scaling, otherwise added as `addmm_(B, A)`
  at every switch, never stored dense. Parameters that are not float32
  keep a float32 master copy, so rounding to bf16/fp16 happens once per switch, as in a fresh merge.
  Every `RESYNC_EVERY` switches a tensor is recomputed from the base checkpoint with
  [`~dem_hf.merging.arithmetic.merge_tensor`], so float drift cannot build up over long searches.
- **LoRA factors** (`lora_mode="adapter"`) run beside their layer as a forward hook adding
  `(x @ L) * c @ R`, where `c` holds each rank's `w_i · scaling_i`: a candidate only rewrites `c`, and the
  weights are never touched. Mathematically this is the dense merge (exact up to float rounding).

**Per-group weights.** With `groups` (e.g. one per transformer block, `dem_hf.merging.groups`) the weights are
a (vectors × groups) matrix w_{i,g}: a dense tensor W of group g(W) moves by `W += Σ_i (w'_{i,g(W)} − w_{i,g(W)}) Δ_i`,
and an adapter hook (one layer, so one group) takes its group's column as its scalings. With one group
(`"vector"` granularity) this is the one-weight-per-vector switch.

**Devices.** Each touched tensor is switched on its own device (its deltas, float32 master and LoRA factors live
beside it), so a model split over several devices by a `device_map` (or by hand) keeps the exact switching;
validation batches go to the device of the input embeddings. Parameters offloaded by accelerate (to the CPU or
disk, kept in an `AlignDevicesHook`'s `weights_map` while the module's own parameter is on the `meta` device) are
refused with a `ValueError`: an in-place switch of the parameter would not reach the offloaded copy.

[`CandidateModel.restore`] copies each touched tensor back from the base checkpoint (bitwise exact) and
removes the hooks. [`CandidateModel.loss_gradients`] gives ∂ℓ_s/∂w_{i,g} for every validation set `s`: by
autograd through the hooks for adapter LoRA, and as Σ_{W∈g} ⟨∇_W ℓ_s, Δ_i⟩ for dense deltas (tensor by tensor),
so one backward pass per set gives every coefficient's derivative.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .. import logging
from ..evaluation.distributed import float64_sum, input_device, process_share, sum_across_processes
from ..evaluation.perplexity import EvaluationSet, PerplexityResult, batch_nll
from ..io.tensors import TensorSource, untied_state_dict
from ..merging.arithmetic import merge_tensor
from ..merging.groups import VECTOR_GROUP, group_names, tensor_group
from ..vectors.config import LORA_A, LORA_B
from ..vectors.vector import DistributionVector
from .adapters import (
    Adapter,
    LowRank,
    checked,
    free_memory,
    hookable,
    parameters_by_storage,
    storage_key,
    weight_owners,
)

logger = logging.get_logger(__name__)

RESYNC_EVERY = 64
_HEAD = 64


@dataclass
class _Unit:
    """One touched model tensor and the (vector index, delta) terms that change it."""

    name: str
    tensor: torch.Tensor
    dense: list[tuple[int, DistributionVector, torch.Tensor | None]] = field(default_factory=list)
    low_rank: list[tuple[int, LowRank]] = field(default_factory=list)
    master: torch.Tensor | None = None
    switches: int = 0
    group: int = 0

    @property
    def device(self) -> torch.device:
        """Where the tensor, and so everything that changes it, lives."""
        return tensor_device(self.tensor)

    def delta(self, vector: DistributionVector, cached: torch.Tensor | None) -> torch.Tensor:
        if cached is not None:
            return cached
        return checked(vector, self.name, vector.tensors.get(self.name).to(self.device, torch.float32))


def tensor_device(tensor: torch.Tensor) -> torch.device:
    """The device a model tensor lives on (one place to ask, so that tests can simulate several devices)."""
    return tensor.device


def refuse_offloaded(model: torch.nn.Module) -> None:
    """Raise a `ValueError` if accelerate offloaded any parameter (to the CPU or disk: the module's parameter is then
    on the `meta` device and the weights live in an `AlignDevicesHook`'s `weights_map`, out of in-place reach)."""
    offloaded = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise ValueError(
            f"{len(offloaded)} parameters of the model (e.g. {offloaded[0]!r}) are on the 'meta' device: offloaded by "
            "accelerate (their weights live in an AlignDevicesHook's weights_map), which in-place candidate switching "
            "cannot update. Load the base without CPU/disk offload (a device_map whose devices hold the whole model)."
        )


class CandidateModel:
    """A model switched in place between candidate merges of the same base and vectors.

    Args:
        model: the base model θ, loaded from `base` (its touched tensors are checked against it).
        base: the base checkpoint (a tensor source), used to restore θ exactly.
        vectors: the distribution vectors, in coefficient order.
        lora_mode: `"adapter"` (hooks, no weight change) or `"update"` (LoRA deltas added to the weights).
        granularity: `"vector"` (one weight per vector), `"layer"` or `"module"` (one per vector and group of
            tensors; see `dem_hf.merging.groups`). The groups, in order, are `self.groups`: those of the tensors the
            vectors change.
        cache_deltas: keep deltas in memory as float32; `None` caches when they fit in half the free memory.

    Use it as a context manager, or call [`~CandidateModel.restore`] when done.

    Example:
        ```python
        >>> with CandidateModel(model, merger.base, list(merger.vectors.values())) as candidates:
        ...     candidates.set_weights([0.5, 1.0])
        ...     compute_perplexities(model, eval_sets)
        ```
    """

    def __init__(
        self,
        model: torch.nn.Module,
        base: TensorSource,
        vectors: Sequence[DistributionVector],
        *,
        lora_mode: str = "adapter",
        cache_deltas: bool | None = None,
        granularity: str = "vector",
    ) -> None:
        self.model, self.base, self.vectors = model, base, list(vectors)
        self.granularity = granularity
        self.groups = group_names({n for v in self.vectors for n in v.target_names}, granularity) or [VECTOR_GROUP]
        self._group_index = {g: i for i, g in enumerate(self.groups)}
        self.weights = [[0.0] * len(self.groups) for _ in self.vectors]
        self.num_switches = 0
        refuse_offloaded(model)
        state = untied_state_dict(model)
        self._check_is_base(state)
        self.device = input_device(model)  # where validation batches go
        modules = dict(model.named_modules())
        owners = weight_owners(modules)
        self.adapters: list[Adapter] = []
        self.units: dict[str, _Unit] = {}
        plans: dict[str, list[tuple[int, DistributionVector]]] = {}
        for index, vector in enumerate(self.vectors):
            for name in vector.target_names:
                if name in vector.dense_names:
                    self._unit(name, state).dense.append((index, vector, None))
                if name in vector.lora_modules:
                    if lora_mode == "adapter" and hookable(name, state, modules, owners):
                        plans.setdefault(name, []).append((index, vector))
                    else:
                        unit = self._unit(name, state)
                        unit.low_rank.append((index, self._factors(vector, name, unit.device)))
        try:
            for name, terms in plans.items():
                self.adapters.append(self._adapter(name, terms, modules[name.rsplit(".", 1)[0]]))
            self._cache_deltas(cache_deltas)
        except BaseException:
            self.restore()  # nothing switched yet: only the hooks already registered need removing
            raise

    # ------------------------------------------------------------------------------------------ setup

    def _check_is_base(self, state: dict[str, torch.Tensor]) -> None:
        for name in {n for v in self.vectors for n in v.target_names}:
            if name not in state:
                raise ValueError(f"The model has no tensor {name!r}, which the vectors change; is it the base model?")
            tensor = state[name]
            expected = self.base.head(name, _HEAD).to(tensor.dtype)
            if not torch.equal(tensor.reshape(-1)[:_HEAD].cpu(), expected):
                raise ValueError(
                    f"The model's {name!r} differs from the base checkpoint's: pass the base model itself (unmerged, "
                    "loaded from the merger's base) or let the search load it."
                )

    def _unit(self, name: str, state: dict[str, torch.Tensor]) -> _Unit:
        if name not in self.units:
            tensor = state[name]
            # The master comes from the checkpoint, not the model: a base loaded in a lower precision than it was
            # saved in (bf16 from float32) would otherwise start every candidate from the rounded base.
            master = self._base_float32(name, tensor_device(tensor)) if tensor.dtype != torch.float32 else None
            self.units[name] = _Unit(name, tensor, master=master, group=self.group_of(name))
        return self.units[name]

    def group_of(self, name: str) -> int:
        """Index in `self.groups` of tensor `name`'s group."""
        return self._group_index[tensor_group(name, self.granularity)]

    def _base_float32(self, name: str, device: torch.device) -> torch.Tensor:
        return self.base.get(name).to(device, torch.float32, copy=True)

    def _factors(self, vector: DistributionVector, name: str, device: torch.device) -> LowRank:
        a = checked(vector, name + LORA_A, vector.tensors.get(name + LORA_A).to(device, torch.float32))
        b = checked(vector, name + LORA_B, vector.tensors.get(name + LORA_B).to(device, torch.float32))
        module = vector.lora_modules[name]
        return LowRank(a, b, module.scaling, module.transpose)

    def _adapter(self, name: str, terms: list[tuple[int, DistributionVector]], module: torch.nn.Module) -> Adapter:
        dtype, device = module.weight.dtype, tensor_device(module.weight)
        lefts, rights, index, scaling = [], [], [], []
        for vector_index, vector in terms:
            factors = self._factors(vector, name, device)
            # The matrix the layer multiplies by: Wᵀ for nn.Linear (y = x Wᵀ), W for Conv1D and embeddings.
            # Δ = B A, or (B A)ᵀ when transposed; so the used delta is B A exactly when these two flips agree.
            if factors.transpose == isinstance(module, torch.nn.Linear):
                left, right = factors.b, factors.a
            else:
                left, right = factors.a.T, factors.b.T
            lefts.append(left)
            rights.append(right)
            index += [vector_index] * left.shape[1]
            scaling += [factors.scaling] * left.shape[1]
        return Adapter(
            module,
            isinstance(module, torch.nn.Embedding),
            torch.cat(lefts, dim=1).to(dtype).contiguous(),
            torch.cat(rights, dim=0).to(dtype).contiguous(),
            torch.tensor(index, device=device),
            torch.tensor(scaling, device=device, dtype=torch.float32),
            self.group_of(name),
        )

    def _cache_deltas(self, cache: bool | None) -> None:
        """Hold dense deltas in memory as float32 (a switch is then one memory-bound `add_` per changed vector).

        LoRA deltas switched in place are formed once (B·A·scaling) when caching too: a rank-r `addmm_` per
        layer and candidate costs far more than adding a stored delta. Without the cache, dense deltas are
        read from their source and LoRA deltas formed from the factors at every switch.
        """
        pending = [(u, i, term) for u in self.units.values() for i, term in enumerate(u.dense)]
        if cache is None:
            needed: dict[torch.device, int] = {}  # bytes of float32 deltas per device
            for unit in self.units.values():
                terms = len(unit.dense) + len(unit.low_rank)
                needed[unit.device] = needed.get(unit.device, 0) + unit.tensor.numel() * 4 * terms
            cache = all(size <= free_memory(device) // 2 for device, size in needed.items())
            total = sum(needed.values())
            logger.info(f"{'Caching' if cache else 'Not caching'} ~{total / 2**30:.2f} GiB of deltas in memory.")
        for unit, position, (index, vector, _) in pending:
            delta = unit.delta(vector, None)  # also checks for NaN/inf once
            unit.dense[position] = (index, vector, delta if cache else None)
        if cache:
            for unit in self.units.values():
                for index, factors in unit.low_rank:
                    delta = torch.zeros(unit.tensor.shape, dtype=torch.float32, device=unit.device)
                    factors.add_to_(delta, 1.0)
                    unit.dense.append((index, self.vectors[index], delta))
                unit.low_rank = []

    # ------------------------------------------------------------------------------------------ switching

    @property
    def adapter_count(self) -> int:
        """Number of layers whose LoRA vectors run as adapters."""
        return len(self.adapters)

    def set_weights(self, weights: Sequence[float] | Sequence[Sequence[float]]) -> None:
        """Switch to θ + Σ w_{i,g(W)} Δ_i (effective weights, after any averaging), in place: `weights` holds one
        number per vector (the same on every group) or, per vector, one number per group of `self.groups`."""
        new = self._matrix(weights)
        changes = [[n - o for n, o in zip(row, old)] for row, old in zip(new, self.weights)]
        if any(any(row) for row in changes):
            with torch.no_grad():
                for unit in self.units.values():
                    self._switch_unit(unit, [row[unit.group] for row in changes], [row[unit.group] for row in new])
            weight_tensor = torch.tensor(new, device=self.device)
            for adapter in self.adapters:
                adapter.set_weights(weight_tensor)
            self.num_switches += 1
        self.weights = new

    def _matrix(self, weights) -> list[list[float]]:
        if len(weights) != len(self.vectors):
            raise ValueError(f"Expected {len(self.vectors)} weights (one per vector), got {len(weights)}.")
        rows = []
        for vector, row in zip(self.vectors, weights):
            if isinstance(row, Sequence):
                if len(row) != len(self.groups):
                    raise ValueError(
                        f"Expected {len(self.groups)} weights for vector {vector.name!r} (groups {self.groups}), got {len(row)}."
                    )
                rows.append([float(w) for w in row])
            else:
                rows.append([float(row)] * len(self.groups))
        return rows

    def _switch_unit(self, unit: _Unit, changes: list[float], new: list[float]) -> None:
        """Move one tensor by its group's weight changes (`changes[i]`, `new[i]`: vector i's, for this group)."""
        relevant = [i for i, _, _ in unit.dense] + [i for i, _ in unit.low_rank]
        if not any(changes[i] for i in relevant):
            return
        unit.switches += 1
        if unit.switches % RESYNC_EVERY == 0:
            self._resync(unit, new)
            return
        target = unit.master if unit.master is not None else unit.tensor
        for index, vector, cached in unit.dense:
            if changes[index]:
                target.add_(unit.delta(vector, cached), alpha=changes[index])
        for index, factors in unit.low_rank:
            if changes[index]:
                factors.add_to_(target, changes[index])
        if unit.master is not None:
            unit.tensor.copy_(unit.master)

    def _resync(self, unit: _Unit, weights: list[float]) -> None:
        """Recompute a tensor from the base checkpoint, as a fresh merge does (no accumulated drift)."""
        # The unit's own terms only: a LoRA vector served by an adapter hook on this layer must not enter the weight.
        own = {i for i, _, _ in unit.dense} | {i for i, _ in unit.low_rank}
        terms = [(v, weights[i]) for i, v in enumerate(self.vectors) if i in own]
        exact = merge_tensor(self._base_float32(unit.name, unit.device), unit.name, terms)
        if unit.master is not None:
            unit.master.copy_(exact)
        unit.tensor.copy_(exact)

    def restore(self) -> None:
        """Put the base weights back exactly (copied from the checkpoint) and remove the hooks."""
        with torch.no_grad():
            for unit in self.units.values():
                base = self._base_float32(unit.name, unit.device)
                unit.tensor.copy_(base)  # rounded as loading the checkpoint in this dtype rounds it
                if unit.master is not None:
                    unit.master.copy_(base)
                unit.switches = 0
        for adapter in self.adapters:
            adapter.handle.remove()
        self.adapters = []
        self.weights = [[0.0] * len(self.groups) for _ in self.vectors]

    def __enter__(self) -> CandidateModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    # ------------------------------------------------------------------------------------------ gradients

    def loss_gradients(
        self, eval_sets: Mapping[str, EvaluationSet], batch_size: int, *, batch_tokens: int | None = None
    ) -> tuple[dict[str, PerplexityResult], dict[str, list[float]]]:
        """Per-set results at the current weights and ∂ℓ_s/∂w_{i,g} as `gradients[s][i][g]` (ℓ_s: mean NLL per token
        of set s; one group, `[i][0]`, at `"vector"` granularity).

        One forward and one backward pass per batch. Dense deltas contribute ⟨∇_W ℓ_s, Δ_i⟩ (weight
        gradients are computed only for the tensors the vectors change); adapter LoRA contributes through
        autograd on the weights themselves.
        """
        params = parameters_by_storage(self.model)
        trainable = {name: p for name, p in self.model.named_parameters()}
        flags = {name: p.requires_grad for name, p in trainable.items()}
        grads_of = {}
        for name in self.units:
            key = storage_key(self.units[name].tensor)
            if key not in params:
                raise ValueError(f"{name!r} is a buffer, not a parameter; the gradient strategy cannot differentiate it.")
            grads_of[name] = params[key]
        weights = torch.tensor(self.weights, device=self.device, requires_grad=True)  # (vectors, groups)
        results, gradients = {}, {}
        modes = [(m, m.training) for m in self.model.modules()]
        try:
            for p in trainable.values():
                p.requires_grad_(False)
            for p in grads_of.values():
                p.requires_grad_(True)
            self.model.eval()
            share = process_share()  # data parallel: this process's sequences, sums reduced below
            for set_name, eval_set in eval_sets.items():
                nlls = []
                for cached in eval_set.batches(batch_size, device=self.device, max_tokens=batch_tokens, shard=share):
                    # Batches cached by compute_perplexities were built under inference_mode, which autograd
                    # refuses to save for backward: use plain copies (token ids, small).
                    batch = type(cached)(*(t.clone() if t is not None else None for t in cached))
                    for adapter in self.adapters:
                        adapter.set_weights(weights, keep_zero=True)
                    nll = batch_nll(self.model, batch)
                    (nll / eval_set.num_tokens).backward()
                    nlls.append(nll.detach())
                total = float(sum_across_processes(float64_sum(nlls)))
                results[set_name] = PerplexityResult.from_nll(total, eval_set.num_tokens, len(eval_set))
                gradients[set_name] = self._collect(weights, grads_of)
        finally:
            for name, p in trainable.items():
                p.requires_grad_(flags[name])
                p.grad = None
            for module, training in modes:
                module.training = training
            with torch.no_grad():
                for adapter in self.adapters:
                    adapter.set_weights(torch.tensor(self.weights, device=self.device))
        return results, gradients

    def _dense_directions(self, unit: _Unit) -> Iterator[tuple[int, torch.Tensor]]:
        """`(vector index, ∂W/∂w_i)` of every dense delta of `unit`: the delta itself, W being linear in the weights."""
        for index, vector, cached in unit.dense:
            yield index, unit.delta(vector, cached)

    def _collect(self, weights: torch.Tensor, grads_of: dict[str, torch.nn.Parameter]) -> list[list[float]]:
        """The (vectors × groups) gradient: the adapters' from autograd, plus Σ ⟨∇_W, Δ_i⟩ over each dense tensor W
        added to its group's column, one tensor at a time."""
        shape = (len(self.vectors), len(self.groups))
        total = weights.grad.double().cpu().clone() if weights.grad is not None else torch.zeros(shape, dtype=torch.float64)
        weights.grad = None
        with torch.no_grad():
            for name, unit in self.units.items():
                grad = grads_of[name].grad
                if grad is None:
                    continue
                grad = grad.float()
                for index, direction in self._dense_directions(unit):
                    total[index, unit.group] += float(torch.dot(grad.reshape(-1), direction.reshape(-1)))
                for index, factors in unit.low_rank:
                    total[index, unit.group] += float(factors.inner(grad))
                grads_of[name].grad = None
        return sum_across_processes(total).tolist()


