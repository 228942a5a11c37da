"""Shared fixtures: a synthetic COCO set, a tiny config, a trained-for-two-steps teacher checkpoint, a cost file.

Everything runs on CPU at 80-96 px with small RPN / box samplers, weights=None everywhere (no downloads).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from examples.common.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

TINY_RCNN = {"rpn_pre_nms_top_n_train": 150, "rpn_post_nms_top_n_train": 60, "rpn_pre_nms_top_n_test": 100,
             "rpn_post_nms_top_n_test": 40, "rpn_batch_size_per_image": 32, "box_batch_size_per_image": 32,
             "box_detections_per_img": 20}


@pytest.fixture(scope="module", autouse=True)
def _threads():
    """At most 2 intra-op threads for these tests (restored afterwards for other test directories)."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def coco_root(tmp_path_factory) -> Path:
    from examples.detection.data import make_synthetic_coco
    return make_synthetic_coco(tmp_path_factory.mktemp("coco"), num_train=6, num_val=3, num_categories=3,
                               size_range=(96, 144), seed=0)


def tiny_cfg(config: str, coco_root: Path, **sections) -> dict:
    """A shipped config shrunk for CPU tests: 80-96 px, batch 2, small samplers and box head, no TensorBoard."""
    cfg = load_config(CONFIGS / config)
    cfg["data"].update(root=str(coco_root), workers=0)
    cfg["model"].update(train_min_size=[80, 96], test_min_size=96, max_size=128, rcnn_kwargs=dict(TINY_RCNN),
                        box_head_dim=128)
    cfg["train"].update(device="cpu", tensorboard=False, progress=False, batch_size=2, epochs=1, warmup_iters=2,
                        log_every=1, eval_every=100, checkpoint_every=None)
    for name, upd in sections.items():
        if isinstance(upd, dict) and isinstance(cfg.get(name), dict):
            cfg[name] = {**cfg[name], **upd}
        else:
            cfg[name] = upd
    return copy.deepcopy(cfg)


@pytest.fixture(scope="session")
def baseline_run(coco_root, tmp_path_factory):
    """The r101_r18 baseline config, 1 epoch (3 iterations) + COCO evaluation; its final.pth is the tests'
    teacher (a ResNet18-FPN with calibrated BatchNorm statistics, loaded as a frozen teacher)."""
    from examples.detection.train import train
    out = tmp_path_factory.mktemp("baseline")
    cfg = tiny_cfg("r101_r18/baseline.yaml", coco_root)
    cfg["train"]["eval_every"] = 1
    summary = train(cfg, out)
    return out, summary


@pytest.fixture(scope="session")
def teacher_ckpt(baseline_run) -> Path:
    return baseline_run[0] / "final.pth"


@pytest.fixture(scope="session")
def cost_file(coco_root, teacher_ckpt, tmp_path_factory) -> Path:
    from examples.detection.build_cost_matrix import main
    out = tmp_path_factory.mktemp("cost") / "cost.pt"
    rc = main(["--config", str(CONFIGS / "r101_r18/wkd_l.yaml"), "--data", str(coco_root), "--out", str(out),
               "--device", "cpu", "--max-per-class", "20", "teacher.arch=resnet18_fpn",
               f"teacher.checkpoint={teacher_ckpt}", "model.test_min_size=96", "model.max_size=128",
               "model.box_head_dim=128"])
    assert rc == 0
    return out


def distill_cfg(config: str, coco_root: Path, teacher_ckpt: Path, cost_file: Path | None = None, **distill_upd):
    """A tiny distillation config with the ResNet18-FPN test teacher (and the test cost file for WKD-L)."""
    cfg = tiny_cfg(config, coco_root, teacher={"arch": "resnet18_fpn", "checkpoint": str(teacher_ckpt)})
    if "wkd_l" in cfg["distill"]:
        cfg["distill"]["wkd_l"]["cost"] = str(cost_file)
    for k, v in distill_upd.items():
        cfg["distill"][k] = {**cfg["distill"][k], **v}
    return cfg
