"""COCO-format detection data: dataset, deterministic distributed batch sampler, synthetic COCO generator.

Layout (COCO 2017): ``ROOT/train2017/*.jpg``, ``ROOT/val2017/*.jpg``, ``ROOT/annotations/instances_{split}.json``.

Targets for torchvision detectors: ``boxes`` [N, 4] float32 xyxy in pixels, ``labels`` [N] int64 in 1..K
(contiguous: label k = the k-th category id in ascending order, background 0), ``image_id`` int. Crowd boxes
(``iscrowd=1``) and boxes of zero width/height after clipping are dropped; training drops images left without
a box (torchvision reference behaviour).
"""
from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torch.utils.data import Dataset, Sampler
from torchvision.transforms.functional import pil_to_tensor

__all__ = ["CocoDetectionDataset", "GroupedEpochBatchSampler", "collate", "make_synthetic_coco", "coco_paths"]


def coco_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """(image folder, annotation file) of ``split`` ("train2017", "val2017", ...) under ``root``; checked."""
    root = Path(root)
    img_dir, ann = root / split, root / "annotations" / f"instances_{split}.json"
    if not img_dir.is_dir():
        raise FileNotFoundError(f"`data.root`: image folder {img_dir} does not exist (COCO layout expected: "
                                f"ROOT/{split}/, ROOT/annotations/instances_{split}.json)")
    if not ann.is_file():
        raise FileNotFoundError(f"`data.root`: annotation file {ann} does not exist")
    return img_dir, ann


class CocoDetectionDataset(Dataset):
    """COCO detection dataset returning (image [3, H, W] float in [0, 1], target dict).

    Args:
        img_dir, ann_file: image folder and ``instances_*.json``.
        train: drop images without valid boxes and apply the horizontal flip.
        flip_prob: probability of the horizontal flip in training.
        seed: the flip of sample ``i`` in epoch ``e`` is a function of (seed, e, i) (``set_epoch``), so it does
            not depend on worker processes and a resumed run repeats it exactly.
        max_images: keep only the first ``max_images`` images (after filtering), for quick runs.

    Attributes: ``coco`` (pycocotools COCO), ``ids`` (image ids), ``cat_ids`` (sorted COCO category ids; label k is
    ``cat_ids[k - 1]``), ``num_classes`` (K + 1), ``class_names``, ``aspect_ratios`` (w / h per image).
    """

    def __init__(self, img_dir: str | Path, ann_file: str | Path, train: bool, flip_prob: float = 0.5, seed: int = 0,
                 max_images: Optional[int] = None):
        from pycocotools.coco import COCO
        import contextlib
        import io
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(str(ann_file))
        self.img_dir = Path(img_dir)
        self.train, self.flip_prob, self.seed, self.epoch = train, float(flip_prob), int(seed), 0
        self.cat_ids = sorted(self.coco.getCatIds())
        if not self.cat_ids:
            raise ValueError(f"{ann_file}: no categories")
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.class_names = ["__background__"] + [self.coco.cats[c]["name"] for c in self.cat_ids]
        self.num_classes = len(self.cat_ids) + 1
        ids = sorted(self.coco.imgs.keys())
        if train:
            ids = [i for i in ids if self._target(i)[0].shape[0] > 0]
        if max_images is not None:
            ids = ids[: int(max_images)]
        if not ids:
            raise ValueError(f"{ann_file}: no usable images")
        self.ids = ids
        self.aspect_ratios = [self.coco.imgs[i]["width"] / self.coco.imgs[i]["height"] for i in ids]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.ids)

    def _target(self, img_id: int) -> tuple[Tensor, Tensor]:
        info = self.coco.imgs[img_id]
        w, h = info["width"], info["height"]
        boxes, labels = [], []
        for a in self.coco.imgToAnns.get(img_id, []):
            if a.get("iscrowd", 0):
                continue
            x, y, bw, bh = a["bbox"]
            x0, y0 = max(0.0, x), max(0.0, y)
            x1, y1 = min(float(w), x + bw), min(float(h), y + bh)
            if x1 > x0 and y1 > y0:
                boxes.append([x0, y0, x1, y1])
                labels.append(self.cat_to_label[a["category_id"]])
        return (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                torch.tensor(labels, dtype=torch.int64))

    def __getitem__(self, idx: int) -> tuple[Tensor, dict]:
        img_id = self.ids[idx]
        info = self.coco.imgs[img_id]
        with Image.open(self.img_dir / info["file_name"]) as im:
            img = pil_to_tensor(im.convert("RGB")).float().div_(255.0)
        boxes, labels = self._target(img_id)
        if self.train and self.flip_prob > 0:
            r = random.Random(self.seed * 1_000_003 + self.epoch * 7_919 + idx)
            if r.random() < self.flip_prob:
                img = img.flip(-1)
                W = img.shape[-1]
                boxes = torch.stack([W - boxes[:, 2], boxes[:, 1], W - boxes[:, 0], boxes[:, 3]], 1)
        return img, {"boxes": boxes, "labels": labels, "image_id": img_id}


