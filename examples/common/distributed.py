"""torchrun-aware process-group setup: NCCL on CUDA, gloo on CPU, a plain single process otherwise."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["DistInfo", "init_distributed", "cleanup_distributed", "seed_everything", "all_reduce_mean", "barrier",
           "is_distributed"]


@dataclass
class DistInfo:
    """Where this process sits: its global ``rank`` of ``world_size``, its ``local_rank`` on the node, its device."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool
    distributed: bool


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"init_distributed: environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise the process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

    Args:
        device: ``"auto"`` (cuda when available, else cpu), ``"cuda"`` or ``"cpu"``. On cuda every process uses
            ``cuda:LOCAL_RANK`` and the NCCL backend; on cpu the gloo backend.

    Returns:
        DistInfo. Without torchrun's variables (or WORLD_SIZE=1) a single-process DistInfo; no group is created.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cuda", "cpu"):
        raise ValueError(f"init_distributed: `device` must be 'auto', 'cuda' or 'cpu', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("init_distributed: device='cuda' was requested but CUDA is not available")
    launched = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if not launched or _env_int("WORLD_SIZE") == 1:
        local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
        dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
        if device == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(rank=0, world_size=1, local_rank=local_rank, device=dev, is_main=True, distributed=False)
    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if device == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        if device == "cuda":
            dist.init_process_group(backend=backend, device_id=dev)
        else:
            dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, is_main=rank == 0,
                    distributed=True)


def cleanup_distributed() -> None:
    """Destroy the process group if one exists (safe to call in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True when a process group with more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch (CPU and all CUDA devices) with ``seed + rank``."""
    s = int(seed) + int(rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(s)


def all_reduce_mean(t: Tensor) -> Tensor:
    """Mean of ``t`` over all processes (a new tensor); returns ``t`` unchanged when not distributed."""
    if not is_distributed():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def barrier() -> None:
    """Synchronise all processes; no-op when not distributed."""
    if is_distributed():
        dist.barrier()
