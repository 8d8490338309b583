"""CPU tactics against the ops' reference compute on random inputs (float32, normwise rel err <= 1e-4)."""
from __future__ import annotations


from typing import Any

import numpy as np
import pytest
import torch

from kiln.backends.cpu.common import onednn_available
from kiln.backends.cpu.dnnl import library as dnnl_library
from kiln.backends.tactic import TacticContext, candidate_tactics, get_tactic
from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Value
from kiln.ir.types import TensorType
from kiln.ops.registry import lookup

pytestmark = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")
CPU = TacticContext(torch.device("cpu"))
TOL = 1e-4
ACTS = [("", 0.0, 0.0), ("Relu", 0.0, 0.0), ("LeakyRelu", 0.1, 0.0), ("Clip", 0.0, 6.0), ("Clip", -1.0, 1.5),
        ("Sigmoid", 0.0, 0.0), ("Tanh", 0.0, 0.0), ("SiLU", 0.0, 0.0), ("HardSwish", 0.0, 0.0),
        ("HardSigmoid", 0.2, 0.5), ("HardSigmoid", 1 / 6, 0.5), ("Mish", 0.0, 0.0), ("Gelu", 0.0, 0.0),
        ("GeluTanh", 0.0, 0.0)]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    g, w = got.double(), want.double()
    assert g.shape == w.shape, (g.shape, w.shape)
    return float((g - w).abs().max() / max(float(w.abs().max()), 1e-30))


def _val(name: str, t: torch.Tensor | None, const: bool, shape: Any = None) -> Value | None:
    if t is None:
        return None
    if const:
        return Value(name, const=t)
    return Value(name, TensorType(DType.from_torch(t.dtype), tuple(shape if shape is not None else t.shape)))


def make_node(op: str, ins: list[tuple[torch.Tensor | None, bool]], out_shape: Any, attrs: dict[str, Any],
              domain: str = "", opset: int = 17, shapes: dict[int, Any] | None = None,
              out_dtype: DType = DType.FLOAT32) -> Node:
    shapes = shapes or {}
    values = [_val(f"in{i}", t, c, shapes.get(i)) for i, (t, c) in enumerate(ins)]
    out = Value("out", TensorType(out_dtype, tuple(out_shape) if out_shape is not None else None))
    return Node(op, values, [out], attrs, name=f"{op}_test", domain=domain, opset=opset)


def run_both(node: Node, tactic_id: str, args: list[Any], config: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """(tactic result, reference result); the tactic gets None for the inputs it prepacks, like the runtime."""
    tactic = get_tactic(tactic_id)
    assert tactic is not None
    assert tactic.supports(node, CPU), f"{tactic_id} declines {node.op_type} {node.attrs}"
    cfg = config if config is not None else tactic.configs(node, CPU)[0]
    kernel = tactic.make(node, cfg, torch.device("cpu"))
    own = kernel.prepacked
    saved = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    got = kernel(*[None if i in own else a for i, a in enumerate(args)])
    for a, s in zip(args, saved):  # kernels never write into their inputs
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, s, rtol=0, atol=0, equal_nan=True)
    want = lookup(node.op_type, node.domain).compute(node, *args)
    return got, want


def _conv_out(h: int, k: int, s: int, p0: int, p1: int, d: int) -> int:
    return (h + p0 + p1 - d * (k - 1) - 1) // s + 1


# ---- convolution ----------------------------------------------------------------------------------

CONV_CASES = [  # cin, cout, hw, k, stride, pads(b_h, b_w, e_h, e_w), dilation, group, bias
    (8, 16, 9, 3, 1, (1, 1, 1, 1), 1, 1, True),
    (8, 16, 10, 3, 2, (1, 1, 1, 1), 1, 1, False),
    (6, 12, 11, 3, 2, (0, 1, 1, 2), 1, 1, True),  # asymmetric
    (8, 8, 12, 3, 1, (1, 1, 1, 1), 1, 8, True),  # depthwise
    (8, 12, 9, 3, 1, (2, 2, 2, 2), 2, 2, True),  # dilated, grouped
    (3, 16, 15, 7, 2, (3, 3, 3, 3), 1, 1, True),  # stem
    (16, 32, 7, 1, 1, (0, 0, 0, 0), 1, 1, True),  # 1x1
    (16, 8, 8, 1, 2, (0, 0, 0, 0), 1, 1, False),  # strided 1x1
]


