"""Checksummed atomic checkpoints, restricted (``weights_only``) loading, and RNG-state capture for exact resumption.

File layout written by :func:`save_checkpoint`: one header line ``wkd-examples-checkpoint/1 sha256=<64 hex>
size=<bytes>`` followed by the ``torch.save`` bytes of the state. :func:`read_torch_file` verifies the size and the
SHA-256 before unpickling anything, so a truncated or bit-flipped file is an error naming it (``torch.load`` itself
does not check the CRC-32 of the zip records it reads). Plain ``torch.save`` files (teachers from other code bases,
checkpoints written before the header existed) load too; their zip records' CRC-32s are checked first.

Unpickling a file can run arbitrary code. Every file is therefore read with ``weights_only=True``, with exactly the
extra types of :data:`SAFE_GLOBALS` allowed (the NumPy RNG state the trainer saves and the NumPy scalars of the
published CRD teachers); anything else is an :class:`UntrustedCheckpointError` naming the file, the types and the
opt-in (``--trust-checkpoint FILE`` / ``train.trusted_checkpoints``), which loads that one file with
``weights_only=False``.
"""
from __future__ import annotations

import glob
import hashlib
import io
import os
import pickle
import random
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable, List, Optional, Union

import numpy as np
import torch
from torch import nn

__all__ = ["save_checkpoint", "load_checkpoint", "read_torch_file", "is_trusted", "CheckpointError",
           "UntrustedCheckpointError", "SAFE_GLOBALS", "TRUST_OPT_IN", "capture_rng_state", "restore_rng_state",
           "unwrap_model"]

HEADER_TAG = b"wkd-examples-checkpoint/1"
TRUST_OPT_IN = "--trust-checkpoint {path} (config: train.trusted_checkpoints: [{path}])"
_MAX_HEADER = 256


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: truncated, corrupted, not a checkpoint (the message names the file)."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint holds Python objects that ``weights_only`` loading refuses (unpickling them can run code)."""


def _numpy_safe_globals() -> list:
    """NumPy arrays of uint32 (``np.random.get_state()`` in the trainer's RNG state) and float / int scalars (the
    ``accuracy`` entry of the published CRD teachers), under their NumPy 2 and NumPy 1 module names."""
    try:
        from numpy._core import multiarray
    except ImportError:  # NumPy 1
        from numpy.core import multiarray
    out: list = [np.dtype, np.ndarray]
    dtypes = getattr(np, "dtypes", None)  # NumPy >= 1.25 pickles a dtype through its class
    if dtypes is not None:
        out += [dtypes.UInt32DType, dtypes.Float64DType, dtypes.Float32DType, dtypes.Int64DType]
    for name in ("scalar", "_reconstruct"):
        fn = getattr(multiarray, name)
        out += [(fn, f"numpy._core.multiarray.{name}"), (fn, f"numpy.core.multiarray.{name}")]
    return out


# What weights_only loading allows beyond tensors, containers and Python scalars (torch's own allow-list, which
# covers the optimizer, scheduler, grad-scaler and torch / Python RNG states).
SAFE_GLOBALS = _numpy_safe_globals()


def is_trusted(path: Union[str, Path], trusted: Optional[Iterable[str]]) -> bool:
    """Whether ``path`` is one of the ``trusted`` files (paths compared after ``~`` expansion and resolution)."""
    p = Path(path).expanduser().resolve()
    return any(Path(t).expanduser().resolve() == p for t in (trusted or ()))


def _header(payload) -> bytes:
    return HEADER_TAG + f" sha256={hashlib.sha256(payload).hexdigest()} size={len(payload)}\n".encode()


def _remove_stale_temps(path: Path) -> None:
    """Temporary files of saves to ``path`` that a killed process left behind (no ``finally`` runs on a kill)."""
    for stale in glob.glob(os.path.join(glob.escape(str(path.parent)), f".{glob.escape(path.name)}.*.tmp")):
        try:
            os.unlink(stale)
        except OSError:
            pass


