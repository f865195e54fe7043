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

[`CandidateModel.restore`] copies each touched tensor back from the base checkpoint (bitwise exact) and
removes the hooks. [`CandidateModel.loss_gradients`] gives ∂ℓ_s/∂w_i for every validation set `s`: by
autograd through the hooks for adapter LoRA, and as ⟨∇_W ℓ_s, Δ_i⟩ for dense deltas, so one backward
pass per set gives every coefficient's derivative.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from .. import logging

from ..evaluation.perplexity import EvaluationSet, PerplexityResult, batch_nll
from ..io.tensors import TensorSource, untied_state_dict
from ..merging.arithmetic import merge_tensor
from ..vectors.config import LORA_A, LORA_B
from ..vectors.vector import DistributionVector

logger = logging.get_logger(__name__)

RESYNC_EVERY = 64
_HEAD = 64


@dataclass
class _LowRank:
    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    transpose: bool

    def add_to_(self, target: torch.Tensor, weight: float) -> None:
        if self.transpose:
            target.addmm_(self.a.T, self.b.T, alpha=weight * self.scaling)
        else:
            target.addmm_(self.b, self.a, alpha=weight * self.scaling)

    def inner(self, grad: torch.Tensor) -> torch.Tensor:
        """⟨grad, Δ⟩ without forming Δ: Σ (Bᵀ G) ⊙ A (with G transposed for transposed deltas)."""
        g = grad.T if self.transpose else grad
        return (self.b.T @ g * self.a).sum() * self.scaling


@dataclass
class _Unit:
    """One touched model tensor and the (vector index, delta) terms that change it."""

    name: str
    tensor: torch.Tensor
    dense: list[tuple[int, DistributionVector, torch.Tensor | None]] = field(default_factory=list)
    low_rank: list[tuple[int, _LowRank]] = field(default_factory=list)
    master: torch.Tensor | None = None
    switches: int = 0

    def delta(self, vector: DistributionVector, cached: torch.Tensor | None) -> torch.Tensor:
        if cached is not None:
            return cached
        return _checked(vector, self.name, vector.tensors.get(self.name).to(self.tensor.device, torch.float32))


class _Adapter:
    """Forward hook adding Σ_i w_i · scaling_i · (x @ L_i) @ R_i to one layer's output.

    The factors of all vectors on the layer are concatenated along the rank, so one pair of skinny matmuls
    serves every vector. Outside autograd the per-rank scale is folded into `L` once per candidate and the
    product is accumulated into the layer's fresh output in place (`addmm_`: no extra allocation).
    """

    def __init__(self, module: torch.nn.Module, embedding: bool, left, right, index, scaling) -> None:
        self.embedding = embedding
        self.left, self.right = left, right  # (in or num, R) and (R, out)
        self.index, self.scaling = index, scaling  # (R,) vector index and LoRA scaling of each rank
        self.scale: torch.Tensor | None = None
        self.scaled_left: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def set_weights(self, weights: torch.Tensor, *, keep_zero: bool = False) -> None:
        """Scale of each rank from the vectors' weights; all-zero weights skip the layer unless `keep_zero`
        (gradients at ω = 0 need the adapter in the graph)."""
        rows = weights[self.index]
        if not (keep_zero or bool((rows != 0).any())):
            self.scale = self.scaled_left = None
            return
        self.scale = (rows * self.scaling).to(self.left.dtype)
        self.scaled_left = None if self.scale.requires_grad else self.left * self.scale

    def _hook(self, module, args, kwargs, output):
        if self.scale is None:
            return output
        x = args[0] if args else kwargs["input"]
        tracked = self.scaled_left is None  # the scale carries a gradient
        left = self.left if tracked else self.scaled_left
        if self.embedding:
            hidden = F.embedding(x.reshape(-1), left)
        else:
            hidden = x.reshape(-1, x.shape[-1]).to(left.dtype) @ left
        if tracked:
            hidden = hidden * self.scale
        flat = output.reshape(-1, output.shape[-1])
        if tracked or torch.is_grad_enabled() or flat.dtype != hidden.dtype or flat.data_ptr() != output.data_ptr():
            return torch.addmm(flat.to(hidden.dtype), hidden, self.right).to(output.dtype).view(output.shape)
        flat.addmm_(hidden, self.right)  # the layer's own fresh output: accumulate in place
        return output


