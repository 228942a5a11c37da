"""A few training steps of every method family on synthetic data (in-process, resnet8x4, 10 classes, batch 8).

Each run goes through ``train.main`` end to end and is checked from its outputs: finite logged loss terms, student
weights changed, every trainable parameter (projectors of FitNet / WKD-F included) in the optimizer and updated.
"""
from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from cls_helpers import NUM_CLASSES, tiny_config, train_losses  # noqa: E402

from examples.common.checkpoint import load_checkpoint  # noqa: E402
from examples.common.config import load_config  # noqa: E402
from examples.common.distributed import seed_everything  # noqa: E402
from examples.classification import train  # noqa: E402

TERMS = {"ce": ["ce"], "kd": ["ce", "kd"], "dkd": ["ce", "dkd"], "nkd": ["ce", "nkd"], "fitnet": ["ce", "fitnet"],
         "wkd_l": ["ce", "wkd_l"], "wkd_f": ["ce", "wkd_f"], "wkd_lf": ["ce", "wkd_l", "wkd_f"]}


def _initial_distiller(cfg_path):
    """The distiller exactly as train.main initialises it (same seed, same construction order)."""
    cfg = load_config(cfg_path)
    seed_everything(int(cfg["train"]["seed"]), 0)
    return train.build_distiller(cfg, synthetic=True, log=lambda *a: None)


def _check_run(tmp_path, cfg_path, method):
    out = tmp_path / "out"
    summary = train.main(["--config", str(cfg_path), "--out", str(out)])
    assert summary["steps"] == 4 and summary["world_size"] == 1
    assert math.isfinite(summary["final_top1"]) and json.loads((out / "summary.json").read_text())["method"] == method
    for term in ["loss"] + [f"loss_{t}" for t in TERMS[method]]:
        values = train_losses(out, f"train/{term}")
        assert len(values) == 4 and all(math.isfinite(v) for v in values.values()), (term, values)
    state = load_checkpoint(out / "last.pth")
    init = _initial_distiller(cfg_path)
    changed = [k for k, v in init.student.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, state["model"][k])]
    assert changed, "no student weight changed"
    # every trainable parameter is in the optimizer and received a momentum update
    n_params = sum(1 for p in init.parameters() if p.requires_grad)
    assert n_params == sum(1 for _ in init.student.parameters()) + sum(1 for _ in init.losses.parameters())
    opt = state["optimizer"]
    assert len(opt["param_groups"][0]["params"]) == n_params
    assert len(opt["state"]) == n_params
    extra = init.losses.state_dict()
    if method in ("fitnet", "wkd_f", "wkd_lf"):
        proj = [k for k in extra if "projector" in k and k.endswith("weight")]
        assert proj and any(not torch.equal(extra[k], state["distill"][k]) for k in proj), "projector unchanged"
    assert init.teacher is None if method == "ce" else init.teacher is not None
    assert not any(k.startswith("_teacher") or "teacher" in k for k in state["model"])
    return out, state


@pytest.mark.parametrize("method", ["ce", "kd", "dkd", "nkd", "fitnet", "wkd_l", "wkd_f", "wkd_lf"])
def test_method_family_trains(tmp_path, method):
    _check_run(tmp_path, tiny_config(tmp_path, method), method)


def test_wkd_weights_follow_the_cosine_schedule(tmp_path):
    out = tmp_path / "out"
    train.main(["--config", str(tiny_config(tmp_path, "wkd_lf", epochs=3)), "--out", str(out)])
    # decay_start E0 = 1 of 3 epochs, 1-based epochs e: full weight for e = 1, cosine_weight(2, w, 1, 3) = w / 2,
    # cosine_weight(3, w, 1, 3) = 0 in the last epoch
    w_l = train_losses(out, "train/w_wkd_l")
    assert w_l[1] == w_l[2] == 20.0 and w_l[3] == w_l[4] == pytest.approx(10.0) and w_l[5] == w_l[6] == 0.0
    assert train_losses(out, "train/w_wkd_f")[3] == pytest.approx(0.005)
    lrs = train_losses(out, "train/lr")  # linear scaling 0.05 * 8 / 64, x0.1 from the milestone epoch 1
    # the lr logged at a step is the one that step used: step 2 (last of epoch 0) still at the full lr
    assert lrs[1] == lrs[2] == pytest.approx(0.05 * 8 / 64) and lrs[3] == pytest.approx(0.05 * 8 / 64 * 0.1)