def save_checkpoint(path: Union[str, Path], state: dict) -> None:
    """Write ``state`` with torch.save behind a SHA-256 header (module docstring), atomically.

    The file goes to a temporary file in the same directory, is flushed and fsync'ed, then ``os.replace``d onto
    ``path``: an interruption at any point leaves the previous file at ``path`` intact. The temporary file is
    removed when the save fails (``finally``); one left by a killed process is removed by the next save.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getbuffer()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    replaced = False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_header(payload))
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        replaced = True
    finally:
        if not replaced:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
    try:  # make the rename itself durable
        dfd = os.open(str(path.parent), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _payload(path: Path) -> bytes:
    """The torch.save bytes of ``path``, verified: the header's size and SHA-256, or a plain torch.save zip's
    record CRC-32s."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(HEADER_TAG))
            if head != HEADER_TAG:
                data = head + f.read()
            else:
                line = f.readline(_MAX_HEADER)
                data = f.read()
                m = re.fullmatch(rb" sha256=([0-9a-f]{64}) size=(\d+)\n", line)
                if m is None:
                    raise CheckpointError(f"checkpoint {path}: damaged header line {(head + line)[:120]!r}")
                size = int(m.group(2))
                if len(data) != size:
                    raise CheckpointError(f"checkpoint {path} is {'truncated' if len(data) < size else 'too long'}"
                                          f": its header says {size} bytes of data, the file has {len(data)}")
                if hashlib.sha256(data).hexdigest() != m.group(1).decode():
                    raise CheckpointError(f"checkpoint {path} is corrupted: the SHA-256 of its data does not match "
                                          "the one recorded when it was written")
                return data
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {path} is a directory") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e}") from None
    if zipfile.is_zipfile(io.BytesIO(data)):  # torch.save's format since torch 1.6
        try:
            bad = zipfile.ZipFile(io.BytesIO(data)).testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} is corrupted ({e})") from None
        if bad is not None:
            raise CheckpointError(f"checkpoint {path} is corrupted: its record {bad} fails the CRC-32 check")
    return data


def _unsafe_globals(data: bytes, error: Exception) -> List[str]:
    """The globals of a torch.save payload that weights_only loading with :data:`SAFE_GLOBALS` refuses (found by
    reading the pickle's opcodes, nothing executed)."""
    allowed = set()
    for g in SAFE_GLOBALS:
        allowed.add(g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            found = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
    except Exception:  # not a zip payload: the first refused global is in torch's message
        found = re.findall(r"GLOBAL ([\w.]+)", str(error))
    return sorted(set(found) - allowed)


def _reason(error: Exception) -> str:
    """The specific part of torch's weights_only error (not its advice to load with weights_only=False)."""
    m = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(error))
    if m:
        return m.group(1).strip()
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return lines[0] if lines else type(error).__name__


def read_torch_file(path: Union[str, Path], *, trusted: bool = False, map_location="cpu"):
    """The object stored at ``path`` (a :func:`save_checkpoint` file or a plain ``torch.save`` file), verified.

    Loaded with ``weights_only=True`` and :data:`SAFE_GLOBALS`; ``trusted=True`` (the user's explicit opt-in for
    this file) loads with ``weights_only=False``, which can run code stored in the file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UntrustedCheckpointError: the file holds other Python objects (named, with the opt-in).
        CheckpointError: anything else (truncated, corrupted, not a torch file); every message names ``path``.
    """
    path = Path(path)
    data = _payload(path)
    try:
        if trusted:
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = [] if trusted else _unsafe_globals(data, e)
        if unsafe:
            raise UntrustedCheckpointError(
                f"checkpoint {path} holds Python objects that weights_only loading refuses ({', '.join(unsafe)}): "
                f"unpickling them could run code stored in the file, so it was not loaded. If you trust this file, "
                f"pass {TRUST_OPT_IN.format(path=path)}") from None
        raise CheckpointError(f"checkpoint {path} is not a readable torch file (unpickling failed: "
                              f"{_reason(e)})") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError, TypeError, AttributeError) as e:
        msg = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"checkpoint {path} is not a readable torch file ({type(e).__name__}: {msg})") \
            from None


def load_checkpoint(path: Union[str, Path], map_location="cpu", *, trusted: bool = False) -> Optional[dict]:
    """Load a checkpoint written by :func:`save_checkpoint` (:func:`read_torch_file`); None when ``path`` does not
    exist. Raises CheckpointError (naming the file) when it is not a dict."""
    path = Path(path)
    if not path.exists():
        return None
    state = read_torch_file(path, trusted=trusted, map_location=map_location)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict (got {type(state).__name__})")
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
        elif hasattr(m, "_orig_mod") and isinstance(m._orig_mod, nn.Module):
            m = m._orig_mod
        else:
            return m
