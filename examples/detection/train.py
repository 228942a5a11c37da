"""Train a Faster R-CNN FPN student on COCO, alone or distilled (KD, DKD, WKD-L, WKD-F) from a frozen teacher.

    python -m examples.detection.train --config examples/detection/configs/r101_r18/wkd_lf.yaml \
        --data /data/coco --out runs/r101_r18_wkd_lf [--resume] [--synthetic] [key=value ...]
    torchrun --nproc_per_node 8 -m examples.detection.train --config ... --data ... --out ...

The loop, DDP, AMP, lr schedule, resume, checkpoints and logging are ``examples.common.trainer``'s (the same as
classification's); this file is the detection task: grouped, resumable batches (``data.GroupedEpochBatchSampler``),
one ``DetectionDistiller`` forward per step, COCO evaluation. Keys, types and defaults:
``examples.common.schema.DetectionConfig``. Schedule (``train``): SGD momentum 0.9, weight decay 1e-4, lr =
``train.lr * batch_size / base_batch`` (0.02 for 16 images; ``batch_size`` is the GLOBAL batch), linear warm-up
from ``warmup_factor`` over ``warmup_iters`` iterations, x0.1 at the ``milestones`` epochs (1x: 12 epochs, steps 8
and 11). Multi-scale training (``model.train_min_size``), test size ``model.test_min_size``.

Outputs in --out: ``last.pth`` (the trainer's train state, every ``train.checkpoint_every`` iterations and at each
epoch end), ``final.pth`` (student weights), ``metrics.jsonl`` + ``tb/``, ``results.json`` (COCO numbers of the
last evaluation and the paper's ``expected_map``), ``config.yaml`` (the resolved config).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from examples.common.checkpoint import save_checkpoint
from examples.common.config import load_config
from examples.common.distributed import DistInfo, cleanup_distributed, init_distributed, seed_everything
from examples.common.trainer import Task, Trainer, per_process_batch
from tqdm.auto import tqdm

from .builders import build_datasets, build_distiller, resolve_config
from .coco_eval import evaluate
from .data import GroupedEpochBatchSampler, collate, make_synthetic_coco

__all__ = ["main", "train", "parse_args", "DetectionTask"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="YAML config (examples/detection/configs/...)")
    p.add_argument("--data", help="COCO root (overrides data.root)")
    p.add_argument("--out", help="output directory (overrides out_dir)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pth if it exists")
    p.add_argument("--synthetic", action="store_true",
                   help="generate a tiny synthetic COCO set under OUT/synthetic_coco and train on it (smoke runs; "
                        "a missing teacher checkpoint or WKD-L cost is replaced by a random stand-in)")
    p.add_argument("--trust-checkpoint", action="append", default=[], metavar="FILE",
                   help="load FILE (teacher / backbone weights or OUT/last.pth) with full unpickling "
                        "(weights_only=False), which can run code stored in it: only for files you trust; "
                        "repeatable (adds to train.trusted_checkpoints)")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides, e.g. train.epochs=1")
    return p.parse_args(argv)


def _to_device(images, targets, device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{"boxes": t["boxes"].to(device, non_blocking=True), "labels": t["labels"].to(device, non_blocking=True)}
               for t in targets]
    return images, targets


class DetectionTask(Task):
    """Detection hooks of the common trainer (module docstring)."""
    name = "detection"
    score_key = "mAP"
    mid_epoch_resume = True  # the batch sampler skips the batches done; flips are a function of (seed, epoch, i)
    checkpoint_before_eval = True  # COCO evaluation is long: checkpoint first, a resumed run evaluates first

    def __init__(self, cfg: dict, info: DistInfo):
        self.cfg, self.info, self.device = cfg, info, info.device
        tcfg = cfg["train"]
        per_proc = per_process_batch(tcfg["batch_size"], info.world_size)
        self.seed, self.workers = tcfg["seed"], cfg["data"]["workers"]
        self.train_ds, self.val_ds = build_datasets(cfg, seed=self.seed)
        self.model = self.distiller = build_distiller(cfg, self.train_ds.num_classes, self.train_ds.cat_ids)
        self.sampler = GroupedEpochBatchSampler(self.train_ds.aspect_ratios, per_proc, info.rank, info.world_size,
                                                self.seed)
        eval_bs = tcfg["eval_batch_size"] or per_proc
        self.val_idx = list(range(info.rank, len(self.val_ds), info.world_size))  # no padding: each image once
        self.val_loader = DataLoader(self.val_ds, batch_sampler=[self.val_idx[k:k + eval_bs]
                                                                 for k in range(0, len(self.val_idx), eval_bs)],
                                     collate_fn=collate, num_workers=self.workers,
                                     pin_memory=self.device.type == "cuda")
        if info.is_main:
            n = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            print(f"[train] student {cfg['student']['arch']}, method {self.distiller.losses.method.name}, "
                  f"{len(self.train_ds)} train / {len(self.val_ds)} val images, {n / 1e6:.1f} M trainable "
                  f"parameters", flush=True)

    def state_modules(self) -> Dict[str, nn.Module]:
        return {"model": self.distiller.student, "distill": self.distiller.losses}

    def iters_per_epoch(self) -> int:
        return len(self.sampler)

    def batches(self, epoch: int, start_batch: int):
        self.train_ds.set_epoch(epoch)
        self.sampler.set_epoch(epoch, start_batch)
        # an explicit generator keeps DataLoader from drawing its worker seed from the global RNG (exact resume)
        return iter(DataLoader(self.train_ds, batch_sampler=self.sampler, collate_fn=collate,
                               num_workers=self.workers, pin_memory=self.device.type == "cuda",
                               generator=torch.Generator().manual_seed(self.seed * 1000 + epoch)))

    def step(self, model: nn.Module, batch, step: int):
        images, targets = _to_device(*batch, self.device)
        self.distiller.iteration = step  # DKD warm-up
        return dict(model(images, targets))

    def evaluate(self, model: nn.Module, epoch: int) -> Optional[dict]:
        bar = tqdm(total=len(self.val_idx), desc=f"eval epoch {epoch}", unit="img",  # this rank's share
                   disable=not (self.info.is_main and self.cfg["train"]["progress"]))
        metrics = evaluate(model, self.val_loader, self.val_ds, self.device, self.cfg["train"]["amp"], bar)
        bar.close()
        return metrics  # COCOeval reports -1 where the ground truth has no object of that size

    def finish(self, out: Path, summary: Dict[str, Any]) -> Dict[str, Any]:
        if self.info.is_main:
            save_checkpoint(out / "final.pth", {"model": self.distiller.student.state_dict(), "config": self.cfg})
            with open(out / "results.json", "w") as f:
                json.dump({"coco_bbox": summary["metrics"], "expected_map": self.cfg["expected_map"],
                           "iterations": summary["steps"]}, f, indent=2)
        return summary


def train(cfg: dict[str, Any], out_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Run the whole training described by ``cfg``; returns the trainer's summary: ``losses`` (per-iteration
    total loss of this process, for tests), ``metrics`` (last COCO numbers or None), ``steps`` and
    ``stopped_early``."""
    cfg = resolve_config(cfg)
    info = init_distributed(cfg["train"]["device"])
    try:
        seed_everything(cfg["train"]["seed"], 0)  # identical initialisation on every rank
        task = DetectionTask(cfg, info)
        return Trainer(cfg, task, info, Path(out_dir), resume=resume).run()
    finally:
        cleanup_distributed()


