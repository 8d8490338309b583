"""Per-layer formats (element type + memory layout) recorded by the builder and shown by `kiln inspect`.

The oracle is a fresh load of the saved plan run on new random inputs at the opt shape, each step's tensors
captured as the kernels get and return them (the step hook for outputs, a wrapper of each step's call for inputs)
and described from torch's own contiguity tests (`is_contiguous`, `memory_format=torch.channels_last`). Known
facts about the CPU kernels are checked beside it: a graph input arrives NCHW, oneDNN convolutions write NHWC,
producers of an elided Concat write NHWC channel slices of its buffer, a constant Slice is a view, GEMM rows
are row-major, shape layers run on the host, integer layers write int8.
"""
from __future__ import annotations

import hashlib
import json
import re
import struct

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.cpu.dnnl import library
from kiln.backends.tactic import get_tactic
from kiln.builder import Builder, BuilderConfig, OptimizationProfile
from kiln.cli.main import main
from kiln.errors import PlanFormatError
from kiln.logger import Logger, Severity
from kiln.plan.format import load_plan, save_plan
from kiln.plan.formats import layout_of, make_record, parse_record
from kiln.testing import calibrated_int8_cpu
from kiln.runtime.engine import Engine

SHORT = {torch.float32: "fp32", torch.int8: "int8", torch.uint8: "uint8", torch.int64: "int64"}


