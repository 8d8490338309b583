"""INT8 by measured speed (kiln.quant.speed): the exact min-cut solver against brute force; with injected times a
CNN keeps exactly the slow-in-INT8 layer float, an isolated float-favouring layer goes int8 only when its saving
beats the reformats around it, `--int8-layers all` keeps every eligible layer INT8; with real timings the plan runs,
matches onnxruntime within INT8 tolerance and records its decision; the reformats the cost model counts are those
the lowering makes, for every labelling."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

import kiln.quant.speed as speed
from kiln.builder import Builder, BuilderConfig
from kiln.cli.main import main
from kiln.ops.qlayers import FLOAT, QuantSpec
from kiln.quant.speed import LabelingProblem
from kiln.runtime import Engine

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is the oracle")

from kiln.testing import calibrated_int8_cpu  # noqa: E402

CALIBRATED_INT8, NO_CALIBRATED_INT8 = calibrated_int8_cpu()
needs_int8 = pytest.mark.skipif(not CALIBRATED_INT8, reason=NO_CALIBRATED_INT8)


# -- (a) the solver -------------------------------------------------------------------------------------------------
def _random_problem(rng: np.random.Generator) -> LabelingProblem:
    n = int(rng.integers(1, 9))
    p = LabelingProblem(n)
    for i in range(n):
        p.add_unary(i, float(rng.uniform(-1, 3)), float(rng.uniform(-1, 3)))
    for _ in range(int(rng.integers(0, 3 * n))):
        members = [int(i) for i in rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False)]
        cost = float(rng.uniform(0, 2))
        (p.add_any_int8 if rng.random() < 0.5 else p.add_any_float)(members, cost)
    if rng.random() < 0.3:
        p.fix(int(rng.integers(n)), bool(rng.random() < 0.5))
    return p


def _brute(p: LabelingProblem) -> float:
    """The energy recomputed from the terms, independently of LabelingProblem.energy, minimized over all labellings."""
    best = float("inf")
    for labels in itertools.product([False, True], repeat=p.n):
        if any(labels[i] != x for i, x in p.fixed.items()):
            continue
        e = p.constant + sum(p.unary[i][int(x)] for i, x in enumerate(labels))
        e += sum(c for m, c in p.any_int8 if any(labels[i] for i in m))
        e += sum(c for m, c in p.any_float if any(not labels[i] for i in m))
        best = min(best, e)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_min_cut_is_the_exact_optimum(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(40):
        p = _random_problem(rng)
        labels = p.solve()
        assert len(labels) == p.n and all(labels[i] == x for i, x in p.fixed.items())
        assert p.energy(labels) == pytest.approx(_brute(p), abs=1e-4)


def test_solver_rejects_a_negative_group_cost() -> None:
    with pytest.raises(ValueError):
        LabelingProblem(2).add_any_int8([0, 1], -1.0)


# -- the networks ---------------------------------------------------------------------------------------------------
class _Residual(torch.nn.Module):
    """conv-relu, max pool, conv, conv + residual from the pool, strided conv, flatten, gemm."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.c3 = torch.nn.Conv2d(16, 16, 1)
        self.c4 = torch.nn.Conv2d(16, 8, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
        z = torch.relu(self.c3(torch.relu(self.c2(y))) + y)
        return self.fc(torch.relu(self.c4(z)).flatten(1))


class _Chain(torch.nn.Module):
    """Four conv-relu layers in a row, then a gemm: each tensor between them has one reader."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(c, 16, 3, padding=1) for c in (3, 16, 16, 16))
        self.fc = torch.nn.Linear(16 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c in self.convs:
            x = torch.relu(c(x))
        return self.fc(x.flatten(1))


_SHAPE = {"_Residual": (1, 3, 16, 16), "_Chain": (1, 3, 8, 8)}


def _export(net: torch.nn.Module, path: str) -> str:
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.normal_(m.weight, std=0.3)
    torch.onnx.export(net.eval(), torch.randn(_SHAPE[type(net).__name__]), path, input_names=["x"],
                      output_names=["y"], opset_version=17, dynamo=False)
    return path


@pytest.fixture(scope="module")
def residual(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _export(_Residual(), str(tmp_path_factory.mktemp("speed") / "residual.onnx"))


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _export(_Chain(), str(tmp_path_factory.mktemp("speed") / "chain.onnx"))


def _config(shape: tuple[int, ...], **kw) -> BuilderConfig:  # noqa: ANN003 - BuilderConfig's fields
    rng = np.random.default_rng(1)
    data = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(4)]
    return BuilderConfig(device="cpu", int8=True, calibration_data=data, calibrator="minmax", **kw)


def _layers(plan) -> dict[str, str]:  # noqa: ANN001 - a Plan
    """conv/gemm layer name -> its op in the plan."""
    return {s["name"]: s["op"] for s in plan.graph["steps"] if s["op"] in ("QConv", "QGemm", "FusedConv", "FusedGemm")}


def _check_against_ort(plan, path: str, shape: tuple[int, ...]) -> None:  # noqa: ANN001 - a Plan
    """Fresh random inputs: Kiln's outputs within INT8 tolerance (relative L2 error) of onnxruntime's."""
    sess = ort.InferenceSession(path)
    ctx = Engine(plan).create_execution_context()
    rng = np.random.default_rng(11)
    for _ in range(3):
        x = rng.standard_normal(shape).astype(np.float32)
        want = sess.run(None, {"x": x})[0]
        got = ctx.execute({"x": x})["y"]
        rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        assert rel < 0.1, rel


def _fake_times(int8: dict[str, float], float_: dict[str, float], float_out_extra: float, quantize: float):
    """A layer_time giving each conv/gemm the injected time by name prefix (its int8 time, plus `float_out_extra`
    when it writes float), each QuantizeLinear `quantize`, anything else (movers, casts) 0.001 ms."""
    def layer_time(tuner, node, types):  # noqa: ANN001, ANN202 - kiln.quant.speed.layer_time's signature
        base = node.name.split("#")[0]
        key = next((k for k in {**int8, **float_} if base.startswith(k)), None)
        if node.op_type in ("QConv", "QGemm") and key is not None:
            return int8[key] + (float_out_extra if QuantSpec.of(node).out_dtype == FLOAT else 0.0)
        if node.op_type in ("FusedConv", "FusedGemm") and key is not None:
            return float_[key]
        if node.op_type == "QuantizeLinear":
            return quantize
        return 0.001
    return layer_time


# -- (b) one slow integer layer ---------------------------------------------------------------------------------------
@needs_int8
def test_the_layer_slow_in_int8_alone_stays_float(residual: str, monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["/c1/", "/c2/", "/c3/", "/c4/", "/fc/"]
    int8 = {n: (1000.0 if n == "/c2/" else 0.01) for n in names}
    monkeypatch.setattr(speed, "layer_time", _fake_times(int8, {n: 1.0 for n in names}, 0.01, 0.01))
    plan = Builder().build(residual, _config(_SHAPE["_Residual"]))
    layers = _layers(plan)
    assert [k for k, op in layers.items() if op.startswith("Fused")] == ["/c2/Conv"], layers
    assert sum(op in ("QConv", "QGemm") for op in layers.values()) == 4, layers
    rec = plan.build["int8_speed"]
    assert (rec["int8_layers"], rec["float_layers"]) == (4, 1)
    assert plan.build["int8_speed_layers"]["/c2/Conv"] == "fp32"
    _check_against_ort(plan, residual, _SHAPE["_Residual"])
    # constrained to INT8 by the user, it stays INT8 whatever the times
    forced = Builder().build(residual, _config(_SHAPE["_Residual"], layer_precisions={"/c2/Conv": "int8"}))
    assert all(op in ("QConv", "QGemm") for op in _layers(forced).values()), _layers(forced)


# -- (c) reformats against an isolated layer's saving ---------------------------------------------------------------
@needs_int8
@pytest.mark.parametrize("reformat", [1.0, 0.03, 0.001])
def test_isolated_layer_weighs_its_saving_against_the_reformats(chain: str, reformat: float,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Every layer is 10x faster in INT8 except the third, 0.05 ms faster in float. Kept float, its int8 producer
    writes float (`reformat` ms more) and its int8 reader needs a quantize (`reformat` ms): float pays only when
    0.05 > 2 * reformat."""
    convs = [f"/convs.{i}/" for i in range(4)] + ["/fc/"]
    int8 = {n: 0.1 for n in convs}
    float_ = {n: 1.0 for n in convs}
    float_["/convs.2/"] = 0.05
    monkeypatch.setattr(speed, "layer_time", _fake_times(int8, float_, reformat, reformat))
    plan = Builder().build(chain, _config(_SHAPE["_Chain"]))
    layers = _layers(plan)
    middle_float = 0.1 - float_["/convs.2/"] > 2 * reformat
    assert (layers["/convs.2/Conv"] == "FusedConv") == middle_float, layers
    assert sum(op == "FusedConv" for op in layers.values()) == int(middle_float), layers
    est = plan.build["int8_speed"]
    saving = est["estimated_ms_all_int8"] - est["estimated_ms_chosen"]
    assert saving == pytest.approx(max(0.0, 0.1 - float_["/convs.2/"] - 2 * reformat), abs=1e-4)
    _check_against_ort(plan, chain, _SHAPE["_Chain"])


# -- (d) --int8-layers all --------------------------------------------------------------------------------------------
@needs_int8
def test_int8_layers_all_keeps_every_eligible_layer_int8(residual: str, tmp_path,  # noqa: ANN001 - tmp_path
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    """With every layer injected 100x slower in INT8, the default (speed) builds no integer layer, `all` five."""
    from kiln.plan.header import read_header
    names = ["/c1/", "/c2/", "/c3/", "/c4/", "/fc/"]
    monkeypatch.setattr(speed, "layer_time", _fake_times({n: 100.0 for n in names}, {n: 1.0 for n in names},
                                                         0.0, 0.01))
    ranges = tmp_path / "ranges.json"
    ranges.write_text(json.dumps({"*": 6.0}))
    ops = {}
    for mode in ("speed", "all"):
        out = tmp_path / f"{mode}.kiln"
        flags = [] if mode == "speed" else ["--int8-layers", "all"]
        assert main(["build", residual, "-o", str(out), "--device", "cpu", "--int8", "--dynamic-ranges", str(ranges),
                     *flags]) == 0
        ops[mode] = [s["op"] for s in read_header(str(out)).header["graph"]["steps"]]
    assert sum(op in ("QConv", "QGemm") for op in ops["all"]) == 5, ops["all"]
    assert sum(op in ("QConv", "QGemm") for op in ops["speed"]) == 0, ops["speed"]
    err = capsys.readouterr().err
    assert "INT8 by measured speed: 0 of 5 conv/gemm layers run int8, 5 faster in fp32" in err
    assert main(["build", residual, "-o", str(tmp_path / "x.kiln"), "--int8-layers", "all"]) == 2
    assert capsys.readouterr().err.strip() == "kiln: error: --int8-layers goes with --int8"
    assert not (tmp_path / "x.kiln").exists()


# -- (e) real timings -------------------------------------------------------------------------------------------------
@needs_int8
def test_real_timings_build_runs_and_records_its_choice(residual: str) -> None:
    plan = Builder().build(residual, _config(_SHAPE["_Residual"]))
    layers = _layers(plan)
    decided = plan.build["int8_speed_layers"]
    assert set(decided) == set(layers)
    for name, op in layers.items():
        assert (op in ("QConv", "QGemm")) == (decided[name] == "int8"), (name, op, decided[name])
    rec = plan.build["int8_speed"]
    assert rec["int8_layers"] == sum(op in ("QConv", "QGemm") for op in layers.values())
    assert rec["int8_layers"] + rec["float_layers"] == 5
    # the choice is the model's optimum: no worse than either uniform labelling
    assert rec["estimated_ms_chosen"] <= min(rec["estimated_ms_all_int8"], rec["estimated_ms_all_float"]) + 1e-4
    _check_against_ort(plan, residual, _SHAPE["_Residual"])


# -- (f) the model's boundaries are the lowering's --------------------------------------------------------------------
@needs_int8
def test_groups_predict_the_lowerings_reformats(residual: str) -> None:
    """For every labelling of the five layers, the quantizes and float-writing integer layers the cost model counts
    (kiln.quant.speed.groups) are those the lowering really makes."""
    from kiln.frontend.onnx import load_onnx
    from kiln.logger import Logger
    from kiln.ops.qlayers import quant_layer
    from kiln.passes.base import PassContext, PassManager
    from kiln.passes.pipeline import default_pipeline
    from kiln.quant.build import Int8Lowering, quantize_graph
    g = load_onnx(residual)
    ctx = PassContext(Logger(), device="cpu", options={})
    PassManager(default_pipeline()).run(g, ctx)
    keep = Int8Lowering()
    quantize_graph(g, BuilderConfig(device="cpu", int8=True, dynamic_ranges={"*": 6.0}), ctx, keep)
    int8_out = {n.name for n in g.nodes if quant_layer(n) and QuantSpec.of(n).quantized_out}
    names = [n.name for n in g.nodes if quant_layer(n)]
    assert len(names) == 5
    grps = speed.groups(keep.pre, set(names))
    for labels in itertools.product([False, True], repeat=len(names)):
        on = {n for n, x in zip(names, labels) if x}
        want_q, want_float_out = 0, set()
        for grp in grps:
            readers = {r for rs in grp.readers.values() for r in rs}
            all_int8 = (grp.producer in on and grp.producer in int8_out and not grp.blocked and readers
                        and readers <= on)
            if not all_int8:
                want_q += sum(1 for rs in grp.readers.values() if set(rs) & on)
                if grp.producer in on:
                    want_float_out.add(grp.producer)
        h = keep.lower(set(names) - on, ctx)
        got_q = sum(1 for n in h.nodes if n.op_type == "QuantizeLinear")
        got_float_out = {n.name for n in h.nodes if quant_layer(n) and not QuantSpec.of(n).quantized_out}
        assert {n.name for n in h.nodes if quant_layer(n)} == on
        assert not any(n.op_type == "DequantizeLinear" for n in h.nodes)  # dequantizing is the layers' own
        assert (got_q, got_float_out) == (want_q, want_float_out), (on, got_q, want_q)
