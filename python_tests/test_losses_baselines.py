"""Baselines KD, DKD, NKD, FitNet against literal float64 formulas (the published code, line by line)."""
import pytest
import torch
import torch.nn.functional as F

from wkd_kernels.losses import (DKDLoss, FitNetLoss, KDLoss, NKDLoss, dkd_loss, fitnet_loss, kd_loss, make_projector,
                                nkd_loss)

F64 = torch.float64


def make_logits(B, C, seed=0, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, C, generator=g, dtype=F64) * scale
    t = torch.randn(B, C, generator=g, dtype=F64) * scale * 1.5
    y = torch.randint(0, C, (B,), generator=g)
    return s.to(dtype), t.to(dtype), y


# ------------------------------------------------------------------ literal float64 references
def kd_literal(s, t, T):
    """mdistiller kd_loss."""
    s, t = s.double(), t.double()
    log_pred_student = F.log_softmax(s / T, dim=1)
    pred_teacher = F.softmax(t / T, dim=1)
    return F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean() * T ** 2


def dkd_literal(s, t, target, alpha, beta, T):
    """mdistiller dkd_loss (gt/other masks, cat_mask, log of softmax, -1000 mask)."""
    s, t = s.double(), t.double()
    gt_mask = torch.zeros_like(s).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(s).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(x):
        t1 = (x * gt_mask).sum(dim=1, keepdims=True)
        t2 = (x * other_mask).sum(1, keepdims=True)
        return torch.cat([t1, t2], dim=1)

    pred_student = cat_mask(F.softmax(s / T, dim=1))
    pred_teacher = cat_mask(F.softmax(t / T, dim=1))
    tckd = F.kl_div(torch.log(pred_student), pred_teacher, reduction="sum") * T ** 2 / target.shape[0]
    pt2 = F.softmax(t / T - 1000.0 * gt_mask, dim=1)
    ls2 = F.log_softmax(s / T - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(ls2, pt2, reduction="sum") * T ** 2 / target.shape[0]
    return alpha * tckd + beta * nckd


def nkd_literal(s, t, gt_label, temp, gamma):
    """The NKD authors' NKDLoss.forward."""
    logit_s, logit_t = s.double(), t.double()
    label = gt_label.view(len(gt_label), 1)
    N, c = logit_s.shape
    s_i = F.log_softmax(logit_s, dim=1)
    t_i = F.softmax(logit_t, dim=1)
    s_t = torch.gather(s_i, 1, label)
    t_t = torch.gather(t_i, 1, label).detach()
    loss_t = -(t_t * s_t).mean()
    mask = torch.ones_like(logit_s).scatter_(1, label, 0).bool()
    logit_s = logit_s[mask].reshape(N, -1)
    logit_t = logit_t[mask].reshape(N, -1)
    S_i = F.log_softmax(logit_s / temp, dim=1)
    T_i = F.softmax(logit_t / temp, dim=1)
    loss_non = (T_i * S_i).sum(dim=1).mean()
    loss_non = -gamma * (temp ** 2) * loss_non
    return loss_t + loss_non


def check_close(fn, ref_fn, s, tol_loss, tol_grad):
    s1 = s.clone().requires_grad_()
    out = fn(s1)
    (g,) = torch.autograd.grad(out, s1)
    s2 = s.double().requires_grad_()
    ref = ref_fn(s2)
    (g_ref,) = torch.autograd.grad(ref, s2)
    assert abs(float(out.detach()) - float(ref.detach())) <= tol_loss * max(1.0, abs(float(ref.detach())))
    assert (g.double() - g_ref).abs().max() <= tol_grad * max(1e-30, g_ref.abs().max().item())
    return out


SHAPES = [(1, 2), (5, 7), (16, 100), (4, 1000)]


@pytest.mark.parametrize("B,C", SHAPES)
@pytest.mark.parametrize("dtype,tl,tg", [(F64, 1e-12, 1e-10), (torch.float32, 2e-6, 2e-5)])
def test_kd(B, C, dtype, tl, tg):
    s, t, _ = make_logits(B, C, dtype=dtype)
    for T in (1.0, 4.0):
        out = check_close(lambda x, T=T: kd_loss(x, t, T), lambda x, T=T: kd_literal(x, t, T), s, tl, tg)
        assert out.dtype == dtype
    assert torch.equal(KDLoss(4.0)(s, t), kd_loss(s, t, 4.0))


@pytest.mark.parametrize("B,C", SHAPES)
@pytest.mark.parametrize("dtype,tl,tg", [(F64, 1e-12, 1e-10), (torch.float32, 2e-6, 2e-5)])
def test_dkd(B, C, dtype, tl, tg):
    s, t, y = make_logits(B, C, seed=C, dtype=dtype)
    for alpha, beta, T in ((1.0, 8.0, 4.0), (1.0, 0.5, 1.0), (0.3, 2.0, 2.0)):
        c = (alpha, beta, T)
        check_close(lambda x, c=c: dkd_loss(x, t, y, *c), lambda x, c=c: dkd_literal(x, t, y, *c),
                    s, tl, tg)
    assert torch.equal(DKDLoss(1.0, 8.0, 4.0)(s, t, y), dkd_loss(s, t, y, 1.0, 8.0, 4.0))


@pytest.mark.parametrize("B,C", SHAPES)
@pytest.mark.parametrize("dtype,tl,tg", [(F64, 1e-12, 1e-10), (torch.float32, 2e-6, 2e-5)])
def test_nkd(B, C, dtype, tl, tg):
    s, t, y = make_logits(B, C, seed=C + 1, dtype=dtype)
    for T, gamma in ((1.0, 1.5), (2.0, 0.5)):
        check_close(lambda x, c=(T, gamma): nkd_loss(x, t, y, *c), lambda x, c=(T, gamma): nkd_literal(x, t, y, *c), s,
                    tl, tg)
    assert torch.equal(NKDLoss(1.0, 1.5)(s, t, y), nkd_loss(s, t, y, 1.0, 1.5))


def test_dkd_extreme_logits_stay_finite():
    """Large logit gaps: log(softmax) in the published form gives -inf/nan gradients; ours stays finite."""
    s, t, y = make_logits(4, 10, scale=200.0)
    s.requires_grad_()
    out = dkd_loss(s, t, y, 1.0, 8.0, 1.0)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_logits(dtype):
    s, t, y = make_logits(6, 20, dtype=dtype)
    for fn in (lambda a: kd_loss(a, t), lambda a: dkd_loss(a, t, y), lambda a: nkd_loss(a, t, y)):
        a = s.clone().requires_grad_()
        out = fn(a)
        out.backward()
        assert out.dtype == torch.float32 and a.grad.dtype == dtype and torch.isfinite(a.grad.float()).all()


def test_soft_targets_use_argmax():
    s, t, y = make_logits(5, 9)
    oh = F.one_hot(y, 9).float()
    assert torch.equal(dkd_loss(s, t, oh), dkd_loss(s, t, y))
    assert torch.equal(nkd_loss(s, t, oh), nkd_loss(s, t, y))


def test_compile_fullgraph_baselines():
    torch._dynamo.reset()
    s, t, y = make_logits(6, 12)

    def step(s, t, y):
        return kd_loss(s, t, 4.0) + dkd_loss(s, t, y) + nkd_loss(s, t, y)

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(s, t, y)
    assert torch.allclose(got, step(s, t, y), rtol=1e-6)


# ------------------------------------------------------------------ FitNet and projectors
def test_fitnet_literal():
    g = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    ref = ((fs.double() - ft.double()) ** 2).sum() / fs.numel()
    assert abs(float(fitnet_loss(fs, ft)) - float(ref)) < 1e-6
    assert fitnet_loss(fs.double(), ft.double()).dtype == F64
    assert abs(float(fitnet_loss(fs.double(), ft.double())) - float(ref)) < 1e-13


@pytest.mark.parametrize("projector", ["conv1x1", "bottleneck", None])
def test_fitnet_module(projector):
    torch.manual_seed(0)
    cs = 4 if projector is None else 3
    crit = FitNetLoss(cs, 4, projector=projector, hidden_channels=8).double()
    fs = torch.randn(2, cs, 6, 6, dtype=F64, requires_grad=True)
    ft = torch.randn(2, 4, 6, 6, dtype=F64)
    out = crit(fs, ft)
    proj = crit.projector(fs)
    assert proj.shape == ft.shape
    ref = ((proj - ft) ** 2).mean()
    assert abs(float(out.detach()) - float(ref.detach())) < 1e-13
    out.backward()
    assert torch.isfinite(fs.grad).all()
    if projector is not None:
        assert all(p.grad is not None for p in crit.parameters())


def test_projector_layouts():
    p = make_projector("conv1x1", 3, 5)
    assert [type(m).__name__ for m in p] == ["Conv2d", "BatchNorm2d", "ReLU"] and p[0].kernel_size == (1, 1)
    b = make_projector("bottleneck", 3, 5)
    assert [type(m).__name__ for m in b] == ["Conv2d", "Conv2d", "Conv2d", "BatchNorm2d", "ReLU"]
    assert [m.kernel_size for m in b[:3]] == [(1, 1), (3, 3), (1, 1)] and b[0].out_channels == 256


# ------------------------------------------------------------------ bad input
def _bad():
    s, t, y = make_logits(4, 6)
    nan = s.clone()
    nan[0, 0] = float("nan")
    return [
        (lambda: kd_loss(s, t[:, :5]), "teacher_logits"),
        (lambda: kd_loss(s[0], t[0]), "student_logits"),
        (lambda: kd_loss(s, t, 0.0), "temperature"),
        (lambda: kd_loss(nan, t), "student_logits"),
        (lambda: dkd_loss(s, t, y[:2]), "target"),
        (lambda: dkd_loss(s, t, torch.tensor([0, 1, 2, 6])), "target"),
        (lambda: dkd_loss(s, t, y, alpha=-1.0), "alpha"),
        (lambda: dkd_loss(s, t, y, beta=float("inf")), "beta"),
        (lambda: dkd_loss(s[:, :1], t[:, :1], torch.zeros(4, dtype=torch.long)), "2 classes"),
        (lambda: nkd_loss(s, t, y.float()), "target"),
        (lambda: nkd_loss(s, t, y, gamma=-1.0), "gamma"),
        (lambda: nkd_loss(s, nan, y), "teacher_logits"),
        (lambda: fitnet_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4)), "student_features"),
        (lambda: FitNetLoss(3, 4, projector="mlp"), "projector"),
        (lambda: FitNetLoss(3, 4, projector=None), "projector"),
        (lambda: FitNetLoss(0, 4), "student_channels"),
        (lambda: FitNetLoss(3, 4)(torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)), "student_features"),
        (lambda: FitNetLoss(3, 4)(torch.randn(2, 3, 4, 4), torch.randn(2, 4, 5, 5)), "H and W"),
        (lambda: KDLoss(-1.0), "temperature"),
        (lambda: DKDLoss(beta=-2.0), "beta"),
        (lambda: NKDLoss(temperature=0.0), "temperature"),
    ]


@pytest.mark.parametrize("case", range(len(_bad())))
def test_bad_input(case):
    call, match = _bad()[case]
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# ---------------------------------------------------------------------------------------- logits / temperature overflow

def test_logits_over_temperature_overflow_names_the_users_arguments():
    from wkd_kernels.losses import dkd_loss, kd_loss, nkd_loss, wkd_logit_loss

    g = torch.Generator().manual_seed(0)
    s, t, y = torch.randn(4, 5, generator=g) * 1e30, torch.randn(4, 5, generator=g), torch.tensor([0, 1, 2, 3])
    cost = torch.rand(5, 5, generator=g)
    for f in (lambda: wkd_logit_loss(s, t, y, cost, 1e-30, 1.0), lambda: kd_loss(s, t, 1e-30),
              lambda: nkd_loss(s, t, y, 1e-30), lambda: dkd_loss(s, t, y, temperature=1e-30)):
        with pytest.raises(ValueError, match=r"`student_logits` / `temperature`"):  # was `a` / a NaN loss
            f()
