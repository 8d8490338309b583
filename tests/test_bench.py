"""`kiln bench` and LayerProfiler on the CPU: the numbers in the output checked against each other, against the
per-iteration times file, and against the plan; bad flags refused in one line before any build."""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ITERS = 50
SUMMARY_KEYS = {"model", "device", "origin", "inputs", "batch", "setup", "config", "warmup", "iterations",
                "wall_time_s", "throughput", "latency_ms", "enqueue_ms", "h2d_ms", "compute_ms", "d2h_ms",
                "host_bound", "warnings", "notes"}
STATS = ("min", "mean", "median", "max")


def _model(path: str) -> None:
    """conv -> relu -> slice (a view: launches nothing) -> maxpool -> flatten -> gemm, dynamic batch N, fresh
    random weights."""
    rng = np.random.default_rng()
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    fc = rng.standard_normal((6 * 8 * 8, 10)).astype(np.float32)
    ints = [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in
            (("s0", [1]), ("s1", [7]), ("ax", [1]))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Slice", ["r", "s0", "s1", "ax"], ["sl"], name="slice"),
             helper.make_node("MaxPool", ["sl"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc")]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(fc, "fc"), *ints])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(model.onnx, model.kiln built with batch 1..4, opt 2)."""
    from kiln.builder import Builder, BuilderConfig, OptimizationProfile
    from kiln.plan.format import save_plan
    d = tmp_path_factory.mktemp("bench")
    model, plan = str(d / "tiny.onnx"), str(d / "tiny.kiln")
    _model(model)
    prof = OptimizationProfile().set_shape("x", (1, 3, 16, 16), (2, 3, 16, 16), (4, 3, 16, 16))
    save_plan(Builder().build(model, BuilderConfig(device="cpu", profiles=[prof])), plan)
    return model, plan


def _bench(capsys, *args: str) -> tuple[int, str, str]:
    from kiln.cli.main import main
    try:
        code = main(["bench", *args])
    except SystemExit as e:  # argparse usage errors
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def _load(path) -> object:
    with open(path) as f:
        return json.load(f)


def _check_stats(d: dict) -> None:
    assert set(STATS) <= set(d)
    assert d["min"] <= d["median"] <= d["max"] and d["min"] <= d["mean"] <= d["max"]


def _check_summary(s: dict, times: list[dict], text: str, batch: int) -> None:
    """Summary vs the times file (recomputed in float64) and vs the printed text."""
    assert SUMMARY_KEYS <= set(s), SUMMARY_KEYS - set(s)
    n = s["iterations"]
    assert len(times) == n and sorted(r["iteration"] for r in times) == list(range(n))
    lat = np.array([r["latency_ms"] for r in times], dtype=np.float64)
    L = s["latency_ms"]
    for k in ("latency_ms", "enqueue_ms", "h2d_ms", "compute_ms", "d2h_ms"):
        _check_stats(s[k])
    # the times file reproduces the summary: min/max/median exactly, the mean to rounding
    assert L["min"] == lat.min() and L["max"] == lat.max() and L["median"] == float(np.median(lat))
    assert L["mean"] == pytest.approx(math.fsum(lat) / n, rel=1e-12)
    ps = sorted(L["percentiles"].items(), key=lambda kv: float(kv[0]))
    srt = np.sort(lat)
    for key, v in ps:  # the linear-interpolation percentile, recomputed by hand
        rank = float(key) / 100 * (n - 1)
        lo = int(math.floor(rank))
        want = srt[lo] + (srt[min(lo + 1, n - 1)] - srt[lo]) * (rank - lo)
        assert v == pytest.approx(want, rel=1e-12, abs=1e-12) and L["min"] <= v <= L["max"]
    assert all(a[1] <= b[1] for a, b in zip(ps, ps[1:]))
    # CPU: synchronous calls, no transfers; per record latency = end - start
    for r in times:
        assert r["h2d_ms"] == 0 and r["d2h_ms"] == 0 and r["enqueue_ms"] == r["compute_ms"] == r["latency_ms"]
        assert r["end_ms"] - r["start_ms"] == pytest.approx(r["latency_ms"], abs=1e-6)
        assert 0 <= r["start_ms"] <= r["end_ms"] <= s["wall_time_s"] * 1e3 + 1e-6
    # throughput: iterations over the host wall time, which holds every (sequential) iteration
    t = s["throughput"]
    assert t["inferences_per_s"] == pytest.approx(n / s["wall_time_s"], rel=1e-12)
    assert s["batch"] == batch and t["items_per_s"] == pytest.approx(batch * t["inferences_per_s"], rel=1e-12)
    if s["config"]["streams"] == 1:
        assert s["wall_time_s"] * 1e3 >= math.fsum(lat) * (1 - 1e-9)
        assert 1e3 / L["mean"] >= t["inferences_per_s"] >= 0.5 * 1e3 / L["mean"]
    # the printed text holds the same numbers
    for k in STATS:
        assert f"{k} {L[k]:.4f}" in text and f"{k} {s['compute_ms'][k]:.4f}" in text
    for key, v in ps:
        assert f"p{key} {v:.4f}" in text
    assert f"{t['inferences_per_s']:.2f} inferences/s" in text and f"{t['items_per_s']:.2f} items/s" in text
    assert f"Host wall time: {s['wall_time_s']:.4f} s for {n} iterations" in text
    assert f"warm-up: {s['warmup']['iterations']} iteration" in text


def test_bench_plan_numbers_and_profile(files, tmp_path, capsys):
    from kiln.backends.tactic import is_layer
    from kiln.plan.format import load_plan
    _, plan = files
    j, t, p = tmp_path / "s.json", tmp_path / "t.json", tmp_path / "p.json"
    code, out, err = _bench(capsys, plan, "--iterations", str(ITERS), "--warmup", "20", "--percentiles", "99,50,90",
                            "--export-json", str(j), "--export-times", str(t), "--dump-profile",
                            "--profile-iterations", "7", "--export-profile", str(p), "--seed", "3")
    assert code == 0, err
    s, times, prof = _load(j), _load(t), _load(p)
    assert s["iterations"] == ITERS and s["config"]["percentiles"] == [50, 90, 99]
    assert s["inputs"] == [{"name": "x", "dtype": "float32", "shape": [2, 3, 16, 16], "source": "random"}]
    _check_summary(s, times, out, batch=2)  # the profile's opt batch
    # the profile: the plan's launching layers, with their tactics, 7 calls each
    steps = load_plan(plan).graph["steps"]
    launching = {st["name"]: st for st in steps if is_layer(st["tactic"])}
    assert len(launching) < len(steps)  # the slice is a view: not a layer of the profile
    layers = prof["layers"]
    assert {r["name"] for r in layers} == set(launching) and len(layers) == len(launching)
    assert prof["iterations"] == 7 and all(r["calls"] == 7 for r in layers)
    for r in layers:
        st = launching[r["name"]]
        assert (r["op"], r["tactic"], r["index"]) == (st["op"], st["tactic"], steps.index(st))
        assert r["mean_ms"] == pytest.approx(r["total_ms"] / 7, rel=1e-12) and r["total_ms"] > 0
        assert f"{r['total_ms']:10.4f} {r['mean_ms']:9.4f} {r['median_ms']:9.4f} {r['percent']:6.1f}" in out
    assert math.fsum(r["percent"] for r in layers) == pytest.approx(100, abs=1e-9)
    assert layers[-1]["cumulative_percent"] == pytest.approx(100, abs=1e-9)
    assert [r["total_ms"] for r in layers] == sorted((r["total_ms"] for r in layers), reverse=True)
    assert prof["total_ms"] == pytest.approx(math.fsum(r["total_ms"] for r in layers), rel=1e-12)
    assert s["profile"]["layers"] == len(layers)


def test_bench_onnx_shapes_input_file_and_duration(files, tmp_path, capsys):
    model, _ = files
    x = np.random.default_rng().standard_normal((3, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    j, t = tmp_path / "s.json", tmp_path / "t.json"
    code, out, err = _bench(capsys, model, "--opt-level", "0", "--input", f"x={tmp_path / 'x.npy'}", "--duration",
                            "0.15", "--min-iterations", "12", "--warmup", "0", "--export-json", str(j),
                            "--export-times", str(t))
    assert code == 0, err
    s, times = _load(j), _load(t)
    assert s["iterations"] >= 12 and s["wall_time_s"] >= 0.15 and s["config"]["duration_s"] == 0.15
    assert s["inputs"][0]["shape"] == [3, 3, 16, 16] and s["inputs"][0]["source"] == str(tmp_path / "x.npy")
    assert s["warmup"]["iterations"] >= 1  # a context always runs once before timing
    _check_summary(s, times, out, batch=3)


def test_bench_threads(files, tmp_path, capsys):
    _, plan = files
    j, t = tmp_path / "s.json", tmp_path / "t.json"
    code, out, err = _bench(capsys, plan, "--shapes", "x:4x3x16x16", "--streams", "2", "--iterations", "40",
                            "--warmup", "10", "--export-json", str(j), "--export-times", str(t))
    assert code == 0, err
    s, times = _load(j), _load(t)
    assert "2 contexts from 2 threads" in out and s["config"]["streams"] == 2
    assert {r["context"] for r in times} == {0, 1}
    _check_summary(s, times, out, batch=4)


def test_layer_profiler_api(files):
    """From the API: the outputs are those of an unprofiled run (and onnxruntime's), and the layer times fit
    inside the wall time of the profiled runs."""
    from kiln.runtime.engine import Engine
    from kiln.runtime.profiler import LayerProfiler
    from kiln.testing import run_oracle
    model, plan = files
    engine = Engine.load(plan)
    ctx = engine.create_execution_context()
    x = np.random.default_rng().standard_normal((3, 3, 16, 16)).astype(np.float32)
    plain = ctx.execute({"x": x})["y"]
    prof = LayerProfiler(engine)
    ctx.profiler = prof
    t0 = time.perf_counter()
    got = [ctx.execute({"x": x})["y"] for _ in range(5)]
    wall_ms = (time.perf_counter() - t0) * 1e3
    ctx.profiler = None
    want = run_oracle(onnx.load(model), {"x": x})[0]
    for g in got:
        assert np.array_equal(g, plain)
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-4)
    d = prof.to_dict()
    assert d["iterations"] == 5 and 0 < d["total_ms"] <= wall_ms
    assert d["ms_per_iteration"] == pytest.approx(d["total_ms"] / 5, rel=1e-12)
    assert all(r["calls"] == 5 and 0 <= r["median_ms"] for r in d["layers"])
    table = prof.table()
    assert all(r["name"] in table for r in d["layers"]) and "Cum %" in table
    prof.reset()
    assert prof.to_dict()["layers"] == [] and prof.iterations == 0


# ---- bad flags: one line, exit 2, nothing built or written ------------------------------------------------

def _refused(capsys, monkeypatch, *args: str) -> str:
    from kiln.builder import Builder

    def no_build(*a, **k):
        raise AssertionError("the build started")
    monkeypatch.setattr(Builder, "build", no_build)
    code, out, err = _bench(capsys, *args)
    lines = [ln for ln in (out + err).strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("kiln: error:"), out + err
    return lines[0]


def test_bad_flags_refused(files, tmp_path, capsys, monkeypatch):
    model, plan = files
    assert "--fp16 is a build flag" in _refused(capsys, monkeypatch, plan, "--fp16")
    assert "--opt-level is a build flag" in _refused(capsys, monkeypatch, plan, "--opt-level", "0")
    assert "--min-shapes is a build flag" in _refused(capsys, monkeypatch, plan, "--min-shapes", "x:1x3x16x16")
    assert "'abc'" in _refused(capsys, monkeypatch, model, "--percentiles", "90,abc")
    assert "outside [0, 100]" in _refused(capsys, monkeypatch, model, "--percentiles", "101")
    assert "--iterations must be >= 1" in _refused(capsys, monkeypatch, model, "--iterations", "-5")
    assert "not both" in _refused(capsys, monkeypatch, model, "--iterations", "5", "--duration", "1")
    assert "--duration" in _refused(capsys, monkeypatch, model, "--duration", "0")
    assert "--streams" in _refused(capsys, monkeypatch, model, "--streams", "0")
    assert "--warmup" in _refused(capsys, monkeypatch, model, "--warmup", "-1")
    assert "unknown input 'nope'" in _refused(capsys, monkeypatch, model, "--input", f"nope={model}")
    assert "unknown input 'nope'" in _refused(capsys, monkeypatch, plan, "--input", f"nope={model}")
    assert "unknown input 'z'" in _refused(capsys, monkeypatch, plan, "--shapes", "z:1x3x16x16")
    assert "outside the profile range" in _refused(capsys, monkeypatch, plan, "--shapes", "x:9x3x16x16")
    assert "file not found" in _refused(capsys, monkeypatch, str(tmp_path / "none.onnx"))
    _refused(capsys, monkeypatch, model, "--iterations", "many")  # argparse's own refusal, same format


def test_unwritable_export_writes_nothing(files, tmp_path, capsys, monkeypatch):
    model, plan = files
    out = tmp_path / "out"
    out.mkdir()
    line = _refused(capsys, monkeypatch, model, "--iterations", "10", "--export-times", str(out / "t.json"),
                    "--export-json", str(tmp_path / "missing" / "s.json"))
    assert "does not exist" in line and "--export-json" in line
    assert "is a folder" in _refused(capsys, monkeypatch, plan, "--export-profile", str(out), "--dump-profile")
    assert "same file" in _refused(capsys, monkeypatch, plan, "--export-json", str(out / "a.json"),
                                   "--export-times", str(out / "a.json"))
    assert "is the model" in _refused(capsys, monkeypatch, plan, "--export-json", plan)
    assert os.listdir(out) == [] and not (tmp_path / "missing").exists()


# ---- a Darknet .cfg: built in memory as `kiln build` builds it ------------------------------------------------

TINY_CFG = """[net]
width=16
height=16
channels=3

[convolutional]
batch_normalize=1
filters=4
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
filters=6
size=1
stride=1
pad=1
activation=linear
"""


def _darknet(d) -> tuple[str, str]:
    """TINY_CFG and fresh random .weights for it (header 0.2.5; bn conv: biases, scales, mean, var, weights; then the
    1x1 conv's biases and weights)."""
    rng = np.random.default_rng()
    parts = [rng.standard_normal(4), 1 + 0.1 * rng.standard_normal(4), 0.1 * rng.standard_normal(4),
             0.5 + np.abs(rng.standard_normal(4)), 0.2 * rng.standard_normal(4 * 3 * 3 * 3),
             rng.standard_normal(6), 0.3 * rng.standard_normal(6 * 4)]
    cfg, weights = d / "tiny.cfg", d / "tiny.weights"
    cfg.write_text(TINY_CFG)
    weights.write_bytes(np.array([0, 2, 5], np.int32).tobytes() + np.zeros(1, np.int64).tobytes()
                        + np.concatenate(parts).astype(np.float32).tobytes())
    return str(cfg), str(weights)


def test_bench_darknet_cfg_and_its_profile_in_inspect(tmp_path, capsys):
    from kiln.cli.main import main
    cfg, weights = _darknet(tmp_path)
    j, t, p = tmp_path / "s.json", tmp_path / "t.json", tmp_path / "p.json"
    code, out, err = _bench(capsys, cfg, "--weights", weights, "--opt-level", "0", "--iterations", "12", "--warmup",
                            "0", "--export-json", str(j), "--export-times", str(t), "--export-profile", str(p),
                            "--profile-iterations", "3")
    assert code == 0, err
    s, prof = _load(j), _load(p)
    _check_summary(s, _load(t), out, batch=1)
    assert s["origin"].startswith(f"model {cfg}: built for cpu in ")
    assert s["inputs"] == [{"name": "input", "dtype": "float32", "shape": [1, 3, 16, 16], "source": "random"}]
    # `kiln build` of the same .cfg + .weights: the bench profile times exactly its layers, and inspect shows it
    plan = tmp_path / "tiny.kiln"
    assert main(["build", cfg, "--weights", weights, "--opt-level", "0", "-q", "-o", str(plan)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(plan), "--profile", str(p), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    launching = {r["name"]: r for r in doc["layers"] if r["launches"]}
    assert sorted(r["name"] for r in prof["layers"]) == sorted(launching) and len(launching) == 3
    assert doc["profile"]["layers_timed"] == 3 and doc["profile"]["unknown_layers"] == []
    for r in prof["layers"]:
        assert launching[r["name"]]["profile"] == {"ms": r["mean_ms"], "percent": r["percent"]}
    assert doc["profile"]["sum_ms"] == pytest.approx(math.fsum(r["mean_ms"] for r in prof["layers"]), rel=1e-12)
    # --shapes gives the Darknet input a dynamic batch, as for `kiln build`
    code, out, err = _bench(capsys, cfg, "--weights", weights, "--opt-level", "0", "--shapes", "input:3x3x16x16",
                            "--iterations", "6", "--warmup", "0", "--export-json", str(j), "--export-times", str(t))
    assert code == 0, err
    _check_summary(_load(j), _load(t), out, batch=3)


def test_darknet_flags_refused(files, tmp_path, capsys, monkeypatch):
    model, plan = files
    cfg, weights = _darknet(tmp_path)
    assert "give its weights with --weights" in _refused(capsys, monkeypatch, cfg, "--iterations", "3")
    assert "--weights goes with a Darknet .cfg" in _refused(capsys, monkeypatch, model, "--weights", weights)
    assert "--detect goes with a Darknet .cfg" in _refused(capsys, monkeypatch, model, "--detect")
    assert "--weights is a build flag" in _refused(capsys, monkeypatch, plan, "--weights", weights)
    assert "--detect is a build flag" in _refused(capsys, monkeypatch, plan, "--detect")
    assert "is the --weights file" in _refused(capsys, monkeypatch, cfg, "--weights", weights, "--export-json", weights)
    assert "--conf" in _refused(capsys, monkeypatch, cfg, "--weights", weights, "--conf", "0.5")
    assert os.path.getsize(weights) == 20 + 4 * (4 * 4 + 108 + 6 + 24)  # not overwritten


# ---- kiln bench from other tools (scripts/gpu_check.py) -------------------------------------------------------

def test_run_bench_reads_back_its_json(files, tmp_path):
    from kiln.cli.bench_json import parse_bench_json, run_bench
    from kiln.errors import KilnError
    _, plan = files
    r = run_bench(plan, ["--iterations", "6", "--warmup", "0", "--no-transfers", "--shapes", "x:3x3x16x16"])
    s = r.summary
    assert (r.min_ms, r.median_ms, r.mean_ms, r.max_ms) == tuple(s["latency_ms"][k] for k in ("min", "median", "mean",
                                                                                             "max"))
    assert r.min_ms <= r.median_ms <= r.max_ms and r.iterations == s["iterations"] == 6
    assert (r.batch, r.device, r.transfers, r.cuda_graph) == (3, "cpu", False, None)
    assert s["inputs"][0]["shape"] == [3, 3, 16, 16] and "--no-transfers" in " ".join(s["notes"])
    with pytest.raises(KilnError, match="exited with 2: kiln: error: model file not found"):
        run_bench(str(tmp_path / "none.kiln"))
    with pytest.raises(KilnError, match="--iterations must be >= 1"):
        run_bench(plan, ["--iterations", "0"])
    for edit, words in [(lambda d: d["latency_ms"].pop("median"), "no latency_ms.median"),
                        (lambda d: d["latency_ms"].__setitem__("min", 1e9), "not ordered"),
                        (lambda d: d["latency_ms"].__setitem__("mean", float("nan")), "latency_ms.mean"),
                        (lambda d: d.__setitem__("iterations", 0), "iterations must be"),
                        (lambda d: d.__setitem__("batch", "3"), "batch must be"),
                        (lambda d: d.pop("config"), "no config.cuda_graph")]:
        bad = json.loads(json.dumps(s))
        edit(bad)
        with pytest.raises(KilnError, match=words):
            parse_bench_json(bad)


def _gpu_check():
    import importlib.util
    from tests.conftest import ROOT
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", os.path.join(ROOT, "scripts", "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_records_kiln_bench_beside_its_own_median(files, monkeypatch):
    """gpu_check's step after its own timing, run on a CPU plan: `kiln bench` in its own process on the same plan
    file; both medians, their ratio and the verdict in the row and in the markdown."""
    import kiln.cli.bench_json as bench_mod
    gc = _gpu_check()
    _, plan = files  # built with a profile whose opt batch is 2: what kiln bench runs by default
    monkeypatch.setattr(gc, "BENCH_ARGS", ["--no-transfers", "--warmup", "0", "--iterations", "8"])
    calls = []
    real = bench_mod.run_bench

    def spy(*a, **k):
        calls.append((a, real(*a, **k)))
        return calls[-1][1]
    monkeypatch.setattr(bench_mod, "run_bench", spy)
    row = {"model": "tiny", "batch": 2, "kiln": 0.25}
    gc.bench_check(row, plan, 2)
    ((args, res),) = calls
    assert args == (plan, gc.BENCH_ARGS) and res.batch == 2 and res.iterations == 8
    assert row["bench"] == res.median_ms == res.summary["latency_ms"]["median"] and row["bench_iterations"] == 8
    assert row["bench_ratio"] == res.median_ms / 0.25 and row["bench_graph"] is None
    assert row["bench_agrees"] == (abs(res.median_ms / 0.25 - 1) <= 0.10)
    # the markdown: one row agreeing, one 25% off
    agree = dict(row, kiln=res.median_ms * 1.05, bench_ratio=1 / 1.05, bench_agrees=True)
    off = dict(row, batch=4, kiln=res.median_ms / 1.25, bench_ratio=1.25, bench_agrees=False, bench_graph=True)
    monkeypatch.setattr(gc, "RESULTS", [agree, off])
    md = gc.render("a CPU").splitlines()
    (a,) = [ln for ln in md if ln.startswith("- `kiln bench --no-transfers` tiny b2 ")]
    (b,) = [ln for ln in md if ln.startswith("- `kiln bench --no-transfers` tiny b4 ")]
    assert (f"median {res.median_ms:.3f} ms over 8 iterations vs {agree['kiln']:.3f} ms here, ratio {1 / 1.05:.3f}: "
            "agree within 10%") in a and "without CUDA graphs" in a
    assert f"vs {off['kiln']:.3f} ms here, ratio 1.250: **DISAGREE by more than 10%**" in b and "without" not in b
    # a run of another batch than the plan's row is a note, not a number
    monkeypatch.setattr(bench_mod, "run_bench", lambda *a, **k: res)
    wrong = {"model": "tiny", "batch": 7, "kiln": 0.25}
    gc.bench_check(wrong, plan, 7)
    assert "bench" not in wrong and any("kiln bench ran batch 2, the plan was built for 7" in n for n in gc.NOTES)
