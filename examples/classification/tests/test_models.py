"""Tests of the classification model zoo (examples/classification/models).

Run: OMP_NUM_THREADS=1 python -m pytest examples/classification/tests/test_models.py -q
Every model is built and run once at its own input size (N=2); the heavy ones are the 224 x 224 forwards of
resnet101 / swin_tiny / convnext_tiny / vit_small (about 1-2 s each on one core).
"""
from __future__ import annotations

import ast
import gc
import itertools
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wkd_kernels.ops.feature_layout import as_nchw

from examples.classification.models import (CheckpointMismatchError, DistillModel, DistillModelOutput, build_model,
                                            list_models)

SPEC_NAMES = {
    "resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v1", "mobilenet_v2",
    "resnet8x4", "resnet32x4", "wrn_40_2", "shufflenet_v1",
    "swin_tiny", "vit_small", "convnext_tiny", "deit_tiny", "swin_pico",
}
SIZE_224 = {"resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v1", "mobilenet_v2",
            "swin_tiny", "vit_small", "convnext_tiny", "deit_tiny", "swin_pico"}
TOKEN_MODELS = {"vit_small", "deit_tiny"}  # all stages at the same 14 x 14 token grid
# models whose pooled vector is the plain spatial mean of "last" (no norm / projection after the pooling)
MEAN_POOLED = {"resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v1", "mobilenet_v2", "shufflenet_v1",
               "swin_tiny", "swin_pico"} | {n for n in list_models() if n.startswith("resnet")}
NUM_CLASSES = 7


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _tensor_attrs(model: nn.Module) -> set:
    """(module id, attribute name) of every plain (non-parameter, non-buffer) tensor attribute in ``model``."""
    found = set()
    for m in model.modules():
        for key, value in vars(m).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                found.add((id(m), key))
    return found


def test_list_models_covers_the_spec():
    names = list_models()
    assert names == sorted(names)
    assert SPEC_NAMES <= set(names)


# the 224 x 224 forwards that take over a second on one core (they still run by default; -m "not slow" skips them)
SLOW_FORWARDS = {"resnet50", "resnet101", "swin_tiny", "vit_small", "convnext_tiny"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_FORWARDS else n
                                  for n in list_models()])
def test_forward_shapes_and_features(name):
    model = build_model(name, NUM_CLASSES).eval()
    assert isinstance(model, DistillModel)
    assert model.name == name and model.num_classes == NUM_CLASSES
    assert model.input_size == (224 if name in SIZE_224 else 32)
    assert isinstance(model.classifier, nn.Linear) and model.classifier.out_features == NUM_CLASSES
    assert not any(k.startswith("classifier.") for k in model.state_dict())  # not registered twice

    s = model.input_size
    x = torch.randn(2, 3, s, s)
    with torch.no_grad():
        out = model(x)
        plain = model(x, features=False)
    assert isinstance(out, DistillModelOutput)
    assert out.logits.shape == (2, NUM_CLASSES)
    k = model.num_stages
    assert k >= 3
    stage_keys = [f"stage{i}" for i in range(1, k + 1)]
    assert list(out.features) == stage_keys + ["last", "pooled"]
    # ViT / DeiT: the last stage is the token sequence [N, P + 14*14, D] (feature_layouts), the rest maps
    assert set(model.feature_layouts) == ({stage_keys[-1], "last"} if name in TOKEN_MODELS else set())
    maps = {key: as_nchw(t, *model.feature_layouts.get(key, ("nchw", 0))) if key != "pooled" else t
            for key, t in out.features.items()}
    if name in TOKEN_MODELS:
        assert out.features["last"].shape == (2, model.net.num_prefix_tokens + 14 * 14, model.feature_channels["last"])
    assert model.feature_channels == {key: t.shape[1] for key, t in maps.items()}
    assert out.features["last"] is out.features[stage_keys[-1]]
    pooled = out.features["pooled"]
    assert pooled.shape == (2, model.feature_channels["pooled"])

    sizes = [maps[key].shape[-2:] for key in stage_keys]
    for key in stage_keys:
        assert maps[key].ndim == 4 and maps[key].shape[0] == 2
    for a, b in itertools.pairwise(sizes):
        if name in TOKEN_MODELS:
            assert a == b == (14, 14)
        else:
            assert a[0] > b[0] and a[1] > b[1], f"{name}: spatial sizes {sizes} do not decrease"

    torch.testing.assert_close(out.logits, model.classifier(pooled), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.logits, plain.logits, rtol=1e-4, atol=1e-4)  # same network both ways
    assert plain.features == {}
    if name in MEAN_POOLED:
        torch.testing.assert_close(pooled, out.features["last"].mean((2, 3)), rtol=1e-4, atol=1e-4)
    if name.startswith("wrn_"):  # raw block3 output (CRD / mdistiller feats[-1]); the head adds BN-ReLU
        net = model.net
        torch.testing.assert_close(pooled, net.relu(net.bn1(out.features["last"])).mean((2, 3)), rtol=1e-4,
                                   atol=1e-4)
        assert out.features["last"].min() < 0  # not an activated map