def _conv_inputs(case: tuple[Any, ...], seed: int, batch: int = 1) -> tuple[torch.Tensor, ...]:
    cin, cout, hw, k, s, pads, d, g, bias = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, cin, hw, hw), generator=gen)
    w = torch.randn((cout, cin // g, k, k), generator=gen) / (cin // g * k * k) ** 0.5
    b = torch.randn((cout,), generator=gen) * 0.1 if bias else None
    oh = _conv_out(hw, k, s, pads[0], pads[2], d)
    ow = _conv_out(hw, k, s, pads[1], pads[3], d)
    z = torch.randn((batch, cout, oh, ow), generator=gen)
    return x, w, b, z


def _fused_conv(case: tuple[Any, ...], x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, z: torch.Tensor | None,
                act: tuple[str, float, float], before_add: int, x_shape: Any = None) -> Node:
    _, cout, _, _, s, pads, d, g, _ = case
    attrs = {"strides": [s, s], "pads": list(pads), "dilations": [d, d], "group": g, "activation": act[0],
             "alpha": act[1], "beta": act[2], "act_before_add": before_add}
    out = list(x.shape[:1]) + [cout] + [_conv_out(x.shape[2], w.shape[2], s, pads[0], pads[2], d),
                                        _conv_out(x.shape[3], w.shape[3], s, pads[1], pads[3], d)]
    ins: list[tuple[Any, bool]] = [(x, False), (w, True), (b, True)]
    if z is not None:
        ins.append((z, False))
    return make_node("FusedConv", ins, out, attrs, domain="kiln", shapes={0: x_shape} if x_shape else None)


CONV_TACTICS = ["cpu.conv_onednn",
                pytest.param("cpu.conv_dnnl", marks=pytest.mark.skipif(
                    dnnl_library() is None, reason="the oneDNN library (pip install onednn-cpu-gomp) is not installed"))]


@pytest.mark.parametrize("tactic", CONV_TACTICS)
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("act", ACTS, ids=lambda a: f"{a[0] or 'none'}{a[1]:g}")
def test_fused_conv_activations(tactic: str, case: tuple[Any, ...], act: tuple[str, float, float]) -> None:
    x, w, b, _ = _conv_inputs(case, 0)
    node = _fused_conv(case, x, w, b, None, act, 0)
    got, want = run_both(node, tactic, [x, w, b])
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("tactic", CONV_TACTICS)
@pytest.mark.parametrize("case", CONV_CASES[:4] + CONV_CASES[6:])
@pytest.mark.parametrize("act", [ACTS[0], ACTS[1], ACTS[2], ACTS[5], ACTS[12]], ids=lambda a: a[0] or "none")
@pytest.mark.parametrize("before_add", [0, 1])
def test_fused_conv_residual(tactic: str, case: tuple[Any, ...], act: tuple[str, float, float], before_add: int) -> None:
    x, w, b, z = _conv_inputs(case, 1)
    node = _fused_conv(case, x, w, b, z, act, before_add)
    got, want = run_both(node, tactic, [x, w, b, z])
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("input_cl", [False, True])
def test_fused_conv_layouts(layout: str, input_cl: bool) -> None:
    case = CONV_CASES[0]
    x, w, b, z = _conv_inputs(case, 2)
    if input_cl:
        x, z = x.contiguous(memory_format=torch.channels_last), z.contiguous(memory_format=torch.channels_last)
    node = _fused_conv(case, x, w, b, z, ("Relu", 0.0, 0.0), 0)
    got, want = run_both(node, "cpu.conv_onednn", [x, w, b, z], {"layout": layout})
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("tactic", CONV_TACTICS)
def test_fused_conv_dynamic_batch(tactic: str) -> None:
    case = CONV_CASES[1]
    x, w, b, z = _conv_inputs(case, 3, batch=3)
    node = _fused_conv(case, x, w, b, z, ("Relu", 0.0, 0.0), 0, x_shape=("N",) + tuple(x.shape[1:]))
    node.inputs[3].type = TensorType(DType.FLOAT32, ("N",) + tuple(z.shape[1:]))  # type: ignore[union-attr]
    got, want = run_both(node, tactic, [x, w, b, z])
    assert rel_err(got, want) <= TOL
    kernel = get_tactic(tactic).make(node, get_tactic(tactic).configs(node, CPU)[0], torch.device("cpu"))
    for n in (1, 2):  # another batch size through the same kernel (a new primitive for the dnnl tactic)
        xs, zs = x[:n].contiguous(), z[:n].contiguous()
        got = kernel(xs, None, None, zs)
        assert rel_err(got, lookup("FusedConv", "kiln").compute(node, xs, w, b, zs)) <= TOL


@pytest.mark.parametrize("act", ACTS, ids=lambda a: f"{a[0] or 'none'}{a[1]:g}")
@pytest.mark.parametrize("batch", [1, 2])
def test_pointwise_conv_as_gemm(act: tuple[str, float, float], batch: int) -> None:
    case = CONV_CASES[6]
    x, w, b, _ = _conv_inputs(case, 9, batch=batch)
    node = _fused_conv(case, x, w, b, None, act, 0)
    tactic = get_tactic("cpu.conv_onednn")
    cfgs = tactic.configs(node, CPU)
    from kiln.backends.cpu.common import onednn_unary
    assert (cfgs[0].get("algo") == "gemm") == (onednn_unary(*act) is not None)
    got, want = run_both(node, "cpu.conv_onednn", [x, w, b], {"layout": "nhwc", "algo": "gemm"})
    assert rel_err(got, want) <= TOL
    assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[2], CONV_CASES[6]])
