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


def time_fn(fn, device: str, warmup: int = 2, reps: int = 10, keep_times: bool = False) -> dict:
    """Median / min / max wall time of fn() in milliseconds (CUDA events on GPU); with ``keep_times`` also every
    time ("times_ms", for quantiles_ms)."""
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
    out = {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps}
    if keep_times:
        out["times_ms"] = times
    return out


def time_interleaved(fns: dict, device: str, warmup: int = 2, reps: int = 10, keep_times: bool = False) -> dict:
    """time_fn for several functions measured round-robin (rep 1 of each, then rep 2 of each, ...).

    On a shared or virtualised machine whose speed drifts by tens of percent between seconds, timing one method
    after the other compares machine states, not methods; interleaving gives each method the same conditions. The
    order rotates by one method per rep, so that no method always runs right after the same one (on CPU the one
    after a method that freed much memory or left the caches cold was measured up to 10% slower).
    Returns {name: time_fn-style dict} (with "times_ms" when ``keep_times``).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            times[name].append(time_fn(fns[name], device, 0, 1)["median_ms"])
    return {name: {"median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t), "reps": reps,
                   **({"times_ms": t} if keep_times else {})} for name, t in times.items()}


# ------------------------------------------------------------------------------------------------------------------
# The one benchmark row schema. Every script under bench/ writes its measurements as rows with these columns (one
# CSV per run), so that results of different scripts and machines concatenate into one table.
# ------------------------------------------------------------------------------------------------------------------
ROW_FIELDS = ("op", "backend", "mode", "shape", "dtype", "device", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb",
              "max_rel_err", "note")
MODES = ("fwd", "bwd", "fwd+bwd")


def quantiles_ms(times_ms) -> dict:
    """median / p20 / p80 of a list of per-call times in milliseconds (linear interpolation between samples)."""
    t = sorted(float(x) for x in times_ms)
    if not t:
        raise ValueError("quantiles_ms: times_ms is empty")

    def q(p):
        k = (len(t) - 1) * p
        lo, hi = int(k), min(int(k) + 1, len(t) - 1)
        return t[lo] + (t[hi] - t[lo]) * (k - lo)
    return {"median_ms": q(0.5), "p20_ms": q(0.2), "p80_ms": q(0.8)}


def bench_row(op: str, backend: str, mode: str, shape, dtype, device: str, times_ms=None, peak_mem_mb=None,
              max_rel_err=None, note: str = "") -> dict:
    """One row of the schema. ``shape`` is a string ("B=256 C=1000") or a dict/tuple rendered as one; ``dtype`` a
    torch dtype or its name; ``device`` the device name (device_name()); ``times_ms`` the per-call times (None for
    a row that records only an error or a skip, explained in ``note``)."""
    if mode not in MODES:
        raise ValueError(f"bench_row: mode must be one of {MODES}, got {mode!r}")
    if isinstance(shape, dict):
        shape = " ".join(f"{k}={v}" for k, v in shape.items())
    elif isinstance(shape, (tuple, list)):
        shape = "x".join(str(s) for s in shape)
    row = dict.fromkeys(ROW_FIELDS)
    row.update(op=op, backend=backend, mode=mode, shape=str(shape), dtype=str(dtype).replace("torch.", ""),
               device=device, peak_mem_mb=peak_mem_mb, max_rel_err=max_rel_err, note=note)
    if times_ms is not None:
        row.update(quantiles_ms(times_ms))
    return row


class RowWriter:
    """Writes schema rows as they are measured: the CSV gets one line per row at once, and the JSON (rows + run
    metadata) and the markdown table are rewritten after every row, so a run killed mid-way keeps every finished
    row in all three files. Any path may be None."""

    def __init__(self, csv_path=None, json_path=None, md_path=None, meta=None):
        self.rows, self.meta = [], dict(meta or {})
        self.csv_path, self.json_path, self.md_path = csv_path, json_path, md_path
        if csv_path:
            with open(csv_path, "w", newline="") as f:
                csv.DictWriter(f, fieldnames=ROW_FIELDS).writeheader()

    def add(self, row: dict) -> dict:
        unknown = set(row) - set(ROW_FIELDS)
        if unknown:
            raise ValueError(f"RowWriter.add: columns outside the schema: {sorted(unknown)}")
        row = {k: row.get(k) for k in ROW_FIELDS}
        self.rows.append(row)
        if self.csv_path:
            with open(self.csv_path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=ROW_FIELDS).writerow(row)
                f.flush()
                os.fsync(f.fileno())
        if self.json_path:
            _atomic_write(self.json_path, json.dumps({"meta": self.meta, "rows": self.rows}, indent=2))
        if self.md_path:
            _atomic_write(self.md_path, markdown_table(self.rows, ROW_FIELDS) + "\n")
        return row

    def update_meta(self, **items) -> None:
        """Add run metadata (e.g. the load average at the end) and rewrite the JSON with it."""
        self.meta.update(items)
        if self.json_path:
            _atomic_write(self.json_path, json.dumps({"meta": self.meta, "rows": self.rows}, indent=2))


def markdown_table(rows: list[dict], columns) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _atomic_write(path, text: str) -> None:
    """Write to a temporary file beside ``path`` and rename it over ``path``: a reader (or a kill) never sees half
    a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# The released CKA distances of the paper, by class count. They are not
