"""Runtime: profiles and dynamic shapes, input validation, several contexts per engine, memory plan."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from kiln.builder import Builder, BuilderConfig, OptimizationProfile
from kiln.errors import InputError, ProfileError
from kiln.plan.memory import Buffer, plan_memory
from kiln.runtime.engine import Engine
from kiln.testing import assert_close_to_scale, run_oracle


def _model(rng, batch="N"):
    w1 = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Conv", ["b", "w2"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Add", ["c", "b"], ["d"]),
             helper.make_node("Sigmoid", ["d"], ["y"])]
    g = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, 8, 8])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _engine(model, *profiles):
    return Engine(Builder().build(model, BuilderConfig(profiles=list(profiles))))


def test_dynamic_batch_within_profile():
    rng = np.random.default_rng()
    model = _model(rng)
    p = OptimizationProfile().set_shape("x", (1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8))
    ctx = _engine(model, p).create_execution_context()
    for n in (1, 3, 4):
        x = rng.standard_normal((n, 3, 8, 8)).astype(np.float32)
        assert_close_to_scale(ctx.execute({"x": x})["y"], run_oracle(model, {"x": x})[0])
    with pytest.raises(InputError, match=r"input 'x'.*\[5, 3, 8, 8\].*\[1, 3, 8, 8\]\.\.\[4, 3, 8, 8\]"):
        ctx.execute({"x": rng.standard_normal((5, 3, 8, 8)).astype(np.float32)})


def test_several_profiles():
    rng = np.random.default_rng()
    model = _model(rng)
    p0 = OptimizationProfile().set_shape("x", (1, 3, 8, 8), (1, 3, 8, 8), (2, 3, 8, 8))
    p1 = OptimizationProfile().set_shape("x", (8, 3, 8, 8), (8, 3, 8, 8), (16, 3, 8, 8))
    ctx = _engine(model, p0, p1).create_execution_context()
    x = rng.standard_normal((9, 3, 8, 8)).astype(np.float32)
    assert_close_to_scale(ctx.execute({"x": x})["y"], run_oracle(model, {"x": x})[0])
    with pytest.raises(InputError, match="outside the profile range"):
        ctx.set_input_shape("x", (4, 3, 8, 8))


@pytest.mark.parametrize("profile, msg", [
    (OptimizationProfile().set_shape("x", (1, 3, 9, 8), (1, 3, 8, 8), (1, 3, 8, 8)), "kMIN dimensions in profile 0"),
    (OptimizationProfile().set_shape("x", (1, 3, 8), (1, 3, 8, 8), (1, 3, 8, 8)), "rank"),
    (OptimizationProfile().set_shape("x", (4, 3, 8, 8), (2, 3, 8, 8), (8, 3, 8, 8)), "min <= opt <= max"),
    (OptimizationProfile().set_shape("nope", (1,), (1,), (1,)), "does not have"),
])
def test_bad_profiles(profile, msg):
    with pytest.raises(ProfileError, match=msg):
        _engine(_model(np.random.default_rng()), profile)


def test_input_errors_name_the_input():
    rng = np.random.default_rng()
    ctx = _engine(_model(rng, 2)).create_execution_context()
    with pytest.raises(InputError, match="unknown input 'z'"):
        ctx.execute({"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32), "z": np.zeros(1)})
    with pytest.raises(InputError, match="input 'x' has dtype float64, expected float32"):
        ctx.execute({"x": rng.standard_normal((2, 3, 8, 8))})
    with pytest.raises(InputError, match=r"input 'x' has shape \[2, 3, 8, 7\], expected \[2,3,8,8\]"):
        ctx.execute({"x": rng.standard_normal((2, 3, 8, 7)).astype(np.float32)})
    with pytest.raises(InputError, match="missing input 'x'"):
        ctx.execute({})


def test_contexts_share_engine_and_run_concurrently():
    rng = np.random.default_rng()
    model = _model(rng)
    engine = _engine(model, OptimizationProfile().set_shape("x", (1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8)))
    xs = [rng.standard_normal((k % 4 + 1, 3, 8, 8)).astype(np.float32) for k in range(8)]
    results: dict[int, np.ndarray] = {}

    def work(k: int) -> None:
        ctx = engine.create_execution_context()
        results[k] = ctx.execute({"x": xs[k]})["y"]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, x in enumerate(xs):
        assert_close_to_scale(results[k], run_oracle(model, {"x": x})[0])


def test_memory_planner_reuses_and_never_overlaps():
    rng = np.random.default_rng()
    bufs = []
    for i in range(60):
        first = int(rng.integers(0, 50))
        bufs.append(Buffer(f"b{i}", int(rng.integers(1, 10)) * 256, first, first + int(rng.integers(0, 5))))
    mp = plan_memory(bufs)  # verify() inside raises on any overlap
    assert mp.arena_bytes < mp.naive_bytes
    for a in bufs:
        for b in bufs:
            if a is not b and a.first <= b.last and b.first <= a.last:
                oa, ob = mp.offsets[a.name], mp.offsets[b.name]
                assert oa + a.size <= ob or ob + b.size <= oa


def test_plan_reports_arena_smaller_than_naive():
    plan = Builder().build(_model(np.random.default_rng(), 2), BuilderConfig())
    assert 0 < plan.memory["arena_bytes"] <= plan.memory["naive_bytes"]


@pytest.mark.parametrize("first", ["b", "x"])
def test_arena_slots_take_their_kernels_layout(first):
    """A conv's 4-D output is placed channels-last, and a pointwise layer's output like its first 4-D input
    (ConvNeXt's block: conv -> permute -> linear -> permute -> residual add with the block's input): the
    permuted branch is channels-last, the graph input contiguous. The outputs match onnxruntime."""
    rng = np.random.default_rng(3)
    c, hw = 16, 6
    w = (rng.standard_normal((c, c, 3, 3)) * 0.2).astype(np.float32)
    fc = (rng.standard_normal((c, c)) * 0.3).astype(np.float32)
    add = ["b", "x"] if first == "b" else ["x", "b"]
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Transpose", ["y"], ["t"], perm=[0, 2, 3, 1], name="to_nhwc"),
             helper.make_node("MatMul", ["t", "fc"], ["m"], name="fc"),
             helper.make_node("Relu", ["m"], ["r"], name="relu"),
             helper.make_node("Transpose", ["r"], ["b"], perm=[0, 3, 1, 2], name="to_nchw"),
             helper.make_node("Add", add, ["out0"], name="residual"),
             helper.make_node("Relu", ["out0"], ["h"], name="act"),
             helper.make_node("Conv", ["h", "w"], ["out"], pads=[1, 1, 1, 1], name="head")]
    g = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(fc, "fc")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    plan = Builder().build(model, BuilderConfig(optimization_level=0))
    for st in plan.graph["steps"]:
        if st["op"] == "Pointwise":  # the destination-passing pointwise tactic
            st["tactic"], st["config"] = "cpu.pointwise_c", {}
    engine = Engine(plan)
    fn = engine.function
    assert fn.arena is not None
    steps = {st.node.op_type: st for st in fn.steps if st.place >= 0}
    assert steps["FusedConv"].kernel.out_format == "channels_last"
    pw = steps["Pointwise"]
    assert pw.kernel.out_format == "like_input" and pw.follow >= 0
    seen = []
    inner = pw.fn

    def spy(*args, out=None):
        seen.append((args[pw.follow].is_contiguous(), out.is_contiguous(),
                     out.is_contiguous(memory_format=torch.channels_last)))
        return inner(*args, out=out)
    pw.fn = spy
    x = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
    got = engine.create_execution_context().execute({"x": x})["out"]
    assert_close_to_scale(got, run_oracle(model, {"x": x})[0], 1e-5)
    placed, _, _ = fn.arena.views({}, fn.device)
    assert placed[steps["FusedConv"].place].is_contiguous(memory_format=torch.channels_last)
    (in_rows, out_rows, out_cl), = seen
    assert in_rows == (first == "x") and out_rows == in_rows and out_cl == (not in_rows)


def _heads_model(rng):
    """x [N, S, 16] -> split into 4 heads by a run-time shape chain (Shape -> Gather -> Concat -> Reshape), scaled
    by 1/sqrt(head dim) read from the shape, plus position ids Range(0, S) added as data: what dynamic exports do."""
    c = {"i0": np.array(0, np.int64), "i1": np.array(1, np.int64), "heads": np.array([4], np.int64),
         "hd": np.array([4], np.int64), "ax0": np.array([0], np.int64), "zero": np.array(0, np.int64),
         "one": np.array(1, np.int64), "m1": np.array(-1, np.int64)}
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i0"], ["n"]),
             helper.make_node("Gather", ["s", "i1"], ["L"]),
             helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
             helper.make_node("Unsqueeze", ["L", "ax0"], ["L1"]),
             helper.make_node("Concat", ["n1", "L1", "heads", "hd"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["r"]),
             helper.make_node("Shape", ["r"], ["rs"]),
             helper.make_node("Gather", ["rs", "m1"], ["d"]),
             helper.make_node("Cast", ["d"], ["df"], to=TensorProto.FLOAT),
             helper.make_node("Sqrt", ["df"], ["sd"]),
             helper.make_node("Div", ["r", "sd"], ["scaled"]),
             helper.make_node("Range", ["zero", "L", "one"], ["pos"]),
             helper.make_node("Cast", ["pos"], ["posf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["posf", "m1"], ["pos2"]),
             helper.make_node("Unsqueeze", ["pos2", "m1"], ["pos3"]),
             helper.make_node("Add", ["scaled", "pos3"], ["y"])]
    g = helper.make_graph(nodes, "heads", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v, k) for k, v in c.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_shape_chains_run_once_per_input_shape_on_the_host():
    """Layers that compute from input shapes alone (kiln.runtime.prologue) leave the step list, run once per
    input shape, and make the graph capturable by CUDA graphs (a Reshape read a computed target on the host)."""
    from kiln.runtime.cuda_graph import capturable
    rng = np.random.default_rng()
    model = _heads_model(rng)
    prof = OptimizationProfile().set_shape("x", (1, 2, 16), (2, 8, 16), (4, 32, 16))
    plan = Builder().build(model, BuilderConfig(profiles=[prof]))
    engine = Engine(plan)
    f = engine.function
    ops = [st.node.op_type for st in f.steps]
    assert "Shape" not in ops and "Range" not in ops and "Concat" not in ops, ops
    assert 0 < plan.build["host_layers"] == len(f.prologue_nodes) <= plan.build["layers"]  # reported apart
    assert capturable(f.graph) == (True, "")
    ctx = engine.create_execution_context()
    calls = []
    inner = f._prologue_values
    f._prologue_values = lambda *a: calls.append(1) or inner(*a)
    computed = []
    orig = f._prologue_cache.get
    f._prologue_cache.get = lambda key, compute: orig(key, lambda: computed.append(key) or compute())
    for shape in [(1, 5, 16), (3, 7, 16), (1, 5, 16), (4, 32, 16), (3, 7, 16)]:
        x = rng.standard_normal(shape).astype(np.float32)
        got = ctx.execute({"x": x})["y"]
        want = run_oracle(model, {"x": x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert len(calls) == 5 and len(computed) == 3  # three distinct shapes


def test_outputs_never_share_the_reused_cpu_arena():
    """A thread reuses its CPU arena from one call to the next: an output that is a view of an arena slot (a
    Flatten of a conv output) must be handed out as a copy, so the next call does not overwrite it."""
    rng = np.random.default_rng()
    w = (rng.standard_normal((8, 4, 3, 3)) / 6).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["c2"]),  # [1, 4, 1, 1]: its Flatten is a view
             helper.make_node("Flatten", ["c2"], ["y"], axis=1)]
    w2 = (rng.standard_normal((4, 8, 10, 10)) / 30).astype(np.float32)
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 10, 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    engine = Engine(Builder().build(model, BuilderConfig(optimization_level=0)))
    steps = engine.function.steps
    assert steps[-1].node.op_type == "Flatten" and steps[-2].place >= 0  # the conv writes into the arena
    ctx = engine.create_execution_context()
    xs = [rng.standard_normal((1, 4, 10, 10)).astype(np.float32) for _ in range(3)]
    outs = [ctx.execute({"x": torch.from_numpy(x)})["y"] for x in xs]
    for x, got in zip(xs, outs):
        np.testing.assert_allclose(got.numpy(), run_oracle(model, {"x": x})[0], rtol=1e-4, atol=1e-5)
