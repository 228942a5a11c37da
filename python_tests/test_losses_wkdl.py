"""WKD-L (wkd_kernels.losses) against a literal implementation of the published lines, and the schedule helper.

Parity criteria with the published code (float32): loss relative error <= 1e-5, student-logit gradient max abs error
relative to the largest gradient entry <= 1e-4. Runs on CPU; the DDP smoke test uses gloo with 2 processes.
"""
import math
import socket

import pytest
import torch
import torch.nn.functional as F

from conftest import load_cost_matrix, rel_error, triton_device
from wkd_kernels.interrelations import sharpen
from wkd_kernels.losses import WKDLogitLoss, cosine_weight, wkd_logit_loss
from wkd_kernels.reference import published_wkd_logit_loss
from wkd_kernels import _build

F32, F64 = torch.float32, torch.float64
LOSS_TOL, GRAD_TOL = 1e-5, 1e-4


def make_logits(B, C, seed=0, scale=3.0, dtype=F32):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, C, generator=g, dtype=F64) * scale
    t = torch.randn(B, C, generator=g, dtype=F64) * scale * 1.5
    y = torch.randint(0, C, (B,), generator=g)
    return s.to(dtype), t.to(dtype), y


def random_cost(C, seed=1, symmetric=True, negative=False):
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(C, C, generator=g, dtype=F64)
    if symmetric:
        d = (d + d.T) / 2
        d.fill_diagonal_(0)
    if negative:  # entries below 0 are clamped by relu(c) + 1e-8, both here and in the published code
        d = d - 0.2
    return d.float()


def rel_err(x, ref):
    """Relative error of a scalar loss (conftest.rel_error, mode "entry")."""
    return rel_error(x, ref, "entry")


def grad_err(g, ref):
    """Worst gradient error relative to max |ref| (conftest.rel_error)."""
    return rel_error(g, ref)


def compare(s, t, y, cost, temperature, weight, reg=0.05, num_iters=10):
    """(loss rel err, grad err) of ours against the literal float32 reference."""
    s_ref = s.detach().clone().requires_grad_()
    ref = published_wkd_logit_loss(s_ref, t, y, cost, temperature, weight, reg, num_iters)
    (g_ref,) = torch.autograd.grad(ref, s_ref)
    s_ours = s.detach().clone().requires_grad_()
    ours = wkd_logit_loss(s_ours, t, y, cost, temperature, weight, reg, num_iters)
    (g_ours,) = torch.autograd.grad(ours, s_ours)
    assert ours.dtype == F32 and ours.shape == ()
    return rel_err(ours, ref), grad_err(g_ours, g_ref)


# ---------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("B,C,temperature,weight,reg,num_iters,symmetric,negative", [
    (4, 2, 1.0, 1.0, 0.05, 10, True, False),
    (5, 7, 2.0, 0.5, 0.05, 10, True, False),
    (8, 33, 4.0, 2.0, 0.1, 5, False, False),
    (3, 64, 1.0, 1.0, 0.05, 10, False, True),
    (16, 100, 2.0, 5.0, 0.05, 20, True, False),
    (1, 129, 0.5, 1.0, 0.2, 1, True, False),
])
def test_parity_random_cost(B, C, temperature, weight, reg, num_iters, symmetric, negative):
    s, t, y = make_logits(B, C, seed=C)
    cost = random_cost(C, seed=B, symmetric=symmetric, negative=negative)
    le, ge = compare(s, t, y, cost, temperature, weight, reg, num_iters)
    assert le <= LOSS_TOL, le
    assert ge <= GRAD_TOL, ge


