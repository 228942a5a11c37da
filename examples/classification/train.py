"""Train a classifier with one of the distillation methods (the one entry point of the classification example).

    python -m examples.classification.train --config CONFIG [--synthetic] [--data DIR] [--out DIR] [--resume]
        [--device auto|cuda|cpu] [--cost FILE] [--cost-dir DIR] [--trust-checkpoint FILE ...] [key.sub=value ...]
    torchrun --nproc_per_node N -m examples.classification.train --config CONFIG ...

Your own images (``DIR/train/<class>/*``, ``DIR/val/<class>/*``; configs/own_data/, README "Your own images"):
    python -m examples.classification.train --config CONFIG --data-dir DIR [--input-size N] [--student NAME]
        [--teacher NAME] [--teacher-checkpoint FILE]
``--data-dir`` sets ``data.dataset=folder`` and the class count from the folders. A WKD-L config without
``distill.wkd_l.cost`` builds the cost from the teacher (``build_cost_matrix``) into ``OUT/cost_matrix.pth``.

The loop, DDP, AMP, lr schedule, resume, checkpoints and logging are ``examples.common.trainer``'s; this file is the
classification task (data, student + teacher + losses from ``distill.py``, top-1 / top-5 evaluation). The config
schema (keys, types, defaults) is ``examples.common.schema.ClassificationConfig``. ``train.batch_size`` is the
*global* batch (the paper's), split over the processes; lr = ``train.lr * batch_size / train.base_batch``.
Outputs in ``--out`` (default ``runs/<config path>``): ``metrics.jsonl`` and ``tb/``, ``last.pth`` (the trainer's
train state), ``best.pth`` (student weights of the best top-1), ``config.yaml`` and ``summary.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from examples.common.checkpoint import is_trusted
from examples.common.config import load_config
from examples.common.distributed import barrier, cleanup_distributed, init_distributed, is_distributed, \
    seed_everything
from examples.common.methods import get_method
from examples.common.schema import ClassificationConfig, resolve
from examples.common.trainer import Task, Trainer, per_process_batch

from .data import build_datasets, build_loaders
from .distill import CLS_METHODS, Distiller

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
    p.add_argument("--trust-checkpoint", action="append", default=[], metavar="FILE",
                   help="load FILE (a teacher / student weights file or OUT/last.pth) with full unpickling "
                        "(weights_only=False), which can run code stored in it: only for files you trust; "
                        "repeatable (adds to train.trusted_checkpoints)")
    add_own_data_args(p)
    p.add_argument("--traceback", action="store_true",
                   help="show the Python traceback of a configuration / input error (default: its message)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.epochs=2 train.amp=none")
    return p.parse_args(argv)


def add_own_data_args(p: argparse.ArgumentParser) -> None:
    """The flags for training on one's own image folder (shared with ``build_cost_matrix``)."""
    g = p.add_argument_group("your own images")
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="an image folder: DIR/train/<class>/* and DIR/val/<class>/* (any images PIL reads); sets "
                        "data.dataset=folder, data.root=DIR and data.num_classes = the number of class folders")
    g.add_argument("--input-size", type=int, default=None, metavar="N",
                   help="images are resized to N x N (sets data.input_size; default: the config's)")
    g.add_argument("--student", default=None, metavar="NAME", help="student architecture (sets model.student)")
    g.add_argument("--teacher", default=None, metavar="NAME", help="teacher architecture (sets model.teacher)")
    g.add_argument("--teacher-checkpoint", default=None, metavar="FILE",
                   help="the trained teacher's weights, e.g. best.pth of a run of configs/own_data/teacher.yaml "
                        "(sets model.teacher_checkpoint)")