@pytest.mark.parametrize("act", [ACTS[0], ACTS[1], ACTS[5]], ids=lambda a: a[0] or "none")
@pytest.mark.parametrize("z_cl", [True, False])
def test_fused_conv_inplace_residual(case: tuple[Any, ...], act: tuple[str, float, float], z_cl: bool) -> None:
    x, w, b, z = _conv_inputs(case, 10)
    if z_cl:
        z = z.contiguous(memory_format=torch.channels_last)
    node = _fused_conv(case, x, w, b, z, act, 0)
    want = lookup("FusedConv", "kiln").compute(node, x, w, b, z)
    if z_cl:  # the node attribute a liveness pass would set
        node.attrs["kiln_z_donate"] = 1
        config: dict[str, Any] = {"layout": "nhwc"}
    else:
        config = {"layout": "nhwc", "inplace_z": True}
    kernel = get_tactic("cpu.conv_onednn").make(node, config, torch.device("cpu"))
    got = kernel(x, None, None, z)
    assert rel_err(got, want) <= TOL
    if z_cl:  # the result lives in Z's buffer
        assert got.data_ptr() == z.data_ptr()


def test_fused_conv_inplace_residual_never_writes_into_a_view() -> None:
    case = CONV_CASES[6]
    x, w, b, z = _conv_inputs(case, 11)
    base = torch.cat([z, z], 0).contiguous(memory_format=torch.channels_last)
    view, saved = base[1:], base.clone()
    node = _fused_conv(case, x, w, b, view, ("Relu", 0.0, 0.0), 0)
    want = lookup("FusedConv", "kiln").compute(node, x, w, b, view)
    kernel = get_tactic("cpu.conv_onednn").make(node, {"layout": "nhwc", "inplace_z": True}, torch.device("cpu"))
    assert rel_err(kernel(x, None, None, view), want) <= TOL
    assert torch.equal(base, saved)