def _cnn(rng):
    """conv+BN+ReLU, conv + residual Add + ReLU, global pool, flatten, gemm, softmax."""
    def f(*s):
        return rng.standard_normal(s).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("w1", f(8, 3, 3, 3)), ("b1", f(8)), ("s", np.abs(f(8)) + 0.5), ("bb", f(8)), ("m", f(8)),
        ("v", np.abs(f(8)) + 0.5), ("w2", f(8, 8, 3, 3)), ("b2", f(8)), ("wf", f(5, 8)), ("bf", f(5))]]
    mk = helper.make_node
    nodes = [mk("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             mk("BatchNormalization", ["c1", "s", "bb", "m", "v"], ["n1"], name="bn1"),
             mk("Relu", ["n1"], ["r1"], name="relu1"),
             mk("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             mk("Add", ["c2", "r1"], ["a"], name="add"), mk("Relu", ["a"], ["r2"], name="relu2"),
             mk("GlobalAveragePool", ["r2"], ["g"], name="gap"), mk("Flatten", ["g"], ["fl"], name="flatten"),
             mk("Gemm", ["fl", "wf", "bf"], ["y0"], name="fc", transB=1), mk("Softmax", ["y0"], ["y"], name="softmax")]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _views(rng):
    """Dynamic batch: two 1x1 convs into a Concat (elided: they write its channel slices), a 3x3 conv, a max pool,
    a constant channel Slice (a view), a Reshape to rows, a GEMM, and a position term computed from the input's
    shape alone (Shape/Gather/Range/Cast/Unsqueeze: host layers). Outputs y and the Concat's c."""
    def f(*s):
        return rng.standard_normal(s).astype(np.float32)
    ints = [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("s0", 0), ("s1", 4), ("ax", 1))]
    ints += [helper.make_tensor("zero", TensorProto.INT64, [], [0]), helper.make_tensor("one", TensorProto.INT64, [], [1]),
             helper.make_tensor("rows", TensorProto.INT64, [2], [0, -1])]
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("wa", f(8, 3, 1, 1)), ("ba", f(8)), ("wb", f(8, 3, 1, 1)), ("bb", f(8)), ("wc", f(8, 16, 3, 3)),
        ("wf", f(16, 6)), ("bf", f(6))]] + ints
    mk = helper.make_node
    nodes = [mk("Conv", ["x", "wa", "ba"], ["a0"], name="conv_a"), mk("Relu", ["a0"], ["a"], name="relu_a"),
             mk("Conv", ["x", "wb", "bb"], ["b0"], name="conv_b"), mk("Sigmoid", ["b0"], ["b"], name="sig_b"),
             mk("Concat", ["a", "b"], ["c"], axis=1, name="cat"),
             mk("Conv", ["c", "wc"], ["d"], name="conv_c", pads=[1, 1, 1, 1]),
             mk("MaxPool", ["d"], ["p"], name="pool", kernel_shape=[4, 4], strides=[4, 4]),
             mk("Slice", ["p", "s0", "s1", "ax"], ["h"], name="half"),
             mk("Reshape", ["h", "rows"], ["flat"], name="flatten"), mk("Tanh", ["flat"], ["t"], name="tanh"),
             mk("MatMul", ["t", "wf"], ["mm"], name="fc"), mk("Add", ["mm", "bf"], ["y0"], name="bias"),
             mk("Shape", ["x"], ["xs"], name="xshape"), mk("Gather", ["xs", "zero"], ["nb"], name="batch", axis=0),
             mk("Range", ["zero", "nb", "one"], ["r"], name="range"), mk("Cast", ["r"], ["rf"], name="cast", to=1),
             mk("Unsqueeze", ["rf", "ax"], ["ru"], name="unsq"), mk("Add", ["y0", "ru"], ["y"], name="pos")]
    g = helper.make_graph(nodes, "views", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6]),
                           helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 16, 8, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _gated(rng):
    """A gated block on [N, H, W, C] rows (MambaOut's): a GEMM, a Split of its last axis into column views, a depthwise
    conv on one part (Transposes to NCHW and back), a Concat of the last axis, Sigmoid(g) * the Concat, a GEMM."""
    def f(*s):
        return rng.standard_normal(s).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for n, a in [("w1", f(16, 64)), ("b1", f(64)), ("wd", f(16, 1, 3, 3)),
                                                         ("w2", f(32, 16))]]
    inits.append(helper.make_tensor("parts", TensorProto.INT64, [3], [32, 16, 16]))
    mk = helper.make_node
    nodes = [mk("MatMul", ["x", "w1"], ["m1"], name="fc1"), mk("Add", ["m1", "b1"], ["h"], name="fc1_bias"),
             mk("Split", ["h", "parts"], ["g", "i", "c"], axis=-1, name="split"),
             mk("Transpose", ["c"], ["cn"], perm=[0, 3, 1, 2], name="to_nchw"),
             mk("Conv", ["cn", "wd"], ["cd"], group=16, pads=[1, 1, 1, 1], name="dwconv"),
             mk("Transpose", ["cd"], ["cr"], perm=[0, 2, 3, 1], name="to_rows"),
             mk("Concat", ["i", "cr"], ["cat"], axis=-1, name="cat"), mk("Sigmoid", ["g"], ["sg"], name="sig"),
             mk("Mul", ["sg", "cat"], ["gated"], name="gate"), mk("MatMul", ["gated", "w2"], ["y"], name="fc2")]
    g = helper.make_graph(nodes, "gated", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 16])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


PLANS = {
    "cnn": (_cnn, dict(optimization_level=1)),
    "gated": (_gated, dict(optimization_level=1)),
    "views": (_views, dict(optimization_level=1, profiles=[
        OptimizationProfile().set_shape("x", (1, 3, 8, 8), (3, 3, 8, 8), (4, 3, 8, 8))])),
    "int8": (_cnn, dict(optimization_level=0, int8=True, int8_by_speed=False, dynamic_ranges={"*": 4.0})),
}


@pytest.fixture(scope="module", params=sorted(PLANS))
def built(request, tmp_path_factory):
    """(name, saved plan path) of a freshly built CPU plan."""
    make, opts = PLANS[request.param]
    path = tmp_path_factory.mktemp("formats") / f"{request.param}.kiln"
    save_plan(Builder(Logger(Severity.ERROR)).build(make(np.random.default_rng()), BuilderConfig(device="cpu", **opts)),
              path)
    return request.param, str(path)


