"""WKD-L / WKD-F as timm training tasks: a few optimiser steps on CNN and CNN <-> transformer pairs (timm's tiny test
models, random weights, nothing downloaded), kd_loss equal to the loss modules computed by hand, compile,
prepare_distributed, the cost sources and the configuration errors."""
import importlib
import sys

import pytest
import torch

from conftest import import_or_skip  # noqa: E402

timm = import_or_skip("timm")
import_or_skip("timm.task.distillation")

from wkd_kernels import cosine_weight, sharpen  # noqa: E402
from wkd_kernels.interrelations import classifier_cosine_distance  # noqa: E402
from wkd_kernels.integrations.timm import WKDFeatureDistillationTask, WKDLogitDistillationTask  # noqa: E402
from wkd_kernels.losses import WKDLogitLoss, wkd_feature_loss  # noqa: E402

C = 10
SIZE = 64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread (several threads on a loaded 2-core machine are many times slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)  # test_resnet: 2 x 2 map at 64; test_vit (patch 16): 4 x 4 tokens + 1 class token


def _cnn(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", pretrained=False, num_classes=C)


def _vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("test_vit", pretrained=False, num_classes=C, img_size=SIZE)


def _swin(seed=0):
    """A two-stage Swin (channels-last NHWC forward_features, 4 x 4 at 64 x 64 input)."""
    from timm.models.swin_transformer import SwinTransformer
    torch.manual_seed(seed)
    return SwinTransformer(img_size=SIZE, patch_size=8, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                           num_classes=C)


def _batch(seed=0, size=SIZE, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, C, (n,), generator=g)


def _train(task, steps=2, size=SIZE):
    params = [p for p in task.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)
    before = [p.detach().clone() for p in params]
    for step in range(steps):
        x, y = _batch(step, size)
        out = task(x, y)
        assert set(out) >= {"loss", "output", "task_loss", "kd_loss"}
        assert out["output"].shape == (4, C) and torch.isfinite(out["loss"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, params, strict=False))
    return out


def _student_map(student, x):
    """The student's forward_features as [N, C, H, W], by hand."""
    return student.forward_features(x)


def _teacher_tokens_as_map(vit, x):
    """A ViT's forward_features [N, 1 + H*W, D] as [N, D, H, W], by hand."""
    tokens = vit.forward_features(x)[:, vit.num_prefix_tokens:]
    n, length, d = tokens.shape
    h = int(round(length ** 0.5))
    return tokens.reshape(n, h, h, d).permute(0, 3, 1, 2)


def test_import_without_timm_is_one_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    monkeypatch.delitem(sys.modules, "wkd_kernels.integrations.timm", raising=False)
    with pytest.raises(ImportError, match="needs timm"):
        importlib.import_module("wkd_kernels.integrations.timm")


def test_logit_task_trains_and_kd_loss_is_wkd_logit_loss():
    student, teacher = _cnn(0), _cnn(1)
    task = WKDLogitDistillationTask(student, teacher, temperature=4.0, wkd_weight=30.0, task_loss_weight=0.5,
                                    distill_loss_weight=2.0, verbose=False)
    x, y = _batch(7)
    out = task(x, y)
    cost = sharpen(classifier_cosine_distance(teacher.get_classifier().weight.detach()), 1.0)
    with torch.no_grad():
        t_logits = teacher(x)
    want = WKDLogitLoss(cost, 4.0, 30.0)(out["output"], t_logits, y)
    torch.testing.assert_close(out["kd_loss"], want)
    torch.testing.assert_close(out["loss"], 0.5 * out["task_loss"] + 2.0 * want)
    _train(task)


def test_feature_task_cnn_pair_kd_loss_is_wkd_feature_loss():
    student, teacher = _cnn(0), _cnn(1)
    task = WKDFeatureDistillationTask(student, teacher, input_size=(3, SIZE, SIZE), wkd_f_weight=0.5,
                                      hidden_channels=16, verbose=False)
    assert len(task.feature_loss.projector) == 5  # equal 2 x 2 maps: the published 1x1 -> 3x3 -> 1x1 bottleneck
    x, y = _batch(3)
    out = task(x, y)
    projected = task.feature_loss.projector(_student_map(student, x))
    with torch.no_grad():
        f_t = teacher.forward_features(x)
    want = 0.5 * wkd_feature_loss(projected, f_t, grid=1).loss
    torch.testing.assert_close(out["kd_loss"], want)
    torch.testing.assert_close(out["loss"], out["task_loss"] + want)
    _train(task)
    state = task.get_task_state()["projection"]
    assert any(k.startswith("projector.") for k in state)


@pytest.mark.parametrize("pair", ["vit_to_cnn", "cnn_to_vit"])
def test_feature_task_on_vit_tokens_without_reshaping(pair):
    """A ViT's tokens (4 x 4 patches + class token) against a CNN's 2 x 2 map: the ConvReg projector maps the
    sizes; kd_loss equals WKD-F on the map reshaped by hand."""
    if pair == "vit_to_cnn":  # ViT teacher, CNN student (the paper's ViT-S -> ResNet-18 direction)
        student, teacher = _cnn(0), _vit(1)
    else:
        student, teacher = _vit(0), _cnn(1)
    task = WKDFeatureDistillationTask(student, teacher, input_size=(3, SIZE, SIZE), verbose=False)
    assert type(task.feature_loss.projector).__name__ == "ConvReg"
    x, y = _batch(5)
    out = task(x, y)
    if pair == "vit_to_cnn":
        s_map = _student_map(student, x)
        with torch.no_grad():
            t_map = _teacher_tokens_as_map(teacher, x)
    else:
        s_map = _teacher_tokens_as_map(student, x)
        with torch.no_grad():
            t_map = teacher.forward_features(x)
    want = wkd_feature_loss(task.feature_loss.projector(s_map), t_map).loss
    torch.testing.assert_close(out["kd_loss"], want)
    _train(task)


def test_feature_task_swin_channels_last_and_wkd_l_plus_wkd_f(tmp_path):
    """Swin teacher (NHWC forward_features) -> CNN student, WKD-L + WKD-F in one task, cost from a file, and the
    cosine schedule of both weights."""
    student, teacher = _cnn(0), _swin(1)
    d = torch.rand(C, C)
    d = (d + d.T) / 2
    d.fill_diagonal_(0)
    torch.save({"distance": d}, tmp_path / "distance.pth")
    task = WKDFeatureDistillationTask(student, teacher, input_size=(3, SIZE, SIZE), wkd_f_weight=0.1, hidden_channels=8,
                                      cost=str(tmp_path / "distance.pth"), kappa=2.0, temperature=2.0,
                                      wkd_weight=5.0, decay_start_epoch=2, total_epochs=10, verbose=False)
    assert task.feature_loss.teacher_layout == "nhwc"
    x, y = _batch(4)
    out = task(x, y)
    x_t = task.teacher.normalize_input(x, task.student_mean, task.student_std)  # timm: teacher's normalisation
    assert not torch.equal(x_t, x)  # (the directly built Swin has timm's default ImageNet mean / std)
    with torch.no_grad():
        t_map = teacher.forward_features(x_t).permute(0, 3, 1, 2)
        t_logits = teacher(x_t)
    want_f = 0.1 * wkd_feature_loss(task.feature_loss.projector(student.forward_features(x)), t_map).loss
    want_l = WKDLogitLoss(sharpen(d, 2.0), 2.0, 5.0)(out["output"], t_logits, y)
    torch.testing.assert_close(out["wkd_f_loss"], want_f)
    torch.testing.assert_close(out["wkd_l_loss"], want_l)
    torch.testing.assert_close(out["kd_loss"], want_f + want_l)
    task.set_epoch(6)
    assert task.wkd_f_weight == pytest.approx(cosine_weight(6, 0.1, 2, 10))
    assert task.wkd_l_loss.weight == pytest.approx(cosine_weight(6, 5.0, 2, 10))
    _train(task)


def test_cost_from_cka_over_a_loader_and_from_a_tensor():
    student, teacher = _cnn(0), _cnn(1)
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(10, 3, 32, 32, generator=g), torch.arange(10)) for _ in range(3)]
    task = WKDLogitDistillationTask(student, teacher, temperature=4.0, wkd_weight=1.0, cost="cka",
                                    cost_loader=loader, cost_samples_per_class=3, verbose=False)
    assert task.wkd_loss.cost.shape == (C, C)
    d = torch.rand(C, C)
    task = WKDLogitDistillationTask(student, teacher, temperature=4.0, wkd_weight=1.0, cost=d, kappa=0,
                                    verbose=False)
    torch.testing.assert_close(task.wkd_loss.cost, torch.relu(d) + 1e-8)


