"""Untrusted files (issue 10): external data read only from inside the model's folder, atomic writes
(mode, errors, signals), settings from the environment, the CLI's dummy inputs on odd specs."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

from kiln import settings as settings_mod
from kiln.builder import Builder, BuilderConfig
from kiln.errors import KilnError, ModelError
from kiln.fileio import atomic_write, check_writable
from kiln.frontend.onnx import load_onnx
from kiln.runtime.engine import Engine
from kiln.settings import Settings, settings
from kiln.testing import run_oracle
from tests.conftest import ROOT

# ---- external data ---------------------------------------------------------------------------------


def _affine_model(rng: np.random.Generator) -> onnx.ModelProto:
    """y = reshape(tanh(x @ w + b), shape): three initializers, float32 and int64."""
    w = rng.standard_normal((16, 8)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    shape = np.array([4, 4], dtype=np.int64)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["a"]),
             helper.make_node("Tanh", ["a"], ["t"]), helper.make_node("Reshape", ["t", "shape"], ["y"])]
    g = helper.make_graph(nodes, "affine", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"),
                           numpy_helper.from_array(shape, "shape")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(plan, x):
    return Engine(plan).create_execution_context().execute({"x": x})["y"]


def test_external_data_matches_onnxruntime(tmp_path):
    rng = np.random.default_rng()
    path = str(tmp_path / "m.onnx")
    onnx.save_model(_affine_model(rng), path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    stored = onnx.load(path, load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in stored.graph.initializer)
    offsets = {e.value for t in stored.graph.initializer for e in t.external_data if e.key == "offset"}
    assert len(offsets) == 3  # three tensors at three offsets of one file
    x = rng.standard_normal((2, 16)).astype(np.float32)
    want = run_oracle(onnx.load(path), {"x": x})[0]
    got = _run(Builder().build(path, BuilderConfig()), x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # the same model passed in memory, with its folder named explicitly
    got2 = _run(Builder().build(stored, BuilderConfig(), base_dir=str(tmp_path)), x)
    np.testing.assert_allclose(got2, want, rtol=1e-5, atol=1e-6)


def test_external_data_through_symlink_inside_folder(tmp_path):
    rng = np.random.default_rng()
    (tmp_path / "data").mkdir()
    path = str(tmp_path / "data" / "m.onnx")
    onnx.save_model(_affine_model(rng), path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    model = onnx.load(path, load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "link.bin"
    os.symlink(os.path.join("data", "weights.bin"), tmp_path / "link.bin")  # stays inside tmp_path
    x = rng.standard_normal((2, 16)).astype(np.float32)
    want = run_oracle(onnx.load(path), {"x": x})[0]
    g = load_onnx(model, base_dir=str(tmp_path))
    assert {v.name for v in g.constants()} >= {"w", "b", "shape"}
    np.testing.assert_allclose(_run(Builder().build(model, BuilderConfig(), base_dir=str(tmp_path)), x), want,
                               rtol=1e-5, atol=1e-6)


def _ext_model(tmp_path, location: str, data: bytes | None = None, offset: int | None = None,
               length: int | None = None) -> tuple[str, np.ndarray]:
    """m.onnx in tmp_path/model with initializer 'w' (float32 [4, 3]) stored at `location`.

    data: bytes written to tmp_path/model/<location> (None: write nothing); offset/length: the entries.
    """
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    w = np.random.default_rng().standard_normal((4, 3)).astype(np.float32)
    t = numpy_helper.from_array(w, "w")
    set_external_data(t, location, offset, length)
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "ext",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])], [t])
    path = str(d / "m.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    if data is not None:
        (d / location).write_bytes(data)
    return path, w


def _refused(path: str, *words: str) -> str:
    with pytest.raises(ModelError) as e:
        load_onnx(path)
    msg = str(e.value)
    assert "\n" not in msg and "'w'" in msg, msg  # one line naming the tensor
    for word in words:
        assert word in msg, msg
    return msg


def test_external_data_plain_file_ok(tmp_path):
    w = np.random.default_rng().standard_normal((4, 3)).astype(np.float32)
    path, _ = _ext_model(tmp_path, "w.bin", b"\0" * 8 + w.tobytes() + b"\0" * 4, offset=8, length=48)
    g = load_onnx(path)
    got = next(v.const for v in g.constants() if v.name == "w")
    np.testing.assert_array_equal(got.numpy(), w)


def test_external_data_absolute_location_refused(tmp_path):
    data = tmp_path / "outside.bin"
    data.write_bytes(np.zeros(12, np.float32).tobytes())
    path, _ = _ext_model(tmp_path, str(data))
    _refused(path, "absolute", str(data))


def test_external_data_dotdot_refused(tmp_path):
    (tmp_path / "w.bin").write_bytes(np.zeros(12, np.float32).tobytes())
    path, _ = _ext_model(tmp_path, "../w.bin")
    _refused(path, "..", "'../w.bin'")
    path, _ = _ext_model(tmp_path, "sub/../../w.bin")
    _refused(path, "..")


def test_external_data_symlink_outside_refused(tmp_path):
    outside = tmp_path / "secret.bin"
    outside.write_bytes(np.ones(12, np.float32).tobytes())
    path, _ = _ext_model(tmp_path, "w.bin")
    os.symlink(outside, tmp_path / "model" / "w.bin")
    _refused(path, "outside", "'w.bin'")


def test_external_data_hard_link_refused(tmp_path):
    outside = tmp_path / "secret.bin"
    outside.write_bytes(np.ones(12, np.float32).tobytes())
    path, _ = _ext_model(tmp_path, "w.bin")
    try:
        os.link(outside, tmp_path / "model" / "w.bin")
    except OSError as e:
        pytest.skip(f"hard links not supported here: {e}")
    _refused(path, "hard link", "'w.bin'")


def test_external_data_truncated_file_refused(tmp_path):
    path, _ = _ext_model(tmp_path, "w.bin", np.zeros(6, np.float32).tobytes(), offset=0, length=48)
    _refused(path, "beyond", "24 bytes")
    path, _ = _ext_model(tmp_path, "w.bin", np.zeros(12, np.float32).tobytes(), offset=16, length=48)
    _refused(path, "beyond")
    path, _ = _ext_model(tmp_path, "w.bin", np.zeros(12, np.float32).tobytes(), offset=100)
    _refused(path, "beyond")


def test_external_data_wrong_length_refused(tmp_path):
    path, _ = _ext_model(tmp_path, "w.bin", np.zeros(20, np.float32).tobytes(), offset=0, length=44)
    _refused(path, "44 bytes", "48")
    path, _ = _ext_model(tmp_path, "w.bin", np.zeros(20, np.float32).tobytes())  # no length: whole file, 80 bytes
    _refused(path, "80 bytes")


def test_external_data_missing_and_non_regular_refused(tmp_path):
    path, _ = _ext_model(tmp_path, "w.bin")
    _refused(path, "not found")
    os.mkfifo(tmp_path / "model" / "w.bin")  # opening a FIFO would block: refused before opening
    _refused(path, "not a regular file")
    os.unlink(tmp_path / "model" / "w.bin")
    os.mkdir(tmp_path / "model" / "w.bin")
    _refused(path, "not a regular file")


def test_in_memory_model_with_external_data_needs_base_dir(tmp_path):
    path, w = _ext_model(tmp_path, "w.bin", np.zeros(12, np.float32).tobytes())
    model = onnx.load(path, load_external_data=False)
    with pytest.raises(ModelError, match="base_dir") as e:
        load_onnx(model)
    assert "'w'" in str(e.value) and "w.bin" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ModelError, match="base_dir"):
        Builder().build(model, BuilderConfig())
    g = load_onnx(model, base_dir=str(tmp_path / "model"))
    assert next(v for v in g.constants() if v.name == "w").const.shape == (4, 3)
    # an explicit base_dir also confines a model file's data: the file is not under it
    with pytest.raises(ModelError, match="not found"):
        load_onnx(path, base_dir=str(tmp_path))


# ---- atomic writes ---------------------------------------------------------------------------------


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _with_umask(mask: int, fn):
    old = os.umask(mask)
    try:
        return fn()
    finally:
        os.umask(old)


def _tiny_plan():
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return Builder().build(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), BuilderConfig())


def test_plan_and_timing_cache_get_umask_mode(tmp_path):
    from kiln.plan.format import load_plan, save_plan
    from kiln.tune.timing_cache import TimingCache
    plan = _tiny_plan()
    _with_umask(0o022, lambda: save_plan(plan, tmp_path / "a.kiln"))
    assert _mode(tmp_path / "a.kiln") == 0o644
    _with_umask(0o077, lambda: save_plan(plan, tmp_path / "b.kiln"))
    assert _mode(tmp_path / "b.kiln") == 0o600
    assert load_plan(tmp_path / "a.kiln").graph == plan.graph
    tc = TimingCache()
    tc.record("k", "t {}", 1.5)
    _with_umask(0o022, lambda: tc.save(tmp_path / "tc.json"))
    assert _mode(tmp_path / "tc.json") == 0o644 and len(TimingCache.load(tmp_path / "tc.json")) == 1
    assert sorted(os.listdir(tmp_path)) == ["a.kiln", "b.kiln", "tc.json"]  # no temp files left


def test_atomic_write_replaces_and_keeps_nothing_else(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write(target, b"old", "test file")
    atomic_write(str(target), bytearray(b"new" * 1000), "test file")
    assert target.read_bytes() == b"new" * 1000 and os.listdir(tmp_path) == ["f.bin"]


def _one_line_naming(e: pytest.ExceptionInfo, path) -> None:
    assert not isinstance(e.value, OSError)
    assert str(path) in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("case", ["missing folder", "is a folder", "under a regular file"])
def test_atomic_write_errors_are_one_line(tmp_path, case):
    path = {"missing folder": tmp_path / "nope" / "f.kiln", "is a folder": tmp_path,
            "under a regular file": "/etc/passwd/x.kiln"}[case]
    for fn in (lambda: atomic_write(path, b"data", "plan"), lambda: check_writable(path, "plan")):
        with pytest.raises(KilnError) as e:
            fn()
        _one_line_naming(e, path)
    assert os.listdir(tmp_path) == []


def test_atomic_write_unwritable_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: a 0o500 folder is writable (the /etc/passwd/x case covers refusal)")
        for fn in (lambda: atomic_write(ro / "f.kiln", b"data", "plan"), lambda: check_writable(ro / "f.kiln", "plan")):
            with pytest.raises(KilnError, match="not writable") as e:
                fn()
            _one_line_naming(e, ro / "f.kiln")
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o700)


def test_atomic_write_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    import kiln.fileio as fileio
    monkeypatch.setattr(fileio, "CHUNK", 16)
    calls = []

    def failing(fd, chunk):
        calls.append(len(chunk))
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return os.write(fd, chunk)
    monkeypatch.setattr(fileio, "_write_chunk", failing)
    with pytest.raises(KilnError, match="no space left") as e:
        atomic_write(tmp_path / "f.kiln", b"x" * 100, "plan")
    _one_line_naming(e, tmp_path / "f.kiln")
    assert os.listdir(tmp_path) == []


def test_atomic_write_signal_in_process_restores_handlers(tmp_path, monkeypatch):
    """A SIGTERM during the write: temp file removed, then the previous handler runs (here: one that
    carries on, so the write reports that nothing was written); SIGINT -> KeyboardInterrupt."""
    import kiln.fileio as fileio
    monkeypatch.setattr(fileio, "CHUNK", 8)
    seen = []

    def term_once(fd, chunk):
        if not seen:
            os.kill(os.getpid(), signal.SIGTERM)
        return os.write(fd, chunk)
    monkeypatch.setattr(fileio, "_write_chunk", term_once)

    def carry_on(signum, frame):
        seen.append(signum)
    old = signal.signal(signal.SIGTERM, carry_on)
    try:
        with pytest.raises(KilnError, match="interrupted by SIGTERM"):
            atomic_write(tmp_path / "f.kiln", b"x" * 100, "plan")
        assert seen == [signal.SIGTERM] and os.listdir(tmp_path) == []
        assert signal.getsignal(signal.SIGTERM) is carry_on  # our handler is gone again
        int_before = signal.getsignal(signal.SIGINT)

        def int_once(fd, chunk):
            os.kill(os.getpid(), signal.SIGINT)
            return os.write(fd, chunk)
        monkeypatch.setattr(fileio, "_write_chunk", int_once)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            with pytest.raises(KeyboardInterrupt):
                atomic_write(tmp_path / "g.kiln", b"x" * 100, "plan")
        finally:
            signal.signal(signal.SIGINT, int_before)
        assert os.listdir(tmp_path) == []
        monkeypatch.setattr(fileio, "_write_chunk", lambda fd, chunk: os.write(fd, chunk))
        atomic_write(tmp_path / "h.kiln", b"x" * 100, "plan")  # a write without signals still works
        assert (tmp_path / "h.kiln").read_bytes() == b"x" * 100
    finally:
        signal.signal(signal.SIGTERM, old)


_SLOW_WRITER = textwrap.dedent("""
    import os, signal, sys, time
    import kiln.fileio as fileio
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in an interactive run, even if inherited ignored
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    fileio.CHUNK = 4096
    def slow(fd, chunk):
        time.sleep(0.005)
        return os.write(fd, chunk)
    fileio._write_chunk = slow
    fileio.atomic_write(sys.argv[1], b"k" * (4096 * 4000), "plan")  # ~20 s at this pace
    print("finished")
