"""The pieces [`~dem_hf.search.candidates.CandidateModel`] switches: LoRA factors added in place ([`LowRank`]),
LoRA adapter hooks whose per-rank scale is the candidate's weight ([`Adapter`]), and helpers to find which
weights a hook can serve.

An adapter hook belongs to one layer, so to one group of tensors (`dem_hf.merging.groups`): with per-group
coefficients its ranks are scaled by the weights of that group's column, exactly as a merge of that layer would be.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..vectors.vector import DistributionVector


@dataclass
class LowRank:
    """A LoRA delta kept as its factors: Δ = B·A·scaling (transposed for Conv1D-style weights)."""

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


class Adapter:
    """Forward hook adding Σ_i w_i · scaling_i · (x @ L_i) @ R_i to one layer's output.

    The factors of all vectors on the layer are concatenated along the rank, so one pair of skinny matmuls
    serves every vector. Outside autograd the per-rank scale is folded into `L` once per candidate and the
    product is accumulated into the layer's fresh output in place (`addmm_`: no extra allocation).
    """

    def __init__(self, module: torch.nn.Module, embedding: bool, left, right, index, scaling, group: int = 0) -> None:
        self.embedding, self.group = embedding, group  # group: the column of the weight matrix this layer uses
        self.left, self.right = left, right  # (in or num, R) and (R, out)
        self.index, self.scaling = index, scaling  # (R,) vector index and LoRA scaling of each rank
        self.scale: torch.Tensor | None = None
        self.scaled_left: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def set_weights(self, weights: torch.Tensor, *, keep_zero: bool = False) -> None:
        """Scale of each rank from the (vectors × groups) weights' column of this layer's group; all-zero weights
        skip the layer unless `keep_zero` (gradients at ω = 0 need the adapter in the graph)."""
        rows = weights.to(self.index.device)[:, self.group][self.index]  # this layer's device (differentiable)
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


def checked(vector: DistributionVector, name: str, tensor: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(tensor).all():
        raise ValueError(f"Vector {vector.name!r} has NaN or infinite values in {name!r}; refusing to merge it.")
    return tensor


def storage_key(tensor: torch.Tensor) -> tuple[int, int, tuple[int, ...]]:
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)


def parameters_by_storage(model: torch.nn.Module) -> dict[tuple, torch.nn.Parameter]:
    return {storage_key(p): p for p in model.parameters()}


def weight_owners(modules: dict[str, torch.nn.Module]) -> dict[tuple, int]:
    """How many modules hold each weight tensor (tied weights are held by two)."""
    owners: dict[tuple, int] = {}
    for module in modules.values():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            key = storage_key(weight)
            owners[key] = owners.get(key, 0) + 1
    return owners


def hookable(name: str, state, modules: dict[str, torch.nn.Module], owners: dict[tuple, int]) -> bool:
    """Whether a LoRA delta on `name` can run as an adapter hook: the weight of a plain Linear, Conv1D or
    Embedding layer, used by that layer alone (a tied weight also feeds another layer)."""
    from transformers.pytorch_utils import Conv1D

    module_name, _, attribute = name.rpartition(".")
    module = modules.get(module_name)
    if attribute != "weight" or module is None or type(module) not in (torch.nn.Linear, torch.nn.Embedding, Conv1D):
        return False
    if isinstance(module, torch.nn.Embedding) and module.max_norm is not None:
        return False
    key = storage_key(module.weight)
    return key == storage_key(state[name]) and owners.get(key, 0) == 1


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return 1 << 62
    return psutil.virtual_memory().available
