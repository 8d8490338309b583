"""The `kiln` CLI on good and bad input: bad input gets one line, a non-zero exit, no traceback."""
from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import LIGHT_DIR


def _one_line_error(p) -> None:
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr and lines[0].startswith("kiln: error:"), p.stderr


def _conv_model(path: str, batch: int | str = 1) -> None:
    rng = np.random.default_rng()
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    g = helper.make_graph(nodes, "convnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 8, 16, 16])],
                          [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_build_run_inspect_and_check(tmp_path, cli):
    model, plan = str(tmp_path / "m.onnx"), str(tmp_path / "m.kiln")
    _conv_model(model, "N")
    p = cli("build", model, "-o", plan, "--min-shapes", "x:1x3x16x16", "--opt-shapes", "x:2x3x16x16",
            "--max-shapes", "x:4x3x16x16", "--verbose")
    assert p.returncode == 0, p.stderr
    assert os.path.exists(plan) and "Imported ONNX graph" in p.stderr
    x = np.random.default_rng().standard_normal((3, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    from kiln.testing import run_oracle
    want = run_oracle(onnx.load(model), {"x": x})[0]
    np.save(tmp_path / "want.npy", want)
    p = cli("run", plan, "--input", f"x={tmp_path / 'x.npy'}", "--check", str(tmp_path / "want.npy"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "PASSED" in p.stdout and "latency" in p.stdout
    np.save(tmp_path / "wrong.npy", want + 1)
    p = cli("run", plan, "--input", f"x={tmp_path / 'x.npy'}", "--check", str(tmp_path / "wrong.npy"))
    assert p.returncode == 1 and "FAILED" in p.stdout
    p = cli("inspect", plan)
    assert p.returncode == 0 and "Conv" in p.stdout and "profile 0 x" in p.stdout


def test_truncated_plan(tmp_path, cli):
    model, plan = str(tmp_path / "m.onnx"), str(tmp_path / "m.kiln")
    _conv_model(model)
    assert cli("build", model, "-o", plan).returncode == 0
    data = open(plan, "rb").read()
    bad = tmp_path / "bad.kiln"
    bad.write_bytes(data[: len(data) // 2])
    p = cli("run", str(bad))
    _one_line_error(p)
    assert "truncated" in p.stderr


def test_onnx_passed_as_plan(tmp_path, cli):
    model = str(tmp_path / "m.onnx")
    _conv_model(model)
    p = cli("run", model)
    _one_line_error(p)
    assert "not a Kiln plan" in p.stderr


def test_unknown_op_names_node(tmp_path, cli):
    node = helper.make_node("FancyOp", ["x"], ["y"], name="my_fancy_node", domain="com.example")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = str(tmp_path / "u.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]), path)
    p = cli("build", path, "-o", str(tmp_path / "u.kiln"))
    _one_line_error(p)
    assert "my_fancy_node" in p.stderr and "FancyOp" in p.stderr and "com.example" in p.stderr
    assert not os.path.exists(tmp_path / "u.kiln")


def test_profile_contradicting_static_dim(tmp_path, cli):
    model = str(tmp_path / "m.onnx")
    _conv_model(model, 1)
    p = cli("build", model, "-o", str(tmp_path / "m.kiln"), "--min-shapes", "x:1x3x8x8", "--opt-shapes",
            "x:1x3x16x16", "--max-shapes", "x:1x3x16x16")
    _one_line_error(p)
    assert "kMIN dimensions in profile 0" in p.stderr and "[1,3,16,16]" in p.stderr


def test_wrong_input_shape(tmp_path, cli):
    model, plan = str(tmp_path / "m.onnx"), str(tmp_path / "m.kiln")
    _conv_model(model)
    assert cli("build", model, "-o", plan).returncode == 0
    np.save(tmp_path / "x.npy", np.random.default_rng().standard_normal((1, 3, 15, 16)).astype(np.float32))
    p = cli("run", plan, "--input", f"x={tmp_path / 'x.npy'}")
    _one_line_error(p)
    assert "input 'x'" in p.stderr and "[1,3,16,16]" in p.stderr


def test_malformed_onnx(tmp_path, cli):
    path = tmp_path / "junk.onnx"
    path.write_bytes(os.urandom(300))
    p = cli("build", str(path), "-o", str(tmp_path / "j.kiln"))
    _one_line_error(p)
    assert not os.path.exists(tmp_path / "j.kiln")


def test_missing_file(tmp_path, cli):
    _one_line_error(cli("build", str(tmp_path / "nope.onnx")))
    _one_line_error(cli("inspect", str(tmp_path / "nope.kiln")))


def test_light_resnet50_end_to_end(tmp_path, cli):
    plan = str(tmp_path / "r50.kiln")
    p = cli("build", os.path.join(LIGHT_DIR, "light_resnet50.onnx"), "-o", plan)
    assert p.returncode == 0, p.stderr
    p = cli("run", plan, "--check", os.path.join(LIGHT_DIR, "light_resnet50_output_0.pb"), "--iterations", "2")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "PASSED" in p.stdout
    head = tmp_path / "bad.kiln"
    head.write_bytes(open(plan, "rb").read()[:2000])
    _one_line_error(cli("run", str(head)))


# ---- outputs refused before the build starts (issue 10) ------------------------------------------------

def _in_process(capsys, *args: str) -> tuple[int, str]:
    from kiln.cli.main import main
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse: --version, usage errors
        code = int(e.code or 0)
    err = capsys.readouterr()
    return code, err.out + err.err


def _refused_before_build(capsys, monkeypatch, *args: str) -> str:
    from kiln.builder import Builder

    def no_build(*a, **k):
        raise AssertionError("the build started")
    monkeypatch.setattr(Builder, "build", no_build)
    code, out = _in_process(capsys, "build", *args)
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("kiln: error:"), out
    return lines[0]


def test_output_same_as_input_refused(tmp_path, cli, capsys, monkeypatch):
    model = str(tmp_path / "m.onnx")
    _conv_model(model)
    before = open(model, "rb").read()
    p = cli("build", model, "-o", model)
    _one_line_error(p)
    assert p.returncode == 2 and "input model" in p.stderr
    os.symlink(model, tmp_path / "link.onnx")
    os.link(model, tmp_path / "hard.onnx")
    for out in (str(tmp_path / "link.onnx"), str(tmp_path / "hard.onnx"), str(tmp_path / "." / "m.onnx")):
        assert "input model" in _refused_before_build(capsys, monkeypatch, model, "-o", out)
    plan_named = tmp_path / "p.kiln"  # no -o: the default output <model>.kiln is the model itself
    plan_named.write_bytes(before)
    assert "input model" in _refused_before_build(capsys, monkeypatch, str(plan_named))
    assert open(model, "rb").read() == before


def test_unwritable_outputs_refused_before_build(tmp_path, capsys, monkeypatch):
    model = str(tmp_path / "m.onnx")
    _conv_model(model)
    line = _refused_before_build(capsys, monkeypatch, model, "-o", str(tmp_path / "missing" / "m.kiln"))
    assert "does not exist" in line and str(tmp_path / "missing") in line
    assert "is a folder" in _refused_before_build(capsys, monkeypatch, model, "-o", str(tmp_path))
    assert "not a folder" in _refused_before_build(capsys, monkeypatch, model, "-o", "/etc/passwd/m.kiln")
    line = _refused_before_build(capsys, monkeypatch, model, "-o", str(tmp_path / "m.kiln"),
                                 "--timing-cache", str(tmp_path / "missing" / "tc.json"))
    assert "timing cache" in line
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            return  # root writes anywhere: the /etc/passwd case above is the refusal that holds for root too
        assert "not writable" in _refused_before_build(capsys, monkeypatch, model, "-o", str(ro / "m.kiln"))
    finally:
        ro.chmod(0o700)


def test_version_and_usage_errors_are_one_line(capsys):
    from kiln import __version__
    code, out = _in_process(capsys, "--version")
    assert code == 0 and out.strip() == f"kiln {__version__}"
    for args in (("build",), ("run", "p.kiln", "--iterations", "many"), ("frobnicate",)):
        code, out = _in_process(capsys, *args)
        lines = out.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("kiln: error:"), out
