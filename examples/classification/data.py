"""Datasets and loaders: ImageNet (``train/`` and ``val/`` folders), CIFAR-100 (torchvision format), synthetic.

Config keys (section ``data``; types and defaults: ``examples.common.schema.ClsDataConfig``):
    dataset: ``imagenet`` | ``cifar100`` | ``folder`` | ``synthetic`` (``--synthetic`` forces the latter;
        ``--data-dir`` sets ``folder``)
    root: dataset directory (ImageNet and ``folder``: holds ``train/`` and ``val/`` class folders, torchvision's
        ImageFolder layout; CIFAR-100: the directory that holds ``cifar-100-python/``, nothing is downloaded)
    num_classes, input_size: classes and the square training resolution (32 for CIFAR models, 224 otherwise;
        CIFAR-100 at 224 is the cross-architecture setting: images are upsampled)
    hflip: random horizontal flips in training (``folder`` only; off for data that flipping changes, e.g. digits)
    workers: DataLoader worker processes per training process
    synthetic_size / synthetic_val_size: samples of the synthetic train / val sets
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

__all__ = ["SyntheticDataset", "build_datasets", "build_loaders", "ShardSampler", "class_folders", "IMAGENET_MEAN",
           "IMAGENET_STD", "CIFAR100_MEAN", "CIFAR100_STD"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
DATASETS = ("imagenet", "cifar100", "folder", "synthetic")


class SyntheticDataset(Dataset):
    """Random images and labels, deterministic per index (no files, no augmentation).

    Sample i: label = a draw in [0, num_classes) from a generator seeded with (seed, i); image = N(0, 1) noise
    plus a fixed class-dependent pattern of amplitude ``signal`` (so the task is learnable in a few steps).
    Images are [3, input_size, input_size] float32, already "normalised".
    """

    def __init__(self, size: int, num_classes: int, input_size: int, seed: int = 0, signal: float = 0.5):
        if int(size) < 1:
            raise ValueError(f"SyntheticDataset: `size` (data.synthetic_size) must be >= 1, got {size}")
        if int(num_classes) < 2:
            raise ValueError(f"SyntheticDataset: `num_classes` must be >= 2, got {num_classes}")
        if int(input_size) < 1:
            raise ValueError(f"SyntheticDataset: `input_size` must be >= 1, got {input_size}")
        self.size, self.num_classes, self.input_size = int(size), int(num_classes), int(input_size)
        self.seed, self.signal = int(seed), float(signal)
        g = torch.Generator().manual_seed(self.seed * 7919 + 17)
        self._patterns_low = torch.randn(self.num_classes, 3, 4, 4, generator=g)
        self.targets = [int(torch.randint(self.num_classes, (1,), generator=self._gen(i))) for i in range(self.size)]

    def _gen(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + index) % (2**63 - 1))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(f"SyntheticDataset: index {index} out of range [0, {self.size})")
        g = self._gen(index)
        label = int(torch.randint(self.num_classes, (1,), generator=g))
        img = torch.randn(3, self.input_size, self.input_size, generator=g)
        pattern = torch.nn.functional.interpolate(self._patterns_low[label][None], size=self.input_size,
                                                  mode="nearest")[0]
        return img + self.signal * pattern, label


class ShardSampler(Sampler[int]):
    """Evaluation sampler: rank r of w takes indices r, r + w, ... (no padding, so every sample counts once)."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def class_folders(root, split: str = "train") -> list:
    """The sorted class folder names of ``root/split`` (torchvision ImageFolder's classes); errors say what to
    create."""
    d = Path(root).expanduser() / split
    if not d.is_dir():
        raise FileNotFoundError(f"--data-dir: {Path(root).expanduser()} must hold `train/` and `val/` folders with "
                                f"one sub-folder of images per class ({d} is missing)")
    classes = sorted(e.name for e in d.iterdir() if e.is_dir())
    if len(classes) < 2:
        raise ValueError(f"--data-dir: {d} has {len(classes)} class folder(s); classification needs >= 2 "
                         f"(one sub-folder of images per class)")
    return classes


