"""The default torch.distributed process group as evaluation sees it: which share of the work is this
process's, and sums over every rank. Without a process group (one process) every helper is a no-op,
so a single process does exactly what it did before. The rule: a helper that reduces is a collective,
every rank calls it, in the same order."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) in the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over every rank, in place (itself alone). NCCL takes CUDA tensors, gloo CPU ones:
    pass one on the device the process group's backend works on (the model's)."""
    if world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sum_counts(counts: Sequence[int]) -> list[int]:
    """Integer counts summed over every rank (as given alone), through the backend's own device."""
    if world()[1] == 1:
        return list(counts)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return all_reduce_sum(torch.tensor(counts, dtype=torch.int64, device=device)).tolist()
