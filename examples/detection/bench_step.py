"""Time one detection training step: student alone vs distilled (default WKD-L + WKD-F), on any device.

    python -m examples.detection.bench_step --pair r101_r18 --batch 8 --size 800 [--amp bf16] [--steps 10]
    python -m examples.detection.bench_step --pair r50_mv2 --batch 2 --size 160 --device cpu --steps 3

A step = forward (student; for distillation also the frozen teacher's backbone and box head on the student's
sampled RoIs) + backward + SGD update, exactly as ``train.py`` does it, on random images of ``size`` x
round(4/3 size) pixels (the model resizes them to shorter side ``size``, longer side <= 1333 * size / 800) with
1-5 random boxes each, 81 classes (COCO). No weights are downloaded: both networks start from random weights
whose BatchNorm statistics are first calibrated on random images and then frozen (FrozenBatchNorm2d, the last 3
stages trainable: the layout of a real run from ImageNet backbones), so activations have realistic scales. The
WKD-L cost is a random symmetric [81, 81] distance (the step cost does not depend on its values).

All modes are built first (each from the same student initialisation) and stepped in turn on the same
batches (step i of every mode before step i + 1), so a load change on a shared machine affects all alike.
Prints the device, sizes, dtype and, per mode, the median / min wall-clock step time in ms over ``--steps``
timed steps after ``--warmup`` untimed ones (on CPU also the median process CPU time, all threads summed, which
other jobs on a shared machine disturb less); ``--json PATH`` also writes them.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from examples.common.amp import autocast, make_grad_scaler

from .distill import DetectionDistiller, DistillLosses
from .models import build_backbone, build_detector

PAIRS = {"r101_r18": ("resnet101_fpn", "resnet18_fpn"), "r50_mv2": ("resnet50_fpn", "mobilenet_v2_fpn")}
NUM_CLASSES = 81


def _mode_cfg(mode: str, covariance: str, grid: int) -> dict:
    wkd_l = {"cost": None, "kappa": 1.0, "temperature": 2.0, "weight": 10.0}
    wkd_f = {"weight": 0.05, "covariance": covariance, "grid": grid, "projector": "conv1x1_linear", "num_iters": 20}
    return {"student": {"method": "ce"}, "kd": {"method": "kd", "kd": {"temperature": 1.0}},
            "dkd": {"method": "dkd", "dkd": {"beta": 0.25, "temperature": 1.0}},
            "wkd_l": {"method": "wkd_l", "wkd_l": wkd_l}, "wkd_f": {"method": "wkd_f", "wkd_f": wkd_f},
            "wkd_lf": {"method": "wkd_lf", "wkd_l": wkd_l, "wkd_f": wkd_f}}[mode]


MODES = ("student", "kd", "dkd", "wkd_l", "wkd_f", "wkd_lf")


@torch.no_grad()
def calibrated_backbone_file(arch: str, size: int, device: torch.device, path: Path, batches: int = 3) -> Path:
    """Random-weight backbone whose BatchNorm running statistics are the (cumulative) statistics of random
    images at ``size``; its body's state dict is saved to ``path`` (an "ImageNet checkpoint" stand-in)."""
    bb = build_backbone(arch, frozen_bn=False).to(device)
    for m in bb.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    bb.train()
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)  # the detector's normalisation
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    for _ in range(batches):
        bb.body((torch.rand(2, 3, size, size, device=device) - mean) / std)
    torch.save(bb.body.state_dict(), path)
    return path