# shipped here (the official code, https://github.com/JiamingLv/WKD, carries no licence): copy the files of its
# `wkd_cost_matrix/` folder under these names into data/ (git-ignored) or a folder named by --data-dir /
# WKD_DATA_DIR, or build one with `python -m examples.classification.build_cost_matrix`.
COST_FILES = {1000: "imagenet_resnet34_cka_distance.pth", 100: "cifar100_resnet32x4_cka_distance.pth"}
DATA_HELP = ("folder with the released cost matrices (" + ", ".join(f"{n} for C={c}" for c, n in COST_FILES.items())
             + "); default: $WKD_DATA_DIR, else data/ in the checkout; without them a random stand-in is used")


def data_dir_candidates(data_dir=None) -> list:
    """Where the cost matrices are looked for, in order: the argument, $WKD_DATA_DIR, data/ in the checkout."""
    return [Path(c) for c in (data_dir, os.environ.get("WKD_DATA_DIR"), REPO / "data") if c]


def find_data_dir(data_dir=None):
    for c in data_dir_candidates(data_dir):
        if c.is_dir():
            return c
    return None


def find_cost_file(num_classes: int, data_dir=None):
    """The released distance file for this class count, or None."""
    name = COST_FILES.get(num_classes)
    if name is None:
        return None
    for c in data_dir_candidates(data_dir):
        if (c / name).is_file():
            return c / name
    return None


def stand_in_warning(class_counts, data_dir=None) -> str:
    """The loud notice a run prints at its top when it falls back to a random cost for these class counts."""
    where = ", ".join(str(c) for c in data_dir_candidates(data_dir))
    lines = [f"# WARNING: C={c}: " + (f"the released cost matrix {COST_FILES[c]} was not found (looked in: {where})"
                                      if c in COST_FILES else "no released cost matrix exists for this class count")
             for c in class_counts]
    bar = "#" * 100
    return "\n".join([bar, *lines,
                      "# Using a RANDOM symmetric stand-in cost there: the timings hold, but it is not the paper's "
                      "problem (its",
                      "# released costs make K = exp(-c/0.05) nearly diagonal). Get the files from the "
                      "`wkd_cost_matrix/` folder of",
                      "# the official code (https://github.com/JiamingLv/WKD) into data/ or --data-dir / "
                      "WKD_DATA_DIR, or build one",
                      "# with `python -m examples.classification.build_cost_matrix`.", bar])


def wkd_cost(num_classes: int, kappa: float = 1.0, dtype=torch.float32, seed: int = 0, data_dir=None):
    """The released CKA distance for C=1000 (ImageNet, ResNet34) or C=100 (CIFAR, resnet32x4), sharpened like
    WKD-L (c = relu(1 - exp(-kappa d)) + 1e-8); a random symmetric one with zero diagonal otherwise.
    Returns (cost, source description); the description starts with "random" for the stand-in."""
    f = find_cost_file(num_classes, data_dir)
    if f is not None:
        dist = torch.load(f, weights_only=True).double()
        src = f.name
    else:
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(num_classes, num_classes, generator=g, dtype=torch.float64)
        dist = (x + x.T) / 2
        dist.fill_diagonal_(0)
        src = "random symmetric stand-in"
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


def plot_times(rows: list[dict], path, title: str = "", columns=("fwd_ms", "fwd_bwd_ms")) -> None:
    """Bar chart of time per method (log scale), one panel per size (B x C), one bar group per timing column.

    Needs matplotlib (``pip install matplotlib`` or the package's ``plot`` extra); call ``need_matplotlib()``
    before a long run so that a missing matplotlib fails at once."""
    need_matplotlib()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys((r["B"], r["C"]) for r in rows))
    fig, axes = plt.subplots(1, len(sizes), figsize=(6.5 * len(sizes), 4.8), squeeze=False)
    for ax, (B, C) in zip(axes[0], sizes, strict=True):
        rs = [r for r in rows if (r["B"], r["C"]) == (B, C)]
        methods = [r["method"] + (f" [{r['note']}]" if r.get("note") else "") for r in rs]
        width = 0.8 / len(columns)
        for j, col in enumerate(columns):
            xs = [i + (j - (len(columns) - 1) / 2) * width for i in range(len(rs))]
            vals = [r.get(col) or 0 for r in rs]
            bars = ax.bar(xs, vals, width, label=col.replace("_ms", "").replace("_", "+"))
            for bar, v in zip(bars, vals, strict=True):
                if v:
                    ax.annotate(_fmt(float(v)), (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom",
                                fontsize=7)
        ax.set_yscale("log")
        ax.set_xticks(range(len(rs)))
        ax.set_xticklabels([m.replace(" (", "\n(") for m in methods], fontsize=7, rotation=20, ha="right")
        ax.set_ylabel("median time per call [ms] (log)")
        ax.set_title(f"B={B}, C={C}")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def need_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib (or pip install -e '.[plot]')") from None


def capture_cuda_graph(step, warmup=1):
    """Run ``step()`` ``warmup`` times on a side stream (kernels compile and caches fill outside the capture), then
    capture one more call in a CUDA graph (python_tests/conftest.py uses this one too). Returns
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
