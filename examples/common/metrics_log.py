"""Scalar logging to ``out_dir/metrics.jsonl`` (one JSON object per line) and TensorBoard (rank 0 only)."""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Dict, List, Union

__all__ = ["MetricLogger", "read_metrics"]

_TB_WARNED = False


class MetricLogger:
    """Append ``{"step": n, key: value, ...}`` lines to ``out_dir/metrics.jsonl`` and the scalars to TensorBoard
    (``out_dir/tb``, when ``tensorboard`` is importable; a warning once otherwise). A second logger on the same
    directory (a resumed run) appends; :meth:`drop_after` removes the lines an interrupted run wrote after its last
    checkpoint. With ``enabled=False`` (non-main ranks) every method is a no-op.
    """

    def __init__(self, out_dir: Union[str, Path], enabled: bool = True, tensorboard: bool = True):
        self.enabled = bool(enabled)
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self._tb = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(log_dir=str(self.out_dir / "tb"))
            except Exception as e:  # tensorboard missing or broken
                global _TB_WARNED
                if not _TB_WARNED:
                    warnings.warn(f"MetricLogger: TensorBoard logging disabled ({e}); writing metrics.jsonl only",
                                  stacklevel=2)
                    _TB_WARNED = True

    def log(self, step: int, scalars: Dict[str, float], prefix: str = "") -> None:
        """One line ``{"step": step, prefix + key: value, ...}``; values may be numbers or 0-d tensors."""
        if not self.enabled:
            return
        if not isinstance(scalars, dict):
            raise TypeError(f"MetricLogger.log: `scalars` must be a dict, got {type(scalars).__name__}")
        row = {"step": int(step)}
        for k, v in scalars.items():
            if hasattr(v, "item"):
                v = v.item()
            key = f"{prefix}{k}"
            if key == "step":
                raise ValueError("MetricLogger.log: the key 'step' is reserved")
            row[key] = v if not isinstance(v, float) or math.isfinite(v) else repr(v)  # JSON has no nan / inf
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, float(v), int(step))

    def drop_after(self, step: int) -> None:
        """Remove lines with a step greater than ``step`` (a resumed run repeats them)."""
        if not self.enabled or not self.path.is_file():
            return
        rows = self.path.read_text().splitlines()
        kept = [r for r in rows if r.strip() and json.loads(r)["step"] <= int(step)]
        if len(kept) != len(rows):
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(r + "\n" for r in kept))
            os.replace(tmp, self.path)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: Union[str, Path]) -> List[dict]:
    """The lines of a metrics.jsonl as dicts (for tests, plots, pandas: ``pd.read_json(path, lines=True)``)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
