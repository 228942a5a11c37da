"""Build datasets, student, teacher and the distiller from a config dict (see ``configs/_base_/``).

Config sections used here:
    data:    root, train_split, val_split, flip_prob, max_train_images, max_val_images
    model:   train_min_size [list], test_min_size, max_size, rcnn_kwargs {FasterRCNN keyword arguments},
             box_head_dim (1024)
    student: arch, backbone_checkpoint, trainable_backbone_layers
    teacher: arch, checkpoint, box_head_dim (the whole section may be null for the plain student baseline)
    distill: kd / dkd / wkd_l / wkd_f    (see ``distill.DistillLosses``)
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from examples.common.config import check_keys

from .data import CocoDetectionDataset, coco_paths
from .distill import DetectionDistiller, DistillLosses
from .models import build_detector, build_teacher

__all__ = ["section", "check_config_keys", "CONFIG_KEYS", "build_datasets", "build_student",
           "build_teacher_from_cfg", "build_distiller"]

# every key the detection scripts read (``distill`` sub-keys are checked by ``DistillLosses``,
# ``model.rcnn_kwargs`` by ``models.build_detector``); a misspelt key is an error, not a silent default
CONFIG_KEYS: dict[str, Optional[frozenset]] = {
    "seed": None, "device": None, "amp": None, "tensorboard": None, "out_dir": None, "expected_map": None,
    "distill": None,
    "data": frozenset({"root", "train_split", "val_split", "workers", "flip_prob", "max_train_images",
                       "max_val_images"}),
    "model": frozenset({"train_min_size", "test_min_size", "max_size", "rcnn_kwargs", "box_head_dim"}),
    "student": frozenset({"arch", "backbone_checkpoint", "trainable_backbone_layers"}),
    "teacher": frozenset({"arch", "checkpoint", "box_head_dim", "allow_random_init"}),
    "train": frozenset({"epochs", "batch_size", "base_lr", "base_batch", "momentum", "weight_decay", "warmup_iters",
                        "warmup_factor", "lr_steps", "lr_gamma", "clip_grad_norm", "eval_batch_size",
                        "eval_every_epochs", "log_interval", "checkpoint_interval", "stop_after_iters",
                        "find_unused_parameters"}),
}


def check_config_keys(cfg: Mapping[str, Any]) -> None:
    """Raise ValueError naming every unknown top-level or section key (e.g. ``train.lr`` for ``train.base_lr``)."""
    check_keys(cfg, {None: frozenset(CONFIG_KEYS), **{k: v for k, v in CONFIG_KEYS.items() if v is not None}},
               "detection config")


def section(cfg: Mapping[str, Any], name: str, required: tuple[str, ...] = ()) -> dict:
    """``cfg[name]`` as a dict (empty when missing or null), with ``required`` keys checked (error names them)."""
    s = cfg.get(name) or {}
    if not isinstance(s, Mapping):
        raise ValueError(f"config section `{name}` must be a mapping, got {s!r}")
    for k in required:
        if s.get(k) is None:
            raise ValueError(f"config key `{name}.{k}` is required")
    return dict(s)


def build_datasets(cfg: Mapping[str, Any], seed: int = 0, train: bool = True, val: bool = True):
    """(train dataset or None, val dataset or None) from the ``data`` section."""
    d = section(cfg, "data", ("root",))
    tr = va = None
    if train:
        img_dir, ann = coco_paths(d["root"], d.get("train_split", "train2017"))
        tr = CocoDetectionDataset(img_dir, ann, train=True, flip_prob=d.get("flip_prob", 0.5), seed=seed,
                                  max_images=d.get("max_train_images"))
    if val:
        img_dir, ann = coco_paths(d["root"], d.get("val_split", "val2017"))
        va = CocoDetectionDataset(img_dir, ann, train=False, max_images=d.get("max_val_images"))
    if tr is not None and va is not None and tr.cat_ids != va.cat_ids:
        raise ValueError("`data`: the train and val annotation files have different category ids")
    return tr, va


def _sizes(cfg: Mapping[str, Any]):
    m = section(cfg, "model")
    train_sizes = m.get("train_min_size", [640, 672, 704, 736, 768, 800])
    if isinstance(train_sizes, int):
        train_sizes = [train_sizes]
    if not train_sizes or not all(isinstance(s, int) and s > 0 for s in train_sizes):
        raise ValueError(f"`model.train_min_size` must be a positive integer or a list of them, got {train_sizes!r}")
    test_size = m.get("test_min_size", 800)
    return list(train_sizes), int(test_size), int(m.get("max_size", 1333)), dict(m.get("rcnn_kwargs") or {})


def _head_dim(cfg: Mapping[str, Any], who: str) -> int:
    """``model.box_head_dim`` (default 1024, torchvision's); ``teacher.box_head_dim`` overrides it for the teacher."""
    d = section(cfg, "model").get("box_head_dim", 1024)
    if who == "teacher":
        d = section(cfg, "teacher").get("box_head_dim", d)
    return d


def build_student(cfg: Mapping[str, Any], num_classes: int):
    s = section(cfg, "student", ("arch",))
    train_sizes, test_size, max_size, kw = _sizes(cfg)
    return build_detector(s["arch"], num_classes, train_sizes, max_size,
                          backbone_checkpoint=s.get("backbone_checkpoint"),
                          trainable_backbone_layers=s.get("trainable_backbone_layers", 3), rcnn_kwargs=kw,
                          box_head_dim=_head_dim(cfg, "student"))


def build_teacher_from_cfg(cfg: Mapping[str, Any], num_classes: int, cat_ids=None, allow_random: bool = False):
    """The frozen teacher, or None when ``teacher`` is null. ``teacher.checkpoint`` is required unless
    ``allow_random`` (benchmarks) or ``teacher.allow_random_init: true`` (never for real runs)."""
    if cfg.get("teacher") is None:
        return None
    t = section(cfg, "teacher", ("arch",))
    ckpt = t.get("checkpoint")
    if ckpt is None and not (allow_random or t.get("allow_random_init", False)):
        raise ValueError("config key `teacher.checkpoint` is required (a trained detector state dict; "
                         "see README: teachers)")
    train_sizes, test_size, max_size, kw = _sizes(cfg)
    return build_teacher(t["arch"], num_classes, ckpt, min_size=test_size, max_size=max_size,
                         coco_category_ids=cat_ids, rcnn_kwargs=kw, box_head_dim=_head_dim(cfg, "teacher"))


def build_distiller(cfg: Mapping[str, Any], num_classes: int, cat_ids=None, keep_tensors: bool = False,
                    allow_random_teacher: bool = False) -> DetectionDistiller:
    """Student + teacher (only when a distillation method is on) + losses, from the config."""
    losses = DistillLosses(cfg.get("distill"), num_classes)
    teacher = (build_teacher_from_cfg(cfg, num_classes, cat_ids, allow_random_teacher)
               if losses.needs_teacher else None)
    if losses.needs_teacher and teacher is None:
        raise ValueError(f"distillation methods {list(losses.enabled)} are on but the `teacher` section is null")
    student = build_student(cfg, num_classes)
    train_sizes, test_size, _, _ = _sizes(cfg)
    return DetectionDistiller(student, teacher, losses, train_sizes, test_size, keep_tensors=keep_tensors)


def optional_int(value: Optional[Any], key: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"config key `{key}` must be an integer or null, got {value!r}")
    return value
