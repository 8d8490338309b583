"""cpu.conv_winograd (F(4x4, 3x3) with C transforms and a oneDNN GEMM) against the reference convolution."""
from __future__ import annotations

import pytest
import torch

from kiln.backends.cpu import native
from kiln.backends.cpu.conv_winograd import WinogradConvTactic, transform_weights
from kiln.backends.cpu.dnnl import library
from kiln.backends.tactic import get_tactic
from kiln.errors import KilnError
from kiln.ops.registry import lookup
from tests.backends.test_cpu_tactics import CPU, make_node, rel_err, run_both

pytestmark = pytest.mark.skipif(library() is None or native.load("winograd") is None,
                                reason="needs the oneDNN library (pip install onednn-cpu-gomp) and a C compiler")
TOL = 2e-5  # Winograd's transforms add rounding: about 1e-6 relative on unit-scale data


def _conv(n: int, c: int, k: int, h: int, w: int, seed: int, bias: bool = True, **attrs: object):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
    wt = torch.randn(k, c, 3, 3, generator=gen) / (3 * c ** 0.5)
    b = torch.randn(k, generator=gen) if bias else None
    return x, wt, b


@pytest.mark.parametrize("n, c, k, h, w, pads", [
    (1, 16, 8, 9, 11, [1, 1, 1, 1]), (2, 8, 24, 12, 12, [1, 1, 1, 1]), (1, 3, 5, 7, 6, [0, 0, 0, 0]),
    (1, 70, 130, 10, 13, [1, 1, 1, 1]),  # several 64-channel chunks, odd counts
    (2, 32, 16, 5, 9, [0, 1, 2, 0]),  # asymmetric pads
    (1, 8, 8, 4, 4, [2, 2, 2, 2])])
@pytest.mark.parametrize("tile", [4, 2])
def test_conv_matches_reference(n: int, c: int, k: int, h: int, w: int, pads: list[int], tile: int) -> None:
    x, wt, b = _conv(n, c, k, h, w, seed=h * w + c)
    node = make_node("Conv", [(x, False), (wt, True), (b, True)], None, {"pads": pads})
    assert {"tile": tile} in get_tactic("cpu.conv_winograd").configs(node, CPU)
    got, want = run_both(node, "cpu.conv_winograd", [x, wt, b], {"tile": tile})
    assert rel_err(got, want) <= TOL and got.is_contiguous(memory_format=torch.channels_last)


ACTS = [("", 0.0, 0.0), ("Relu", 0.0, 0.0), ("LeakyRelu", 0.1, 0.0), ("Clip", 0.0, 6.0), ("Sigmoid", 0.0, 0.0),
        ("SiLU", 0.0, 0.0), ("HardSwish", 0.0, 0.0)]


