"""WKD-L / WKD-F as torchdistill losses: built by name from the example YAML, equal to the losses computed by hand."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import import_or_skip  # noqa: E402

import_or_skip("torchdistill")
yaml = pytest.importorskip("yaml")

from torchdistill.common.main_util import import_dependencies  # noqa: E402
from torchdistill.losses.registry import get_high_level_loss, get_mid_level_loss  # noqa: E402

from wkd_kernels import sharpen  # noqa: E402
from wkd_kernels.losses import WKDFeatureLoss, WKDLogitLoss  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "torchdistill" / "wkd_lf_resnet18_from_resnet34.yaml"


class _TagIgnoringLoader(yaml.SafeLoader):
    """Reads torchdistill's YAML without running its !import_call / !join constructors (no dataset is built)."""


_TagIgnoringLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _criterion_config(cost_path):
    config = yaml.load(CONFIG.read_text(), Loader=_TagIgnoringLoader)
    import_dependencies(config["dependencies"])
    criterion = config["train"]["criterion"]
    criterion["kwargs"]["sub_terms"]["wkd_l"]["criterion"]["kwargs"]["cost"] = str(cost_path)
    return criterion


def _distance(C, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(C, C, generator=g)
    d = (a + a.T) / 2
    d.fill_diagonal_(0)
    return d


def test_example_config_builds_the_wkd_losses_and_equals_them_by_hand(tmp_path):
    d = _distance(1000)
    torch.save({"distance": d}, tmp_path / "cost.pth")
    criterion = get_high_level_loss(_criterion_config(tmp_path / "cost.pth"))
    g = torch.Generator().manual_seed(1)
    B = 4
    s, t = torch.randn(B, 1000, generator=g), torch.randn(B, 1000, generator=g)
    fs, ft = torch.randn(B, 512, 7, 7, generator=g), torch.randn(B, 512, 7, 7, generator=g)
    y = torch.randint(0, 1000, (B,), generator=g)
    io = {"student": {".": {"output": s}, "layer4": {"output": fs}},
          "teacher": {".": {"output": t}, "layer4": {"output": ft}}}
    got = criterion(io, {}, y)
    want = (F.cross_entropy(s, y) + WKDLogitLoss(sharpen(d, 1.0), 2.0, 10.0)(s, t, y)
            + WKDFeatureLoss(512, 512, grid=4, projector=None)(fs, ft).loss)
    torch.testing.assert_close(got, want)


def test_mid_level_losses_by_key_on_tokens(tmp_path):
    d = _distance(10)
    torch.save(d, tmp_path / "d.pth")
    wkd_l = get_mid_level_loss({"key": "WKDLogitLoss", "kwargs": {"cost": str(tmp_path / "d.pth"), "num_classes": 10,
                                                                   "temperature": 4.0, "weight": 5.0, "kappa": 0}})
    g = torch.Generator().manual_seed(2)
    s, t, y = torch.randn(3, 10, generator=g), torch.randn(3, 10, generator=g), torch.tensor([0, 4, 9])
    torch.testing.assert_close(wkd_l({".": {"output": s}}, {".": {"output": t}}, y), WKDLogitLoss(d, 4.0, 5.0)(s, t, y))
    # a ViT teacher's tokens (1 class token, 4 x 4 patches) against a CNN student map of the same size
    wkd_f = get_mid_level_loss({"key": "WKDFeatureLoss", "kwargs": {
        "student_channels": 8, "teacher_channels": 8, "student_module_path": "layer4", "teacher_module_path": "norm",
        "teacher_layout": "nlc", "teacher_prefix_tokens": 1, "grid": 2}})
    fs, tokens = torch.randn(3, 8, 4, 4, generator=g), torch.randn(3, 17, 8, generator=g)
    ft = tokens[:, 1:].reshape(3, 4, 4, 8).permute(0, 3, 1, 2)
    got = wkd_f({"layer4": {"output": fs}}, {"norm": {"output": tokens}})
    torch.testing.assert_close(got, WKDFeatureLoss(8, 8, grid=2, projector=None)(fs, ft).loss)
    with pytest.raises(KeyError, match="no 'layer3'"):
        get_mid_level_loss({"key": "WKDFeatureLoss", "kwargs": {
            "student_channels": 8, "teacher_channels": 8, "student_module_path": "layer3",
            "teacher_module_path": "norm"}})({"layer4": {"output": fs}}, {"norm": {"output": ft}})


def test_bad_cost_configuration_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        get_mid_level_loss({"key": "WKDLogitLoss", "kwargs": {"cost": str(tmp_path / "missing.pth"),
                                                               "num_classes": 10, "temperature": 4.0, "weight": 1.0}})
    torch.save(_distance(10), tmp_path / "d.pth")
    with pytest.raises(ValueError, match=r"\[10, 10\].*C = 100"):
        get_mid_level_loss({"key": "WKDLogitLoss", "kwargs": {"cost": str(tmp_path / "d.pth"), "num_classes": 100,
                                                               "temperature": 4.0, "weight": 1.0}})