def collate(batch):
    """List of (image, target) -> (list of images, list of targets) (images keep their own sizes)."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


class GroupedEpochBatchSampler(Sampler[list[int]]):
    """Deterministic, resumable batches for one rank, images grouped by orientation (w >= h vs w < h).

    Epoch ``e`` permutes all indices with a generator seeded by (seed, e), pads to a multiple of ``world_size``
    and keeps every ``world_size``-th index from ``rank``. Indices go into two buckets by aspect ratio; a full
    bucket is a batch (less padding, as torchvision's GroupedBatchSampler); leftovers form the last batches.
    Every rank gets ceil(n_rank / batch_size) batches, so DDP ranks stay in step. ``set_epoch(e, start_batch)``
    skips the first ``start_batch`` batches (resume inside an epoch).
    """

    def __init__(self, aspect_ratios: Sequence[float], batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
        self.groups = [int(a >= 1.0) for a in aspect_ratios]
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def _rank_indices(self) -> list[int]:
        n = len(self.groups)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        per_rank = math.ceil(n / self.world_size)
        order = (order * math.ceil(per_rank * self.world_size / n))[: per_rank * self.world_size]
        return order[self.rank::self.world_size]

    def _batches(self) -> list[list[int]]:
        buckets: dict[int, list[int]] = {0: [], 1: []}
        out = []
        for i in self._rank_indices():
            b = buckets[self.groups[i]]
            b.append(i)
            if len(b) == self.batch_size:
                out.append(list(b))
                b.clear()
        rest = buckets[0] + buckets[1]
        out += [rest[k:k + self.batch_size] for k in range(0, len(rest), self.batch_size)]
        return out

    def __len__(self) -> int:
        return math.ceil(math.ceil(len(self.groups) / self.world_size) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches()[self.start_batch:])


# ------------------------------------------------------------------------------------------ synthetic COCO
_COLOURS = [(230, 40, 40), (40, 200, 60), (50, 80, 230), (230, 200, 30)]


def make_synthetic_coco(root: str | Path, num_train: int = 8, num_val: int = 4, num_categories: int = 3,
                        size_range: tuple[int, int] = (96, 160), max_objects: int = 3, seed: int = 0) -> Path:
    """Write a tiny COCO-layout dataset of coloured rectangles (category = colour) on noisy backgrounds.

    Creates ``root/train2017``, ``root/val2017`` (JPEG) and ``root/annotations/instances_{train,val}2017.json``
    with category ids 1, 3, 5, ... (deliberately not contiguous, as COCO's). Returns ``root``.
    """
    if not 1 <= num_categories <= len(_COLOURS):
        raise ValueError(f"`num_categories` must be in [1, {len(_COLOURS)}], got {num_categories}")
    root = Path(root)
    rng = random.Random(seed)
    cats = [{"id": 2 * k + 1, "name": f"rect{k}", "supercategory": "shape"} for k in range(num_categories)]
    ann_id = 1
    for split, n in (("train2017", num_train), ("val2017", num_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(n):
            w, h = rng.randint(*size_range), rng.randint(*size_range)
            im = Image.new("RGB", (w, h), tuple(rng.randint(90, 160) for _ in range(3)))
            draw = ImageDraw.Draw(im)
            for _ in range(rng.randint(1, max_objects)):
                k = ann_id % num_categories  # round robin: every category is present, in equal numbers
                bw, bh = rng.randint(w // 5, w // 2), rng.randint(h // 5, h // 2)
                x, y = rng.randint(0, w - bw - 1), rng.randint(0, h - bh - 1)
                draw.rectangle([x, y, x + bw - 1, y + bh - 1], fill=_COLOURS[k])
                anns.append({"id": ann_id, "image_id": i + 1, "category_id": cats[k]["id"],
                             "bbox": [float(x), float(y), float(bw), float(bh)], "area": float(bw * bh),
                             "iscrowd": 0})
                ann_id += 1
            name = f"{i + 1:012d}.jpg"
            im.save(root / split / name, quality=95)
            images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        path = root / "annotations" / f"instances_{split}.json"
        tmp = path.with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            json.dump({"images": images, "annotations": anns, "categories": cats}, f)
        os.replace(tmp, path)  # atomic: a reader never sees half a file
    return root
