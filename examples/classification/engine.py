"""Training and evaluation loops, optimizer / lr schedule construction and model-weight loading."""
from __future__ import annotations

import math
import os
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from examples.common.amp import autocast
from examples.common.distributed import is_distributed
from examples.common.metrics_log import MetricLogger
from examples.common.progress import Progress

__all__ = ["build_optimizer", "build_lr_lambda", "scaled_lr", "train_one_epoch", "evaluate",
           "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """The training loss became inf or nan."""


def scaled_lr(base_lr: float, global_batch: int, base_batch: int) -> float:
    """Linear scaling rule: ``base_lr * global_batch / base_batch``."""
    if base_batch <= 0:
        raise ValueError(f"train.base_batch must be > 0, got {base_batch}")
    return float(base_lr) * float(global_batch) / float(base_batch)


def build_optimizer(params, train_cfg: dict, lr: float) -> torch.optim.Optimizer:
    """SGD (momentum, nesterov) or AdamW from ``train`` config keys ``optimizer``, ``momentum``, ``nesterov``,
    ``weight_decay``, ``betas``."""
    name = train_cfg.get("optimizer", "sgd")
    wd = float(train_cfg.get("weight_decay", 0.0))
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(train_cfg.get("momentum", 0.9)),
                               nesterov=bool(train_cfg.get("nesterov", False)), weight_decay=wd)
    if name == "adamw":
        betas = tuple(train_cfg.get("betas", (0.9, 0.999)))
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=wd)
    raise ValueError(f"train.optimizer must be 'sgd' or 'adamw', got {name!r}")


def build_lr_lambda(train_cfg: dict, steps_per_epoch: int) -> Callable[[int], float]:
    """Per-step lr factor: linear warm-up over ``warmup_epochs``, then ``scheduler`` = ``multistep`` (x ``gamma``
    at each of ``milestones`` epochs) or ``cosine`` (to ``min_lr_ratio`` at the last epoch)."""
    sched = train_cfg.get("scheduler", "multistep")
    epochs = int(train_cfg["epochs"])
    warmup = float(train_cfg.get("warmup_epochs", 0) or 0) * steps_per_epoch
    milestones = [int(m) for m in train_cfg.get("milestones", []) or []]
    gamma = float(train_cfg.get("gamma", 0.1))
    min_ratio = float(train_cfg.get("min_lr_ratio", 0.0))
    total = epochs * steps_per_epoch
    if sched not in ("multistep", "cosine"):
        raise ValueError(f"train.scheduler must be 'multistep' or 'cosine', got {sched!r}")

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            w = (step + 1) / warmup
        else:
            w = 1.0
        if sched == "multistep":
            epoch = step // steps_per_epoch
            return w * gamma ** sum(1 for m in milestones if epoch >= m)
        progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
        return w * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    return factor


def _all_reduce_sum(values: Tensor, device: torch.device) -> Tensor:
    """Sum over processes (on ``device``: NCCL needs CUDA tensors); returned on the CPU."""
    if not is_distributed():
        return values.cpu()
    v = values.to(device)
    dist.all_reduce(v, op=dist.ReduceOp.SUM)
    return v.cpu()


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler, loader, *,
                    device: torch.device, amp: str, steps: int, global_step: int, global_batch: int,
                    logger: MetricLogger, log_every: int, epoch: int, progress_enabled: bool,
                    channels_last: bool, extra_scalars: Optional[Dict[str, float]] = None,
                    exit_at_step: Optional[int] = None) -> Dict[str, float]:
    """One epoch of ``steps`` optimizer steps over ``loader``.

    ``model(images, targets)`` returns ``(logits, terms)``; the loss is ``sum(terms)``. Every ``log_every`` steps
    and at the last step of the epoch the loss terms, averaged over processes, go to ``logger`` (prefix
    ``train/``, with ``lr`` and ``epoch``); a non-finite loss raises :class:`NonFiniteLossError` there.
    ``exit_at_step`` (a testing knob) kills the process with ``os._exit`` right after that global step, as an
    interruption would.

    Returns:
        ``{"global_step", "images_per_s", "loss"}`` (loss: mean of the logged averages of this epoch).
    """
    model.train()
    logged = []
    it = iter(loader)
    with Progress(steps * global_batch, f"epoch {epoch}", enabled=progress_enabled) as bar:
        for i in range(steps):
            images, targets = next(it)
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                _, terms = model(images, targets)
            loss = sum(terms.values())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            lr = optimizer.param_groups[0]["lr"]  # the lr of this step (scheduler.step() sets the next one)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            global_step += 1
            if global_step % log_every == 0 or i + 1 == steps:
                names = list(terms)
                vals = _all_reduce_sum(torch.stack([loss.detach().float()] + [terms[k].detach().float()
                                                                              for k in names]), device)
                vals = vals / (dist.get_world_size() if is_distributed() else 1)
                if not torch.isfinite(vals[0]):
                    raise NonFiniteLossError(f"training loss is {vals[0].item()} at step {global_step} (epoch "
                                             f"{epoch}); terms: "
                                             + ", ".join(f"{k}={v:.4g}" for k, v in zip(names, vals[1:].tolist())))
                scalars = {"loss": vals[0].item(), **{f"loss_{k}": v for k, v in zip(names, vals[1:].tolist())},
                           "lr": lr, "epoch": epoch}
                if extra_scalars:
                    scalars.update(extra_scalars)
                logger.log(global_step, scalars, prefix="train/")
                logged.append(scalars["loss"])
                bar.update(global_batch, loss=scalars["loss"])
            else:
                bar.update(global_batch)
            if exit_at_step is not None and global_step == exit_at_step:
                logger.close()
                os._exit(3)
        rate = bar.rate
    return {"global_step": global_step, "images_per_s": rate,
            "loss": sum(logged) / len(logged) if logged else float("nan")}


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, device: torch.device, amp: str, channels_last: bool,
             progress_enabled: bool = False) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of ``model`` (a zoo model: ``model(x, features=False)``
    returns ``.logits``) over the sharded ``loader``, summed over processes."""
    was_training = model.training
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64)  # correct1, correct5, count, loss sum
    with Progress(len(loader.sampler), "eval", enabled=progress_enabled) as bar:
        for images, targets in loader:
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                logits = model(images, features=False).logits
            logits = logits.float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top.eq(targets[:, None])
            stats += torch.tensor([hit[:, 0].sum().item(), hit.any(1).sum().item(), targets.numel(),
                                   torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()],
                                  dtype=torch.float64)
            bar.update(targets.numel())
    stats = _all_reduce_sum(stats, device)
    model.train(was_training)
    n = max(stats[2].item(), 1.0)
    return {"top1": 100.0 * stats[0].item() / n, "top5": 100.0 * stats[1].item() / n,
            "loss": stats[3].item() / n, "count": int(stats[2].item())}
