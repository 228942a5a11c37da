"""The paper's training-latency table on our kernels: one distillation training step, ResNet34 -> ResNet18.

Per-iteration latency (median ms after warm-up; CUDA events on GPU, wall clock on CPU) of a full training step:
teacher forward (eval mode, no grad), student forward, loss, backward, SGD step (momentum 0.9, weight decay 1e-4,
over the student and the loss's own parameters, i.e. the WKD-F projector). torchvision's ResNet34 (teacher) and
ResNet18 (student) definitions with random weights, synthetic batches (random images and labels), bf16 autocast
and channels_last by default. Methods (each adds its loss to the cross-entropy):

  CE only | KD (tau 4) | DKD (alpha 1, beta 8, tau 4) | NKD (tau 1, gamma 1.5)
  WKD-L as published: per-sample gather of the (C-1) x (C-1) cost and a batched-bmm Sinkhorn (written below, the
      literal formulation of the published code; kept as the reference row)
  WKD-L (ours): wkd_kernels.losses.WKDLogitLoss (shared C x C cost, target given zero mass)
  WKD-F diag / full (ours): wkd_kernels.losses.WKDFeatureLoss on the layer4 maps (512 x 7 x 7 at 224 px), grid 1,
      bottleneck projector
  WKD-L + WKD-F (full)

plus the overhead of each over KD in %. The cost matrix is the released ImageNet CKA distance (sharpened, kappa 1)
when data/ or $WKD_DATA_DIR has it, a random symmetric one otherwise (the latency does not depend on its values).

Usage:
    python bench/train_step_latency.py --device cuda --json out.json           (batch 256, 224 x 224: the paper)
    python bench/train_step_latency.py --device cpu --batch 2 --image-size 64 --reps 2 --warmup 1   (smoke test)
Needs torchvision (not a dependency of wkd-kernels: the bench exits with a message when it is missing).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import device_name, print_table, save, time_fn, wkd_cost  # noqa: E402

from wkd_kernels.losses import (WKDFeatureLoss, WKDLogitLoss, dkd_loss, kd_loss,  # noqa: E402
                                nkd_loss)
from wkd_kernels.reference import published_wkd_logit_loss  # noqa: E402

METHODS = ["CE", "KD", "DKD", "NKD", "WKD-L (published)", "WKD-L (ours)", "WKD-F diag (ours)", "WKD-F full (ours)",
           "WKD-L + WKD-F full (ours)"]

WKDL_TEMPERATURE, WKDL_WEIGHT, WKDL_REG, WKDL_ITERS = 2.0, 30.0, 0.05, 10
WKDF_WEIGHT = 2e-2


# ---------------------------------------------------------------------------------------------- models
def resnet_forward(model, x):
    """torchvision ResNet forward returning (logits [B, classes], layer4 map [B, 512, H/32, W/32])."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    f = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    return model.fc(torch.flatten(model.avgpool(f), 1)), f


def build(args, device):
    try:
        import torchvision
    except ImportError as e:
        sys.exit("train_step_latency.py needs torchvision (ResNet34/ResNet18 definitions), which is not a "
                 f"dependency of wkd-kernels and failed to import ({e}): pip install torchvision (matching your torch)")
    mf = torch.channels_last if args.channels_last else torch.contiguous_format
    teacher = torchvision.models.resnet34(num_classes=args.classes).to(device, memory_format=mf).eval()
    for p_ in teacher.parameters():
        p_.requires_grad_(False)
    student = torchvision.models.resnet18(num_classes=args.classes).to(device, memory_format=mf).train()
    return teacher, student


def make_losses(args, device, ct, cs):
    cost, src = wkd_cost(args.classes)
    cost = cost.to(device)
    wkdl = WKDLogitLoss(cost, WKDL_TEMPERATURE, WKDL_WEIGHT, WKDL_REG, WKDL_ITERS).to(device)
    mf = torch.channels_last if args.channels_last else torch.contiguous_format

    def wkdf(cov):
        return WKDFeatureLoss(cs, ct, covariance=cov, grid=args.grid, projector="bottleneck",
                              weight=WKDF_WEIGHT).to(device, memory_format=mf)

    losses = {
        "CE": (lambda s, t, fs, ft, y: 0.0, []),
        "KD": (lambda s, t, fs, ft, y: kd_loss(s, t, 4.0), []),
        "DKD": (lambda s, t, fs, ft, y: dkd_loss(s, t, y, 1.0, 8.0, 4.0), []),
        "NKD": (lambda s, t, fs, ft, y: nkd_loss(s, t, y, 1.0, 1.5), []),
        "WKD-L (published)": (lambda s, t, fs, ft, y: published_wkd_logit_loss(
            s.float(), t.float(), y, cost, WKDL_TEMPERATURE, WKDL_WEIGHT, WKDL_REG, WKDL_ITERS), []),
        "WKD-L (ours)": (lambda s, t, fs, ft, y: wkdl(s, t, y), []),
    }
    f_diag, f_full, f_both = wkdf("diag"), wkdf("full"), wkdf("full")
    losses["WKD-F diag (ours)"] = (lambda s, t, fs, ft, y: f_diag(fs, ft).loss, list(f_diag.parameters()))
    losses["WKD-F full (ours)"] = (lambda s, t, fs, ft, y: f_full(fs, ft).loss, list(f_full.parameters()))
    losses["WKD-L + WKD-F full (ours)"] = (lambda s, t, fs, ft, y: wkdl(s, t, y) + f_both(fs, ft).loss,
                                          list(f_both.parameters()))
    return losses, src