# ---- the oracle --------------------------------------------------------------------------------------------------

def _oracle_format(x) -> str:
    """A runtime value described from torch's contiguity tests (and, for a strided 4-D view, its stride order)."""
    if not isinstance(x, torch.Tensor):
        return "-"
    dtype = SHORT[x.dtype]
    if x.is_contiguous():
        return f"{dtype} {'NCHW' if x.dim() == 4 else 'row-major'}"
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return f"{dtype} NHWC"
    assert x.untyped_storage().nbytes() > x.numel() * x.element_size()  # a view into a larger buffer
    order = tuple(sorted(range(x.dim()), key=lambda k: -x.stride(k)))
    names = {(0, 1, 2, 3): "NCHW view", (0, 2, 3, 1): "NHWC view"} if x.dim() == 4 else {
        tuple(range(x.dim())): "row-major view"}
    return f"{dtype} {names.get(order, 'strided')}"


def _observed(path: str, seed: int) -> dict[str, str]:
    """Each main-graph layer's "<inputs> -> <outputs>" seen on a fresh load run once on new inputs at the opt shape."""
    engine = Engine.load(path)
    fn = engine.function
    seen: dict[str, str] = {}

    def hook(node, seconds, result):
        outs = result if len(node.outputs) > 1 else (result[0] if isinstance(result, tuple) else result,)
        for v, r in zip(node.outputs, outs):
            seen.setdefault(v.name, _oracle_format(r))
    for st in fn.steps:  # what each kernel is handed
        def call(*args, _f=st.fn, _n=st.node, **kw):
            for v, a in zip(_n.inputs, args):
                if v is not None and not v.is_const:
                    seen.setdefault(v.name, _oracle_format(a))
            return _f(*args, **kw)
        st.fn = call
    ctx = engine.create_execution_context()
    ctx.profiler = hook
    rng = np.random.default_rng(seed)
    plan = engine.plan
    feeds = {}
    for spec in plan.inputs:
        shape = [d if isinstance(d, int) else plan.profiles[0][spec["name"]]["opt"][k] for k, d in enumerate(spec["shape"])]
        feeds[spec["name"]] = rng.standard_normal(shape).astype(np.float32)
    ctx.execute(feeds)
    host = {fn.graph.nodes[i].name for i in fn.prologue_nodes}
    out = {}
    for n in engine.graph.nodes:
        if n.name in host:
            out[n.name] = "host"
        else:
            ins = [seen.get(v.name, "-") for v in n.inputs if v is not None and not v.is_const]
            out[n.name] = make_record(ins, [seen.get(v.name, "-") for v in n.outputs])
    return out


