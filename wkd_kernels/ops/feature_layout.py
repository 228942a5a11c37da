"""Feature-map layouts: convolutional [N, C, H, W] maps, transformer token sequences [N, L, D] and channels-last
[N, H, W, D] maps (Swin), all brought to the [N, C, H, W] view that the WKD-F statistics read.

WKD-F models each sample (each grid cell) as a Gaussian over *positions* with one dimension per *channel*. For a
transformer the positions are the patch tokens and the channels the embedding dimension D, so

    "nchw": [N, C, H, W]          -> as is
    "nhwc": [N, H, W, D]          -> [N, D, H, W]              (a permuted view, no copy)
    "nlc":  [N, P + H*W, D]       -> drop the first P prefix tokens (class / distillation / register tokens,
                                     timm's ``num_prefix_tokens``), then [N, D, H, W] with the patch tokens in
                                     row-major order (timm's and the ViT papers' order); H x W is ``token_grid``
                                     or, when not given, the square sqrt(H*W) x sqrt(H*W).
    "auto": 4-D -> "nchw", 3-D -> "nlc". A channels-last 4-D map is indistinguishable from NCHW by its shape, so
            it must be named "nhwc" (timm models say so in ``model.output_fmt``).

The losses and ``gaussian_wasserstein`` default to "nchw" (a 3-D input stays an error there unless the caller
names a token layout); "auto" is the opt-in shape rule.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from torch import Tensor

__all__ = ["LAYOUTS", "resolve_layout", "as_nchw"]

LAYOUTS = ("auto", "nchw", "nlc", "nhwc")
_DIMS = {"nchw": 4, "nhwc": 4, "nlc": 3}
_DOC = {"nchw": "[N, C, H, W]", "nhwc": "[N, H, W, D]", "nlc": "[N, L, D]"}


def resolve_layout(x: Tensor, layout: str, name: str, fn: str) -> str:
    """The concrete layout of ``x`` ("nchw", "nlc" or "nhwc") for ``layout`` (one of ``LAYOUTS``)."""
    if not isinstance(layout, str) or layout.lower() not in LAYOUTS:
        raise ValueError(f"{fn}: the layout of `{name}` must be one of {LAYOUTS}, got {layout!r}")
    layout = layout.lower()
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: `{name}` must be a torch.Tensor, got {type(x).__name__}")
    if layout == "auto":
        if x.dim() == 4:
            return "nchw"
        if x.dim() == 3:
            return "nlc"
        raise ValueError(f"{fn}: `{name}` must be 4-D [N, C, H, W] (or [N, H, W, D] with layout 'nhwc') or 3-D "
                         f"tokens [N, L, D], got shape {list(x.shape)}")
    if x.dim() != _DIMS[layout]:
        raise ValueError(f"{fn}: `{name}` with layout {layout!r} must be {_DIMS[layout]}-D {_DOC[layout]}, got shape "
                         f"{list(x.shape)}")
    return layout


def _token_grid(L: int, token_grid: Optional[Sequence[int]], name: str, fn: str):
    if token_grid is None:
        s = math.isqrt(L)
        if s * s != L:
            raise ValueError(f"{fn}: `{name}` has {L} patch tokens, not a square number; give the token grid (H, W) "
                             f"with H * W = {L} (or fewer prefix tokens if some are not patches)")
        return s, s
    try:
        h, w = (int(v) for v in token_grid)
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: the token grid of `{name}` must be (H, W), got {token_grid!r}") from None
    if h < 1 or w < 1 or h * w != L:
        raise ValueError(f"{fn}: `{name}` has {L} patch tokens but its token grid is {h} x {w} = {h * w}")
    return h, w


def as_nchw(x: Tensor, layout: str = "auto", num_prefix_tokens: int = 0, token_grid: Optional[Sequence[int]] = None,
            *, name: str = "x", fn: str = "as_nchw") -> Tensor:
    """``x`` as an [N, C, H, W] view (module docstring). ``num_prefix_tokens`` applies to "nlc" only (it must be 0
    otherwise); ``token_grid`` (H, W) likewise. No copy is made: "nlc" / "nhwc" give channels-last strides."""
    if isinstance(layout, str) and layout.lower() == "nchw" and not num_prefix_tokens and token_grid is None:
        return x  # as given: the callers' own [N, C, H, W] checks name the argument
    layout = resolve_layout(x, layout, name, fn)
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"{fn}: the number of prefix tokens of `{name}` must be an integer >= 0, got "
                         f"{num_prefix_tokens!r}")
    if layout != "nlc" and (num_prefix_tokens or token_grid is not None):
        raise ValueError(f"{fn}: prefix tokens / a token grid apply to token sequences [N, L, D] (layout 'nlc'), "
                         f"but `{name}` has layout {layout!r} (shape {list(x.shape)})")
    if layout == "nchw":
        return x
    if layout == "nhwc":
        return x.permute(0, 3, 1, 2)
    N, L, D = x.shape
    if num_prefix_tokens >= L:
        raise ValueError(f"{fn}: `{name}` has {L} tokens, not more than its {num_prefix_tokens} prefix tokens")
    h, w = _token_grid(L - num_prefix_tokens, token_grid, name, fn)
    return x[:, num_prefix_tokens:].transpose(1, 2).reshape(N, D, h, w)
