"""A real-data check of the classification example: scikit-learn's digits, a teacher, a WKD-L student.

    python -m examples.digits_check [--work DIR] [--teacher resnet14] [--student resnet8] [--epochs 8]
        [--no-alone] [--min-teacher-top1 95] [--json FILE]

Runs, on CPU (or the default device), through the example's own entry point (``examples.classification.train``
``main()``) and the documented own-data commands (examples/classification/README.md, "Your own images"):

1. ``examples.classification.digits``: sklearn's 1797 digits (shipped with scikit-learn, nothing downloaded) as an
   image folder, 8x8 grey PNGs, stratified 75 / 25 train / val split;
2. the teacher: ``configs/own_data/teacher.yaml --data-dir DIR --student TEACHER``; its best val top-1 must reach
   ``--min-teacher-top1`` (the check fails otherwise);
3. the WKD-L student: ``configs/own_data/wkd_l.yaml --data-dir DIR --student STUDENT --teacher TEACHER
   --teacher-checkpoint .../best.pth``: its cost matrix is built from the teacher by the trainer;
4. unless ``--no-alone``: the student trained alone, ``configs/own_data/baseline.yaml``.

Every run uses the recipe of configs/_base_/own_data.yaml with ``--epochs`` epochs, ``--input-size 8`` and no
flips (a flipped digit is another symbol). Prints and returns the best val top-1 of each run and the wall times.
Exit status 1 if the teacher misses ``--min-teacher-top1`` or a run's top-1 is not finite.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

__all__ = ["run_digits_check", "main"]

OWN_DATA = Path(__file__).resolve().parent / "classification" / "configs" / "own_data"


def run_digits_check(work, *, teacher: str = "resnet14", student: str = "resnet8", epochs: int = 8,
                     alone: bool = True, device: str = "auto", seed: int = 0) -> dict:
    """Write the digits folder under ``work`` and train the teacher, the WKD-L student and (``alone``) the
    student alone there; returns ``{"teacher_top1", "wkd_l_top1", "alone_top1" (None without alone),
    "seconds": {...}, "work": ...}``."""
    from examples.classification import train
    from examples.classification.digits import write_digits_folder

    if int(epochs) < 1:
        raise ValueError(f"run_digits_check: `epochs` must be >= 1, got {epochs}")
    work = Path(work)
    data = work / "digits"
    seconds = {}
    t0 = time.time()
    counts = write_digits_folder(data, image_size=8, val_fraction=0.25, seed=seed)
    seconds["data"] = time.time() - t0
    common = ["--data-dir", str(data), "--input-size", "8", "--device", device,
              f"train.epochs={int(epochs)}", f"train.seed={int(seed)}", "data.hflip=false", "data.workers=0",
              "train.progress=false", "train.tensorboard=false", "train.log_every=10"]

    def run(name: str, config: str, *extra: str) -> float:
        t = time.time()
        summary = train.main(["--config", str(OWN_DATA / config), "--out", str(work / name), *extra, *common])
        seconds[name] = time.time() - t
        return float(summary["best_top1"])

    result = {"train_images": counts["train"], "val_images": counts["val"], "teacher": teacher,
              "student": student, "epochs": int(epochs)}
    result["teacher_top1"] = run("teacher", "teacher.yaml", "--student", teacher)
    result["wkd_l_top1"] = run("wkd_l", "wkd_l.yaml", "--student", student, "--teacher", teacher,
                               "--teacher-checkpoint", str(work / "teacher" / "best.pth"))
    result["alone_top1"] = run("alone", "baseline.yaml", "--student", student) if alone else None
    seconds["total"] = time.time() - t0
    result["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    result["work"] = str(work)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m examples.digits_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=None, help="folder for the data and the runs (default: a temporary one, "
                                                "removed afterwards)")
    p.add_argument("--teacher", default="resnet14", help="teacher architecture (a name of the model zoo)")
    p.add_argument("--student", default="resnet8", help="student architecture")
    p.add_argument("--epochs", type=int, default=8, help="epochs of every run")
    p.add_argument("--no-alone", action="store_true", help="skip the student trained alone")
    p.add_argument("--min-teacher-top1", type=float, default=95.0, help="fail below this teacher val top-1 (%%)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--json", default=None, help="also write the result to this file")
    args = p.parse_args(argv)
    kw = dict(teacher=args.teacher, student=args.student, epochs=args.epochs, alone=not args.no_alone,
              device=args.device)
    if args.work:
        result = run_digits_check(args.work, **kw)
    else:
        with tempfile.TemporaryDirectory(prefix="wkd_digits_") as tmp:
            result = run_digits_check(tmp, **kw)
    ok = result["teacher_top1"] >= args.min_teacher_top1 and all(
        v is None or math.isfinite(v) for v in (result["wkd_l_top1"], result["alone_top1"]))
    result["passed"] = bool(ok)
    text = json.dumps(result, indent=2)
    print("digits check (best val top-1, %):\n" + text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if result["teacher_top1"] < args.min_teacher_top1:
        print(f"FAILED: teacher top-1 {result['teacher_top1']:.2f} < --min-teacher-top1 {args.min_teacher_top1}",
              file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
