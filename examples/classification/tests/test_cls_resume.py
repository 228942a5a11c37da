"""Kill-and-resume reproduces the uninterrupted run exactly (CPU).

The interrupted run is killed with ``os._exit`` (``train.debug_exit_at_step``) in the middle of epoch 2, after the
epoch-1 checkpoint and after it logged a step past it; ``--resume`` restarts from ``last.pth`` (model, projector,
optimizer momentum, scheduler, RNG states), drops the CSV rows logged after the checkpoint and continues. The
per-step losses and the final weights must equal those of the uninterrupted run bit for bit.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from cls_helpers import fake_imagenet, run_train, tiny_config, train_losses  # noqa: E402

from examples.common.checkpoint import load_checkpoint  # noqa: E402
from examples.classification import train  # noqa: E402


@pytest.mark.e2e
def test_kill_and_resume_reproduces_losses(tmp_path):
    # 3 epochs x 2 steps; the lr milestone (epoch 1) and the cosine weight decay (from epoch 1) both matter
    cfg = tiny_config(tmp_path, "wkd_lf", epochs=3, steps=2)
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_train(["--config", str(cfg), "--out", str(full)])
    killed = run_train(["--config", str(cfg), "--out", str(cut), "train.debug_exit_at_step=3"], check=False)
    assert killed.returncode == 3, killed.stderr[-2000:]
    assert load_checkpoint(cut / "last.pth")["step"] == 2
    assert max(train_losses(cut)) == 3  # a step logged after the checkpoint, which the resume must redo
    resumed = run_train(["--config", str(cfg), "--out", str(cut), "--resume"])
    assert "resumed from" in resumed.stdout
    for key in ("train/loss", "train/loss_wkd_l", "train/loss_wkd_f", "train/lr", "train/w_wkd_l"):
        assert train_losses(full, key) == train_losses(cut, key), key
    a, b = load_checkpoint(full / "last.pth"), load_checkpoint(cut / "last.pth")
    for part in ("model", "distill"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)
    assert a["step"] == b["step"] == 6 and a["epoch"] == b["epoch"] == 3


def test_stop_after_epochs_then_resume(tmp_path):
    """A clean stop (train.stop_after_epochs) followed by --resume gives the same losses as one run (in-process)."""
    cfg = tiny_config(tmp_path, "fitnet", epochs=2, steps=2)
    full, cut = tmp_path / "full", tmp_path / "cut"
    train.main(["--config", str(cfg), "--out", str(full)])
    stopped = train.main(["--config", str(cfg), "--out", str(cut), "train.stop_after_epochs=1"])
    assert stopped["stopped_early"] and stopped["stopped_at_epoch"] == 1
    assert not (cut / "summary.json").exists()
    train.main(["--config", str(cfg), "--out", str(cut), "--resume"])
    assert train_losses(full) == train_losses(cut)
    assert (cut / "summary.json").exists()


@pytest.mark.e2e
def test_kill_and_resume_with_augmenting_workers(tmp_path):
    """Real images, random augmentation (RandomResizedCrop + flip) in a DataLoader worker process: the worker RNG of
    every epoch must come from the restored process RNG, so the resumed run still reproduces the losses."""
    data = fake_imagenet(tmp_path / "imagenet")  # 18 training images, 3 classes: 2 steps of 8 per epoch
    cfg = tiny_config(tmp_path, "ce", epochs=2, steps=2,
                      extra={"data": {"dataset": "imagenet", "num_classes": 3, "input_size": 32, "workers": 1}})
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_train(["--config", str(cfg), "--data", str(data), "--out", str(full)])
    killed = run_train(["--config", str(cfg), "--data", str(data), "--out", str(cut), "train.debug_exit_at_step=3"],
                       check=False)
    assert killed.returncode == 3, killed.stderr[-2000:]
    run_train(["--config", str(cfg), "--data", str(data), "--out", str(cut), "--resume"])
    assert train_losses(full) == train_losses(cut)
    a, b = load_checkpoint(full / "last.pth"), load_checkpoint(cut / "last.pth")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def _val_rows(out):
    from examples.common.metrics_log import read_metrics
    return [r for r in read_metrics(out / "metrics.jsonl") if "val/top1" in r]


def test_extending_a_finished_run_follows_the_new_lr_schedule(tmp_path, capsys):
    """--resume with a larger train.epochs: the cosine schedule is the new length's (logged), not the saved one's,
    which would reach its minimum at the old end and climb back."""
    cosine = {"train": {"scheduler": "cosine", "milestones": [], "min_lr_ratio": 0.0, "eval_every": 100}}
    cfg = tiny_config(tmp_path, "ce", epochs=2, steps=1, extra=cosine)
    short, long = tmp_path / "short", tmp_path / "long"
    train.main(["--config", str(cfg), "--out", str(long), "train.epochs=4"])
    train.main(["--config", str(cfg), "--out", str(short)])
    capsys.readouterr()
    train.main(["--config", str(cfg), "--out", str(short), "--resume", "train.epochs=4"])
    extended, fresh = train_losses(short, "train/lr"), train_losses(long, "train/lr")
    assert sorted(extended) == sorted(fresh) == [1, 2, 3, 4]
    assert [extended[s] for s in (3, 4)] == [fresh[s] for s in (3, 4)]
    assert extended[3] > extended[4] > 0  # still annealing (the saved schedule: 0 at step 3, then climbing back)
    log = capsys.readouterr().out
    assert "train.epochs 2 -> 4" in log and "lr schedule is rebuilt for 4 epochs" in log
    assert load_checkpoint(short / "last.pth")["epoch"] == 4


def test_resuming_a_finished_run_reports_already_finished(tmp_path, capsys):
    """No second evaluation and no duplicate val/ line; the summary carries the last evaluation's metrics."""
    cfg = tiny_config(tmp_path, "ce", epochs=2, steps=1)
    out = tmp_path / "out"
    first = train.main(["--config", str(cfg), "--out", str(out)])
    rows = _val_rows(out)
    assert len(rows) == 2
    capsys.readouterr()
    again = train.main(["--config", str(cfg), "--out", str(out), "--resume"])
    log = capsys.readouterr().out
    assert "already finished" in log and "[eval]" not in log
    assert _val_rows(out) == rows
    assert again["already_finished"] and not first["already_finished"]
    assert again["metrics"] == first["metrics"] and again["steps"] == first["steps"] == 2
    with pytest.raises(ValueError, match="cannot be shortened"):
        train.main(["--config", str(cfg), "--out", str(out), "--resume", "train.epochs=1"])
