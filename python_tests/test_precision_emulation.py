"""bench/precision_emulation.py's operand rounding: the emulated TF32/BF16 products the precision table rests on."""
import torch

from precision_emulation import emulated_mm, round_mantissa  # bench/ is on sys.path (conftest)


def test_bf16_rounding_matches_torch():
    x = torch.randn(10000, generator=torch.Generator().manual_seed(0)) * 1e3
    # random values are never exact ties, where torch (ties to even) and cvt.rna (ties away) differ
    assert torch.equal(round_mantissa(x, 7), x.bfloat16().float())


def test_tf32_keeps_ten_bits():
    x = torch.tensor([1 + 2 ** -10, 1 + 2 ** -11, 1 + 2 ** -12, -(1 + 3 * 2 ** -12)])
    assert round_mantissa(x, 10).tolist() == [1 + 2 ** -10, 1 + 2 ** -10, 1.0, -(1 + 2 ** -10)]  # ties away
    assert round_mantissa(x, 10, truncate=True).tolist() == [1 + 2 ** -10, 1.0, 1.0, -1.0]


def test_split_products_are_near_float32_and_one_tf32_product_is_not():
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(64, 200, generator=g), torch.rand(200, 48, generator=g)
    exact = x.double() @ y.double()
    err = {m: ((emulated_mm(x, y, mode).double() - exact).abs().max() / exact.abs().max()).item()
           for m, mode in (("ieee", None), ("tf32x3", ("split", 10)), ("tf32", ("one", 10, False)))}
    assert err["ieee"] < 1e-6 and err["tf32x3"] < 1e-6
    assert 1e-5 < err["tf32"] < 1e-3
