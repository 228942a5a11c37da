"""Data: the ImageNet folder layout (a tiny fake one), synthetic determinism, DDP-consistent sampling."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from cls_helpers import fake_imagenet, tiny_config, train_losses  # noqa: E402

from examples.classification import train  # noqa: E402
from examples.classification.data import SyntheticDataset, build_datasets, build_loaders  # noqa: E402


def test_imagenet_folder_layout_trains(tmp_path):
    fake_imagenet(tmp_path / "imagenet")
    cfg = tiny_config(tmp_path, "kd", extra={"data": {"dataset": "imagenet", "num_classes": 3, "input_size": 32,
                                                      "workers": 0}})
    train_set, val_set = build_datasets({"dataset": "imagenet", "root": str(tmp_path / "imagenet"),
                                         "num_classes": 3, "input_size": 32})
    assert len(train_set) == 18 and len(val_set) == 6 and train_set[0][0].shape == (3, 32, 32)
    out = tmp_path / "out"
    summary = train.main(["--config", str(cfg), "--data", str(tmp_path / "imagenet"), "--out", str(out),
                          "model.allow_random_teacher=true"])
    assert summary["steps"] == 4 and not summary["synthetic"] and len(train_losses(out)) == 4
    with pytest.raises(ValueError, match="data.num_classes"):
        build_datasets({"dataset": "imagenet", "root": str(tmp_path / "imagenet"), "num_classes": 5,
                        "input_size": 32})
    with pytest.raises(FileNotFoundError, match="train/"):
        build_datasets({"dataset": "imagenet", "root": str(tmp_path), "num_classes": 3, "input_size": 32})


def test_real_data_needs_a_teacher_checkpoint(tmp_path):
    fake_imagenet(tmp_path / "imagenet")
    # workers: 0, since the loaders are built before the check: the config's 4 workers would only start processes
    # (and torch's warning about more workers than this machine's cores) for nothing
    cfg = tiny_config(tmp_path, "kd", extra={"data": {"dataset": "imagenet", "num_classes": 3, "input_size": 32,
                                                      "workers": 0}})
    with pytest.raises(ValueError, match="model.teacher_checkpoint"):
        train.main(["--config", str(cfg), "--data", str(tmp_path / "imagenet"), "--out", str(tmp_path / "o")])


def test_synthetic_is_deterministic_per_index():
    a, b = SyntheticDataset(20, 5, 8, seed=3), SyntheticDataset(20, 5, 8, seed=3)
    for i in (0, 7, 19):
        xa, ya = a[i]
        xb, yb = b[i]
        assert ya == yb == a.targets[i] and torch.equal(xa, xb)
    assert not torch.equal(a[0][0], SyntheticDataset(20, 5, 8, seed=4)[0][0])


def test_global_batches_do_not_depend_on_world_size():
    """Step k of 2 processes x batch 4 covers the same 8 samples as step k of 1 process x batch 8."""
    ds = SyntheticDataset(40, 5, 4)
    _, s1, _ = build_loaders(ds, ds, batch_size=8, rank=0, world_size=1, seed=0, workers=0, pin_memory=False)
    two = [build_loaders(ds, ds, batch_size=4, rank=r, world_size=2, seed=0, workers=0, pin_memory=False)
           for r in (0, 1)]
    for epoch in (0, 1):
        for s in [s1] + [t[1] for t in two]:
            s.set_epoch(epoch)
        one = [set(b) for b in _batches(s1, 8)]
        both = [set(a) | set(b) for a, b in zip(_batches(two[0][1], 4), _batches(two[1][1], 4), strict=True)]
        assert one == both and len(one) == 5
    assert sum(len(t[2].sampler) for t in two) == len(ds)  # sharded evaluation counts every sample once


def _batches(sampler, b):
    idx = list(sampler)
    return [idx[i:i + b] for i in range(0, len(idx) - len(idx) % b, b)]
