"""examples/common: config inheritance/overrides, atomic checkpoints, RNG capture, CSV logger, AMP helpers."""
from __future__ import annotations

import csv
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from examples.common import checkpoint as ckpt_mod
from examples.common.amp import autocast, make_grad_scaler
from examples.common.checkpoint import (capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint,
                                        unwrap_model)
from examples.common.config import check_keys, load_config
from examples.common.distributed import all_reduce_mean, barrier, init_distributed
from examples.common.metrics_log import MetricLogger
from examples.common.progress import Progress


def test_config_base_merge_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("a: {b: 1, c: [1, 2]}\nx: base\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text("_base_: ../base.yaml\na: {c: [3]}\ny: 2\n")
    cfg = load_config(tmp_path / "sub" / "child.yaml", ["a.b=0.5", "x=null", "new.key=[1, 2]", "s=bf16"])
    assert cfg == {"a": {"b": 0.5, "c": [3]}, "x": None, "y": 2, "new": {"key": [1, 2]}, "s": "bf16"}


def test_check_keys_names_every_unknown_key_with_the_closest_known_one():
    schema = {None: {"seed", "train", "distill"}, "train": {"epochs", "base_lr"}, "distill": None}
    check_keys({"seed": 0, "train": {"epochs": 1}, "distill": {"anything": 1}}, schema)  # unchecked section passes
    check_keys({"seed": 0, "train": None}, schema)  # a section that is not a mapping is skipped
    with pytest.raises(ValueError) as e:
        check_keys({"sed": 0, "train": {"epoch": 1, "lr": 2}}, schema, "x.yaml")
    msg = str(e.value)
    assert msg.startswith("x.yaml: unknown config keys `sed` (did you mean `seed`?), "
                          "`train.epoch` (did you mean `train.epochs`?), `train.lr`; ")
    assert "`top level`: distill, seed, train" in msg and "`train`: base_lr, epochs" in msg
    with pytest.raises(ValueError, match=r"^D: unknown config key `distill.kd.temperatur` "
                                         r"\(did you mean `distill.kd.temperature`\?\)"):
        check_keys({"temperatur": 4}, {None: {"temperature", "weight"}}, "D", prefix="distill.kd")


def test_config_errors_name_the_problem(tmp_path):
    (tmp_path / "c.yaml").write_text("_base_: missing.yaml\n")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("a: 1\n")
    with pytest.raises(ValueError, match="a.b=2"):
        load_config(tmp_path / "d.yaml", ["a.b=2"])
    with pytest.raises(ValueError, match="key.sub=value"):
        load_config(tmp_path / "d.yaml", ["novalue"])
    (tmp_path / "loop.yaml").write_text("_base_: loop.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config(tmp_path / "loop.yaml")


def test_atomic_save_keeps_previous_checkpoint_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint(path, {"epoch": 1, "w": torch.arange(4.0)})
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        f.write(b"partial garbage")  # a half-written file ...
        raise OSError("disk full")  # ... then the failure

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(4)})
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.arange(4.0))
    assert sorted(os.listdir(tmp_path)) == ["last.pth"]  # no temporary file left behind
    assert load_checkpoint(tmp_path / "absent.pth") is None


def test_rng_state_roundtrip():
    state = capture_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_unwrap_model_strips_compile_wrapper():
    m = nn.Linear(2, 2)

    class Wrapped(nn.Module):  # the attribute torch.compile's OptimizedModule uses
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    assert unwrap_model(Wrapped(m)) is m
    assert unwrap_model(m) is m


def test_metric_logger_grows_header_and_appends_on_resume(tmp_path):
    with MetricLogger(tmp_path, tensorboard=False) as log:
        log.log(1, {"loss": 1.5})
        log.log(2, {"loss": 1.25, "lr": torch.tensor(0.1)}, prefix="")
    with MetricLogger(tmp_path, tensorboard=False) as log:  # a resumed run
        log.log(3, {"top1": 50.0}, prefix="val/")
        log.drop_after(2)
        log.log(3, {"loss": 1.0})
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "loss", "lr", "val/top1"]
    assert [(r["step"], r["loss"]) for r in rows] == [("1", "1.5"), ("2", "1.25"), ("3", "1.0")]
    MetricLogger(tmp_path / "off", enabled=False).log(1, {"a": 1.0})
    assert not (tmp_path / "off").exists()


def test_amp_and_progress_and_single_process_distributed():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="amp"):
        autocast(cpu, "fp8")
    with autocast(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert not make_grad_scaler(cpu, "bf16").is_enabled()
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_mean(t) is t
    barrier()
    with Progress(3, "t", enabled=False) as p:
        for _ in range(3):
            p.update(8, loss=0.1)
    assert p.items == 24
