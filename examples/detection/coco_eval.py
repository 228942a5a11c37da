"""COCO bbox evaluation with pycocotools (all ranks predict their share, rank 0 evaluates).

``evaluate(model, loader, dataset, device, amp)`` runs ``model(images)`` in eval mode (torchvision detections in
original image pixels, xyxy, contiguous labels), maps labels back to COCO category ids, converts to xywh,
all-gathers the detections of every rank, and runs ``COCOeval(iouType="bbox")`` on the images that were
predicted. Returns the 12 standard numbers (fractions in [0, 1]; -1 where COCO has no ground truth of that size).
"""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from examples.common.amp import autocast
from examples.common.distributed import is_distributed

__all__ = ["evaluate", "STAT_NAMES", "coco_stats"]

STAT_NAMES = ("mAP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def coco_stats(coco_gt, detections: list[dict], img_ids: list[int], verbose: bool = False) -> dict[str, float]:
    """COCOeval bbox on ``detections`` (COCO result dicts) restricted to ``img_ids``; dict of ``STAT_NAMES``.

    With no detections at all every number is 0.0 (pycocotools cannot load an empty result list).
    """
    from pycocotools.cocoeval import COCOeval
    if not detections:
        return {k: 0.0 for k in STAT_NAMES}
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        coco_dt = coco_gt.loadRes(copy.deepcopy(detections))
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = sorted(set(img_ids))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(v) for k, v in zip(STAT_NAMES, ev.stats, strict=True)}


def _gather(obj):
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def evaluate(model: nn.Module, loader, dataset, device: torch.device, amp: str = "none",
             progress=None, verbose: bool = False) -> Optional[dict[str, float]]:
    """Predict with ``model`` over ``loader`` and score with COCOeval.

    Args:
        model: a detector (or ``DetectionDistiller``) whose eval-mode call returns torchvision detections.
        loader: yields (list of images [3, H, W], list of target dicts with "image_id").
        dataset: the ``CocoDetectionDataset`` (for ``coco`` and ``cat_ids``).
        progress: optional progress bar (``tqdm``) updated per batch.

    Returns:
        dict of the 12 COCO numbers on rank 0, None on other ranks.
    """
    was_training = model.training
    model.eval()
    dets, img_ids = [], []
    cat_ids = dataset.cat_ids
    for images, targets in loader:
        images = [im.to(device, non_blocking=True) for im in images]
        with autocast(device, amp):
            outputs = model(images)
        for out, tgt in zip(outputs, targets, strict=True):
            img_id = int(tgt["image_id"])
            img_ids.append(img_id)
            boxes = out["boxes"].float().cpu()
            if boxes.numel() == 0:
                continue
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
            for b, s, lab in zip(xywh, out["scores"].float().cpu().tolist(), out["labels"].cpu().tolist(), strict=True):
                dets.append({"image_id": img_id, "category_id": cat_ids[lab - 1], "bbox": b, "score": s})
        if progress is not None:
            progress.update(len(images))
    model.train(was_training)
    all_dets = _gather(dets)
    all_ids = _gather(img_ids)
    if is_distributed() and dist.get_rank() != 0:
        return None
    return coco_stats(dataset.coco, [d for part in all_dets for d in part], [i for part in all_ids for i in part],
                      verbose)
