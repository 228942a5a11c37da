"""Build a WKD-L cost matrix: d = 1 - CKA between the teacher's per-class representations.

    python -m examples.classification.build_cost_matrix --config CONFIG --output FILE.pth
        [--synthetic] [--data DIR] [--source logits|pooled|features] [--layer last] [--n-per-class N]
        [--batch-size B] [--device auto|cuda|cpu] [--resume] [key.sub=value ...]

The teacher (``model.teacher`` + ``model.teacher_checkpoint`` of the config) runs over the training set with the
evaluation transform, in dataset order; for every class the first n samples are kept (n = the smallest class
count by default, as in the paper), as
    logits    [K]            (what the released ImageNet matrices used),
    pooled    [D]            (the pooled feature vector), or
    features  [C * H * W]    (the flattened map of ``--layer``, what the released CIFAR-100 matrices used).
``wkd_kernels.interrelations.cka_distance`` (linear kernel) turns the [K, n, D] tensor into the [K, K] class
distance (symmetric, zero diagonal, in [0, 1]), saved with ``torch.save`` as float32 like the files the paper
released (the ``wkd_cost_matrix/`` folder of https://github.com/JiamingLv/WKD; not shipped here); WKD-L sharpens
it with kappa when training. A JSON sidecar FILE.json records how it was made. ``--resume`` continues an
interrupted run from FILE.partial.pth (written atomically every ``--save-every`` batches).
"""
from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from tqdm.auto import tqdm
from torch.utils.data import DataLoader, Subset

from examples.common.amp import autocast
from examples.common.checkpoint import load_checkpoint, save_checkpoint
from examples.common.config import load_config
from examples.common.schema import ClassificationConfig, resolve
from wkd_kernels.interrelations import cka_distance
from wkd_kernels.ops.feature_layout import as_nchw

from .data import build_datasets
from .train import add_own_data_args, apply_own_data_args, build_network

