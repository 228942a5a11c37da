"""examples/common: config inheritance/overrides, the schema, atomic checkpoints, RNG capture, JSON-lines logger,
AMP helpers, the lr schedules."""
from __future__ import annotations

import json
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
from examples.common.config import load_config
from examples.common.distributed import all_reduce_mean, barrier, init_distributed
from examples.common.metrics_log import MetricLogger, read_metrics
from examples.common.schema import ClassificationConfig, ConfigError, DetectionConfig, TrainConfig, resolve
from examples.common.trainer import build_scheduler


def test_config_base_merge_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("a: {b: 1, c: [1, 2]}\nx: base\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text("_base_: ../base.yaml\na: {c: [3]}\ny: 2\n")
    cfg = load_config(tmp_path / "sub" / "child.yaml", ["a.b=0.5", "x=null", "new.key=[1, 2]", "s=bf16"])
    assert cfg == {"a": {"b": 0.5, "c": [3]}, "x": None, "y": 2, "new": {"key": [1, 2]}, "s": "bf16"}


def test_schema_names_every_unknown_key_with_the_closest_known_one():
    cfg = resolve(ClassificationConfig, {"train": {"epochs": 1}, "model": {"student": "resnet8x4"}})
    assert cfg["train"]["epochs"] == 1 and cfg["train"]["log_every"] == TrainConfig.log_every  # defaults filled
    assert cfg["distill"]["wkd_l"]["reg"] == 0.05 and cfg["data"]["workers"] == 8
    assert resolve(ClassificationConfig, cfg) == cfg  # idempotent
    with pytest.raises(ConfigError) as e:
        resolve(ClassificationConfig, {"sed": 0, "train": {"epoch": 1, "lrr": 2}}, "x.yaml")
    msg = str(e.value)
    assert msg.startswith("x.yaml: unknown config keys `sed`, `train.epoch` (did you mean `train.epochs`?), "
                          "`train.lrr` (did you mean `train.lr`?)"), msg
    with pytest.raises(ConfigError, match=r"^D: unknown config key `distill.kd.temperatur` "
                                          r"\(did you mean `distill.kd.temperature`\?\)"):
        resolve(DetectionConfig, {"distill": {"kd": {"temperatur": 4}}}, "D")
    with pytest.raises(ConfigError, match=r"`train.epochs` must be int, got 'two'"):
        resolve(ClassificationConfig, {"train": {"epochs": "two"}})
    assert resolve(DetectionConfig, {"teacher": None})["teacher"] is None
    assert resolve(DetectionConfig, {"teacher": {"arch": "resnet18_fpn"}})["teacher"]["allow_random_init"] is False


def test_schedules_are_torch_lr_schedulers():
    """multistep after a linear warm-up (SequentialLR of LinearLR + MultiStepLR): factor(it) =
    warmup(it) * gamma ** #milestones passed, with warmup(it) = f + (1 - f) it / W; cosine after warm-up."""
    def factors(**upd):
        tcfg = resolve(TrainConfig, {"lr": 1.0, "epochs": 12, **upd})
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = build_scheduler(opt, tcfg, 10)
        out = []
        for _ in range(120):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out, sched

    f, sched = factors(milestones=[8, 11], warmup_iters=5, warmup_factor=0.001)
    assert type(sched).__name__ == "SequentialLR"
    assert f[0] == pytest.approx(0.001) and f[2] == pytest.approx(0.001 + 0.999 * 2 / 5)
    assert f[5] == pytest.approx(1.0) and f[79] == pytest.approx(1.0)
    assert f[80] == pytest.approx(0.1) and f[110] == pytest.approx(0.01)
    f, sched = factors(milestones=[3])
    assert type(sched).__name__ == "MultiStepLR" and f[29] == 1.0 and f[30] == pytest.approx(0.1)
    f, _ = factors(scheduler="cosine", warmup_epochs=1, min_lr_ratio=0.1)
    assert f[10] == pytest.approx(1.0) and f[65] == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-6)
    assert min(f[10:]) >= 0.1 - 1e-9
    with pytest.raises(ValueError, match="exclusive"):
        factors(warmup_iters=5, warmup_epochs=1)


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


def test_metric_logger_writes_json_lines_and_appends_on_resume(tmp_path):
    with MetricLogger(tmp_path, tensorboard=False) as log:
        log.log(1, {"loss": 1.5})
        log.log(2, {"loss": 1.25, "lr": torch.tensor(0.1)}, prefix="")
    with MetricLogger(tmp_path, tensorboard=False) as log:  # a resumed run
        log.log(3, {"top1": 50.0}, prefix="val/")
        log.drop_after(2)
        log.log(3, {"loss": 1.0, "bad": float("nan")})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.5), (2, 1.25), (3, 1.0)]
    assert rows[1]["lr"] == pytest.approx(0.1) and rows[2]["bad"] == "nan"
    assert all(json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines())
    MetricLogger(tmp_path / "off", enabled=False).log(1, {"a": 1.0})
    assert not (tmp_path / "off").exists()


def test_amp_and_single_process_distributed():
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


@pytest.mark.parametrize("schema", [ClassificationConfig, DetectionConfig])
@pytest.mark.parametrize("key,value,expect", [
    ("log_every", 0, "must be >= 1, got 0"), ("eval_every", 0, "must be >= 1, got 0"),
    ("epochs", -1, "must be >= 1, got -1"), ("epochs", 0, "must be >= 1, got 0"),
    ("checkpoint_every", 0, "must be >= 1"), ("batch_size", 0, "must be >= 1"), ("base_batch", 0, "must be >= 1"),
    ("steps_per_epoch", 0, "must be >= 1"), ("warmup_factor", 0.0, "must be > 0 and <= 1"),
    ("milestones", [2, -1], "must be >= 0"), ("lr", -0.1, "must be >= 0"), ("amp", "fp8", "must be one of"),
    ("scheduler", "step", "must be one of")])
def test_schema_rejects_values_that_would_break_the_run_naming_the_key(schema, key, value, expect):
    """Well-typed values that would fail only after training started (``step % log_every``) are schema errors."""
    with pytest.raises(ConfigError, match=f"`train.{key}` {expect}"):
        resolve(schema, {"train": {key: value}}, "cfg.yaml")
    ok = {"log_every": 1, "eval_every": 1, "epochs": 1, "checkpoint_every": None, "stop_after_iters": 0,
          "warmup_factor": 1.0, "milestones": [0, 3], "lr": 0.0, "amp": "bf16"}
    assert resolve(schema, {"train": ok})["train"]["stop_after_iters"] == 0


def test_train_with_log_every_zero_fails_before_building_anything(tmp_path):
    from examples.classification import train
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from cls_helpers import tiny_config
    cfg = tiny_config(tmp_path, "ce")
    with pytest.raises(ConfigError, match="`train.log_every` must be >= 1, got 0"):
        train.main(["--config", str(cfg), "--out", str(tmp_path / "out"), "train.log_every=0"])
    assert not (tmp_path / "out").exists()
