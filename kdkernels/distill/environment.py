"""Where a run executes: its device and data-parallel rank (the process group is initialised under ``torchrun``),
sums over the ranks, and the seeds of the run's random streams.

Random draws of a run are functions of integer keys, so that a resumed run and every rank recreate them: the
samplers draw from ``(seed, epoch)``; the other streams add a stream id, ``(seed, stream, epoch, ...)``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

from kdkernels.distributed import rank_and_world_size

MIXUP_STREAM, LOADER_STREAM, VIEW_STREAM, SOURCE_STREAM, META_STREAM = 1, 2, 3, 4, 5  # keep these draws apart from the samplers' (seed, epoch) streams


@dataclasses.dataclass
class Environment:
    device: torch.device
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def set_up_environment(device_name: str) -> Environment:
    """The device (``"auto"``: CUDA when available) and the data-parallel rank; initialises the process group under
    torchrun (WORLD_SIZE > 1): nccl on CUDA, gloo on CPU."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or (dist.is_available() and dist.is_initialized())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    name = device_name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if distributed else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world_size = rank_and_world_size()
    return Environment(device, rank, world_size)


def all_reduce_sum(values: Sequence[float], device: torch.device, world_size: int) -> list[float]:
    """Sums of ``values`` over the data-parallel ranks (the values themselves in one process)."""
    if world_size == 1:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_tensors(tensors: Sequence[torch.Tensor], world_size: int) -> list[torch.Tensor]:
    """Sums over the data-parallel ranks of float64 ``tensors`` (on the run's device; one all-reduce of their
    concatenation), or the tensors themselves in one process. Every rank passes the same shapes in the same order."""
    if world_size == 1 or not tensors:
        return list(tensors)
    flat = torch.cat([tensor.reshape(-1).to(torch.float64) for tensor in tensors])
    dist.all_reduce(flat)
    return [part.view(tensor.shape) for part, tensor in zip(flat.split([t.numel() for t in tensors]), tensors)]


def all_gather_objects(value, world_size: int) -> list:
    """``value`` of every rank, in rank order (``[value]`` in one process); a collective under DDP."""
    if world_size == 1:
        return [value]
    values: list = [None] * world_size
    dist.all_gather_object(values, value)
    return values


def barrier(world_size: int) -> None:
    """Waits for every rank (nothing in one process)."""
    if world_size > 1:
        dist.barrier()


def stream_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (per-epoch generators that a resumed run recreates identically)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> np.uint64(1))