def _synthetic_stand_ins(cfg: dict, out: Path) -> None:
    """--synthetic: a missing teacher checkpoint -> random teacher, a missing WKD-L cost -> a random stand-in."""
    from examples.common.methods import METHODS
    method = METHODS.get(cfg["distill"]["method"])
    if method is None or not method.needs_teacher:
        return
    if cfg["teacher"] is not None and cfg["teacher"]["checkpoint"] is None:
        print("[train] --synthetic: no teacher.checkpoint, the teacher is randomly initialised", flush=True)
        cfg["teacher"]["allow_random_init"] = True
    wkd_l = cfg["distill"]["wkd_l"]
    if "wkd_l" in method.terms and (wkd_l["cost"] is None or not Path(str(wkd_l["cost"])).is_file()):
        path = out / "synthetic_coco" / "stand_in_cost.pt"
        if os.environ.get("RANK", "0") == "0" and not path.is_file():
            k = len(json.loads((out / "synthetic_coco" / "annotations" / "instances_val2017.json").read_text())
                    ["categories"]) + 1
            d = torch.rand(k, k, generator=torch.Generator().manual_seed(0))
            torch.save({"distance": ((d + d.T) / 2).fill_diagonal_(0.0)}, path)
        for _ in range(600):  # other torchrun ranks wait for rank 0's file
            if path.is_file():
                break
            time.sleep(0.1)
        what = "no distill.wkd_l.cost" if wkd_l["cost"] is None else f"WKD-L cost {wkd_l['cost']} not found"
        print(f"[train] --synthetic: {what}, using a RANDOM stand-in ({path}); the loss values are not the paper's",
              flush=True)
        wkd_l["cost"] = str(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = resolve_config(load_config(args.config, args.overrides), args.config)
    cfg["train"]["trusted_checkpoints"] = list(cfg["train"]["trusted_checkpoints"]) + \
        [str(Path(f).expanduser().resolve()) for f in args.trust_checkpoint]
    out = args.out or cfg["out_dir"]
    if not out:
        raise SystemExit("train: give --out DIR (or `out_dir` in the config)")
    if args.synthetic:
        root = Path(out) / "synthetic_coco"
        done = root / "annotations" / "instances_val2017.json"  # written last
        if os.environ.get("RANK", "0") == "0":
            if not done.is_file():
                make_synthetic_coco(root, num_train=16, num_val=4)
        else:
            for _ in range(600):  # other torchrun ranks wait for rank 0's files
                if done.is_file():
                    break
                time.sleep(0.1)
        cfg["data"]["root"] = str(root)
        _synthetic_stand_ins(cfg, Path(out))
    if args.data:
        cfg["data"]["root"] = args.data
    train(cfg, out, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
