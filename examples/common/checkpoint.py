"""Atomic checkpoints and RNG-state capture for exact resumption."""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

__all__ = ["save_checkpoint", "load_checkpoint", "capture_rng_state", "restore_rng_state", "unwrap_model"]


def save_checkpoint(path: Union[str, Path], state: dict) -> None:
    """Write ``state`` with torch.save atomically.

    The data goes to a temporary file in the same directory, is flushed and fsync'ed, then ``os.replace``d onto
    ``path``; an interruption at any point leaves the previous file at ``path`` intact (and removes the temporary
    file when the failure is an exception).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(str(path.parent), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def load_checkpoint(path: Union[str, Path], map_location="cpu") -> Optional[dict]:
    """Load a checkpoint written by :func:`save_checkpoint`; None when ``path`` does not exist.

    Uses ``weights_only=False`` since checkpoints hold RNG states and optimizer/scheduler dicts: load only your
    own files.
    """
    path = Path(path)
    if not path.is_file():
        return None
    state = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(state, dict):
        raise ValueError(f"load_checkpoint: {path} does not hold a dict (got {type(state).__name__})")
    return state


def capture_rng_state() -> dict:
    """RNG states of python, numpy, torch CPU and every CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Restore what :func:`capture_rng_state` captured (CUDA states only when CUDA is available)."""
    for key in ("python", "numpy", "torch"):
        if key not in state:
            raise KeyError(f"restore_rng_state: `state` lacks the {key!r} entry")
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
        else:  # different device count: restore what fits
            for i, s in enumerate(cuda_states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s.cpu(), i)


def unwrap_model(m: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if isinstance(m, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            m = m.module
        elif hasattr(m, "_orig_mod") and isinstance(getattr(m, "_orig_mod"), nn.Module):
            m = m._orig_mod
        else:
            return m
