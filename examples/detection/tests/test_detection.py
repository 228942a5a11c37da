"""CPU tests of the detection distillation example (synthetic COCO, tiny images, few steps)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from examples.common.checkpoint import load_checkpoint
from examples.common.config import load_config
from examples.common.metrics_log import read_metrics
from examples.common.trainer import build_scheduler
from examples.detection.builders import build_datasets, build_distiller, resolve_config
from examples.detection.coco_eval import STAT_NAMES, coco_stats, evaluate
from examples.detection.data import CocoDetectionDataset, GroupedEpochBatchSampler, collate, coco_paths
from examples.detection.distill import DistillLosses
from examples.detection.models import MOBILENET_V2_TAPS, build_detector, feature_strides
from examples.detection.train import train
from wkd_kernels.interrelations import sharpen
from wkd_kernels.losses import WKDLogitLoss

from .conftest import CONFIGS, distill_cfg, tiny_cfg

PAPER = {  # the paper's detection table (mAP): RN101->RN18, RN50->MNV2
    "r101_r18": {"baseline": 33.26, "wkd_l": 35.24, "wkd_f": 37.21, "wkd_lf": 37.79},
    "r50_mv2": {"baseline": 29.47, "wkd_l": 32.48, "wkd_f": 34.47, "wkd_lf": 35.48},
}


# ------------------------------------------------------------------------------------------------ models
def test_mobilenet_v2_fpn_has_four_levels_at_strides_4_to_32():
    m = build_detector("mobilenet_v2_fpn", 4, 128, 128)
    assert feature_strides(m.backbone) == {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}
    assert m.backbone.fpn.inner_blocks[0][0].in_channels == 24
    assert [m.backbone.fpn.inner_blocks[i][0].in_channels for i in range(4)] == [24, 32, 96, 320]
    assert list(m.backbone.body.return_layers) == list(MOBILENET_V2_TAPS)
    assert m.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2", "3"]
    # it trains: one loss + backward
    m.train()
    losses = m([torch.rand(3, 100, 120)], [{"boxes": torch.tensor([[10.0, 10, 60, 70]]),
                                             "labels": torch.tensor([2])}])
    sum(losses.values()).backward()
    assert all(math.isfinite(float(v.detach())) for v in losses.values())


def test_teacher_box_head_runs_on_the_students_sampled_rois(coco_root, teacher_ckpt, cost_file):
    cfg = distill_cfg("r101_r18/wkd_lf.yaml", coco_root, teacher_ckpt, cost_file)
    cfg["model"]["train_min_size"] = [96]  # one size: the transform is deterministic and can be replayed
    # room for every positive RoI (25% of 512 > 60 proposals + GT boxes): the sampler then keeps all GT boxes
    # whatever the RNG state (with 32 RoIs per image, 8 positives, it may drop some)
    cfg["model"]["rcnn_kwargs"]["box_batch_size_per_image"] = 512
    ds, _ = build_datasets(cfg, val=False)
    m = build_distiller(cfg, ds.num_classes, ds.cat_ids, keep_tensors=True).train()
    images, targets = collate([ds[0], ds[1]])
    out = m(images, targets)
    R = sum(len(r) for r in out.rois)
    per_img = cfg["model"]["rcnn_kwargs"]["box_batch_size_per_image"]
    assert 0 < R <= 2 * per_img
    assert out.logits_s.shape == out.logits_t.shape == (R, ds.num_classes)
    assert out.roi_s.shape == out.roi_t.shape == (R, 256, 7, 7)
    assert out.labels.shape == (R,) and int(out.labels.max()) < ds.num_classes
    # the teacher's FPN RoI features are signed, so the WKD-F projector must be able to output negative values
    # (the default conv1x1_linear has no final ReLU, unlike the published ConvReg)
    assert float(out.roi_t.min()) < 0
    proj = m.losses.wkd_f.projector
    assert not any(isinstance(mod, torch.nn.ReLU) for mod in proj.modules())
    with torch.no_grad():
        assert float(proj(out.roi_s).min()) < 0
    # replay: the teacher's own backbone + RoIAlign + box head on exactly these RoIs gives the same logits
    t = m.teacher
    with torch.no_grad():
        images_t, targets_t = m.student.transform(images, [dict(x) for x in targets])
        feats = t.backbone(images_t.tensors)
        roi = t.roi_heads.box_roi_pool(feats, out.rois, images_t.image_sizes)
        logits = t.roi_heads.box_predictor(t.roi_heads.box_head(roi))[0]
    torch.testing.assert_close(roi, out.roi_t)
    torch.testing.assert_close(logits, out.logits_t)
    # the ground-truth boxes are among the sampled RoIs (torchvision adds them), resized like the images
    for rois, tg in zip(out.rois, targets_t, strict=True):
        for box in tg["boxes"]:
            assert (rois - box).abs().sum(1).min() < 1e-4
    # teacher is frozen and outside the trainable parameters / state dict
    assert not any(p.requires_grad for p in t.parameters())
    assert not any(k.startswith("_teacher") or k.startswith("teacher") for k in m.state_dict())
    assert not t.training


def test_r50_mv2_pair_distills_one_step(coco_root, cost_file):
    """MobileNetV2-FPN student + ResNet50-FPN teacher (random weights, allow_random_init): one WKD-L + WKD-F
    forward/backward; RoI features of both are [R, 256, 7, 7] and the projector receives gradients."""
    cfg = tiny_cfg("r50_mv2/wkd_lf.yaml", coco_root)
    cfg["teacher"].update(allow_random_init=True)
    cfg["distill"]["wkd_l"]["cost"] = str(cost_file)
    ds, _ = build_datasets(cfg, val=False)
    m = build_distiller(cfg, ds.num_classes, ds.cat_ids, keep_tensors=True).train()
    assert type(m.teacher.backbone.body).__name__ == "IntermediateLayerGetter" and "layer4" in m.teacher.backbone.body
    out = m(*collate([ds[0], ds[1]]))
    assert out.roi_s.shape == out.roi_t.shape and out.roi_s.shape[1:] == (256, 7, 7)
    loss = sum(out.values())
    loss.backward()
    assert torch.isfinite(loss) and {"loss_wkd_l", "loss_wkd_f"} <= set(out)
    assert m.losses.wkd_f.projector[0].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ training
METHOD_CASES = {
    "kd": ("r101_r18/kd.yaml", {}),
    "dkd": ("r101_r18/dkd.yaml", {"dkd": {"warmup_iters": 2}}),
    "wkd_l": ("r101_r18/wkd_l.yaml", {}),
    "wkd_f_diag": ("r101_r18/wkd_f.yaml", {}),
    "wkd_f_full": ("r101_r18/wkd_f_full.yaml", {}),
    "wkd_lf_grid2": ("r101_r18/wkd_lf.yaml", {"wkd_f": {"grid": 2}}),
}
EXPECTED_TERMS = {"kd": {"loss_kd"}, "dkd": {"loss_dkd"}, "wkd_l": {"loss_wkd_l"}, "wkd_f_diag": {"loss_wkd_f"},
                  "wkd_f_full": {"loss_wkd_f"}, "wkd_lf_grid2": {"loss_wkd_l", "loss_wkd_f"}}


def _columns(out):
    """Every key logged in out/metrics.jsonl."""
    return {k for row in read_metrics(out / "metrics.jsonl") for k in row}


def test_baseline_trains_and_evaluates_with_pycocotools(baseline_run):
    out, summary = baseline_run
    assert len(summary["losses"]) == 3 and all(math.isfinite(x) for x in summary["losses"])
    res = json.loads((out / "results.json").read_text())
    assert set(res["coco_bbox"]) == set(STAT_NAMES)
    assert all(isinstance(v, float) and -1.0 <= v <= 1.0 for v in res["coco_bbox"].values())
    assert res["expected_map"] == PAPER["r101_r18"]["baseline"]
    cols = _columns(out)
    assert "val/mAP" in cols and "train/loss_classifier" in cols


@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_each_method_trains_two_steps(case, coco_root, teacher_ckpt, cost_file, tmp_path):
    config, upd = METHOD_CASES[case]
    cfg = distill_cfg(config, coco_root, teacher_ckpt, cost_file, **upd)
    cfg["train"]["stop_after_iters"] = 0  # checkpoint the initial weights
    train(cfg, tmp_path)
    init = load_checkpoint(tmp_path / "last.pth")
    cfg["train"]["stop_after_iters"] = 2
    summary = train(cfg, tmp_path, resume=True)
    assert len(summary["losses"]) == 2 and all(math.isfinite(x) for x in summary["losses"])
    after = load_checkpoint(tmp_path / "last.pth")
    assert after["step"] == 2
    changed = [k for k, v in after["model"].items() if v.is_floating_point() and not torch.equal(v, init["model"][k])]
    assert any(k.startswith("roi_heads.box_predictor") for k in changed)
    assert any(k.startswith("backbone.body") for k in changed)
    cols = _columns(tmp_path)
    for term in EXPECTED_TERMS[case]:
        assert f"train/{term}" in cols
    if "wkd_f" in case or "wkd_lf" in case:  # the projector trains too
        proj = [k for k, v in after["distill"].items() if "projector" in k and v.is_floating_point()
                and not torch.equal(v, init["distill"][k])]
        assert proj


def test_resume_reproduces_the_uninterrupted_run(coco_root, teacher_ckpt, cost_file, tmp_path):
    """4 iterations straight vs 2 + resume + 2 (the cut is inside epoch 0, the run crosses into epoch 1):
    the same per-iteration losses bit for bit, and the same final weights, optimizer and scheduler state."""
    cfg = distill_cfg("r101_r18/wkd_lf.yaml", coco_root, teacher_ckpt, cost_file)
    cfg["train"].update(epochs=3)
    cfg["train"]["stop_after_iters"] = 4
    straight = train(cfg, tmp_path / "straight")
    cfg["train"]["stop_after_iters"] = 2
    first = train(cfg, tmp_path / "cut")
    assert load_checkpoint(tmp_path / "cut" / "last.pth")["batch"] == 2  # mid-epoch
    cfg["train"]["stop_after_iters"] = 4
    second = train(cfg, tmp_path / "cut", resume=True)
    assert straight["losses"] == first["losses"] + second["losses"]
    a, b = load_checkpoint(tmp_path / "straight" / "last.pth"), load_checkpoint(tmp_path / "cut" / "last.pth")
    assert (a["epoch"], a["batch"], a["step"]) == (b["epoch"], b["batch"], b["step"]) == (1, 1, 4)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["distill"]:
        assert torch.equal(a["distill"][k], b["distill"][k]), k
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 4
    ma = a["optimizer"]["state"]
    for i in ma:
        assert torch.equal(ma[i]["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])
    steps = [r["step"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]


def test_resume_at_an_epoch_end_runs_the_pending_evaluation(coco_root, tmp_path):
    """Stopped right after epoch 1's end checkpoint (before its COCO evaluation): the resumed run evaluates
    epoch 1 first, then trains epoch 2 and evaluates it."""
    cfg = tiny_cfg("r101_r18/baseline.yaml", coco_root)
    cfg["train"].update(epochs=2, eval_every=1, stop_after_iters=3)  # 3 iterations per epoch
    first = train(cfg, tmp_path)
    ck = load_checkpoint(tmp_path / "last.pth")
    assert first["stopped_early"] and (ck["epoch"], ck["batch"], ck["eval_pending"]) == (1, 0, True)
    assert "val/mAP" not in _columns(tmp_path)
    cfg["train"]["stop_after_iters"] = None
    second = train(cfg, tmp_path, resume=True)
    assert second["steps"] == 6 and not second["stopped_early"]
    evaluated = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "val/mAP" in r]
    assert evaluated == [3, 6]


def test_resuming_a_finished_run_reports_already_finished(baseline_run, coco_root, tmp_path, capsys):
    """The last epoch's end checkpoint precedes its COCO evaluation (eval_pending); once that evaluation is done
    the run is recorded as finished: a resume evaluates nothing and logs no second val/ line."""
    import shutil
    src, done = baseline_run
    out = tmp_path / "out"
    shutil.copytree(src, out)
    ck = load_checkpoint(out / "last.pth")
    assert (ck["epoch"], ck["eval_pending"]) == (1, False) and ck["metrics"] == done["metrics"]
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "val/mAP" in r]
    cfg = tiny_cfg("r101_r18/baseline.yaml", coco_root)
    cfg["train"]["eval_every"] = 1
    capsys.readouterr()
    again = train(cfg, out, resume=True)
    assert "already finished" in capsys.readouterr().out
    assert again["already_finished"] and again["metrics"] == done["metrics"] and again["steps"] == done["steps"]
    assert [r for r in read_metrics(out / "metrics.jsonl") if "val/mAP" in r] == rows


# ------------------------------------------------------------------------------------------------ evaluation
def test_evaluation_of_perfect_detections_is_one(coco_root):
    """Ground truth fed back as detections through ``evaluate``: label -> category id and xyxy -> xywh mapping."""
    img_dir, ann = coco_paths(coco_root, "val2017")
    ds = CocoDetectionDataset(img_dir, ann, train=False)
    assert ds.cat_ids == [1, 3, 5] and ds.num_classes == 4

    class Oracle(torch.nn.Module):
        def forward(self, images):
            out = []
            for im in images:
                t = next(tg for img, tg in (ds[i] for i in range(len(ds))) if torch.equal(img, im))
                out.append({"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))})
            return out

    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)
    stats = evaluate(Oracle(), loader, ds, torch.device("cpu"))
    assert stats["mAP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)
    assert coco_stats(ds.coco, [], ds.ids) == {k: 0.0 for k in STAT_NAMES}


# ------------------------------------------------------------------------------------------------ cost matrix
def test_cost_matrix_tool_writes_a_valid_matrix_accepted_by_wkd_l(cost_file):
    obj = torch.load(cost_file, weights_only=True)
    d = obj["distance"]
    C = len(obj["class_names"])
    assert C == 4 and obj["class_names"][0] == "__background__" and d.shape == (C, C)
    assert torch.isfinite(d).all() and torch.equal(d, d.T) and (d.diagonal() == 0).all()
    assert ((d >= 0) & (d <= 1)).all() and (d[~torch.eye(C, dtype=torch.bool)] > 0).all()
    assert obj["n_per_class"] >= 2 and min(obj["counts"]) >= obj["n_per_class"]
    loss = WKDLogitLoss(sharpen(d, 1.0), temperature=2.0, weight=10.0)
    s = torch.randn(8, C, requires_grad=True)
    val = loss(s, torch.randn(8, C), torch.randint(0, C, (8,)))
    val.backward()
    assert torch.isfinite(val) and torch.isfinite(s.grad).all()


# ------------------------------------------------------------------------------------------------ pieces
def test_sampler_partitions_ranks_and_skips_on_resume():
    ratios = [1.5, 0.7, 1.0, 0.5, 2.0, 1.2, 0.8]
    per_rank = [GroupedEpochBatchSampler(ratios, 2, r, 2, seed=3) for r in range(2)]
    for s in per_rank:
        s.set_epoch(1)
    batches = [list(s) for s in per_rank]
    assert len(batches[0]) == len(batches[1]) == len(per_rank[0]) == 2
    seen = sorted(i for bs in batches for b in bs for i in b)
    assert set(seen) == set(range(7)) and len(seen) == 8  # one index repeated to fill the ranks evenly
    per_rank[0].set_epoch(1, start_batch=1)
    assert list(per_rank[0]) == batches[0][1:]


def test_warmup_multistep_schedule():
    """The 1x schedule of the configs (LinearLR warm-up + MultiStepLR in a SequentialLR), factor per iteration."""
    cfg = resolve_config(load_config(CONFIGS / "r101_r18/baseline.yaml"))
    tcfg = dict(cfg["train"], warmup_iters=5, lr=1.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, tcfg, iters_per_epoch=10)
    f = []
    for _ in range(111):
        f.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert f[0] == pytest.approx(0.001) and f[5] == pytest.approx(1.0) and f[79] == pytest.approx(1.0)
    assert f[80] == pytest.approx(0.1) and f[110] == pytest.approx(0.01)


def test_shipped_configs_build_and_carry_the_paper_numbers():
    for pair, table in PAPER.items():
        for method in ("baseline", "kd", "dkd", "wkd_l", "wkd_f", "wkd_f_full", "wkd_lf"):
            cfg = resolve_config(load_config(CONFIGS / pair / f"{method}.yaml"))
            assert cfg["train"]["epochs"] == 12 and cfg["train"]["milestones"] == [8, 11]
            # the global batch of the recipe (8 GPUs x 2 images) at lr 0.02 per 16 images
            assert (cfg["train"]["batch_size"], cfg["train"]["lr"], cfg["train"]["base_batch"]) == (16, 0.02, 16)
            assert cfg["distill"]["method"] == ("ce" if method == "baseline" else
                                                "wkd_f" if method == "wkd_f_full" else method)
            assert cfg["model"]["train_min_size"] == [640, 672, 704, 736, 768, 800]
            if method in table:
                assert cfg["expected_map"] == table[method], (pair, method)
            distill = cfg["distill"]
            if "wkd_l" in distill:
                distill["wkd_l"]["cost"] = torch.rand(81, 81)
            losses = DistillLosses(distill, 81)
            assert (method == "baseline") == (not losses.needs_teacher)
            if losses.needs_teacher:
                assert cfg["teacher"]["arch"] == {"r101_r18": "resnet101_fpn", "r50_mv2": "resnet50_fpn"}[pair]
        assert load_config(CONFIGS / pair / "wkd_f_full.yaml")["distill"]["wkd_f"]["covariance"] == "full"


def test_clear_errors(coco_root, teacher_ckpt, tmp_path):
    cfg = tiny_cfg("r101_r18/kd.yaml", coco_root)
    with pytest.raises(ValueError, match="teacher.checkpoint"):
        build_distiller(cfg, 4)
    cfg = tiny_cfg("r101_r18/wkd_l.yaml", coco_root, teacher={"arch": "resnet18_fpn", "checkpoint": str(teacher_ckpt)})
    with pytest.raises(ValueError, match="distill.wkd_l.cost"):
        build_distiller(cfg, 4)
    with pytest.raises(ValueError,
                       match=r"unknown config key `distill.wkd_f.grdi` \(did you mean `distill.wkd_f.grid`\?\)"):
        DistillLosses({"method": "wkd_f", "wkd_f": {"covariance": "diag", "grdi": 2}}, 4)
    with pytest.raises(ValueError, match="distill.wkd_f.projector"):
        DistillLosses({"method": "wkd_f", "wkd_f": {"weight": 1.0, "projector": "conv3x3"}}, 4)
    with pytest.raises(ValueError, match=r"\[4, 4\], expected \[81, 81\]"):
        DistillLosses({"method": "wkd_l", "wkd_l": {"cost": torch.rand(4, 4), "temperature": 2, "weight": 1}}, 81)
    with pytest.raises(ValueError, match=r"`distill.method` must be one of .* got 'wkd_ll' \(did you mean 'wkd_l'\?\)"):
        DistillLosses({"method": "wkd_ll"}, 81)
    with pytest.raises(ValueError, match="arch"):
        build_detector("resnet34_fpn", 4)
    cfg = tiny_cfg("r101_r18/baseline.yaml", coco_root)
    cfg["train"]["base_lr"] = 0.01  # the old name of train.lr
    cfg["train"]["sed"] = 1
    with pytest.raises(ValueError, match=r"unknown config keys `train.base_lr` \(did you mean `train.lr`\?\), "
                                         r"`train.sed` \(did you mean `train.seed`\?\)"):
        train(cfg, tmp_path)


def test_torchvision_resnet50_fpn_state_dict_loads_as_teacher_with_class_remap(tmp_path):
    """A torchvision ``fasterrcnn_resnet50_fpn`` state dict (classes indexed by COCO category id) loads into the
    resnet50_fpn teacher; predictor rows are picked by category id (here ids 1, 3, 5 of a 6-way predictor)."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn
    from examples.detection.models import build_teacher
    torch.manual_seed(0)
    tv = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=6)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    t = build_teacher("resnet50_fpn", 4, str(tmp_path / "tv.pth"), coco_category_ids=[1, 3, 5])
    rows = torch.tensor([0, 1, 3, 5])
    p_t, p_tv = t.roi_heads.box_predictor, tv.roi_heads.box_predictor
    torch.testing.assert_close(p_t.cls_score.weight, p_tv.cls_score.weight[rows])
    box_rows = (rows[:, None] * 4 + torch.arange(4)).flatten()
    torch.testing.assert_close(p_t.bbox_pred.bias, p_tv.bbox_pred.bias[box_rows])
    torch.testing.assert_close(t.backbone.fpn.layer_blocks[0].state_dict()["0.weight"],
                               tv.backbone.fpn.layer_blocks[0].state_dict()["0.weight"])
    assert not any(p.requires_grad for p in t.parameters()) and not t.training
    with pytest.raises(ValueError, match="category id"):
        build_teacher("resnet50_fpn", 4, str(tmp_path / "tv.pth"), coco_category_ids=[1, 3, 7])


