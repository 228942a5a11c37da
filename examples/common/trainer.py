"""The one training loop of the examples: DDP, AMP, optimizer and lr schedule, resume, checkpoints, logging.

A task (classification, detection) gives the loop a :class:`Task`: the module to train, its per-process batches,
one training step (the named loss terms) and its evaluation; the loop does the rest, the same way for both:

* ``train.batch_size`` is the **global** batch (all processes); lr = ``train.lr * batch_size / base_batch``.
* Optimizer SGD / AdamW; per-iteration lr schedule from ``torch.optim.lr_scheduler``: ``MultiStepLR`` (x gamma
  at the ``milestones`` epochs) or ``CosineAnnealingLR`` (to ``min_lr_ratio``), after an optional ``LinearLR``
  warm-up (``warmup_epochs`` or ``warmup_iters``, from ``warmup_factor``) joined by ``SequentialLR``.
* AMP (``none`` | ``bf16`` | ``fp16`` with a grad scaler), gradient clipping, ``torch.compile``, DDP (NCCL on
  GPUs, gloo on CPU), ``nn.SyncBatchNorm`` (``train.sync_bn``, CUDA).
* No host synchronisation per step: the loss terms are averaged over processes, checked for inf / nan and
  written only every ``log_every`` iterations (and at an epoch's last one); per-iteration losses stay on the
  device until the epoch ends.
* One train-state layout (``last.pth``, :data:`STATE_FORMAT`): model + distillation modules, optimizer,
  scheduler, grad scaler, epoch / batch / step, iterations per epoch, best score, ``eval_pending``, RNG states of
  every rank, world size, resolved config. Written atomically at every epoch end (after its evaluation, or before
  it for tasks with long evaluations: ``Task.checkpoint_before_eval``) and every ``checkpoint_every`` iterations
  when the task resumes inside an epoch. ``resume=True``
  continues from it bit for bit on CPU (a run stopped before an epoch's evaluation evaluates first). A resumed run
  whose schedule keys (``SCHEDULE_KEYS``, e.g. a larger ``train.epochs`` to extend a finished run) changed gets the
  lr schedule of the new config, advanced to the checkpoint's iteration (logged); resuming a finished run reports
  "already finished" with its last evaluation, without evaluating or logging it again. ``last.pth`` is read with
  ``weights_only=True`` unless listed in ``train.trusted_checkpoints`` (``checkpoint.read_torch_file``).
* ``metrics.jsonl`` + TensorBoard (``tb/``) on rank 0: ``train/*`` loss terms, lr, scheduled weights; ``val/*``.
"""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import torch
import torch.distributed as dist
import yaml
from torch import Tensor, nn
from tqdm.auto import tqdm

from .amp import AMP_MODES, autocast, make_grad_scaler
from .checkpoint import (capture_rng_state, is_trusted, load_checkpoint, restore_rng_state, save_checkpoint,
                         unwrap_model)
from .distributed import DistInfo, barrier, is_distributed, seed_everything
from .metrics_log import MetricLogger

__all__ = ["Task", "Trainer", "STATE_FORMAT", "SCHEDULE_KEYS", "NonFiniteLossError", "build_optimizer",
           "build_scheduler", "rebuild_scheduler", "per_process_batch", "scaled_lr", "convert_sync_batchnorm"]

STATE_FORMAT = "wkd_examples.train_state/1"
# the ``train`` keys that define the lr schedule: when one differs from the checkpoint's config, a resumed run
# rebuilds the schedule instead of loading the saved one (whose length and milestones are the old config's)
SCHEDULE_KEYS = ("epochs", "lr", "base_batch", "batch_size", "scheduler", "milestones", "gamma", "min_lr_ratio",
                 "warmup_epochs", "warmup_iters", "warmup_factor")


class NonFiniteLossError(FloatingPointError):
    """The training loss became inf or nan."""


