"""cpu.qdq_c (kiln/backends/cpu/qdq.py, native/qdq.c): QuantizeLinear / DequantizeLinear in one strided C pass,
bit for bit against the ops' references (kiln.ops.quantize) and onnxruntime, on seeded random inputs.

Inputs sit on and next to the rounding ties (k + 0.5 steps), at and beyond the saturation limits (and at
infinities and NaN), in NCHW, NHWC and channel-sliced layouts; 4-D outputs are channels-last. Nodes the kernel
was not made for (blocked quantization, float 8, 4-bit, float16 work) are declined and stay on the reference.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.cpu.qdq import PARALLEL_MIN, _library, qdq_spec
from kiln.backends.tactic import TacticContext, get_tactic
from kiln.errors import KilnError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Value
from kiln.ir.types import TensorType
from kiln.ops.registry import lookup
from tests.qdq_inputs import layout as _layout, near_ties as _near_ties

pytestmark = pytest.mark.skipif(_library() is None, reason="no C compiler for native/qdq.c")

CPU = torch.device("cpu")
CTX = TacticContext(CPU)
CL = torch.channels_last
TID = "cpu.qdq_c"


def _node(op: str, x_dtype: torch.dtype, y_dtype: torch.dtype, shape: tuple, scale: torch.Tensor,
          zp: torch.Tensor | None, axis: int = 1, **attrs: int) -> Node:
    ins = [Value("x", TensorType(DType.from_torch(x_dtype), shape)), Value("s", const=scale)]
    if zp is not None:
        ins.append(Value("z", const=zp))
    return Node(op, ins, [Value("y", TensorType(DType.from_torch(y_dtype), shape))], {"axis": axis, **attrs},
                name="q", opset=attrs and 21 or 13)


def _run(node: Node, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    t = get_tactic(TID)
    assert t is not None and t.supports(node, CTX)
    kern = t.make(node, {}, CPU)
    return kern(x, None, None, out=out) if out is not None else kern(x, None, None)


def _reference(node: Node, x: torch.Tensor) -> torch.Tensor:
    return lookup(node.op_type, "").compute(node, x, *[v.const for v in node.inputs[1:]])


def _exact(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.is_floating_point():
        same = got.view(torch.int16 if got.itemsize == 2 else torch.int32) == \
            want.view(torch.int16 if want.itemsize == 2 else torch.int32)
        assert bool(same.all()), f"{int((~same).sum())} values differ"
    else:
        assert torch.equal(got, want), f"{(got.int() - want.int()).abs().max()} steps apart"


def test_near_ties_contain_exact_ties() -> None:
    """The tie inputs are ties in float32: x / s lands on k + 0.5, where half to even and half away differ."""
    s = torch.tensor(0.0173)
    x = _near_ties((2, 5, 7, 9), s, torch.float32, seed=1)
    q = x / s
    ties = q == q.floor() + 0.5
    assert int(ties.sum()) > 20 and not torch.equal(torch.round(q[ties]), torch.floor(q[ties] + 0.5))


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "slice"])
@pytest.mark.parametrize("int_t,zp", [(torch.int8, 0), (torch.int8, -7), (torch.uint8, 128), (torch.uint8, None)])
@pytest.mark.parametrize("float_t", [torch.float32, torch.bfloat16])
def test_quantize_per_tensor_exact_nhwc_out(layout: str, int_t: torch.dtype, zp: int | None,
                                            float_t: torch.dtype) -> None:
    scale = torch.tensor(0.0173, dtype=torch.float32)
    z = None if zp is None else torch.tensor(zp, dtype=int_t)
    node = _node("QuantizeLinear", float_t, int_t, ("N", 5, "H", "W"), scale, z)
    x = _layout(_near_ties((2, 5, 7, 9), scale, float_t, seed=1), layout)
    got = _run(node, x)
    assert got.is_contiguous(memory_format=CL)
    _exact(got, _reference(node, x))


@pytest.mark.parametrize("channels", [3, 4, 19])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_quantize_per_channel_exact(channels: int, layout: str) -> None:
    g = torch.Generator().manual_seed(channels)
    sc = torch.rand(channels, generator=g) * 0.2 + 1e-3
    for int_t, lo, hi in ((torch.int8, -128, 128), (torch.uint8, 0, 256)):
        zc = torch.randint(lo, hi, (channels,), generator=g).to(int_t)
        node = _node("QuantizeLinear", torch.float32, int_t, ("N", channels, "H", "W"), sc, zc)
        x = _layout(_near_ties((2, channels, 17, 23), sc, torch.float32, seed=channels + 1), layout)
        got = _run(node, x)
        assert got.is_contiguous(memory_format=CL)
        _exact(got, _reference(node, x))


def test_quantize_bfloat16_work_type_and_mixed_scales() -> None:
    """bfloat16 input and scale: the reference divides in bfloat16; a float16 scale on a float32 input works in
    float32."""
    s16 = torch.tensor(0.0371, dtype=torch.bfloat16)
    node = _node("QuantizeLinear", torch.bfloat16, torch.int8, ("N", 4, 6, 6), s16, torch.tensor(3, dtype=torch.int8))
    assert qdq_spec(node)["work_bf16"]  # type: ignore[index]
    x = _near_ties((3, 4, 6, 6), s16.float(), torch.bfloat16, seed=2)
    _exact(_run(node, x), _reference(node, x))
    sh = torch.tensor([0.01, 0.2, 0.033, 1.5], dtype=torch.float16)
    node = _node("QuantizeLinear", torch.float32, torch.uint8, ("N", 4, 5, 3), sh,
                 torch.tensor([0, 10, 250, 128], dtype=torch.uint8))
    x = _near_ties((2, 4, 5, 3), sh.float(), torch.float32, seed=3)
    _exact(_run(node, x), _reference(node, x))


def test_quantize_infinities_nan_and_extremes() -> None:
    scale = torch.tensor(0.05)
    for int_t, zp in ((torch.int8, 5), (torch.uint8, 200)):
        node = _node("QuantizeLinear", torch.float32, int_t, (2, 9), scale, torch.tensor(zp, dtype=int_t))
        x = torch.tensor([[float("inf"), -float("inf"), float("nan"), 3.4e38, -3.4e38, 1e-45, -0.0, 6.375, -6.425],
                          [127 * 0.05, 127.5 * 0.05, -128.5 * 0.05, 2e6, -2e6, 1e30, 0.025, -0.025, 0.075]])
        _exact(_run(node, x), _reference(node, x))


@pytest.mark.parametrize("out_t", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("int_t", [torch.int8, torch.uint8])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "slice"])
def test_dequantize_exact_into_out(out_t: torch.dtype, int_t: torch.dtype, layout: str) -> None:
    g = torch.Generator().manual_seed(4)
    lo, hi = (-128, 128) if int_t == torch.int8 else (0, 256)
    x = _layout(torch.randint(lo, hi, (2, 6, 5, 4), generator=g).to(int_t), layout)
    sc = torch.rand(6, generator=g) * 0.1 + 1e-3
    zc = torch.randint(lo, hi, (6,), generator=g).to(int_t)
    for scale, zp in ((sc[:1].reshape(()), zc[:1].reshape(())), (sc, zc), (sc, None)):
        node = _node("DequantizeLinear", int_t, out_t, ("N", 6, "H", "W"), scale.to(out_t), zp)
        want = _reference(node, x)
        out = torch.empty(x.shape, dtype=out_t).contiguous(memory_format=CL)
        got = _run(node, x, out=out)
        assert got is out
        _exact(got, want)
        fresh = _run(node, x)
        assert fresh.is_contiguous(memory_format=CL)
        _exact(fresh, want)


def test_other_ranks_threads_and_strided_destination() -> None:
    scale = torch.tensor(0.05)
    for shape in ((), (37,), (7, 33), (3, 5, 11), (2, 3, 4, 5, 6)):
        node = _node("QuantizeLinear", torch.float32, torch.int8, shape, scale, torch.tensor(1, dtype=torch.int8))
        x = _near_ties(shape, scale, torch.float32, seed=5) if len(shape) >= 2 else \
            (torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 9)
        got = _run(node, x)
        assert got.is_contiguous()
        _exact(got, _reference(node, x))
    sc = torch.rand(5, generator=torch.Generator().manual_seed(6)) * 0.1 + 0.01
    node = _node("QuantizeLinear", torch.float32, torch.uint8, ("N", 5, "L"), sc,
                 torch.full((5,), 9, dtype=torch.uint8))
    x = _near_ties((3, 5, 40), sc, torch.float32, seed=6).transpose(1, 2).contiguous().transpose(1, 2)  # [N, L, C]
    _exact(_run(node, x), _reference(node, x))
    # large enough for the OpenMP split, into a channel slice of a wider buffer (strides of neither layout)
    node = _node("QuantizeLinear", torch.float32, torch.int8, ("N", 8, "H", "W"), scale, None, output_dtype=3)
    x = _near_ties((3, 8, 80, 80), scale, torch.float32, seed=7)
    assert x.numel() >= PARALLEL_MIN
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        buf = torch.zeros((3, 10, 80, 80), dtype=torch.int8).contiguous(memory_format=CL)
        got = _run(node, x, out=buf[:, 1:9])
    finally:
        torch.set_num_threads(before)
    _exact(got, _reference(node, x))
    assert not buf[:, 0].any() and not buf[:, 9].any()  # nothing written outside the slice


def test_calls_it_was_not_made_for_run_the_reference() -> None:
    sc = torch.tensor([0.1, 0.2, 0.3])
    node = _node("QuantizeLinear", torch.float32, torch.int8, ("N", 3, 4, 4), sc, torch.zeros(3, dtype=torch.int8))
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    _exact(_run(node, x), _reference(node, x))  # a float64 input: the reference's result
    with pytest.raises(Exception, match="per-axis scale"):
        _run(node, torch.randn(1, 4, 4, 4))  # four channels for three scales: the reference's error


def _decline_cases() -> list[Node]:
    s = torch.tensor(0.1)
    blocked = _node("DequantizeLinear", torch.int8, torch.float32, (4, 4), torch.full((4, 2), 0.1), None,
                    block_size=2)
    int4 = _node("QuantizeLinear", torch.float32, torch.int8, (4, 4), s, None, output_dtype=22)  # INT4 (no Kiln type)
    return [
        blocked, int4,
        _node("QuantizeLinear", torch.float32, torch.float8_e4m3fn, (4, 4), s, None),
        _node("DequantizeLinear", torch.float8_e4m3fn, torch.float32, (4, 4), s, None),
        _node("QuantizeLinear", torch.float16, torch.int8, (4, 4), s.half(), None, output_dtype=3),  # float16 work
        _node("QuantizeLinear", torch.float32, torch.int8, (4, 4), s.double(), None, output_dtype=3),  # float64 work
        _node("QuantizeLinear", torch.float32, torch.int8, (4, 4), torch.tensor(-1.0), None, output_dtype=3),
        _node("QuantizeLinear", torch.float32, torch.int8, (4, 4), s, torch.tensor(0, dtype=torch.uint8)),
        _node("QuantizeLinear", torch.float32, torch.int16, (4, 4), s, torch.tensor(0, dtype=torch.int16)),
        _node("QuantizeLinear", torch.float32, torch.int8, (4, 4), torch.full((4,), 0.1), None, axis=0,
              output_dtype=3),  # per-axis on axis 0
        _node("QuantizeLinear", torch.float32, torch.int8, (1, 4, 2, 2), torch.full((1, 4, 1, 1), 0.1), None,
              output_dtype=3),  # a 4-D scale, which the reference refuses
        _node("DequantizeLinear", torch.int8, torch.float32, (4, 4), s.half(), None),  # reference output: float16
    ]


def test_declines_what_it_was_not_made_for() -> None:
    t = get_tactic(TID)
    for node in _decline_cases():
        assert not t.supports(node, CTX), (node.op_type, [v.type for v in node.inputs + node.outputs])
    x_var = Node("QuantizeLinear", [Value("x", TensorType(DType.FLOAT32, (4,))),
                                    Value("s", TensorType(DType.FLOAT32, ()))],
                 [Value("y", TensorType(DType.UINT8, (4,)))], {}, name="q", opset=13)
    assert not t.supports(x_var, CTX)  # a scale computed at run time


# ---- whole models against onnxruntime ------------------------------------------------------------------------

def _qdq_model(path: str, int_t: int, per_channel: bool, c: int, blocked: bool = False) -> None:
    g = np.random.default_rng(11)
    if blocked:
        scale = (g.random((2, c // 2, 6, 4)) * 0.05 + 0.01).astype(np.float32)  # x's shape, axis 1 in blocks of 2
        zp = g.integers(-20, 20, scale.shape).astype(np.int8)
    elif per_channel:
        scale = (g.random(c) * 0.05 + 0.01).astype(np.float32)
        zp = g.integers(-128 if int_t == TensorProto.INT8 else 0, 128 if int_t == TensorProto.INT8 else 256, c)
        zp = zp.astype(np.int8 if int_t == TensorProto.INT8 else np.uint8)
    else:
        scale, zp = np.array(0.0173, np.float32), np.array(7 if int_t == TensorProto.INT8 else 130,
                                                           np.int8 if int_t == TensorProto.INT8 else np.uint8)
    attrs = {"axis": 1, "block_size": 2} if blocked else {"axis": 1}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)]
    shape = [2, c, 6, 4] if blocked else ["N", c, 9, 11]
    gr = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                           [helper.make_tensor_value_info("q", int_t, shape),
                            helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
                           [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zp, "z")])
    m = helper.make_model(gr, opset_imports=[helper.make_opsetid("", 21 if blocked else 13)])
    m.ir_version = 10 if blocked else 8
    with open(path, "wb") as f:
        f.write(m.SerializeToString())


@pytest.mark.parametrize("int_t", [TensorProto.INT8, TensorProto.UINT8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_model_matches_onnxruntime_on_cpu_qdq_c(tmp_path, int_t: int, per_channel: bool) -> None:  # noqa: ANN001
    import onnxruntime as ort

    from kiln.builder import Builder, BuilderConfig
    from kiln.runtime import Engine
    path = str(tmp_path / "qdq.onnx")
    _qdq_model(path, int_t, per_channel, c=5)
    plan = Builder().build(path, BuilderConfig(device="cpu", optimization_level=0))
    tactics = {s["op"]: s["tactic"] for s in plan.graph["steps"]}
    assert tactics == {"QuantizeLinear": TID, "DequantizeLinear": TID}, tactics
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ctx = Engine(plan).create_execution_context()
    scale = 0.0173 if not per_channel else 0.01
    for seed in range(3):
        x = _near_ties((2, 5, 9, 11), torch.tensor(scale), torch.float32, seed=20 + seed).numpy()
        want_q, want_y = sess.run(None, {"x": x})
        got = ctx.execute({"x": x})
        np.testing.assert_array_equal(np.asarray(got["q"]), want_q)
        np.testing.assert_array_equal(np.asarray(got["y"]), want_y)


def test_blocked_model_stays_on_reference(tmp_path) -> None:  # noqa: ANN001
    import onnxruntime as ort

    from kiln.builder import Builder, BuilderConfig
    from kiln.runtime import Engine
    path = str(tmp_path / "blocked.onnx")
    _qdq_model(path, TensorProto.INT8, False, c=4, blocked=True)
    plan = Builder().build(path, BuilderConfig(device="cpu", optimization_level=0))
    tactics = {s["op"]: s["tactic"] for s in plan.graph["steps"]}
    assert TID not in tactics.values(), tactics
    x = np.random.default_rng(12).standard_normal((2, 4, 6, 4)).astype(np.float32)
    want_q, want_y = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = Engine(plan).create_execution_context().execute({"x": x})
    np.testing.assert_array_equal(np.asarray(got["q"]), want_q)
    np.testing.assert_array_equal(np.asarray(got["y"]), want_y)


def test_refuses_a_destination_of_another_shape_or_dtype() -> None:
    node = _node("QuantizeLinear", torch.float32, torch.int8, ("N", 3, 4, 4), torch.tensor(0.1), None, output_dtype=3)
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(9))
    for out in (torch.empty(1, 3, 4, 5, dtype=torch.int8), torch.empty(1, 3, 4, 4, dtype=torch.uint8)):
        with pytest.raises(KilnError, match="destination"):
            _run(node, x, out=out)
    expanded = torch.zeros(1, 1, 4, 4, dtype=torch.int8).expand(1, 3, 4, 4)  # overlapping memory
    with pytest.raises(RuntimeError):
        _run(node, x, out=expanded)  # torch refuses to copy into overlapping memory; the C pass never sees it