@pytest.mark.parametrize("act", ACTS, ids=lambda a: a[0] or "none")
@pytest.mark.parametrize("residual, before_add", [(False, 0), (True, 0), (True, 1)])
@pytest.mark.parametrize("tile", [4, 2])
def test_fused_epilogue(act: tuple[str, float, float], residual: bool, before_add: int, tile: int) -> None:
    x, wt, b = _conv(1, 24, 40, 13, 10, seed=3)
    z = torch.randn(1, 40, 13, 10).contiguous(memory_format=torch.channels_last) if residual else None
    attrs = {"pads": [1, 1, 1, 1], "activation": act[0], "alpha": act[1], "beta": act[2], "act_before_add": before_add}
    ins = [(x, False), (wt, True), (b, True)] + ([(z, False)] if residual else [])
    node = make_node("FusedConv", ins, None, attrs, domain="kiln")
    got, want = run_both(node, "cpu.conv_winograd", [x, wt, b] + ([z] if residual else []), {"tile": tile})
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("tile", [4, 2])
def test_strided_views_in_and_out_and_new_shapes(tile: int) -> None:
    """Reads a channel slice of a wider tensor, writes into a Concat-like channel slice, takes NCHW too."""
    x, wt, _ = _conv(2, 16, 12, 11, 9, seed=5, bias=False)
    node = make_node("Conv", [(x, False), (wt, True)], None, {"pads": [1, 1, 1, 1]})
    kernel = get_tactic("cpu.conv_winograd").make(node, {"tile": tile}, torch.device("cpu"))
    ref = lookup("Conv", "").compute
    wide = torch.randn(2, 40, 11, 9).contiguous(memory_format=torch.channels_last)
    view = wide[:, 8:24]  # channels contiguous, pixel stride 40
    cat = torch.full((2, 30, 11, 9), float("nan")).contiguous(memory_format=torch.channels_last)
    dst = cat[:, 10:22]
    assert kernel(view, out=dst) is dst
    torch.testing.assert_close(dst, ref(node, view, wt), rtol=TOL, atol=TOL)
    assert torch.isnan(cat[:, :10]).all() and torch.isnan(cat[:, 22:]).all()  # nothing outside the slice
    for shape in ((1, 16, 6, 17), (3, 16, 11, 9)):  # other shapes through the same kernel, NCHW input
        xn = torch.randn(*shape)
        torch.testing.assert_close(kernel(xn), ref(node, xn, wt), rtol=TOL, atol=TOL)
    with pytest.raises(KilnError, match="contiguous channels"):
        kernel(view, out=torch.empty(2, 12, 11, 9))  # NCHW destination


def test_declines() -> None:
    x, wt, b = _conv(1, 8, 8, 9, 9, seed=1)
    tactic = get_tactic("cpu.conv_winograd")
    for attrs in ({"strides": [2, 2]}, {"dilations": [2, 2]}, {"group": 2}):
        w = wt[:, :4].contiguous() if "group" in attrs else wt
        assert not tactic.supports(make_node("Conv", [(x, False), (w, True)], None, attrs), CPU)
    five = torch.randn(8, 8, 5, 5)
    assert not tactic.supports(make_node("Conv", [(x, False), (five, True)], None, {}), CPU)
    big = torch.randn(640, 512, 3, 3)  # 21 MB of transformed weights even for F(2x2): streamed every inference
    xb = torch.randn(1, 512, 8, 8)
    assert not tactic.supports(make_node("Conv", [(xb, False), (big, True)], None, {}), CPU)
    mid = make_node("Conv", [(xb, False), (torch.randn(512, 512, 3, 3), True)], None, {})
    assert tactic.configs(mid, CPU) == [{"tile": 2}]  # 16 MiB for F(2x2) fits, 36 MiB for F(4x4) does not

    mish = make_node("FusedConv", [(x, False), (wt, True), (b, True)], None, {"activation": "Mish"}, domain="kiln")
    assert not tactic.supports(mish, CPU)
    assert isinstance(tactic, WinogradConvTactic) and tactic.writes_out == 1 and tactic.strided_out


def test_weight_transform_is_exact_in_float64_f2() -> None:
    bt = torch.tensor([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=torch.float64)
    at = torch.tensor([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=torch.float64)
    g, d = torch.randn(1, 1, 3, 3, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    u = transform_weights(g, 2).double().reshape(4, 4)
    y = at @ (u * (bt @ d @ bt.T)) @ at.T
    assert float((y - torch.nn.functional.conv2d(d[None, None], g)[0, 0]).abs().max()) < 1e-5


def test_weight_transform_is_exact_in_float64() -> None:
    """A^T [(G g G^T) * (B^T d B)] A is the 4x4 correlation of a 6x6 tile with g."""
    # the points 0, 1, -1, 1/2, -2, infinity, as native/winograd.c computes B^T d B and A^T M A
    bt = torch.tensor([[1, -1.5, -2, 1.5, 1, 0], [0, -1, 0.5, 2.5, 1, 0], [0, 1, -2.5, 0.5, 1, 0],
                       [0, -2, -1, 2, 1, 0], [0, 0.5, -1, -0.5, 1, 0], [0, 1, -1.5, -2, 1.5, 1]], dtype=torch.float64)
    at = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, -1, 0.5, -2, 0], [0, 1, 1, 0.25, 4, 0], [0, 1, -1, 0.125, -8, 1]],
                      dtype=torch.float64)
    g = torch.randn(1, 1, 3, 3, dtype=torch.float64)
    d = torch.randn(6, 6, dtype=torch.float64)
    u = transform_weights(g).double().reshape(6, 6)
    y = at @ (u * (bt @ d @ bt.T)) @ at.T
    want = torch.nn.functional.conv2d(d[None, None], g)[0, 0]
    assert float((y - want).abs().max()) < 1e-5  # u went through float32


