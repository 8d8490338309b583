"""`kiln compare`: Kiln against onnxruntime on tiny random models. The printed errors are recomputed in float64
from the --save-outputs files, onnxruntime's saved outputs against an onnxruntime run of the test's own, and a
layer corrupted in-process (its kernel's result perturbed) must fail the output or, with --mark-all, be named as
the first divergence."""
from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln.runtime.engine as engine_mod
from kiln.cli.main import main
from tests.conftest import ROOT

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is kiln compare's reference")

ROW = re.compile(r"^(\S+)\s+(\S+)\s+(\[[^\]]*\])\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(.*)$")


def _seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**31)


def _cnn(path: str, rng: np.random.Generator) -> None:
    """Conv -> Relu -> Conv -> Add -> GlobalAveragePool -> Flatten -> Gemm, dynamic batch N, random weights."""
    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "r1"], ["a1"], name="add1"),
             helper.make_node("GlobalAveragePool", ["a1"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
                          [w("w1", 8, 3, 3, 3), w("b1", 8), w("w2", 8, 8, 3, 3), w("b2", 8), w("w3", 5, 8), w("b3", 5)])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


def _mixed(path: str) -> None:
    """Float, int64 and bool inputs; a float output 'y/0' and an int64 output 'y_0' (file names collide)."""
    nodes = [helper.make_node("Where", ["mask", "x", "zero"], ["m"]),
             helper.make_node("Gather", ["m", "idx"], ["y/0"], axis=1),
             helper.make_node("Add", ["idx", "one"], ["y_0"])]
    g = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                                           helper.make_tensor_value_info("idx", TensorProto.INT64, [3]),
                                           helper.make_tensor_value_info("mask", TensorProto.BOOL, ["N", 4])],
                          [helper.make_tensor_value_info("y/0", TensorProto.FLOAT, ["N", 3]),
                           helper.make_tensor_value_info("y_0", TensorProto.INT64, [3])],
                          [numpy_helper.from_array(np.zeros((), np.float32), "zero"),
                           numpy_helper.from_array(np.ones((), np.int64), "one")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


def _compare(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    rc = main(["compare", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def _rows(out: str) -> dict[str, list[str]]:
    """The output table's rows: name -> [dtype, shape, max abs, mean abs, max rel, mean rel, rtol, atol, result]."""
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("output "))
    rows = {}
    for ln in lines[start + 1:]:
        m = ROW.match(ln)
        if not m or ln.startswith("output '"):
            break
        rows[m.group(1)] = list(m.groups()[1:])
    return rows


def _errors(got: np.ndarray, ref: np.ndarray) -> list[float]:
    a, b = got.astype(np.float64), ref.astype(np.float64)
    d = np.abs(a - b)
    rel = d / np.maximum(np.abs(b), 1e-12)
    return [d.max(), d.mean(), rel.max(), rel.mean()]


def _saved(folder: str) -> dict[str, dict[str, np.ndarray]]:
    with open(os.path.join(folder, "manifest.json")) as f:
        files = json.load(f)["files"]
    return {g: {name: np.load(os.path.join(folder, fn)) for name, fn in names.items()} for g, names in files.items()}


def _check_printed_errors(row: list[str], got: np.ndarray, ref: np.ndarray, seed: int) -> None:
    printed = [float(v) for v in row[2:6]]
    want = _errors(got, ref)
    assert np.allclose(printed, want, rtol=1e-3, atol=1e-300), (printed, want, seed)
    rtol, atol = (0.0, 0.0) if row[6:8] == ["exact", "exact"] else (float(row[6]), float(row[7]))
    bad = int((np.abs(got.astype(np.float64) - ref) > atol + rtol * np.abs(ref.astype(np.float64))).sum())
    assert row[8] == ("PASS" if bad == 0 else f"FAIL ({bad}/{got.size} elements)"), (row, bad, seed)


@pytest.fixture
def corrupt(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 - returns the installer
    """install(index): the Engine kiln compare makes perturbs step `index`'s result (one element + 1.0) right after
    its kernel runs (index None: no perturbation). Returns a dict filled when the engine is made: the layer's name,
    op and tactic, every step's name and the names of int8/uint8 step outputs."""
    real = engine_mod.Engine

    def install(index: int | None) -> dict:
        hit: dict = {}

        class Corrupt(real):  # type: ignore[misc, valid-type]
            def __init__(self, plan, where: str = "plan") -> None:  # noqa: ANN001
                super().__init__(plan, where)
                steps = self.function.steps
                hit["layers"] = [st.node.name for st in steps]
                hit["int8"] = [v.name for st in steps for v in st.node.outputs
                               if v.type.dtype is not None and v.type.dtype.value in ("int8", "uint8")]
                if index is None:
                    return
                st = steps[index]
                hit.update(layer=st.node.name, op=st.node.op_type,
                           tactic=next(s["tactic"] for s in plan.graph["steps"] if s["name"] == st.node.name))
                fn = st.fn

                def wrong(*a, **kw):  # noqa: ANN002, ANN003, ANN202
                    r = fn(*a, **kw)
                    t = r[0] if isinstance(r, tuple) else r
                    t[(0,) * t.dim()] += 1.0
                    return r
                st.fn = wrong
        monkeypatch.setattr(engine_mod, "Engine", Corrupt)
        return hit
    return install


def test_outputs_match_and_printed_errors_recompute(tmp_path, capsys) -> None:
    seed = _seed()
    model, out_dir = str(tmp_path / "cnn.onnx"), str(tmp_path / "saved")
    _cnn(model, np.random.default_rng(seed))
    rc, out, _ = _compare(capsys, model, "--device", "cpu", "--shapes", "x:2x3x8x8", "--seed", str(seed),
                          "--save-outputs", out_dir)
    assert rc == 0, out
    assert f"input 'x': float32 [2, 3, 8, 8], random standard normal (seed {seed}); dynamic dims N=2 (--shapes)" in out
    assert "rtol 0.001, atol 0.0001 (defaults for FP32)" in out and "PASSED: 1 of 1 outputs" in out
    saved = _saved(out_dir)
    x = saved["input"]["x"]
    np.testing.assert_array_equal(x, np.random.default_rng(seed).standard_normal((2, 3, 8, 8)).astype(np.float32))
    ref = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(saved["onnxruntime"]["y"], ref, rtol=1e-6, atol=1e-7)
    row = _rows(out)["y"]
    assert row[:2] == ["float32", "[2, 5]"] and row[6:8] == ["0.001", "0.0001"], row
    _check_printed_errors(row, saved["kiln"]["y"], saved["onnxruntime"]["y"], seed)
    assert sorted(os.listdir(out_dir)) == ["input_x.npy", "kiln_y.npy", "manifest.json", "onnxruntime_y.npy"]


def test_corrupted_last_layer_fails_and_names_the_output(tmp_path, capsys, corrupt) -> None:
    seed = _seed()
    rng = np.random.default_rng(seed)
    model, out_dir = str(tmp_path / "cnn.onnx"), str(tmp_path / "saved")
    _cnn(model, rng)
    x = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    corrupt(-1)
    args = [model, "--device", "cpu", "--opt-level", "0", "--input", f"x={tmp_path / 'x.npy'}"]
    rc, out, _ = _compare(capsys, *args, "--save-outputs", out_dir)
    assert rc == 1, out
    assert f"input 'x': float32 [3, 3, 8, 8] from {tmp_path / 'x.npy'}" in out
    assert "FAILED: 1 of 1 outputs differ from onnxruntime: 'y'" in out
    assert re.search(r"^output 'y': 1 of 15 elements outside rtol 0\.001, atol 0\.0001; worst at \[0, 0\]", out, re.M), out
    saved = _saved(out_dir)
    np.testing.assert_array_equal(saved["input"]["x"], x)
    ref = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(saved["onnxruntime"]["y"], ref, rtol=1e-6, atol=1e-7)
    row = _rows(out)["y"]
    _check_printed_errors(row, saved["kiln"]["y"], saved["onnxruntime"]["y"], seed)
    assert float(row[2]) > 0.99  # the perturbation, not rounding
    # a tolerance of its own for the output lets the same perturbation pass
    rc, out, _ = _compare(capsys, *args, "--tol", "y:0.5:2")
    assert rc == 0 and _rows(out)["y"][6:9] == ["0.5", "2", "PASS"], out


@pytest.mark.parametrize("index", [0, 1, 2])
def test_mark_all_names_the_corrupted_layer(tmp_path, capsys, corrupt, index: int) -> None:
    seed = _seed()
    model = str(tmp_path / "cnn.onnx")
    _cnn(model, np.random.default_rng(seed))
    hit = corrupt(index)
    rc, out, _ = _compare(capsys, model, "--device", "cpu", "--opt-level", "0", "--shapes", "x:2x3x8x8",
                          "--seed", str(seed), "--mark-all")
    assert rc == 1, out
    assert (f"first divergence: layer '{hit['layer']}' ({hit['op']}, tactic {hit['tactic']}), value" in out), (out, hit)
    table = out[out.index("intermediates (--mark-all)"):].splitlines()[2:2 + len(hit["layers"])]
    assert [ln.split()[0] for ln in table] == hit["layers"], (table, hit)
    assert all(ln.split()[-1] == "PASS" for ln in table[:index]), table
    assert "<- first divergence" in table[index] and "FAIL" in table[index], table
    n = len(hit["layers"])
    passed = sum(1 for ln in table if ln.split()[-1] == "PASS")
    assert f"{n} values from {n} layers: {n} compared ({passed} matched)" in out, out


def _topk_gather(path: str, rng: np.random.Generator) -> None:
    """x [N, 16] -> TopK(4) indices -> Gather of a table: a wrong index changes only integer intermediates
    until the Gather reads another row (a detector's pre-NMS top-k feeding its box gather)."""
    table = rng.standard_normal((16, 6)).astype(np.float32)
    nodes = [helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", axis=1),
             helper.make_node("Gather", ["t", "i"], ["y"], name="gather", axis=0)]
    g = helper.make_graph(nodes, "topk", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.array([4], np.int64), "k"), numpy_helper.from_array(table, "t")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_mark_all_compares_integer_intermediates_exactly(tmp_path, capsys, monkeypatch) -> None:
    """The first divergence is the layer whose indices went wrong, not the Gather that read the wrong rows."""
    seed = _seed()
    model = str(tmp_path / "topk.onnx")
    _topk_gather(model, np.random.default_rng(seed))
    args = [model, "--device", "cpu", "--opt-level", "0", "--shapes", "x:2x16", "--seed", str(seed), "--mark-all"]
    rc, out, _ = _compare(capsys, *args)
    assert rc == 0 and "no divergence" in out and "3 values from 2 layers: 3 compared (3 matched)" in out, out
    real = engine_mod.Engine

    class WrongIndex(real):  # type: ignore[misc, valid-type]
        def __init__(self, plan, where: str = "plan") -> None:  # noqa: ANN001
            super().__init__(plan, where)
            st = self.function.steps[0]
            fn = st.fn

            def wrong(*a, **kw):  # noqa: ANN002, ANN003, ANN202
                v, i = fn(*a, **kw)
                i = i.clone()
                i[0, 0] = (i[0, 0] + 1) % 16
                return v, i
            st.fn = wrong
    monkeypatch.setattr(engine_mod, "Engine", WrongIndex)
    rc, out, _ = _compare(capsys, *args)
    assert rc == 1, out
    assert re.search(r"first divergence: layer 'topk' \(TopK, tactic [\w.]+\), value 'i': .*1 of 8 elements "
                     r"outside rtol 0, atol 0", out), out


def test_mark_all_skips_quantized_values(tmp_path, capsys, corrupt) -> None:
    model = str(tmp_path / "cnn.onnx")
    _cnn(model, np.random.default_rng(_seed()))
    (tmp_path / "ranges.json").write_text('{"*": 8.0}')
    hit = corrupt(None)
    rc, out, _ = _compare(capsys, model, "--device", "cpu", "--opt-level", "0", "--int8", "--dynamic-ranges",
                          str(tmp_path / "ranges.json"), "--mark-all")
    assert rc in (0, 1), out
    assert hit["int8"], "the int8 plan should pass int8 values between its layers"
    assert "rtol 0.1, atol 0.1 (defaults for INT8)" in out
    assert f"skipped: {len(hit['int8'])} int8/uint8 (quantized)" in out, (out, hit)
    table = out[out.index("intermediates (--mark-all)"):].splitlines()[2:2 + len(hit["layers"])]
    skipped = [ln.split()[3] for ln in table if "skipped (int8/uint8)" in ln]
    assert skipped == hit["int8"], (table, hit)


def test_random_inputs_by_dtype_profile_opt_and_file_names(tmp_path, capsys) -> None:
    seed = _seed()
    model, out_dir = str(tmp_path / "mixed.onnx"), str(tmp_path / "saved")
    _mixed(model)
    rc, out, _ = _compare(capsys, model, "--device", "cpu", "--opt-level", "0", "--seed", str(seed),
                          "--min-shapes", "x:1x4,mask:1x4", "--opt-shapes", "x:3x4,mask:3x4",
                          "--max-shapes", "x:5x4,mask:5x4", "--save-outputs", out_dir)
    assert rc == 0, out
    assert "dynamic dims N=3 (the build profile's opt)" in out
    assert f"input 'idx': int64 [3], random integers in [0, 4) (seed {seed})" in out
    saved = _saved(out_dir)
    x, idx, mask = (saved["input"][k] for k in ("x", "idx", "mask"))
    assert x.dtype == np.float32 and x.shape == (3, 4)
    assert idx.dtype == np.int64 and idx.min() >= 0 and idx.max() < 4
    assert mask.dtype == np.bool_ and mask.shape == (3, 4)
    rng = np.random.default_rng(seed)
    np.testing.assert_array_equal(x, rng.standard_normal((3, 4)).astype(np.float32))
    ref = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x, "idx": idx, "mask": mask})
    rows = _rows(out)
    assert rows["y_0"][6:9] == ["exact", "exact", "PASS"], rows
    for name, want in zip(["y/0", "y_0"], ref):
        np.testing.assert_array_equal(saved["onnxruntime"][name], want)
        _check_printed_errors(rows[name], saved["kiln"][name], saved["onnxruntime"][name], seed)
    with open(os.path.join(out_dir, "manifest.json")) as f:
        kiln_files = json.load(f)["files"]["kiln"]
    assert len(set(kiln_files.values())) == 2 and all(re.fullmatch(r"[\w.-]+", fn) for fn in kiln_files.values())


def test_save_outputs_failure_leaves_no_files(tmp_path, capsys, monkeypatch) -> None:
    model, out_dir = str(tmp_path / "cnn.onnx"), tmp_path / "saved"
    _cnn(model, np.random.default_rng(_seed()))
    real, calls = np.save, []

    def failing(path, arr, **kw) -> None:  # noqa: ANN001, ANN003
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, arr, **kw)
    monkeypatch.setattr(np, "save", failing)
    rc, _, err = _compare(capsys, model, "--device", "cpu", "--opt-level", "0", "--shapes", "x:1x3x8x8",
                          "--save-outputs", str(out_dir))
    assert rc == 2 and err.startswith("kiln: error: --save-outputs") and len(err.strip().splitlines()) == 1, err
    assert len(calls) == 2 and os.listdir(out_dir) == []


@pytest.mark.parametrize("args, msg", [
    (["--input", "nope=x.npy"], "unknown input 'nope'; inputs are: x"),
    (["--input", "x=MISSING.npy"], "file not found"),
    (["--tol", "y:abc:1"], "RTOL and ATOL must be numbers"),
    (["--tol", "y:1"], "expected NAME:RTOL:ATOL"),
    (["--tol", "y:-1:0"], "must be a finite number >= 0"),
    (["--tol", "r1:1:1"], "not an output of the model"),
    (["--rtol", "nan"], "--rtol must be a finite number >= 0"),
    (["--seed", "-3"], "--seed must be >= 0"),
    (["--save-outputs", "MODEL"], "not a folder"),
    (["--save-outputs", "MODEL/sub"], "is not a folder"),
])
def test_bad_input_is_one_line(tmp_path, capsys, args: list[str], msg: str) -> None:
    model = str(tmp_path / "cnn.onnx")
    _cnn(model, np.random.default_rng(_seed()))
    args = [a.replace("MISSING", str(tmp_path / "missing")).replace("MODEL", model) for a in args]
    rc, out, err = _compare(capsys, model, "--device", "cpu", *args)
    assert rc == 2 and out == "", (out, err)
    assert err.startswith("kiln: error:") and msg in err and len(err.strip().splitlines()) == 1, err


def test_bad_input_from_the_real_command_line(tmp_path) -> None:
    model = str(tmp_path / "cnn.onnx")
    _cnn(model, np.random.default_rng(_seed()))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "kiln", "compare", model, "--tol", "y:1:x"], capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode == 2 and p.stdout == "" and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines() == ["kiln: error: --tol y:1:x: RTOL and ATOL must be numbers"], p.stderr


