"""What `kiln build` says (issue 14): the summary at the default level agrees with the plan it wrote, -q prints
only errors, -v narrates fusions and tactics, a dynamic input without a profile and a precision without kernels
warn once, the progress display draws only on a terminal; `kiln conformance` takes its documented flags."""
from __future__ import annotations

import io
import math
import re
from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.tactic import is_layer
from kiln.builder import Builder, BuilderConfig
from kiln.logger import Logger, Severity
from kiln.plan.format import load_plan
from kiln.runtime.engine import Engine
from kiln.testing import run_oracle

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _cnn(batch: int | str, rng: np.random.Generator) -> onnx.ModelProto:
    """conv-relu, conv-relu, global average pool, flatten, gemm; input x:[batch,3,16,16]."""
    w1 = (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32)
    wf = (rng.standard_normal((5, 8)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "wf"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])],
                          [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (wf, "wf"))])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _kiln(capsys, *args: str) -> tuple[int, str, str]:
    """`kiln ARGS` in this process (one import of torch for the whole file): exit code, stdout, stderr."""
    from kiln.cli.main import main
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse: --help, usage errors
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def _summary(err: str) -> dict[str, object]:
    """The figures of the build summary in `kiln build`'s stderr."""
    def one(pattern: str) -> re.Match:
        found = re.findall(pattern, err, re.M)
        assert len(found) == 1, (pattern, err)
        return re.search(pattern, err, re.M)  # type: ignore[return-value]
    tactics = {}
    for item in one(r"^\[kiln\] \[I\]\s+tactics\s+(.+)$").group(1).split(", "):
        name, n = item.rsplit(" ", 1)
        tactics[name] = int(n)
    built = one(r"^\[kiln\] \[I\] Built '.+' for cpu in ([\d.]+) s \((.+)\)$")
    stages = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) s", built.group(2))}
    return {"layers": int(one(r"^\[kiln\] \[I\]\s+layers\s+(\d+) launching").group(1)), "tactics": tactics,
            "arena": int(one(r"activation arena (\d+) bytes").group(1)),
            "weights": int(one(r"memory\s+weights (\d+) bytes").group(1)),
            "timed": int(one(r"autotuning\s+(\d+) layers timed").group(1)),
            "measured": int(one(r"layers timed, (\d+) candidates measured").group(1)),
            "seconds": float(built.group(1)), "stages": stages}


def _activation_bounds(plan) -> tuple[int, int]:
    """(bytes that must coexist at some step, bytes of all activations) of a plan's intermediate tensors,
    from the value types in its graph spec: the activation arena lies between the two."""
    vals, g = plan.graph["values"], plan.graph
    ends = set(g["inputs"]) | set(g["outputs"])

    def size(name: str) -> int:
        v = vals[name]
        if "const" in v or name in ends:
            return 0
        return math.prod(v["type"]["shape"]) * np.dtype(v["type"]["dtype"]).itemsize
    live = max(sum(size(n) for n in set(s["inputs"] + s["outputs"]) if n) for s in g["steps"])
    return live, sum(size(n) for n in vals)


def test_default_build_prints_a_summary_that_agrees_with_the_plan(tmp_path, capsys) -> None:
    rng = np.random.default_rng()
    model, out = tmp_path / "m.onnx", tmp_path / "m.kiln"
    onnx.save(_cnn(2, rng), model)
    code, stdout, err = _kiln(capsys, "build", str(model), "-o", str(out), "--device", "cpu", "--opt-level", "1")
    assert code == 0, err
    assert "\x1b" not in err and "━" not in err, err  # stderr is not a terminal: no progress display
    assert all(ln.startswith("[kiln] [I]") for ln in err.splitlines()), err  # no warning for a static fp32 build
    plan = load_plan(out)
    s = _summary(err)
    steps = plan.graph["steps"]
    launching = [st for st in steps if is_layer(st["tactic"])]
    assert s["layers"] == len(launching) == plan.build["layers"]
    assert s["tactics"] == dict(Counter(st["tactic"] for st in launching)) == plan.build["tactics"]
    assert s["arena"] == plan.memory["arena_bytes"]
    live, total = _activation_bounds(plan)
    assert 0 < live <= s["arena"] <= total, (live, s["arena"], total)
    assert s["weights"] == sum(w.numel() * w.element_size() for w in plan.weights.values())
    assert s["timed"] == plan.build["tuning"]["layers_timed"] > 0 and s["measured"] >= s["timed"]
    assert set(s["stages"]) == {"import", "optimize", "autotune", "plan"} == set(plan.build["stage_seconds"])
    assert sum(s["stages"].values()) <= s["seconds"] + 0.05 and abs(s["seconds"] - plan.build["build_seconds"]) < 0.01
    assert re.fullmatch(rf"wrote {re.escape(str(out))} \(\d+ bytes, {s['layers']} layers, built in [\d.]+ s\)\n",
                        stdout), stdout