def _transforms(dataset: str, input_size: int, hflip: bool = True):
    from torchvision import transforms as T
    if dataset == "folder":  # your own images: resized to input_size, CIFAR-style crop augmentation
        norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        size = T.Resize((input_size, input_size), antialias=True)
        flip = [T.RandomHorizontalFlip()] if hflip else []
        train = T.Compose([size, T.RandomCrop(input_size, padding=max(1, input_size // 8)), *flip, T.ToTensor(),
                           norm])
        return train, T.Compose([size, T.ToTensor(), norm])
    if dataset == "imagenet":
        norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        resize = int(round(input_size * 256 / 224))
        train = T.Compose([T.RandomResizedCrop(input_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        val = T.Compose([T.Resize(resize), T.CenterCrop(input_size), T.ToTensor(), norm])
        return train, val
    norm = T.Normalize(CIFAR100_MEAN, CIFAR100_STD)
    if input_size == 32:  # the CRD / mdistiller CIFAR recipe
        train = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        val = T.Compose([T.ToTensor(), norm])
        return train, val
    # cross-architecture setting: CIFAR images upsampled to the ImageNet resolution of the pretrained teachers
    pad = input_size // 8
    train = T.Compose([T.Resize(input_size, interpolation=T.InterpolationMode.BICUBIC),
                       T.RandomCrop(input_size, padding=pad), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    val = T.Compose([T.Resize(input_size, interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(), norm])
    return train, val


def build_datasets(data_cfg: dict, *, train_transform: bool = True) -> Tuple[Dataset, Dataset]:
    """(train, val) datasets for the ``data`` config section (see the module docstring).

    Args:
        train_transform: False gives the training set the evaluation transform (what the cost-matrix tool uses).
    """
    from examples.common.schema import ClsDataConfig, resolve
    data_cfg = resolve(ClsDataConfig, dict(data_cfg), "data", prefix="data.")
    dataset = data_cfg["dataset"]
    if dataset not in DATASETS:
        raise ValueError(f"data.dataset must be one of {DATASETS}, got {dataset!r}")
    num_classes, input_size = int(data_cfg["num_classes"]), int(data_cfg["input_size"])
    if dataset == "synthetic":
        seed = data_cfg["synthetic_seed"]
        train = SyntheticDataset(data_cfg["synthetic_size"], num_classes, input_size, seed=seed)
        val = SyntheticDataset(data_cfg["synthetic_val_size"], num_classes, input_size, seed=seed + 1)
        return train, val
    root = data_cfg["root"]
    if not root:
        raise ValueError(f"data.root is not set: pass --data DIR (the {dataset} directory) or --synthetic")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: {root} is not a directory")
    t_train, t_val = _transforms(dataset, input_size, bool(data_cfg["hflip"]))
    if not train_transform:
        t_train = t_val
    if dataset in ("imagenet", "folder"):
        from torchvision.datasets import ImageFolder
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise FileNotFoundError(f"data.root: {root} must hold `train/` and `val/` class folders "
                                        f"({root / split} is missing)")
        train, val = ImageFolder(str(root / "train"), t_train), ImageFolder(str(root / "val"), t_val)
        if val.classes != train.classes:
            raise ValueError(f"data.root: the class folders of {root / 'val'} differ from those of "
                             f"{root / 'train'}: {sorted(set(val.classes) ^ set(train.classes))[:5]}")
    else:
        from torchvision.datasets import CIFAR100
        if not (root / "cifar-100-python").is_dir():
            raise FileNotFoundError(f"data.root: {root} must hold torchvision's `cifar-100-python/` folder "
                                    f"(nothing is downloaded)")
        train = CIFAR100(str(root), train=True, transform=t_train, download=False)
        val = CIFAR100(str(root), train=False, transform=t_val, download=False)
    n = len(train.classes)
    if n != num_classes:
        raise ValueError(f"data.num_classes is {num_classes} but {root} has {n} classes")
    return train, val


def build_loaders(train_set: Dataset, val_set: Dataset, *, batch_size: int, rank: int, world_size: int, seed: int,
                  workers: int, pin_memory: bool, eval_batch_size: Optional[int] = None
                  ) -> Tuple[DataLoader, DistributedSampler, DataLoader]:
    """Training loader over a DistributedSampler (shuffle, drop_last; call ``sampler.set_epoch`` every epoch) and a
    sharded evaluation loader. ``batch_size`` is per process.

    The sampler's permutation depends only on (seed, epoch), so a world of w processes with batch b sees, step by
    step, the same global batches as one process with batch w * b.
    """
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    # Exact resume: the training workers are started anew every epoch (not persistent), so their augmentation
    # RNG is seeded from the process RNG at the start of the epoch, which --resume restores; persistent workers
    # would carry their streams over from earlier epochs. The evaluation loader draws its worker seeds from its
    # own generator, never from the process RNG (it runs no random transform).
    train = DataLoader(train_set, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=workers,
                       pin_memory=pin_memory, persistent_workers=False)
    val = DataLoader(val_set, batch_size=eval_batch_size or batch_size,
                     sampler=ShardSampler(len(val_set), rank, world_size), drop_last=False, num_workers=workers,
                     pin_memory=pin_memory, persistent_workers=workers > 0, generator=torch.Generator())
    if len(train) == 0:
        raise ValueError(f"train.batch_size: the training set has {len(train_set)} samples, fewer than one global "
                         f"batch of {batch_size * world_size}")
    return train, sampler, val