def apply_own_data_args(cfg: dict, args: argparse.Namespace) -> dict:
    """Apply ``--data-dir`` / ``--input-size`` / ``--student`` / ``--teacher`` / ``--teacher-checkpoint`` to the
    resolved config ``cfg`` (in place; returned). With ``--data-dir`` the class count is the number of class
    folders of DIR/train (a different explicit ``data.num_classes`` override is an error naming both)."""
    from .data import class_folders
    if getattr(args, "data_dir", None):
        if getattr(args, "synthetic", False):
            raise ValueError("--data-dir and --synthetic are exclusive")
        if getattr(args, "data", None):
            raise ValueError("--data-dir and --data are exclusive (--data-dir DIR is an image folder, --data the "
                             "root of the config's dataset)")
        classes = class_folders(args.data_dir, "train")
        explicit = [o for o in getattr(args, "overrides", []) if o.split("=", 1)[0].strip() == "data.num_classes"]
        if explicit and int(cfg["data"]["num_classes"]) != len(classes):
            raise ValueError(f"data.num_classes={cfg['data']['num_classes']} but --data-dir {args.data_dir} has "
                             f"{len(classes)} class folders in train/: drop the override")
        cfg["data"].update(dataset="folder", root=str(Path(args.data_dir).expanduser()), num_classes=len(classes))
    if getattr(args, "input_size", None) is not None:
        if args.input_size < 8:
            raise ValueError(f"--input-size must be >= 8, got {args.input_size}")
        cfg["data"]["input_size"] = int(args.input_size)
    for flag in ("student", "teacher"):
        if getattr(args, flag, None):
            cfg["model"][flag] = getattr(args, flag)
    if getattr(args, "teacher_checkpoint", None):  # relative to the working directory, like every flag path
        cfg["model"]["teacher_checkpoint"] = str(Path(args.teacher_checkpoint).expanduser().resolve())
    return cfg


def ensure_cost_from_teacher(cfg: dict, out: Path, info, log=print) -> Optional[Path]:
    """WKD-L without a cost (``distill.wkd_l.cost: null``, as in configs/own_data/): build the teacher's class
    distance (``build_cost_matrix`` with ``cost_matrix.source``) into ``out/cost_matrix.pth`` on rank 0 (kept and
    reused by later runs and ``--resume``) and point ``distill.wkd_l.cost`` at it. Does nothing for other methods,
    a set cost, ``--synthetic`` (random stand-in) or a missing teacher checkpoint (``build_distiller`` then says
    what to pass). Returns the file or None."""
    method = get_method(cfg["distill"]["method"], CLS_METHODS)
    mcfg = cfg["model"]
    if ("wkd_l" not in method.terms or cfg["distill"]["wkd_l"]["cost"] is not None
            or cfg["data"]["dataset"] == "synthetic" or not mcfg["teacher"] or not mcfg["teacher_checkpoint"]):
        return None
    path = (out / "cost_matrix.pth").resolve()
    if info.is_main:
        if path.is_file():
            log(f"WKD-L cost: {path} (built from the teacher by an earlier run)")
        else:
            from .build_cost_matrix import build_cost_matrix
            log(f"distill.wkd_l.cost is not set: building the teacher's class distance (1 - CKA of its "
                f"{cfg['cost_matrix']['source']}) into {path}")
            out.mkdir(parents=True, exist_ok=True)
            build_cost_matrix(cfg, path, device=info.device.type, workers=cfg["data"]["workers"],
                              progress=bool(cfg["train"]["progress"]), trusted=cfg["train"]["trusted_checkpoints"],
                              config_name="training config")
    barrier()
    cfg["distill"]["wkd_l"]["cost"] = str(path)
    return path


def _default_out(config: str) -> Path:
    path = Path(config).resolve()
    try:
        rel = path.relative_to((REPO_ROOT / "examples" / "classification" / "configs").resolve())
    except ValueError:
        rel = Path(path.name)
    return Path("runs") / rel.with_suffix("")


