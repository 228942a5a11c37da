"""2-process gloo DDP (torchrun in a subprocess) matches the single-process run on the same global batch.

Same global batch (8 = 2 x 4), same data order (DistributedSampler permutation depends on seed and epoch only),
synchronised BatchNorm (``train.sync_bn``; the tests' GlooSyncBatchNorm stands in for nn.SyncBatchNorm on the
CPU: ``gloo_sync_bn.py``), so the logged losses (averaged over the
ranks) and the final weights must agree up to float rounding. WKD-L + WKD-F covers the logit loss, the feature loss
and its trained projector.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from cls_helpers import run_train, tiny_config, train_losses  # noqa: E402

from examples.common.checkpoint import load_checkpoint  # noqa: E402
from examples.classification import train  # noqa: E402


@pytest.mark.e2e
def test_two_process_gloo_matches_single_process(tmp_path):
    cfg = tiny_config(tmp_path, "wkd_lf", epochs=2, steps=2, batch=8, extra={"train": {"sync_bn": True}})
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    train.main(["--config", str(cfg), "--out", str(single)])  # in-process: the reference needs no launcher
    proc = run_train(["--config", str(cfg), "--out", str(ddp)], nproc=2,
                     module="examples.classification.tests.gloo_sync_bn")
    assert "world size 2" in proc.stdout and "4 per process" in proc.stdout
    for key in ("train/loss", "train/loss_ce", "train/loss_wkd_l", "train/loss_wkd_f"):
        a, b = train_losses(single, key), train_losses(ddp, key)
        assert a.keys() == b.keys() and len(a) == 4
        for step in a:
            assert abs(a[step] - b[step]) <= 1e-4 * max(1.0, abs(a[step])), (key, step, a[step], b[step])
    s, d = load_checkpoint(single / "last.pth"), load_checkpoint(ddp / "last.pth")
    assert d["world_size"] == 2 and len(d["rng_per_rank"]) == 2
    for part in ("model", "distill"):
        for k, v in s[part].items():
            if v.is_floating_point():
                assert torch.allclose(v, d[part][k], rtol=1e-4, atol=1e-5), (part, k, (v - d[part][k]).abs().max())
            else:
                assert torch.equal(v, d[part][k]), (part, k)