@pytest.mark.parametrize("auto_pad", ["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("stride, k", [(1, 3), (2, 3), (2, 4)])
def test_plain_conv(auto_pad: str, stride: int, k: int) -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn((2, 4, 10, 9), generator=gen)
    w = torch.randn((6, 4, k, k), generator=gen)
    attrs: dict[str, Any] = {"strides": [stride, stride], "auto_pad": auto_pad}
    if auto_pad == "NOTSET":
        attrs["pads"] = [1, 0, 2, 1]
    node = make_node("Conv", [(x, False), (w, True)], None, attrs)
    got, want = run_both(node, "cpu.conv_onednn", [x, w])
    assert rel_err(got, want) <= TOL


def test_conv_declines() -> None:
    x = torch.randn(1, 4, 8)  # 1-D conv
    w = torch.randn(4, 4, 3)
    assert not get_tactic("cpu.conv_onednn").supports(make_node("Conv", [(x, False), (w, True)], None, {}), CPU)
    x4 = torch.randn(1, 4, 8, 8)
    w4 = torch.randn(4, 4, 3, 3)
    runtime_w = make_node("Conv", [(x4, False), (w4, False)], None, {})
    assert not get_tactic("cpu.conv_onednn").supports(runtime_w, CPU)
    half = make_node("Conv", [(x4.half(), False), (w4.half(), True)], None, {})
    assert not get_tactic("cpu.conv_onednn").supports(half, CPU)
    node = make_node("Conv", [(x4, False), (w4, True)], None, {})
    assert not get_tactic("cpu.conv_onednn").supports(node, TacticContext(torch.device("cuda")))
    ids = [t.id for t in candidate_tactics(node, CPU)]
    assert "cpu.conv_onednn" in ids and ids[-1] == "ref"
    assert ("cpu.conv_dnnl" in ids) == (dnnl_library() is not None)
    for tid in ("cpu.conv_onednn", "cpu.conv_dnnl"):
        assert not get_tactic(tid).supports(half, CPU) and not get_tactic(tid).supports(runtime_w, CPU)


# ---- linear layers --------------------------------------------------------------------------------

@pytest.mark.parametrize("a_shape", [(1, 64), (5, 64), (2, 3, 64)])
@pytest.mark.parametrize("act", ACTS, ids=lambda a: f"{a[0] or 'none'}{a[1]:g}")
@pytest.mark.parametrize("bias", [True, False])
def test_fused_gemm(a_shape: tuple[int, ...], act: tuple[str, float, float], bias: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(a_shape, generator=gen)
    w = torch.randn((48, 64), generator=gen) / 8
    b = torch.randn((48,), generator=gen) if bias else None
    attrs = {"activation": act[0], "alpha": act[1], "beta": act[2], "act_before_add": 0}
    node = make_node("FusedGemm", [(a, False), (w, True), (b, True)], a_shape[:-1] + (48,), attrs, domain="kiln")
    got, want = run_both(node, "cpu.linear_onednn", [a, w, b])
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("act", [ACTS[0], ACTS[1], ACTS[5]], ids=lambda a: a[0] or "none")
@pytest.mark.parametrize("before_add", [0, 1])
def test_fused_gemm_residual(act: tuple[str, float, float], before_add: int) -> None:
    gen = torch.Generator().manual_seed(6)
    a, w, b, z = (torch.randn(s, generator=gen) for s in ((4, 32), (24, 32), (24,), (4, 24)))
    attrs = {"activation": act[0], "alpha": act[1], "beta": act[2], "act_before_add": before_add}
    node = make_node("FusedGemm", [(a, False), (w, True), (b, True), (z, False)], (4, 24), attrs, domain="kiln")
    got, want = run_both(node, "cpu.linear_onednn", [a, w, b, z])
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("trans_b, alpha, beta, c_shape", [
    (1, 1.0, 1.0, (24,)), (0, 0.5, 2.0, (1, 24)), (1, 1.0, 1.0, None), (0, 1.0, 0.5, ()), (1, 2.0, 1.0, (1,))])
def test_gemm(trans_b: int, alpha: float, beta: float, c_shape: tuple[int, ...] | None) -> None:
    gen = torch.Generator().manual_seed(7)
    a = torch.randn((3, 32), generator=gen)
    bm = torch.randn((24, 32) if trans_b else (32, 24), generator=gen)
    c = torch.randn(c_shape, generator=gen) if c_shape is not None else None
    node = make_node("Gemm", [(a, False), (bm, True), (c, True)], (3, 24),
                     {"transB": trans_b, "alpha": alpha, "beta": beta})
    got, want = run_both(node, "cpu.linear_onednn", [a, bm, c])
    assert rel_err(got, want) <= TOL


def test_gemm_declines_full_c_and_trans_a() -> None:
    a, bm = torch.randn(3, 32), torch.randn(32, 24)
    full_c = make_node("Gemm", [(a, False), (bm, True), (torch.randn(3, 24), True)], (3, 24), {})
    assert not get_tactic("cpu.linear_onednn").supports(full_c, CPU)
    trans_a = make_node("Gemm", [(a.t().contiguous(), False), (bm, True)], (3, 24), {"transA": 1})
    assert not get_tactic("cpu.linear_onednn").supports(trans_a, CPU)


@pytest.mark.parametrize("a_shape", [(4, 32), (2, 5, 32)])
def test_matmul_const_weight(a_shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(8)
    a, bm = torch.randn(a_shape, generator=gen), torch.randn((32, 20), generator=gen)
    node = make_node("MatMul", [(a, False), (bm, True)], a_shape[:-1] + (20,), {})
    got, want = run_both(node, "cpu.linear_onednn", [a, bm])
    assert rel_err(got, want) <= TOL


# ---- pooling --------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize("k, s, pads, ceil, include_pad", [
    (3, 2, [1, 1, 1, 1], 0, 0), (2, 2, [0, 0, 0, 0], 0, 0), (3, 2, [0, 0, 0, 0], 1, 0), (3, 1, [1, 1, 1, 1], 0, 1),
    (3, 2, [1, 1, 1, 1], 1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pool(op: str, k: int, s: int, pads: list[int], ceil: int, include_pad: int, channels_last: bool) -> None:
    x = torch.randn(2, 8, 13, 12)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    attrs: dict[str, Any] = {"kernel_shape": [k, k], "strides": [s, s], "pads": pads, "ceil_mode": ceil}
    if op == "AveragePool":
        attrs["count_include_pad"] = include_pad
    node = make_node(op, [(x, False)], None, attrs, opset=19)
    got, want = run_both(node, "cpu.pool", [x])
    assert rel_err(got, want) <= TOL
    if channels_last:
        assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kernel, strides, pads", [
    ([3, 3], [2, 2], [1, 1, 1, 1]), ([5, 5], [2, 2], [2, 2, 2, 2]), ([3, 3], [1, 1], [1, 1, 1, 1]),
    ([3, 2], [3, 1], [0, 0, 0, 0]), ([4, 4], [3, 3], [1, 1, 1, 1]), ([1, 3], [1, 2], [0, 1, 0, 1])])
@pytest.mark.parametrize("algo", ["separable", "aten"])
def test_maxpool_algorithms(kernel: list[int], strides: list[int], pads: list[int], algo: str) -> None:
    x = torch.randn(2, 8, 15, 14).contiguous(memory_format=torch.channels_last)
    node = make_node("MaxPool", [(x, False)], None, {"kernel_shape": kernel, "strides": strides, "pads": pads},
                     opset=19)
    assert {"algo": algo} in get_tactic("cpu.pool").configs(node, CPU)
    got, want = run_both(node, "cpu.pool", [x], {"algo": algo})
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_maxpool_dilated_and_declines_asymmetric() -> None:
    x = torch.randn(1, 4, 11, 11)
    node = make_node("MaxPool", [(x, False)], None, {"kernel_shape": [3, 3], "dilations": [2, 2]}, opset=19)
    got, want = run_both(node, "cpu.pool", [x])
    assert rel_err(got, want) <= TOL
    asym = make_node("MaxPool", [(x, False)], None, {"kernel_shape": [3, 3], "pads": [0, 0, 1, 1]})
    assert not get_tactic("cpu.pool").supports(asym, CPU)
    two_outputs = make_node("MaxPool", [(x, False)], None, {"kernel_shape": [3, 3]})
    two_outputs.outputs.append(Value("idx", TensorType(DType.INT64, None)))
    assert not get_tactic("cpu.pool").supports(two_outputs, CPU)


@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool"])
def test_global_pool(op: str) -> None:
    x = torch.randn(2, 16, 7, 5).contiguous(memory_format=torch.channels_last)
    got, want = run_both(make_node(op, [(x, False)], (2, 16, 1, 1), {}), "cpu.pool", [x])
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("opset", [17, 18])
def test_reduce_mean_spatial(keepdims: int, opset: int) -> None:
    x = torch.randn(1, 32, 7, 7).contiguous(memory_format=torch.channels_last)
    if opset >= 18:
        node = make_node("ReduceMean", [(x, False), (torch.tensor([2, 3]), True)], None, {"keepdims": keepdims},
                         opset=opset)
        args = [x, torch.tensor([2, 3])]
    else:
        node = make_node("ReduceMean", [(x, False)], None, {"axes": [-1, -2], "keepdims": keepdims}, opset=opset)
        args = [x]
    got, want = run_both(node, "cpu.pool", args)
    assert rel_err(got, want) <= TOL
    other = make_node("ReduceMean", [(x, False)], None, {"axes": [1], "keepdims": keepdims}, opset=17)
    assert not get_tactic("cpu.pool").supports(other, CPU)


@pytest.mark.parametrize("h, w", [(8, 8), (9, 7)])
def test_maxpool_2x2_fast_path(h: int, w: int) -> None:
    x = torch.randn(2, 16, h, w).contiguous(memory_format=torch.channels_last)
    x[0, 0, 0, 0] = float("nan")
    node = make_node("MaxPool", [(x, False)], None, {"kernel_shape": [2, 2], "strides": [2, 2]}, opset=19)
    got, want = run_both(node, "cpu.pool", [x])
    torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
    assert got.is_contiguous(memory_format=torch.channels_last)


# ---- resize ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("ctm, nearest", [("asymmetric", "floor"), ("half_pixel", "round_prefer_floor"),
                                          ("pytorch_half_pixel", "round_prefer_ceil")])
@pytest.mark.parametrize("scales", [(2.0, 2.0), (4.0, 1.0), (1.0, 8.0)])
@pytest.mark.parametrize("by_sizes", [False, True])
def test_resize_nearest(ctm: str, nearest: str, scales: tuple[float, float], by_sizes: bool) -> None:
    x = torch.randn(1, 8, 5, 6).contiguous(memory_format=torch.channels_last)
    sc = torch.tensor([1.0, 1.0, *scales])
    attrs = {"mode": "nearest", "coordinate_transformation_mode": ctm, "nearest_mode": nearest}
    if by_sizes:
        sizes = torch.tensor([1, 8, int(5 * scales[0]), int(6 * scales[1])])
        node = make_node("Resize", [(x, False), (None, True), (None, True), (sizes, True)], None, attrs, opset=19)
        args = [x, None, None, sizes]
    else:
        node = make_node("Resize", [(x, False), (None, True), (sc, True)], None, attrs, opset=19)
        args = [x, None, sc]
    got, want = run_both(node, "cpu.resize_nearest", args)
    assert torch.equal(got, want)
    assert got.is_contiguous(memory_format=torch.channels_last)
    kernel = get_tactic("cpu.resize_nearest").make(node, {}, torch.device("cpu"))
    cat = torch.full((1, 20, *want.shape[2:]), float("nan")).contiguous(memory_format=torch.channels_last)
    assert kernel(x, out=cat[:, 4:12]) is not None  # into a channel slice of a Concat's output
    assert torch.equal(cat[:, 4:12], want) and torch.isnan(cat[:, :4]).all() and torch.isnan(cat[:, 12:]).all()


@pytest.mark.parametrize("attrs, scales", [
    ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric"}, (2.0, 2.0)),  # round_prefer_floor
    ({"mode": "linear"}, (2.0, 2.0)), ({"mode": "nearest"}, (3.0, 3.0)), ({"mode": "nearest"}, (1.5, 2.0))])
def test_resize_declines(attrs: dict[str, Any], scales: tuple[float, float]) -> None:
    x = torch.randn(1, 4, 5, 5)
    node = make_node("Resize", [(x, False), (None, True), (torch.tensor([1.0, 1.0, *scales]), True)], None, attrs,
                     opset=19)
    assert not get_tactic("cpu.resize_nearest").supports(node, CPU)


# ---- pointwise ------------------------------------------------------------------------------------

def _pointwise(inputs: list[torch.Tensor], program: list[dict[str, Any]], consts: list[float] | None = None,
               outputs: list[str] | None = None, dynamic: bool = False) -> Node:
    shapes = {i: ("N",) + tuple(t.shape[1:]) for i, t in enumerate(inputs)} if dynamic else None
    attrs: dict[str, Any] = {"program": program, "consts": consts or []}
    if outputs:
        attrs["outputs"] = outputs
    out_dtype = DType.BOOL if program[-1]["op"] in ("Less", "Greater", "Equal") else DType.FLOAT32
    return make_node("Pointwise", [(t, False) for t in inputs], None, attrs, domain="kiln", opset=1, shapes=shapes,
                     out_dtype=out_dtype)


def _ins(op: str, *args: str, **attrs: Any) -> dict[str, Any]:
    return {"op": op, "args": list(args), "attrs": attrs}


CHAIN = [_ins("Add", "i0", "i1"), _ins("Relu", "t0"), _ins("Mul", "t1", "i2"), _ins("Clip", "t2", "c0", "c1"),
         _ins("Sigmoid", "t3"), _ins("Sub", "i0", "t4"), _ins("LeakyRelu", "t5", alpha=0.2)]


@pytest.mark.parametrize("dynamic", [False, True])
def test_pointwise_chain_in_place(dynamic: bool) -> None:
    xs = [torch.randn(2, 8, 5, 5) for _ in range(3)]
    node = _pointwise(xs, CHAIN, consts=[-0.5, 1.5], dynamic=dynamic)
    got, want = run_both(node, "cpu.pointwise", xs)
    assert rel_err(got, want) <= TOL
    src = get_tactic("cpu.pointwise").make(node, {}, torch.device("cpu")).fn.source  # type: ignore[union-attr]
    assert ("out=" in src) != dynamic and ("clamp_" in src) != dynamic


def test_pointwise_broadcast_grows_no_in_place_into_small_temp() -> None:
    a, b, c = torch.randn(1, 8, 1, 1), torch.randn(1, 1, 1, 1), torch.randn(2, 8, 4, 4)
    program = [_ins("Mul", "i0", "i1"), _ins("Add", "t0", "i2"), _ins("Tanh", "t1")]
    node = _pointwise([a, b, c], program)
    got, want = run_both(node, "cpu.pointwise", [a, b, c])
    assert rel_err(got, want) <= TOL
    src = get_tactic("cpu.pointwise").make(node, {}, torch.device("cpu")).fn.source  # type: ignore[union-attr]
    assert "out=t0" not in src and "t1.tanh_()" in src


UNARY_PROGRAMS = [
    [_ins("Exp", "i0"), _ins("Log", "t0")], [_ins("Erf", "i0"), _ins("Neg", "t0"), _ins("Abs", "t1")],
    [_ins("HardSigmoid", "i0", alpha=0.3, beta=0.4), _ins("HardSwish", "t0")],
    [_ins("Gelu", "i0", approximate="tanh"), _ins("Mish", "t0")], [_ins("Gelu", "i0"), _ins("Softplus", "t0")],
    [_ins("Elu", "i0", alpha=0.5), _ins("Selu", "t0"), _ins("Celu", "t1", alpha=2.0)],
    [_ins("ThresholdedRelu", "i0", alpha=0.3), _ins("Softsign", "t0"), _ins("Tanh", "t1")],
    [_ins("Abs", "i0"), _ins("Sqrt", "t0"), _ins("Reciprocal", "t1")],
    [_ins("Floor", "i0"), _ins("Sign", "t0"), _ins("Ceil", "i0"), _ins("Round", "t2"), _ins("Add", "t1", "t3")],
    [_ins("Sin", "i0"), _ins("Cos", "t0")],
]


@pytest.mark.parametrize("program", UNARY_PROGRAMS, ids=lambda p: "-".join(i["op"] for i in p))
def test_pointwise_unary_ops(program: list[dict[str, Any]]) -> None:
    x = torch.randn(3, 7) * 2
    got, want = run_both(_pointwise([x], program), "cpu.pointwise", [x])
    assert rel_err(got, want) <= TOL


def test_pointwise_binary_variadic_and_where() -> None:
    a, b, c = torch.randn(4, 6), torch.randn(1, 6), torch.rand(4, 6) + 0.5
    program = [_ins("Max", "i0", "i1", "i2"), _ins("Min", "t0", "i1"), _ins("Div", "t1", "i2"), _ins("Pow", "i2", "t2"),
               _ins("Sum", "t3", "i0", "i1"), _ins("Mean", "t4", "i2"), _ins("Greater", "t5", "i1"),
               _ins("Where", "t6", "t5", "i0"), _ins("PRelu", "t7", "i1")]
    got, want = run_both(_pointwise([a, b, c], program), "cpu.pointwise", [a, b, c])
    assert rel_err(got, want) <= TOL


def test_pointwise_multiple_outputs_and_comparison() -> None:
    a, b = torch.randn(5, 5), torch.randn(5, 5)
    program = [_ins("Mul", "i0", "i1"), _ins("Relu", "t0"), _ins("Less", "t1", "i1")]
    node = _pointwise([a, b], program, outputs=["t1", "t2"])
    got, want = run_both(node, "cpu.pointwise", [a, b])
    assert rel_err(got[0], want[0]) <= TOL and torch.equal(got[1], want[1])


def test_pointwise_declines_unknown_ops_and_types() -> None:
    x = torch.randn(3, 3)
    assert not get_tactic("cpu.pointwise").supports(_pointwise([x], [_ins("Cast", "i0", to=1)]), CPU)
    assert not get_tactic("cpu.pointwise").supports(_pointwise([x.double()], [_ins("Relu", "i0")]), CPU)


# ---- slice ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("starts, ends, axes, steps", [
    ([2], [6], [1], None), ([-3, 0], [100, -1], [-1, 0], [1, 2]), ([0, 1], [-100, 9], [2, 3], [1, 3]),
    ([5], [2], [1], None), ([1, 1, 1], [4, 4, 4], None, [2, 1, 1])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
def test_slice_view(starts: list[int], ends: list[int], axes: list[int] | None, steps: list[int] | None,
                    dtype: torch.dtype) -> None:
    x = (torch.randn(3, 8, 5, 9) * 10).to(dtype)
    ins: list[tuple[Any, bool]] = [(x, False), (torch.tensor(starts), True), (torch.tensor(ends), True),
                                   (torch.tensor(axes) if axes is not None else None, True),
                                   (torch.tensor(steps) if steps is not None else None, True)]
    node = make_node("Slice", ins, None, {}, opset=13, out_dtype=DType.from_torch(dtype))
    args = [t for t, _ in ins]
    got, want = run_both(node, "view.slice", args)
    assert torch.equal(got, want)


def test_slice_declines_negative_steps_and_runtime_params() -> None:
    x = torch.randn(4, 6)
    neg = make_node("Slice", [(x, False), (torch.tensor([5]), True), (torch.tensor([0]), True),
                              (torch.tensor([1]), True), (torch.tensor([-1]), True)], None, {}, opset=13)
    assert not get_tactic("view.slice").supports(neg, CPU)
    runtime = make_node("Slice", [(x, False), (torch.tensor([1]), False), (torch.tensor([3]), True)], None, {},
                        opset=13)
    assert not get_tactic("view.slice").supports(runtime, CPU)


@pytest.mark.parametrize("axis", [1, -1, 0])
def test_concat(axis: int) -> None:
    xs = [torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last) for _ in range(3)]
    node = make_node("Concat", [(x, False) for x in xs], None, {"axis": axis}, opset=13)
    got, want = run_both(node, "cpu.concat", xs)
    assert torch.equal(got, want)
    kernel = get_tactic("cpu.concat").make(node, {}, torch.device("cpu"))
    big = torch.randn(2 * want.shape[0], *want.shape[1:]).contiguous(memory_format=torch.channels_last)
    out = big[: want.shape[0]]  # a destination (an arena slot): the result is written there
    assert kernel(*xs, out=out) is out and torch.equal(out, want)


