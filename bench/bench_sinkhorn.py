"""wkd_kernels.sinkhorn per backend against plain PyTorch, on WKD-L's problem (docs/design.md section 3).

Each size B x C: one shared C x C cost (the released CKA distance of the paper when --data-dir / $WKD_DATA_DIR /
data/ holds it, sharpened c = relu(1 - exp(-d)) + 1e-8; otherwise a random symmetric stand-in, announced at the
top), softmax distributions of seeded random student/teacher logits (temperature 2) with the target class given
zero mass, reg 0.05, 10 iterations (WKD-L's settings). The backward differentiates the value w.r.t. the student
distribution a (the exact gradient). Baseline "plain PyTorch (matmul + autograd)": the same iterations as matrix
products on K = exp(-cost / reg) with autograd through the loop (bench/compare_pot.plain_pytorch). Reference:
wkd_kernels.reference.sinkhorn_reference in float64 (autograd through its scaling-domain loop, gauge-corrected).
bench/compare_pot.py adds POT to the comparison.

    python bench/bench_sinkhorn.py                          # B=256, C=1000 and 100, every backend of the device
    python bench/bench_sinkhorn.py --smoke --out /tmp/b     # tiny sizes, seconds
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _opbench as ob  # noqa: E402
from _common import DATA_HELP, find_cost_file, stand_in_warning, wkd_cost  # noqa: E402
from compare_pot import plain_pytorch, wkd_marginals  # noqa: E402

import wkd_kernels as wk  # noqa: E402
from wkd_kernels.reference import sinkhorn_reference  # noqa: E402

BASELINES = ("plain",)


def make_case(B, C, args):
    """The Case of one size: inputs (a, b, cost), a differentiated."""
    cost, src = wkd_cost(C, dtype=args.torch_dtype, data_dir=args.data_dir)
    a, b, _ = wkd_marginals(B, C, args.torch_dtype, args.device)
    cost = cost.to(args.device)
    reg, T = args.reg, args.iters

    def ours(bk):
        return lambda a, b, cost: wk.sinkhorn(a, b, cost, reg, T, backend=bk).value

    methods = [ob.Method(bk, ours(bk)) for bk in args.backends]
    if "plain" in args.baselines:
        methods.append(ob.Method("plain PyTorch (matmul + autograd)",
                                 lambda a, b, cost: plain_pytorch(a, b, cost, reg, T)))
    return ob.Case(shape=f"B={B} C={C} reg={reg:g} iters={T}", inputs=(a, b, cost), grad_inputs=(0,),
                   shared_inputs=(2,), reference=lambda a, b, cost: sinkhorn_reference(a, b, cost, reg, T)[0],
                   methods=methods, note=f"cost: {src}")


def main(argv=None):
    ap = ob.build_parser(__doc__, "256x1000,256x100", "8x50,4x20", "comma-separated BxC (B rows, C classes)", BASELINES)
    ap.add_argument("--reg", type=float, default=0.05, help="entropic regularisation; default: %(default)s")
    ap.add_argument("--iters", type=int, default=10, help="Sinkhorn iterations; default: %(default)s")
    ap.add_argument("--data-dir", default=None, help=DATA_HELP)
    args = ob.resolve(ap.parse_args(argv), "sinkhorn", has_cuda_cpp=True, baselines=BASELINES)
    sizes = ob.parse_sizes(args.sizes, 2, "256x1000,256x100")
    missing = [C for C in dict.fromkeys(C for _, C in sizes) if find_cost_file(C, args.data_dir) is None]
    if missing:
        print(stand_in_warning(missing, args.data_dir), flush=True)
    cases = (make_case(B, C, args) for B, C in sizes)
    return ob.run(cases, args, meta={"reg": args.reg, "iters": args.iters})


if __name__ == "__main__":
    main()
