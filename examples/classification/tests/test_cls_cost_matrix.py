"""build_cost_matrix on a tiny synthetic set: a [K, K] symmetric, zero-diagonal 1 - CKA matrix that WKDLogitLoss
accepts; an interrupted run resumes from its partial file to the same matrix."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from cls_helpers import NUM_CLASSES, tiny_config  # noqa: E402

from examples.classification import build_cost_matrix as bcm  # noqa: E402
from wkd_kernels import WKDLogitLoss, sharpen  # noqa: E402


def _args(cfg, out, *extra):
    return ["--config", str(cfg), "--output", str(out), "--synthetic", "--device", "cpu", "--batch-size", "16",
            "--no-progress", "data.synthetic_size=120", *extra]


@pytest.mark.parametrize("source", ["logits", "features"])
def test_cost_matrix_tool(tmp_path, source):
    cfg = tiny_config(tmp_path, "kd")
    out = tmp_path / "cost.pth"
    d = bcm.main(_args(cfg, out, "--source", source))
    saved = torch.load(out, weights_only=True)
    assert torch.equal(saved, d) and saved.shape == (NUM_CLASSES, NUM_CLASSES) and saved.dtype == torch.float32
    assert torch.equal(saved, saved.T) and torch.all(saved.diagonal() == 0)
    off = saved[~torch.eye(NUM_CLASSES, dtype=torch.bool)]
    assert torch.all(off >= 0) and torch.all(off <= 1) and off.max() > 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["source"] == source and meta["num_classes"] == NUM_CLASSES and meta["n_per_class"] >= 2
    loss = WKDLogitLoss(sharpen(saved, 1.0), temperature=4.0, weight=1.0)
    s = torch.randn(4, NUM_CLASSES, requires_grad=True)
    value = loss(s, torch.randn(4, NUM_CLASSES), torch.tensor([0, 3, 5, 9]))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()


def test_cost_matrix_resume(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "kd")
    ref = bcm.main(_args(cfg, tmp_path / "ref.pth"))
    out = tmp_path / "cost.pth"

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(bcm, "cka_distance", interrupted)  # dies after collecting, with partial saves behind it
    with pytest.raises(KeyboardInterrupt):
        bcm.main(_args(cfg, out, "--save-every", "1"))
    partial = out.with_name("cost.partial.pth")
    assert partial.exists() and not out.exists()
    monkeypatch.undo()
    d = bcm.main(_args(cfg, out, "--save-every", "1", "--resume"))
    assert torch.allclose(d, ref, atol=1e-6) and not partial.exists()