""")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_atomic_write_leaves_no_temp_file(tmp_path, signum):
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(out / "big.kiln")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not os.listdir(out):  # the temp file appears once the write is under way
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the writer never started"
            time.sleep(0.02)
        time.sleep(0.1)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "finished" not in stdout
    if signum == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM, stderr
    else:
        assert proc.returncode in (-signal.SIGINT, 128 + signal.SIGINT, 1) and "KeyboardInterrupt" in stderr, stderr
    assert os.listdir(out) == []


# ---- settings --------------------------------------------------------------------------------------


def test_settings_defaults_and_parsing(monkeypatch):
    for v in settings_mod.VARIABLES:
        monkeypatch.delenv(v, raising=False)
    s = settings_mod.reload()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert s.cache_dir == os.path.join(os.path.expanduser("~"), ".cache", "kiln")
    assert s.parallel_compile is True and s.max_loop_iterations == 100_000 and s.dnnl_lib is None
    assert s.max_activation_bytes == ram and s.max_plan_bytes == ram
    import shutil
    assert s.cc == (shutil.which("cc") or shutil.which("gcc"))
    with pytest.raises(Exception):
        s.cc = "x"  # type: ignore[misc]  # frozen
    env = {"KILN_CACHE_DIR": "~/kc", "KILN_CC": "/opt/cc", "KILN_DNNL_LIB": "/opt/libdnnl.so",
           "KILN_PARALLEL_COMPILE": "off", "KILN_MAX_LOOP_ITERATIONS": "1_000", "KILN_MAX_PLAN_BYTES": "2G",
           "KILN_MAX_ACTIVATION_BYTES": "512m"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = settings()  # a changed variable is picked up without reload()
    assert s == Settings(cache_dir=os.path.expanduser("~/kc"), cc="/opt/cc", dnnl_lib="/opt/libdnnl.so",
                         parallel_compile=False, max_loop_iterations=1000, max_plan_bytes=2 << 30,
                         max_activation_bytes=512 << 20)
    assert settings() is s  # cached
    monkeypatch.setenv("KILN_MAX_ACTIVATION_BYTES", "")  # empty: the default
    assert settings().max_activation_bytes == ram
    assert Settings.from_env({"KILN_PARALLEL_COMPILE": "1"}).parallel_compile is True


@pytest.mark.parametrize("var, value", [("KILN_MAX_LOOP_ITERATIONS", "abc"), ("KILN_MAX_LOOP_ITERATIONS", "0"),
                                        ("KILN_MAX_LOOP_ITERATIONS", "-5"), ("KILN_PARALLEL_COMPILE", "maybe"),
                                        ("KILN_MAX_ACTIVATION_BYTES", "lots"), ("KILN_MAX_PLAN_BYTES", "1.5G")])
def test_settings_invalid_values_name_the_variable(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(KilnError) as e:
        settings()
    assert var in str(e.value) and repr(value) in str(e.value) and "\n" not in str(e.value)
    monkeypatch.delenv(var)
    settings()  # fine again


def test_settings_fields_documented():
    doc = open(os.path.join(ROOT, "docs", "SETTINGS.md")).read()
    src = open(settings_mod.__file__).read()
    for var in settings_mod.VARIABLES:
        assert var in doc
        assert src.count(var) >= 2  # listed, and in its field's docstring


def test_variables_kiln_sets_keep_a_value_already_there(monkeypatch, tmp_path):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    settings_mod.set_openmp_spin_default()
    assert os.environ["GOMP_SPINCOUNT"] == "3000"
    for given in ("", "30000"):  # set, even empty: left as it is
        monkeypatch.setenv("GOMP_SPINCOUNT", given)
        settings_mod.set_openmp_spin_default()
        assert os.environ["GOMP_SPINCOUNT"] == given
    monkeypatch.delenv("ONNX_HOME", raising=False)
    settings_mod.set_private_onnx_home()
    home = os.environ["ONNX_HOME"]
    assert os.path.isdir(home) and os.path.basename(home).startswith("kiln-onnx-home-") and not os.listdir(home)
    os.rmdir(home)
    monkeypatch.setenv("ONNX_HOME", str(tmp_path))
    settings_mod.set_private_onnx_home()
    assert os.environ["ONNX_HOME"] == str(tmp_path)
    # the CLI has set the OpenMP default by the time torch is first imported (libgomp reads it when it loads)
    code = textwrap.dedent("""
        import importlib.abc, os, sys
        seen = []
        class First(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "torch" and not seen:
                    seen.append(os.environ.get("GOMP_SPINCOUNT"))
        sys.meta_path.insert(0, First())
        import kiln.cli.main
        kiln.cli.main.build_parser()
        import torch
        print(seen)
    """)
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "['3000']", out.stdout + out.stderr


# ---- CLI dummy inputs ------------------------------------------------------------------------------


def test_dummy_input_odd_specs(monkeypatch):
    from kiln.cli.main import dummy_input
    a = dummy_input({"name": "x", "shape": [2, "N", None, -1]}, [])  # no dtype, symbolic dims
    assert a.dtype == np.float32 and a.shape == (2, 1, 1, 1)
    a = dummy_input({"name": "x", "dtype": "int64", "shape": ["N", 3]}, [{"x": {"min": [1, 3], "opt": [5, 3], "max": [8, 3]}}])
    assert a.dtype == np.int64 and a.shape == (5, 3)
    assert dummy_input({"name": "x", "dtype": "float16"}, []).shape == ()
    assert str(dummy_input({"name": "x", "dtype": "bfloat16", "shape": [3]}, []).dtype) == "bfloat16"
    assert dummy_input({"name": "x", "dtype": "bool", "shape": [3]}, []).dtype == np.bool_
    for spec in ({"name": "s", "dtype": "string", "shape": [2]}, {"name": "s", "dtype": 7, "shape": [2]},
                 {"name": "s", "dtype": "float32", "shape": [2], "kind": "sequence"},
                 {"name": "s", "dtype": "float32", "shape": "2x3"},
                 {"name": "s", "dtype": "float32", "shape": [1 << 40, 1 << 40]}):
        with pytest.raises(KilnError) as e:
            dummy_input(spec, [])
        assert "'s'" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv("KILN_MAX_ACTIVATION_BYTES", "1000")
    with pytest.raises(KilnError, match="KILN_MAX_ACTIVATION_BYTES"):
        dummy_input({"name": "x", "dtype": "float32", "shape": [251]}, [])
    assert dummy_input({"name": "x", "dtype": "float32", "shape": [250]}, []).shape == (250,)
