"""Distributed facts in one place: rank, world size, reductions, seeding and the device.

Every helper works outside a process group too (rank 0, world size 1), so the training loop is
the same code on one process or many. Ray is not imported here: the Ray layer sets up the
process group and passes its own hooks into ``engine.fit``.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist


def is_dist() -> bool:
    """True when a torch.distributed process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank of this process; 0 outside a process group."""
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    """Number of processes in the group; 1 outside a process group."""
    return dist.get_world_size() if is_dist() else 1


def get_local_rank() -> int:
    """Rank on this node (LOCAL_RANK as set by torchrun / Ray Train); 0 otherwise."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True on rank 0, the only rank that logs, prints and writes checkpoints."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for all ranks; a no-op outside a process group."""
    if is_dist():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` across ranks in place and return it (unchanged with one process)."""
    if is_dist() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj):
    """A list with every rank's ``obj`` (picklable), indexed by rank; ``[obj]`` with one process."""
    if not is_dist() or get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(model: torch.nn.Module, src: int = 0) -> None:
    """Copy every buffer (BatchNorm running stats, ...) from rank ``src`` to all ranks.

    DDP only broadcasts buffers at the start of the next forward pass, so after the last
    training step the ranks' BatchNorm statistics differ. Validation and checkpointing would
    then use rank-specific weights; broadcasting first makes every rank hold rank 0's model.
    Pass the unwrapped module (see ``model.unwrap_model``).
    """
    if not is_dist() or get_world_size() == 1:
        return
    for buf in model.buffers():
        dist.broadcast(buf.data, src=src)


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python, numpy and torch with ``seed + rank`` and return that value.

    Ranks get different seeds so that their augmentations differ; DDP makes the initial weights
    equal anyway by broadcasting rank 0's parameters when it wraps the model.
    """
    value = int(seed) + int(rank)
    random.seed(value)
    np.random.seed(value % (2**32))
    torch.manual_seed(value)
    return value


def get_device() -> torch.device:
    """``cuda:<local rank>`` when a GPU is visible, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", get_local_rank() % torch.cuda.device_count())
    return torch.device("cpu")