class Task:
    """The task hooks of :class:`Trainer` (subclass and fill in)."""
    name = "task"                      # stored in the checkpoint
    score_key: Optional[str] = None    # evaluation metric whose maximum is kept in best.pth (None: no best.pth)
    mid_epoch_resume = False           # True: batches(epoch, start_batch) resumes inside an epoch exactly
    checkpoint_before_eval = False     # True (long evaluations): last.pth is written before an epoch's evaluation
    #                                    (eval_pending: a resumed run evaluates first), not again after it
    channels_last = False              # convert the model to channels_last on CUDA (train.channels_last)

    model: nn.Module                   # what is trained (student + distillation modules; the teacher outside)

    def state_modules(self) -> Dict[str, nn.Module]:
        """The checkpointed parts, e.g. ``{"model": student, "distill": losses}``."""
        raise NotImplementedError

    def iters_per_epoch(self) -> int:
        raise NotImplementedError

    def batches(self, epoch: int, start_batch: int) -> Iterable:
        """This process's batches of ``epoch`` from ``start_batch`` on (0 unless ``mid_epoch_resume``)."""
        raise NotImplementedError

    def on_epoch(self, epoch: int) -> Dict[str, float]:
        """Called before ``epoch`` (0-based) trains; returns scheduled scalars to log (e.g. loss weights)."""
        return {}

    def step(self, model: nn.Module, batch, step: int) -> Dict[str, Tensor]:
        """The named loss terms of one batch (their sum is the loss); ``model`` is the DDP-wrapped one."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, epoch: int) -> Optional[Dict[str, float]]:
        """Metrics after ``epoch`` epochs (None where only rank 0 has them); ``model`` is unwrapped."""
        return None

    def finish(self, out: Path, summary: Dict[str, Any]) -> Dict[str, Any]:
        """Final outputs of a completed run (rank 0 writes files); returns the summary, possibly extended."""
        return summary


# ------------------------------------------------------------------------------------------------ building blocks
def per_process_batch(global_batch: int, world_size: int) -> int:
    if global_batch % world_size:
        raise ValueError(f"train.batch_size (the global batch, {global_batch}) must be divisible by the number of "
                         f"processes ({world_size})")
    return global_batch // world_size


def scaled_lr(lr: float, global_batch: int, base_batch: Optional[int]) -> float:
    """Linear scaling rule: ``lr * global_batch / base_batch`` (``base_batch`` None: ``lr``)."""
    if base_batch is None:
        return float(lr)
    if base_batch <= 0:
        raise ValueError(f"train.base_batch must be > 0, got {base_batch}")
    return float(lr) * float(global_batch) / float(base_batch)


def build_optimizer(params, tcfg: dict, lr: float) -> torch.optim.Optimizer:
    """SGD (momentum, nesterov) or AdamW (betas) with ``weight_decay``."""
    if tcfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=tcfg["momentum"], nesterov=tcfg["nesterov"],
                               weight_decay=tcfg["weight_decay"])
    if tcfg["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(tcfg["betas"]), weight_decay=tcfg["weight_decay"])
    raise ValueError(f"train.optimizer must be 'sgd' or 'adamw', got {tcfg['optimizer']!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, tcfg: dict, iters_per_epoch: int):
    """The per-iteration schedule (module docstring); stepped once per iteration."""
    from torch.optim import lr_scheduler as S
    if tcfg["warmup_epochs"] and tcfg["warmup_iters"]:
        raise ValueError("train.warmup_epochs and train.warmup_iters are exclusive: set one of them")
    warm = int(tcfg["warmup_iters"]) or int(round(float(tcfg["warmup_epochs"]) * iters_per_epoch))
    total = int(tcfg["epochs"]) * iters_per_epoch
    if tcfg["scheduler"] == "multistep":
        # milestones at or after the last epoch never apply (short runs of long recipes): left out
        steps = [int(m) * iters_per_epoch - warm for m in tcfg["milestones"] if int(m) < int(tcfg["epochs"])]
        if any(s < 0 for s in steps):
            raise ValueError(f"train.milestones {tcfg['milestones']}: a milestone falls inside the {warm}-iteration "
                             "warm-up")
        main = S.MultiStepLR(optimizer, milestones=steps, gamma=tcfg["gamma"])
    elif tcfg["scheduler"] == "cosine":
        base = optimizer.param_groups[0]["lr"]
        main = S.CosineAnnealingLR(optimizer, T_max=max(total - warm, 1), eta_min=base * tcfg["min_lr_ratio"])
    else:
        raise ValueError(f"train.scheduler must be 'multistep' or 'cosine', got {tcfg['scheduler']!r}")
    if warm <= 0:
        return main
    warmup = S.LinearLR(optimizer, start_factor=tcfg["warmup_factor"], end_factor=1.0, total_iters=warm)
    return S.SequentialLR(optimizer, [warmup, main], milestones=[warm])


def rebuild_scheduler(optimizer: torch.optim.Optimizer, tcfg: dict, iters_per_epoch: int, lr: float, step: int):
    """The schedule of ``tcfg`` from scratch (base lr ``lr``), stepped ``step`` times: the lr of the optimizer's
    param groups is then what an uninterrupted run of this config would use at iteration ``step``."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        group.pop("initial_lr", None)
    scheduler = build_scheduler(optimizer, tcfg, iters_per_epoch)
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(step):
            scheduler.step()
    return scheduler


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``nn.SyncBatchNorm.convert_sync_batchnorm`` (CUDA; ``nn.SyncBatchNorm`` has no CPU implementation)."""
    if device.type != "cuda":
        raise ValueError("train.sync_bn needs CUDA devices (nn.SyncBatchNorm has no CPU implementation)")
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


def _gather_rng(info: DistInfo) -> list:
    state = capture_rng_state()
    if not info.distributed:
        return [state]
    out = [None] * info.world_size
    dist.all_gather_object(out, state)
    return out


# ------------------------------------------------------------------------------------------------ the loop
class Trainer:
    """``Trainer(cfg, task, info, out, resume).run()`` (module docstring). ``cfg`` is the resolved config
    (``schema.resolve``), ``info`` from ``distributed.init_distributed``."""

    def __init__(self, cfg: dict, task: Task, info: DistInfo, out, resume: bool = False, log=None):
        self.cfg, self.task, self.info, self.out, self.resume = cfg, task, info, Path(out), resume
        self.log = log or (print if info.is_main else (lambda *a, **k: None))

    def run(self) -> Dict[str, Any]:
        cfg, task, info, out = self.cfg, self.task, self.info, self.out
        tcfg, device, log = cfg["train"], info.device, self.log
        if tcfg["amp"] not in AMP_MODES:
            raise ValueError(f"train.amp must be one of {AMP_MODES}, got {tcfg['amp']!r}")
        amp, epochs, ipe = tcfg["amp"], int(tcfg["epochs"]), task.iters_per_epoch()
        if tcfg["steps_per_epoch"] is not None:  # smoke runs: the first steps of every epoch
            ipe = max(1, min(ipe, int(tcfg["steps_per_epoch"])))
        global_batch = int(tcfg["batch_size"])
        per_proc = per_process_batch(global_batch, info.world_size)
        lr = scaled_lr(tcfg["lr"], global_batch, tcfg["base_batch"])
        log(f"world size {info.world_size} on {device}; global batch {global_batch} ({per_proc} per process); "
            f"lr = {tcfg['lr']} * {global_batch} / {tcfg['base_batch'] or global_batch} = {lr:g}; "
            f"{ipe} iterations/epoch x {epochs} epochs, amp {amp}")

        model = task.model
        if tcfg["sync_bn"] and info.distributed:
            model = convert_sync_batchnorm(model, device)
        model.to(device)
        if task.channels_last and tcfg["channels_last"] and device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, tcfg, lr)
        scheduler = build_scheduler(optimizer, tcfg, ipe)
        scaler = make_grad_scaler(device, amp)
        ddp_model = model
        if info.distributed:
            ddp_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=tcfg["find_unused_parameters"])
        if tcfg["compile"]:
            ddp_model = torch.compile(ddp_model)
        parts = task.state_modules()

        # ------------------------------------------------------------ resume
        start_epoch = start_batch = step = 0
        best, eval_pending, rngs = None, False, None
        last = out / "last.pth"
        state = load_checkpoint(last, trusted=is_trusted(last, tcfg["trusted_checkpoints"])) if self.resume else None
        if self.resume and state is None:
            log(f"--resume: {last} does not exist, starting from scratch")
        if state is not None:
            if state.get("format") != STATE_FORMAT or state.get("task") != task.name:
                raise ValueError(f"--resume: {last} is not a {task.name} checkpoint of this trainer")
            if state["iters_per_epoch"] != ipe:
                raise ValueError(f"--resume: {last} was written with {state['iters_per_epoch']} iterations per "
                                 f"epoch, this run has {ipe} (batch size / world size / data changed)")
            if state["world_size"] != info.world_size:
                log(f"warning: resuming a run of world size {state['world_size']} with {info.world_size}; the data "
                    "order continues but the RNG streams differ")
            start_epoch, start_batch, step = state["epoch"], state["batch"], state["step"]
            if start_epoch > epochs:
                raise ValueError(f"--resume: {last} holds {start_epoch} trained epochs, more than train.epochs="
                                 f"{epochs}: a run cannot be shortened (resume with train.epochs={start_epoch} or "
                                 "more, or start a new run in another --out)")
            for name, module in parts.items():
                module.load_state_dict(state[name])
            optimizer.load_state_dict(state["optimizer"])
            old = (state.get("config") or {}).get("train", {})
            changed = [k for k in SCHEDULE_KEYS if k in old and old[k] != tcfg[k]]
            if changed:
                lr_was = optimizer.param_groups[0]["lr"]
                scheduler = rebuild_scheduler(optimizer, tcfg, ipe, lr, step)
                log(f"--resume: {', '.join(f'train.{k} {old[k]!r} -> {tcfg[k]!r}' for k in changed)} since {last} "
                    f"was written: the lr schedule is rebuilt for {epochs} epochs ({epochs * ipe} iterations) and "
                    f"continues at iteration {step} with lr {optimizer.param_groups[0]['lr']:g} (the saved "
                    f"schedule's: {lr_was:g})")
            else:
                scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            best, eval_pending, rngs = state["best"], state["eval_pending"], state["rng_per_rank"]
            log(f"resumed from {last}: epoch {start_epoch}, batch {start_batch}, step {step}")
        logger = MetricLogger(out, enabled=info.is_main, tensorboard=tcfg["tensorboard"])
        if info.is_main:
            logger.drop_after(step)  # lines an interrupted run logged after its last checkpoint
            with open(out / "config.yaml", "w") as f:
                yaml.safe_dump(cfg, f, sort_keys=False)
        seed_everything(tcfg["seed"], info.rank)  # per-rank streams (augmentation, samplers)
        if rngs:
            restore_rng_state(rngs[info.rank] if len(rngs) == info.world_size else rngs[0])

        def save(epoch: int, batch: int, pending: bool) -> None:
            rng = _gather_rng(info)
            if info.is_main:
                save_checkpoint(last, {
                    "format": STATE_FORMAT, "task": task.name,
                    **{name: module.state_dict() for name, module in parts.items()},
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "epoch": epoch, "batch": batch, "step": step,
                    "iters_per_epoch": ipe, "best": best, "eval_pending": pending, "metrics": metrics,
                    "rng_per_rank": rng,
                    "world_size": info.world_size, "config": cfg})
            barrier()

        def run_eval(epoch: int) -> Optional[dict]:
            nonlocal best
            metrics = task.evaluate(unwrap_model(ddp_model), epoch)
            if metrics is not None and info.is_main:
                logger.log(step, {**metrics, "epoch": epoch}, prefix="val/")
                log(f"[eval] epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
                key = task.score_key
                if key is not None and metrics.get(key) is not None and (best is None or metrics[key] > best):
                    best = float(metrics[key])
                    save_checkpoint(out / "best.pth", {"format": STATE_FORMAT, "task": task.name,
                                                       "model": parts["model"].state_dict(), "epoch": epoch,
                                                       key: best, "config": cfg})
            return metrics

        def eval_due(done: int) -> bool:
            return done % int(tcfg["eval_every"]) == 0 or done == epochs

        losses: list = []
        metrics = None
        summary = {"task": task.name, "world_size": info.world_size, "device": str(device), "amp": amp,
                   "global_batch": global_batch, "lr": lr, "epochs": epochs, "iters_per_epoch": ipe}

        def stopped(epoch_done: Optional[int] = None) -> dict:
            logger.close()
            return {**summary, "stopped_early": True, "stopped_at_epoch": epoch_done, "steps": step,
                    "losses": losses, "metrics": metrics}

        stop_iters, stop_epochs = tcfg["stop_after_iters"], tcfg["stop_after_epochs"]
        if stop_iters is not None and step >= stop_iters:  # e.g. 0: checkpoint the initial state and stop
            save(start_epoch, start_batch, eval_pending)
            return stopped()
        finished = state is not None and start_epoch >= epochs and not eval_pending
        if finished:
            metrics = state.get("metrics")
            log(f"--resume: {last} already finished: all {epochs} epochs are trained and evaluated (step {step}); "
                "nothing to do. To train longer, resume with a larger train.epochs (the lr schedule is rebuilt for "
                "the new length)")
        elif eval_pending and start_batch == 0 and start_epoch > 0:
            metrics = run_eval(start_epoch)  # the interrupted run stopped before (or during) this evaluation
            save(start_epoch, 0, False)  # done: a second resume does not evaluate again
        log_every, ckpt_every = int(tcfg["log_every"]), tcfg["checkpoint_every"]
        if ckpt_every and not task.mid_epoch_resume:
            raise ValueError(f"train.checkpoint_every: the {task.name} task checkpoints at epoch ends only (null)")
        exit_at, clip = tcfg["debug_exit_at_step"], tcfg["clip_grad_norm"]
        show = info.is_main and tcfg["progress"]
        rates, t_start = [], time.perf_counter()
        for epoch in range(start_epoch, epochs):
            scalars_epoch = task.on_epoch(epoch)
            buf = torch.zeros(ipe, device=device)  # per-iteration losses, read once at the epoch's end
            first = start_batch
            bar = tqdm(total=(ipe - start_batch) * global_batch, desc=f"epoch {epoch + 1}/{epochs}", unit="img",
                       disable=not show, dynamic_ncols=True, mininterval=1.0 if os.isatty(2) else 30.0)
            t0 = t_log = None
            s_log = step
            model.train()
            for batch_idx, batch in enumerate(task.batches(epoch, start_batch), start=start_batch):
                if batch_idx >= ipe:
                    break
                with autocast(device, amp):
                    terms = task.step(ddp_model, batch, step)
                loss = sum(terms.values())
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, float(clip))
                lr_now = optimizer.param_groups[0]["lr"]  # this step's lr (scheduler.step() sets the next)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                buf[batch_idx] = loss.detach().float()
                step += 1
                bar.update(global_batch)
                now = time.perf_counter()
                if t0 is None:
                    t0 = t_log = now
                last_batch = batch_idx + 1 == ipe
                if step % log_every == 0 or last_batch:
                    names = list(terms)
                    vals = torch.stack([loss.detach().float()] + [terms[k].detach().float() for k in names])
                    if is_distributed():
                        dist.all_reduce(vals, op=dist.ReduceOp.SUM)
                        vals = vals / info.world_size
                    vals = vals.tolist()  # the only host synchronisation of the loop
                    if not all(v == v and abs(v) != float("inf") for v in vals):
                        raise NonFiniteLossError(
                            f"training loss is {vals[0]} at step {step} (epoch {epoch}); terms: "
                            + ", ".join(f"{k}={v:.4g}" for k, v in zip(names, vals[1:], strict=True)))
                    row = {"loss": vals[0], **{(k if k.startswith("loss_") else f"loss_{k}"): v
                                               for k, v in zip(names, vals[1:], strict=True)},
                           "lr": lr_now, "epoch": epoch, "sec_per_iter": (now - t_log) / max(1, step - s_log),
                           **scalars_epoch}
                    t_log, s_log = now, step
                    logger.log(step, row, prefix="train/")
                    bar.set_postfix(loss=f"{vals[0]:.4g}", refresh=False)
                if exit_at is not None and step == exit_at:
                    logger.close()
                    os._exit(3)  # testing: an interruption
                if ckpt_every and step % ckpt_every == 0 and not last_batch:
                    save(epoch, batch_idx + 1, False)
                if stop_iters is not None and step >= stop_iters:
                    losses += buf[first:batch_idx + 1].tolist()
                    bar.close()
                    if last_batch:
                        save(epoch + 1, 0, eval_due(epoch + 1))
                    else:
                        save(epoch, batch_idx + 1, False)
                    return stopped()
            bar.close()
            n_done = ipe - first
            losses += buf[first:].tolist()
            if t0 is not None and n_done > 1:
                rates.append((n_done - 1) * global_batch / max(time.perf_counter() - t0, 1e-9))
            start_batch = 0
            due = eval_due(epoch + 1)
            if due and task.checkpoint_before_eval:
                save(epoch + 1, 0, True)
                metrics = run_eval(epoch + 1)
                if epoch + 1 == epochs:
                    save(epoch + 1, 0, False)  # the run is finished: a resume reports it, not evaluating again
            else:
                if due:
                    metrics = run_eval(epoch + 1)
                save(epoch + 1, 0, False)
            if stop_epochs is not None and epoch + 1 >= int(stop_epochs) and epoch + 1 < epochs:
                log(f"stopping after epoch {epoch + 1} (train.stop_after_epochs); continue with --resume")
                return stopped(epoch + 1)
        summary.update(stopped_early=False, stopped_at_epoch=None, already_finished=finished, steps=step,
                       losses=losses, metrics=metrics, best=best,
                       images_per_s=sum(rates) / len(rates) if rates else None,
                       wall_time_s=time.perf_counter() - t_start,
                       device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
        summary = task.finish(out, summary)
        logger.close()
        return summary