SOURCES = ("logits", "pooled", "features")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m examples.classification.build_cost_matrix", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a training config whose model.teacher is used")
    p.add_argument("--output", required=True, help="where to write the [K, K] distance (.pth)")
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--data", default=None, help="dataset directory (sets data.root)")
    p.add_argument("--source", default=None, choices=SOURCES,
                   help="what represents a sample (default: cost_matrix.source of the config, else logits)")
    p.add_argument("--layer", default=None, help="feature layer for --source features (default last)")
    p.add_argument("--n-per-class", type=int, default=None, help="samples per class (default: min class count)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    p.add_argument("--save-every", type=int, default=200, help="batches between partial saves (--resume)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT.partial.pth")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--seed", type=int, default=0, help="seed of the (synthetic-run) random teacher")
    p.add_argument("--trust-checkpoint", action="append", default=[], metavar="FILE",
                   help="load FILE (the teacher's weights) with full unpickling (weights_only=False), which can run "
                        "code stored in it: only for files you trust (adds to train.trusted_checkpoints)")
    add_own_data_args(p)
    p.add_argument("--traceback", action="store_true",
                   help="show the Python traceback of a configuration / input error (default: its message)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    return p.parse_args(argv)


def _targets(dataset) -> List[int]:
    t = getattr(dataset, "targets", None)
    if t is None:
        raise ValueError(f"build_cost_matrix: the dataset {type(dataset).__name__} has no `targets` list")
    return [int(x) for x in t]


def _write_tensor(path: Path, tensor: torch.Tensor) -> None:
    """torch.save to a temporary file, fsync, then rename (never a half-written output)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(tensor, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv: Optional[List[str]] = None) -> torch.Tensor:
    args = parse_args(argv)
    cfg = resolve(ClassificationConfig, load_config(args.config, args.overrides), args.config)
    if args.synthetic:
        cfg["data"]["dataset"] = "synthetic"
    if args.data:
        cfg["data"]["root"] = args.data
    apply_own_data_args(cfg, args)
    return build_cost_matrix(cfg, args.output, source=args.source, layer=args.layer, n_per_class=args.n_per_class,
                             batch_size=args.batch_size, workers=args.workers, device=args.device, amp=args.amp,
                             save_every=args.save_every, resume=args.resume, progress=not args.no_progress,
                             seed=args.seed, trusted=args.trust_checkpoint, config_name=args.config)


def build_cost_matrix(cfg: dict, output, *, source: Optional[str] = None, layer: Optional[str] = None,
                      n_per_class: Optional[int] = None, batch_size: int = 128, workers: Optional[int] = None,
                      device: str = "auto", amp: str = "none", save_every: int = 200, resume: bool = False,
                      progress: bool = True, seed: int = 0, trusted: Sequence[str] = (),
                      config_name: str = "config") -> torch.Tensor:
    """Write the [K, K] ``1 - CKA`` distance of the teacher of the resolved classification config ``cfg`` (its
    ``model.teacher`` / ``model.teacher_checkpoint`` over its ``data`` training set) to ``output`` (+ a JSON
    sidecar) and return it. Arguments as the command-line flags (module docstring); ``source`` / ``layer`` default
    to ``cost_matrix.source`` / ``cost_matrix.layer`` of ``cfg``."""
    dcfg, mcfg = dict(cfg["data"]), cfg["model"]
    source = source or cfg["cost_matrix"]["source"]
    layer = layer or cfg["cost_matrix"]["layer"]
    if source not in SOURCES:
        raise ValueError(f"cost_matrix.source must be one of {SOURCES}, got {source!r}")
    if not mcfg["teacher"]:
        raise ValueError(f"{config_name}: model.teacher is required (the network whose classes are compared)")
    device = torch.device("cuda" if (device == "auto" and torch.cuda.is_available()) or device == "cuda"
                          else "cpu")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")

    from .models import build_model
    torch.manual_seed(seed)  # a randomly initialised (synthetic-run) teacher is the same on every run
    ckpt = mcfg["teacher_checkpoint"]
    if ckpt is None and dcfg["dataset"] != "synthetic":
        raise ValueError("model.teacher_checkpoint is not set: a cost matrix of a random teacher is meaningless "
                         "(allowed only with --synthetic)")
    K = int(dcfg["num_classes"])
    trusted = list(cfg["train"]["trusted_checkpoints"]) + list(trusted)
    teacher = build_network(mcfg["teacher"], K, ckpt, "model.teacher_checkpoint", build_model,
                            trusted).to(device).eval()
    if source == "features" and layer not in teacher.feature_channels:
        raise ValueError(f"--layer {layer!r} is not a feature of {mcfg['teacher']}: "
                         f"{sorted(teacher.feature_channels)}")

    train_set, _ = build_datasets(dcfg, train_transform=False)
    targets = _targets(train_set)
    counts = Counter(targets)
    if len(counts) != K:
        raise ValueError(f"build_cost_matrix: the training set has samples of {len(counts)} classes, expected {K}")
    n = n_per_class or min(counts.values())
    if n < 2 or n > min(counts.values()):
        raise ValueError(f"--n-per-class must be in [2, {min(counts.values())}] (the smallest class count), got {n}")

    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial_path = out.with_name(out.stem + ".partial.pth")
    state = load_checkpoint(partial_path) if resume else None
    if state is not None and (state["n"] != n or state["source"] != source or state["num_classes"] != K):
        raise ValueError(f"--resume: {partial_path} was made with n={state['n']}, source={state['source']}, "
                         f"K={state['num_classes']}; this run asks n={n}, source={source}, K={K}")
    feats = state["features"] if state else None  # [K, n, D], filled lazily
    filled = state["filled"] if state else torch.zeros(K, dtype=torch.long)
    start = int(state["next_index"]) if state else 0
    # only the samples that will be kept: the first n of each class, in dataset order
    seen: Counter = Counter()
    keep = []
    for i, y in enumerate(targets):
        if seen[y] < n:
            keep.append(i)
            seen[y] += 1
    keep_from = [i for i in keep if i >= start]
    if workers is not None:
        pass
    elif dcfg["dataset"] == "synthetic":
        workers = dcfg["synthetic_workers"]
    else:
        workers = dcfg["workers"]
    loader = DataLoader(Subset(train_set, keep_from), batch_size=batch_size, shuffle=False,
                        num_workers=workers, pin_memory=device.type == "cuda")
    print(f"teacher {mcfg['teacher']} on {device}: {n} samples per class x {K} classes, source={source}"
          + (f" ({layer})" if source == "features" else "") + (f", resuming at index {start}" if state else ""))
    pos = 0
    with tqdm(total=len(keep_from), desc="cost matrix", unit="img", disable=not progress) as bar, \
            torch.no_grad():
        for b, (images, ys) in enumerate(loader):
            images = images.to(device, non_blocking=True)
            with autocast(device, amp):
                o = teacher(images, features=source != "logits")
            if source == "logits":
                v = o.logits
            elif source == "pooled":
                v = o.features["pooled"]
            else:
                f = o.features[layer]  # a ViT / DeiT "last" is tokens: its patch-token map, as for the CNNs
                v = as_nchw(f, *getattr(teacher, "feature_layouts", {}).get(layer, ("nchw", 0))).flatten(1)
            v = v.float().cpu()
            if feats is None:
                feats = torch.zeros(K, n, v.shape[1], dtype=torch.float32)
            for row, y in zip(v, ys.tolist(), strict=True):
                feats[y, filled[y]] = row
                filled[y] += 1
            pos += len(ys)
            bar.update(len(ys))
            if save_every > 0 and (b + 1) % save_every == 0 and pos < len(keep_from):
                save_checkpoint(partial_path, {"features": feats, "filled": filled, "n": n, "source": source,
                                               "num_classes": K, "next_index": keep_from[pos]})
    if feats is None or int(filled.min()) != n:
        raise RuntimeError(f"build_cost_matrix: collected {int(filled.min())} samples for some class, expected {n}")
    d = cka_distance(feats.to(device), "linear").float().cpu()
    d = 0.5 * (d + d.T)
    d.fill_diagonal_(0.0)
    _write_tensor(out, d)
    meta = {"config": str(config_name), "teacher": mcfg["teacher"], "teacher_checkpoint": ckpt, "source": source,
            "layer": layer if source == "features" else None, "n_per_class": n, "num_classes": K,
            "feature_dim": int(feats.shape[2]), "dataset": dcfg["dataset"], "kernel": "linear"}
    with open(out.with_suffix(".json"), "w") as f:
        json.dump(meta, f, indent=2)
    if partial_path.exists():
        partial_path.unlink()
    off = d[~torch.eye(K, dtype=torch.bool)]
    print(f"wrote {out}: [{K}, {K}] 1 - CKA, off-diagonal min {off.min():.4f} mean {off.mean():.4f} "
          f"max {off.max():.4f}")
    return d


if __name__ == "__main__":
    from .train import run_command_line
    run_command_line(main)
