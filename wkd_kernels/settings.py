"""The package's defaults: one settings object, read from the environment once, overridable per call or per block.

Every public op and loss takes ``backend=`` and ``precision=`` (and ``check_values=``) arguments; ``None`` (their
default) means "the current setting". The current settings start from the environment when ``wkd_kernels`` is
imported (the only place the package reads these variables) and can be changed for a block of code::

    import wkd_kernels as wk
    with wk.settings.override(backend="triton", sinkhorn_precision="tf32x3"):
        loss = criterion(student_logits, teacher_logits, target)
    wk.settings.current()              # Settings(backend='auto', ...)
    wk.settings.set_defaults(check_values=True)   # for the rest of the process

``override`` is a context manager over a :class:`contextvars.ContextVar`, so it is local to the thread (and asyncio
task) that enters it. A CUDA graph or a ``torch.compile`` graph keeps the choices it was captured with.

Fields (environment variable, default):

* ``backend`` (``WKD_BACKEND``, ``"auto"``): which kernels run the ops. ``"torch"``: ATen ops only
  (wkd_kernels/aten/), tensors of any device type (CPU, CUDA, MPS, XPU, meta); always installed. ``"cpu"``: the
  C++ CPU kernels (CPU tensors only; needs the compiled extension); ``"triton"``: the Triton kernels (CUDA tensors;
  CPU tensors under ``TRITON_INTERPRET=1``); ``"cuda"``: the hand-written CUDA C++ kernels (Sinkhorn only; needs a
  build with CUDA). ``"auto"``: :func:`auto_backend` -- the C++ kernels on CPU tensors when the extension is built,
  else ``"torch"``; ``"torch"`` on every other device type until bench/gpu_suite.sh has measured a fused backend
  correct and faster there (:data:`MEASURED_FUSED`, empty so far). The fused GPU kernels (``"triton"``, ``"cuda"``)
  stay one argument away; **they are not yet validated on GPU hardware**.
* ``sinkhorn_precision`` (``WKD_SINKHORN_PRECISION``, ``"ieee"``): ``tl.dot`` input precision of the Triton
  Sinkhorn kernels for float32: ``"ieee"`` (float32 FMA), ``"tf32x3"`` (tensor cores, near-float32 accuracy),
  ``"tf32"`` (fastest, ~1e-4 relative on WKD-L's value; docs/precision.md). float64 is always IEEE.
* ``gaussian_precision`` (``WKD_GAUSSIAN_PRECISION``, ``"ieee"``): the same for the Triton square-root, polar and
  Lyapunov kernels of WKD-F: ``"ieee"`` or ``"tf32x3"``.
* ``check_values`` (``WKD_CHECK_VALUES``, off): also run the checks that read the data (non-finite entries,
  negative masses, PSD-ness, underflow of K) on CUDA tensors, where they synchronise with the device. They always
  run on CPU tensors. Without them, input outside an op's domain gives an unchecked result: for example an
  indefinite covariance whose trace is positive gives :func:`wkd_kernels.bures_wasserstein` a wrong squared
  distance, possibly negative, as its negative eigenvalues are clamped to 0 in the roots (a negative trace gives NaN).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import os
from typing import Iterator, Optional

import torch

__all__ = ["Settings", "TRITON_INTERPRET", "current", "override", "set_defaults", "BACKENDS", "SINKHORN_PRECISIONS",
           "GAUSSIAN_PRECISIONS", "resolve_precision", "auto_backend", "MEASURED_FUSED"]

BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")
# Device type -> the fused backend that bench/gpu_suite.sh has measured correct and faster than "torch" on it. Empty:
# no GPU has run the suite yet, so "auto" runs "torch" on every device type but CPU.
MEASURED_FUSED: dict = {}
SINKHORN_PRECISIONS = ("ieee", "tf32x3", "tf32")
GAUSSIAN_PRECISIONS = ("ieee", "tf32x3")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The defaults the ops and losses use where an argument is ``None`` (see the module docstring)."""

    backend: str = "auto"
    sinkhorn_precision: str = "ieee"
    gaussian_precision: str = "ieee"
    check_values: bool = False

    def __post_init__(self):
        _check_choice(self.backend, BACKENDS, "backend", "wkd_kernels.settings")
        _check_choice(self.sinkhorn_precision, SINKHORN_PRECISIONS, "sinkhorn_precision", "wkd_kernels.settings")
        _check_choice(self.gaussian_precision, GAUSSIAN_PRECISIONS, "gaussian_precision", "wkd_kernels.settings")
        if not isinstance(self.check_values, bool):
            raise TypeError(f"wkd_kernels.settings: `check_values` must be True or False, got {self.check_values!r}")