# ---- end to end -----------------------------------------------------------------------------------

def test_end_to_end_small_resnet_block() -> None:
    """Conv+BN+Relu, Conv+BN + residual + Relu, MaxPool, GAP, Gemm through the builder: CPU tactics chosen."""
    from onnx import TensorProto, helper, numpy_helper

    from kiln.builder import Builder, BuilderConfig
    from kiln.runtime.engine import Engine
    from kiln.testing import run_oracle

    rng = np.random.default_rng(0)

    def init(name: str, *shape: int, scale: float = 0.2) -> Any:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [init("w1", 8, 3, 3, 3), init("w2", 8, 8, 3, 3), init("fc", 10, 8), init("fcb", 10),
             numpy_helper.from_array(np.ones(8, np.float32), "g"), numpy_helper.from_array(np.zeros(8, np.float32), "be"),
             init("m", 8), numpy_helper.from_array(np.full(8, 1.5, np.float32), "v")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "g", "be", "m", "v"], ["b1"]),
             helper.make_node("Relu", ["b1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c2", "g", "be", "m", "v"], ["b2"]),
             helper.make_node("Add", ["b2", "r1"], ["s"]), helper.make_node("Relu", ["s"], ["r2"]),
             helper.make_node("MaxPool", ["r2"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("GlobalAveragePool", ["p"], ["gap"]), helper.make_node("Flatten", ["gap"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    plan = Builder().build(model, BuilderConfig(optimization_level=0))
    tactics = {s["op"]: s.get("tactic") for s in plan.graph["steps"]}
    assert all(str(t).startswith("cpu.") for t in tactics.values()), tactics
    x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
    got = Engine(plan).create_execution_context().execute({"x": x})["y"]
    want = run_oracle(model, {"x": x})[0]
    assert rel_err(torch.from_numpy(np.ascontiguousarray(got)), torch.from_numpy(want)) <= TOL


def test_runtime_configure() -> None:
    from kiln.backends.cpu.runtime import CpuRuntimeOptions, configure, physical_cores

    before = torch.get_num_threads()
    try:
        assert physical_cores() >= 1
        opts = configure(CpuRuntimeOptions(threads=1, retain_heap=True))
        assert opts.threads == 1 and torch.get_num_threads() == 1
        with pytest.raises(ValueError):
            configure(threads=0)
    finally:
        torch.set_num_threads(before)



