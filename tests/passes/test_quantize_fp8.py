"""FP8 Q/DQ models (float8_e4m3fn QuantizeLinear / DequantizeLinear, opset 21, written here with onnx.helper):
weight DQ folded, DQ -> Gemm/MatMul/1x1 Conv (-> Q) fused into FP8 layers, results against ONNX's reference
evaluator on seeded random inputs, plan round trip, and malformed float8 models refused in one line."""
from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from kiln.builder import Builder, BuilderConfig
from kiln.plan.format import load_plan, save_plan
from kiln.runtime import Engine

F8 = ml_dtypes.float8_e4m3fn


def _f8(a: np.ndarray) -> np.ndarray:
    return np.clip(a, -448, 448).astype(F8)


def _f8_init(name: str, a: np.ndarray) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, list(a.shape), np.asarray(a, np.float32).ravel().tolist())


class _Model:
    """An opset-21 graph of float8 Q/DQ nodes around float layers, built step by step."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = [_f8_init("z8", np.zeros((), np.float32))]
        self.weights: dict[str, np.ndarray] = {}  # the model's own float8 weights

    def scale(self, name: str, value: float) -> str:
        self.inits.append(numpy_helper.from_array(np.array(value, np.float32), name))
        return name

    def qdq(self, x: str, scale: float) -> str:
        s = self.scale(f"{x}_s", scale)
        self.nodes += [helper.make_node("QuantizeLinear", [x, s, "z8"], [f"{x}_q"]),
                       helper.make_node("DequantizeLinear", [f"{x}_q", s, "z8"], [f"{x}_dq"])]
        return f"{x}_dq"

    def weight(self, name: str, shape: tuple[int, ...], axis: int | None, zero: float | None = None,
               scales: int | None = None) -> str:
        """A float8 weight with its DQ: per tensor (axis None) or per channel along `axis` (amax / 448 scales)."""
        w = self.rng.standard_normal(shape).astype(np.float32)
        if axis is None:
            s = np.array(np.abs(w).max() / 448, np.float32)
            q = _f8(w / s)
        else:
            other = tuple(i for i in range(w.ndim) if i != axis)
            s = (np.abs(w).max(axis=other) / 448).astype(np.float32)
            shape_s = [1] * w.ndim
            shape_s[axis] = -1
            q = _f8(w / s.reshape(shape_s))
            s = s[:scales] if scales is not None else s
        self.weights[name] = q
        self.inits += [_f8_init(f"{name}_q", q), numpy_helper.from_array(s, f"{name}_s")]
        ins = [f"{name}_q", f"{name}_s"] + ([] if zero is None else [f"{name}_z"])
        if zero is not None:
            self.inits.append(_f8_init(f"{name}_z", np.array(zero, np.float32)))
        self.nodes.append(helper.make_node("DequantizeLinear", ins, [f"{name}_dq"],
                                           **({} if axis is None else {"axis": axis})))
        return f"{name}_dq"

    def bias(self, name: str, n: int) -> str:
        self.inits.append(numpy_helper.from_array(self.rng.standard_normal(n).astype(np.float32), name))
        return name

    def node(self, op: str, ins: list[str], out: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, ins, [out], **attrs))
        return out

    def save(self, path: str, inputs: dict[str, list[int]], outputs: dict[str, list[int]]) -> str:
        g = helper.make_graph(self.nodes, "fp8", [helper.make_tensor_value_info(k, TensorProto.FLOAT, v)
                                                   for k, v in inputs.items()],
                              [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in outputs.items()],
                              self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
        m.ir_version = min(m.ir_version, 10)  # float8 needs 9+; older onnxruntime builds read up to 10
        onnx.checker.check_model(m, full_check=True)
        onnx.save(m, path)
        return path


def _gemm_model(path: str, kind: str, per_channel: bool) -> tuple[str, _Model]:
    """x [8, 64] -> Q/DQ -> MatMul + bias (or Gemm transB=1) -> Relu -> Q/DQ -> y [8, 48]."""
    m = _Model(1)
    x = m.qdq("x", 0.02)
    if kind == "MatMul":
        h = m.node("Add", [m.node("MatMul", [x, m.weight("w", (64, 48), 1 if per_channel else None)], "mm"),
                           m.bias("b", 48)], "h")
    else:
        h = m.node("Gemm", [x, m.weight("w", (48, 64), 0 if per_channel else None), m.bias("b", 48)], "h", transB=1)
    m.qdq(m.node("Relu", [h], "r"), 0.05)
    m.node("Identity", ["r_dq"], "y")
    return m.save(path, {"x": [8, 64]}, {"y": [8, 48]}), m


def _steps(got: np.ndarray, want: np.ndarray, scale: float) -> np.ndarray:
    """Distance in float8 steps between two dequantized float8 outputs of one scale."""
    def order(a: np.ndarray) -> np.ndarray:
        bits = _f8(np.asarray(a, np.float32) / np.float32(scale)).view(np.uint8).astype(np.int32)
        return np.where(bits >= 128, -(bits - 128), bits)
    return np.abs(order(got) - order(want))


def _agree(got: np.ndarray, want: np.ndarray, scale: float) -> None:
    """Within one float8 step everywhere (the fused layer rounds its exact sum once; the model's float32 MatMul
    rounds each partial sum), equal almost everywhere, and a real output."""
    d = _steps(got, want, scale)
    assert d.max() <= 1 and (d == 0).mean() >= 0.97, (d.max(), (d == 0).mean())
    assert np.abs(want).max() > 20 * scale and (want != 0).mean() > 0.3


def _ops(plan: Any) -> list[str]:
    return [s["op"] for s in plan.graph["steps"]]


def _weight(plan: Any, step: dict[str, Any]) -> torch.Tensor:
    return plan.weights[plan.graph["values"][step["inputs"][1]]["const"]]


@pytest.mark.parametrize("kind, per_channel", [("MatMul", True), ("MatMul", False), ("Gemm", True), ("Gemm", False)])
def test_fp8_gemm_model_matches_reference_evaluator(tmp_path, kind: str, per_channel: bool) -> None:
    path, m = _gemm_model(str(tmp_path / "g.onnx"), kind, per_channel)
    plan = Builder().build(path, BuilderConfig(device="cpu", optimization_level=0))
    # the weight DQ folded, DQ -> Gemm (+ bias, Relu) -> Q one FP8 layer; the input's Q and output's DQ remain
    assert _ops(plan) == ["QuantizeLinear", "QGemm", "DequantizeLinear"], _ops(plan)
    step = plan.graph["steps"][1]
    assert step["tactic"] == "cpu.fp8_gemm" and step["attrs"]["out_dtype"] == 17
    assert len(step["attrs"]["w_scales"]) == (48 if per_channel else 1)
    w = _weight(plan, step)
    want_w = m.weights["w"] if kind == "Gemm" else m.weights["w"].T
    assert w.dtype == torch.float8_e4m3fn
    assert np.array_equal(w.view(torch.uint8).numpy(), np.ascontiguousarray(want_w).view(np.uint8))  # its own
    ref = ReferenceEvaluator(onnx.load(path))
    ctx = Engine(plan).create_execution_context()
    rng = np.random.default_rng(11)
    for _ in range(3):
        x = (rng.standard_normal((8, 64)) * 2).astype(np.float32)
        _agree(ctx.execute({"x": x})["y"], ref.run(None, {"x": x})[0], 0.05)


def test_fp8_projections_and_mlp(tmp_path) -> None:
    """A transformer block's GEMMs on [2, 4, 64] rows: Q/K/V projections of one float8 input (per-tensor weights of
    three scales) merge into one FP8 GEMM with their scales stacked; an MLP's two FP8 GEMMs pass float8 data
    straight from one to the other (the DQ -> Q pair between them cancels)."""
    m = _Model(2)
    x = m.qdq("x", 0.03)
    outs = {}
    for p in "qkv":
        proj = m.node("MatMul", [x, m.weight(f"w{p}", (64, 32), None)], p)
        outs[f"{p}_out"] = m.node("Identity", [m.qdq(proj, 0.04)], f"{p}_out")
    h = m.node("Add", [m.node("MatMul", [x, m.weight("w1", (64, 96), 1)], "m1"), m.bias("b1", 96)], "h1")
    a = m.qdq(m.node("Relu", [h], "a1"), 0.05)
    h2 = m.node("Add", [m.node("MatMul", [a, m.weight("w2", (96, 64), 1)], "m2"), m.bias("b2", 64)], "h2")
    m.node("Identity", [m.qdq(h2, 0.05)], "y")
    path = m.save(str(tmp_path / "t.onnx"), {"x": [2, 4, 64]},
                  {"y": [2, 4, 64], **{k: [2, 4, 32] for k in outs}})
    plan = Builder().build(path, BuilderConfig(device="cpu", optimization_level=0))
    steps = plan.graph["steps"]
    q = [s for s in steps if s["op"] == "QGemm"]
    assert len(q) == 3, _ops(plan)  # q+k+v merged, the MLP's two
    merged = next(s for s in q if len(s["attrs"]["w_scales"]) == 96 and s["attrs"]["out_dtype"] == 1)
    assert len(set(merged["attrs"]["w_scales"])) == 3  # each projection's own per-tensor scale, stacked
    first, second = (s for s in q if s is not merged)
    assert second["inputs"][0] == first["outputs"][0]  # float8 flows from one FP8 GEMM into the next
    ref = ReferenceEvaluator(onnx.load(path))
    ctx = Engine(plan).create_execution_context()
    x = (np.random.default_rng(12).standard_normal((2, 4, 64)) * 2).astype(np.float32)
    got, want = ctx.execute({"x": x}), dict(zip(["y", *outs], ref.run(["y", *outs], {"x": x})))
    _agree(got["y"], want["y"], 0.05)
    for k in outs:
        _agree(got[k], want[k], 0.04)


def test_fp8_conv_1x1_with_residual_and_3x3_left_float(tmp_path, capsys: pytest.CaptureFixture) -> None:
    """A 1x1 conv with a float8 residual becomes one FP8 layer; a 3x3 conv has no FP8 kernel: it stays float
    between its float8 Q/DQ nodes, and the build says so."""
    m = _Model(3)
    x = m.qdq("x", 0.02)
    c1 = m.node("Conv", [x, m.weight("w1", (32, 32, 1, 1), 0), m.bias("b1", 32)], "c1")
    s = m.node("Add", [c1, m.qdq("r", 0.04)], "s")
    a = m.qdq(m.node("Relu", [s], "a"), 0.05)
    c3 = m.node("Conv", [a, m.weight("w3", (16, 32, 3, 3), 0), m.bias("b3", 16)], "c3", pads=[1, 1, 1, 1])
    m.node("Identity", [m.qdq(c3, 0.1)], "y")
    path = m.save(str(tmp_path / "c.onnx"), {"x": [2, 32, 5, 5], "r": [2, 32, 5, 5]}, {"y": [2, 16, 5, 5]})
    plan = Builder().build(path, BuilderConfig(device="cpu", optimization_level=0))
    err = capsys.readouterr().err
    ops = _ops(plan)
    assert ops.count("QConv") == 1 and ops.count("FusedConv") == 1 and "Add" not in ops, ops
    qc = next(s for s in plan.graph["steps"] if s["op"] == "QConv")
    assert qc["tactic"] == "cpu.fp8_gemm" and len(qc["inputs"]) == 4
    assert "FP8: 1 conv/gemm layer(s) stay float between their float8 Q/DQ nodes" in err and "'c3'" in err
    assert "FP8: 1 layer(s) run on the CPU as float32 products" in err
    ref = ReferenceEvaluator(onnx.load(path))
    rng = np.random.default_rng(13)
    feed = {"x": (rng.standard_normal((2, 32, 5, 5)) * 2).astype(np.float32),
            "r": (rng.standard_normal((2, 32, 5, 5)) * 3).astype(np.float32)}
    got = Engine(plan).create_execution_context().execute(feed)["y"]
    d = _steps(got, ref.run(None, feed)[0], 0.1)
    # the 3x3 conv reads the FP8 layer's output: one step there can move its sum by one step of its own scale
    assert d.max() <= 2 and (d == 0).mean() >= 0.9, (d.max(), (d == 0).mean())


def test_plan_round_trip_keeps_float8_weights(tmp_path) -> None:
    path, m = _gemm_model(str(tmp_path / "g.onnx"), "Gemm", True)
    plan = Builder().build(path, BuilderConfig(device="cpu", optimization_level=0))
    out = tmp_path / "g.kiln"
    save_plan(plan, out)
    back = load_plan(out)
    step = next(s for s in back.graph["steps"] if s["op"] == "QGemm")
    w = _weight(back, step)
    assert w.dtype == torch.float8_e4m3fn and np.array_equal(w.view(torch.uint8).numpy(),
                                                              m.weights["w"].view(np.uint8))
    x = (np.random.default_rng(14).standard_normal((8, 64)) * 2).astype(np.float32)
    a = Engine(plan).create_execution_context().execute({"x": x})["y"]
    b = Engine(back).create_execution_context().execute({"x": x})["y"]
    assert np.array_equal(a, b) and np.abs(a).max() > 0


def _bad_model(path: str, what: str) -> str:
    m = _Model(4)
    x = m.qdq("x", 0.02)
    if what == "zero point":
        w = m.weight("w", (48, 64), 0, zero=0.5)
    else:  # 47 scales for 48 output channels
        w = m.weight("w", (48, 64), 0, scales=47)
    m.node("Gemm", [x, w], "y", transB=1)
    return m.save(path, {"x": [8, 64]}, {"y": [8, 48]})


@pytest.mark.parametrize("what, msg", [("zero point", "non-zero zero point"),
                                       ("scale shape", "per-axis scale of shape")])
def test_malformed_fp8_weights_one_line(tmp_path, capsys: pytest.CaptureFixture, what: str, msg: str) -> None:
    from kiln.cli.main import main
    path = _bad_model(str(tmp_path / "bad.onnx"), what)
    out = tmp_path / "bad.kiln"
    assert main(["build", path, "-o", str(out), "--device", "cpu"]) != 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("kiln: error:")]
    assert len(lines) == 1 and msg in lines[0] and "node 'w_dq'" in lines[0], err
    assert "Traceback" not in err and not out.exists()


def _float_model(path: str) -> str:
    """A float model: MatMul + bias + Relu, MatMul, reshaped to an image, 1x1 conv + Relu, 3x3 conv."""
    rng = np.random.default_rng(5)
    m = _Model(5)
    m.inits = [numpy_helper.from_array(np.array([2, 32, 4, 4], np.int64), "shape")]
    for name, a in (("w1", rng.standard_normal((64, 96)) / 8), ("w2", rng.standard_normal((96, 32)) / 10),
                    ("wc", rng.standard_normal((16, 32, 1, 1)) / 6), ("wc3", rng.standard_normal((8, 16, 3, 3)) / 12)):
        m.inits.append(numpy_helper.from_array(a.astype(np.float32), name))
    a1 = m.node("Relu", [m.node("Add", [m.node("MatMul", ["x", "w1"], "m1"), m.bias("b1", 96)], "h1")], "a1")
    img = m.node("Reshape", [m.node("Transpose", [m.node("MatMul", [a1, "w2"], "m2")], "t", perm=[0, 2, 1]), "shape"],
                 "img")
    m.node("Conv", [m.node("Relu", [m.node("Conv", [img, "wc"], "c1")], "r1"), "wc3"], "y", pads=[1, 1, 1, 1])
    return m.save(path, {"x": [2, 16, 64]}, {"y": [2, 8, 4, 4]})


def test_implicit_fp8_from_calibration(tmp_path, capsys: pytest.CaptureFixture) -> None:
    """BuilderConfig(fp8=True): the GEMM-shaped layers (two gemms, the 1x1 conv) become FP8 layers from calibrated
    ranges (amax / 448), float8 flows between the two gemms, the 3x3 conv stays float with no Q/DQ around it."""
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime runs the float model")
    path = _float_model(str(tmp_path / "f.onnx"))
    rng = np.random.default_rng(15)
    data = [{"x": rng.standard_normal((2, 16, 64)).astype(np.float32)} for _ in range(4)]
    plan = Builder().build(path, BuilderConfig(device="cpu", fp8=True, calibration_data=data, calibrator="minmax",
                                               optimization_level=0))
    ops = _ops(plan)
    assert ops.count("QGemm") == 2 and ops.count("QConv") == 1 and ops.count("FusedConv") == 1, ops
    assert "DequantizeLinear" not in ops and ops.count("QuantizeLinear") == 2, ops  # the input's, the conv's
    g1, g2 = (s for s in plan.graph["steps"] if s["op"] == "QGemm")
    assert g2["inputs"][0] == g1["outputs"][0] and g1["attrs"]["out_dtype"] == 17
    amax = max(float(np.abs(d["x"]).max()) for d in data)
    first_q = plan.graph["steps"][0]
    assert first_q["op"] == "QuantizeLinear"
    scale = plan.weights[plan.graph["values"][first_q["inputs"][1]]["const"]]
    assert float(scale) == pytest.approx(amax / 448, rel=1e-6)
    assert "FP8: 3 layer(s) run on the CPU" in capsys.readouterr().err
    x = rng.standard_normal((2, 16, 64)).astype(np.float32)
    want = ort.InferenceSession(path).run(None, {"x": x})[0]
    got = Engine(plan).create_execution_context().execute({"x": x})["y"]
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 1e-3 < rel < 0.15, rel  # float8 rounding of three layers' inputs and weights: visible, bounded


def test_cli_fp8_flags(tmp_path, capsys: pytest.CaptureFixture) -> None:
    from kiln.cli.main import main
    path = _float_model(str(tmp_path / "f.onnx"))
    ranges = tmp_path / "r.json"
    ranges.write_text('{"*": 6.0}')
    out = tmp_path / "f.kiln"
    assert main(["build", path, "-o", str(out), "--device", "cpu", "--fp8", "--dynamic-ranges", str(ranges),
                 "--opt-level", "0"]) == 0
    assert _ops(load_plan(out)).count("QGemm") == 2
    capsys.readouterr()
    for args, msg in ((["--fp8", "--int8", "--dynamic-ranges", str(ranges)], "choose one"),
                      (["--fp8"], "FP8 needs ranges")):
        bad = tmp_path / "bad.kiln"
        assert main(["build", path, "-o", str(bad), "--device", "cpu", *args]) != 0
        err = capsys.readouterr().err
        lines = [ln for ln in err.strip().splitlines() if ln.startswith("kiln: error:")]
        assert len(lines) == 1 and msg in lines[0] and "Traceback" not in err and not bad.exists(), err


def test_implicit_fp8_without_fp8_kernels_stays_float_and_says_so(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """A target with no FP8 kernel (cpu.fp8_gemm made to decline, as cuda.fp8_gemm does below compute capability
    8.9): the plan is the float one, with no float8 Q/DQ left behind, and the build warns."""
    from kiln.backends.cpu.fp8_gemm import CpuFp8Gemm
    monkeypatch.setattr(CpuFp8Gemm, "accepts", lambda self, node: False)
    path = _float_model(str(tmp_path / "f.onnx"))
    plan = Builder().build(path, BuilderConfig(device="cpu", fp8=True, dynamic_ranges={"*": 6.0},
                                               optimization_level=0))
    ops = _ops(plan)
    assert ops.count("FusedGemm") == 2 and ops.count("FusedConv") == 2, ops
    assert not {"QGemm", "QConv", "QuantizeLinear", "DequantizeLinear"} & set(ops), ops
    assert "FP8: 3 gemm/1x1 conv layer(s) got no FP8 kernel on cpu and stay float" in capsys.readouterr().err


def test_an_fp8_layer_no_fast_kernel_takes_is_named_in_a_warning(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An FP8 layer that ends on the reference tactic (its FP8 kernel failed when timed, as a wrong result does)
    runs exact but slowly: the build says so, naming it, instead of leaving a plan many times slower than its float twin without a word."""
    import io

    from kiln.backends.cpu.fp8_gemm import CpuFp8Gemm
    from kiln.logger import Logger, Severity
    path, _ = _gemm_model(str(tmp_path / "g.onnx"), "Gemm", True)
    log = io.StringIO()
    Builder(Logger(Severity.WARNING, log)).build(path, BuilderConfig(device="cpu", optimization_level=0))
    assert "no fast kernel" not in log.getvalue()
    def broken(self, node, config, device):  # noqa: ANN001, ANN202 - as the autotuner's check rejects a wrong kernel
        raise RuntimeError("this kernel is broken")
    monkeypatch.setattr(CpuFp8Gemm, "build", broken)
    plan = Builder(Logger(Severity.WARNING, log)).build(path, BuilderConfig(device="cpu", optimization_level=1))
    step = next(s for s in plan.graph["steps"] if s["op"] == "QGemm")
    assert step["tactic"] == "ref"
    assert f"1 FP8 layer(s) have no fast kernel here and run on the reference implementation (exact but slow): " \
           f"{step['name']}" in log.getvalue(), log.getvalue()