def test_compile_and_prepare_distributed(tmp_path):
    import torch.distributed as dist
    student, teacher = _cnn(0), _vit(1)
    task = WKDFeatureDistillationTask(student, teacher, input_size=(3, SIZE, SIZE), verbose=False)
    x, y = _batch(1)
    eager = task(x, y)["kd_loss"].detach()
    eval_model = task.compile(backend="eager")  # Dynamo capture of student + WKD-F and of the teacher, no codegen
    out = task(x, y)
    torch.testing.assert_close(out["kd_loss"].detach(), eager)
    out["loss"].backward()
    assert eval_model(x).shape == (4, C)
    assert task.get_eval_model() is eval_model
    logit_task = WKDLogitDistillationTask(_cnn(0), _cnn(1), temperature=4.0, wkd_weight=1.0, verbose=False)
    eager = logit_task(x, y)["kd_loss"].detach()
    logit_task.compile(backend="eager")
    torch.testing.assert_close(logit_task(x, y)["kd_loss"].detach(), eager)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for t in (WKDFeatureDistillationTask(_cnn(0), _vit(1), input_size=(3, SIZE, SIZE), verbose=False),
                  WKDLogitDistillationTask(_cnn(0), _cnn(1), temperature=4.0, wkd_weight=1.0, verbose=False)):
            t.prepare_distributed()
            assert isinstance(t.trainable_module, torch.nn.parallel.DistributedDataParallel)
            assert not any(p.requires_grad for p in t.teacher.parameters())
            _train(t, steps=1)
    finally:
        dist.destroy_process_group()