@pytest.mark.parametrize("name,kappa,B,temperature", [
    ("imagenet_resnet34_cka_distance.pth", 1.0, 6, 2.0),
    ("imagenet_resnet50_cka_distance.pth", 2.0, 3, 1.0),
    ("cifar100_resnet32x4_cka_distance.pth", 1.0, 16, 4.0),
])
def test_parity_real_cost(name, kappa, B, temperature):
    C = {"imagenet": 1000, "cifar100": 100}[name.split("_")[0]]
    cost = sharpen(load_cost_matrix(name), kappa)
    s, t, y = make_logits(B, C, seed=7)
    le, ge = compare(s, t, y, cost, temperature, weight=1.0)
    assert le <= LOSS_TOL, le
    assert ge <= GRAD_TOL, ge


def test_parity_float64_tight():
    """In float64 ours and the literal reference agree to rounding (same mathematics, no approximation)."""
    s, t, y = make_logits(6, 40, seed=3, dtype=F64)
    cost = random_cost(40, negative=True).double()
    s1 = s.clone().requires_grad_()
    ref = published_wkd_logit_loss(s1, t, y, cost, 2.0, 1.5, dtype=F64)
    (g_ref,) = torch.autograd.grad(ref, s1)
    s2 = s.clone().requires_grad_()
    ours = wkd_logit_loss(s2, t, y, cost, 2.0, 1.5)
    (g,) = torch.autograd.grad(ours, s2)
    assert ours.dtype == F64
    assert rel_err(ours, ref) < 1e-12
    assert grad_err(g, g_ref) < 1e-10


def test_module_equals_functional_and_weight_zero():
    s, t, y = make_logits(5, 20)
    cost = random_cost(20)
    mod = WKDLogitLoss(cost, temperature=2.0, weight=0.7)
    assert torch.equal(mod(s, t, y), wkd_logit_loss(s, t, y, cost, 2.0, 0.7))
    # weight is a plain attribute (the schedule updates it); weight 0 leaves the target term
    mod.weight = 0.0
    y1 = y.view(-1, 1)
    lt = -(F.softmax(t, 1).gather(1, y1) * F.log_softmax(s, 1).gather(1, y1)).mean()
    assert torch.allclose(mod(s, t, y), lt)
    assert "cost" not in mod.state_dict() and mod.cost.shape == (20, 20)
    assert "num_classes=20" in repr(mod)


def test_soft_targets_use_argmax():
    s, t, y = make_logits(4, 10)
    cost = random_cost(10)
    onehot = F.one_hot(y, 10).float() * 0.9 + 0.01
    assert torch.equal(wkd_logit_loss(s, t, onehot, cost, 2.0, 1.0), wkd_logit_loss(s, t, y, cost, 2.0, 1.0))
    assert torch.equal(wkd_logit_loss(s, t, y.int(), cost, 2.0, 1.0), wkd_logit_loss(s, t, y, cost, 2.0, 1.0))


def test_teacher_gets_no_gradient_and_envelope_runs():
    s, t, y = make_logits(4, 12)
    s.requires_grad_()
    t.requires_grad_()
    cost = random_cost(12)
    loss = wkd_logit_loss(s, t, y, cost, 2.0, 1.0, grad="envelope")
    loss.backward()
    assert t.grad is None and torch.isfinite(s.grad).all()
    # the envelope gradient approximates the exact one
    s2 = s.detach().clone().requires_grad_()
    wkd_logit_loss(s2, t.detach(), y, cost, 2.0, 1.0).backward()
    assert torch.allclose(s.grad, s2.grad, atol=0.5 * s2.grad.abs().max().item())


def test_log_domain_matches():
    s, t, y = make_logits(4, 30)
    cost = random_cost(30)
    a = wkd_logit_loss(s, t, y, cost, 2.0, 1.0)
    b = wkd_logit_loss(s, t, y, cost, 2.0, 1.0, log_domain=True)
    assert rel_err(b, a) < 1e-5