def test_quiet_prints_only_errors(tmp_path, capsys) -> None:
    rng = np.random.default_rng()
    model, out = tmp_path / "m.onnx", tmp_path / "m.kiln"
    onnx.save(_cnn("N", rng), model)  # would warn (no profile; --fp16 on the CPU) at the default level
    code, stdout, err = _kiln(capsys, "build", str(model), "-o", str(out), "--device", "cpu", "--opt-level", "0",
                              "--fp16", "-q")
    assert code == 0 and stdout == "" and err == "", (stdout, err)
    assert load_plan(out).build["layers"] > 0
    code, stdout, err = _kiln(capsys, "build", str(tmp_path / "missing.onnx"), "-q")
    assert code == 2 and stdout == "" and len(err.splitlines()) == 1 and err.startswith("kiln: error:"), err
    code, stdout, err = _kiln(capsys, "build", str(model), "-q", "-v")
    assert code == 2 and len(err.splitlines()) == 1 and "not allowed with" in err, err


def test_verbose_narrates_fusions_and_every_tactic_choice(tmp_path, capsys) -> None:
    rng = np.random.default_rng()
    model, out = tmp_path / "m.onnx", tmp_path / "m.kiln"
    onnx.save(_cnn(1, rng), model)
    code, _, err = _kiln(capsys, "build", str(model), "-o", str(out), "--device", "cpu", "--opt-level", "1", "-v")
    assert code == 0, err
    assert re.search(r"^\[kiln\] \[V\] Fusing \S+ with \S+", err, re.M), err
    plan = load_plan(out)
    for st in plan.graph["steps"]:
        if is_layer(st["tactic"]) and st["tactic"] != "ref":
            said = (f"Fastest tactic for {st['name']} ({st['op']}): {st['tactic']}",
                    f"{st['name']} ({st['op']}): tactic {st['tactic']}")
            assert any(x in err for x in said), (st["name"], st["tactic"], err)
    assert _summary(err)["layers"] == plan.build["layers"]  # the summary too (verbose is a superset)


