"""Shared helpers of the classification-example tests (tiny configs, subprocess runs, CSV reading)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
import yaml

REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / "examples" / "classification" / "configs"
NUM_CLASSES = 10

METHOD_SECTIONS = {
    "ce": {},
    "kd": {"kd": {"temperature": 4.0, "weight": 0.9}, "ce_weight": 0.1},
    "dkd": {"dkd": {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": 2}},
    "nkd": {"nkd": {"temperature": 1.0, "gamma": 1.5, "weight": 1.0}},
    "fitnet": {"fitnet": {"weight": 10.0, "layer": "stage2", "projector": "conv1x1"}},
    "wkd_l": {"wkd_l": {"kappa": 1.0, "temperature": 4.0, "weight": 20.0, "decay_start": 1}},
    "wkd_f": {"wkd_f": {"weight": 0.01, "mean_cov_ratio": 2.0, "grid": 2, "projector": "conv1x1",
                        "layer": "last", "decay_start": 1}},
}
METHOD_SECTIONS["wkd_lf"] = {**METHOD_SECTIONS["wkd_l"], **METHOD_SECTIONS["wkd_f"]}


def random_cost(path: Path, k: int = NUM_CLASSES, seed: int = 0) -> Path:
    """A random symmetric [k, k] distance in [0, 1] with zero diagonal, saved like the released matrices."""
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(k, k, generator=g)
    d = 0.5 * (d + d.T)
    d.fill_diagonal_(0.0)
    torch.save(d, path)
    return path


def fake_imagenet(root: Path, classes: int = 3, per_class: int = 6) -> Path:
    """A tiny ImageNet folder tree (``root/{train,val}/<class>/*.JPEG``, random 40x48 images)."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True)
            for i in range(per_class if split == "train" else 2):
                px = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(px).save(d / f"img_{i}.JPEG", format="JPEG")
    return root


def tiny_config(tmp: Path, method: str, *, name: str = "cfg.yaml", epochs: int = 2, steps: int = 2,
                batch: int = 8, extra: Optional[dict] = None) -> Path:
    """A resnet8x4 <- resnet8x4 CIFAR config (10 classes, 32x32, synthetic data) written to ``tmp/name``."""
    distill = {"method": method, "ce_weight": 1.0}
    distill.update(METHOD_SECTIONS[method])
    if "wkd_l" in distill:
        cost = tmp / "cost.pth"
        if not cost.exists():
            random_cost(cost)
        distill["wkd_l"] = dict(distill["wkd_l"], cost=str(cost))
    cfg = {
        "_base_": str(CONFIGS / "_base_" / "cifar100.yaml"),
        "expected_top1": None,
        "data": {"dataset": "synthetic", "num_classes": NUM_CLASSES, "synthetic_size": 64,
                 "synthetic_val_size": 16},
        "model": {"student": "resnet8x4", "teacher": "resnet8x4" if method != "ce" else None},
        "train": {"epochs": epochs, "batch_size": batch, "base_batch": 64, "steps_per_epoch": steps,
                  "milestones": [1], "log_every": 1, "progress": False, "tensorboard": False, "amp": "none",
                  "device": "cpu"},
        "distill": distill,
    }
    if extra:
        from examples.common.config import deep_merge
        cfg = deep_merge(cfg, extra)
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> Dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def run_train(args: List[str], *, nproc: int = 1, timeout: float = 180.0, check: bool = True,
              module: str = "examples.classification.train") -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` (or torchrun with ``nproc`` gloo processes); MODULE: the trainer, or the tests'
    ``gloo_sync_bn`` entry point (the trainer with a CPU SyncBatchNorm)."""
    if nproc == 1:
        cmd = [sys.executable, "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", module, *args]
    proc = subprocess.run(cmd, cwd=str(REPO), env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed with {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def train_losses(out: Path, key: str = "train/loss") -> Dict[int, float]:
    """step -> value of ``key`` from out/metrics.jsonl (the lines that have it)."""
    from examples.common.metrics_log import read_metrics
    rows = {}
    for r in read_metrics(out / "metrics.jsonl"):
        if key in r:
            step = int(r["step"])
            assert step not in rows, f"step {step} logged twice in {out / 'metrics.jsonl'}"
            rows[step] = float(r[key])
    return rows
