"""Build the WKD-L class cost for detection: 1 - CKA between the teacher's per-class RoI features.

    python -m examples.detection.build_cost_matrix --config examples/detection/configs/r101_r18/wkd_l.yaml \
        --data /data/coco teacher.checkpoint=PATH --out costs/r101_coco.pt [--feature box_head] \
        [--max-per-class 100] [--bg-per-image 2] [--max-images N]

For every training image (resized to the test size, no flip) the teacher runs its backbone once and then
    * its box head on the ground-truth boxes -> one sample of the box's class per box;
    * its box head on ``--bg-per-image`` RPN proposals whose IoU with every ground-truth box is < 0.5 (what the
      box sampler labels background, ``box_bg_iou_thresh``) -> samples of the background class 0.
The sample of a box is ``--feature``: ``box_head`` (the 1024-d TwoMLPHead representation that feeds the
classifier, the analogue of the pooled feature the paper uses on ImageNet; default), ``logits`` (the K+1 class
logits) or ``roi`` (the flattened 256 x 7 x 7 RoIAlign output). Each class keeps a uniform reservoir sample of at
most ``--max-per-class`` samples; n = the smallest class count (every class then uses a random n of its samples,
as ``cka_distance`` pairs sample k of class i with sample k of class j), and

    distance = wkd_kernels.cka_distance(X [K+1, n, D])   (linear CKA; [K+1, K+1], zero diagonal, in [0, 1])

is saved with ``torch.save`` as a dict: distance, class_names, cat_ids, n_per_class, counts, feature, background,
teacher, checkpoint. ``distill.wkd_l.cost`` takes the file; the config's ``kappa`` sharpens it at load time.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
from torchvision.ops import box_iou

from examples.common.config import load_config
from wkd_kernels.interrelations import cka_distance

from .builders import build_datasets, build_teacher_from_cfg, resolve_config
from .data import collate

__all__ = ["collect_class_features", "build_cost", "main"]

FEATURES = ("box_head", "logits", "roi")


class _Reservoir:
    """Uniform sample of at most ``cap`` items from a stream (Algorithm R), seeded."""

    def __init__(self, cap: int, rng: random.Random):
        self.cap, self.rng, self.seen, self.items = cap, rng, 0, []

    def add(self, x: torch.Tensor) -> None:
        self.seen += 1
        if len(self.items) < self.cap:
            self.items.append(x)
        else:
            j = self.rng.randrange(self.seen)
            if j < self.cap:
                self.items[j] = x


@torch.no_grad()
def collect_class_features(teacher, dataset, feature: str = "box_head", max_per_class: int = 100,
                           bg_per_image: int = 2, max_images: int | None = None, seed: int = 0,
                           device: torch.device = torch.device("cpu"), batch_size: int = 2):
    """Per class (0 = background) a list of teacher feature vectors [D] (at most ``max_per_class``) and the
    number of boxes seen per class. See the module docstring for what a sample is."""
    if feature not in FEATURES:
        raise ValueError(f"`feature` must be one of {FEATURES}, got {feature!r}")
    C = dataset.num_classes
    rng = random.Random(seed)
    res = [_Reservoir(max_per_class, rng) for _ in range(C)]
    g = torch.Generator().manual_seed(seed)
    teacher.eval()
    rh = teacher.roi_heads
    n_img = len(dataset) if max_images is None else min(len(dataset), max_images)
    for start in range(0, n_img, batch_size):
        images, targets = collate([dataset[i] for i in range(start, min(n_img, start + batch_size))])
        images = [im.to(device) for im in images]
        targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
        images_t, targets_t = teacher.transform(images, targets)
        feats = teacher.backbone(images_t.tensors)
        boxes, labels = [], []
        if bg_per_image > 0:
            proposals, _ = teacher.rpn(images_t, feats)
        for i, t in enumerate(targets_t):
            b, lab = t["boxes"], t["labels"]
            if bg_per_image > 0 and len(proposals[i]):
                p = proposals[i]
                iou = box_iou(p, b).amax(1) if len(b) else torch.zeros(len(p), device=p.device)
                neg = p[iou < rh.proposal_matcher.low_threshold]  # box_bg_iou_thresh (0.5)
                if len(neg):
                    pick = torch.randperm(len(neg), generator=g)[:bg_per_image].to(neg.device)
                    b = torch.cat([b, neg[pick]])
                    lab = torch.cat([lab, torch.zeros(len(pick), dtype=lab.dtype, device=lab.device)])
            boxes.append(b)
            labels.append(lab)
        if sum(len(b) for b in boxes) == 0:
            continue
        x = rh.box_roi_pool(feats, boxes, images_t.image_sizes)
        if feature == "roi":
            x = x.flatten(1)
        else:
            x = rh.box_head(x)
            if feature == "logits":
                x = rh.box_predictor(x)[0]
        for xi, li in zip(x.float().cpu(), torch.cat(labels).cpu().tolist(), strict=True):
            res[li].add(xi)
    return [r.items for r in res], [r.seen for r in res]


def build_cost(per_class, counts, class_names, seed: int = 0) -> tuple[torch.Tensor, int]:
    """(distance [C, C], n) from per-class sample lists; errors name the classes with fewer than 3 samples."""
    # n = 2 is degenerate: every centred 2 x 2 Gram matrix is a multiple of [[1, -1], [-1, 1]], so CKA = 1
    few = [f"{i}:{class_names[i]} ({len(s)})" for i, s in enumerate(per_class) if len(s) < 3]
    if few:
        raise ValueError("build_cost_matrix: every class needs >= 3 samples (with 2 every CKA is 1); too few for "
                         + ", ".join(few[:10]) + (" ..." if len(few) > 10 else "")
                         + " (use more images, or --bg-per-image > 0 for the background class)")
    n = min(len(s) for s in per_class)
    rng = random.Random(seed + 1)
    X = torch.stack([torch.stack(rng.sample(s, n)) for s in per_class])  # [C, n, D]
    return cka_distance(X), n


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="a detection config with `teacher` and `data` sections")
    p.add_argument("--data", help="COCO root (overrides data.root)")
    p.add_argument("--out", required=True, help="output .pt file")
    p.add_argument("--feature", default="box_head", choices=FEATURES)
    p.add_argument("--max-per-class", type=int, default=100, help="cap on the samples kept per class")
    p.add_argument("--bg-per-image", type=int, default=2, help="negative proposals per image for class 0")
    p.add_argument("--max-images", type=int, default=None, help="use only the first N training images")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides, e.g. teacher.checkpoint=PATH")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.max_per_class < 3:
        raise SystemExit(f"build_cost_matrix: --max-per-class must be >= 3, got {a.max_per_class}")
    cfg = resolve_config(load_config(a.config, a.overrides), a.config)
    if a.data:
        cfg["data"]["root"] = a.data
    if cfg["teacher"] is None:
        raise SystemExit(f"build_cost_matrix: {a.config} has no `teacher` section")
    cfg["data"]["flip_prob"] = 0.0
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    ds, _ = build_datasets(cfg, seed=a.seed, val=False)
    teacher = build_teacher_from_cfg(cfg, ds.num_classes, ds.cat_ids).to(device)
    per_class, counts = collect_class_features(teacher, ds, a.feature, a.max_per_class, a.bg_per_image,
                                               a.max_images, a.seed, device, a.batch_size)
    d, n = build_cost(per_class, counts, ds.class_names, a.seed)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"distance": d, "class_names": ds.class_names, "cat_ids": ds.cat_ids, "n_per_class": n,
                "counts": counts, "feature": a.feature,
                "background": f"{a.bg_per_image} RPN proposals per image with IoU < 0.5 to every GT box",
                "teacher": cfg["teacher"]["arch"], "checkpoint": cfg["teacher"]["checkpoint"]}, out)
    off = d[~torch.eye(len(d), dtype=torch.bool)]
    print(f"[cost] {out}: [{len(d)}, {len(d)}] 1 - CKA of teacher {a.feature} features, n = {n} per class "
          f"(class counts min {min(counts)}, max {max(counts)}); off-diagonal min {off.min():.4f} "
          f"mean {off.mean():.4f} max {off.max():.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