# published parameter counts with 100 classes (CRD / mdistiller tables); mobilenet_v1 with 1000 classes
PUBLISHED_PARAMS = {
    "resnet8x4": 1.23e6, "resnet32x4": 7.43e6, "wrn_40_2": 2.26e6, "shufflenet_v1": 0.95e6,
    "wrn_16_2": 0.70e6, "wrn_40_1": 0.57e6, "resnet20": 0.28e6, "resnet32": 0.47e6, "resnet56": 0.86e6,
    "resnet110": 1.74e6,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_cifar_parameter_counts(name):
    n = sum(p.numel() for p in build_model(name, 100).parameters())
    assert abs(n - PUBLISHED_PARAMS[name]) <= 0.02 * PUBLISHED_PARAMS[name], f"{name}: {n} parameters"


def test_mobilenet_v1_parameter_count():
    n = sum(p.numel() for p in build_model("mobilenet_v1", 1000).parameters())
    assert abs(n - 4.23e6) <= 0.02 * 4.23e6, n


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown model 'resnet9000'") as err:
        build_model("resnet9000", 10)
    for name in ("resnet8x4", "wrn_40_2", "swin_pico"):
        assert name in str(err.value)


def test_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet8", 0)


def test_timm_is_imported_lazily():
    """No module of the zoo imports timm at module level (only inside the builders of timm models)."""
    models_dir = Path(__file__).resolve().parents[1] / "models"
    for path in sorted(models_dir.glob("*.py")):
        for node in ast.parse(path.read_text()).body:  # top-level statements only
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n == "timm" or n.startswith("timm.") for n in names), f"{path.name} imports timm eagerly"


def test_missing_timm_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    for name in ("deit_tiny", "swin_pico"):
        with pytest.raises(ImportError, match=f"model '{name}' is a timm model"):
            build_model(name, 10)
    assert build_model("resnet8", 10).num_classes == 10  # the other families do not need timm
    assert build_model("mobilenet_v2", 10).num_classes == 10


# ----------------------------------------------------------------------------------------------------- checkpoints
def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("wrap", ["raw", "model", "state_dict", "net", "module_prefix", "distill_model",
                                  "with_extras"])
def test_checkpoint_round_trip(tmp_path, wrap):
    src = build_model("resnet8", 10)
    with torch.no_grad():  # make the BN buffers differ from a fresh model too
        for buf in src.net.buffers():
            if buf.is_floating_point():
                buf.uniform_(0.5, 1.5)
    sd = src.net.state_dict()
    payload = {
        "raw": sd,
        "model": {"model": sd},
        "state_dict": {"state_dict": sd},
        "net": {"net": sd},
        "module_prefix": {"model": {f"module.{k}": v for k, v in sd.items()}},
        "distill_model": {"model": src.state_dict()},  # keys "net.*" of the wrapper itself
        "with_extras": {"model": sd, "epoch": 3, "best_acc": 71.5, "optimizer": {"state": {}, "param_groups": []}},
    }[wrap]
    path = tmp_path / "ckpt.pth"
    torch.save(payload, path)
    dst = build_model("resnet8", 10, checkpoint=str(path))
    assert _same_weights(src.net, dst.net)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(src.eval()(x).logits, dst.eval()(x).logits)


