"""Training on one's own image folder (--data-dir and the configs/own_data/ recipes) and the shared loss builder
(examples.common.losses: every weight, WKD-F's included, applied once)."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from cls_helpers import CONFIGS, fake_imagenet  # noqa: E402

from examples.classification import train  # noqa: E402
from examples.common.losses import build_distillation_losses  # noqa: E402

OWN = CONFIGS / "own_data"
FAST = ["train.epochs=1", "train.batch_size=4", "train.progress=false", "train.tensorboard=false",
        "data.workers=0", "train.log_every=1"]


def _args(*argv):
    return train.parse_args(list(argv))


def test_data_dir_sets_the_folder_dataset_and_the_class_count(tmp_path):
    root = fake_imagenet(tmp_path / "imgs", classes=3)
    cfg = train.resolve_config(_args("--config", str(OWN / "teacher.yaml"), "--data-dir", str(root),
                                     "--input-size", "16", "--student", "resnet8"))
    assert cfg["data"]["dataset"] == "folder" and cfg["data"]["num_classes"] == 3
    assert cfg["data"]["root"] == str(root) and cfg["data"]["input_size"] == 16
    assert cfg["model"]["student"] == "resnet8"
    with pytest.raises(ValueError, match="data.num_classes=5 but --data-dir"):
        train.resolve_config(_args("--config", str(OWN / "teacher.yaml"), "--data-dir", str(root),
                                   "data.num_classes=5"))


def test_data_dir_errors_say_what_to_create(tmp_path):
    (tmp_path / "flat").mkdir()
    with pytest.raises(FileNotFoundError, match="must hold `train/` and `val/` folders"):
        train.resolve_config(_args("--config", str(OWN / "teacher.yaml"), "--data-dir", str(tmp_path / "flat")))


def test_wkd_l_without_teacher_checkpoint_says_which_flag(tmp_path):
    root = fake_imagenet(tmp_path / "imgs", classes=3)
    cfg = train.resolve_config(_args("--config", str(OWN / "wkd_l.yaml"), "--data-dir", str(root)))
    with pytest.raises(ValueError, match="--teacher-checkpoint FILE"):
        train.build_distiller(cfg, synthetic=False, log=lambda *a: None)


def test_teacher_then_wkd_l_student_on_an_image_folder(tmp_path):
    """The documented commands: a teacher trained on the folder, then a WKD-L student whose cost matrix the
    trainer builds from that teacher (OUT/cost_matrix.pth), no other settings."""
    root = fake_imagenet(tmp_path / "imgs", classes=3, per_class=4)
    t = train.main(["--config", str(OWN / "teacher.yaml"), "--data-dir", str(root), "--input-size", "16",
                    "--student", "resnet8", "--out", str(tmp_path / "teacher"), *FAST])
    assert t["method"] == "ce" and (tmp_path / "teacher" / "best.pth").is_file()
    out = tmp_path / "student"
    s = train.main(["--config", str(OWN / "wkd_l.yaml"), "--data-dir", str(root), "--input-size", "16",
                    "--student", "resnet8", "--teacher", "resnet8", "--teacher-checkpoint",
                    str(tmp_path / "teacher" / "best.pth"), "--out", str(out), *FAST])
    assert s["method"] == "wkd_l" and s["teacher"] == "resnet8"
    d = torch.load(out / "cost_matrix.pth", weights_only=True)
    assert d.shape == (3, 3) and torch.equal(d, d.T) and torch.all(d.diagonal() == 0)
    assert json.loads((out / "cost_matrix.json").read_text())["teacher_checkpoint"] == \
        str((tmp_path / "teacher" / "best.pth").resolve())
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("wkd_l" in str(line) for line in lines)


def test_wkd_f_weight_is_applied_once():
    """WKD-F's weight lives in its module (set_epoch schedules it) and combine() does not multiply it again."""
    cfg = {"method": "wkd_lf", "wkd_l": {"cost": None, "temperature": 2.0, "weight": 3.0, "kappa": 1.0},
           "wkd_f": {"weight": 0.25, "grid": 1, "projector": None, "decay_start": 1}}
    d = torch.rand(4, 4)
    d = ((d + d.T) / 2).fill_diagonal_(0)
    losses = build_distillation_losses(cfg, supported=("wkd_lf",), num_classes=4, cost=d,
                                       features=dict(student_channels=6, teacher_channels=6, projector=None))
    torch.manual_seed(0)
    f_s, f_t = torch.randn(2, 6, 3, 3), torch.randn(2, 6, 3, 3)
    unweighted = losses["wkd_f"].__class__(6, 6, projector=None, weight=1.0)(f_s, f_t).loss
    raw = {"wkd_f": losses["wkd_f"](f_s, f_t).loss, "wkd_l": torch.tensor(1.0)}
    out = losses.combine(raw)
    torch.testing.assert_close(out["wkd_f"], 0.25 * unweighted)
    assert losses.weights == {"wkd_l": 3.0, "wkd_f": 0.25}
    w = losses.set_epoch(3, 3)  # the last epoch of a decaying schedule: weight 0
    assert w == {"w_wkd_l": 3.0, "w_wkd_f": 0.0}
    assert float(losses.combine({"wkd_f": losses["wkd_f"](f_s, f_t).loss, "wkd_l": torch.tensor(1.0)})["wkd_f"]) == 0
    with pytest.raises(ValueError, match="lacks the terms"):
        losses.combine({"wkd_l": torch.tensor(1.0)})


def test_detection_and_classification_weight_wkd_f_the_same_way():
    """Both trainers get WKD-F from the shared builder: weight w gives w times the unweighted loss."""
    from examples.detection.distill import DistillLosses
    det = DistillLosses({"method": "wkd_f", "wkd_f": {"weight": 0.5, "projector": None}}, 3, roi_channels=8)
    torch.manual_seed(0)
    roi_s, roi_t = torch.randn(5, 8, 7, 7), torch.randn(5, 8, 7, 7)
    logits = torch.randn(5, 3)
    got = det(logits, logits, torch.zeros(5, dtype=torch.long), roi_s, roi_t)["loss_wkd_f"]
    ref = det["wkd_f"].__class__(8, 8, projector=None, weight=1.0)(roi_s, roi_t).loss
    torch.testing.assert_close(got, 0.5 * ref)


@pytest.mark.e2e
def test_command_line_errors_are_a_message_not_a_traceback(tmp_path):
    import subprocess
    from cls_helpers import REPO
    cmd = [sys.executable, "-m", "examples.classification.train", "--config", str(OWN / "wkd_l.yaml"),
           "--data-dir", str(tmp_path / "nothing_here")]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "error: --data-dir:" in r.stderr and "must hold `train/` and `val/` folders" in r.stderr
    r = subprocess.run(cmd + ["--traceback"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" in r.stderr