def test_dynamic_batch_without_shapes_warns_once_and_is_tuned(tmp_path, capsys) -> None:
    rng = np.random.default_rng()
    m = _cnn("N", rng)
    model, out = tmp_path / "m.onnx", tmp_path / "m.kiln"
    onnx.save(m, model)
    code, _, err = _kiln(capsys, "build", str(model), "-o", str(out), "--device", "cpu", "--opt-level", "1")
    assert code == 0, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("[kiln] [W]")]
    assert len(warnings) == 1, err
    default = "x:1x3x16x16"  # the declared [N,3,16,16] with the unknown batch at 1
    assert "no optimization profile" in warnings[0] and f"tuned at the default shape {default}," in warnings[0]
    assert "--shapes x:Nx3x16x16" in warnings[0] and "--min-shapes/--opt-shapes/--max-shapes" in warnings[0]
    plan = load_plan(out)
    assert plan.profiles == [] and plan.build["tuned_at"] == {"x": "1x3x16x16"}
    assert plan.build["tuning"]["layers_timed"] > 0 and _summary(err)["timed"] == plan.build["tuning"]["layers_timed"]
    assert f"tuned at {default} (default" in err
    ctx = Engine(plan).create_execution_context()
    for batch in (1, 3, 8):  # no profile: the plan takes any batch
        x = rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)
        np.testing.assert_allclose(ctx.execute({"x": x})["y"], run_oracle(m, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_fp16_on_the_cpu_says_what_it_built(tmp_path, capsys) -> None:
    from kiln.backends.cpu.features import native_low_precision
    from kiln.ir.dtype import DType
    rng = np.random.default_rng()
    m = _cnn(2, rng)
    model, out = tmp_path / "m.onnx", tmp_path / "m.kiln"
    onnx.save(m, model)
    code, _, err = _kiln(capsys, "build", str(model), "-o", str(out), "--device", "cpu", "--opt-level", "1", "--fp16")
    assert code == 0, err
    plan = load_plan(out)
    warnings = [ln for ln in err.splitlines() if ln.startswith("[kiln] [W]")]
    if native_low_precision(DType.FLOAT16):  # a CPU with FP16 arithmetic builds it, without a word
        assert warnings == [] and plan.build["fp16"] is True, err
        return
    assert len(warnings) == 1 and "no FP16 kernels" in warnings[0] and "FP32" in warnings[0], err
    assert plan.build["fp16"] is False and plan.build["precision_fallback"].startswith("--fp16 asked")
    assert _summary(err)["layers"] == plan.build["layers"] and "precision   float32" in err
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)  # it computes in float32: float32 tolerances
    got = Engine(plan).create_execution_context().execute({"x": x})["y"]
    np.testing.assert_allclose(got, run_oracle(m, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_progress_display_draws_on_a_terminal_only() -> None:
    from rich.console import Console
    rng = np.random.default_rng()
    m = _cnn("N", rng)
    screen = io.StringIO()
    plan = Builder(Logger(Severity.INFO, console=Console(file=screen, force_terminal=True, width=120))).build(
        m, BuilderConfig(device="cpu", optimization_level=1))
    drawn = ANSI.sub("", screen.getvalue()).replace("\r", "\n")
    stages = set(re.findall(r"Building(?: 'cnn')?: (\w+)", drawn))
    assert {"import", "optimize", "autotune", "plan"} <= stages, drawn
    counts = {(int(a), int(b)) for a, b in re.findall(r"(\d+)/(\d+) layers", drawn)}
    tuned = {b for _, b in counts}
    assert len(tuned) == 1 and (tuned.pop(),) * 2 in counts, counts  # counted up to the total, one total
    assert drawn.count("no optimization profile") == 1, drawn  # the warning went above the display, once
    assert re.search(r"^\[kiln\] \[I\]\s+layers\s+%d launching" % plan.build["layers"], drawn, re.M), drawn
    for logger in (Logger(Severity.VERBOSE, stream=io.StringIO()),  # a plain stream is not a terminal
                   Logger(Severity.INFO, console=Console(file=io.StringIO(), force_terminal=False))):
        Builder(logger).build(m, BuilderConfig(device="cpu", optimization_level=1))
        text = (logger.stream or logger.console.file).getvalue()
        assert "\x1b" not in text and "━" not in text and "Building 'cnn':" not in text, text
        assert text and all(ln.startswith("[kiln] [") for ln in text.splitlines()), text


def test_calibration_counts_its_batches_on_the_display() -> None:
    from rich.console import Console
    rng = np.random.default_rng()
    batches = [{"x": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)} for _ in range(5)]
    screen = io.StringIO()
    Builder(Logger(Severity.INFO, console=Console(file=screen, force_terminal=True, width=120))).build(
        _cnn(2, rng), BuilderConfig(device="cpu", optimization_level=0, int8=True, calibration_data=batches,
                                    calibration_batches=4))
    drawn = ANSI.sub("", screen.getvalue()).replace("\r", "\n")
    assert "calibrate" in drawn, drawn
    counts = {(int(a), int(b)) for a, b in re.findall(r"calibrate\D*?(\d+)/(\d+)", drawn)}
    assert counts and {b for _, b in counts} == {4} and (4, 4) in counts, drawn  # --calib-batches caps the 5


def test_conformance_takes_the_documented_flags(capsys, cli) -> None:
    import warnings
    from onnx.backend.test.case import model as model_cases
    from onnx.backend.test.case import node as node_cases
    code, stdout, _ = _kiln(capsys, "conformance", "-h")
    assert code == 0 and "-k REGEX" in stdout and "--failures" in stdout and "-v" in stdout, stdout
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        names = [c.name for c in node_cases.collect_testcases(None)] + [c.name for c in model_cases.collect_testcases()]
    want = {n for n in names if re.search("relu", n)}  # onnx's own case list, not the runner's
    p = cli("conformance", "-k", "relu", "-v", "-j", "2")
    assert p.returncode == 0, p.stdout + p.stderr
    said = {name: status for status, name in re.findall(r"^(PASSED|FAILED|SKIPPED)\s+(test_\w+)", p.stdout, re.M)}
    total = re.search(r"^total\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$", p.stdout, re.M)
    assert total, p.stdout
    passed, excluded, n = int(total.group(1)), int(total.group(4)), int(total.group(5))
    assert set(said) <= want and len(said) + excluded == n == len(want), (sorted(said), sorted(want), p.stdout)
    assert passed == list(said.values()).count("PASSED") and "test_relu" in said, p.stdout
