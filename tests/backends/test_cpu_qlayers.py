"""cpu.qconv_dnnl / cpu.qgemm_dnnl (oneDNN int8 primitives) against a float64 oracle written here, and against
the QConv / QGemm reference compute.

With power-of-two scales and few-bit biases/residuals every step of the epilogue is exact in float32 and
float64, so the kernels must match the oracle bit for bit (the integer products are exact in float64);
transcendental activations and general scales agree within float32 rounding (one quantization step).
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kiln.backends.cpu.dnnl import DnnlError, library
from kiln.backends.cpu.dnnl_int8 import QConvolution, QMatMul, Requant
from kiln.backends.tactic import get_tactic
from kiln.errors import KilnError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node
from kiln.ops.registry import lookup
from tests.backends.test_cpu_tactics import CPU, make_node

from kiln.testing import exact_int8_cpu  # noqa: E402

EXACT_INT8, NO_EXACT_INT8 = exact_int8_cpu()
pytestmark = [pytest.mark.skipif(library() is None,
                                 reason="the oneDNN library (pip install onednn-cpu-gomp) is not installed"),
              pytest.mark.skipif(not EXACT_INT8, reason=NO_EXACT_INT8)]

S8, U8, F32, F16 = torch.int8, torch.uint8, torch.float32, torch.float16
OUT_CODE = {S8: 3, U8: 2, F32: 1, F16: 10}
RANGE = {S8: (-128, 127), U8: (0, 255)}
ACT64 = {"": lambda v: v, "Relu": lambda v: v.clamp(min=0), "LeakyRelu": lambda v: torch.where(v < 0, v * 0.125, v),
         "Sigmoid": torch.sigmoid, "Tanh": torch.tanh}
ACT_ALPHA = {"LeakyRelu": 0.125}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ints(dtype: torch.dtype, shape: tuple[int, ...], g: torch.Generator, lo: int | None = None,
          hi: int | None = None) -> torch.Tensor:
    r = RANGE[dtype]
    return torch.randint(r[0] if lo is None else lo, (r[1] if hi is None else hi) + 1, shape, generator=g).to(dtype)


def _pow2(n: int, lo: int, hi: int, g: torch.Generator) -> list[float]:
    return [2.0 ** -int(e) for e in torch.randint(lo, hi + 1, (n,), generator=g)]


def _few_bits(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """float32 values with 3 fractional bits (exact through every float32 step of the epilogue)."""
    return torch.randint(-64, 65, shape, generator=g).float() / 8


def _quant(x_dtype: torch.dtype, x_zp: int, out: torch.dtype, per_channel: bool, n: int, g: torch.Generator,
           pow2: bool = True, y_zp: int | None = None) -> dict[str, Any]:
    """QConv / QGemm quantization attributes: power-of-two scales (or general ones) for n output channels."""
    if pow2:
        x_scale, w_scales = 2.0 ** -3, _pow2(n if per_channel else 1, 7, 10, g)
    else:
        x_scale = 0.0173
        w_scales = (torch.rand(n if per_channel else 1, generator=g, dtype=torch.float64) * 0.004 + 0.001).tolist()
    q: dict[str, Any] = {"x_scale": x_scale, "x_zero_point": x_zp, "w_scales": w_scales, "out_dtype": OUT_CODE[out]}
    if out in RANGE:
        q["y_scale"] = 0.125 if pow2 else 0.1371
        q["y_zero_point"] = y_zp if y_zp is not None else (3 if out is S8 else 121)  # odd: rounding before the zp
    return q


def _epilogue64(acc: torch.Tensor, ch: int, b: torch.Tensor | None, z: torch.Tensor | None, q: dict[str, Any],
                act: str, before_add: int) -> torch.Tensor:
    """The QConv / QGemm epilogue in float64 on an exact integer accumulator."""
    shape = [1] * acc.dim()
    shape[ch] = acc.shape[ch]
    ws = torch.tensor(q["w_scales"], dtype=torch.float64).expand(acc.shape[ch]).reshape(shape)
    v = acc * (q["x_scale"] * ws)
    if b is not None:
        v = v + b.double().reshape(shape)
    r = None
    if z is not None:
        r = (z.double() - q.get("z_zero_point", 0)) * q.get("z_scale", 1.0) if z.dtype in RANGE else z.double()
    if before_add:
        v = ACT64[act](v)
    if q.get("a_scale", 0.0) > 0:  # the layer's result requantized before the residual (a fused Q/DQ Add)
        lo, hi = RANGE[S8 if q.get("a_dtype", 3) == 3 else U8]
        zp = q.get("a_zero_point", 0)
        v = ((torch.round(v / q["a_scale"]) + zp).clamp(lo, hi) - zp) * q["a_scale"]
    if r is not None:
        v = v + r
    if not before_add:
        v = ACT64[act](v)
    if q["out_dtype"] == 1:
        return v
    lo, hi = RANGE[S8 if q["out_dtype"] == 3 else U8]
    return (torch.round(v / q["y_scale"]) + q["y_zero_point"]).clamp(lo, hi)


def oracle_qconv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, z: torch.Tensor | None,
                 q: dict[str, Any], geo: dict[str, Any], act: str = "", before_add: int = 0) -> torch.Tensor:
    top, left, bottom, right = geo["pads"]
    xs = F.pad(x.double() - q["x_zero_point"], (left, right, top, bottom))  # X padded with its zero point
    acc = F.conv2d(xs, w.double(), None, geo["strides"], 0, geo["dilations"], geo["group"])  # exact integers
    return _epilogue64(acc, 1, b, z, q, act, before_add)


def oracle_qgemm(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, z: torch.Tensor | None,
                 q: dict[str, Any], act: str = "", before_add: int = 0) -> torch.Tensor:
    acc = (a.double() - q["x_zero_point"]) @ w.double().t()
    return _epilogue64(acc, acc.dim() - 1, b, z, q, act, before_add)


def _attrs(q: dict[str, Any], act: str, before_add: int) -> dict[str, Any]:
    return {**q, "activation": act, "alpha": ACT_ALPHA.get(act, 0.0), "beta": 0.0, "act_before_add": before_add}


def _conv_out(n: int, k: int, s: int, p0: int, p1: int, d: int) -> int:
    return (n + p0 + p1 - d * (k - 1) - 1) // s + 1


def qconv_node(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, z: torch.Tensor | None, q: dict[str, Any],
               geo: dict[str, Any], act: str = "", before_add: int = 0, out: torch.dtype = S8) -> Node:
    (s0, s1), (d0, d1), pads = geo["strides"], geo["dilations"], geo["pads"]
    shape = (x.shape[0], w.shape[0], _conv_out(x.shape[2], w.shape[2], s0, pads[0], pads[2], d0),
             _conv_out(x.shape[3], w.shape[3], s1, pads[1], pads[3], d1))
    ins: list[tuple[Any, bool]] = [(x, False), (w, True), (b, True)] + ([(z, False)] if z is not None else [])
    attrs = {**_attrs(q, act, before_add), "strides": list(geo["strides"]), "dilations": list(geo["dilations"]),
             "pads": list(pads), "group": geo["group"]}
    return make_node("QConv", ins, shape, attrs, domain="kiln", out_dtype=DType.from_torch(out))


def qgemm_node(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, z: torch.Tensor | None, q: dict[str, Any],
               act: str = "", before_add: int = 0, out: torch.dtype = S8) -> Node:
    ins: list[tuple[Any, bool]] = [(a, False), (w, True), (b, True)] + ([(z, False)] if z is not None else [])
    return make_node("QGemm", ins, (*a.shape[:-1], w.shape[0]), _attrs(q, act, before_add), domain="kiln",
                     out_dtype=DType.from_torch(out))


def run_kernel(node: Node, tactic: str, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
    t = get_tactic(tactic)
    assert t.supports(node, CPU), f"{tactic} declines {node.attrs}"
    kernel = t.make(node, {}, torch.device("cpu"))
    saved = [x.clone(), None if z is None else z.clone()]
    try:
        got = kernel(x, None, None, z)
    finally:
        kernel.release()  # type: ignore[misc]
    assert torch.equal(x, saved[0]) and (z is None or torch.equal(z, saved[1]))  # inputs never written
    assert kernel.fallback is not None and kernel.fallback.reason is None, kernel.fallback.reason  # oneDNN's own
    return got


def assert_matches(got: torch.Tensor, want: torch.Tensor, out: torch.dtype, exact: bool) -> None:
    assert got.dtype is out and tuple(got.shape) == tuple(want.shape)
    diff = (got.double() - want).abs()
    if exact:
        assert float(diff.max()) == 0.0, f"{int((diff > 0).sum())} values differ, by up to {float(diff.max())}"
    elif out in RANGE:
        assert float(diff.max()) <= 1.0  # one quantization step
    else:
        assert float(diff.max()) <= 1e-6 * max(float(want.abs().max()), 1.0)


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


# ---- QConv: quantization combinations -------------------------------------------------------------------

GEO_A = {"strides": (1, 1), "dilations": (1, 1), "pads": (1, 1, 1, 1), "group": 1}
GEO_B = {"strides": (2, 1), "dilations": (1, 1), "pads": (0, 1, 2, 0), "group": 1}  # asymmetric pads


@pytest.mark.parametrize("geo, shape", [(GEO_A, (1, 8, 9, 9, 16)), (GEO_B, (3, 6, 11, 7, 12))], ids=["same", "asym"])
@pytest.mark.parametrize("x_dtype, x_zp", [(U8, 0), (U8, 121), (S8, 0), (S8, -5)])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("out", [S8, U8, F32], ids=["s8", "u8", "f32"])
def test_qconv_quantization(geo: dict[str, Any], shape: tuple[int, ...], x_dtype: torch.dtype, x_zp: int,
                            per_channel: bool, out: torch.dtype) -> None:
    n, c, h, wd, k = shape
    g = _gen(hash((x_zp, per_channel, OUT_CODE[out], n)) % 1000)
    x, w = _cl(_ints(x_dtype, (n, c, h, wd), g)), _ints(S8, (k, c, 3, 3), g)
    b = _few_bits((k,), g)
    q = _quant(x_dtype, x_zp, out, per_channel, k, g)
    node = qconv_node(x, w, b, None, q, geo, out=out)
    got = run_kernel(node, "cpu.qconv_dnnl", x)
    assert got.is_contiguous(memory_format=torch.channels_last)  # int8 activations flow NHWC
    want = oracle_qconv(x, w, b, None, q, geo)
    if out in RANGE:  # saturation is exercised, and so is the unsaturated range
        lo, hi = RANGE[out]
        assert 0 < int(((want > lo) & (want < hi)).sum()) < want.numel()
    assert_matches(got, want, out, exact=True)


# ---- QConv: geometry -------------------------------------------------------------------------------------

GEOMETRIES = [  # (cin, cout, h, w, k, strides, pads (top, left, bottom, right), dilations, group)
    (8, 16, 9, 9, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),
    (6, 12, 11, 7, 3, (2, 2), (0, 1, 2, 0), (1, 1), 1),  # asymmetric pads, odd sizes
    (8, 8, 12, 10, 3, (1, 1), (1, 1, 1, 1), (1, 1), 8),  # depthwise
    (16, 16, 9, 9, 3, (2, 2), (1, 1, 1, 1), (1, 1), 16),  # strided depthwise
    (8, 12, 9, 9, 3, (1, 1), (2, 2, 2, 2), (2, 2), 2),  # dilated, grouped
    (12, 6, 10, 9, 3, (1, 2), (1, 0, 0, 1), (1, 2), 3),  # grouped, mixed strides/dilations
    (3, 16, 15, 15, 7, (2, 2), (3, 3, 3, 3), (1, 1), 1),  # stem
    (16, 32, 7, 7, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1),  # 1x1
    (16, 8, 8, 8, 1, (2, 2), (0, 0, 0, 0), (1, 1), 1),  # strided 1x1
    (5, 7, 6, 5, 3, (1, 1), (1, 0, 0, 1), (1, 1), 1),  # odd channels
]


def _geo(case: tuple[Any, ...]) -> dict[str, Any]:
    return {"strides": case[5], "pads": case[6], "dilations": case[7], "group": case[8]}


@pytest.mark.parametrize("case", GEOMETRIES, ids=[f"g{i}" for i in range(len(GEOMETRIES))])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("x_dtype, x_zp, out", [(U8, 121, S8), (S8, -5, F32), (S8, 0, U8)], ids=["u8zp", "s8zp", "s8"])
def test_qconv_geometry(case: tuple[Any, ...], batch: int, x_dtype: torch.dtype, x_zp: int, out: torch.dtype) -> None:
    cin, cout, h, wd, k, _, _, _, group = case
    g = _gen(cin * 100 + cout + batch)
    x, w = _cl(_ints(x_dtype, (batch, cin, h, wd), g)), _ints(S8, (cout, cin // group, k, k), g)
    b = _few_bits((cout,), g)
    q, geo = _quant(x_dtype, x_zp, out, True, cout, g), _geo(case)
    got = run_kernel(qconv_node(x, w, b, None, q, geo, out=out), "cpu.qconv_dnnl", x)
    assert_matches(got, oracle_qconv(x, w, b, None, q, geo), out, exact=True)


# ---- QConv: epilogue (activation, residual) --------------------------------------------------------------

@pytest.mark.parametrize("act", ["", "Relu", "LeakyRelu", "Sigmoid", "Tanh"], ids=lambda a: a or "none")
@pytest.mark.parametrize("out", [S8, U8, F32], ids=["s8", "u8", "f32"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_qconv_activation(act: str, out: torch.dtype, bias: bool) -> None:
    g = _gen(len(act) * 7 + OUT_CODE[out])
    x, w = _cl(_ints(U8, (2, 8, 9, 9), g)), _ints(S8, (16, 8, 3, 3), g)
    b = _few_bits((16,), g) if bias else None
    q = _quant(U8, 121, out, True, 16, g)
    if act in ("Sigmoid", "Tanh") and out in RANGE:
        q["y_scale"], q["y_zero_point"] = 2.0 ** -7, 0 if out is S8 else 128  # the activation's range in steps
    got = run_kernel(qconv_node(x, w, b, None, q, GEO_A, act, out=out), "cpu.qconv_dnnl", x)
    assert_matches(got, oracle_qconv(x, w, b, None, q, GEO_A, act), out, exact=act in ("", "Relu", "LeakyRelu"))


@pytest.mark.parametrize("z_dtype", [S8, U8, F32], ids=["z_s8", "z_u8", "z_f32"])
@pytest.mark.parametrize("before_add", [0, 1], ids=["act_after_add", "act_before_add"])
@pytest.mark.parametrize("act", ["Relu", "Sigmoid"])
@pytest.mark.parametrize("out", [S8, F32], ids=["s8", "f32"])
def test_qconv_residual(z_dtype: torch.dtype, before_add: int, act: str, out: torch.dtype) -> None:
    g = _gen(OUT_CODE[z_dtype] * 10 + before_add + len(act) + OUT_CODE[out] * 100)
    x, w, b = _cl(_ints(S8, (3, 8, 7, 9), g)), _ints(S8, (16, 8, 3, 3), g), _few_bits((16,), g)
    geo = GEO_B
    q = _quant(S8, -5, out, True, 16, g)
    zshape = (3, 16, _conv_out(7, 3, 2, 0, 2, 1), _conv_out(9, 3, 1, 1, 0, 1))
    if z_dtype in RANGE:
        z = _cl(_ints(z_dtype, zshape, g))
        q["z_scale"], q["z_zero_point"] = 2.0 ** -2, -7 if z_dtype is S8 else 133
    else:
        z = _cl(_few_bits(zshape, g))
    if act == "Sigmoid" and out in RANGE:
        q["y_scale"] = 2.0 ** -4
    got = run_kernel(qconv_node(x, w, b, z, q, geo, act, before_add, out=out), "cpu.qconv_dnnl", x, z)
    assert_matches(got, oracle_qconv(x, w, b, z, q, geo, act, before_add), out, exact=act == "Relu")


@pytest.mark.parametrize("a_dtype, a_zp", [(S8, -3), (S8, 0), (U8, 131)], ids=["s8zp", "s8", "u8zp"])
@pytest.mark.parametrize("before_add", [0, 1], ids=["act_after_add", "act_before_add"])
def test_qconv_residual_with_requant_before_add(a_dtype: torch.dtype, a_zp: int, before_add: int) -> None:
    # a Q/DQ model's Conv -> Q -> DQ -> Add(DQ(z)) -> Q fused into one layer: the conv result is requantized to
    # the model's grid (a_scale) before the int8 residual is added, exactly as the unfused graph computes
    g = _gen(70 + before_add + a_zp)
    x, w, b = _cl(_ints(S8, (2, 8, 7, 9), g)), _ints(S8, (16, 8, 3, 3), g), _few_bits((16,), g)
    q = _quant(S8, -5, S8, True, 16, g)
    q.update(a_scale=2.0 ** -2, a_zero_point=a_zp, a_dtype=OUT_CODE[a_dtype], z_scale=2.0 ** -1, z_zero_point=-7)
    zshape = (2, 16, _conv_out(7, 3, 2, 0, 2, 1), _conv_out(9, 3, 1, 1, 0, 1))
    z = _cl(_ints(S8, zshape, g))
    got = run_kernel(qconv_node(x, w, b, z, q, GEO_B, "Relu", before_add, out=S8), "cpu.qconv_dnnl", x, z)
    want = oracle_qconv(x, w, b, z, q, GEO_B, "Relu", before_add)
    assert_matches(got, want, S8, exact=True)
    ref = qconv_node(x, w, b, z, q, GEO_B, "Relu", before_add, out=S8)
    from kiln.ops.registry import lookup
    assert torch.equal(lookup("QConv", "kiln").compute(ref, x, w, b, z).double(), want)  # the op's own reference
    q0 = dict(q, a_scale=0.0)  # the requantization is really applied (it changes the result here)
    assert not torch.equal(oracle_qconv(x, w, b, z, q0, GEO_B, "Relu", before_add), want)


@pytest.mark.parametrize("out", [S8, U8, F32], ids=["s8", "u8", "f32"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_qconv_general_scales(out: torch.dtype, per_channel: bool) -> None:
    """Scales that are not powers of two: within one quantization step (float32 rounding order)."""
    g = _gen(OUT_CODE[out] + 10 * per_channel)
    x, w, b = _cl(_ints(U8, (2, 12, 10, 11), g)), _ints(S8, (24, 12, 3, 3), g), torch.randn(24, generator=g)
    z = _cl(_ints(S8, (2, 24, 10, 11), g))
    q = {**_quant(U8, 110, out, per_channel, 24, g, pow2=False), "z_scale": 0.0391, "z_zero_point": 3}
    got = run_kernel(qconv_node(x, w, b, z, q, GEO_A, "Relu", out=out), "cpu.qconv_dnnl", x, z)
    want = oracle_qconv(x, w, b, z, q, GEO_A, "Relu")
    if out is F32:
        assert float((got.double() - want).abs().max()) <= 1e-5 * float(want.abs().max())
    else:
        assert_matches(got, want, out, exact=False)


# ---- QGemm ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("a_shape", [(5, 40), (1, 40), (2, 3, 40), (2, 2, 3, 17)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("x_dtype, x_zp", [(U8, 0), (U8, 128), (S8, 0), (S8, 9)])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("out", [S8, U8, F32], ids=["s8", "u8", "f32"])
def test_qgemm_quantization(a_shape: tuple[int, ...], x_dtype: torch.dtype, x_zp: int, per_channel: bool,
                            out: torch.dtype) -> None:
    g = _gen(len(a_shape) * 31 + x_zp + OUT_CODE[out])
    a, w, b = _ints(x_dtype, a_shape, g), _ints(S8, (24, a_shape[-1]), g), _few_bits((24,), g)
    q = _quant(x_dtype, x_zp, out, per_channel, 24, g)
    got = run_kernel(qgemm_node(a, w, b, None, q, out=out), "cpu.qgemm_dnnl", a)
    assert got.is_contiguous()
    assert_matches(got, oracle_qgemm(a, w, b, None, q), out, exact=True)


@pytest.mark.parametrize("a_shape", [(6, 32), (2, 3, 32)], ids=["2d", "3d"])
@pytest.mark.parametrize("z_dtype", [None, S8, U8, F32], ids=["no_z", "z_s8", "z_u8", "z_f32"])
@pytest.mark.parametrize("before_add", [0, 1], ids=["act_after_add", "act_before_add"])
@pytest.mark.parametrize("act", ["Relu", "Tanh"])
@pytest.mark.parametrize("out", [U8, F32], ids=["u8", "f32"])
def test_qgemm_epilogue(a_shape: tuple[int, ...], z_dtype: torch.dtype | None, before_add: int, act: str,
                        out: torch.dtype) -> None:
    z_code = 0 if z_dtype is None else OUT_CODE[z_dtype]
    g = _gen(len(a_shape) + before_add * 3 + len(act) + OUT_CODE[out] * 11 + z_code)
    a, w = _ints(S8, a_shape, g), _ints(S8, (20, 32), g)
    q = _quant(S8, -3, out, True, 20, g)
    z = None
    if z_dtype in RANGE:
        z = _ints(z_dtype, (*a_shape[:-1], 20), g)  # type: ignore[arg-type]
        q["z_scale"], q["z_zero_point"] = 2.0 ** -1, 5
    elif z_dtype is F32:
        z = _few_bits((*a_shape[:-1], 20), g)
    if act == "Tanh" and out in RANGE:
        q["y_scale"], q["y_zero_point"] = 2.0 ** -6, 127
    got = run_kernel(qgemm_node(a, w, None, z, q, act, before_add, out=out), "cpu.qgemm_dnnl", a, z)
    assert_matches(got, oracle_qgemm(a, w, None, z, q, act, before_add), out, exact=act == "Relu")


@pytest.mark.parametrize("out", [S8, F32], ids=["s8", "f32"])
def test_qgemm_general_scales(out: torch.dtype) -> None:
    g = _gen(5 + OUT_CODE[out])
    a, w, b = _ints(U8, (4, 7, 64), g), _ints(S8, (48, 64), g), torch.randn(48, generator=g)
    q = _quant(U8, 131, out, True, 48, g, pow2=False)
    got = run_kernel(qgemm_node(a, w, b, None, q, "Relu", out=out), "cpu.qgemm_dnnl", a)
    want = oracle_qgemm(a, w, b, None, q, "Relu")
    if out is F32:
        assert float((got.double() - want).abs().max()) <= 1e-5 * float(want.abs().max())
    else:
        assert_matches(got, want, out, exact=False)


# ---- against the ops' reference compute -------------------------------------------------------------------

def _op_reference(node: Node, *args: torch.Tensor | None) -> torch.Tensor:
    return lookup(node.op_type, node.domain).compute(node, *args)


@pytest.mark.parametrize("z_dtype", [None, S8, F32], ids=["no_z", "z_s8", "z_f32"])
@pytest.mark.parametrize("general", [False, True], ids=["pow2", "general"])
def test_qconv_tactic_vs_reference(z_dtype: torch.dtype | None, general: bool) -> None:
    """Through a Node, as the runtime calls it: the kernel equals QConv's own compute (bit for bit with
    power-of-two scales; within a step otherwise); NCHW and channels-last inputs; new shapes; `out=`."""
    g = _gen(77 + general)
    case = GEOMETRIES[5]
    cin, cout, h, wd, k, geo = case[0], case[1], case[2], case[3], case[4], _geo(case)
    x, w = _ints(U8, (2, cin, h, wd), g), _ints(S8, (cout, cin // geo["group"], k, k), g)
    b = torch.randn(cout, generator=g) if general else _few_bits((cout,), g)
    q = _quant(U8, 99, S8, True, cout, g, pow2=not general)
    oh, ow = (_conv_out(h, k, geo["strides"][0], geo["pads"][0], geo["pads"][2], geo["dilations"][0]),
              _conv_out(wd, k, geo["strides"][1], geo["pads"][1], geo["pads"][3], geo["dilations"][1]))
    z = None if z_dtype is None else (_ints(S8, (2, cout, oh, ow), g) if z_dtype is S8
                                      else _few_bits((2, cout, oh, ow), g))
    if z_dtype is S8:
        q["z_scale"], q["z_zero_point"] = (0.25, 3) if not general else (0.0437, 3)
    node = qconv_node(x, w, b, z, q, geo, "Relu", 0, S8)
    tactic = get_tactic("cpu.qconv_dnnl")
    assert tactic.supports(node, CPU)
    kernel = tactic.make(node, {}, torch.device("cpu"))
    assert kernel.prepacked == frozenset({1, 2})
    for batch, layout in ((2, "nchw"), (2, "nhwc"), (1, "nhwc"), (3, "nchw")):
        xb = _ints(U8, (batch, cin, h, wd), g)
        zb = None if z is None else (_ints(S8, (batch, cout, oh, ow), g) if z_dtype is S8
                                     else _few_bits((batch, cout, oh, ow), g))
        want = _op_reference(node, xb, w, b, zb)
        if layout == "nhwc":
            xb, zb = _cl(xb), None if zb is None else _cl(zb)
        out = torch.empty(want.shape, dtype=S8, memory_format=torch.channels_last)
        assert kernel(xb, None, None, zb, out=out) is out
        assert_matches(out, want.double(), S8, exact=not general)
    assert kernel.fallback.reason is None  # type: ignore[union-attr]
    with pytest.raises(KilnError, match="dense destination"):
        kernel(_cl(xb), None, None, zb, out=torch.empty(want.shape, memory_format=torch.channels_last))  # float32
    with pytest.raises(KilnError, match="uint8 tensors, got torch.int8"):
        kernel(_cl(_ints(S8, (2, cin, h, wd), g)), None, None, zb)  # the node's input is uint8
    kernel.release()  # type: ignore[misc]
    with pytest.raises(KilnError, match="released"):
        kernel(_cl(_ints(U8, (4, cin, h, wd), g)), None, None, None)


@pytest.mark.parametrize("a_shape", [(5, 48), (2, 3, 48)], ids=["2d", "3d"])
@pytest.mark.parametrize("z_dtype", [None, U8, F32], ids=["no_z", "z_u8", "z_f32"])
def test_qgemm_tactic_vs_reference(a_shape: tuple[int, ...], z_dtype: torch.dtype | None) -> None:
    g = _gen(len(a_shape) * 13 + (0 if z_dtype is None else OUT_CODE[z_dtype]))
    a, w, b = _ints(S8, a_shape, g), _ints(S8, (32, 48), g), _few_bits((32,), g)
    q = _quant(S8, 0, U8, True, 32, g)
    z = None if z_dtype is None else (_ints(U8, (*a_shape[:-1], 32), g) if z_dtype is U8
                                      else _few_bits((*a_shape[:-1], 32), g))
    if z_dtype is U8:
        q["z_scale"], q["z_zero_point"] = 0.5, 128
    node = qgemm_node(a, w, b, z, q, "LeakyRelu", 1, U8)
    kernel = get_tactic("cpu.qgemm_dnnl").make(node, {}, torch.device("cpu"))
    want = _op_reference(node, a, w, b, z)
    out = torch.empty(want.shape, dtype=U8)
    assert kernel(a, None, None, z, out=out) is out
    assert_matches(out, want.double(), U8, exact=True)
    a2 = _ints(S8, (7, *a_shape[1:]), g)  # another row count: a new primitive
    z2 = None if z is None else (_ints(U8, (7, *a_shape[1:-1], 32), g) if z_dtype is U8
                                 else _few_bits((7, *a_shape[1:-1], 32), g))
    assert_matches(kernel(a2, None, None, z2), _op_reference(node, a2, w, b, z2).double(), U8, exact=True)
    kernel.release()  # type: ignore[misc]


# ---- declines, fallback and the dtype guard ---------------------------------------------------------------

def test_declines() -> None:
    """float16 outputs and residuals (no int8 kernel writes or reads them here), a zero output scale, a
    float input, an activation oneDNN cannot fuse: declined."""
    g = _gen(3)
    x, w, b = _ints(U8, (1, 8, 9, 9), g), _ints(S8, (16, 8, 3, 3), g), _few_bits((16,), g)
    q = _quant(U8, 0, S8, True, 16, g)
    t = get_tactic("cpu.qconv_dnnl")
    assert t.supports(qconv_node(x, w, b, None, q, GEO_A), CPU)
    assert not t.supports(qconv_node(x, w, b, None, {**q, "out_dtype": 10}, GEO_A, out=F16), CPU)
    assert not t.supports(qconv_node(x, w, b, None, q, GEO_A, out=U8), CPU)  # out_dtype says int8
    z16 = _few_bits((1, 16, 9, 9), g).half()
    assert not t.supports(qconv_node(x, w, b, z16, q, GEO_A), CPU)
    assert not t.supports(qconv_node(x, w, b, None, {**q, "y_scale": 0.0}, GEO_A), CPU)
    assert not t.supports(qconv_node(x.float(), w, b, None, q, GEO_A), CPU)
    assert not t.supports(qconv_node(x, w, b, None, q, GEO_A, "Softplus"), CPU)
    assert not t.supports(qconv_node(x, w, b, None, {**q, "w_scales": [0.5] * 3}, GEO_A), CPU)
    a = _ints(S8, (3, 16), g)
    assert not get_tactic("cpu.qgemm_dnnl").supports(qgemm_node(a, _ints(S8, (8, 12), g), None, None, q), CPU)


def test_reference_implementation_refused_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN has only its reference loops for int8 NCHW tensors: the primitive is refused (DnnlError). The
    tactic's channels-last primitives always get int8 kernels here, so its fallback is driven by making every
    primitive refuse the same way: the kernel then runs QConv's compute (the reason recorded), equal to the
    oracle, instead of failing."""
    g = _gen(4)
    x, w, b = _ints(S8, (2, 8, 9, 9), g), _ints(S8, (16, 8, 3, 3), g), _few_bits((16,), g)
    q = _quant(S8, 2, S8, True, 16, g)
    req = Requant((torch.tensor(q["w_scales"], dtype=torch.float64) * q["x_scale"]).float(), 2, q["y_scale"],
                  q["y_zero_point"])
    with pytest.raises(DnnlError, match="reference implementation"):
        QConvolution(library(), x, w, b, torch.empty((2, 16, 9, 9), dtype=S8), None, [1, 1], [1, 1], [1, 1], [1, 1],
                     1, req, "", 0.0, 0.0, False)
    import kiln.backends.cpu.qlayers_dnnl as qd

    def refused(*args: Any, **kwargs: Any) -> QConvolution:
        raise DnnlError("oneDNN has only its reference implementation (ref:any) here")
    monkeypatch.setattr(qd, "QConvolution", refused)
    node = qconv_node(x, w, b, None, q, GEO_A)
    kernel = get_tactic("cpu.qconv_dnnl").make(node, {}, torch.device("cpu"))
    kernel.fallback.quiet = True  # type: ignore[union-attr]
    out = torch.empty((2, 16, 9, 9), dtype=S8, memory_format=torch.channels_last)
    assert kernel(x, None, None, None, out=out) is out
    assert "reference implementation" in (kernel.fallback.reason or "")  # type: ignore[union-attr]
    assert_matches(out, oracle_qconv(x, w, b, None, q, GEO_A), S8, exact=True)
    kernel.release()  # type: ignore[misc]


def test_primitive_refuses_other_dtypes() -> None:
    """`run` checks every tensor's dtype against the primitive's (a wrong one never reaches oneDNN)."""
    g = _gen(5)
    a, w = _ints(U8, (4, 16), g), _ints(S8, (8, 16), g)
    y = torch.empty(4, 8, dtype=S8)
    prim = QMatMul(library(), a, w, None, y, None, Requant(torch.full((8,), 2.0 ** -10), 0, 0.5, 0))
    prim.run(a, y)
    assert torch.equal(y.double(), (torch.round((a.double() @ w.double().t()) * 2.0 ** -10 / 0.5)).clamp(-128, 127))
    with pytest.raises(KilnError, match="takes torch.uint8"):
        prim.run(a.view(torch.int8), y)
    with pytest.raises(KilnError, match="takes torch.int8"):
        prim.run(a, y.float())
    with pytest.raises(KilnError, match="takes 2 tensors"):
        prim.run(a, y, y)
    with pytest.raises(KilnError, match="int8/uint8 .* or float32/float16"):
        QMatMul(library(), a, w, None, y.float(), None, Requant(torch.ones(8), 0, 0.5, 0))  # float out, y_scale
    prim.close()
