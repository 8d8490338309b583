"""FP8 layers (QGemm / QConv on float8_e4m3fn): the reference compute and cpu.fp8_gemm against a float64 oracle
written here (float8 rounding by ml_dtypes, not torch), and cuda.fp8_gemm's arithmetic (torch._scaled_mm +
epilogue) run on the CPU where torch's CPU build has float8 _scaled_mm. The GPU runs of cuda.fp8_gemm are in
test_cuda_fp8_gemm.py.
"""
from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kiln.backends.cuda.fp8_gemm import CudaFp8Gemm, has_fp8_tensor_cores
from kiln.backends.fp8 import fp8_gemm_ok
from kiln.backends.tactic import TacticContext, get_tactic
from kiln.errors import KilnError
from kiln.ir.dtype import DType
from kiln.ops.registry import lookup
from tests.backends.test_cpu_tactics import CPU, make_node

F8 = torch.float8_e4m3fn
OUT = {"fp8": (17, DType.FLOAT8E4M3FN), "f32": (1, DType.FLOAT32), "f16": (10, DType.FLOAT16)}


def _f8(shape: tuple[int, ...], g: torch.Generator, scale: float) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * scale).clamp(-448, 448).to(F8)


def _oracle(x: torch.Tensor, w: torch.Tensor, attrs: dict[str, Any], b: torch.Tensor | None, z: torch.Tensor | None,
            conv: bool) -> np.ndarray:
    """float64 products (exact), the epilogue in float32 as the op's doc says, float8 rounding by ml_dtypes."""
    xd, wd = x.double(), w.double()
    if conv:
        acc = F.conv2d(xd, wd).permute(0, 2, 3, 1)  # channels last: the channel axis is the last one
    else:
        acc = xd @ wd.t()
    ws = np.asarray(attrs["w_scales"], np.float64)
    mult = (ws * attrs["x_scale"]).astype(np.float32)
    v = acc.numpy().astype(np.float32) * mult
    if b is not None:
        v = v + b.numpy()
    r = None
    if z is not None:
        zz = z.permute(0, 2, 3, 1) if conv else z
        r = zz.float().numpy() * np.float32(attrs.get("z_scale", 1.0)) if z.dtype == F8 else zz.float().numpy()
    relu = attrs.get("activation") == "Relu"
    if relu and attrs.get("act_before_add"):
        v = np.maximum(v, 0)
    if r is not None:
        v = v + r
    if relu and not attrs.get("act_before_add"):
        v = np.maximum(v, 0)
    if conv:
        v = v.transpose(0, 3, 1, 2)
    if attrs["out_dtype"] == 17:
        return np.clip(v / np.float32(attrs["y_scale"]), -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return v.astype(np.float16 if attrs["out_dtype"] == 10 else np.float32)


def _steps(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Distance in float8 steps (codes ordered through zero) between two float8 arrays."""
    def order(a: np.ndarray) -> np.ndarray:
        bits = np.asarray(a, ml_dtypes.float8_e4m3fn).view(np.uint8).astype(np.int32)
        return np.where(bits >= 128, -(bits - 128), bits)
    return np.abs(order(got) - order(want))


def _case(op: str, seed: int, per_channel: bool, out: str = "fp8", bias: bool = True, act: str = "Relu",
          z: str | None = None, act_first: bool = False, m: int = 24, k: int = 64, n: int = 48,
          lead: tuple[int, ...] = ()) -> tuple[Any, list[Any], dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    conv = op == "QConv"
    x = _f8((2, k, 5, 3) if conv else (*lead, m, k), g, 6.0)
    w = _f8((n, k, 1, 1) if conv else (n, k), g, 3.0)
    b = torch.randn(n, generator=g) if bias else None
    ws = (torch.rand(n, generator=g) * 0.04 + 0.01).tolist() if per_channel else [0.02]
    attrs: dict[str, Any] = {"x_scale": 0.03, "w_scales": ws, "out_dtype": OUT[out][0], "activation": act,
                             "act_before_add": int(act_first)}
    out_shape = (2, n, 5, 3) if conv else (*lead, m, n)
    zt = None
    if z is not None:
        zt = _f8(out_shape, g, 50.0) if z == "fp8" else torch.randn(out_shape, generator=g) * 2
        attrs["z_scale"] = 0.05
    # an output scale that spreads values over the float8 range and saturates the largest few
    probe = dict(attrs, out_dtype=1)
    v = np.abs(_oracle(x, w.reshape(n, k, 1, 1) if conv else w, probe, b, zt, conv)).max()
    attrs["y_scale"] = float(v / 520.0)
    ins = [(x, False), (w, True), (b, True), (zt, False)]
    while ins[-1][0] is None:
        ins.pop()
    node = make_node(op, ins, out_shape, attrs, domain="kiln", opset=1, out_dtype=OUT[out][1])
    return node, [t for t, _ in ins], attrs


def _check(got: torch.Tensor, x: list[Any], attrs: dict[str, Any], op: str, exact: bool) -> None:
    b = x[2] if len(x) > 2 else None
    z = x[3] if len(x) > 3 else None
    want = _oracle(x[0], x[1], attrs, b, z, op == "QConv")
    assert tuple(got.shape) == want.shape
    if attrs["out_dtype"] == 17:
        assert got.dtype == F8
        d = _steps(got.float().numpy().astype(ml_dtypes.float8_e4m3fn), want)
        assert d.max() <= (0 if exact else 1), d.max()
        assert (d == 0).mean() >= 0.97, (d == 0).mean()
        vals = np.abs(want.astype(np.float32))
        assert (vals == 448).any() and (vals[vals < 448] > 8).mean() > 0.3  # saturated and spread, not constant
    else:
        tol = 0 if exact else (2e-3 if attrs["out_dtype"] == 10 else 1e-5)
        np.testing.assert_allclose(got.float().numpy(), want.astype(np.float32), rtol=tol, atol=tol * 10)


CASES = [
    dict(op="QGemm", per_channel=True),
    dict(op="QGemm", per_channel=False, z="fp8"),
    dict(op="QGemm", per_channel=True, z="f32", act_first=True, lead=(3,)),
    dict(op="QGemm", per_channel=False, bias=False, act="", out="f32"),
    dict(op="QGemm", per_channel=True, out="f16", n=40),
    dict(op="QConv", per_channel=True, z="fp8"),
    dict(op="QConv", per_channel=False, out="f32"),
    dict(op="QConv", per_channel=False, out="f32", bias=False, act="", n=40),
    dict(op="QGemm", per_channel=False, out="f32", bias=False, act="", n=40),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_reference_is_exact(case: dict[str, Any]) -> None:
    node, args, attrs = _case(seed=1, **case)
    got = lookup(node.op_type, "kiln").compute(node, *args)
    _check(got, args, attrs, node.op_type, exact=True)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_cpu_fp8_gemm(case: dict[str, Any]) -> None:
    node, args, attrs = _case(seed=2, **case)
    tactic = get_tactic("cpu.fp8_gemm")
    assert tactic is not None and tactic.supports(node, CPU)
    kernel = tactic.make(node, {}, torch.device("cpu"))
    x = args[0].float().contiguous(memory_format=torch.channels_last).to(F8) if node.op_type == "QConv" else args[0]
    got = kernel(x, None, None, *args[3:])
    _check(got, args, attrs, node.op_type, exact=False)


def _cpu_scaled_mm() -> bool:
    try:
        one = torch.ones(())
        torch._scaled_mm(torch.ones(16, 16).to(F8), torch.ones(16, 16).to(F8).t(), scale_a=one, scale_b=one,
                         out_dtype=torch.float32)
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _cpu_scaled_mm(), reason="this torch build has no float8 torch._scaled_mm on the CPU")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("fast", [False, True])
def test_cuda_fp8_gemm_arithmetic_on_cpu(case: dict[str, Any], fast: bool) -> None:
    """cuda.fp8_gemm's kernel (torch._scaled_mm with the per-tensor multiplier as scale_a, N padded to 16, the
    torch epilogue) built on the CPU, where torch also implements float8 _scaled_mm."""
    node, args, attrs = _case(seed=3, **case)
    kernel = CudaFp8Gemm().make(node, {"fast_accum": fast}, torch.device("cpu"))
    got = kernel(args[0], None, None, *args[3:])
    _check(got, args, attrs, node.op_type, exact=False)


def test_declines() -> None:
    node, _, _ = _case("QGemm", 4, True)
    assert not CudaFp8Gemm().supports(node, CPU) and not has_fp8_tensor_cores(torch.device("cpu"))
    assert not CudaFp8Gemm().supports(node, TacticContext(torch.device("cuda")))  or has_fp8_tensor_cores(
        torch.device("cuda"))
    odd, _, _ = _case("QGemm", 4, True, k=40)  # K not a multiple of 16: cuBLASLt refuses, X is not padded
    assert fp8_gemm_ok(odd) and not CudaFp8Gemm().supports(odd, TacticContext(torch.device("cuda")))
    node3, _, _ = _case("QConv", 4, True)
    node3.inputs[1].const = _f8((48, 64, 3, 3), torch.Generator().manual_seed(0), 2.0)
    assert not fp8_gemm_ok(node3)  # a 3x3 conv is no GEMM: it stays float between its Q/DQ nodes
    strided, _, _ = _case("QConv", 4, True)
    strided.attrs["strides"] = [2, 2]
    assert not fp8_gemm_ok(strided)
    mid, _, _ = _case("QGemm", 4, True)
    mid.attrs["a_scale"] = 0.5
    assert not fp8_gemm_ok(mid)


@pytest.mark.parametrize("change, msg", [
    ({"x_zero_point": 3}, "x_zero_point must be 0"),
    ({"y_zero_point": -1}, "y_zero_point must be 0"),
])
def test_reference_refuses_fp8_zero_points(change: dict[str, Any], msg: str) -> None:
    node, args, _ = _case("QGemm", 5, True)
    node.attrs.update(change)
    assert not fp8_gemm_ok(node)
    with pytest.raises(KilnError, match=msg):
        lookup("QGemm", "kiln").compute(node, *args)


def test_reference_refuses_mixed_element_types() -> None:
    node, args, _ = _case("QGemm", 6, False)
    with pytest.raises(KilnError, match="float8_e4m3fn weights"):
        lookup("QGemm", "kiln").compute(node, args[0], torch.ones(48, 64, dtype=torch.int8), *args[2:])
