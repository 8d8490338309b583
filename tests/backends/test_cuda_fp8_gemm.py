"""cuda.fp8_gemm on a GPU with FP8 tensor cores (compute capability >= 8.9): its kernels against the float64 oracle
of test_fp8_gemm.py, and float8 Q/DQ models built for CUDA against ONNX's reference evaluator. Times nothing."""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from kiln.backends.cuda.fp8_gemm import has_fp8_tensor_cores
from kiln.backends.tactic import TacticContext, get_tactic
from kiln.builder import Builder, BuilderConfig
from kiln.runtime import Engine
from tests.backends.test_fp8_gemm import CASES, F8, _case, _check, _oracle, _steps
from tests.passes.test_quantize_fp8 import _agree, _float_model, _gemm_model, _ops

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or not has_fp8_tensor_cores(torch.device("cuda")),
                                 reason="needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)")]

DEV = torch.device("cuda")
CTX = TacticContext(DEV)


def _run(node: Any, args: list[Any], fast: bool) -> torch.Tensor:
    tactic = get_tactic("cuda.fp8_gemm")
    assert tactic is not None and tactic.supports(node, CTX)
    assert {"fast_accum": fast} in tactic.configs(node, CTX)
    kernel = tactic.make(node, {"fast_accum": fast}, DEV)
    x = args[0].to(DEV)
    if node.op_type == "QConv":
        x = x.float().contiguous(memory_format=torch.channels_last).to(F8)
    z = [a.to(DEV) for a in args[3:]]
    return kernel(x, None, None, *z).cpu()


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("fast", [False, True])
def test_kernel_matches_oracle(case: dict[str, Any], fast: bool) -> None:
    node, args, attrs = _case(seed=7, **case)
    _check(_run(node, args, fast), args, attrs, node.op_type, exact=False)


@pytest.mark.parametrize("fast", [False, True])
def test_large_gemm(fast: bool) -> None:
    """K = 1024: float32 accumulation (fast: partial sums not promoted) still lands within one or two steps."""
    node, args, attrs = _case("QGemm", 8, True, m=256, k=1024, n=512, lead=(2,))
    got = _run(node, args, fast)
    want = _oracle(args[0], args[1], attrs, args[2], None, False)
    g32 = got.float().numpy()
    d = _steps(g32.astype(want.dtype), want)
    w32 = want.astype(np.float32)
    big = np.abs(w32) >= np.abs(w32).max() / 8  # near zero a float8 step is tiny: judge those absolutely
    assert d[big].max() <= (2 if fast else 1) and (d == 0).mean() >= 0.9, (d[big].max(), (d == 0).mean())
    assert np.abs(g32 - w32).max() <= np.abs(w32).max() / 8, np.abs(g32 - w32).max()  # one top-binade step


@pytest.mark.parametrize("kind, per_channel", [("MatMul", True), ("Gemm", False)])
def test_fp8_model_on_cuda(tmp_path, kind: str, per_channel: bool) -> None:
    path, _ = _gemm_model(str(tmp_path / "g.onnx"), kind, per_channel)
    plan = Builder().build(path, BuilderConfig(device="cuda", optimization_level=0))  # the tactic by priority
    assert _ops(plan) == ["QuantizeLinear", "QGemm", "DequantizeLinear"], _ops(plan)
    assert plan.graph["steps"][1]["tactic"] == "cuda.fp8_gemm"
    ref = ReferenceEvaluator(onnx.load(path))
    ctx = Engine(plan).create_execution_context()  # CUDA graphs: the kernel must capture
    rng = np.random.default_rng(21)
    for _ in range(3):
        x = (rng.standard_normal((8, 64)) * 2).astype(np.float32)
        _agree(ctx.execute({"x": x})["y"], ref.run(None, {"x": x})[0], 0.05)


def test_implicit_fp8_on_cuda(tmp_path) -> None:
    """BuilderConfig(fp8=True) on the GPU, every candidate timed: the two gemms and the 1x1 conv are FP8 layers,
    cuda.fp8_gemm's configs all pass the autotuner's reference check (none skipped)."""
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime runs the float model")
    path = _float_model(str(tmp_path / "f.onnx"))
    rng = np.random.default_rng(22)
    data = [{"x": rng.standard_normal((2, 16, 64)).astype(np.float32)} for _ in range(4)]
    plan = Builder().build(path, BuilderConfig(device="cuda", fp8=True, calibration_data=data, calibrator="minmax",
                                               optimization_level=3))
    fp8 = [s for s in plan.graph["steps"] if s["op"] in ("QGemm", "QConv")]
    assert len(fp8) == 3 and plan.build["tuning"]["skipped"] == 0, (plan.build["tuning"], fp8)
    x = rng.standard_normal((2, 16, 64)).astype(np.float32)
    want = ort.InferenceSession(path).run(None, {"x": x})[0]
    got = Engine(plan).create_execution_context().execute({"x": x})["y"]
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 1e-3 < rel < 0.15, rel


@pytest.mark.parametrize("case", [CASES[5], CASES[1]], ids=["qconv-fp8-residual", "qgemm-fp8-residual"])
def test_reference_layer_is_captured_in_a_cuda_graph(case: dict[str, Any]) -> None:
    """The reference QConv / QGemm (what runs a layer no fast kernel takes, as the FP8 residual convs of ResNet-50
    fall back) makes its device constants once, so a plan holding it can be captured: the replay of the captured
    graph equals the eager result. Before, its per-channel multipliers and 1 / y_scale were copied from the host
    on every call, which a capture refuses."""
    from kiln.ops.registry import lookup
    node, args, _ = _case(seed=5, **case)
    op = lookup(node.op_type, "kiln")
    dev = [a.to(DEV) if isinstance(a, torch.Tensor) else a for a in args]
    eager = op.compute(node, *dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the runtime's warm-up run before a capture
        op.compute(node, *dev)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op.compute(node, *dev)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.float(), eager.float())
