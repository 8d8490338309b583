"""Kernels outside torch at an input shape oneDNN declines at run time: the layer's reference
implementation computes it (one warning), the autotuner never credits the tactic with that path,
and an O0 plan (no timing) still runs correctly."""
from __future__ import annotations

import io
import re
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.cpu import conv_dnnl, conv_matmul, conv_winograd, dnnl_layers, native
from kiln.backends.cpu.dnnl import DnnlError, library
from kiln.backends.tactic import get_tactic
from kiln.builder import Builder, BuilderConfig
from kiln.logger import Logger, Severity
from kiln.ops.registry import lookup
from kiln.runtime.engine import Engine
from tests.backends.test_cpu_tactics import TOL, make_node, rel_err

pytestmark = pytest.mark.skipif(library() is None,
                                reason="the oneDNN library (pip install onednn-cpu-gomp) is not installed")


def _declining(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> dict[str, bool]:
    """Make module.<name> (a primitive class) raise DnnlError while switch['on'] is set."""
    real, switch = getattr(module, name), {"on": False}

    def make(*a: Any, **k: Any) -> Any:
        if switch["on"]:
            raise DnnlError("oneDNN has only its reference implementation (ref:any) here")
        return real(*a, **k)
    monkeypatch.setattr(module, name, make)
    return switch


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _conv_node(k: int, residual: bool) -> tuple[Any, list[torch.Tensor]]:
    wt, b = _rand(24, 16, k, k, seed=1) * 0.2, _rand(24, seed=2)
    x, z = _rand(1, 16, 9, 11, seed=3), _rand(1, 24, 9, 11, seed=4)
    ins = [(x, False), (wt, True), (b, True)] + ([(z, False)] if residual else [])
    attrs = {"pads": [k // 2] * 4, "activation": "Relu", "alpha": 0.0, "beta": 0.0, "act_before_add": 0}
    return make_node("FusedConv", ins, None, attrs, domain="kiln"), [x, wt, b] + ([z] if residual else [])


CASES = [("cpu.conv_dnnl", conv_dnnl, "Convolution", 3, {}), ("cpu.conv_winograd", conv_winograd, "MatMul", 3, {"tile": 4}),
         ("cpu.conv_matmul", conv_matmul, "MatMul", 1, {})]


@pytest.mark.parametrize("tactic_id, module, prim, k, config", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("residual", [False, True])
def test_conv_falls_back_at_a_declined_shape(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                            tactic_id: str, module: Any, prim: str, k: int, config: dict[str, Any],
                                            residual: bool) -> None:
    if tactic_id == "cpu.conv_winograd" and native.load("winograd") is None:
        pytest.skip(f"no C compiler for the Winograd kernels here: {native.error('winograd')}")
    switch = _declining(monkeypatch, module, prim)
    node, args = _conv_node(k, residual)
    kernel = get_tactic(tactic_id).make(node, config, torch.device("cpu"))
    ref = lookup("FusedConv", "kiln").compute
    for batch, declined in ((1, False), (3, True), (3, True)):  # a primitive, a declined shape, its cached verdict
        switch["on"] = declined
        x = _rand(batch, 16, 9, 11, seed=batch).contiguous(memory_format=torch.channels_last)
        z = _rand(batch, 24, 9, 11, seed=batch + 7) if residual else None
        want = ref(node, x, args[1], args[2], *([z] if residual else []))
        out = torch.full(want.shape, float("nan")).contiguous(memory_format=torch.channels_last)
        got = kernel(x, None, None, z, out=out)  # W and B are prepacked: the runtime passes None for them
        assert got is out and rel_err(out, want) <= TOL
        assert (kernel.fallback.reason is not None) == declined
    err = capsys.readouterr().err
    assert err.count("running the op's reference implementation") == 1 and "input shape [3, 16, 9, 11]" in err


def test_pool_and_linear_fall_back(monkeypatch: pytest.MonkeyPatch) -> None:
    pool_switch = _declining(monkeypatch, dnnl_layers, "Pooling")
    x = _rand(2, 8, 13, 12, seed=5)
    pool = make_node("MaxPool", [(x, False)], None, {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
                     opset=19)
    kernel = get_tactic("cpu.pool_dnnl").make(pool, {}, torch.device("cpu"))
    pool_switch["on"] = True
    torch.testing.assert_close(kernel(x), lookup("MaxPool", "").compute(pool, x), rtol=0, atol=0)

    lin_switch = _declining(monkeypatch, dnnl_layers, "InnerProduct")
    a, w, b = _rand(4, 32, seed=6), _rand(32, 10, seed=7), _rand(10, seed=8)
    gemm = make_node("Gemm", [(a, False), (w, True), (b, True)], None, {}, opset=13)
    kernel = get_tactic("cpu.linear_dnnl").make(gemm, {}, torch.device("cpu"))
    lin_switch["on"] = True
    out = torch.empty(4, 10)
    assert kernel(a, None, None, out=out) is out
    assert rel_err(out, lookup("Gemm", "").compute(gemm, a, w, b)) <= TOL


def _pool_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((8, 4, 3, 3)) * 0.3).astype(np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_autotuner_skips_a_tactic_that_only_falls_back_and_o0_plans_still_run(monkeypatch: pytest.MonkeyPatch) -> None:
    _declining(monkeypatch, dnnl_layers, "Pooling")["on"] = True
    m = _pool_model()
    x = np.random.default_rng(1).standard_normal((1, 4, 10, 10)).astype(np.float32)
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    for level in (3, 0):
        log, quiet = io.StringIO(), io.StringIO()
        plan = Builder(Logger(Severity.VERBOSE, stream=log)).build(m, BuilderConfig(device="cpu",
                                                                                     optimization_level=level))
        Builder(Logger(stream=quiet)).build(m, BuilderConfig(device="cpu", optimization_level=level))
        assert "skipped" not in quiet.getvalue()  # an expected decline is not a warning
        pool = [s for s in plan.graph["steps"] if s["op"] == "MaxPool"][0]
        # timing skips the declined primitive; O0 takes the heuristic first candidate and falls back at run time
        assert (pool["tactic"] == "cpu.pool_dnnl") == (level == 0)
        if level:
            assert re.search(r"Tactic cpu.pool_dnnl \S* skipped for \S+ \(MaxPool\): declined: .*reference",
                             log.getvalue())
        got = Engine(plan).create_execution_context().execute({"x": x})["y"]
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("z_width,out_width", [(48, 24), (24, 40), (64, 40)])
def test_conv_matmul_takes_residual_and_destination_of_other_row_strides(z_width: int, out_width: int) -> None:
    """oneDNN's matmul refuses (reference loops only) a residual whose row stride differs from the destination's,
    as when the residual or the destination is a channel slice of a Concat's buffer (HGNetV2's stage blocks): the
    tactic then runs on dense copies instead of falling back to the reference."""
    node, args = _conv_node(1, True)
    kernel = get_tactic("cpu.conv_matmul").make(node, {}, torch.device("cpu"))
    x = _rand(1, 16, 7, 9, seed=3).contiguous(memory_format=torch.channels_last)
    z = _rand(1, z_width, 7, 9, seed=4).contiguous(memory_format=torch.channels_last)[:, :24]
    want = lookup("FusedConv", "kiln").compute(node, x, args[1], args[2], z)
    buf = torch.full((1, out_width, 7, 9), float("nan")).contiguous(memory_format=torch.channels_last)
    out = buf[:, out_width - 24:]
    for _ in range(2):
        got = kernel(x, None, None, z, out=out)
        assert got is out and rel_err(out, want) <= TOL
    assert kernel.fallback.reason is None
    assert torch.isnan(buf[:, :out_width - 24]).all()  # nothing written outside the slice
