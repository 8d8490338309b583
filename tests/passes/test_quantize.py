"""INT8 passes: Q/DQ models (onnxruntime's quantize_static) build to integer layers matching onnxruntime; explicit
dynamic ranges; bad INT8 input gets one clear error."""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from kiln.builder import Builder, BuilderConfig
from kiln.errors import BuildError, KilnError
from kiln.runtime import Engine

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is the oracle")

from kiln.testing import calibrated_int8_cpu, exact_int8_cpu  # noqa: E402

EXACT_INT8, NO_EXACT_INT8 = exact_int8_cpu()
needs_exact_int8 = pytest.mark.skipif(not EXACT_INT8, reason=NO_EXACT_INT8)
CALIBRATED_INT8, NO_CALIBRATED_INT8 = calibrated_int8_cpu()
needs_int8 = pytest.mark.skipif(not CALIBRATED_INT8, reason=NO_CALIBRATED_INT8)
quant = pytest.importorskip("onnxruntime.quantization", reason="onnxruntime's quantize_static writes the Q/DQ models")


class _Net(torch.nn.Module):
    """conv + relu, max pool, a residual block, flatten, gemm: the ops a Q/DQ CNN is made of."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.c3 = torch.nn.Conv2d(16, 16, 1)
        self.c4 = torch.nn.Conv2d(16, 8, 3, stride=2, padding=1, groups=8)
        self.fc = torch.nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
        z = torch.relu(self.c3(torch.relu(self.c2(y))) + y)
        return self.fc(torch.relu(self.c4(z)).flatten(1))


def _float_model(path: str) -> None:
    torch.manual_seed(0)
    torch.onnx.export(_Net().eval(), torch.randn(1, 3, 16, 16), path, input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False)


class _Reader(quant.CalibrationDataReader):
    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.it = iter([{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(8)])

    def get_next(self):  # noqa: ANN201 - onnxruntime's interface
        return next(self.it, None)


@pytest.fixture(scope="module", params=["u8_per_tensor", "s8_per_channel"])
def qdq_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("qdq")
    _float_model(str(d / "f.onnx"))
    act = quant.QuantType.QUInt8 if request.param.startswith("u8") else quant.QuantType.QInt8
    out = str(d / f"{request.param}.onnx")
    quant.quantize_static(str(d / "f.onnx"), out, _Reader(1), quant_format=quant.QuantFormat.QDQ,
                          activation_type=act, weight_type=quant.QuantType.QInt8,
                          per_channel=request.param.endswith("per_channel"))
    return out


def _npy_folder(tmp_path, n: int, seed: int):  # noqa: ANN001, ANN202 - pytest's tmp_path
    """A --calib folder of n seeded random input batches."""
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        np.save(calib / f"{i}.npy", rng.standard_normal((1, 3, 16, 16)).astype(np.float32))
    return calib


def _output_scale(path: str) -> float:
    m = onnx.load(path)
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.output[0].startswith("y"))
    init = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    return float(init[q.input[1]])


@needs_exact_int8
def test_qdq_model_builds_to_integer_layers_matching_onnxruntime(qdq_model: str) -> None:
    plan = Builder().build(qdq_model, BuilderConfig(device="cpu", optimization_level=0))
    steps = plan.graph["steps"]
    ops = [s["op"] for s in steps]
    assert ops.count("QConv") == 4 and ops.count("QGemm") == 1, ops
    assert all(s["tactic"] != "ref" for s in steps if s["op"] in ("QConv", "QGemm")), \
        [(s["name"], s["tactic"]) for s in steps]
    # int8 flows between the integer layers, the residual Add is inside the conv before it (with the model's Q/DQ
    # pair between them kept): only the model input's Q and the output's DQ remain
    assert "Add" not in ops and "Pointwise" not in ops, ops
    assert ops.count("QuantizeLinear") + ops.count("DequantizeLinear") <= 2, ops
    _matches_the_qdq_model(plan, qdq_model, seed=7)


def _matches_the_qdq_model(plan: Any, qdq_model: str, seed: int) -> None:
    """The plan's output within one output quantization step of onnxruntime running the Q/DQ model as written (graph
    optimizations off: DequantizeLinear -> float ops -> QuantizeLinear, the Q/DQ semantics in float32; optimized,
    it fuses integer kernels whose u8 x s8 products saturate 16-bit pair sums on x86 CPUs without VNNI
    (vpmaddubsw), so it is no oracle there), on fresh random inputs."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(qdq_model, opts)
    ctx = Engine(plan).create_execution_context()
    step = _output_scale(qdq_model)
    rng = np.random.default_rng(seed)
    for _ in range(4):
        x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
        want = sess.run(None, {"x": x})[0]
        got = ctx.execute({"x": x})["y"]
        assert np.abs(got - want).max() <= step * 1.001, (np.abs(got - want).max(), step)
        assert np.abs(want).max() > 10 * step  # a real output, not a saturated constant


