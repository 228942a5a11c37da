"""Transformer feature layouts (wkd_kernels/ops/feature_layout.py): tokens [N, P + H*W, D] and channels-last
[N, H, W, D] give exactly the WKD-F / Gaussian-W2 values of the [N, D, H, W] map reshaped by hand."""
import pytest
import torch

from wkd_kernels import gaussian_wasserstein
from wkd_kernels.losses import WKDFeatureLoss, wkd_feature_loss
from wkd_kernels.ops.feature_layout import as_nchw


def _tokens(n=2, prefix=1, h=4, w=4, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, prefix + h * w, d, generator=g, dtype=torch.float64)
    return x, x[:, prefix:].reshape(n, h, w, d).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_token_and_channels_last_layouts_equal_the_map_reshaped_by_hand(covariance):
    xs, ms = _tokens(seed=1)
    xt, mt = _tokens(seed=2)
    want = wkd_feature_loss(ms, mt, covariance, grid=2)
    got = wkd_feature_loss(xs, xt, covariance, grid=2, student_layout="nlc", teacher_layout="nlc",
                           student_prefix_tokens=1, teacher_prefix_tokens=1)
    torch.testing.assert_close(got.loss, want.loss)
    got = wkd_feature_loss(xs, mt, covariance, grid=2, student_layout="auto", teacher_layout="auto",
                           student_prefix_tokens=1)
    torch.testing.assert_close(got.loss, want.loss)
    got = wkd_feature_loss(ms.permute(0, 2, 3, 1), xt, covariance, grid=2, student_layout="nhwc",
                           teacher_layout="nlc", teacher_prefix_tokens=1)
    torch.testing.assert_close(got.loss, want.loss)
    torch.testing.assert_close(gaussian_wasserstein(xs, xt, covariance, grid=2, layout="nlc", num_prefix_tokens=1),
                               gaussian_wasserstein(ms, mt, covariance, grid=2))
    torch.testing.assert_close(
        gaussian_wasserstein(ms.permute(0, 2, 3, 1), mt.permute(0, 2, 3, 1), covariance, layout="nhwc"),
        gaussian_wasserstein(ms, mt, covariance))


def test_token_gradient_equals_the_map_gradient():
    xs, _ = _tokens(seed=3)
    _, mt = _tokens(seed=4)
    xs.requires_grad_(True)
    ms = xs[:, 1:].reshape(2, 4, 4, 6).permute(0, 3, 1, 2)
    g_map, = torch.autograd.grad(wkd_feature_loss(ms, mt, grid=2).loss, xs)
    loss_tok = wkd_feature_loss(xs, mt, grid=2, student_layout="nlc", student_prefix_tokens=1).loss
    g_tok, = torch.autograd.grad(loss_tok, xs)
    torch.testing.assert_close(g_tok, g_map)
    assert torch.equal(g_tok[:, 0], torch.zeros_like(g_tok[:, 0]))  # the class token takes no part


def test_non_square_tokens_need_a_token_grid():
    x = torch.randn(2, 1 + 2 * 3, 4)
    m = as_nchw(x, "nlc", 1, (2, 3))
    assert m.shape == (2, 4, 2, 3)
    torch.testing.assert_close(m[:, :, 1, 2], x[:, 1 + 5])
    loss = WKDFeatureLoss(4, 4, projector=None, teacher_layout="nlc", teacher_prefix_tokens=1, teacher_size=(2, 3))
    loss(torch.randn(2, 4, 2, 3), x)
    with pytest.raises(ValueError, match="6 patch tokens, not a square"):
        as_nchw(x, "nlc", 1)
    with pytest.raises(ValueError, match="6 patch tokens but its token grid is 3 x 3"):
        as_nchw(x, "nlc", 1, (3, 3))


def test_bad_layouts_are_clear_errors():
    tokens, m = _tokens()
    loss = WKDFeatureLoss(6, 6, projector=None, teacher_layout="nlc", teacher_prefix_tokens=1)
    with pytest.raises(ValueError, match="`teacher_features` with layout 'nlc' must be 3-D"):
        loss(m, tokens[:, 0])
    with pytest.raises(ValueError, match="`student_features` must be 4-D"):  # the default layout is NCHW
        loss(tokens, tokens)
    with pytest.raises(ValueError, match="spatial sizes differ.*`teacher_features` is 5 x 5"):
        loss(m, torch.randn(2, 1 + 25, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="`student_layout` must be"):
        WKDFeatureLoss(6, 6, student_layout="nlhw")
    with pytest.raises(ValueError, match="`teacher_prefix_tokens` must be an integer"):
        WKDFeatureLoss(6, 6, teacher_prefix_tokens=-1)
    with pytest.raises(ValueError, match="prefix tokens / a token grid apply to token sequences"):
        wkd_feature_loss(m, m, student_prefix_tokens=1)
    with pytest.raises(ValueError, match="layout 'nhwc' must be 4-D"):
        gaussian_wasserstein(tokens, tokens, layout="nhwc")
    with pytest.raises(ValueError, match="17 tokens, not more than its 17 prefix tokens"):
        gaussian_wasserstein(tokens, tokens, layout="auto", num_prefix_tokens=17)
