"""CUDA backend on a GPU: cuDNN/cuBLAS tactics vs the reference, CUDA-target builds with autotuning and a
timing cache, CUDA graphs, execute_async on streams and concurrent contexts. Skipped without a GPU."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from kiln.backends.tactic import TacticContext, candidate_tactics, get_tactic  # noqa: E402
from kiln.builder import Builder, BuilderConfig, OptimizationProfile  # noqa: E402
from kiln.errors import PlanFormatError  # noqa: E402
from kiln.ir.dtype import DType  # noqa: E402
from kiln.ir.graph import Node, Value  # noqa: E402
from kiln.ir.types import TensorType  # noqa: E402
from kiln.ops.registry import lookup  # noqa: E402
from kiln.runtime.engine import Engine  # noqa: E402
from kiln.testing import run_oracle  # noqa: E402
from tests.conftest import rel_error  # noqa: E402

DEV = torch.device("cuda")


def _conv_node(dtype, act="Relu", residual=False, k=3, stride=1, cin=16, cout=32, hw=10, n=2):
    w = (torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5).to(dtype)
    pad = k // 2
    oh = (hw + 2 * pad - k) // stride + 1
    ins = [Value("x", TensorType(DType.from_torch(dtype), (n, cin, hw, hw))), Value("w", const=w),
           Value("b", const=torch.randn(cout).to(dtype))]
    if residual:
        ins.append(Value("z", TensorType(DType.from_torch(dtype), (n, cout, oh, oh))))
    node = Node("FusedConv", ins, [Value("y", TensorType(DType.from_torch(dtype), (n, cout, oh, oh)))],
                {"strides": [stride, stride], "pads": [pad] * 4, "dilations": [1, 1], "group": 1,
                 "activation": act}, name="c", domain="kiln")
    x = torch.randn(n, cin, hw, hw, device=DEV).to(dtype).contiguous(memory_format=torch.channels_last)
    z = torch.randn(n, cout, oh, oh, device=DEV).to(dtype) if residual else None
    return node, [x, None, None] + ([z] if residual else [])


@pytest.mark.parametrize("tid", ["cuda.cudnn_conv", "cuda.cudnn_fused_conv", "cuda.conv1x1_gemm",
                                 "cuda.triton_conv", "cuda.triton_gemm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_conv_tactics_match_reference(tid, dtype, residual, k):
    node, args = _conv_node(dtype, residual=residual, k=k)
    t = get_tactic(tid)
    if t is None:
        pytest.skip(f"{tid} not registered (triton missing?)")
    ctx = TacticContext(DEV, fp16=dtype == torch.float16)
    if not t.supports(node, ctx):
        assert tid in ("cuda.conv1x1_gemm", "cuda.triton_gemm") and k != 1
        return
    full = [a if a is not None else v.const.to(DEV) for a, v in zip(args, node.inputs)]
    want = lookup("FusedConv", "kiln").compute(node, *[a.double() for a in full])
    for cfg in t.configs(node, ctx)[:2]:
        got = t.make(node, cfg, DEV)(*args)
        assert got.shape == want.shape and got.dtype == dtype
        assert rel_error(got.cpu().numpy(), want.cpu().numpy()) < (1e-2 if dtype == torch.float16 else 3e-3), cfg


@pytest.mark.parametrize("tid,k,group", [("cuda.cudnn_conv", 3, 1), ("cuda.cudnn_conv", 3, 16),
                                          ("cuda.conv1x1_gemm", 1, 1)])
@pytest.mark.parametrize("act", ["Mish", "LeakyRelu", "Sigmoid", "HardSwish", "Relu"])
@pytest.mark.parametrize("residual", [False, True])
def test_library_conv_with_triton_epilogue(tid, k, group, act, residual):
    """The {"epilogue": "triton"} configs (library conv/GEMM, then one Triton pass for bias, activation and
    residual) match the float64 reference; offered whenever there is more than the library fuses itself."""
    if get_tactic("cuda.triton_conv") is None:
        pytest.skip("triton missing: the Triton epilogue is not offered")
    node, args = _conv_node(torch.float16, act=act, residual=residual, k=k)
    if group > 1:
        node.attrs["group"] = group
        w = node.inputs[1].const
        node.inputs[1] = Value("w", const=w[:, : w.shape[1] // group].contiguous())
    if act == "LeakyRelu":
        node.attrs["alpha"] = 0.1
    t = get_tactic(tid)
    ctx = TacticContext(DEV, fp16=True)
    cfgs = [c for c in t.configs(node, ctx) if c.get("epilogue") == "triton"]
    if act == "Relu" and not residual:
        assert not cfgs or tid == "cuda.cudnn_conv"
    if not cfgs:
        return
    full = [a if a is not None else v.const.to(DEV) for a, v in zip(args, node.inputs)]
    want = lookup("FusedConv", "kiln").compute(node, *[a.double() for a in full])
    got = t.make(node, cfgs[0], DEV)(*args)
    assert got.shape == want.shape and got.dtype == torch.float16
    assert rel_error(got.cpu().numpy(), want.cpu().numpy()) < 1e-2, (tid, act, residual)


@pytest.mark.parametrize("tid", ["cuda.cublas_gemm", "cuda.triton_gemm"])
@pytest.mark.parametrize("act", ["Relu", "Gelu", ""])
def test_gemm_tactics_match_reference(tid, act):
    w = (torch.randn(64, 96) / 10).half()
    node = Node("FusedGemm", [Value("a", TensorType(DType.FLOAT16, (8, 96))), Value("w", const=w),
                              Value("b", const=torch.randn(64).half())],
                [Value("y", TensorType(DType.FLOAT16, (8, 64)))], {"activation": act}, name="g", domain="kiln")
    a = torch.randn(8, 96, device=DEV).half()
    t = get_tactic(tid)
    if t is None:
        pytest.skip(f"{tid} not registered")
    want = lookup("FusedGemm", "kiln").compute(node, a.double(), w.double().to(DEV), node.inputs[2].const.double().to(DEV))
    for cfg in t.configs(node, TacticContext(DEV, fp16=True)):
        got = t.make(node, cfg, DEV)(a)
        assert rel_error(got.cpu().numpy(), want.cpu().numpy()) < 1e-2, cfg


@pytest.mark.parametrize("act", ["Gelu", "GeluTanh", ""])
@pytest.mark.parametrize("before", [0, 1])
def test_cublas_gemm_triton_epilogue_with_residual(act, before):
    """cuBLAS GEMM + bias, then GELU and the residual in one Triton pass, on a 3-D [batch, seq, hidden] input."""
    w = (torch.randn(64, 96) / 10).half()
    node = Node("FusedGemm", [Value("a", TensorType(DType.FLOAT16, (2, 5, 96))), Value("w", const=w),
                              Value("b", const=torch.randn(64).half()),
                              Value("z", TensorType(DType.FLOAT16, (2, 5, 64)))],
                [Value("y", TensorType(DType.FLOAT16, (2, 5, 64)))], {"activation": act, "act_before_add": before},
                name="g", domain="kiln")
    a, z = torch.randn(2, 5, 96, device=DEV).half(), torch.randn(2, 5, 64, device=DEV).half()
    t = get_tactic("cuda.cublas_gemm")
    cfgs = t.configs(node, TacticContext(DEV, fp16=True))
    if get_tactic("cuda.triton_gemm") is not None:
        assert {"epilogue": "triton"} in cfgs
    want = lookup("FusedGemm", "kiln").compute(node, a.double(), w.double().to(DEV),
                                               node.inputs[2].const.double().to(DEV), z.double())
    for cfg in cfgs:
        got = t.make(node, cfg, DEV)(a, None, None, z)
        assert got.shape == (2, 5, 64)
        assert rel_error(got.cpu().numpy(), want.cpu().numpy()) < 1e-2, cfg


def test_cuda_conv_candidates_include_cudnn_and_triton():
    node, _ = _conv_node(torch.float16)
    ids = {t.id for t in candidate_tactics(node, TacticContext(DEV, fp16=True))}
    assert {"cuda.cudnn_conv", "cuda.cudnn_fused_conv", "ref"} <= ids


def _model(rng, batch="N"):
    w1 = (rng.standard_normal((16, 3, 3, 3)) / 5).astype(np.float32)
    w2 = (rng.standard_normal((16, 16, 3, 3)) / 12).astype(np.float32)
    w3 = (rng.standard_normal((16, 16, 1, 1)) / 4).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Conv", ["b", "w2"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Add", ["c", "b"], ["d"]),
             helper.make_node("Relu", ["d"], ["e"]), helper.make_node("Conv", ["e", "w3"], ["f"]),
             helper.make_node("Sigmoid", ["f"], ["g"]), helper.make_node("Mul", ["f", "g"], ["y"])]
    g = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 16, 16, 16])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                           numpy_helper.from_array(w3, "w3")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _profile(lo=1, opt=4, hi=8):
    return OptimizationProfile().set_shape("x", (lo, 3, 16, 16), (opt, 3, 16, 16), (hi, 3, 16, 16))


@pytest.mark.parametrize("flags, level", [({"fp16": True}, 3), ({"bf16": True}, 1), ({}, 1)])
def test_cuda_build_matches_onnxruntime(flags, level, tmp_path):
    rng = np.random.default_rng(0)
    model = _model(rng)
    cache = tmp_path / "tc.json"
    cfg = BuilderConfig(device="cuda", profiles=[_profile()], timing_cache=str(cache), optimization_level=level,
                        **flags)
    plan = Builder().build(model, cfg)
    assert plan.target["device"] == "cuda" and plan.target["capability"]
    assert plan.build["tuning"]["measured"] > 0
    tol = {"fp16": 1e-2, "bf16": 3e-2}.get(next(iter(flags), ""), 3e-3)
    ctx = Engine(plan).create_execution_context()
    for n in (1, 4, 7):
        x = rng.standard_normal((n, 3, 16, 16)).astype(np.float32)
        assert rel_error(ctx.execute({"x": x})["y"], run_oracle(model, {"x": x})[0]) < tol
    warm = Builder().build(model, cfg)
    assert warm.build["tuning"]["measured"] == 0
    assert [s["tactic"] for s in warm.graph["steps"]] == [s["tactic"] for s in plan.graph["steps"]]


def test_cuda_graph_execute_async_streams_and_buffers():
    rng = np.random.default_rng(1)
    model = _model(rng)
    eng = Engine(Builder().build(model, BuilderConfig(device="cuda", fp16=True, profiles=[_profile()])))
    assert eng.graph_capturable, eng.graph_reason
    graphed, eager = eng.create_execution_context(), eng.create_execution_context(cuda_graph=False)
    s = torch.cuda.Stream()
    for n in (2, 5, 2):
        x = torch.randn(n, 3, 16, 16, device=DEV)
        s.wait_stream(torch.cuda.current_stream())  # x was made on the default stream
        with torch.cuda.stream(s):
            y = graphed.execute_async({"x": x}, s)["y"]
        s.synchronize()
        y_eager = eager.execute_async([x])["y"]
        torch.cuda.synchronize()
        assert graphed.last_graph is not None and y.is_cuda
        assert rel_error(y.cpu().numpy(), y_eager.cpu().numpy()) < 1e-2  # cuDNN may pick other algorithms
    # writing into the static input buffer skips the copy
    buf = graphed.input_buffers()["x"]
    buf.copy_(torch.randn_like(buf))
    y1 = graphed.execute_async({"x": buf})["y"].clone()
    y2 = eager.execute_async({"x": buf.clone()})["y"]
    torch.cuda.synchronize()
    assert rel_error(y1.cpu().numpy(), y2.cpu().numpy()) < 1e-2
    assert graphed.graph_pool_bytes > 0


def test_concurrent_contexts_on_own_streams():
    rng = np.random.default_rng(2)
    model = _model(rng)
    eng = Engine(Builder().build(model, BuilderConfig(device="cuda", fp16=True, profiles=[_profile()])))
    xs = [torch.randn(3, 3, 16, 16, device=DEV) for _ in range(4)]
    torch.cuda.synchronize()
    want = [run_oracle(model, {"x": x.cpu().numpy()})[0] for x in xs]
    errors: list[str] = []

    def worker(k: int) -> None:
        try:
            ctx, stream = eng.create_execution_context(), torch.cuda.Stream()
            for _ in range(20):
                with torch.cuda.stream(stream):
                    y = ctx.execute_async({"x": xs[k]}, stream)["y"]
                stream.synchronize()
                if rel_error(y.cpu().numpy(), want[k]) > 1e-2:
                    errors.append(f"context {k}: wrong result")
                    return
        except Exception as e:  # reported below
            errors.append(f"context {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_plan_for_another_capability_is_refused():
    plan = Builder().build(_model(np.random.default_rng(3)), BuilderConfig(device="cuda", optimization_level=0))
    plan.target["capability"] = "1.0"
    with pytest.raises(PlanFormatError, match="compute capability 1.0"):
        Engine(plan)


def test_split_k_results_do_not_move():
    """A split-K reduction racing would give run-to-run differences on the same input (beyond the last-bit
    noise of float atomics adding in a different order)."""
    t = get_tactic("cuda.triton_conv")
    if t is None:
        pytest.skip("triton not installed")
    node, args = _conv_node(torch.float16, residual=True, cin=256, cout=128, hw=7, n=1)
    cfgs = [c for c in t.configs(node, TacticContext(DEV, fp16=True)) if c.get("SPLIT_K", 1) > 1]
    assert cfgs
    for cfg in cfgs:
        kern = t.make(node, cfg, DEV)
        first = kern(*args).clone()
        for _ in range(30):
            assert rel_error(kern(*args).cpu().numpy(), first.cpu().numpy()) < 2e-3, cfg


def _csp_model(rng, batch="N"):
    """One YOLOv4-tiny CSP block: conv a, channel half of a, convs b, c, concat(c, b) -> 1x1 d,
    concat(a, d) -> maxpool, plus an upsampled branch concatenated with d (d lives in two concats)."""
    def w(name, k, c, ks):
        return numpy_helper.from_array((rng.standard_normal((k, c, ks, ks)) / (c * ks * ks) ** 0.5).astype(np.float32), name)
    mk = helper.make_node
    nodes = [mk("Conv", ["x", "wa"], ["a0"], pads=[1] * 4), mk("LeakyRelu", ["a0"], ["a"], alpha=0.1),
             mk("Slice", ["a", "s0", "s1", "ax"], ["half"]),
             mk("Conv", ["half", "wb"], ["b0"], pads=[1] * 4), mk("LeakyRelu", ["b0"], ["b"], alpha=0.1),
             mk("Conv", ["b", "wc"], ["c0"], pads=[1] * 4), mk("LeakyRelu", ["c0"], ["c"], alpha=0.1),
             mk("Concat", ["c", "b"], ["cb"], axis=1), mk("Conv", ["cb", "wd"], ["d0"]),
             mk("LeakyRelu", ["d0"], ["d"], alpha=0.1),
             mk("Concat", ["a", "d"], ["ad"], axis=1), mk("MaxPool", ["ad"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             mk("Conv", ["p", "we"], ["e"]), mk("Resize", ["e", "", "sc"], ["up"], mode="nearest"),
             mk("Concat", ["up", "d"], ["ud"], axis=1), mk("Conv", ["ud", "wf"], ["y"], pads=[1] * 4)]
    inits = [w("wa", 32, 8, 3), w("wb", 16, 16, 3), w("wc", 16, 16, 3), w("wd", 32, 32, 1), w("we", 16, 64, 1),
             w("wf", 16, 48, 3),
             numpy_helper.from_array(np.array([16], np.int64), "s0"), numpy_helper.from_array(np.array([32], np.int64), "s1"),
             numpy_helper.from_array(np.array([1], np.int64), "ax"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc")]
    g = helper.make_graph(nodes, "csp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 16, 16, 16]),
                           helper.make_tensor_value_info("p", TensorProto.FLOAT, [batch, 64, 8, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("fp16", [False, True])
def test_concat_elision_and_views_on_cuda(fp16):
    """Every Concat elided (d written into two), the Slice a view, Triton pool/resize: one layer per
    conv + pool + resize; outputs match onnxruntime with and without CUDA graphs, for two batch sizes."""
    rng = np.random.default_rng(11)
    model = _csp_model(rng)
    prof = OptimizationProfile().set_shape("x", (1, 8, 16, 16), (2, 8, 16, 16), (4, 8, 16, 16))
    plan = Builder().build(model, BuilderConfig(device="cuda", fp16=fp16, profiles=[prof], optimization_level=2))
    assert plan.build["elided"] == 3 and plan.build["views"] == 1
    # 6 convs, the pool, the resize; in fp16 the Cast of output p (a pool's) stays, the others fold into convs
    assert plan.build["layers"] == 8 + int(fp16)
    eng = Engine(plan)
    for graph in (True, False):
        ctx = eng.create_execution_context(cuda_graph=graph)
        for n in (1, 3):
            x = rng.standard_normal((n, 8, 16, 16)).astype(np.float32)
            got = ctx.execute({"x": x})
            want = run_oracle(model, {"x": x})
            for name, w in zip(("y", "p"), want):
                assert rel_error(got[name], w) <= (1e-2 if fp16 else 3e-3), (graph, n, name)  # fp32: TF32


def test_dynamic_shape_chains_capture_a_cuda_graph_per_shape():
    """A run-time shape chain (Reshape target, 1/sqrt(head dim), Range position ids read as data) runs in the
    host prologue: the plan captures a CUDA graph per input shape and matches onnxruntime at each."""
    from tests.test_runtime import _heads_model
    rng = np.random.default_rng()
    model = _heads_model(rng)
    prof = OptimizationProfile().set_shape("x", (1, 2, 16), (2, 8, 16), (4, 32, 16))
    engine = Engine(Builder().build(model, BuilderConfig(device="cuda", fp16=True, profiles=[prof])))
    ctx = engine.create_execution_context()
    for shape in [(1, 5, 16), (3, 7, 16), (1, 5, 16)]:
        x = rng.standard_normal(shape).astype(np.float32)
        got = ctx.execute_async({"x": torch.from_numpy(x).cuda()})["y"].float().cpu().numpy()
        assert ctx.last_graph is not None
        want = run_oracle(model, {"x": x})[0]
        assert rel_error(got, want) < 1e-2


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_channel_shuffle_on_cuda(precision):
    """Channel shuffles between 1x1 convs (run-time shape chains, dynamic batch) run on cuda.channel_shuffle in
    the precision of the convs around them, one layer each, and match onnxruntime with and without CUDA graphs."""
    from tests.passes.test_channel_shuffle import shuffle_model
    model = shuffle_model(c=48, g=2, batch="N", hw=(14, 14), chain=True, blocks=2)
    prof = OptimizationProfile().set_shape("x", (1, 48, 14, 14), (2, 48, 14, 14), (4, 48, 14, 14))
    plan = Builder().build(model, BuilderConfig(device="cuda", fp16=precision == "fp16", bf16=precision == "bf16",
                                                profiles=[prof], optimization_level=0))
    steps = [s for s in plan.graph["steps"] if s["op"] == "ChannelShuffle"]
    assert len(steps) == 2 and all(s["tactic"] == "cuda.channel_shuffle" for s in steps)
    assert not any(s["op"] in ("Reshape", "Transpose") for s in plan.graph["steps"])
    want_dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[precision]
    assert all(plan.graph["values"][s["outputs"][0]]["type"]["dtype"] == want_dtype for s in steps)
    eng = Engine(plan)
    rng = np.random.default_rng()
    for graph in (True, False):
        ctx = eng.create_execution_context(cuda_graph=graph)
        for n in (1, 3):
            x = rng.standard_normal((n, 48, 14, 14)).astype(np.float32)
            got = ctx.execute({"x": x})["y"]
            want = run_oracle(model, {"x": x})[0]
            assert rel_error(got, want) <= {"fp32": 3e-3, "fp16": 1e-2, "bf16": 3e-2}[precision], (graph, n)
