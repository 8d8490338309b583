"""Concat elision and zero-copy views in the runtime: producers write into slices of the Concat output.

The producers here are reference kernels given an ``out=`` (a test double of a writes_out tactic); the
real Triton kernels with ``out=`` are checked in tests/backends/test_cuda_triton.py. The oracle is the
same graph run step by step with the reference kernels and a real Concat.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from kiln.backends.kernel import Kernel
from kiln.backends.tactic import get_tactic
from kiln.frontend.onnx import load_onnx
from kiln.ir.graph import Node
from kiln.logger import Logger
from kiln.ops.registry import lookup
from kiln.passes.base import PassContext
from kiln.passes.concat import MarkConcatElision
from kiln.plan.memory import lifetimes, plan_memory
from kiln.runtime.interpreter import GraphFunction

CPU = torch.device("cpu")


def _model(batch: int | str = "N"):
    """x -> a=Relu, b=Neg, d=Sigmoid(x); c1 = Concat(a, b), c2 = Concat(b, d), h = a[:, 1:3] (a view);
    outputs read c1, c2 and h after further ops, so a and b live in two Concats and a in a view."""
    mk = helper.make_node
    nodes = [mk("Relu", ["x"], ["a"]), mk("Neg", ["x"], ["b"]), mk("Sigmoid", ["x"], ["d"]),
             mk("Concat", ["a", "b"], ["c1"], axis=1, name="cat1"),
             mk("Concat", ["b", "d"], ["c2"], axis=1, name="cat2"),
             mk("Slice", ["a", "s0", "s1", "ax"], ["h"], name="half"),
             mk("Abs", ["c1"], ["y1"]), mk("Exp", ["c2"], ["y2"]), mk("Tanh", ["h"], ["y3"])]
    inits = [helper.make_tensor("s0", TensorProto.INT64, [1], [1]), helper.make_tensor("s1", TensorProto.INT64, [1], [3]),
             helper.make_tensor("ax", TensorProto.INT64, [1], [1])]
    g = helper.make_graph(nodes, "elide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4, 5, 6])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y1", "y2", "y3")], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _writing_factory(calls: list[str]):
    """Reference kernels that accept out= (one or two destinations), the elide tactic for marked Concats,
    and the view tactic for Slices."""
    def factory(node: Node) -> Any:
        for tid in ("concat.elide", "view.slice"):
            t = get_tactic(tid)
            if t.supports(node, None):  # type: ignore[arg-type]
                return t.make(node, {}, CPU)
        compute = lookup(node.op_type, node.domain).compute

        def kernel(*xs: Any, out: Any = None) -> Any:
            y = compute(node, *xs)
            if out is None:
                return y
            outs = out if isinstance(out, tuple) else (out,)
            calls.append(f"{node.name}:{len(outs)}")
            for o in outs:
                assert o.shape == y.shape and o.data_ptr() != y.data_ptr()
                o.copy_(y)
            return outs[0]
        return Kernel(kernel, writes_out=2)
    return factory


def _graph(batch: int | str = "N"):
    g = load_onnx(_model(batch), Logger())
    MarkConcatElision().run(g, PassContext(Logger()))
    return g


@pytest.mark.parametrize("n", [1, 3])
def test_elided_concats_match_the_reference(n: int) -> None:
    g = _graph()
    assert [x.attrs.get("kiln_elide") for x in g.nodes if x.op_type == "Concat"] == [1, 1]
    calls: list[str] = []
    fn = GraphFunction(g, CPU, _writing_factory(calls))
    assert fn.elided == 2 and all(st.node.op_type != "Concat" for st in fn.steps)
    x = torch.randn(n, 4, 5, 6)
    got = fn([x])
    want = GraphFunction(g, CPU)([x])  # reference kernels, real Concats
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # b is written into both concats in one call; a and d into one each
    assert sorted(calls) == ["a:1", "b:2", "d:1"]


def test_no_elision_when_a_producer_cannot_write_out() -> None:
    g = _graph(2)
    calls: list[str] = []
    base = _writing_factory(calls)

    def factory(node: Node) -> Any:
        k = base(node)
        if node.op_type == "Sigmoid":
            return Kernel(k.fn)  # no writes_out: cat2 must stay a real Concat
        return k
    fn = GraphFunction(g, CPU, factory)
    assert fn.elided == 1
    x = torch.randn(2, 4, 5, 6)
    for a, b in zip(fn([x]), GraphFunction(g, CPU)([x])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_memory_plan_keeps_aliased_buffers_alive() -> None:
    """With a and b living inside c1/c2, the planner must keep c1 and c2 alive from the first producer on
    and must not overlap them with each other or with anything alive meanwhile."""
    g = _graph(2)
    sizes = {v.name: 4 * int(np.prod([d for d in v.type.shape])) for v in g.values()
             if not v.is_const and v.type.is_static}
    aliases = {"a": ["c1"], "b": ["c1", "c2"], "d": ["c2"], "h": ["a"]}
    bufs = {b.name: b for b in lifetimes(g, sizes, aliases)}
    assert not {"a", "b", "d", "h"} & set(bufs)
    order = [n.outputs[0].name for n in g.nodes]
    assert bufs["c1"].first == order.index("a") and bufs["c2"].first == order.index("b")
    assert bufs["c1"].last >= order.index("y3")  # h (a view of a, inside c1) is read last by Tanh
    plan_memory(list(bufs.values()))  # verifies: no overlaps


def _chain_model():
    """A chain where a value is read through a view (Reshape, which may alias) after its producer's
    buffer would otherwise be free: the arena must keep it alive; elsewhere buffers are reused."""
    mk = helper.make_node
    nodes = [mk("Relu", ["x"], ["a"], name="a"), mk("Reshape", ["a", "shp"], ["v"], name="v"),
             mk("Neg", ["x"], ["b"], name="b"), mk("Sigmoid", ["b"], ["c"], name="c"),
             mk("Tanh", ["c"], ["d"], name="d"), mk("Abs", ["d"], ["e"], name="e"),
             mk("Reshape", ["e", "shp"], ["e2"], name="e2"), mk("Add", ["v", "e2"], ["y"], name="y")]
    inits = [helper.make_tensor("shp", TensorProto.INT64, [2], [-1, 30])]
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 30])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("n", [1, 2])
def test_arena_places_outputs_and_respects_views(n: int) -> None:
    g = load_onnx(_chain_model(), Logger())
    calls: list[str] = []
    base = _writing_factory(calls)

    def factory(node: Node) -> Any:
        k = base(node)
        if node.op_type == "Reshape":  # the reference Reshape returns a view of its input
            compute = lookup(node.op_type, node.domain).compute
            return Kernel(lambda *xs: compute(node, *xs))
        return k
    fn = GraphFunction(g, CPU, factory)
    assert fn.arena is not None
    x = torch.randn(n, 4, 30)  # rank 3: arena views are contiguous, so Reshape returns a view
    got = fn([x])[0]
    want = GraphFunction(g, CPU)([x])[0]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # arena views are channels-last: other SIMD paths
    assert sorted(calls) == ["a:1", "b:1", "c:1", "d:1", "e:1"]  # every producer wrote into the arena
    one = n * 4 * 30 * 4
    # a lives until y (through v); b..e need two buffers at a time (reader and writer): 3 buffers, not 5
    assert fn.arena.arena_bytes == 3 * max(256, -(-one // 256) * 256)


@pytest.mark.parametrize("name", ["light_inception_v1", "light_inception_v2", "light_densenet121",
                                  "light_squeezenet", "light_shufflenet"])
def test_concat_heavy_models_with_destination_passing(name: str) -> None:
    """Real topologies (sibling-conv splits feeding concats, concat chains, channel shuffles) with every
    kernel taking out=: elided Concats and arena placement must not change the results (vs onnxruntime)."""
    import os
    from kiln.passes.base import PassManager
    from kiln.passes.pipeline import default_pipeline
    from kiln.testing import run_oracle
    from tests.passes.models import LIGHT_DIR, randomize_light, rel_error
    m = randomize_light(os.path.join(LIGHT_DIR, f"{name}.onnx"))
    g = load_onnx(m, Logger())
    PassManager(default_pipeline()).run(g, PassContext(Logger()))
    fn = GraphFunction(g, CPU, _writing_factory([]))
    assert fn.arena is not None
    x = np.random.default_rng(1).standard_normal(g.inputs[0].type.shape).astype(np.float32)
    got = fn([torch.from_numpy(x)])
    for a, b in zip(got, run_oracle(m, {g.inputs[0].name: x})):
        assert rel_error(a.numpy(), b) <= 1e-4


def test_dense_only_destinations_are_not_given_concat_slices() -> None:
    """A kernel whose out= must be dense (strided_out False) gets arena slots but no Concat slice: its
    Concat stays a real step."""
    g = _graph(2)
    base = _writing_factory([])

    def factory(node: Node) -> Any:
        k = base(node)
        if node.op_type == "Sigmoid":
            k.strided_out = False
        return k
    fn = GraphFunction(g, CPU, factory)
    assert fn.elided == 1  # cat2 (reads d = Sigmoid) stays
    x = torch.randn(2, 4, 5, 6)
    for a, b in zip(fn([x]), GraphFunction(g, CPU)([x])):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
