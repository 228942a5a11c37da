"""Build datasets, student, teacher and the distiller from a config dict (see ``configs/_base_/``).

The keys, types and defaults: ``examples.common.schema.DetectionConfig`` (``resolve_config``); sections used here:
    data:    root, train_split, val_split, flip_prob, max_train_images, max_val_images
    model:   train_min_size [list], test_min_size, max_size, rcnn_kwargs {FasterRCNN keyword arguments},
             box_head_dim (1024)
    student: arch, backbone_checkpoint, trainable_backbone_layers
    teacher: arch, checkpoint, box_head_dim (the whole section may be null for the plain student baseline)
    distill: method + its sections (see ``distill.DistillLosses``)
"""
from __future__ import annotations

from typing import Any, Mapping

from examples.common.checkpoint import is_trusted
from examples.common.schema import DetectionConfig, resolve

from .data import CocoDetectionDataset, coco_paths
from .distill import DetectionDistiller, DistillLosses
from .models import build_detector, build_teacher

__all__ = ["resolve_config", "section", "build_datasets", "build_student", "build_teacher_from_cfg",
           "build_distiller"]


def resolve_config(cfg: Mapping[str, Any], where: str = "detection config") -> dict:
    """``cfg`` checked against the schema (unknown keys name the closest valid one) with the defaults filled in."""
    return resolve(DetectionConfig, dict(cfg), where)


def section(cfg: Mapping[str, Any], name: str, required: tuple[str, ...] = ()) -> dict:
    """``cfg[name]`` (a resolved config's section) with ``required`` keys checked (the error names them)."""
    s = cfg.get(name) or {}
    for k in required:
        if s.get(k) is None:
            raise ValueError(f"config key `{name}.{k}` is required")
    return dict(s)


def build_datasets(cfg: Mapping[str, Any], seed: int = 0, train: bool = True, val: bool = True):
    """(train dataset or None, val dataset or None) from the ``data`` section."""
    cfg = resolve_config(cfg)
    d = section(cfg, "data", ("root",))
    tr = va = None
    if train:
        img_dir, ann = coco_paths(d["root"], d["train_split"])
        tr = CocoDetectionDataset(img_dir, ann, train=True, flip_prob=d["flip_prob"], seed=seed,
                                  max_images=d["max_train_images"])
    if val:
        img_dir, ann = coco_paths(d["root"], d["val_split"])
        va = CocoDetectionDataset(img_dir, ann, train=False, max_images=d["max_val_images"])
    if tr is not None and va is not None and tr.cat_ids != va.cat_ids:
        raise ValueError("`data`: the train and val annotation files have different category ids")
    return tr, va


def _sizes(cfg: Mapping[str, Any]):
    m = section(cfg, "model")
    train_sizes = m["train_min_size"]
    if isinstance(train_sizes, int):
        train_sizes = [train_sizes]
    if not train_sizes or not all(isinstance(s, int) and s > 0 for s in train_sizes):
        raise ValueError(f"`model.train_min_size` must be a positive integer or a list of them, got {train_sizes!r}")
    return list(train_sizes), int(m["test_min_size"]), int(m["max_size"]), dict(m["rcnn_kwargs"])


def _head_dim(cfg: Mapping[str, Any], who: str) -> int:
    """``model.box_head_dim`` (default 1024, torchvision's); ``teacher.box_head_dim`` overrides it for the teacher."""
    d = cfg["model"]["box_head_dim"]
    if who == "teacher" and cfg["teacher"]["box_head_dim"] is not None:
        d = cfg["teacher"]["box_head_dim"]
    return d


def build_student(cfg: Mapping[str, Any], num_classes: int):
    cfg = resolve_config(cfg)
    s = section(cfg, "student", ("arch",))
    train_sizes, test_size, max_size, kw = _sizes(cfg)
    return build_detector(s["arch"], num_classes, train_sizes, max_size,
                          backbone_checkpoint=s["backbone_checkpoint"],
                          trainable_backbone_layers=s["trainable_backbone_layers"], rcnn_kwargs=kw,
                          box_head_dim=_head_dim(cfg, "student"),
                          trusted=bool(s["backbone_checkpoint"]) and is_trusted(s["backbone_checkpoint"],
                                                                                cfg["train"]["trusted_checkpoints"]))


def build_teacher_from_cfg(cfg: Mapping[str, Any], num_classes: int, cat_ids=None, allow_random: bool = False):
    """The frozen teacher, or None when ``teacher`` is null. ``teacher.checkpoint`` is required unless
    ``allow_random`` (benchmarks) or ``teacher.allow_random_init: true`` (never for real runs)."""
    cfg = resolve_config(cfg)
    if cfg["teacher"] is None:
        return None
    t = section(cfg, "teacher", ("arch",))
    ckpt = t["checkpoint"]
    if ckpt is None and not (allow_random or t["allow_random_init"]):
        raise ValueError("config key `teacher.checkpoint` is required (a trained detector state dict; "
                         "see README: teachers)")
    train_sizes, test_size, max_size, kw = _sizes(cfg)
    return build_teacher(t["arch"], num_classes, ckpt, min_size=test_size, max_size=max_size,
                         coco_category_ids=cat_ids, rcnn_kwargs=kw, box_head_dim=_head_dim(cfg, "teacher"),
                         trusted=bool(ckpt) and is_trusted(ckpt, cfg["train"]["trusted_checkpoints"]))


def build_distiller(cfg: Mapping[str, Any], num_classes: int, cat_ids=None, keep_tensors: bool = False,
                    allow_random_teacher: bool = False) -> DetectionDistiller:
    """Student + teacher (only when the method needs one) + losses, from the config."""
    cfg = resolve_config(cfg)
    losses = DistillLosses(cfg["distill"], num_classes)
    teacher = (build_teacher_from_cfg(cfg, num_classes, cat_ids, allow_random_teacher)
               if losses.needs_teacher else None)
    if losses.needs_teacher and teacher is None:
        raise ValueError(f"distill.method {losses.method.name!r} needs a teacher but the `teacher` section is null")
    student = build_student(cfg, num_classes)
    train_sizes, test_size, _, _ = _sizes(cfg)
    return DetectionDistiller(student, teacher, losses, train_sizes, test_size, keep_tensors=keep_tensors)