def _check_choice(value, choices, name: str, where: str) -> None:
    if value not in choices:
        raise ValueError(f"{where}: `{name}` must be one of {choices}, got {value!r}")


def _from_environment(environ=os.environ) -> Settings:
    def flag(var: str) -> bool:
        raw = environ.get(var, "").strip().lower()
        if raw in _TRUE:
            return True
        if raw in _FALSE:
            return False
        raise ValueError(f"{var} must be one of {_TRUE + _FALSE[:-1]}, got {raw!r}")

    def choice(var: str, choices, default: str) -> str:
        raw = environ.get(var, default).strip().lower()
        if raw not in choices:
            raise ValueError(f"{var} must be one of {choices}, got {raw!r}")
        return raw

    return Settings(backend=choice("WKD_BACKEND", BACKENDS, "auto"),
                    sinkhorn_precision=choice("WKD_SINKHORN_PRECISION", SINKHORN_PRECISIONS, "ieee"),
                    gaussian_precision=choice("WKD_GAUSSIAN_PRECISION", GAUSSIAN_PRECISIONS, "ieee"),
                    check_values=flag("WKD_CHECK_VALUES"))


# Triton's own switch (read by Triton when it is imported): its kernels then run on CPU tensors, interpreted.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip() == "1"
_DEFAULTS = [_from_environment()]  # the process-wide defaults (the one environment read)
# The active override blocks of this thread / task, innermost last: (entry id, settings) pairs. A block removes its own
# entry on exit, wherever it is, so blocks exited out of order (interleaved generators, manual __exit__) still leave
# the defaults behind once all have exited.
_OVERRIDE: contextvars.ContextVar[tuple] = contextvars.ContextVar("wkd_kernels_settings", default=())


def current() -> Settings:
    """The settings in effect here: the innermost :func:`override`, else the process defaults.

    Inside a ``torch.compile`` trace the settings are read once, when the graph is traced, and are constants of that
    graph (Dynamo cannot trace :class:`contextvars.ContextVar` on every supported torch, and a graph must not change
    its kernels behind the compiler's back): a compiled function keeps the settings it was compiled under, like a
    CUDA graph. Pass ``backend=`` / ``precision=`` explicitly, or compile inside the ``override`` block, to choose.
    """
    if _is_compiling():
        return Settings(*_current_fields_for_trace())
    return _current_eager()


def _current_eager() -> Settings:
    active = _OVERRIDE.get()
    return active[-1][1] if active else _DEFAULTS[0]


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


@torch.compiler.assume_constant_result
def _current_fields_for_trace() -> tuple:
    """The current settings as a tuple of constants; Dynamo calls this at trace time and bakes the result in."""
    s = _current_eager()
    return tuple(getattr(s, f.name) for f in dataclasses.fields(Settings))


def _replace(base: Settings, changes: dict, where: str) -> Settings:
    names = [f.name for f in dataclasses.fields(Settings)]
    for key in changes:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"{where}: unknown setting {key!r} (settings: {names}){hint}")
    return dataclasses.replace(base, **changes)


@contextlib.contextmanager
def override(**changes) -> Iterator[Settings]:
    """Change some settings inside a ``with`` block (thread- and task-local); yields the settings in effect."""
    new = _replace(current(), changes, "wkd_kernels.settings.override")
    entry = (object(), new)
    _OVERRIDE.set(_OVERRIDE.get() + (entry,))
    try:
        yield new
    finally:
        _OVERRIDE.set(tuple(e for e in _OVERRIDE.get() if e[0] is not entry[0]))


def set_defaults(**changes) -> Settings:
    """Change the process-wide defaults (what :func:`current` returns outside any :func:`override`); returns them."""
    _DEFAULTS[0] = _replace(_DEFAULTS[0], changes, "wkd_kernels.settings.set_defaults")
    return _DEFAULTS[0]


def auto_backend(device_type: str, has_c_ext: bool) -> str:
    """The rule of ``backend="auto"`` (the one place it is stated): on CPU tensors the C++ kernels when the
    extension is built (``has_c_ext``), else ``"torch"``; on any other device type the fused backend that
    bench/gpu_suite.sh measured correct and faster there (:data:`MEASURED_FUSED`), else ``"torch"``."""
    if device_type == "cpu":
        return "cpu" if has_c_ext else "torch"
    return MEASURED_FUSED.get(device_type, "torch")


def resolve_precision(precision: Optional[str], family: str, op: str) -> str:
    """``precision`` checked against the op family's modes ("sinkhorn" or "gaussian"); None -> the setting."""
    choices = SINKHORN_PRECISIONS if family == "sinkhorn" else GAUSSIAN_PRECISIONS
    if precision is None:
        return getattr(current(), f"{family}_precision")
    _check_choice(precision, choices, "precision", op)
    return precision