def test_int8_without_vnni_builds_uint8_layers_with_7_bit_weights(tmp_path, qdq_model: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """On an x86 CPU without VNNI (simulated here; real on AVX2-only CPUs) oneDNN's int8 kernels are exact only for
    uint8 inputs and weights within +-64. Kiln's calibrated INT8 quantizes so (uint8 activations with zero point
    128, or 0 where never negative; 7-bit per-channel weights) and builds every layer on an integer kernel; a Q/DQ model's full-range layers
    stay float between their Q/DQ steps, and the build says why in one warning."""
    import io

    import kiln.backends.cpu.features as features
    from kiln.logger import Logger, Severity
    if not CALIBRATED_INT8:
        pytest.skip(NO_CALIBRATED_INT8)
    monkeypatch.setattr(features, "exact_int8", lambda: False)
    path = str(tmp_path / "f.onnx")
    _float_model(path)
    log = io.StringIO()
    builder = Builder(Logger(Severity.WARNING, log))
    ops = _ranged_int8_build_close_to_float(path, builder, seed=5)
    assert ops.count("QConv") == 4 and ops.count("QGemm") == 1, ops
    plan = builder.build(path, BuilderConfig(device="cpu", int8=True, dynamic_ranges={"*": 8.0},
                                             optimization_level=0))
    layers = [s for s in plan.graph["steps"] if s["op"] in ("QConv", "QGemm")]
    assert all(s["tactic"] in ("cpu.qconv_dnnl", "cpu.qgemm_dnnl") for s in layers), layers
    for s in layers:
        assert plan.graph["values"][s["inputs"][0]]["type"]["dtype"] == "uint8"
        w = plan.weights[plan.graph["values"][s["inputs"][1]]["const"]]
        assert w.dtype == torch.int8 and int(w.abs().max()) == 64  # each channel's largest weight on +-64
    # zero point 128 for the model input, 0 for the ReLU outputs (the same int8 grid, no zero-point correction)
    assert [s["attrs"]["x_zero_point"] for s in layers] == [128, 0, 0, 0, 0], layers
    assert "no VNNI" not in log.getvalue()
    # a Q/DQ model's own full-range int8 weights: those layers stay float, with one warning
    plan = builder.build(qdq_model, BuilderConfig(device="cpu", optimization_level=0))
    ops = [s["op"] for s in plan.graph["steps"]]
    assert "QConv" not in ops and "QGemm" not in ops, ops
    assert "no VNNI" in log.getvalue()


def test_a_plan_with_full_range_int8_layers_is_refused_without_vnni_saying_why(tmp_path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan whose int8 layers were built where oneDNN is exact for them (VNNI: int8 inputs, 8-bit weights), loaded
    on a CPU without VNNI (both simulated): refused with one error naming the reason and what to do."""
    import kiln.backends.cpu.features as features
    from kiln.errors import PlanFormatError
    from kiln.plan.format import load_plan, save_plan
    if not CALIBRATED_INT8:
        pytest.skip(NO_CALIBRATED_INT8)
    path = str(tmp_path / "f.onnx")
    _float_model(path)
    monkeypatch.setattr(features, "exact_int8", lambda: True)
    plan = Builder().build(path, BuilderConfig(device="cpu", int8=True, dynamic_ranges={"*": 8.0},
                                               optimization_level=0))
    assert "QConv" in [s["op"] for s in plan.graph["steps"]]
    out = str(tmp_path / "f.kiln")
    save_plan(plan, out)
    monkeypatch.setattr(features, "exact_int8", lambda: False)
    with pytest.raises(PlanFormatError, match="no VNNI.*rebuild the plan on this machine"):
        Engine(load_plan(out))


def test_reduce_range_qdq_model_builds_integer_layers_without_vnni(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime's quantize_static with reduce_range=True (7-bit weights) and uint8 activations - what its docs
    advise for CPUs without VNNI - writes layers oneDNN computes exactly there: on such a CPU (simulated) every
    conv/gemm builds integer, with no VNNI warning, matching onnxruntime within one output step."""
    import io

    import kiln.backends.cpu.features as features
    from kiln.logger import Logger, Severity
    if not CALIBRATED_INT8:
        pytest.skip(NO_CALIBRATED_INT8)
    _float_model(str(tmp_path / "f.onnx"))
    path = str(tmp_path / "q.onnx")
    quant.quantize_static(str(tmp_path / "f.onnx"), path, _Reader(1), quant_format=quant.QuantFormat.QDQ,
                          activation_type=quant.QuantType.QUInt8, weight_type=quant.QuantType.QInt8,
                          per_channel=True, reduce_range=True)
    monkeypatch.setattr(features, "exact_int8", lambda: False)
    log = io.StringIO()
    plan = Builder(Logger(Severity.WARNING, log)).build(path, BuilderConfig(device="cpu", optimization_level=0))
    steps = plan.graph["steps"]
    ops = [s["op"] for s in steps]
    assert ops.count("QConv") == 4 and ops.count("QGemm") == 1, ops
    assert all(s["tactic"] != "ref" for s in steps if s["op"] in ("QConv", "QGemm"))
    assert "VNNI" not in log.getvalue(), log.getvalue()
    _matches_the_qdq_model(plan, path, seed=9)


def test_qdq_pairs_around_float_layers_run_as_one_float_pass(qdq_model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the layers of a Q/DQ model stay float (here: a CPU without VNNI, simulated, and the model's full-range
    weights), each Q -> DQ pair becomes the float ops computing it (kiln.passes.quantize.FloatQuantizeDequantize),
    fused with the elementwise ops around into Pointwise passes: no 8-bit tensor and no Q/DQ layer is left, and the
    result is still the Q/DQ model's (onnxruntime running it as written) within one output quantization step. A pair
    with an op between (Q -> MaxPool or Flatten on the 8-bit values -> DQ) becomes the float ops and that op on
    their float result."""
    import kiln.backends.cpu.features as features
    import io

    from kiln.logger import Logger, Severity
    monkeypatch.setattr(features, "exact_int8", lambda: False)
    log = io.StringIO()
    plan = Builder(Logger(Severity.WARNING, log)).build(qdq_model, BuilderConfig(device="cpu", optimization_level=0))
    assert "no conv/gemm layer got an integer" in log.getvalue()  # its conv layers stayed float: said, and why
    assert "no VNNI" in log.getvalue() and "5 conv/gemm layer(s)" in log.getvalue(), log.getvalue()
    steps = plan.graph["steps"]
    ops = [s["op"] for s in steps]
    assert not {"QConv", "QGemm"} & set(ops) and "Pointwise" in ops, ops
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops, ops  # the max pool, flatten on floats
    assert "MaxPool" in ops and all(plan.graph["values"][v]["type"]["dtype"] == "float32"
                                    for s in steps for v in s["outputs"])
    _matches_the_qdq_model(plan, qdq_model, seed=8)


@pytest.mark.parametrize("dtype, zp", [(np.int8, 0), (np.int8, -7), (np.uint8, 128), (np.uint8, 3)])
def test_float_qdq_pair_is_bit_equal_to_the_pair(tmp_path, dtype: Any, zp: int) -> None:
    """Q -> DQ -> Relu with no layer between (so the pair stays float on every target): the build computes it in
    float, bit-equal to the ONNX reference evaluator's QuantizeLinear / DequantizeLinear on random values, exact
    rounding ties (half to even) and values far past the 8-bit range."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator
    scale = np.float32(0.0371)
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "s"), numpy_helper.from_array(np.array(zp, dtype), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]), helper.make_node("Relu", ["d"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])  # the evaluator's lowest Q/DQ
    path = str(tmp_path / "qdq.onnx")
    onnx.save(model, path)
    import io

    from kiln.logger import Logger, Severity
    log = io.StringIO()
    plan = Builder(Logger(Severity.WARNING, log)).build(path, BuilderConfig(device="cpu", optimization_level=0))
    ops = [s["op"] for s in plan.graph["steps"]]
    assert ops == ["Pointwise"], ops  # the pair and the Relu: one pass
    assert "no conv/gemm layer" not in log.getvalue()  # there is none to make integer: nothing to warn about
    rng = np.random.default_rng(abs(zp) + 1)
    x = (rng.standard_normal((4, 64)) * 4).astype(np.float32)
    x[0, :32] = (np.arange(-16, 16) + np.float32(0.5)) * scale  # ties (up to x / s's own float32 rounding)
    x[1, :8] = [1e3, -1e3, 300 * scale, -300 * scale, 0.0, -0.0, 1e-30, -1e-30]
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    got = Engine(plan).create_execution_context().execute({"x": x})["y"]
    assert np.array_equal(got, want), np.abs(got - want).max()
    assert len(np.unique(want)) > 20  # a real quantization grid, not a saturated constant


@pytest.mark.parametrize("between", ["MaxPool", "Flatten"])
def test_float_qdq_pair_around_a_moving_op_is_bit_equal(tmp_path, between: str) -> None:
    """Q -> MaxPool / Flatten on the 8-bit values -> DQ (as PropagateQuantization leaves a Q/DQ model): the float
    pair and the op on its float result, bit-equal to the ONNX reference evaluator running the model as written."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator
    inits = [numpy_helper.from_array(np.array(0.0413, np.float32), "s"), numpy_helper.from_array(np.array(9, np.uint8), "z")]
    mid = (helper.make_node("MaxPool", ["q"], ["m"], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1])
           if between == "MaxPool" else helper.make_node("Flatten", ["q"], ["m"], axis=1))
    out_shape = [1, 4, 5, 5] if between == "MaxPool" else [1, 256]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), mid,
             helper.make_node("DequantizeLinear", ["m", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    path = str(tmp_path / "qdq.onnx")
    onnx.save(model, path)
    plan = Builder().build(path, BuilderConfig(device="cpu", optimization_level=0))
    ops = [s["op"] for s in plan.graph["steps"]]
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops, ops
    x = (np.random.default_rng(3).standard_normal((1, 4, 8, 8)) * 3).astype(np.float32)
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    got = Engine(plan).create_execution_context().execute({"x": x})["y"]
    assert got.shape == want.shape and np.array_equal(got, want), np.abs(got - want).max()
    assert len(np.unique(want)) > 20


def _ranged_int8_build_close_to_float(path: str, builder: Builder, seed: int) -> list[str]:
    """Build `path` for the CPU with INT8 ranges of +-8 everywhere; its output on a random input within 20% of
    onnxruntime's FP32 (normwise) and not equal to it; the plan's step ops."""
    plan = builder.build(path, BuilderConfig(device="cpu", int8=True, dynamic_ranges={"*": 8.0},
                                             optimization_level=0))
    x = np.random.default_rng(seed).standard_normal((1, 3, 16, 16)).astype(np.float32)
    want = ort.InferenceSession(path).run(None, {"x": x})[0]
    got = Engine(plan).create_execution_context().execute({"x": x})["y"]
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 0 < rel < 0.2, rel
    return [s["op"] for s in plan.graph["steps"]]


@needs_int8
def test_dynamic_ranges_build_integer_layers(tmp_path) -> None:
    path = str(tmp_path / "f.onnx")
    _float_model(path)
    ops = _ranged_int8_build_close_to_float(path, Builder(), seed=3)
    assert ops.count("QConv") == 4 and ops.count("QGemm") == 1, ops


@needs_int8
def test_max_pool_between_layers_keeps_one_scale(tmp_path) -> None:
    """A max pool's output range wider than its input's (entropy calibration gives that): both sides take the
    wider scale, so the int8 data flows conv -> pool -> conv with no requantization between."""
    path = str(tmp_path / "f.onnx")
    _float_model(path)
    pool = next(n for n in onnx.load(path).graph.node if n.op_type == "MaxPool")
    ranges = {pool.input[0]: 2.0, pool.output[0]: 3.0, "*": 8.0}
    plan = Builder().build(path, BuilderConfig(device="cpu", int8=True, dynamic_ranges=ranges, optimization_level=0))
    steps = plan.graph["steps"]
    ops = [s["op"] for s in steps]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 0, ops  # the input's only
    first = next(s for s in steps if s["op"] == "QConv")
    assert first["attrs"]["y_scale"] == pytest.approx(3.0 / 127, rel=1e-6)
    reader = next(s for s in steps if s["op"] == "MaxPool")
    assert reader["inputs"][0] == first["outputs"][0]


def test_int8_without_ranges_is_one_clear_error(tmp_path) -> None:
    path = str(tmp_path / "f.onnx")
    _float_model(path)
    with pytest.raises(BuildError, match="INT8 needs ranges"):
        Builder().build(path, BuilderConfig(device="cpu", int8=True))


@pytest.mark.parametrize("content, msg", [
    ("[1, 2]", "JSON object"),
    ('{"x": "big"}', "number or"),
    ('{"x": [3, 1]}', "lo <= hi"),
    ('{"x": NaN}', "finite"),
    ("{not json", "cannot read"),
])
def test_crafted_dynamic_ranges_file(tmp_path, content: str, msg: str) -> None:
    from kiln.cli.main import main
    path = str(tmp_path / "f.onnx")
    _float_model(path)
    rf = tmp_path / "ranges.json"
    rf.write_text(content)
    out = tmp_path / "f.kiln"
    with pytest.raises(KilnError, match=msg):
        from kiln.quant.calibrate import read_ranges_file
        from kiln.quant.build import explicit_ranges
        from kiln.logger import Logger
        from kiln.frontend.onnx import load_onnx
        explicit_ranges(load_onnx(path), read_ranges_file(str(rf)), set(), Logger())
    assert main(["build", path, "-o", str(out), "--device", "cpu", "--int8", "--dynamic-ranges", str(rf)]) != 0
    assert not out.exists()


@needs_int8
def test_cli_int8_calibration_folder_and_cache(tmp_path, capsys: pytest.CaptureFixture) -> None:
    from kiln.cli.main import main
    path = str(tmp_path / "f.onnx")
    _float_model(path)
    calib = _npy_folder(tmp_path, 4, 5)
    cache = tmp_path / "calib.json"
    out = tmp_path / "f.kiln"
    assert main(["build", path, "-o", str(out), "--device", "cpu", "--int8", "--calib", str(calib),
                 "--calibrator", "minmax", "--calib-cache", str(cache), "--opt-level", "0"]) == 0
    ranges = json.loads(cache.read_text())["ranges"]
    assert ranges and all(v > 0 for v in ranges.values())
    # the cache alone rebuilds the same integer plan
    out2 = tmp_path / "f2.kiln"
    assert main(["build", path, "-o", str(out2), "--device", "cpu", "--int8", "--calib-cache", str(cache),
                 "--opt-level", "0"]) == 0
    from kiln.plan.format import load_plan
    a, b = load_plan(str(out)), load_plan(str(out2))
    assert [s["op"] for s in a.graph["steps"]] == [s["op"] for s in b.graph["steps"]]
    assert "QConv" in [s["op"] for s in a.graph["steps"]]
    # --calib without --int8 is refused
    assert main(["build", path, "-o", str(tmp_path / "x.kiln"), "--calib", str(calib)]) != 0
    assert "go with --int8" in capsys.readouterr().err


@needs_int8
def test_cli_int8_report_and_budget(tmp_path, capsys: pytest.CaptureFixture) -> None:
    from kiln.cli.main import main
    path = str(tmp_path / "f.onnx")
    _float_model(path)
    calib = _npy_folder(tmp_path, 5, 9)
    out = tmp_path / "f.kiln"
    assert main(["build", path, "-o", str(out), "--device", "cpu", "--int8", "--calib", str(calib), "--int8-report",
                 "--accuracy-budget", "1e-9", "--layer-precisions", "/c4/Conv:fp16", "--opt-level", "0"]) == 0
    text = capsys.readouterr().out
    assert "outputs' relative error" in text and "kept in float for the budget" in text
    from kiln.plan.format import load_plan
    steps = {s["name"]: s["op"] for s in load_plan(str(out)).graph["steps"]}
    assert steps["/c4/Conv"] == "FusedConv"  # the precision constraint keeps it out of INT8
    # an unreachable budget ends with every layer back in float, and says so
    assert "QConv" not in steps.values() and "QGemm" not in steps.values()
    assert main(["build", path, "-o", str(out), "--int8-report"]) != 0
    assert main(["build", path, "-o", str(out), "--int8", "--layer-precisions", "/c4/Conv:int4"]) != 0


def test_cli_int8_calibration_from_images(tmp_path, capsys: pytest.CaptureFixture) -> None:
    Image = pytest.importorskip("PIL.Image", reason="Pillow (the test extra) writes the calibration images")
    from kiln.cli.main import main
    path = str(tmp_path / "f.onnx")
    _float_model(path)
    calib = tmp_path / "images"
    calib.mkdir()
    rng = np.random.default_rng(21)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(calib / f"{i}.png")
    cache = tmp_path / "c.json"
    args = ["build", path, "-o", str(tmp_path / "f.kiln"), "--device", "cpu", "--int8", "--calib", str(calib),
            "--calibrator", "minmax", "--calib-cache", str(cache), "--opt-level", "0"]
    assert main(args) != 0  # images without a stated preprocessing
    assert "--calib-preprocess" in capsys.readouterr().err
    assert main(args + ["--calib-preprocess", "resize=18;crop=16;mean=0.5;std=0.25"]) == 0
    ranges = json.loads(cache.read_text())["ranges"]
    # the model input's range is the preprocessed pixels': (255/255 - 0.5) / 0.25 = 2 at most, near it for noise
    assert 1.5 < ranges["x"] <= 2.0 + 1e-6, ranges["x"]
    (calib / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    assert main(args + ["--calib-preprocess", "crop=16"]) != 0
    assert "cannot decode image" in capsys.readouterr().err
    assert main(args + ["--calib-preprocess", "crop=16;colour=red"]) != 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to build for the CUDA target")
def test_qdq_model_on_cuda_matches_onnxruntime(qdq_model: str) -> None:
    plan = Builder().build(qdq_model, BuilderConfig(device="cuda", optimization_level=1))
    steps = plan.graph["steps"]
    ints = [s for s in steps if s["op"] in ("QConv", "QGemm")]
    assert len(ints) == 4 and all(s["tactic"].startswith("cuda.") for s in ints), [(s["name"], s["tactic"]) for s in steps]
    sess = ort.InferenceSession(qdq_model)
    ctx = Engine(plan).create_execution_context()
    step = _output_scale(qdq_model)
    x = np.random.default_rng(17).standard_normal((1, 3, 16, 16)).astype(np.float32)
    got = np.asarray(ctx.execute({"x": x})["y"])
    assert np.abs(got - sess.run(None, {"x": x})[0]).max() <= step * 1.001
