"""Where evaluation runs: the device a model's inputs go to, and data-parallel sharing across processes.

Under `accelerate launch` (or `torchrun`), once `torch.distributed` is initialised with more than one process,
[`process_share`] gives this process's `(rank, world_size)`: each process evaluates the sequences `rank,
rank + world_size, ...` of every validation set (they are sorted by length, so the shares are balanced), and
[`sum_across_processes`] all-reduces the token-weighted NLL sums (and gradients), so that every process ends with
the same numbers. With one process (or none initialised) both are no-ops.

A process group is formed by whoever starts the run: `accelerate.PartialState()` (which
[`~dem_hf.search.run.run_search`] calls when the launcher set `WORLD_SIZE` above 1), an `Accelerator`, or
`torch.distributed.init_process_group`.
"""

from __future__ import annotations

import torch

__all__ = ["float64_sum", "input_device", "process_share", "sum_across_processes"]


def process_share() -> tuple[int, int]:
    """`(rank, world_size)` of this process in the initialised process group, `(0, 1)` without one.

    Example:
        ```python
        >>> rank, world_size = process_share()
        >>> my_batches = eval_set.batches(8, shard=(rank, world_size))
        ```
    """
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_rank(), distributed.get_world_size()
    return 0, 1


def sum_across_processes(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the processes of the group (every process gets the same bits), on `tensor`'s device; the
    same tensor without a group of more than one process. The reduction runs on the current CUDA device under NCCL,
    else on the CPU (gloo), so float64 sums kept on the CPU work with either backend.

    Example:
        ```python
        >>> total_nll = sum_across_processes(torch.tensor([local_nll], dtype=torch.float64))
        ```
    """
    if process_share()[1] == 1:
        return tensor
    nccl = torch.distributed.get_backend() == "nccl"
    work = tensor.to(torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu", copy=True)
    torch.distributed.all_reduce(work, op=torch.distributed.ReduceOp.SUM)
    return work.to(tensor.device)


def float64_sum(values: list[torch.Tensor]) -> torch.Tensor:
    """The float64 sum, on the CPU, of scalar tensors on any device (MPS has no float64): one transfer at the end,
    so a loop over batches never waits for the accelerator."""
    if not values:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack([v.detach().float().to(values[0].device) for v in values]).cpu().double().sum()


def input_device(model: torch.nn.Module) -> torch.device:
    """The device a model's token ids go to: its input embeddings' (the first device of a model split over several
    by a `device_map`), else its `device` attribute, else its first parameter's, else the CPU.

    Example:
        ```python
        >>> batches = eval_set.batches(8, device=input_device(model))
        ```
    """
    embeddings = None
    if hasattr(model, "get_input_embeddings"):
        try:
            embeddings = model.get_input_embeddings()
        except (NotImplementedError, AttributeError):
            embeddings = None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        return weight.device
    device = getattr(model, "device", None)
    if isinstance(device, torch.device) and device.type != "meta":
        return device
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")