# ---------------------------------------------------------------------------------- dtypes, autocast, compile
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_logits(dtype):
    s, t, y = make_logits(6, 50, dtype=dtype)
    cost = random_cost(50)
    sh = s.clone().requires_grad_()
    loss = wkd_logit_loss(sh, t, y, cost, 2.0, 1.0)
    loss.backward()
    assert loss.dtype == F32 and sh.grad.dtype == dtype
    # computed in float32 on the upcast logits: identical to passing float32 logits
    s32 = s.float().requires_grad_()
    ref = wkd_logit_loss(s32, t.float(), y, cost, 2.0, 1.0)
    ref.backward()
    assert torch.equal(loss, ref)
    assert torch.equal(sh.grad, s32.grad.to(dtype))


def test_autocast_cpu_bf16():
    torch.manual_seed(0)
    C = 30
    student, teacher = torch.nn.Linear(16, C), torch.nn.Linear(16, C)
    x, y = torch.randn(8, 16), torch.randint(0, C, (8,))
    crit = WKDLogitLoss(random_cost(C), temperature=2.0, weight=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = student(x)
        with torch.no_grad():
            t = teacher(x)
        loss = crit(s, t, y) + F.cross_entropy(s, y)
    assert s.dtype == torch.bfloat16 and loss.dtype == F32
    loss.backward()
    assert torch.isfinite(student.weight.grad).all()
    assert torch.equal(crit(s.detach(), t, y), wkd_logit_loss(s.detach().float(), t.float(), y, crit.cost, 2.0, 1.0))


def test_torch_compile_fullgraph(backend="inductor"):
    torch._dynamo.reset()
    s, t, y = make_logits(6, 24)
    crit = WKDLogitLoss(random_cost(24), temperature=2.0, weight=1.0)

    def step(s, t, y):
        return crit(s, t, y)

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    s1 = s.clone().requires_grad_()
    out = compiled(s1, t, y)
    out.backward()
    s2 = s.clone().requires_grad_()
    ref = step(s2, t, y)
    ref.backward()
    assert rel_err(out, ref) < 1e-6
    assert grad_err(s1.grad, s2.grad) < 1e-5


def test_compile_scheduled_weight_does_not_recompile_every_epoch():
    """A weight changed every epoch (cosine schedule) costs one extra compile (dynamo makes it a symbolic float)."""
    torch._dynamo.reset()
    s, t, y = make_logits(4, 10)
    crit = WKDLogitLoss(random_cost(10), temperature=2.0, weight=1.0)
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    f = torch.compile(lambda s, t, y: crit(s, t, y), backend=counting_backend, fullgraph=True)
    for epoch in range(10):
        crit.weight = cosine_weight(epoch, 1.0, 2, 10)
        assert torch.allclose(f(s, t, y), crit(s, t, y))
    assert len(compiles) <= 2
    with pytest.raises(ValueError, match="weight"):
        crit.weight = -0.5


# ---------------------------------------------------------------------------------- DDP smoke test
def _ddp_worker(rank, world, port, result_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        C = 20
        model = torch.nn.Linear(8, C)
        teacher = torch.nn.Linear(8, C)
        ddp = DDP(model)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(8, 8, generator=g), torch.randint(0, C, (8,), generator=g)
        crit = WKDLogitLoss(random_cost(C), temperature=2.0, weight=1.0)
        xs, ys = x[rank::world], y[rank::world]
        with torch.no_grad():
            t = teacher(xs)
        loss = crit(ddp(xs), t, ys)
        loss.backward()
        if rank == 0:
            torch.save(model.weight.grad.clone(), result_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.e2e  # two spawned processes each import torch: 10-40 s on 2 cores
def test_ddp_gloo_two_processes(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "grad.pt"
    # spawn, not fork: forking a process whose torch thread pools (or torch.compile workers) are running can
    # deadlock the children
    mp.spawn(_ddp_worker, args=(2, port, str(out)), nprocs=2, join=True)
    got = torch.load(out)
    # single process: the mean of the two ranks' losses over the same split has the all-reduced gradient
    torch.manual_seed(0)
    C = 20
    model, teacher = torch.nn.Linear(8, C), torch.nn.Linear(8, C)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 8, generator=g), torch.randint(0, C, (8,), generator=g)
    crit = WKDLogitLoss(random_cost(C), temperature=2.0, weight=1.0)
    with torch.no_grad():
        t0, t1 = teacher(x[0::2]), teacher(x[1::2])
    loss = 0.5 * (crit(model(x[0::2]), t0, y[0::2]) + crit(model(x[1::2]), t1, y[1::2]))
    loss.backward()
    assert torch.allclose(got, model.weight.grad, atol=1e-6)


# ---------------------------------------------------------------------------------- bad input
def _bad_cases():
    s, t, y = make_logits(4, 10)
    cost = random_cost(10)
    nan_s = s.clone()
    nan_s[1, 2] = float("nan")
    inf_t = t.clone()
    inf_t[0, 0] = float("inf")
    bad_cost = cost.clone()
    bad_cost[3, 4] = float("nan")
    f = wkd_logit_loss
    return [
        (lambda: f(s[0], t, y, cost, 2.0, 1.0), "student_logits"),
        (lambda: f(s, t[:3], y, cost, 2.0, 1.0), "teacher_logits"),
        (lambda: f(s.long(), t, y, cost, 2.0, 1.0), "student_logits"),
        (lambda: f(s, t, y[:3], cost, 2.0, 1.0), "target"),
        (lambda: f(s, t, y.float(), cost, 2.0, 1.0), "target"),
        (lambda: f(s, t, y.view(2, 2), cost, 2.0, 1.0), "target"),
        (lambda: f(s, t, torch.tensor([0, 1, 10, 2]), cost, 2.0, 1.0), "target"),
        (lambda: f(s, t, torch.tensor([0, -1, 3, 2]), cost, 2.0, 1.0), "target"),
        (lambda: f(s, t, y, cost[:9, :9], 2.0, 1.0), "cost"),
        (lambda: f(s, t, y, cost[:, :9], 2.0, 1.0), "cost"),
        (lambda: f(s, t, y, cost[None], 2.0, 1.0), "cost"),
        (lambda: f(s, t, y, bad_cost, 2.0, 1.0), "cost"),
        (lambda: f(s, t, y, cost.numpy(), 2.0, 1.0), "cost"),
        (lambda: f(nan_s, t, y, cost, 2.0, 1.0), "student_logits"),
        (lambda: f(s, inf_t, y, cost, 2.0, 1.0), "teacher_logits"),
        (lambda: f(s, t, y, cost, 0.0, 1.0), "temperature"),
        (lambda: f(s, t, y, cost, 2.0, -1.0), "weight"),
        (lambda: f(s, t, y, cost, 2.0, float("nan")), "weight"),
        (lambda: f(s, t, y, cost, 2.0, 1.0, reg=0.0), "reg"),
        (lambda: f(s, t, y, cost, 2.0, 1.0, num_iters=0), "num_iters"),
        (lambda: f(s, t, y, cost, 2.0, 1.0, grad="auto"), "grad"),
        (lambda: f(s[:, :1], t[:, :1], torch.zeros(4, dtype=torch.long), cost[:1, :1], 2.0, 1.0), "2 classes"),
        (lambda: WKDLogitLoss(cost[:, :9], 2.0, 1.0), "cost"),
        (lambda: WKDLogitLoss(bad_cost, 2.0, 1.0), "cost"),
        (lambda: WKDLogitLoss(cost, -2.0, 1.0), "temperature"),
        (lambda: WKDLogitLoss(cost[:8, :8], 2.0, 1.0)(s, t, y), "cost"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input(case):
    call, match = _bad_cases()[case]
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# ---------------------------------------------------------------------------------- cosine schedule
def test_cosine_weight():
    w0, E0, E = 2.5, 30, 240
    for e in (0, 10, 30):
        assert cosine_weight(e, w0, E0, E) == w0
    for e in (31, 100, 135, 200, 240):
        ref = 0.5 * w0 * (1 + math.cos((e - E0) / (E - E0) * math.pi))  # the published line
        assert abs(cosine_weight(e, w0, E0, E) - ref) < 1e-15
    assert abs(cosine_weight(135, w0, E0, E) - w0 / 2) < 1e-12
    assert abs(cosine_weight(E, w0, E0, E)) < 1e-15
    for args, match in [((5, 1.0, 10, 10), "total_epochs"), ((300, 1.0, 10, 240), "epoch"),
                        ((5, float("inf"), 1, 10), "base_weight"), ((5, 1.0, -1, 10), "decay_start_epoch")]:
        with pytest.raises(ValueError, match=match):
            cosine_weight(*args)


def test_backend_and_precision_arguments():
    """The loss passes backend= / precision= to Sinkhorn (function and module, argument and setting): backend="cuda"
    on CPU tensors is an error, a bad precision names the argument, every valid precision is accepted and ignored
    by the CPU kernel, and backend="triton" (CPU tensors under the interpreter, or CUDA) gives the CPU loss."""
    if not _build.HAS_C_EXT:
        pytest.skip("compares with the C++ CPU kernels: installed without the compiled extension")
    g = torch.Generator().manual_seed(5)
    B, C = 3, 6
    s = torch.randn(B, C, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(B, C, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 5])
    cost = torch.rand(C, C, generator=g, dtype=torch.float64)
    with pytest.raises(ValueError, match="backend='cuda'"):
        wkd_logit_loss(s, t, y, cost, 2.0, 1.0, backend="cuda")
    with pytest.raises(ValueError, match="`precision` must be one of"):
        wkd_logit_loss(s, t, y, cost, 2.0, 1.0, precision="half")
    with pytest.raises(ValueError, match="`precision` must be one of"):
        WKDLogitLoss(cost, 2.0, 1.0, precision="TF32")
    want = wkd_logit_loss(s, t, y, cost, 2.0, 1.0)
    (gw,) = torch.autograd.grad(want, s)
    for p in ("ieee", "tf32x3", "tf32"):
        assert torch.equal(wkd_logit_loss(s, t, y, cost, 2.0, 1.0, backend="cpu", precision=p), want)
        assert torch.equal(WKDLogitLoss(cost, 2.0, 1.0, precision=p, log_domain=False)(s, t, y), want)
    import wkd_kernels as wk

    with wk.settings.override(backend="cuda"):
        with pytest.raises(ValueError, match="backend='cuda'"):
            wkd_logit_loss(s, t, y, cost, 2.0, 1.0)
    dev = triton_device()
    sd = s.detach().to(dev).requires_grad_()
    got = wkd_logit_loss(sd, t.to(dev), y.to(dev), cost.to(dev), 2.0, 1.0, backend="triton")
    (gg,) = torch.autograd.grad(got, sd)
    assert rel_err(got, want) <= 1e-10 and grad_err(gg, gw) <= 1e-9
    with wk.settings.override(backend="triton"):
        module = WKDLogitLoss(cost.to(dev), 2.0, 1.0, log_domain=False)
        assert rel_err(module(sd, t.to(dev), y.to(dev)), want) <= 1e-10


# ------------------------------------------------------------------------------------------- scalar arguments
def test_numpy_and_tensor_scalars_accepted():
    """NumPy and 0-d tensor scalars give the loss of Python numbers; a bad log_domain names the argument."""
    import numpy as np

    cost = torch.rand(4, 4, generator=torch.Generator().manual_seed(0))
    s, t, y = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 1, 2])
    ref = wkd_logit_loss(s, t, y, cost, 2.0, 1.0)
    got = wkd_logit_loss(s, t, y, cost, np.float32(2.0), torch.tensor(1.0), num_iters=np.int64(10))
    assert torch.equal(got, ref)
    with pytest.raises(TypeError, match="`log_domain`"):
        WKDLogitLoss(cost, 2.0, 1.0, log_domain="no")