def test_missing_model_file(tmp_path, capsys) -> None:
    rc, out, err = _compare(capsys, str(tmp_path / "none.onnx"))
    assert rc == 2 and out == "" and err == f"kiln: error: model file not found: {tmp_path / 'none.onnx'}\n", err


def test_missing_onnxruntime_says_how_to_install(tmp_path, capsys, monkeypatch) -> None:
    model = str(tmp_path / "cnn.onnx")
    _cnn(model, np.random.default_rng(_seed()))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    rc, out, err = _compare(capsys, model)
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "pip install onnxruntime" in err and err.startswith("kiln: error:")


def test_darknet_cfg_refused_in_one_line(tmp_path, capsys, monkeypatch) -> None:
    """A .cfg (with or without --weights) has no ONNX for onnxruntime to run: one line, nothing built."""
    from kiln.builder import Builder

    def no_build(*a, **k):
        raise AssertionError("the build started")
    monkeypatch.setattr(Builder, "build", no_build)
    cfg, weights = tmp_path / "net.cfg", tmp_path / "net.weights"
    cfg.write_text("[net]\nwidth=8\nheight=8\nchannels=3\n\n[maxpool]\nsize=2\nstride=2\n")
    weights.write_bytes(b"\0" * 20)
    for extra in (["--weights", str(weights)], []):
        rc, out, err = _compare(capsys, str(cfg), *extra, "--device", "cpu")
        assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"kiln: error: kiln compare needs an ONNX model (onnxruntime is the reference), and "
                              f"{cfg} is a Darknet .cfg") and f"kiln bench {cfg} --weights W" in err
    model = str(tmp_path / "cnn.onnx")
    _cnn(model, np.random.default_rng(_seed()))
    rc, out, err = _compare(capsys, model, "--weights", str(weights))
    assert rc == 2 and out == "" and err.startswith("kiln: error: --weights goes with a Darknet .cfg model"), err
