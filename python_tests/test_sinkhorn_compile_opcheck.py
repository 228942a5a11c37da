"""Sinkhorn as a PyTorch op: torch.library.opcheck (schema, fake kernel, autograd registration) of every backend's
forward and backward op, torch.compile(fullgraph=True) with backward, and Ctrl-C during a long CPU call.
"""
import pytest
import torch

import wkd_kernels as wk
from conftest import assert_interruptible, available_backends, backend_or_reason, rand_cost, simplex
from pairwise import pairwise
from sinkhorn_harness import F32, F64, problem, run_op


# ------------------------------------------------------------------------------- opcheck, torch.compile (every backend)
def _op_samples(backend, sizes):
    """opcheck's samples: pairwise (every pair of values in some sample) over cost layout x domain x keep_history x
    dtype per size; the interpreter (slow): float64, shared-scaling with history and per_row-log without (each value
    of each parameter once)."""
    grid = {"shared": [True, False], "log_domain": [False, True], "keep": [True, False], "dtype": [F32, F64]}
    cases = [{"shared": True, "log_domain": False, "keep": True, "dtype": F64},
             {"shared": False, "log_domain": True, "keep": False, "dtype": F64}] if backend.interpreted else \
        pairwise(grid)
    out = []
    for B, n, m in sizes:
        a, b = simplex(B, n, zeros=1), simplex(B, m, seed=2)
        for c in cases:
            cost = rand_cost(n, m) if c["shared"] else rand_cost(B, n, m)
            ad, bd, cd = backend.to(a.to(c["dtype"]), b.to(c["dtype"]), cost.to(c["dtype"]))
            out.append((ad.requires_grad_(), bd.requires_grad_(), cd, 0.1, 4, 1e-8 if c["log_domain"] else 0.0,
                        c["log_domain"], c["keep"]))
    return out


def test_opcheck(backend):
    """Schema, fake kernel, autograd registration of the backend's op (torch.ops.wkd.sinkhorn on CPU and CUDA
    tensors, torch.ops.wkd.sinkhorn_triton on its device, CPU tensors under the interpreter) and its backward op."""
    sizes = ((3, 5, 4),) if backend.device == "cpu" else ((3, 5, 4), (4, 33, 20))
    triton = backend.name == "triton"
    if backend.name == "cuda":  # the CUDA C++ kernels are the CUDA kernels of wkd::sinkhorn / _backward themselves
        assert torch._C._dispatch_has_kernel_for_dispatch_key("wkd::sinkhorn", "CUDA")
        assert torch._C._dispatch_has_kernel_for_dispatch_key("wkd::sinkhorn_backward", "CUDA")
    fwd = torch.ops.wkd.sinkhorn_triton.default if triton else torch.ops.wkd.sinkhorn.default
    if backend.name == "torch":
        fwd = torch.ops.wkd.sinkhorn_torch.default
    for args in _op_samples(backend, sizes):
        torch.library.opcheck(fwd, args + (("ieee",) if triton else ()))
    for shared in (True, False):
        for log_domain in (False, True):
            if backend.interpreted and log_domain == shared:
                continue
            a, b, cost = problem(3, 9, 7, F64, shared, zeros=1)
            out = run_op(backend, a, b, cost, 0.1, 4, 1e-8 if log_domain else 0.0, log_domain)
            g = backend.to(torch.linspace(0.5, 1.5, 3, dtype=F64))
            bwd = torch.ops.wkd.sinkhorn_triton_backward.default if triton else torch.ops.wkd.sinkhorn_backward.default
            if backend.name == "torch":
                bwd = torch.ops.wkd.sinkhorn_torch_backward.default
            torch.library.opcheck(bwd, (g, *backend.to(a, b, cost), *out[3:], 0.1, log_domain)
                                  + (("ieee",) if triton else ()))


# inductor: GPU backends only (a C++ compile per test on the CPU machine)
@pytest.mark.parametrize("backend,compile_backend", [
    pytest.param(be, cb, id=f"{be}-{cb}") for be in available_backends() for cb in ("aot_eager", "inductor")
    if cb == "aot_eager" or backend_or_reason(be).device != "cpu"], indirect=["backend"])
def test_torch_compile_fullgraph_with_backward(backend, compile_backend):
    torch._dynamo.reset()
    B, n = (3, 6) if backend.device == "cpu" else (8, 40)
    a, b, cost = problem(B, n, n, F32 if backend.device == "cuda" else F64, True, zeros=1)
    b, cost = backend.to(b, cost)

    def loss(logits, b):
        return wk.sinkhorn(torch.softmax(logits, 1), b, cost, 0.05, 10, eps=1e-8, backend=backend.name).value.mean()

    x = backend.to(torch.randn(B, n, dtype=b.dtype, generator=torch.Generator().manual_seed(0))).requires_grad_()
    compiled = torch.compile(loss, fullgraph=True, backend=compile_backend)
    l1 = compiled(x, b)
    (g1,) = torch.autograd.grad(l1, x)
    l2 = loss(x, b)
    (g2,) = torch.autograd.grad(l2, x)
    assert torch.allclose(l1, l2, rtol=1e-5) and torch.allclose(g1, g2, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------------------------------------------- Ctrl-C
def test_long_cpu_call_stops_on_ctrl_c():
    """Ctrl-C (SIGINT) during a minutes-long CPU Sinkhorn call raises KeyboardInterrupt within seconds (the kernel
    polls Python's signal handlers between iterations of the shared-cost path and between row blocks of the per-row
    paths: a block is at least one row per thread, so a single row of very many iterations is seen only after it;
    here a row takes well under a second), instead of after the call: shared (BLAS) and per-row cost, scaling and
    log domain, one after the other in one process."""
    B, n = 5000, 64
    calls = {}
    for cost_kind, cost in [("shared_cost_blas", f"torch.rand({n}, {n}, dtype=torch.float64)"),
                            ("per_row_cost", f"torch.rand({B}, {n}, {n}, dtype=torch.float64)")]:
        for domain, log_domain in [("scaling", False), ("log_domain", True)]:
            setup = f"""
                a = torch.full(({B}, {n}), 1.0 / {n}, dtype=torch.float64)
                cost = {cost}
            """
            calls[f"{domain}-{cost_kind}"] = (setup, f"wk.sinkhorn(a, a, cost, 0.1, 8000, log_domain={log_domain})")
    assert_interruptible(calls)