@pytest.mark.e2e
def test_torchrun_two_cpu_processes_train_and_evaluate(coco_root, tmp_path):
    """torchrun, 2 processes (gloo): sampler split, DDP step, per-rank RNG in the checkpoint, predictions of both
    ranks gathered for COCOeval on rank 0."""
    import os
    import subprocess
    import sys

    import yaml

    cfg = tiny_cfg("r101_r18/baseline.yaml", coco_root)
    cfg["train"].update(eval_every=1, batch_size=4)  # the global batch: 2 images per process
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    repo = CONFIGS.parents[2]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "examples.detection.train", "--config", str(tmp_path / "cfg.yaml"),
                        "--out", str(tmp_path / "out")], cwd=repo, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "world size 2" in r.stdout and "2 per process" in r.stdout
    ck = load_checkpoint(tmp_path / "out" / "last.pth")
    assert ck["iters_per_epoch"] == 2 and ck["step"] == 2 and len(ck["rng_per_rank"]) == 2
    assert not torch.equal(ck["rng_per_rank"][0]["torch"], ck["rng_per_rank"][1]["torch"])
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(res["coco_bbox"]) == set(STAT_NAMES)


@pytest.mark.parametrize("arch", ["resnet18_fpn", "mobilenet_v2_fpn"])
def test_imagenet_backbone_checkpoint_loads_freezes_and_uses_frozen_bn(arch, tmp_path):
    """``student.backbone_checkpoint`` (a torchvision classification state dict) is loaded into the FPN body,
    BatchNorm becomes FrozenBatchNorm2d and only the last 3 of 5 stages train (torchvision reference layout)."""
    from torchvision.models import mobilenet_v2, resnet18
    from torchvision.ops import FrozenBatchNorm2d
    from examples.detection.models import build_backbone
    torch.manual_seed(1)
    net = resnet18(weights=None) if arch == "resnet18_fpn" else mobilenet_v2(weights=None)
    torch.save(net.state_dict(), tmp_path / "imagenet.pth")
    bb = build_backbone(arch, str(tmp_path / "imagenet.pth"), trainable_backbone_layers=3)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in bb.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in bb.modules())
    src = net.state_dict()
    if arch == "resnet18_fpn":
        torch.testing.assert_close(bb.body.state_dict()["layer3.0.conv1.weight"], src["layer3.0.conv1.weight"])
        frozen = {n.split(".")[0] for n, p in bb.body.named_parameters() if not p.requires_grad}
        trained = {n.split(".")[0] for n, p in bb.body.named_parameters() if p.requires_grad}
        assert frozen == {"conv1", "layer1"} and trained == {"layer2", "layer3", "layer4"}
    else:
        torch.testing.assert_close(bb.body.state_dict()["13.conv.0.0.weight"], src["features.13.conv.0.0.weight"])
        frozen = {int(n.split(".")[0]) for n, p in bb.body.named_parameters() if not p.requires_grad}
        trained = {int(n.split(".")[0]) for n, p in bb.body.named_parameters() if p.requires_grad}
        assert frozen == {0, 1, 2, 3} and trained == set(range(4, 18))  # stages at strides 2 and 4 frozen
    assert all(p.requires_grad for p in bb.fpn.parameters())
    with pytest.raises(ValueError, match="does not fit"):
        build_backbone("resnet50_fpn", str(tmp_path / "imagenet.pth"))