def _batch(n: int, size: int, device: torch.device, g: torch.Generator):
    H, W = size, round(size * 4 / 3)
    images = [torch.rand(3, H, W, generator=g).to(device) for _ in range(n)]
    targets = []
    for _ in range(n):
        k = int(torch.randint(1, 6, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * torch.tensor([W * 0.6, H * 0.6])
        wh = (0.1 + 0.3 * torch.rand(k, 2, generator=g)) * torch.tensor([W, H])
        boxes = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(1, NUM_CLASSES, (k,), generator=g)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images, targets


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(pair: str, batch: int, size: int, modes, steps: int, warmup: int, amp: str, device: torch.device,
          covariance: str = "diag", grid: int = 1) -> dict:
    t_arch, s_arch = PAIRS[pair]
    max_size = round(1333 * size / 800)
    g = torch.Generator().manual_seed(0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        s_file = calibrated_backbone_file(s_arch, size, device, Path(tmp) / "s.pth")
        t_file = calibrated_backbone_file(t_arch, size, device, Path(tmp) / "t.pth")
        teacher = build_detector(t_arch, NUM_CLASSES, size, max_size, backbone_checkpoint=str(t_file))
        teacher.eval().to(device)
        for p in teacher.parameters():
            p.requires_grad_(False)
        d = torch.rand(NUM_CLASSES, NUM_CLASSES, generator=g)
        d = 0.5 * (d + d.T)
        d.fill_diagonal_(0)
        runs = {}
        for mode in modes:
            cfg = _mode_cfg(mode, covariance, grid)
            if "wkd_l" in cfg:
                cfg["wkd_l"] = dict(cfg["wkd_l"], cost=d)
            torch.manual_seed(0)  # every mode starts from the same student
            student = build_detector(s_arch, NUM_CLASSES, size, max_size, backbone_checkpoint=str(s_file))
            losses = DistillLosses(cfg, NUM_CLASSES)
            model = DetectionDistiller(student, teacher if losses.needs_teacher else None, losses, (size,),
                                       size).to(device).train()
            params = [p for p in model.parameters() if p.requires_grad]
            runs[mode] = (model, torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4),
                          make_grad_scaler(device, amp), [], [])
        # interleaved: step i of every mode runs on the same batch, one mode after the other, so that a load
        # change on a shared machine hits all modes alike
        for i in range(warmup + steps):
            images, targets = _batch(batch, size, device, g)
            for mode, (model, opt, scaler, times, cpu_times) in runs.items():
                _sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                with autocast(device, amp):
                    out = model(images, targets)
                loss = sum(out.values())
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                _sync(device)
                if i >= warmup:
                    times.append(1000 * (time.perf_counter() - t0))
                    cpu_times.append(1000 * (time.process_time() - c0))
                if not torch.isfinite(loss.detach()):
                    raise FloatingPointError(f"bench_step: non-finite loss in mode {mode}: "
                                             + ", ".join(f"{k}={float(v):.4g}" for k, v in out.items()))
                if i == warmup + steps - 1:
                    per_img = model.student.roi_heads.fg_bg_sampler.batch_size_per_image
                    results[mode] = {"median_ms": statistics.median(times), "min_ms": min(times),
                                     "cpu_median_ms": statistics.median(cpu_times), "steps": steps,
                                     "terms": sorted(out.keys()), "rois_per_step_max": per_img * batch}
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pair", default="r101_r18", choices=sorted(PAIRS))
    p.add_argument("--batch", type=int, default=8, help="images per step (one process)")
    p.add_argument("--size", type=int, default=800, help="shorter image side in pixels")
    p.add_argument("--modes", default="student,wkd_lf", help=f"comma list of {MODES}")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    p.add_argument("--covariance", default="diag", choices=("diag", "full"), help="WKD-F covariance")
    p.add_argument("--grid", type=int, default=1, help="WKD-F grid")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"bench_step: unknown --modes {bad}; known: {MODES}")
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    if a.threads:
        torch.set_num_threads(a.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    t_arch, s_arch = PAIRS[a.pair]
    dtype = {"none": "float32", "bf16": "bfloat16 autocast", "fp16": "float16 autocast"}[a.amp]
    print(f"[bench] device {name}; torch {torch.__version__}; {t_arch} -> {s_arch}; batch {a.batch}; images "
          f"{a.size} x {round(a.size * 4 / 3)} (min_size {a.size}); {dtype}; WKD-F covariance {a.covariance} "
          f"grid {a.grid}; {a.warmup} warm-up + {a.steps} timed steps", flush=True)
    res = bench(a.pair, a.batch, a.size, modes, a.steps, a.warmup, a.amp, device, a.covariance, a.grid)
    base = res.get("student", {}).get("median_ms")
    for m, r in res.items():
        rel = f"  ({r['median_ms'] / base:.2f}x student)" if base and m != "student" else ""
        cpu = (f"  process CPU time median {r['cpu_median_ms']:9.1f} ms (all threads)"
               if device.type == "cpu" else "")
        print(f"[bench] {m:8s} median {r['median_ms']:9.1f} ms  min {r['min_ms']:9.1f} ms{rel}{cpu}  terms "
              f"{','.join(r['terms'])}", flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "pair": a.pair, "batch": a.batch,
                       "size": a.size, "amp": a.amp, "covariance": a.covariance, "grid": a.grid,
                       "results": res}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
