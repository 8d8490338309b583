"""bfloat16 on the CPU target: oneDNN's bf16 conv / linear / pool primitives against float64 oracles, a whole
bf16 build against onnxruntime's float32 result, and the FP32 fallback (with a warning) where the CPU has no
BF16 instructions or for --fp16."""
from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.cpu import features
from kiln.backends.cpu.dnnl import library
from kiln.backends.tactic import get_tactic
from kiln.builder import Builder, BuilderConfig
from kiln.ir.dtype import DType
from kiln.logger import Logger, Severity
from kiln.passes.precision import CPU_FP32_OPS, LOW_PRECISION_OPS, low_precision_ops
from kiln.runtime.engine import Engine
from tests.backends.test_cpu_tactics import CPU, make_node

NO_DNNL = "the oneDNN library (pip install onednn-cpu-gomp) is not installed"
NO_BF16 = "this CPU has no BF16 instructions (avx512_bf16 / amx_bf16): oneDNN has only reference bf16 loops"
native = pytest.mark.skipif(library() is None or not features.native_low_precision(DType.BFLOAT16),
                            reason=NO_DNNL if library() is None else NO_BF16)
BF16_TOL = 1e-2


def _bf16(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.from_numpy((rng.standard_normal(shape) * scale).astype(np.float32)).to(torch.bfloat16)


def _f64(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.double().numpy()


def _rel(got: torch.Tensor, want: np.ndarray) -> float:
    g = got.double().numpy()
    assert g.shape == want.shape, (g.shape, want.shape)
    return float(np.abs(g - want).max() / np.abs(want).max())


def _conv_oracle(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: int, pad: int, group: int
                 ) -> np.ndarray:
    """Plain float64 convolution: zero-padded windows times the weights, summed per group."""
    n, c, _, _ = x.shape
    k, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]  # [N, C, OH, OW, kh, kw]
    kg = k // group
    y = np.concatenate([np.einsum("nchwij,kcij->nkhw", win[:, g * cg:(g + 1) * cg], w[g * kg:(g + 1) * kg])
                        for g in range(group)], axis=1)
    return y if b is None else y + b[None, :, None, None]


def _epilogue(v: np.ndarray, z: np.ndarray | None, relu: bool, act_first: bool) -> np.ndarray:
    act = (lambda t: np.maximum(t, 0.0)) if relu else (lambda t: t)
    if z is None:
        return act(v)
    return act(v) + z if act_first else act(v + z)


def _no_fallback(kernel: Any) -> None:
    """The kernel ran oneDNN's own primitive (a jit one: `_finish` refuses reference loops), not the op's
    reference implementation."""
    assert kernel.fallback is None or kernel.fallback.reason is None, kernel.fallback.reason


@native
@pytest.mark.parametrize("op, bias, relu, residual, act_first, stride, pad, group", [
    ("Conv", False, False, False, 0, 1, 1, 1),
    ("Conv", True, False, False, 0, 2, 0, 1),
    ("FusedConv", True, True, False, 0, 1, 1, 1),
    ("FusedConv", True, True, True, 0, 1, 1, 1),
    ("FusedConv", False, True, True, 1, 2, 1, 1),
    ("FusedConv", True, False, True, 0, 1, 1, 4),
])
@pytest.mark.parametrize("out_dtype", [DType.BFLOAT16, DType.FLOAT32])
def test_bf16_conv(op: str, bias: bool, relu: bool, residual: bool, act_first: int, stride: int, pad: int,
                   group: int, out_dtype: DType) -> None:
    rng = np.random.default_rng(hash((op, bias, relu, residual, stride, group)) % 2**32)
    c, k = 16, 32
    x = _bf16(rng, 2, c, 11, 10).contiguous(memory_format=torch.channels_last)
    w, b = _bf16(rng, k, c // group, 3, 3, scale=0.2), _bf16(rng, k) if bias else None
    want = _conv_oracle(_f64(x), _f64(w), _f64(b), stride, pad, group)  # type: ignore[arg-type]
    z = _bf16(rng, *want.shape).contiguous(memory_format=torch.channels_last) if residual else None
    want = _epilogue(want, _f64(z), relu, bool(act_first))
    attrs: dict[str, Any] = {"strides": [stride] * 2, "pads": [pad] * 4, "group": group, "kernel_shape": [3, 3]}
    if op == "FusedConv":
        attrs.update(activation="Relu" if relu else "", alpha=0.0, beta=0.0, act_before_add=act_first)
    ins = [(x, False), (w, True), (b, True)] + ([(z, False)] if op == "FusedConv" else [])
    node = make_node(op, ins, want.shape, attrs, domain="kiln" if op == "FusedConv" else "", out_dtype=out_dtype)
    tactic = get_tactic("cpu.conv_dnnl")
    assert tactic.supports(node, CPU)
    kernel = tactic.make(node, {}, torch.device("cpu"))
    got = kernel(x, None, None, z) if op == "FusedConv" else kernel(x)
    _no_fallback(kernel)
    assert got.dtype == out_dtype.torch
    assert _rel(got, want) <= BF16_TOL


@native
@pytest.mark.parametrize("case", ["fused_relu_residual", "fused_bias", "gemm_transb", "matmul_nd"])
def test_bf16_linear(case: str) -> None:
    rng = np.random.default_rng(len(case))
    a = _bf16(rng, 3, 5, 64) if case == "matmul_nd" else _bf16(rng, 5, 64)
    w = _bf16(rng, 48, 64, scale=0.15)  # [N, K]
    b = _bf16(rng, 48)
    z = _bf16(rng, 5, 48)
    wt = _f64(w).T  # type: ignore[union-attr]
    if case == "matmul_nd":
        node = make_node("MatMul", [(a, False), (w.t().contiguous(), True)], (3, 5, 48), {},
                         out_dtype=DType.BFLOAT16)
        args, want = [a], _f64(a) @ wt
    elif case == "gemm_transb":
        node = make_node("Gemm", [(a, False), (w, True), (b, True)], (5, 48), {"transB": 1, "alpha": 0.5},
                         out_dtype=DType.FLOAT32)
        args, want = [a], 0.5 * (_f64(a) @ wt) + _f64(b)
    else:
        res = case == "fused_relu_residual"
        attrs = {"activation": "Relu" if res else "", "alpha": 0.0, "beta": 0.0, "act_before_add": 0}
        ins = [(a, False), (w, True), (b, True)] + ([(z, False)] if res else [])
        node = make_node("FusedGemm", ins, (5, 48), attrs, domain="kiln", out_dtype=DType.BFLOAT16)
        args = [a, None, None, z] if res else [a]
        want = _epilogue(_f64(a) @ wt + _f64(b), _f64(z) if res else None, res, False)
    tactic = get_tactic("cpu.linear_dnnl")
    assert tactic.supports(node, CPU)
    kernel = tactic.make(node, {}, torch.device("cpu"))
    got = kernel(*args)
    _no_fallback(kernel)
    assert got.dtype == node.outputs[0].type.dtype.torch
    assert _rel(got, want) <= BF16_TOL


@native
@pytest.mark.parametrize("op", ["MaxPool", "AveragePool", "GlobalAveragePool"])
def test_bf16_pool(op: str) -> None:
    rng = np.random.default_rng(7)
    x = _bf16(rng, 2, 16, 9, 8).contiguous(memory_format=torch.channels_last)
    xd = _f64(x)
    if op == "GlobalAveragePool":
        attrs: dict[str, Any] = {}
        want = xd.mean(axis=(2, 3), keepdims=True)  # type: ignore[union-attr]
    else:
        attrs = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
        fill = -np.inf if op == "MaxPool" else np.nan
        xp = np.pad(xd, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=fill)  # type: ignore[arg-type]
        win = sliding_window_view(xp, (3, 3), axis=(2, 3))[:, :, ::2, ::2]
        want = win.max(axis=(4, 5)) if op == "MaxPool" else np.nanmean(win, axis=(4, 5))  # pads not counted
    node = make_node(op, [(x, False)], want.shape, attrs, opset=19, out_dtype=DType.BFLOAT16)
    tactic = get_tactic("cpu.pool_dnnl")
    assert tactic.supports(node, CPU)
    kernel = tactic.make(node, {}, torch.device("cpu"))
    got = kernel(x)
    _no_fallback(kernel)
    assert got.dtype == torch.bfloat16 and _rel(got, want) <= BF16_TOL


def _cnn(rng: np.random.Generator) -> Any:
    """conv/relu -> maxpool -> conv + residual -> relu -> [conv, sigmoid gate] -> concat -> nearest 2x resize
    -> GAP -> flatten -> gemm."""
    def c(name: str, *shape: int, s: float = 1.0) -> Any:
        return numpy_helper.from_array((rng.standard_normal(shape) * s).astype(np.float32), name)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv1"),
        helper.make_node("Relu", ["a"], ["ar"], name="relu1"),
        helper.make_node("MaxPool", ["ar"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], name="pool"),
        helper.make_node("Conv", ["p", "w2", "b2"], ["q"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Add", ["q", "p"], ["r"], name="add"),
        helper.make_node("Relu", ["r"], ["rr"], name="relu2"),
        helper.make_node("Conv", ["rr", "w3"], ["t"], name="conv3"),
        helper.make_node("Sigmoid", ["t"], ["ts"], name="sig"),
        helper.make_node("Mul", ["ts", "rr"], ["gated"], name="gate"),
        helper.make_node("Concat", ["gated", "rr"], ["cat"], axis=1, name="cat"),
        helper.make_node("Resize", ["cat", "", "scales"], ["up"], mode="nearest", name="up"),
        helper.make_node("GlobalAveragePool", ["up"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1, name="fc"),
    ]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 32, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 10])],
                          [c("w1", 16, 3, 3, 3, s=0.3), c("b1", 16, s=0.1), c("w2", 16, 16, 3, 3, s=0.1),
                           c("b2", 16, s=0.1), c("w3", 16, 16, 1, 1, s=0.25), c("wf", 10, 32, s=0.3),
                           c("bf", 10, s=0.1),
                           numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@native
def test_bf16_cnn_runs_fast_tactics_and_matches_onnxruntime(capfd: pytest.CaptureFixture[str]) -> None:
    """Built by priority (optimization level 0), so that which tactics take the bf16 layers is what is tested, not
    which won a timing on a busy machine; running the plan must not fall back to any reference implementation."""
    ort = pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(11)
    model = _cnn(rng)
    plan = Builder().build(model, BuilderConfig(device="cpu", bf16=True, optimization_level=0))
    assert plan.build["bf16"] is True
    steps = plan.graph["steps"]
    dtype = {s["name"]: plan.graph["values"][s["outputs"][0]]["type"]["dtype"] for s in steps}
    ops = {s["op"] for s in steps}
    assert {"FusedConv", "MaxPool", "Concat", "Resize"} <= ops, ops
    for s in steps:  # every layer but the boundary Casts computes in bf16 on a fast tactic
        if s["op"] == "Cast":
            continue
        assert s["tactic"] != "ref", (s["name"], s["op"])
        assert dtype[s["name"]] == "bfloat16", (s["name"], dtype[s["name"]])
    heavy = [s["tactic"] for s in steps if s["op"] in ("FusedConv", "Conv", "FusedGemm", "Gemm")]
    assert heavy and all(t in ("cpu.conv_dnnl", "cpu.linear_dnnl", "cpu.conv1d_dnnl") for t in heavy), heavy
    assert [s["op"] for s in steps].count("Cast") == 2  # the input and the output only
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    got = Engine(plan).create_execution_context().execute({"x": x})["y"]
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.dtype == np.float32
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 2e-2
    assert "reference implementation instead" not in capfd.readouterr().err


def _build_logged(model: Any, **flags: bool) -> tuple[Any, str]:
    stream = io.StringIO()
    plan = Builder(Logger(Severity.WARNING, stream)).build(model, BuilderConfig(device="cpu", **flags))
    return plan, stream.getvalue()


def _all_float32(plan: Any) -> bool:
    return all(v["type"]["dtype"] in ("float32", "int64") for v in plan.graph["values"].values())


@pytest.mark.parametrize("flag, message", [("bf16", "this CPU has no BF16 instructions: building FP32"),
                                           ("fp16", "no FP16 kernels")])
def test_no_native_low_precision_builds_fp32_with_a_warning(monkeypatch: pytest.MonkeyPatch, flag: str,
                                                             message: str) -> None:
    monkeypatch.setattr(features, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f"}))
    assert not features.native_low_precision(DType.BFLOAT16)
    rng = np.random.default_rng(5)
    model = _cnn(rng)
    plan, log = _build_logged(model, **{flag: True})
    assert log.count(message) == 1, log
    assert plan.build["bf16"] is False and plan.build["fp16"] is False
    assert not [s for s in plan.graph["steps"] if s["op"] == "Cast"]
    assert _all_float32(plan)
    fp32 = Builder(Logger(Severity.ERROR)).build(model, BuilderConfig(device="cpu"))
    assert [s["op"] for s in plan.graph["steps"]] == [s["op"] for s in fp32.graph["steps"]]
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    got = Engine(plan).create_execution_context().execute({"x": x})["y"]
    want = Engine(fp32).create_execution_context().execute({"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_flags_read_from_cpuinfo(monkeypatch: pytest.MonkeyPatch) -> None:
    for flags, want in (({"avx512f", "avx512_bf16"}, True), ({"amx_bf16", "amx_tile"}, True), ({"avx2"}, False),
                        (set(), False)):
        monkeypatch.setattr(features, "cpu_flags", lambda f=frozenset(flags): f)
        assert features.native_low_precision(DType.BFLOAT16) is want
        assert features.native_low_precision(DType.FLOAT16) is False


def test_cpu_low_precision_ops() -> None:
    assert low_precision_ops("cuda") == LOW_PRECISION_OPS
    cpu = low_precision_ops("cpu")
    assert CPU_FP32_OPS and not CPU_FP32_OPS & cpu and cpu | CPU_FP32_OPS == LOW_PRECISION_OPS
    assert {"Conv", "FusedConv", "FusedGemm", "MaxPool", "Pointwise", "LayerNormalization"} <= cpu


def test_bf16_layernorm_and_pointwise_stay_off_the_reference() -> None:
    """The torch-based tactics of the other lowered ops take bfloat16 layers (float32 statistics / arithmetic,
    one rounding per result)."""
    rng = np.random.default_rng(13)
    x, w, b = _bf16(rng, 3, 5, 64), _bf16(rng, 64), _bf16(rng, 64)
    node = make_node("LayerNormalization", [(x, False), (w, True), (b, True)], (3, 5, 64), {"axis": -1,
                     "epsilon": 1e-5}, out_dtype=DType.BFLOAT16)
    tactic = get_tactic("cpu.layernorm")
    assert tactic.supports(node, CPU)
    xd = _f64(x)
    mean, var = xd.mean(-1, keepdims=True), xd.var(-1, keepdims=True)  # type: ignore[union-attr]
    want = (xd - mean) / np.sqrt(var + 1e-5) * _f64(w) + _f64(b)
    got = tactic.make(node, {}, torch.device("cpu"))(x)
    assert got.dtype == torch.bfloat16 and _rel(got, want) <= BF16_TOL
    program = [{"op": "Sigmoid", "args": ["i0"]}, {"op": "Mul", "args": ["t0", "i1"]}]
    pw = make_node("Pointwise", [(x, False), (got, False)], (3, 5, 64), {"program": program}, domain="kiln",
                   out_dtype=DType.BFLOAT16)
    tactic = get_tactic("cpu.pointwise")
    assert tactic.supports(pw, CPU)
    y = tactic.make(pw, {}, torch.device("cpu"))(x, got)
    assert y.dtype == torch.bfloat16 and _rel(y, _f64(got) / (1 + np.exp(-xd))) <= BF16_TOL