def test_ban_self_kd(tmp_path):
    """Born-again: generation 0 (CE), then generation 1 taught by it with KD and with WKD-L."""
    gen0 = tmp_path / "gen0"
    gen0.mkdir()
    out0 = gen0 / "out"
    train.main(["--config", str(tiny_config(gen0, "ce")), "--out", str(out0)])
    teacher_sd = load_checkpoint(out0 / "best.pth")["model"]
    for method in ("kd", "wkd_l"):
        d = tmp_path / method
        d.mkdir()
        cfg = tiny_config(d, method, extra={"distill": {"ban": True},
                                            "model": {"teacher_checkpoint": str(out0 / "best.pth")}})
        distiller = _initial_distiller(cfg)
        for k, v in distiller.teacher.state_dict().items():
            assert torch.equal(v, teacher_sd[k]), f"teacher weight {k} is not generation 0's"
        _check_run(d, cfg, method)
    bad = tiny_config(tmp_path, "kd", name="bad.yaml", extra={"distill": {"ban": True},
                                                              "model": {"teacher": "resnet32x4"}})
    with pytest.raises(ValueError, match="ban"):
        _initial_distiller(bad)


def test_errors_name_the_key(tmp_path):
    cfg = tiny_config(tmp_path, "kd", extra={"distill": {"method": "kl"}})
    with pytest.raises(ValueError, match="distill.method"):
        train.main(["--config", str(cfg), "--out", str(tmp_path / "o")])
    from examples.classification.distill import load_cost_matrix
    with pytest.raises(FileNotFoundError, match="distill.wkd_l.cost"):
        load_cost_matrix(str(tmp_path / "nope.pth"), 1.0, NUM_CLASSES)
    cfg = tiny_config(tmp_path, "kd", name="c2.yaml", extra={"data": {"dataset": "cifar100", "root": None}})
    with pytest.raises(ValueError, match="data.root"):
        train.main(["--config", str(cfg), "--out", str(tmp_path / "o2")])
    cfg = tiny_config(tmp_path, "ce", name="c3.yaml")
    with pytest.raises(ValueError, match="train.optimizer"):
        train.main(["--config", str(cfg), "--out", str(tmp_path / "o3"), "train.optimizer=lamb"])
    # misspelt keys are errors, not silently ignored (train.epoch=1 would otherwise run the full recipe)
    with pytest.raises(ValueError, match=r"unknown config key `train.epoch` \(did you mean `train.epochs`\?\)"):
        train.main(["--config", str(cfg), "--out", str(tmp_path / "o4"), "train.epoch=1"])
    cfg = tiny_config(tmp_path, "wkd_l", name="c5.yaml")
    with pytest.raises(ValueError, match=r"unknown config key `distill.wkd_l.decay_strat` "
                                         r"\(did you mean `distill.wkd_l.decay_start`\?\)"):
        train.main(["--config", str(cfg), "--out", str(tmp_path / "o5"), "distill.wkd_l.decay_strat=3"])
    assert not (tmp_path / "o4").exists() and not (tmp_path / "o5").exists()


def test_student_init_from_pretrained_with_another_head(tmp_path):
    """model.student_init loads every weight but a differently sized classifier (teacher fine-tuning)."""
    from examples.classification.models import build_model
    src = build_model("resnet8x4", 7)
    torch.save(src.state_dict(), tmp_path / "pre.pth")
    cfg = load_config(tiny_config(tmp_path, "ce"), [f"model.student_init={tmp_path / 'pre.pth'}"])
    student = train.build_distiller(cfg, synthetic=True, log=lambda *a: None).student
    head = student.classifier
    assert head.out_features == NUM_CLASSES
    same = {k: torch.equal(v, student.state_dict()[k]) for k, v in src.state_dict().items()
            if student.state_dict()[k].shape == v.shape}
    assert all(same.values()) and len(same) == len(src.state_dict()) - 2