def test_bad_configuration_is_a_clear_error(tmp_path):
    student, teacher = _cnn(0), _cnn(1)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        WKDLogitDistillationTask(student, teacher, temperature=4.0, wkd_weight=1.0, cost=str(tmp_path / "nope.pth"),
                                 verbose=False)
    with pytest.raises(ValueError, match=r"\[7, 7\].*C = 10"):
        WKDLogitDistillationTask(student, teacher, temperature=4.0, wkd_weight=1.0, cost=torch.rand(7, 7),
                                 verbose=False)
    with pytest.raises(ValueError, match="temperature"):
        WKDLogitDistillationTask(student, teacher, wkd_weight=1.0, verbose=False)
    with pytest.raises(ValueError, match="cost_loader"):
        WKDLogitDistillationTask(student, teacher, temperature=4.0, wkd_weight=1.0, cost="cka", verbose=False)
    with pytest.raises(ValueError, match="loss_type"):
        WKDLogitDistillationTask(student, teacher, loss_type="kl", temperature=4.0, wkd_weight=1.0, verbose=False)
    with pytest.raises(ValueError, match="decay_start_epoch"):
        WKDFeatureDistillationTask(student, teacher, input_size=(3, SIZE, SIZE), decay_start_epoch=3, verbose=False)
    # a 2 x 2 CNN map against 4 x 4 ViT tokens with a size-keeping projector
    with pytest.raises(ValueError, match="2 x 2.*4 x 4.*convreg"):
        WKDFeatureDistillationTask(student, _vit(1), input_size=(3, SIZE, SIZE), projector="conv1x1", verbose=False)
    # a batch whose token count is not the task's: the loss names the argument
    task = WKDFeatureDistillationTask(student, _vit(1), input_size=(3, SIZE, SIZE), verbose=False)
    with pytest.raises(ValueError, match="teacher_features"):
        task.trainable_module(_batch(0)[0], torch.randn(4, 1 + 64, 64))
