"""cpu.pool_dnnl and cpu.linear_dnnl (oneDNN primitives through ctypes) against the ops' reference compute."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from kiln.backends.cpu.dnnl import library
from kiln.backends.tactic import get_tactic
from kiln.errors import KilnError
from kiln.ops.registry import lookup
from tests.backends.test_cpu_tactics import ACTS, CPU, TOL, make_node, rel_err, run_both

pytestmark = pytest.mark.skipif(library() is None,
                                reason="the oneDNN library (pip install onednn-cpu-gomp) is not installed")


def _rand(*shape: int, seed: int, channels_last: bool = True) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize("k, s, pads, ceil, include_pad", [
    (3, 2, [1, 1, 1, 1], 0, 0), (2, 2, [0, 0, 0, 0], 0, 0), (3, 1, [1, 1, 1, 1], 0, 1), (3, 2, [0, 1, 1, 0], 0, 1),
    (3, 2, [0, 0, 0, 0], 1, 0), (3, 2, [1, 1, 1, 1], 1, 1), (5, 3, [2, 2, 2, 2], 0, 0)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pool(op: str, k: int, s: int, pads: list[int], ceil: int, include_pad: int, channels_last: bool) -> None:
    x = _rand(2, 8, 13, 12, seed=k * 10 + s, channels_last=channels_last)
    attrs: dict[str, Any] = {"kernel_shape": [k, k], "strides": [s, s], "pads": pads, "ceil_mode": ceil}
    if op == "AveragePool":
        attrs["count_include_pad"] = include_pad
    node = make_node(op, [(x, False)], None, attrs, opset=19)
    tactic = get_tactic("cpu.pool_dnnl")
    if not tactic.supports(node, CPU):  # only an AveragePool whose ceil mode extends past the pads
        assert op == "AveragePool" and ceil
        return
    got, want = run_both(node, "cpu.pool_dnnl", [x])
    assert rel_err(got, want) <= TOL and got.is_contiguous(memory_format=torch.channels_last)


def test_maxpool_new_shapes_and_destination() -> None:
    x = _rand(1, 16, 15, 14, seed=1)
    dilated = make_node("MaxPool", [(x, False)], None, {"kernel_shape": [3, 3], "dilations": [2, 2]}, opset=19)
    assert not get_tactic("cpu.pool_dnnl").supports(dilated, CPU)  # oneDNN has only its reference loops for it
    node = make_node("MaxPool", [(x, False)], None, {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
                     opset=19)
    kernel = get_tactic("cpu.pool_dnnl").make(node, {}, torch.device("cpu"))
    ref = lookup("MaxPool", "").compute
    for shape in ((1, 16, 15, 14), (3, 16, 11, 17), (1, 16, 15, 14)):  # a primitive per shape, then a cache hit
        x = _rand(*shape, seed=sum(shape))
        want = ref(node, x)
        out = torch.full(want.shape, float("nan")).contiguous(memory_format=torch.channels_last)
        assert kernel(x, out=out) is out
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    with pytest.raises(KilnError, match="dense destination of shape"):
        kernel(x, out=torch.empty(want.shape))  # NCHW, not channels-last


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8])
@pytest.mark.parametrize("k, s, pads", [(3, 2, [1, 1, 1, 1]), (2, 2, [0, 0, 0, 0]), (3, 2, [0, 1, 1, 0])])
def test_maxpool_8bit_exact(dtype: torch.dtype, k: int, s: int, pads: list[int]) -> None:
    """An INT8 plan's max pool on its 8-bit activations, the type's lowest values next to the padding: exact."""
    from kiln.ir.dtype import DType
    lo, hi = (-128, 128) if dtype == torch.int8 else (0, 256)
    x = torch.randint(lo, hi, (2, 16, 11, 12), generator=torch.Generator().manual_seed(k + s)).to(dtype)
    x[0, :, :2] = lo
    x = x.contiguous(memory_format=torch.channels_last)
    node = make_node("MaxPool", [(x, False)], None, {"kernel_shape": [k, k], "strides": [s, s], "pads": pads},
                     opset=19, out_dtype=DType.from_torch(dtype))
    got, want = run_both(node, "cpu.pool_dnnl", [x])
    assert got.dtype == dtype and torch.equal(got, want)
    avg = make_node("AveragePool", [(x, False)], None, {"kernel_shape": [k, k]}, opset=19,
                    out_dtype=DType.from_torch(dtype))
    assert not get_tactic("cpu.pool_dnnl").supports(avg, CPU)  # an 8-bit mean would need its own rounding


@pytest.mark.parametrize("op, keep", [("GlobalAveragePool", 1), ("GlobalMaxPool", 1), ("ReduceMean", 0),
                                      ("ReduceMean", 1)])
def test_global_pools(op: str, keep: int) -> None:
    x = _rand(2, 32, 7, 5, seed=3)
    attrs = {"axes": [2, 3], "keepdims": keep} if op == "ReduceMean" else {}
    node = make_node(op, [(x, False)], None, attrs, opset=17)
    got, want = run_both(node, "cpu.pool_dnnl", [x])
    assert got.shape == want.shape and rel_err(got, want) <= TOL
    other = make_node("ReduceMean", [(x, False)], None, {"axes": [1, 2]}, opset=17)
    assert not get_tactic("cpu.pool_dnnl").supports(other, CPU)


PRIMS = [{}, {"prim": "matmul"}]  # oneDNN's inner product and its matmul primitive (configs of cpu.linear_dnnl)


@pytest.mark.parametrize("act", ACTS, ids=lambda a: f"{a[0] or 'none'}{a[1]:g}")
@pytest.mark.parametrize("rows, bias", [(1, True), (5, False)])
@pytest.mark.parametrize("prim", PRIMS, ids=["ip", "matmul"])
def test_fused_gemm(act: tuple[str, float, float], rows: int, bias: bool, prim: dict[str, str]) -> None:
    gen = torch.Generator().manual_seed(11)
    a, w, b = torch.randn(rows, 64, generator=gen), torch.randn(48, 64, generator=gen) / 8, torch.randn(48, generator=gen)
    attrs = {"activation": act[0], "alpha": act[1], "beta": act[2], "act_before_add": 0}
    node = make_node("FusedGemm", [(a, False), (w, True), (b if bias else None, True)], (rows, 48), attrs,
                     domain="kiln")
    assert prim in get_tactic("cpu.linear_dnnl").configs(node, CPU)
    got, want = run_both(node, "cpu.linear_dnnl", [a, w, b if bias else None], prim)
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("act", [ACTS[0], ACTS[1], ACTS[5]], ids=lambda a: a[0] or "none")
@pytest.mark.parametrize("before_add", [0, 1])
@pytest.mark.parametrize("prim", PRIMS, ids=["ip", "matmul"])
def test_fused_gemm_residual(act: tuple[str, float, float], before_add: int, prim: dict[str, str]) -> None:
    gen = torch.Generator().manual_seed(12)
    a, w, b, z = (torch.randn(s, generator=gen) for s in ((4, 32), (24, 32), (24,), (4, 24)))
    attrs = {"activation": act[0], "alpha": act[1], "beta": act[2], "act_before_add": before_add}
    node = make_node("FusedGemm", [(a, False), (w, True), (b, True), (z, False)], (4, 24), attrs, domain="kiln")
    got, want = run_both(node, "cpu.linear_dnnl", [a, w, b, z], prim)
    assert rel_err(got, want) <= TOL
    broadcast = make_node("FusedGemm", [(a, False), (w, True), (b, True), (z[:1], False)], (4, 24), attrs,
                          domain="kiln")
    assert not get_tactic("cpu.linear_dnnl").supports(broadcast, CPU)


@pytest.mark.parametrize("trans_b, alpha, beta, c_shape", [(1, 1.0, 1.0, (24,)), (0, 0.5, 2.0, (1, 24)),
                                                            (1, 2.0, 1.0, None)])
def test_gemm_and_matmul(trans_b: int, alpha: float, beta: float, c_shape: tuple[int, ...] | None) -> None:
    gen = torch.Generator().manual_seed(13)
    a = torch.randn((3, 32), generator=gen)
    bm = torch.randn((24, 32) if trans_b else (32, 24), generator=gen)
    c = torch.randn(c_shape, generator=gen) if c_shape is not None else None
    node = make_node("Gemm", [(a, False), (bm, True), (c, True)], (3, 24),
                     {"transB": trans_b, "alpha": alpha, "beta": beta})
    got, want = run_both(node, "cpu.linear_dnnl", [a, bm, c])
    assert rel_err(got, want) <= TOL
    mm = make_node("MatMul", [(a, False), (torch.randn(32, 20, generator=gen), True)], (3, 20), {})
    got, want = run_both(mm, "cpu.linear_dnnl", [a, mm.inputs[1].const])
    assert rel_err(got, want) <= TOL
    x3 = torch.randn(2, 3, 32, generator=gen)
    three_d = make_node("MatMul", [(x3, False), (mm.inputs[1].const, True)], (2, 3, 20), {})
    got, want = run_both(three_d, "cpu.linear_dnnl", [x3, mm.inputs[1].const])  # rows flattened, shape kept
    assert got.shape == (2, 3, 20) and rel_err(got, want) <= TOL
    gemm3 = make_node("Gemm", [(x3, False), (bm, True), (c, True)], (2, 3, 24), {"transB": trans_b})
    assert not get_tactic("cpu.linear_dnnl").supports(gemm3, CPU)  # Gemm is 2-D by definition


@pytest.mark.parametrize("act", [ACTS[0], ACTS[1]], ids=lambda a: a[0] or "none")
def test_fused_gemm_over_nd_rows_with_residual_and_destination(act: tuple[str, float, float]) -> None:
    """ConvNeXt's / BERT's linear layers: [N, H, W, C] (or [B, S, C]) rows, a residual of the output's shape,
    other leading shapes (dynamic dims without a residual), and a contiguous destination (the arena slot of a
    row-major kernel)."""
    gen = torch.Generator().manual_seed(14)
    a, w, b = torch.randn(2, 5, 7, 32, generator=gen), torch.randn(24, 32, generator=gen) / 6, torch.randn(24, generator=gen)
    z = torch.randn(2, 5, 7, 24, generator=gen)
    attrs = {"activation": act[0], "alpha": act[1], "beta": act[2], "act_before_add": 0}
    node = make_node("FusedGemm", [(a, False), (w, True), (b, True), (z, False)], (2, 5, 7, 24), attrs, domain="kiln")
    got, want = run_both(node, "cpu.linear_dnnl", [a, w, b, z])
    assert got.shape == want.shape and rel_err(got, want) <= TOL
    dyn = make_node("FusedGemm", [(a, False), (w, True), (b, True)], ("N", "H", 7, 24), attrs, domain="kiln",
                    shapes={0: ("N", "H", 7, 32)})
    kernel = get_tactic("cpu.linear_dnnl").make(dyn, {}, torch.device("cpu"))
    for n in (1, 3):  # other leading shapes, into a given destination
        a2 = torch.randn(n, 4, 7, 32, generator=gen)
        out = torch.empty(n, 4, 7, 24)
        assert kernel(a2, None, None, out=out) is out
        assert rel_err(out, lookup("FusedGemm", "kiln").compute(dyn, a2, w, b)) <= TOL
    other = make_node("FusedGemm", [(a, False), (w, True), (b, True), (z, False)], ("N", "H", 7, 24), attrs,
                      domain="kiln", shapes={0: ("N", "H", 7, 32), 3: ("N", "H", 7, 24)})
    t = get_tactic("cpu.linear_dnnl")
    assert t.supports(other, CPU)  # a residual whose dims are the output's, symbol by symbol (BERT's dynamic rows)
    kz = t.make(other, {}, torch.device("cpu"))
    for n in (1, 3):
        a3, z3 = torch.randn(n, 4, 7, 32, generator=gen), torch.randn(n, 4, 7, 24, generator=gen)
        assert rel_err(kz(a3, None, None, z3), lookup("FusedGemm", "kiln").compute(other, a3, w, b, z3)) <= TOL
    unsure = make_node("FusedGemm", [(a, False), (w, True), (b, True), (z, False)], ("N", "H", 7, 24), attrs,
                       domain="kiln", shapes={0: ("N", "H", 7, 32), 3: ("N", "M", 7, 24)})
    assert not t.supports(unsure, CPU)  # a residual whose dims are not known to be the output's
