"""Shared helpers of the benchmarks: timing (medians after warm-up), real cost matrices, table output."""
from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def time_fn(fn, device: str, warmup: int = 2, reps: int = 10) -> dict:
    """Median / min / max wall time of fn() in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps}


def time_interleaved(fns: dict, device: str, warmup: int = 2, reps: int = 10) -> dict:
    """time_fn for several functions measured round-robin (rep 1 of each, then rep 2 of each, ...).

    On a shared or virtualised machine whose speed drifts by tens of percent between seconds, timing one method
    after the other compares machine states, not methods; interleaving gives each method the same conditions.
    Returns {name: time_fn-style dict}.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(time_fn(fn, device, 0, 1)["median_ms"])
    return {name: {"median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t), "reps": reps}
            for name, t in times.items()}


def find_data_dir():
    for c in (os.environ.get("WKD_DATA_DIR"), REPO / "data", REPO.parent / "shared" / "data"):
        if c and Path(c).is_dir():
            return Path(c)
    return None


def wkd_cost(num_classes: int, kappa: float = 1.0, dtype=torch.float32, seed: int = 0):
    """The released CKA distance for C=1000 (ImageNet, ResNet34) or C=100 (CIFAR, resnet32x4), sharpened like
    WKD-L (c = relu(1 - exp(-kappa d)) + 1e-8); a random symmetric one with zero diagonal otherwise.
    Returns (cost, source description)."""
    names = {1000: "imagenet_resnet34_cka_distance.pth", 100: "cifar100_resnet32x4_cka_distance.pth"}
    d = find_data_dir()
    if d is not None and num_classes in names and (d / names[num_classes]).exists():
        dist = torch.load(d / names[num_classes], weights_only=True).double()
        src = names[num_classes]
    else:
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(num_classes, num_classes, generator=g, dtype=torch.float64)
        dist = (x + x.T) / 2
        dist.fill_diagonal_(0)
        src = "random symmetric"
    cost = torch.relu(1 - torch.exp(-kappa * dist)) + 1e-8
    return cost.to(dtype), src


def print_table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    lines = [" | ".join(c.ljust(widths[c]) for c in columns), "-|-".join("-" * widths[c] for c in columns)]
    for r in rows:
        lines.append(" | ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))
    text = "\n".join(lines)
    print(text)
    return text


def _fmt(x):
    if x is None:
        return "-"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:.0f}"
        if abs(x) >= 1e-2:
            return f"{x:.3g}"
        return f"{x:.1e}"
    return str(x)


def save(rows: list[dict], meta: dict, csv_path=None, json_path=None):
    if csv_path:
        keys = sorted({k for r in rows for k in r})
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


def capture_cuda_graph(step, warmup=1):
    """Run ``step()`` ``warmup`` times on a side stream (kernels compile and caches fill outside the capture), then
    capture one more call in a CUDA graph (python_tests/conftest.py has the same helper for the tests). Returns
    (graph, outputs of the captured call, outputs of the last warm-up call); the captured outputs hold their values
    only after ``graph.replay()``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    eager = None
    with torch.cuda.stream(side):
        for _ in range(warmup):
            eager = step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    return graph, captured, eager