def resolve_config(args: argparse.Namespace) -> dict:
    """Load the config, check it against the schema (defaults filled in), apply --synthetic / --data / --device /
    --cost."""
    cfg = resolve(ClassificationConfig, load_config(args.config, args.overrides), args.config)
    if args.synthetic:
        cfg["data"]["dataset"] = "synthetic"
    if args.data:
        cfg["data"]["root"] = args.data
    if args.device:
        cfg["train"]["device"] = args.device
    apply_own_data_args(cfg, args)
    cfg["train"]["trusted_checkpoints"] = list(cfg["train"]["trusted_checkpoints"]) + \
        [str(Path(f).expanduser().resolve()) for f in getattr(args, "trust_checkpoint", [])]
    method = get_method(cfg["distill"]["method"], CLS_METHODS)
    if args.cost:
        if "wkd_l" not in method.terms:
            raise ValueError(f"--cost: {args.config} does not use WKD-L (method {method.name!r})")
        cfg["distill"]["wkd_l"]["cost"] = args.cost
    if not cfg["model"]["student"]:
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


def build_network(name: str, num_classes: int, weights: Optional[str], what: str, build_model,
                  trusted: Sequence[str] = ()) -> nn.Module:
    """``build_model(name, num_classes)`` with optional weights.

    ``weights``: None (random initialisation); a file path (relative to the repository root, or absolute):
    anything ``build_model(checkpoint=...)`` loads (this trainer's ``last.pth`` / ``best.pth``, CRD / mdistiller
    teacher files, a torchvision state dict); or ``torchvision:<Enum>.<NAME>`` (e.g.
    ``torchvision:ResNet34_Weights.IMAGENET1K_V1``): torchvision's published weights, downloaded on first use
    (machines with internet only; never at import). A file is read with ``weights_only=True`` unless it is one of
    the ``trusted`` paths (``train.trusted_checkpoints``).
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
    return build_model(name, num_classes, checkpoint=str(p), trusted=is_trusted(p, trusted))


def init_from_pretrained(model: nn.Module, path: str, what: str, trusted: Sequence[str] = ()) -> List[str]:
    """Initialise ``model.net`` from a pretrained state dict of the same architecture with a different classifier
    (e.g. ImageNet weights for CIFAR-100 fine-tuning): every key is loaded except the classifier's, which keeps
    its fresh initialisation. Returns the skipped keys; any other mismatch is an error naming ``what``."""
    from .models.registry import _read_file, extract_state_dict
    p = Path(_resolve_path(path))
    if not p.is_file():
        raise FileNotFoundError(f"{what}: weights file {p} does not exist")
    sd = extract_state_dict(_read_file(str(p), is_trusted(p, trusted)), str(p))  # the zoo's reader
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
    cfg = resolve(ClassificationConfig, cfg, "classification config")
    mcfg, dcfg = cfg["model"], dict(cfg["distill"])
    method = get_method(dcfg["method"], CLS_METHODS)
    K = int(cfg["data"]["num_classes"])
    trusted = cfg["train"]["trusted_checkpoints"]
    student = build_network(mcfg["student"], K, mcfg["student_checkpoint"], "model.student_checkpoint",
                            build_model, trusted)
    if mcfg["student_init"]:
        if mcfg["student_checkpoint"]:
            raise ValueError("model.student_init and model.student_checkpoint are exclusive")
        skipped = init_from_pretrained(student, mcfg["student_init"], "model.student_init", trusted)
        log(f"student initialised from {mcfg['student_init']} (new classifier: {skipped or 'none'})")
    teacher = None
    if method.needs_teacher:
        if not mcfg["teacher"]:
            raise ValueError(f"distill.method={dcfg['method']!r} needs model.teacher")
        ckpt = mcfg["teacher_checkpoint"]
        if ckpt is not None and synthetic and (str(ckpt).startswith("torchvision:")
                                               or not Path(_resolve_path(ckpt)).is_file()):
            log(f"warning: --synthetic: teacher weights {ckpt} not used (missing file or a download)")
            ckpt = None
        if ckpt is None:
            if not (synthetic or mcfg["allow_random_teacher"]):
                raise ValueError(
                    f"model.teacher_checkpoint is not set: pass --teacher-checkpoint FILE, the weights of a trained "
                    f"{mcfg['teacher']} with {K} classes (on your own images, train it first: python -m "
                    f"examples.classification.train --config examples/classification/configs/own_data/teacher.yaml "
                    f"--data-dir DIR --out runs/teacher, then --teacher-checkpoint runs/teacher/best.pth). "
                    f"A random teacher is only allowed with --synthetic or model.allow_random_teacher=true")
            log("warning: the teacher is randomly initialised (no model.teacher_checkpoint)")
        teacher = build_network(mcfg["teacher"], K, ckpt, "model.teacher_checkpoint", build_model, trusted)
    if "wkd_l" in method.terms and dcfg["wkd_l"]["cost"] is None and not synthetic:
        raise ValueError("distill.wkd_l.cost is not set: pass --cost FILE (a [C, C] class distance, e.g. from "
                         "python -m examples.classification.build_cost_matrix), or --teacher-checkpoint FILE so "
                         "that the trainer builds it from the teacher")
    if "wkd_l" in method.terms and dcfg["wkd_l"]["cost"] is None:
        log("warning: --synthetic: distill.wkd_l.cost is not set; using a random stand-in")
        g = torch.Generator().manual_seed(0)
        d = torch.rand(K, K, generator=g)
        dcfg["wkd_l"] = dict(dcfg["wkd_l"], cost=((d + d.T) / 2).fill_diagonal_(0.0))
    elif "wkd_l" in method.terms and isinstance(dcfg["wkd_l"]["cost"], str):
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
    return Distiller(student, teacher, dcfg, int(cfg["train"]["epochs"]), input_size=int(cfg["data"]["input_size"]))


class ClassificationTask(Task):
    """Classification hooks of the common trainer: DistributedSampler batches, the Distiller's loss terms (with
    the scheduled WKD weights of every epoch), sharded top-1 / top-5 evaluation, summary.json."""
    name = "classification"
    score_key = "top1"
    channels_last = True

    def __init__(self, cfg: dict, args: argparse.Namespace, info, log):
        self.cfg, self.info, self.args = cfg, info, args
        tcfg, dcfg = cfg["train"], cfg["data"]
        self.device = info.device
        per_proc = per_process_batch(int(tcfg["batch_size"]), info.world_size)
        self.synthetic = dcfg["dataset"] == "synthetic"
        train_set, val_set = build_datasets(dcfg)
        workers = dcfg["synthetic_workers"] if self.synthetic else dcfg["workers"]
        self.train_loader, self.sampler, self.val_loader = build_loaders(
            train_set, val_set, batch_size=per_proc, rank=info.rank, world_size=info.world_size,
            seed=tcfg["seed"], workers=workers, pin_memory=self.device.type == "cuda",
            eval_batch_size=tcfg["eval_batch_size"] or per_proc)
        # torchvision:... weights are downloaded on first use: rank 0 fetches them, the others wait for the cache
        downloads = info.distributed and not self.synthetic and any(
            str(cfg["model"][k] or "").startswith("torchvision:") for k in ("teacher_checkpoint", "student_checkpoint"))
        if downloads and not info.is_main:
            barrier()
        self.model = self.distiller = build_distiller(cfg, synthetic=self.synthetic, log=log, cost_dir=args.cost_dir)
        if downloads and info.is_main:
            barrier()
        self.channels_last_on = tcfg["channels_last"] and self.device.type == "cuda"
        d = self.distiller
        log(f"method {d.method}: student {cfg['model']['student']} "
            f"({sum(p.numel() for p in d.student.parameters()) / 1e6:.2f}M params), teacher "
            f"{cfg['model']['teacher'] if d.teacher is not None else None}, distillation modules "
            f"{sum(p.numel() for p in d.losses.parameters()) / 1e6:.3f}M params")

    def state_modules(self) -> Dict[str, nn.Module]:
        return {"model": self.distiller.student, "distill": self.distiller.losses}

    def iters_per_epoch(self) -> int:
        return len(self.train_loader)

    def on_epoch(self, epoch: int) -> Dict[str, float]:
        self.sampler.set_epoch(epoch)
        return self.distiller.set_epoch(epoch)

    def batches(self, epoch: int, start_batch: int):
        # the training workers start anew every epoch (not persistent): their augmentation seeds come from the
        # process RNG at the start of the epoch, which --resume restores
        return iter(self.train_loader)

    def step(self, model: nn.Module, batch, step: int):
        images, targets = batch
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if self.channels_last_on:
            images = images.contiguous(memory_format=torch.channels_last)
        return model(images, targets)[1]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, epoch: int) -> Dict[str, float]:
        """Top-1 / top-5 (%) and mean cross-entropy of the student over the sharded val set, summed over ranks."""
        from examples.common.amp import autocast
        student = model.student
        was = student.training
        student.eval()
        stats = torch.zeros(4, dtype=torch.float64, device=self.device)  # correct1, correct5, count, loss sum
        for images, targets in self.val_loader:
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            if self.channels_last_on:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(self.device, self.cfg["train"]["amp"]):
                logits = student(images, features=False).logits
            logits = logits.float()
            hit = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(targets[:, None])
            stats += torch.stack([hit[:, 0].sum().double(), hit.any(1).sum().double(),
                                  torch.tensor(targets.numel(), dtype=torch.float64, device=self.device),
                                  torch.nn.functional.cross_entropy(logits, targets, reduction="sum").double()])
        if is_distributed():
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        student.train(was)
        c1, c5, n, loss = stats.tolist()
        n = max(n, 1.0)
        return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss / n}

    def finish(self, out: Path, summary: dict) -> dict:
        cfg, d, metrics = self.cfg, self.distiller, summary["metrics"] or {}
        summary = {**summary, "config": str(self.args.config), "method": d.method, "student": cfg["model"]["student"],
                   "teacher": cfg["model"]["teacher"] if d.teacher is not None else None,
                   "expected_top1": cfg["expected_top1"], "best_top1": summary["best"],
                   "final_top1": metrics.get("top1"), "final_top5": metrics.get("top5"),
                   "synthetic": self.synthetic}
        if self.info.is_main:
            keep = {k: v for k, v in summary.items() if k != "losses"}
            with open(out / "summary.json.tmp", "w") as f:
                json.dump({**keep, "resolved_config": cfg}, f, indent=2)
            (out / "summary.json.tmp").replace(out / "summary.json")
            print(json.dumps({k: v for k, v in keep.items() if k != "metrics"}, indent=2))
        return summary


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    cfg = resolve_config(args)
    info = init_distributed(cfg["train"]["device"])
    try:
        log = print if info.is_main else (lambda *a, **k: None)
        wkd_l = cfg["distill"]["wkd_l"]
        if (cfg["data"]["dataset"] == "synthetic" and "wkd_l" in get_method(cfg["distill"]["method"], CLS_METHODS).terms
                and isinstance(wkd_l["cost"], str)):
            path, tried = resolve_cost(wkd_l["cost"], args.cost_dir)
            if path is None:  # say it first, not among the training lines
                log(stand_in_banner(wkd_l["cost"], tried))
        if info.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        out = Path(args.out) if args.out else _default_out(args.config)
        ensure_cost_from_teacher(cfg, out, info, log)
        seed_everything(cfg["train"]["seed"], 0)  # identical initialisation on every rank
        task = ClassificationTask(cfg, args, info, log)
        return Trainer(cfg, task, info, out, resume=args.resume, log=log).run()
    finally:
        cleanup_distributed()


def run_command_line(entry, argv: Optional[List[str]] = None) -> None:
    """``entry(argv)`` for a ``python -m`` entry point: a configuration / input error (ValueError,
    FileNotFoundError: their messages name the flag or key to set) exits with status 2 and the message alone,
    unless ``--traceback``; Ctrl-C exits with 130."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        entry(argv)
    except KeyboardInterrupt:
        sys.exit(130)
    except (ValueError, FileNotFoundError) as e:
        if "--traceback" in argv:
            raise
        print(f"error: {e}\n(--traceback shows where it was raised)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run_command_line(main)