def _inspect_json(capsys, path: str) -> dict:
    assert main(["inspect", path, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


# ---- recorded against observed -------------------------------------------------------------------------------------

def test_recorded_formats_are_what_the_kernels_produce(built, capsys):
    name, path = built
    want = _observed(path, seed=int(np.random.default_rng().integers(1 << 30)))
    plan = load_plan(path)
    assert plan.build["formats"] == want
    doc = _inspect_json(capsys, path)
    assert doc["formats_recorded"] and doc["formats_note"] is None
    for r in doc["layers"]:
        rec = parse_record(want[r["name"]])
        assert r["formats"] == ({"host": True, "inputs": [], "outputs": []} if rec is None else
                                {"host": False, "inputs": rec[0], "outputs": rec[1]})
        if not r["formats"]["host"]:  # one format per runtime input the table lists
            assert len(r["formats"]["inputs"]) == len(r["inputs"])
            assert len(r["formats"]["outputs"]) == len(r["outputs"])
    rows = {r["name"]: r for r in doc["layers"]}
    tactic = {s["name"]: s["tactic"] for s in plan.graph["steps"]}
    if name == "cnn":
        assert rows["conv1"]["formats"]["inputs"] == ["fp32 NCHW"]  # the graph input as fed
        assert rows["fc"]["formats"]["outputs"] == ["fp32 row-major"]
    if name == "views":
        assert tactic["half"] == "view.slice" and rows["half"]["formats"]["outputs"][0].endswith(" view")
        assert rows["flatten"]["formats"]["outputs"] == ["fp32 row-major"]
        assert {"xshape", "batch", "range", "cast", "unsq"} <= {n for n, r in rows.items() if r["formats"]["host"]}
    if name == "gated":  # rows in, rows out: the Pointwise and the Concat take their inputs' row-major form
        gate = next(n for n, r in rows.items() if r["op"] == "Pointwise")
        assert rows[gate]["formats"]["inputs"][0] == "fp32 NCHW view"  # the Split's column view g: 4-D rows
        assert rows[gate]["formats"]["outputs"] == ["fp32 NCHW"]  # rows (4-D contiguous), not a channels-last scatter
        assert rows["cat"]["formats"]["outputs"] == ["fp32 NCHW"]
    if library() is None:
        return  # what follows is about oneDNN's kernels (and the elision their 1x1 convolutions allow)
    dnnl_convs = [n for n, t in tactic.items() if t in ("cpu.conv_dnnl", "cpu.conv_onednn", "cpu.conv_winograd")]
    for n in dnnl_convs:  # oneDNN's convolutions write channels-last, whatever they read
        assert rows[n]["formats"]["outputs"] == ["fp32 NHWC"]
    if name == "views":
        # the autotuner may time a convolution that cannot write a slice as faster even with the copy it leaves to
        # the Concat (on a loaded machine it does): the Concat is then laid out in place for the others only
        in_place = [n for n in ("conv_a", "conv_b") if (t := get_tactic(tactic[n])) and t.writes_out and t.strided_out]
        if in_place:
            assert tactic["cat"] == ("concat.elide" if len(in_place) == 2 else "concat.partial")
        else:
            assert tactic["cat"] not in ("concat.elide", "concat.partial")
        for n in in_place:  # each writes its channel slice of the Concat's channels-last buffer
            assert rows[n]["formats"]["outputs"] == ["fp32 NHWC view"]
        if len(in_place) == 2:
            assert rows["cat"]["formats"] == {"host": False, "inputs": ["fp32 NHWC view"] * 2,
                                              "outputs": ["fp32 NHWC"]}
        assert rows["half"]["formats"]["outputs"] == ["fp32 NHWC view"]  # a channel slice of the pool's NHWC output
    if name == "int8":
        ok, why = calibrated_int8_cpu()
        if not ok:
            pytest.skip(why)
        qconv = [n for n, s in rows.items() if s["op"] == "QConv"]
        assert qconv and all(rows[n]["formats"]["outputs"][0].split()[1] == "NHWC" for n in qconv)
        quant = [n for n, s in rows.items() if s["op"] == "QuantizeLinear"]
        # the quantized graph input: cpu.qdq_c writes it channels-last, the reference in the input's NCHW
        from kiln.backends.cpu.features import int8_activation_zero_point
        q8 = "uint8" if int8_activation_zero_point("cpu") else "int8"  # uint8 where the CPU has no VNNI
        want = f"{q8} NHWC" if tactic[quant[0]] == "cpu.qdq_c" else f"{q8} NCHW"
        assert rows[quant[0]]["formats"]["outputs"] == [want]
        assert rows[qconv[0]]["formats"]["inputs"] == [want]
        assert f"{q8} NHWC" in {f for n in qconv for f in rows[n]["formats"]["outputs"]}


def test_text_and_report_show_the_formats(built, capsys, tmp_path):
    name, path = built
    doc = _inspect_json(capsys, path)
    report = tmp_path / "r.html"
    assert main(["inspect", path, "--report", str(report)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.lstrip().startswith("# ") and "Layer" in line)
    assert "Format (in -> out)" in lines[head]
    col = lines[head].index("Format (in -> out)")
    cells = [row[col:].split("  ")[0].strip() for row in lines[head + 1:head + 1 + len(doc["layers"])]]
    assert lines[head + 1 + len(doc["layers"])] == f"wrote {report}"
    want = []
    for r in doc["layers"]:
        f = r["formats"]
        if f["host"]:
            want.append("host")
            continue
        sides = []
        for side in (f["inputs"], f["outputs"]):
            runs = []
            for x in side:
                runs.append([x, runs.pop()[1] + 1] if runs and runs[-1][0] == x else [x, 1])
            sides.append(", ".join(x + (f" x{k}" if k > 1 else "") for x, k in runs))
        want.append(" -> ".join(sides))
    assert cells == want
    html = report.read_text()
    assert re.findall(r'<td class="mono fmt">(.*?)</td>', html) == [w.replace(">", "&gt;") for w in want]
    counts = {}
    for r in doc["layers"]:
        if r["launches"] and not r["formats"]["host"]:
            for x in r["formats"]["outputs"]:
                counts[x] = counts.get(x, 0) + 1
    summary = next(line for line in lines if line.strip().startswith("formats "))
    for x, k in counts.items():
        assert f"{x} {k}" in summary


# ---- old and malformed plans ---------------------------------------------------------------------------------------

def _repack(path, edit, out):
    """A copy of a plan with its header JSON changed by `edit` and a valid checksum."""
    data = open(path, "rb").read()
    _, version, flags, hlen = struct.unpack_from("<8sIIQ", data, 0)
    header = json.loads(data[24:24 + hlen])
    edit(header)
    raw = json.dumps(header).encode()
    body = struct.pack("<8sIIQ", b"KILNPLAN", version, flags, len(raw)) + raw + data[24 + hlen:-32]
    with open(out, "wb") as f:
        f.write(body + hashlib.sha256(body).digest())
    return str(out)


def test_a_plan_without_formats_loads_and_shows_a_dash(built, tmp_path, capsys):
    _, path = built
    old = _repack(path, lambda h: h["build"].pop("formats"), tmp_path / "old.kiln")
    x = Engine.load(old)
    assert x.plan.build.get("formats") is None
    doc = _inspect_json(capsys, old)
    assert not doc["formats_recorded"] and all(r["formats"] is None for r in doc["layers"])
    assert main(["inspect", old]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(re.match(r"\s+formats\s+not recorded \(the plan was built by an older Kiln\)$", line) for line in lines)
    head = next(i for i, line in enumerate(lines) if line.lstrip().startswith("# ") and "Layer" in line)
    col = lines[head].index("Format (in -> out)")
    assert {row[col:].split()[0] for row in lines[head + 1:]} == {"-"}


@pytest.mark.parametrize("record, words", [
    ("fp32 NCHW", "expected"),
    ("fp32 NCHW -> fp32 NHWC -> fp32 NCHW", "expected"),
    ("fp32 NCHW -> fp32 diagonal", "'fp32 diagonal' is not a format"),
    ("FP32! NCHW -> fp32 NCHW", "is not a format"),
    (7, "expected"),
])
def test_malformed_formats_refused(built, tmp_path, capsys, record, words):
    _, path = built
    first = load_plan(path).graph["steps"][0]["name"]
    bad = _repack(path, lambda h: h["build"]["formats"].__setitem__(first, record), tmp_path / "bad.kiln")
    with pytest.raises(PlanFormatError, match=re.escape(words)) as e:
        Engine.load(bad)
    assert "build.formats." in str(e.value) and "\n" not in str(e.value)
    rc = main(["inspect", bad])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "build.formats." in err[0] and words in err[0]


def test_a_failing_trial_run_leaves_a_note_not_a_failed_build(capsys, tmp_path):
    """The formats come from one run on made-up inputs (integers zero): a Range whose step is such an input fails
    there, the build does not, and inspect says why the formats are missing."""
    rng = np.random.default_rng()
    limit = int(rng.integers(5, 50))
    inits = [numpy_helper.from_array(np.array(limit, np.int64), "lim"), numpy_helper.from_array(np.array(0, np.int64), "z")]
    g = helper.make_graph([helper.make_node("Range", ["z", "lim", "d"], ["r"], name="range")], "rng",
                          [helper.make_tensor_value_info("d", TensorProto.INT64, [])],
                          [helper.make_tensor_value_info("r", TensorProto.INT64, None)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    plan = Builder(Logger(Severity.ERROR)).build(model, BuilderConfig(device="cpu", optimization_level=0))
    assert "formats" not in plan.build and plan.build["formats_note"].startswith("not recorded: ")
    assert "range" in plan.build["formats_note"] and "zero" in plan.build["formats_note"]
    d = int(rng.integers(1, 5))  # the plan itself runs
    got = Engine(plan).create_execution_context().execute({"d": np.array(d, np.int64)})["r"]
    np.testing.assert_array_equal(got, np.arange(0, limit, d))
    path = tmp_path / "range.kiln"
    save_plan(plan, path)
    doc = _inspect_json(capsys, str(path))
    assert not doc["formats_recorded"] and doc["formats_note"] == plan.build["formats_note"]
    assert main(["inspect", str(path)]) == 0
    assert re.search(r"formats\s+not recorded: node 'range'", capsys.readouterr().out)


# ---- the format strings --------------------------------------------------------------------------------------------

def test_layout_names_against_torch():
    base = torch.randn(2, 6, 5, 7)
    cl = base.contiguous(memory_format=torch.channels_last)
    cases = [(base, "NCHW"), (cl, "NHWC"), (cl[:, 1:4], "NHWC view"), (base[:, 1:4], "NCHW view"),
             (base[:, :, 1:3], "NCHW view"), (base.permute(0, 1, 3, 2), "strided"), (torch.randn(3, 4), "row-major"),
             (torch.randn(3, 4).t(), "strided"), (torch.randn(3, 8)[:, :5], "row-major view"),
             (torch.randn(6), "row-major"), (torch.randn(()), "row-major"), (torch.randn(4, 1).expand(4, 3), "strided"),
             (torch.randn(2, 1, 5, 7).contiguous(memory_format=torch.channels_last), "NCHW"),
             (torch.randn(2, 6, 1, 1).contiguous(memory_format=torch.channels_last), "NCHW")]
    for t, want in cases:
        got = layout_of(tuple(t.shape), t.stride())
        assert got == want, (tuple(t.shape), t.stride(), got)
        if want in ("NCHW", "row-major"):
            assert t.is_contiguous()
        if want == "NHWC":
            assert t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
        if want.endswith("view"):
            assert not t.is_contiguous() and not t.is_contiguous(memory_format=torch.channels_last)


def test_records_round_trip():
    for ins, outs in [(["fp32 NCHW"], ["fp32 NHWC"]), (["fp16 NHWC view", "-"], ["int64 row-major", "bf16 strided"]),
                      ([], ["fp32 NHWC"])]:
        assert parse_record(make_record(ins, outs)) == (ins, outs)
    assert parse_record("host") is None


def test_gated_rows_block_matches_onnxruntime():
    """The gated block's values, with its Pointwise and Concat written as rows, against onnxruntime."""
    ort = pytest.importorskip("onnxruntime")
    rng = np.random.default_rng()
    model = _gated(rng)
    engine = Engine(Builder(Logger(Severity.ERROR)).build(model, BuilderConfig(device="cpu", optimization_level=1)))
    x = rng.standard_normal((1, 8, 8, 16)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = engine.create_execution_context().execute({"x": x})["y"]
    got = got.numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