def test_missing_compiler_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_CC", "/nonexistent/cc")
    monkeypatch.setenv("KILN_CACHE_DIR", "/tmp/kiln-test-no-cc")
    with pytest.raises(OSError):
        native._compile("winograd")


# ---- cpu.conv_matmul (1x1 convolutions as one matmul, any destination slice) ------------------------

@pytest.mark.parametrize("act", [("", 0.0, 0.0), ("Relu", 0.0, 0.0), ("LeakyRelu", 0.1, 0.0), ("SiLU", 0.0, 0.0)],
                         ids=lambda a: a[0] or "none")
@pytest.mark.parametrize("residual, before_add", [(False, 0), (True, 0), (True, 1)])
def test_matmul_conv(act: tuple[str, float, float], residual: bool, before_add: int) -> None:
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(2, 24, 7, 9, generator=gen).contiguous(memory_format=torch.channels_last)
    wt, b = torch.randn(40, 24, 1, 1, generator=gen) / 5, torch.randn(40, generator=gen)
    z = torch.randn(2, 40, 7, 9, generator=gen).contiguous(memory_format=torch.channels_last)
    attrs = {"activation": act[0], "alpha": act[1], "beta": act[2], "act_before_add": before_add}
    ins = [(x, False), (wt, True), (b, True)] + ([(z, False)] if residual else [])
    node = make_node("FusedConv", ins, None, attrs, domain="kiln")
    got, want = run_both(node, "cpu.conv_matmul", [x, wt, b] + ([z] if residual else []))
    assert rel_err(got, want) <= 1e-5


def test_matmul_conv_views_two_destinations_and_declines() -> None:
    gen = torch.Generator().manual_seed(22)
    wide = torch.randn(1, 48, 6, 5, generator=gen).contiguous(memory_format=torch.channels_last)
    x, wt = wide[:, 16:40], torch.randn(12, 24, 1, 1, generator=gen)
    node = make_node("Conv", [(x, False), (wt, True)], None, {})
    kernel = get_tactic("cpu.conv_matmul").make(node, {}, torch.device("cpu"))
    want = lookup("Conv", "").compute(node, x, wt)
    cat = torch.full((1, 40, 6, 5), float("nan")).contiguous(memory_format=torch.channels_last)
    first, second = cat[:, 2:14], cat[:, 20:32]
    kernel(x, out=(first, second))  # a value written into two Concats
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, want, rtol=1e-5, atol=1e-5)
    assert torch.isnan(cat[:, 14:20]).all()
    xn = torch.randn(3, 24, 4, 4, generator=gen)  # NCHW, another shape: reordered first, a new primitive
    torch.testing.assert_close(kernel(xn), lookup("Conv", "").compute(node, xn, wt), rtol=1e-5, atol=1e-5)
    with pytest.raises(KilnError, match="evenly spaced pixels"):
        kernel(x, out=cat[:, 2:14, :, :3])
    tactic = get_tactic("cpu.conv_matmul")
    for attrs in ({"strides": [2, 2]}, {"pads": [1, 1, 1, 1]}):
        assert not tactic.supports(make_node("Conv", [(x, False), (wt, True)], None, attrs), CPU)
    three = torch.randn(12, 24, 3, 3)
    assert not tactic.supports(make_node("Conv", [(x, False), (three, True)], None, {}), CPU)
