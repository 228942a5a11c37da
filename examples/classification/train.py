"""Train a classifier with one of the distillation methods (the one entry point of the classification example).

    python -m examples.classification.train --config CONFIG [--synthetic] [--data DIR] [--out DIR] [--resume]
        [--device auto|cuda|cpu] [key.sub=value ...]
    torchrun --nproc_per_node N -m examples.classification.train --config CONFIG ...

``train.batch_size`` in a config is the *global* batch (the paper's), split over the processes; the learning rate
is ``train.lr * global_batch / train.base_batch`` (printed at start), so overriding the batch keeps the recipe.
Outputs in ``--out`` (default ``runs/<config path>``): ``metrics.csv`` and TensorBoard ``tb/`` (train loss terms,
lr, val top-1/top-5), ``last.pth`` (written atomically at every epoch end: student, distillation modules,
optimizer, scheduler, grad scaler, RNG states of every rank, epoch, step, best top-1), ``best.pth`` (student
weights of the best epoch) and ``summary.json``. ``--resume`` continues from ``last.pth``; the continued run
reproduces the loss sequence of an uninterrupted one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

from examples.common.amp import AMP_MODES, make_grad_scaler
from examples.common.checkpoint import (capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint,
                                        unwrap_model)
from examples.common.config import check_keys, load_config
from examples.common.distributed import barrier, cleanup_distributed, init_distributed, seed_everything
from examples.common.metrics_log import MetricLogger

from .data import build_datasets, build_loaders, steps_in_epoch
from .distill import TEACHER_METHODS, Distiller
from .engine import build_lr_lambda, build_optimizer, evaluate, scaled_lr, train_one_epoch
from .sync_bn import convert_sync_batchnorm

CHECKPOINT_FORMAT = "wkd_examples.classification/1"
REPO_ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m examples.classification.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (configs/...)")
    p.add_argument("--synthetic", action="store_true", help="random data of the config's shape (smoke runs)")
    p.add_argument("--data", default=None, help="dataset directory (sets data.root)")
    p.add_argument("--out", default=None, help="output directory (default runs/<config path without .yaml>)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pth if it exists")
    p.add_argument("--device", default=None, choices=("auto", "cuda", "cpu"), help="overrides train.device")
    p.add_argument("--cost", default=None, help="WKD-L class-distance file (sets distill.wkd_l.cost)")
    p.add_argument("--cost-dir", default=None,
                   help="folder where a bare file name in distill.wkd_l.cost is looked for (default: $WKD_DATA_DIR, "
                        "then data/ in the checkout)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.epochs=2 train.amp=none")
    return p.parse_args(argv)


def _default_out(config: str) -> Path:
    path = Path(config).resolve()
    try:
        rel = path.relative_to((REPO_ROOT / "examples" / "classification" / "configs").resolve())
    except ValueError:
        rel = Path(path.name)
    return Path("runs") / rel.with_suffix("")


# Every key the trainer reads: a misspelt key (``train.epoch=1``) is an error instead of being silently ignored.
KNOWN_KEYS = {
    None: {"data", "model", "train", "distill", "cost_matrix", "expected_top1"},
    "data": {"dataset", "root", "num_classes", "input_size", "workers", "synthetic_size", "synthetic_val_size",
             "synthetic_seed", "synthetic_workers"},
    "model": {"student", "teacher", "teacher_checkpoint", "student_checkpoint", "student_init",
              "allow_random_teacher"},
    "train": {"device", "epochs", "batch_size", "base_batch", "lr", "optimizer", "momentum", "nesterov", "betas",
              "weight_decay", "scheduler", "milestones", "gamma", "min_lr_ratio", "warmup_epochs", "amp",
              "channels_last", "compile", "sync_bn", "find_unused_parameters", "seed", "log_every", "eval_every",
              "eval_batch_size", "steps_per_epoch", "stop_after_epochs", "debug_exit_at_step", "progress",
              "tensorboard"},
    "cost_matrix": {"source", "layer"},
}


def resolve_config(args: argparse.Namespace) -> dict:
    """Load the config, apply ``--synthetic`` / ``--data`` / ``--device`` and check the keys the trainer needs."""
    cfg = load_config(args.config, args.overrides)
    for sec in ("data", "model", "train", "distill"):
        if not isinstance(cfg.get(sec), dict):
            raise ValueError(f"{args.config}: the config needs a `{sec}` mapping")
    check_keys(cfg, KNOWN_KEYS, args.config)
    if args.synthetic:
        cfg["data"]["dataset"] = "synthetic"
    if args.data:
        cfg["data"]["root"] = args.data
    if args.device:
        cfg["train"]["device"] = args.device
    if args.cost:
        if not isinstance(cfg["distill"].get("wkd_l"), dict):
            raise ValueError(f"--cost: {args.config} has no distill.wkd_l section (method "
                             f"{cfg['distill'].get('method')!r})")
        cfg["distill"]["wkd_l"]["cost"] = args.cost
    for key in ("num_classes", "input_size"):
        if key not in cfg["data"]:
            raise ValueError(f"{args.config}: data.{key} is required")
    for key in ("epochs", "batch_size", "lr"):
        if key not in cfg["train"]:
            raise ValueError(f"{args.config}: train.{key} is required")
    if cfg["train"].get("amp", "none") not in AMP_MODES:
        raise ValueError(f"train.amp must be one of {AMP_MODES}, got {cfg['train'].get('amp')!r}")
    if "student" not in cfg["model"]:
        raise ValueError(f"{args.config}: model.student is required")
    return cfg


def _resolve_path(path: str) -> str:
    """Paths in configs are relative to the repository root (or absolute, or ~)."""
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (REPO_ROOT / p))


# The class distances released with the paper (not shipped: the official code, https://github.com/JiamingLv/WKD,
# carries no licence). Copy the files of its `wkd_cost_matrix/` folder under these names into data/ (or a folder
# named by --cost-dir / $WKD_DATA_DIR), or build one with `python -m examples.classification.build_cost_matrix`.
RELEASED_COSTS = ("imagenet_resnet34_cka_distance.pth", "imagenet_resnet50_cka_distance.pth",
                  "cifar100_resnet32x4_cka_distance.pth", "cifar100_wrn40_2_cka_distance.pth")


def cost_search_dirs(cost_dir: Optional[str] = None) -> List[Path]:
    """Folders searched for a bare cost file name, in order: ``cost_dir``, $WKD_DATA_DIR, data/ in the checkout."""
    return [Path(d).expanduser() for d in (cost_dir, os.environ.get("WKD_DATA_DIR"), REPO_ROOT / "data") if d]


def resolve_cost(cost: str, cost_dir: Optional[str] = None) -> tuple:
    """(path of the cost file or None when absent, the places looked at).

    A bare file name (``cifar100_resnet32x4_cka_distance.pth``) is looked for in ``cost_search_dirs``; a path with
    a folder is relative to the repository root (or absolute, or ~)."""
    if Path(cost).name == cost:
        tried = [d / cost for d in cost_search_dirs(cost_dir)]
    else:
        tried = [Path(_resolve_path(cost))]
    return next((p for p in tried if p.is_file()), None), tried


def stand_in_banner(cost: str, tried) -> str:
    bar = "#" * 100
    how = ("copy the file from the `wkd_cost_matrix/` folder of the official code (https://github.com/JiamingLv/WKD) "
           "into data/ or --cost-dir / WKD_DATA_DIR" if Path(cost).name in RELEASED_COSTS else
           "build it with `python -m examples.classification.build_cost_matrix`")
    return (f"{bar}\n# WARNING: WKD-L cost matrix {cost} not found (looked at: {', '.join(map(str, tried))}).\n"
            f"# --synthetic: using a RANDOM stand-in cost; the loss values are not the paper's. To use the real one, "
            f"\n# {how}, or pass --cost PATH.\n{bar}")


def build_network(name: str, num_classes: int, weights: Optional[str], what: str, build_model) -> nn.Module:
    """``build_model(name, num_classes)`` with optional weights.

    ``weights``: None (random initialisation); a file path (relative to the repository root, or absolute):
    anything ``build_model(checkpoint=...)`` loads (this trainer's ``last.pth`` / ``best.pth``, CRD / mdistiller
    teacher files, a torchvision state dict); or ``torchvision:<Enum>.<NAME>`` (e.g.
    ``torchvision:ResNet34_Weights.IMAGENET1K_V1``): torchvision's published weights, downloaded on first use
    (machines with internet only; never at import).
    """
    if weights is None:
        return build_model(name, num_classes)
    if isinstance(weights, str) and weights.startswith("torchvision:"):
        from torchvision.models import get_weight
        spec = weights.split(":", 1)[1]
        try:
            w = get_weight(spec)
        except Exception as e:
            raise ValueError(f"{what}: {weights!r} is not a torchvision weight name like "
                             f"'torchvision:ResNet34_Weights.IMAGENET1K_V1' ({e})") from None
        model = build_model(name, num_classes)
        model.net.load_state_dict(w.get_state_dict(progress=True))
        return model
    p = Path(_resolve_path(weights))
    if not p.is_file():
        raise FileNotFoundError(f"{what}: weights file {p} does not exist")
    return build_model(name, num_classes, checkpoint=str(p))


def init_from_pretrained(model: nn.Module, path: str, what: str) -> List[str]:
    """Initialise ``model.net`` from a pretrained state dict of the same architecture with a different classifier
    (e.g. ImageNet weights for CIFAR-100 fine-tuning): every key is loaded except the classifier's, which keeps
    its fresh initialisation. Returns the skipped keys; any other mismatch is an error naming ``what``."""
    from .models.registry import _read_file, extract_state_dict
    p = Path(_resolve_path(path))
    if not p.is_file():
        raise FileNotFoundError(f"{what}: weights file {p} does not exist")
    sd = extract_state_dict(_read_file(str(p)), str(p))  # the zoo's reader: .pth / .safetensors, trusted pickles
    own = model.net.state_dict()
    head = {name for name, mod in model.net.named_modules() if mod is model.classifier}
    head_keys = {f"{h}.{k}" if h else k for h in head for k in ("weight", "bias")}
    skipped = [k for k in sd if k in head_keys and sd[k].shape != own.get(k, sd[k]).shape]
    sd = {k: v for k, v in sd.items() if k not in skipped}
    res = model.net.load_state_dict(sd, strict=False)
    missing = [k for k in res.missing_keys if k not in head_keys]
    if missing or res.unexpected_keys:
        raise ValueError(f"{what}: {p} does not match {type(model.net).__name__}: missing {missing[:5]}, "
                         f"unexpected {list(res.unexpected_keys)[:5]}")
    return skipped


def build_distiller(cfg: dict, *, synthetic: bool, log=print, cost_dir: Optional[str] = None) -> Distiller:
    """Student, frozen teacher and distillation modules from the ``model`` / ``distill`` / ``train`` config."""
    from .models import build_model
    mcfg, dcfg = cfg["model"], dict(cfg["distill"])
    K = int(cfg["data"]["num_classes"])
    student = build_network(mcfg["student"], K, mcfg.get("student_checkpoint"), "model.student_checkpoint",
                            build_model)
    if mcfg.get("student_init"):
        if mcfg.get("student_checkpoint"):
            raise ValueError("model.student_init and model.student_checkpoint are exclusive")
        skipped = init_from_pretrained(student, mcfg["student_init"], "model.student_init")
        log(f"student initialised from {mcfg['student_init']} (new classifier: {skipped or 'none'})")
    teacher = None
    if dcfg.get("method") in TEACHER_METHODS:
        if not mcfg.get("teacher"):
            raise ValueError(f"distill.method={dcfg['method']!r} needs model.teacher")
        ckpt = mcfg.get("teacher_checkpoint")
        if ckpt is not None and synthetic and (str(ckpt).startswith("torchvision:")
                                               or not Path(_resolve_path(ckpt)).is_file()):
            log(f"warning: --synthetic: teacher weights {ckpt} not used (missing file or a download)")
            ckpt = None
        if ckpt is None:
            if not (synthetic or mcfg.get("allow_random_teacher")):
                raise ValueError("model.teacher_checkpoint is not set: distilling from a randomly initialised "
                                 "teacher is only allowed with --synthetic or model.allow_random_teacher=true")
            log("warning: the teacher is randomly initialised (no model.teacher_checkpoint)")
        teacher = build_network(mcfg["teacher"], K, ckpt, "model.teacher_checkpoint", build_model)
    if isinstance(dcfg.get("wkd_l"), dict) and isinstance(dcfg["wkd_l"].get("cost"), str):
        name = dcfg["wkd_l"]["cost"]
        path, tried = resolve_cost(name, cost_dir)
        if path is not None:
            cost = str(path)
        elif synthetic:
            log(f"warning: --synthetic: cost matrix {name} is missing; using a random stand-in")
            g = torch.Generator().manual_seed(0)
            d = torch.rand(K, K, generator=g)
            cost = ((d + d.T) / 2).fill_diagonal_(0.0)
        else:
            how = ("the paper's released matrices are not shipped: copy it from the `wkd_cost_matrix/` folder of "
                   "https://github.com/JiamingLv/WKD into data/ (or --cost-dir / WKD_DATA_DIR)"
                   if Path(name).name in RELEASED_COSTS else
                   "build it with python -m examples.classification.build_cost_matrix")
            raise FileNotFoundError(f"distill.wkd_l.cost: {name} not found (looked at: "
                                    f"{', '.join(map(str, tried))}); {how}, or pass --cost PATH")
        dcfg["wkd_l"] = dict(dcfg["wkd_l"], cost=cost)
    return Distiller(student, teacher, dcfg, int(cfg["train"]["epochs"]))


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    cfg = resolve_config(args)
    info = init_distributed(cfg["train"].get("device", "auto"))
    try:
        return _run(args, cfg, info)
    finally:
        cleanup_distributed()


def _run(args: argparse.Namespace, cfg: dict, info) -> dict:
    tcfg, dcfg = cfg["train"], cfg["data"]
    log = print if info.is_main else (lambda *a, **k: None)
    wkd_l = cfg["distill"].get("wkd_l")
    if dcfg.get("dataset") == "synthetic" and isinstance(wkd_l, dict) and isinstance(wkd_l.get("cost"), str):
        path, tried = resolve_cost(wkd_l["cost"], args.cost_dir)
        if path is None:  # say it first, not among the training lines
            log(stand_in_banner(wkd_l["cost"], tried))
    out = Path(args.out) if args.out else _default_out(args.config)
    device = info.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed = int(tcfg.get("seed", 0))
    seed_everything(seed, 0)  # identical initialisation on every rank (DDP also broadcasts from rank 0)

    # ---------------------------------------------------------------- batch and learning rate
    global_batch = int(tcfg["batch_size"])
    if global_batch % info.world_size:
        raise ValueError(f"train.batch_size (the global batch, {global_batch}) must be divisible by the number of "
                         f"processes ({info.world_size})")
    per_proc = global_batch // info.world_size
    base_batch = int(tcfg.get("base_batch", global_batch))
    lr = scaled_lr(float(tcfg["lr"]), global_batch, base_batch)
    log(f"world size {info.world_size} on {device}; global batch {global_batch} ({per_proc} per process); "
        f"lr = {tcfg['lr']} * {global_batch} / {base_batch} = {lr:g}")

    # ---------------------------------------------------------------- data
    synthetic = dcfg.get("dataset") == "synthetic"
    train_set, val_set = build_datasets(dcfg)
    workers = int(dcfg.get("synthetic_workers", 0)) if synthetic else int(dcfg.get("workers", 8))
    train_loader, sampler, val_loader = build_loaders(
        train_set, val_set, batch_size=per_proc, rank=info.rank, world_size=info.world_size, seed=seed,
        workers=workers, pin_memory=device.type == "cuda", eval_batch_size=int(tcfg.get("eval_batch_size",
                                                                                        per_proc)))
    steps = steps_in_epoch(len(train_loader), tcfg.get("steps_per_epoch"))
    epochs = int(tcfg["epochs"])

    # ---------------------------------------------------------------- model, losses, optimizer
    # torchvision:... weights are downloaded on first use: rank 0 fetches them into the cache, the others wait and
    # read the cached file (instead of every process downloading the same file at once)
    downloads = info.distributed and not synthetic and any(
        str(cfg["model"].get(k) or "").startswith("torchvision:") for k in ("teacher_checkpoint", "student_checkpoint"))
    if downloads and not info.is_main:
        barrier()
    distiller = build_distiller(cfg, synthetic=synthetic, log=log, cost_dir=args.cost_dir)
    if downloads and info.is_main:
        barrier()
    if tcfg.get("sync_bn") and info.distributed:
        convert_sync_batchnorm(distiller, device)
    channels_last = bool(tcfg.get("channels_last", True)) and device.type == "cuda"
    distiller.to(device)
    if channels_last:
        distiller.to(memory_format=torch.channels_last)
    params = [p for p in distiller.parameters() if p.requires_grad]
    n_extra = sum(p.numel() for p in distiller.losses.parameters())
    log(f"method {distiller.method}: student {cfg['model']['student']} "
        f"({sum(p.numel() for p in distiller.student.parameters()) / 1e6:.2f}M params), "
        f"teacher {cfg['model'].get('teacher') if distiller.teacher is not None else None}, "
        f"distillation modules {n_extra / 1e6:.3f}M params")
    optimizer = build_optimizer(params, tcfg, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, build_lr_lambda(tcfg, steps))
    amp = tcfg.get("amp", "none")
    scaler = make_grad_scaler(device, amp)

    model: nn.Module = distiller
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(
            distiller, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(tcfg.get("find_unused_parameters", False)))
    if tcfg.get("compile"):
        model = torch.compile(model)

    # ---------------------------------------------------------------- resume
    start_epoch, global_step, best_top1 = 0, 0, -1.0
    rng_to_restore = None
    last_path = out / "last.pth"
    if args.resume:
        state = load_checkpoint(last_path)
        if state is None:
            log(f"--resume: {last_path} does not exist, starting from scratch")
        else:
            if state.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"--resume: {last_path} is not a checkpoint of this trainer")
            if state.get("world_size") != info.world_size:
                log(f"warning: resuming a run of world size {state.get('world_size')} with {info.world_size}; "
                    f"the data order continues but the RNG streams differ")
            distiller.student.load_state_dict(state["model"])
            distiller.losses.load_state_dict(state["distill"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            start_epoch, global_step = int(state["epoch"]), int(state["step"])
            best_top1 = float(state.get("best_top1", -1.0))
            rngs = state.get("rng_per_rank") or []
            rng_to_restore = rngs[info.rank] if info.rank < len(rngs) else (rngs[0] if rngs else None)
            log(f"resumed from {last_path}: epoch {start_epoch}, step {global_step}, best top-1 {best_top1:.2f}")
    logger = MetricLogger(out, enabled=info.is_main, tensorboard=bool(tcfg.get("tensorboard", True)))
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        logger.drop_after(global_step)  # rows an interrupted run logged after its last checkpoint
        with open(out / "config.yaml", "w") as f:
            import yaml
            yaml.safe_dump(cfg, f, sort_keys=False)
    seed_everything(seed, info.rank)  # per-rank streams for augmentation
    if rng_to_restore is not None:
        restore_rng_state(rng_to_restore)

    if start_epoch >= epochs:
        log(f"{last_path} already holds all {epochs} epochs; nothing to do")
        logger.close()
        done = out / "summary.json"
        return json.loads(done.read_text()) if done.is_file() else {"best_top1": best_top1, "epochs": epochs}

    # ---------------------------------------------------------------- loop
    log_every = int(tcfg.get("log_every", 20))
    eval_every = int(tcfg.get("eval_every", 1))
    stop_after = tcfg.get("stop_after_epochs")
    exit_at = tcfg.get("debug_exit_at_step")
    show = info.is_main and bool(tcfg.get("progress", True))
    t_start, rates, last_eval = time.time(), [], {}
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        weights = distiller.set_epoch(epoch)
        res = train_one_epoch(model, optimizer, scheduler, scaler, train_loader, device=device, amp=amp,
                              steps=steps, global_step=global_step, global_batch=global_batch, logger=logger,
                              log_every=log_every, epoch=epoch, progress_enabled=show,
                              channels_last=channels_last, extra_scalars=weights,
                              exit_at_step=int(exit_at) if exit_at is not None else None)
        global_step = res["global_step"]
        if res["images_per_s"] > 0:
            rates.append(res["images_per_s"])
        is_last = epoch + 1 == epochs
        if (epoch + 1) % eval_every == 0 or is_last:
            last_eval = evaluate(unwrap_model(model).student, val_loader, device=device, amp=amp,
                                 channels_last=channels_last, progress_enabled=False)
            logger.log(global_step, {"top1": last_eval["top1"], "top5": last_eval["top5"],
                                     "loss": last_eval["loss"], "epoch": epoch}, prefix="val/")
            improved = last_eval["top1"] > best_top1
            best_top1 = max(best_top1, last_eval["top1"])
            log(f"epoch {epoch}: train loss {res['loss']:.4f}, val top-1 {last_eval['top1']:.2f} "
                f"top-5 {last_eval['top5']:.2f} (best {best_top1:.2f}), {res['images_per_s']:.1f} img/s")
            if improved and info.is_main:
                save_checkpoint(out / "best.pth", {"format": CHECKPOINT_FORMAT, "model":
                                                   distiller.student.state_dict(), "epoch": epoch + 1,
                                                   "top1": best_top1, "config": cfg})
        rng = capture_rng_state()
        if info.distributed:
            rngs = [None] * info.world_size
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        if info.is_main:
            save_checkpoint(last_path, {
                "format": CHECKPOINT_FORMAT, "model": distiller.student.state_dict(),
                "distill": distiller.losses.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch + 1,
                "step": global_step, "best_top1": best_top1, "rng_per_rank": rngs, "world_size": info.world_size,
                "config": cfg})
        barrier()
        if stop_after is not None and epoch + 1 >= int(stop_after) and not is_last:
            log(f"stopping after epoch {epoch + 1} (train.stop_after_epochs); continue with --resume")
            logger.close()
            return {"stopped_at_epoch": epoch + 1}

    wall = time.time() - t_start
    summary = {
        "config": str(args.config), "method": distiller.method, "student": cfg["model"]["student"],
        "teacher": cfg["model"].get("teacher") if distiller.teacher is not None else None,
        "expected_top1": cfg.get("expected_top1"), "best_top1": best_top1,
        "final_top1": last_eval.get("top1"), "final_top5": last_eval.get("top5"), "epochs": epochs,
        "steps": global_step, "images_per_s": sum(rates) / len(rates) if rates else None,
        "wall_time_s": wall, "world_size": info.world_size, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "global_batch": global_batch, "lr": lr, "amp": amp, "synthetic": synthetic, "resolved_config": cfg,
    }
    if info.is_main:
        with open(out / "summary.json.tmp", "w") as f:
            json.dump(summary, f, indent=2)
        (out / "summary.json.tmp").replace(out / "summary.json")
        log(json.dumps({k: v for k, v in summary.items() if k != "resolved_config"}, indent=2))
    logger.close()
    return summary


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
