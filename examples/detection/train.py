"""Train a Faster R-CNN FPN student on COCO, alone or distilled (KD, DKD, WKD-L, WKD-F) from a frozen teacher.

    python -m examples.detection.train --config examples/detection/configs/r101_r18/wkd_lf.yaml \
        --data /data/coco --out runs/r101_r18_wkd_lf [--resume] [key=value ...]
    torchrun --nproc_per_node 8 -m examples.detection.train --config ... --data ... --out ...

Schedule (``train`` section): SGD momentum 0.9, weight decay 1e-4, lr = base_lr * global_batch / base_batch
(0.02 for 16 images), linear warm-up from warmup_factor over warmup_iters iterations, x0.1 at the epochs in
lr_steps (1x: 12 epochs, steps 8 and 11). Multi-scale training (``model.train_min_size``, one size per image
picked by torchvision's transform), test size ``model.test_min_size``.

Outputs in --out: ``last.pth`` (everything needed to resume: student, distill modules, optimizer, scheduler, grad
scaler, epoch, batch, iteration, RNG of every rank, and whether the epoch-end evaluation is still due: a resumed
run runs it first), written every ``train.checkpoint_interval`` iterations and at each epoch end (before its
evaluation); ``final.pth`` (student weights); ``metrics.csv`` + ``tb/`` (TensorBoard); ``results.json`` (COCO
numbers of the last evaluation and the paper's ``expected_map``); ``config.yaml`` (the resolved config).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from examples.common.amp import autocast, make_grad_scaler
from examples.common.checkpoint import (capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint,
                                        unwrap_model)
from examples.common.config import load_config
from examples.common.distributed import (DistInfo, all_reduce_mean, barrier, cleanup_distributed, init_distributed,
                                         is_distributed, seed_everything)
from examples.common.metrics_log import MetricLogger
from examples.common.progress import Progress

from .builders import build_datasets, build_distiller, check_config_keys, optional_int, section
from .coco_eval import evaluate
from .data import GroupedEpochBatchSampler, collate, make_synthetic_coco

__all__ = ["main", "train", "WarmupMultiStep", "parse_args"]


class WarmupMultiStep:
    """LR factor of global iteration ``it``: linear warm-up then x gamma at each epoch milestone.

        factor(it) = warmup(it) * gamma ** #{m in milestones : it >= m * iters_per_epoch}
        warmup(it) = warmup_factor + (1 - warmup_factor) * it / warmup_iters   for it < warmup_iters, else 1

    A callable object (not a lambda) so ``LambdaLR.state_dict()`` stores it.
    """

    def __init__(self, iters_per_epoch: int, milestones, gamma: float = 0.1, warmup_iters: int = 1000,
                 warmup_factor: float = 0.001):
        self.iters_per_epoch, self.milestones = int(iters_per_epoch), [int(m) for m in milestones]
        self.gamma, self.warmup_iters, self.warmup_factor = float(gamma), int(warmup_iters), float(warmup_factor)

    def __call__(self, it: int) -> float:
        f = 1.0
        if it < self.warmup_iters:
            a = it / self.warmup_iters
            f = self.warmup_factor * (1 - a) + a
        return f * self.gamma ** sum(it >= m * self.iters_per_epoch for m in self.milestones)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="YAML config (examples/detection/configs/...)")
    p.add_argument("--data", help="COCO root (overrides data.root)")
    p.add_argument("--out", help="output directory (overrides out_dir)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pth if it exists")
    p.add_argument("--synthetic", action="store_true",
                   help="generate a tiny synthetic COCO set under OUT/synthetic_coco and train on it (smoke runs)")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides, e.g. train.epochs=1")
    return p.parse_args(argv)


def _gather_rng(info: DistInfo) -> list:
    state = capture_rng_state()
    if not is_distributed():
        return [state]
    import torch.distributed as dist
    out = [None] * info.world_size
    dist.all_gather_object(out, state)
    return out


def _loader(ds, batch_sampler, workers: int, device: torch.device, seed: int) -> DataLoader:
    # an explicit generator keeps DataLoader from drawing its worker seed from the global RNG (exact resume)
    return DataLoader(ds, batch_sampler=batch_sampler, collate_fn=collate, num_workers=workers,
                      pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed))


def _to_device(images, targets, device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{"boxes": t["boxes"].to(device, non_blocking=True), "labels": t["labels"].to(device, non_blocking=True)}
               for t in targets]
    return images, targets


def train(cfg: dict[str, Any], out_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Run the whole training described by ``cfg`` (see the module docstring); returns a summary dict with
    ``losses`` (per-iteration total loss of this process, for tests), ``metrics`` (last COCO numbers or None),
    ``iteration`` (global iterations done) and ``stopped_early``."""
    out_dir = Path(out_dir)
    info = init_distributed(cfg.get("device", "auto"))
    try:
        return _train(cfg, out_dir, resume, info)
    finally:
        cleanup_distributed()


