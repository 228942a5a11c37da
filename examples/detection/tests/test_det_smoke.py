"""The README's detection smoke command (synthetic COCO, WKD-L + WKD-F with a random teacher and cost) logs
non-zero WKD loss terms."""
from __future__ import annotations

from pathlib import Path

from examples.common.metrics_log import read_metrics
from examples.common.readme_smoke import readme_command, with_out
from examples.detection.train import main

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_smoke_command_logs_nonzero_wkd_terms(tmp_path):
    args = readme_command(README, "examples.detection.train")
    assert args[args.index("--config") + 1].endswith("wkd_lf.yaml")
    assert main(with_out(args, tmp_path / "smoke")) == 0
    rows = [r for r in read_metrics(tmp_path / "smoke" / "metrics.jsonl") if "train/loss" in r]
    assert rows
    for key in ("train/loss_wkd_l", "train/loss_wkd_f"):
        assert all(r[key] > 0 for r in rows), (key, rows)
    assert any("val/mAP" in r for r in read_metrics(tmp_path / "smoke" / "metrics.jsonl"))