def test_checkpoint_with_numpy_rng_state_loads_weights_only_and_safetensors(tmp_path):
    """A trainer-style file with numpy RNG state loads with weights_only=True (the allow-listed NumPy types, no
    fallback, no warning); .safetensors files load too."""
    import warnings
    np = pytest.importorskip("numpy")
    src = build_model("resnet8", 10)
    path = tmp_path / "last.pth"
    torch.save({"model": src.state_dict(), "rng": {"numpy": np.random.get_state()}}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dst = build_model("resnet8", 10, checkpoint=str(path))
    assert _same_weights(src.net, dst.net)

    st = pytest.importorskip("safetensors.torch")
    path = tmp_path / "weights.safetensors"
    st.save_file({k: v.contiguous() for k, v in src.net.state_dict().items()}, str(path))
    assert _same_weights(src.net, build_model("resnet8", 10, checkpoint=str(path)).net)


def test_checkpoint_mismatch_names_path_and_keys(tmp_path):
    path = tmp_path / "resnet8.pth"
    torch.save({"model": build_model("resnet8", 10).net.state_dict()}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        build_model("resnet14", 10, checkpoint=str(path))  # one more block per stage
    msg = str(err.value)
    assert str(path) in msg and "missing keys" in msg and "layer1.1.conv1.weight" in msg

    sd = build_model("resnet8", 10).net.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(CheckpointMismatchError, match="unexpected keys.*extra.weight") as err:
        build_model("resnet8", 10, checkpoint=str(path))
    assert str(path) in str(err.value)

    with pytest.raises(CheckpointMismatchError, match=r"fc\.weight: checkpoint \(100, 64\) vs model \(10, 64\)"):
        torch.save(build_model("resnet8", 100).net.state_dict(), path)
        build_model("resnet8", 10, checkpoint=str(path))

    torch.save({"epoch": 1}, path)
    with pytest.raises(CheckpointMismatchError, match="neither a state dict"):
        build_model("resnet8", 10, checkpoint=str(path))

    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_model("resnet8", 10, checkpoint=str(tmp_path / "nowhere.pth"))


# ----------------------------------------------------------------------------------- memory, gradients, runtimes
@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "deit_tiny"])
def test_no_tensors_left_on_the_module(name):
    model = build_model(name, 10).train()
    before = _tensor_attrs(model)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    s = model.input_size
    out = model(torch.randn(2, 3, s, s))
    (out.logits.sum() + sum(out.features[k].float().mean() for k in out.features)).backward()
    assert _tensor_attrs(model) == before
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    ref = weakref.ref(out.features["stage1"])
    del out
    gc.collect()
    assert ref() is None, "a feature map outlived the output that returned it"


def test_backward_through_features_reaches_student_parameters():
    model = build_model("resnet8x4", 10).train()
    out = model(torch.randn(2, 3, 32, 32))
    loss = sum(out.features[k].square().mean() for k in ("stage1", "stage2", "last", "pooled"))
    loss.backward()
    for p in (model.net.conv1.weight, model.net.layer1[0].conv1.weight, model.net.layer3[0].conv2.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert model.classifier.weight.grad is None  # only features in the loss


def test_channels_last_and_autocast():
    model = build_model("resnet8", 10).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.logits.dtype == torch.bfloat16 and out.logits.shape == (2, 10)
    assert {k: v.shape for k, v in out.features.items()} == {k: v.shape for k, v in ref.features.items()}
    torch.testing.assert_close(out.logits.float(), ref.logits, rtol=0.1, atol=0.1)


def test_torch_compile_fullgraph():
    """The feature forward traces as one graph (no hooks to break it); the eager backend keeps this test cheap."""
    model = build_model("resnet8", 10).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, ref = compiled(x), model(x)
    torch.testing.assert_close(out.logits, ref.logits)
    for k in ref.features:
        torch.testing.assert_close(out.features[k], ref.features[k])


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_ddp_single_process(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = DDP(build_model("resnet8", 10).train())
        for _ in range(2):  # a second step checks that the reducer finished the first one
            out = model(torch.randn(2, 3, 32, 32))
            loss = F.cross_entropy(out.logits, torch.tensor([1, 2])) + out.features["last"].square().mean()
            loss.backward()
        assert model.module.net.conv1.weight.grad is not None
        assert model.module.feature_channels["last"] == 64
    finally:
        dist.destroy_process_group()
