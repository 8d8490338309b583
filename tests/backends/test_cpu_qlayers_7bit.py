"""oneDNN's int8 kernels on every x86 CPU, VNNI or not: uint8 inputs times weights within +-64 (what Kiln's calibrated
INT8 builds where the CPU has no VNNI: kiln.backends.cpu.features.exact_int8_layer) are bit-exact against the int64
oracle of test_cpu_qlayers.py, extreme values included (255 x 64 pairs fill int16 to 32640); without VNNI the
tactics decline the layers oneDNN would not compute exactly there (int8 inputs, a weight of 65)."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from kiln.backends.cpu.dnnl import library
from kiln.backends.tactic import get_tactic
from tests.backends.test_cpu_qlayers import (GEO_A, GEOMETRIES, RANGE, S8, U8, F32, _cl, _conv_out, _few_bits, _gen,
                                             _geo, _ints, _quant, assert_matches, oracle_qconv, oracle_qgemm,
                                             qconv_node, qgemm_node, run_kernel)
from tests.backends.test_cpu_tactics import CPU

pytestmark = pytest.mark.skipif(library() is None,
                                reason="the oneDNN library (pip install onednn-cpu-gomp) is not installed")


def _w7(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """int8 weights within +-64, both ends present."""
    w = torch.randint(-64, 65, shape, generator=g).to(torch.int8)
    w.view(-1)[:2] = torch.tensor([64, -64], dtype=torch.int8)
    return w


# oneDNN 3.2 has only reference loops for dilated grouped int8 convs without VNNI (g4, g5 of GEOMETRIES): the tactic
# then runs QConv's own compute (test_cpu_qlayers.py::test_reference_implementation_refused_and_falls_back)
KERNEL_GEOMETRIES = [c for c in GEOMETRIES if not (c[8] > 1 and c[8] != c[0] and max(c[7]) > 1)]


@pytest.mark.parametrize("case", KERNEL_GEOMETRIES, ids=[f"g{i}" for i in range(len(KERNEL_GEOMETRIES))])
@pytest.mark.parametrize("x_zp, out", [(128, S8), (128, U8), (121, F32), (0, U8)], ids=["zp128_s8", "zp128_u8",
                                                                                         "zp121_f32", "zp0_u8"])
def test_uint8_input_7_bit_weights_exact(case: tuple[Any, ...], x_zp: int, out: torch.dtype) -> None:
    cin, cout, h, wd, k, _, _, _, group = case
    g = _gen(cin * 31 + cout + x_zp)
    x, w = _cl(_ints(U8, (2, cin, h, wd), g)), _w7((cout, cin // group, k, k), g)
    b = _few_bits((cout,), g)
    q, geo = _quant(U8, x_zp, out, True, cout, g), _geo(case)
    got = run_kernel(qconv_node(x, w, b, None, q, geo, out=out), "cpu.qconv_dnnl", x)
    assert_matches(got, oracle_qconv(x, w, b, None, q, geo), out, exact=True)


def test_extreme_products_exact() -> None:
    """Every input 255 and every weight +-64: the largest pair sums the AVX2 kernels form (32640) stay exact;
    a float output, so nothing saturates after the accumulator either."""
    g = _gen(11)
    x = _cl(torch.full((1, 32, 6, 6), 255, dtype=U8))
    w = torch.where(torch.rand((16, 32, 3, 3), generator=g) < 0.5, 64, -64).to(torch.int8)
    w[0] = 64  # one channel of all-positive products: the largest sums
    q = _quant(U8, 0, F32, True, 16, g)
    got = run_kernel(qconv_node(x, w, None, None, q, GEO_A, out=F32), "cpu.qconv_dnnl", x)
    want = oracle_qconv(x, w, None, None, q, GEO_A)
    assert float(want.abs().max()) > 0
    assert_matches(got, want, F32, exact=True)


@pytest.mark.parametrize("z_dtype", [U8, F32], ids=["z_u8", "z_f32"])
def test_uint8_residual_and_gemm_exact(z_dtype: torch.dtype) -> None:
    g = _gen(12 + (z_dtype is U8))
    x, w, b = _cl(_ints(U8, (2, 8, 7, 9), g)), _w7((16, 8, 3, 3), g), _few_bits((16,), g)
    q = _quant(U8, 128, U8, True, 16, g, y_zp=128)
    zshape = (2, 16, _conv_out(7, 3, 1, 1, 1, 1), _conv_out(9, 3, 1, 1, 1, 1))
    if z_dtype is U8:
        z = _cl(_ints(U8, zshape, g))
        q["z_scale"], q["z_zero_point"] = 2.0 ** -2, 128
    else:
        z = _cl(_few_bits(zshape, g))
    got = run_kernel(qconv_node(x, w, b, z, q, GEO_A, "Relu", out=U8), "cpu.qconv_dnnl", x, z)
    assert_matches(got, oracle_qconv(x, w, b, z, q, GEO_A, "Relu"), U8, exact=True)
    lo, hi = RANGE[U8]
    a, wg = _ints(U8, (5, 40), g), _w7((24, 40), g)
    qg = _quant(U8, 128, S8, True, 24, g)
    bg = _few_bits((24,), g)
    got = run_kernel(qgemm_node(a, wg, bg, None, qg), "cpu.qgemm_dnnl", a)
    want = oracle_qgemm(a, wg, bg, None, qg)
    assert 0 < int(((want > lo) & (want < hi)).sum())
    assert_matches(got, want, S8, exact=True)


def test_without_vnni_declines_what_onednn_would_not_compute_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    import kiln.backends.cpu.features as features
    monkeypatch.setattr(features, "exact_int8", lambda: False)
    g = _gen(13)
    x, w, b = _ints(U8, (1, 8, 9, 9), g), _w7((16, 8, 3, 3), g), _few_bits((16,), g)
    q = _quant(U8, 128, S8, True, 16, g)
    conv = get_tactic("cpu.qconv_dnnl")
    assert conv.supports(qconv_node(x, w, b, None, q, GEO_A), CPU)
    w65 = w.clone()
    w65[3, 2, 1, 1] = 65
    assert not conv.supports(qconv_node(x, w65, b, None, q, GEO_A), CPU)  # a pair could reach 255 * 129
    wm = w.clone()
    wm[0, 0, 0, 0] = -128  # |-128| read without int8 overflow
    assert not conv.supports(qconv_node(x, wm, b, None, q, GEO_A), CPU)
    xs = _ints(S8, (1, 8, 9, 9), g)
    assert not conv.supports(qconv_node(xs, w, b, None, _quant(S8, 0, S8, True, 16, g), GEO_A), CPU)
    a, q8 = _ints(U8, (3, 16), g), _quant(U8, 128, S8, True, 8, g)
    gemm = get_tactic("cpu.qgemm_dnnl")
    assert gemm.supports(qgemm_node(a, _w7((8, 16), g), None, None, q8), CPU)
    assert not gemm.supports(qgemm_node(a.view(torch.int8), _w7((8, 16), g), None, None, _quant(S8, 0, S8, True, 8, g)),
                             CPU)
