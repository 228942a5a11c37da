"""Tolerance checks that say what they measured, and a pytest plugin that puts each failure's reason on its line.

* :func:`assert_within` compares a result with a reference by max |got - want| / max |want| (the measure of
  bench/gpu_quick.py) and fails with ``TOLERANCE MISS <what>: measured <err> > tolerance <tol>`` (and the worst
  entry), or with ``non-finite`` when the result has NaN / inf where the reference is finite: a precision problem
  and a broken kernel read differently.
* As a plugin (``pytest -p tolerance -v`` with this folder on PYTHONPATH; bench/gpu_suite.sh runs the GPU tests so)
  it replaces the word FAILED / ERROR of ``-v`` by ``TOLERANCE MISS (<message>)`` for a tolerance miss, of this
  module or of conftest.assert_close ("worst relative error ... > rtol"), and by ``FAILED (<message>)`` /
  ``ERROR (<message>)`` otherwise, so that a streamed log says per test what went wrong without the tracebacks.
"""
from __future__ import annotations

import math
import re

import torch

TOLERANCE_MISS = "TOLERANCE MISS"
# conftest.assert_close's failure message: also a tolerance miss
_ASSERT_CLOSE_MISS = re.compile(r"worst relative error \S+ .*> rtol")


def max_rel_error(got, want) -> float:
    """max |got - want| / max |want| in float64 over the whole tensor (max |want| = 0: the absolute error); inf
    when ``got`` is non-finite where ``want`` is finite."""
    x = torch.as_tensor(got).detach().double().cpu()
    y = torch.as_tensor(want).detach().double().cpu()
    if x.shape != y.shape:
        raise ValueError(f"max_rel_error: shapes differ: got {tuple(x.shape)}, want {tuple(y.shape)}")
    finite = torch.isfinite(y)
    if not bool(torch.isfinite(x[finite]).all()):
        return math.inf
    if x.numel() == 0:
        return 0.0
    scale = y[finite].abs().max().item() if bool(finite.any()) else 0.0
    diff = (x[finite] - y[finite]).abs().max().item() if bool(finite.any()) else 0.0
    return diff / (scale if scale > 0 else 1.0)


def assert_within(got, want, tol: float, what: str) -> float:
    """Assert max_rel_error(got, want) <= tol; returns the measured error. The failure message names ``what``,
    the measured error, the tolerance and the worst entry (or says the result is non-finite)."""
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"assert_within: `tol` must be a non-negative number, got {tol!r}")
    err = max_rel_error(got, want)
    if err <= tol:
        return err
    x = torch.as_tensor(got).detach().double().cpu()
    y = torch.as_tensor(want).detach().double().cpu()
    if err == math.inf:
        bad = int((~torch.isfinite(x) & torch.isfinite(y)).sum())
        raise AssertionError(f"{what}: non-finite result: {bad} of {x.numel()} entries are NaN/inf where the "
                             "reference is finite")
    d = torch.where(torch.isfinite(y), (x - y).abs(), torch.zeros_like(x))
    idx = tuple(int(i) for i in torch.unravel_index(d.argmax(), d.shape)) if d.dim() else ()
    raise AssertionError(f"{TOLERANCE_MISS} {what}: measured {err:.3e} > tolerance {tol:.1e} (max |got - want| / "
                         f"max |want|; worst entry {idx}: got {x[idx].item()!r}, want {y[idx].item()!r})")


def failure_line(report) -> str:
    """The first line of a failed report's exception message (``AssertionError: ...``), at most 300 characters."""
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr or "")
    lines = text.strip().splitlines()
    return lines[0][:300] if lines else ""


def pytest_report_teststatus(report, config):
    """-v: a failure's reason on its own line; tolerance misses called so."""
    if not report.failed:
        return None
    msg = failure_line(report)
    if report.when == "call":
        word = TOLERANCE_MISS if (TOLERANCE_MISS in msg or _ASSERT_CLOSE_MISS.search(msg)) else "FAILED"
        return "failed", "F", (f"{word} ({msg})", {"red": True})
    return "error", "E", (f"ERROR ({msg})", {"red": True})