def train_step(teacher, student, x, y, extra_loss, opt, device: str, amp: bool):
    """step() -> loss: one training step of ``student`` (cross-entropy plus ``extra_loss`` against the frozen
    ``teacher``) on the batch (x, y), through ``opt``."""
    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
            with torch.no_grad():
                t_logits, t_feat = resnet_forward(teacher, x)
            s_logits, s_feat = resnet_forward(student, x)
            loss = F.cross_entropy(s_logits, y) + extra_loss(s_logits, t_logits, s_feat, t_feat, y)
        loss.backward()
        opt.step()
        return loss

    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--grid", type=int, default=1, help="WKD-F grid (cells per side of the layer4 map)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--amp", default="bf16", choices=["bf16", "none"], help="autocast dtype (default bf16)")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--json", default=None, help="write the rows and settings as JSON here")
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown --methods {unknown}; choose from {METHODS}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True

    teacher, student = build(args, device)
    mf = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device).contiguous(memory_format=mf)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    with torch.no_grad():
        _, f = resnet_forward(teacher, x[:1])
    ct = cs = f.shape[1]
    losses, cost_src = make_losses(args, device, ct, cs)
    amp = args.amp == "bf16"

    # Sanity check before timing: the published WKD-L and ours give the same loss on this batch (float32 logits).
    with torch.no_grad():
        s0, _ = resnet_forward(student, x)
        t0, _ = resnet_forward(teacher, x)
        s0, t0 = s0.float(), t0.float()
        ref = float(losses["WKD-L (published)"][0](s0, t0, None, None, y))
        ours = float(losses["WKD-L (ours)"][0](s0, t0, None, None, y))
    wkdl_rel_diff = abs(ours - ref) / max(abs(ref), 1e-30)
    print(f"WKD-L parity on this batch: published {ref:.6g}, ours {ours:.6g}, "
          f"relative difference {wkdl_rel_diff:.2e}")

    rows = []
    for name in methods:
        extra_loss, extra_params = losses[name]
        opt = torch.optim.SGD(list(student.parameters()) + extra_params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
        step = train_step(teacher, student, x, y, extra_loss, opt, args.device, amp)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        r = time_fn(step, args.device, warmup=args.warmup, reps=args.reps)
        loss_val = float(step().detach())
        row = {"method": name, "median_ms": r["median_ms"], "min_ms": r["min_ms"], "max_ms": r["max_ms"],
               "loss": loss_val}
        if args.device == "cuda":
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
        rows.append(row)
        print(f"{name}: {r['median_ms']:.2f} ms", flush=True)
        del step, opt  # the optimizer's momentum buffers go before the next method is measured

    kd = next((r["median_ms"] for r in rows if r["method"] == "KD"), None)
    for r in rows:
        r["over_kd_pct"] = None if kd is None else 100.0 * (r["median_ms"] / kd - 1.0)
    meta = {"device": device_name(args.device), "torch": torch.__version__, "batch": args.batch,
            "image_size": args.image_size, "classes": args.classes, "teacher": "resnet34", "student": "resnet18",
            "amp": args.amp, "channels_last": args.channels_last, "warmup": args.warmup, "reps": args.reps,
            "wkdf_grid": args.grid, "wkdl_parity_rel_diff": wkdl_rel_diff,
            "wkdf_feature": f"layer4 {list(f.shape[1:])}", "cost": cost_src}
    print(f"\nResNet34 -> ResNet18 training step, batch {args.batch}, {args.image_size}x{args.image_size}, "
          f"amp={args.amp}, channels_last={args.channels_last}, {meta['device']} (median of {args.reps}, "
          f"after {args.warmup} warm-up steps); cost: {cost_src}")
    cols = ["method", "median_ms", "min_ms", "max_ms", "over_kd_pct"] + (["peak_mem_gb"] if args.device == "cuda"
                                                                          else [])
    print_table(rows, cols)
    save(rows, meta, csv_path=args.csv, json_path=args.json)
    bad = [r["method"] for r in rows if not torch.isfinite(torch.tensor(r["loss"]))]
    if bad:
        print(f"non-finite loss in: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