def _train(cfg: dict[str, Any], out_dir: Path, resume: bool, info: DistInfo) -> dict[str, Any]:
    check_config_keys(cfg)
    tr = section(cfg, "train")
    seed = int(cfg.get("seed", 0))
    amp = cfg.get("amp", "none")
    device = info.device
    seed_everything(seed, info.rank)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "config.yaml", "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)

    train_ds, val_ds = build_datasets(cfg, seed=seed)
    model = build_distiller(cfg, train_ds.num_classes, train_ds.cat_ids).to(device)
    batch_size = int(tr.get("batch_size", 2))
    global_batch = batch_size * info.world_size
    lr = float(tr.get("base_lr", 0.02)) * global_batch / float(tr.get("base_batch", 16))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=float(tr.get("momentum", 0.9)),
                                weight_decay=float(tr.get("weight_decay", 1e-4)))
    sampler = GroupedEpochBatchSampler(train_ds.aspect_ratios, batch_size, info.rank, info.world_size, seed)
    iters_per_epoch = len(sampler)
    epochs = int(tr.get("epochs", 12))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupMultiStep(
        iters_per_epoch, tr.get("lr_steps", [8, 11]), tr.get("lr_gamma", 0.1), tr.get("warmup_iters", 1000),
        tr.get("warmup_factor", 0.001)))
    scaler = make_grad_scaler(device, amp)
    workers = int(section(cfg, "data").get("workers", 4))
    log_interval = int(tr.get("log_interval", 20))
    ckpt_interval = optional_int(tr.get("checkpoint_interval", 1000), "train.checkpoint_interval")
    stop_after = optional_int(tr.get("stop_after_iters"), "train.stop_after_iters")
    eval_every = int(tr.get("eval_every_epochs", 1))
    clip = tr.get("clip_grad_norm")

    start_epoch, start_batch, iteration = 0, 0, 0
    ckpt = load_checkpoint(out_dir / "last.pth") if resume else None
    if resume and ckpt is None and info.is_main:
        print(f"[train] --resume: no {out_dir / 'last.pth'}, starting from scratch", flush=True)
    if ckpt is not None:
        if ckpt.get("iters_per_epoch") != iters_per_epoch:
            raise ValueError(f"--resume: {out_dir / 'last.pth'} was written with {ckpt.get('iters_per_epoch')} "
                             f"iterations per epoch, this run has {iters_per_epoch} (batch size / world size / data "
                             "changed)")
        model.student.load_state_dict(ckpt["model"])
        model.losses.load_state_dict(ckpt["distill"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, start_batch, iteration = ckpt["epoch"], ckpt["batch"], ckpt["iteration"]
        if info.is_main:
            print(f"[train] resumed from {out_dir / 'last.pth'} at epoch {start_epoch} batch {start_batch} "
                  f"(iteration {iteration})", flush=True)

    ddp_model = model
    if info.distributed:
        ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                        find_unused_parameters=bool(tr.get("find_unused_parameters", False)))
    logger = MetricLogger(out_dir, enabled=info.is_main, tensorboard=bool(cfg.get("tensorboard", True)))
    if ckpt is not None:
        logger.drop_after(iteration)
        rngs = ckpt["rng"]
        restore_rng_state(rngs[info.rank] if len(rngs) == info.world_size else rngs[0])
    if info.is_main:
        n_params = sum(p.numel() for p in params)
        print(f"[train] {info.world_size} process(es) on {device}, amp={amp}, student "
              f"{section(cfg, 'student')['arch']}, distill {list(model.losses.enabled) or 'none'}, "
              f"{len(train_ds)} train / {len(val_ds)} val images, {iters_per_epoch} it/epoch x {epochs} epochs, "
              f"global batch {global_batch}, lr {lr:g}, {n_params / 1e6:.1f} M trainable parameters", flush=True)

    def eval_due(epoch_done: int) -> bool:
        return epoch_done % eval_every == 0 or epoch_done == epochs

    def save(epoch: int, batch: int, eval_pending: bool = False) -> None:
        # eval_pending: written at an epoch end before that epoch's evaluation; a run resumed from this
        # checkpoint evaluates first (same RNG state as the uninterrupted run, which evaluates here too)
        rng = _gather_rng(info)
        if info.is_main:
            save_checkpoint(out_dir / "last.pth", {
                "model": model.student.state_dict(), "distill": model.losses.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch, "batch": batch, "iteration": iteration,
                "iters_per_epoch": iters_per_epoch, "rng": rng, "config": cfg, "eval_pending": eval_pending})
        barrier()

    eval_bs = int(tr.get("eval_batch_size", 2))
    val_idx = list(range(info.rank, len(val_ds), info.world_size))  # no padding: every image scored once
    val_loader = DataLoader(val_ds, batch_sampler=[val_idx[k:k + eval_bs] for k in range(0, len(val_idx), eval_bs)],
                            collate_fn=collate, num_workers=workers, pin_memory=device.type == "cuda")

    def run_eval(epoch: int) -> Optional[dict]:
        prog = Progress(len(val_idx), f"eval epoch {epoch}", enabled=info.is_main)  # this rank's share
        metrics = evaluate(unwrap_model(ddp_model), val_loader, val_ds, device, amp, prog)
        prog.close()
        if info.is_main:
            logger.log(iteration, {f"val/{k}": v for k, v in metrics.items()})
            # COCOeval reports -1 where the ground truth has no object of that size
            print(f"[eval] epoch {epoch}: " + " ".join(f"{k} {100 * v:.2f}" if v >= 0 else f"{k} n/a"
                                                       for k, v in metrics.items()), flush=True)
        return metrics

    losses_seen: list[float] = []
    metrics = None
    if stop_after is not None and iteration >= stop_after:  # e.g. 0: checkpoint the initial state and stop
        save(start_epoch, start_batch, bool(ckpt is not None and ckpt.get("eval_pending")))
        logger.close()
        return {"losses": losses_seen, "metrics": None, "iteration": iteration, "stopped_early": True}
    if ckpt is not None and ckpt.get("eval_pending") and start_batch == 0:
        metrics = run_eval(start_epoch)  # the interrupted run stopped before (or during) this evaluation
    model.train()
    for epoch in range(start_epoch, epochs):
        train_ds.set_epoch(epoch)
        sampler.set_epoch(epoch, start_batch)
        loader = _loader(train_ds, sampler, workers, device, seed * 1000 + epoch)
        prog = Progress((iters_per_epoch - start_batch) * global_batch, f"epoch {epoch + 1}/{epochs}",
                        enabled=info.is_main)
        t_last, it_last = time.perf_counter(), iteration  # sec_per_iter: time / iterations since the last log
        for batch_idx, (images, targets) in enumerate(loader, start=start_batch):
            images, targets = _to_device(images, targets, device)
            model.iteration = iteration
            with autocast(device, amp):
                loss_dict = ddp_model(images, targets)
            loss = sum(loss_dict.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at iteration {iteration}: "
                                         + ", ".join(f"{k}={float(v):.4g}" for k, v in loss_dict.items()))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, float(clip))
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            iteration += 1
            losses_seen.append(float(loss.detach()))
            prog.update(global_batch, loss=f"{losses_seen[-1]:.3f}")
            if iteration % log_interval == 0 or iteration == 1:
                now = time.perf_counter()
                scalars = {k: float(all_reduce_mean(v.detach().float())) for k, v in loss_dict.items()}
                scalars["loss"] = float(all_reduce_mean(loss.detach().float()))
                scalars["lr"] = optimizer.param_groups[0]["lr"]
                scalars["epoch"] = epoch + (batch_idx + 1) / iters_per_epoch
                scalars["sec_per_iter"] = (now - t_last) / max(1, iteration - it_last)
                t_last, it_last = now, iteration
                logger.log(iteration, scalars, prefix="train/")
            last_batch = batch_idx + 1 == iters_per_epoch
            if ckpt_interval and iteration % ckpt_interval == 0 and not last_batch:
                save(epoch, batch_idx + 1)
            if stop_after is not None and iteration >= stop_after:
                save(epoch + 1, 0, eval_due(epoch + 1)) if last_batch else save(epoch, batch_idx + 1)
                prog.close()
                logger.close()
                return {"losses": losses_seen, "metrics": None, "iteration": iteration, "stopped_early": True}
        prog.close()
        start_batch = 0
        save(epoch + 1, 0, eval_due(epoch + 1))
        if eval_due(epoch + 1):
            metrics = run_eval(epoch + 1)
    if metrics is None and start_epoch >= epochs:
        metrics = run_eval(epochs)  # resumed a finished run: evaluate again
    if info.is_main:
        save_checkpoint(out_dir / "final.pth", {"model": model.student.state_dict(), "config": cfg})
        with open(out_dir / "results.json", "w") as f:
            json.dump({"coco_bbox": metrics, "expected_map": cfg.get("expected_map"), "iterations": iteration},
                      f, indent=2)
    logger.close()
    return {"losses": losses_seen, "metrics": metrics, "iteration": iteration, "stopped_early": False}


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    out = args.out or cfg.get("out_dir")
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
        cfg.setdefault("data", {})["root"] = str(root)
    if args.data:
        cfg.setdefault("data", {})["root"] = args.data
    train(cfg, out, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
