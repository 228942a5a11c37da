"""Scalar logging to ``out_dir/metrics.csv`` and TensorBoard (rank 0 only)."""
from __future__ import annotations

import csv
import math
import os
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Union

__all__ = ["MetricLogger"]

_TB_WARNED = False


def _fmt(value) -> str:
    if isinstance(value, float):
        return repr(value)  # shortest exact round trip
    return str(value)


class MetricLogger:
    """Append scalars to ``out_dir/metrics.csv`` (column ``step`` first) and to TensorBoard.

    The CSV header grows when a new key appears: the file is rewritten (atomically) with the wider header and
    empty cells for the old rows. A second logger on the same directory (a resumed run) appends to the existing
    file. TensorBoard event files go to ``out_dir/tb`` when ``tensorboard`` is importable (a warning once
    otherwise). With ``enabled=False`` (non-main ranks) every method is a no-op.

    Args:
        out_dir: directory of ``metrics.csv`` (created).
        enabled: False makes the logger a no-op.
        tensorboard: also write TensorBoard scalars.
    """

    def __init__(self, out_dir: Union[str, Path], enabled: bool = True, tensorboard: bool = True):
        self.enabled = bool(enabled)
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.csv"
        self._fields: List[str] = ["step"]
        self._tb = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.path.is_file() and self.path.stat().st_size > 0:
            with open(self.path, newline="") as f:
                header = next(csv.reader(f), None)
            if header:
                if header[0] != "step":
                    raise ValueError(f"MetricLogger: {self.path} exists but its first column is {header[0]!r}, "
                                     f"not 'step'; use another out_dir")
                self._fields = header
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(log_dir=str(self.out_dir / "tb"))
            except Exception as e:  # tensorboard missing or broken
                global _TB_WARNED
                if not _TB_WARNED:
                    warnings.warn(f"MetricLogger: TensorBoard logging disabled ({e}); writing the CSV only")
                    _TB_WARNED = True

    # ------------------------------------------------------------------ CSV
    def _read_rows(self) -> List[Dict[str, str]]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def _rewrite(self, rows: List[Dict[str, str]]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._fields, restval="")
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in self._fields})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def log(self, step: int, scalars: Dict[str, float], prefix: str = "") -> None:
        """Append one row ``step, prefix+key...`` to the CSV and the same scalars to TensorBoard.

        Values may be Python numbers or 0-d tensors (``.item()`` is called). Keys are prefixed with ``prefix``
        verbatim (e.g. ``"train/"``).
        """
        if not self.enabled:
            return
        if not isinstance(scalars, dict):
            raise TypeError(f"MetricLogger.log: `scalars` must be a dict, got {type(scalars).__name__}")
        row = {"step": str(int(step))}
        values = {}
        for k, v in scalars.items():
            if hasattr(v, "item"):
                v = v.item()
            key = f"{prefix}{k}"
            if key == "step":
                raise ValueError("MetricLogger.log: the key 'step' is reserved")
            values[key] = v
            row[key] = _fmt(v)
        new = [k for k in row if k not in self._fields]
        if new:
            old_rows = self._read_rows()
            self._fields = self._fields + new
            self._rewrite(old_rows)
        write_header = not self.path.is_file() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._fields, restval="")
            if write_header:
                w.writeheader()
            w.writerow(row)
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
                    self._tb.add_scalar(k, float(v), int(step))

    def drop_after(self, step: int) -> None:
        """Remove CSV rows with a step greater than ``step`` (a resumed run repeats them)."""
        if not self.enabled or not self.path.is_file():
            return
        rows = self._read_rows()
        kept = [r for r in rows if r.get("step", "") == "" or int(r["step"]) <= int(step)]
        if len(kept) != len(rows):
            self._rewrite(kept)

    def close(self) -> None:
        """Flush and close TensorBoard (the CSV is closed after every row)."""
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: Union[str, Path]) -> List[Dict[str, Optional[float]]]:
    """Read a metrics.csv into dicts of floats (None for empty cells); handy for tests and plots."""
    with open(path, newline="") as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in r.items()} for r in csv.DictReader(f)]