class CandidateModel:
    """A model switched in place between candidate merges of the same base and vectors.

    Args:
        model: the base model θ, loaded from `base` (its touched tensors are checked against it).
        base: the base checkpoint (a tensor source), used to restore θ exactly.
        vectors: the distribution vectors, in coefficient order.
        lora_mode: `"adapter"` (hooks, no weight change) or `"update"` (LoRA deltas added to the weights).
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
    ) -> None:
        self.model, self.base, self.vectors = model, base, list(vectors)
        self.weights = [0.0] * len(self.vectors)
        self.num_switches = 0
        state = untied_state_dict(model)
        self._check_is_base(state)
        self.device = next(iter(state.values())).device if state else torch.device("cpu")
        modules = dict(model.named_modules())
        owners = _weight_owners(modules)
        self.adapters: list[_Adapter] = []
        self.units: dict[str, _Unit] = {}
        plans: dict[str, list[tuple[int, DistributionVector]]] = {}
        for index, vector in enumerate(self.vectors):
            for name in vector.target_names:
                if name in vector.dense_names:
                    self._unit(name, state).dense.append((index, vector, None))
                if name in vector.lora_modules:
                    if lora_mode == "adapter" and _hookable(name, state, modules, owners):
                        plans.setdefault(name, []).append((index, vector))
                    else:
                        self._unit(name, state).low_rank.append((index, self._factors(vector, name)))
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
            master = tensor.to(torch.float32, copy=True) if tensor.dtype != torch.float32 else None
            self.units[name] = _Unit(name, tensor, master=master)
        return self.units[name]

    def _factors(self, vector: DistributionVector, name: str) -> _LowRank:
        a = _checked(vector, name + LORA_A, vector.tensors.get(name + LORA_A).to(self.device, torch.float32))
        b = _checked(vector, name + LORA_B, vector.tensors.get(name + LORA_B).to(self.device, torch.float32))
        module = vector.lora_modules[name]
        return _LowRank(a, b, module.scaling, module.transpose)

    def _adapter(self, name: str, terms: list[tuple[int, DistributionVector]], module: torch.nn.Module) -> _Adapter:
        dtype = module.weight.dtype
        lefts, rights, index, scaling = [], [], [], []
        for vector_index, vector in terms:
            factors = self._factors(vector, name)
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
        return _Adapter(
            module,
            isinstance(module, torch.nn.Embedding),
            torch.cat(lefts, dim=1).to(dtype).contiguous(),
            torch.cat(rights, dim=0).to(dtype).contiguous(),
            torch.tensor(index, device=self.device),
            torch.tensor(scaling, device=self.device, dtype=torch.float32),
        )

    def _cache_deltas(self, cache: bool | None) -> None:
        """Hold dense deltas in memory as float32 (a switch is then one memory-bound `add_` per changed vector).

        LoRA deltas switched in place are formed once (B·A·scaling) when caching too: a rank-r `addmm_` per
        layer and candidate costs far more than adding a stored delta. Without the cache, dense deltas are
        read from their source and LoRA deltas formed from the factors at every switch.
        """
        pending = [(u, i, term) for u in self.units.values() for i, term in enumerate(u.dense)]
        if cache is None:
            count = len(pending) + sum(len(u.low_rank) for u in self.units.values())
            needed = sum(u.tensor.numel() * 4 for u in self.units.values()) * count // max(len(self.units), 1)
            cache = needed <= _free_memory(self.device) // 2
            logger.info(f"{'Caching' if cache else 'Not caching'} ~{needed / 2**30:.2f} GiB of deltas in memory.")
        for unit, position, (index, vector, _) in pending:
            delta = unit.delta(vector, None)  # also checks for NaN/inf once
            unit.dense[position] = (index, vector, delta if cache else None)
        if cache:
            for unit in self.units.values():
                for index, factors in unit.low_rank:
                    delta = torch.zeros(unit.tensor.shape, dtype=torch.float32, device=self.device)
                    factors.add_to_(delta, 1.0)
                    unit.dense.append((index, self.vectors[index], delta))
                unit.low_rank = []

    # ------------------------------------------------------------------------------------------ switching

    @property
    def adapter_count(self) -> int:
        """Number of layers whose LoRA vectors run as adapters."""
        return len(self.adapters)

    def set_weights(self, weights: Sequence[float]) -> None:
        """Switch to θ + Σ weights[i] · Δ_i (effective weights, after any averaging), in place."""
        if len(weights) != len(self.vectors):
            raise ValueError(f"Expected {len(self.vectors)} weights, got {len(weights)}.")
        new = [float(w) for w in weights]
        changes = [n - o for n, o in zip(new, self.weights)]
        if any(changes):
            with torch.no_grad():
                for unit in self.units.values():
                    self._switch_unit(unit, changes, new)
            weight_tensor = torch.tensor(new, device=self.device)
            for adapter in self.adapters:
                adapter.set_weights(weight_tensor)
            self.num_switches += 1
        self.weights = new

    def _switch_unit(self, unit: _Unit, changes: list[float], new: list[float]) -> None:
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
        terms = [(v, weights[i]) for i, v in enumerate(self.vectors) if v.changes(unit.name)]
        exact = merge_tensor(self.base.get(unit.name).to(self.device, torch.float32), unit.name, terms)
        if unit.master is not None:
            unit.master.copy_(exact)
        unit.tensor.copy_(exact)

    def restore(self) -> None:
        """Put the base weights back exactly (copied from the checkpoint) and remove the hooks."""
        with torch.no_grad():
            for unit in self.units.values():
                unit.tensor.copy_(self.base.get(unit.name))
                if unit.master is not None:
                    unit.master.copy_(unit.tensor)
                unit.switches = 0
        for adapter in self.adapters:
            adapter.handle.remove()
        self.adapters = []
        self.weights = [0.0] * len(self.vectors)

    def __enter__(self) -> CandidateModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    # ------------------------------------------------------------------------------------------ gradients

    def loss_gradients(
        self, eval_sets: Mapping[str, EvaluationSet], batch_size: int
    ) -> tuple[dict[str, PerplexityResult], dict[str, list[float]]]:
        """Per-set results at the current weights and ∂ℓ_s/∂w_i (ℓ_s: mean NLL per token of set s).

        One forward and one backward pass per batch. Dense deltas contribute ⟨∇_W ℓ_s, Δ_i⟩ (weight
        gradients are computed only for the tensors the vectors change); adapter LoRA contributes through
        autograd on the weights themselves.
        """
        params = _parameters_by_storage(self.model)
        trainable = {name: p for name, p in self.model.named_parameters()}
        flags = {name: p.requires_grad for name, p in trainable.items()}
        grads_of = {}
        for name in self.units:
            key = _storage_key(self.units[name].tensor)
            if key not in params:
                raise ValueError(f"{name!r} is a buffer, not a parameter; the gradient strategy cannot differentiate it.")
            grads_of[name] = params[key]
        weights = torch.tensor(self.weights, device=self.device, requires_grad=True)
        results, gradients = {}, {}
        modes = [(m, m.training) for m in self.model.modules()]
        try:
            for p in trainable.values():
                p.requires_grad_(False)
            for p in grads_of.values():
                p.requires_grad_(True)
            self.model.eval()
            for set_name, eval_set in eval_sets.items():
                total = 0.0
                for cached in eval_set.batches(batch_size, device=self.device):
                    # Batches cached by compute_perplexities were built under inference_mode, which autograd
                    # refuses to save for backward: use plain copies (token ids, small).
                    batch = type(cached)(*(t.clone() if t is not None else None for t in cached))
                    for adapter in self.adapters:
                        adapter.set_weights(weights, keep_zero=True)
                    nll = batch_nll(self.model, batch)
                    (nll / eval_set.num_tokens).backward()
                    total += float(nll.detach())
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

    def _collect(self, weights: torch.Tensor, grads_of: dict[str, torch.nn.Parameter]) -> list[float]:
        total = weights.grad.double().clone() if weights.grad is not None else torch.zeros(len(self.vectors), dtype=torch.float64)
        weights.grad = None
        with torch.no_grad():
            for name, unit in self.units.items():
                grad = grads_of[name].grad
                if grad is None:
                    continue
                grad = grad.float()
                for index, vector, cached in unit.dense:
                    total[index] += float(torch.dot(grad.reshape(-1), unit.delta(vector, cached).reshape(-1)))
                for index, factors in unit.low_rank:
                    total[index] += float(factors.inner(grad))
                grads_of[name].grad = None
        return total.tolist()


# ---------------------------------------------------------------------------------------------- helpers


def _checked(vector: DistributionVector, name: str, tensor: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(tensor).all():
        raise ValueError(f"Vector {vector.name!r} has NaN or infinite values in {name!r}; refusing to merge it.")
    return tensor


def _storage_key(tensor: torch.Tensor) -> tuple[int, int, tuple[int, ...]]:
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)


def _parameters_by_storage(model: torch.nn.Module) -> dict[tuple, torch.nn.Parameter]:
    return {_storage_key(p): p for p in model.parameters()}


def _weight_owners(modules: dict[str, torch.nn.Module]) -> dict[tuple, int]:
    """How many modules hold each weight tensor (tied weights are held by two)."""
    owners: dict[tuple, int] = {}
    for module in modules.values():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            key = _storage_key(weight)
            owners[key] = owners.get(key, 0) + 1
    return owners


def _hookable(name: str, state, modules: dict[str, torch.nn.Module], owners: dict[tuple, int]) -> bool:
    """Whether a LoRA delta on `name` can run as an adapter hook: the weight of a plain Linear, Conv1D or
    Embedding layer, used by that layer alone (a tied weight also feeds another layer)."""
    from transformers.pytorch_utils import Conv1D

    module_name, _, attribute = name.rpartition(".")
    module = modules.get(module_name)
    if attribute != "weight" or module is None or type(module) not in (torch.nn.Linear, torch.nn.Embedding, Conv1D):
        return False
    if isinstance(module, torch.nn.Embedding) and module.max_norm is not None:
        return False
    key = _storage_key(module.weight)
    return key == _storage_key(state[name]) and owners.get(key, 0) == 1


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return 1 << 62
    return psutil.virtual_memory().available
