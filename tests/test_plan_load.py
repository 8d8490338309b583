"""Loading a plan is parsing untrusted input: hostile headers, graphs, weights and types are refused with one
line (a KilnError naming the field or value, never another exception); genuine plans load and run.

The sha256 trailer is unkeyed, so every hostile plan here is re-packed with a valid checksum
(`plan_to_bytes`, or `_pack` for byte-level edits).
"""
from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
from typing import Any, Callable

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.tactic import TacticContext, get_tactic
from kiln.builder import Builder, BuilderConfig, OptimizationProfile
from kiln.errors import InputError, KilnError, PlanFormatError
from kiln.logger import Logger, Severity
from kiln.plan.format import FORMAT_VERSION, MAGIC, Plan, load_plan, plan_from_bytes, plan_to_bytes
from kiln.plan.serialize import GraphReader
from kiln.runtime.engine import Engine
from kiln.testing import run_oracle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- helpers ----------------------------------------------------------------------------------------

def _conv_model(batch: Any = "N"):
    """x -> FusedConv(3x3) -> b (an intermediate) -> FusedConv(3x3, residual b) -> y (as tests/test_runtime)."""
    from tests.test_runtime import _model
    return _model(np.random.default_rng(0), batch)


_PROFILE = ("x", (1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8))


def _build(model, profiles=(), **kw) -> Plan:
    cfg = BuilderConfig(device="cpu", profiles=list(profiles), optimization_level=kw.pop("optimization_level", 0), **kw)
    return Builder(Logger(Severity.ERROR, io.StringIO())).build(model, cfg)


@pytest.fixture(scope="module")
def conv_bytes() -> bytes:
    return plan_to_bytes(_build(_conv_model(), [OptimizationProfile().set_shape(*_PROFILE)]))


def _mutate(data: bytes, fn: Callable[[Plan], Any]) -> bytes:
    plan = plan_from_bytes(data)  # a fresh copy of the header's JSON structures
    fn(plan)
    return plan_to_bytes(plan)


def _pack(header: bytes, weights: bytes = b"") -> bytes:
    body = (struct.pack("<8sIIQ", MAGIC, FORMAT_VERSION, 0, len(header)) + header + struct.pack("<Q", len(weights))
            + weights)
    return body + hashlib.sha256(body).digest()


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    (hlen,) = struct.unpack_from("<Q", data, 16)
    header = json.loads(data[24:24 + hlen])
    (wlen,) = struct.unpack_from("<Q", data, 24 + hlen)
    return header, data[32 + hlen:32 + hlen + wlen]


def _load(data: bytes) -> Engine:
    return Engine(plan_from_bytes(data))


def _refused(data: bytes, *fragments: str, at_parse: bool = False) -> str:
    """The plan is refused with a KilnError (PlanFormatError at parse time when at_parse) of one line."""
    with pytest.raises(KilnError) as e:
        if at_parse:
            plan_from_bytes(data)
        else:
            _load(data)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    if at_parse:
        assert isinstance(e.value, PlanFormatError)
    return msg


def _step(plan: Plan, name: str) -> dict[str, Any]:
    return next(s for s in plan.graph["steps"] if s["name"] == name)


def _feeds(plan: Plan, seed: int, fixed: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Fresh random inputs fitting the plan's input specs (symbols at the first profile's max, else 2)."""
    rng = np.random.default_rng(seed)
    prof = plan.profiles[0] if plan.profiles else {}
    feeds: dict[str, np.ndarray] = {}
    for s in plan.inputs:
        if fixed and s["name"] in fixed:
            feeds[s["name"]] = fixed[s["name"]]
            continue
        shape = [d if isinstance(d, int) else (prof[s["name"]]["max"][k] if s["name"] in prof else 2)
                 for k, d in enumerate(s["shape"])]
        dt = np.dtype(s["dtype"])
        if dt == np.bool_:
            feeds[s["name"]] = rng.random(shape) < 0.5
        elif dt.kind in "iu":
            feeds[s["name"]] = rng.integers(0, 4, size=shape).astype(dt)
        else:
            feeds[s["name"]] = rng.standard_normal(shape).astype(dt)
    return feeds


def _rel(got: Any, want: Any) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    if got.size == 0:
        return 0.0
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _genuine_matches_oracle(model, profiles=(), fixed: dict[str, Any] | None = None, **kw) -> Engine:
    plan = _build(model, profiles, **kw)
    engine = _load(plan_to_bytes(plan))
    feeds = _feeds(plan, seed=int.from_bytes(os.urandom(2), "little"), fixed=fixed)
    got = engine.create_execution_context().execute(feeds)
    want = run_oracle(model, feeds)
    assert len(got) == len(want)
    for (name, a), b in zip(got.items(), want):
        assert _rel(a, b) <= 1e-4, f"output {name}: rel err {_rel(a, b):.3g}"
    return engine


# ---- the header ---------------------------------------------------------------------------------------

def _set(path: str, value: Any) -> Callable[[Plan], None]:
    """plan.<field>... = value, for a path like 'inputs.0.shape.2' (ints index lists)."""
    def fn(plan: Plan) -> None:
        keys = path.split(".")
        obj: Any = getattr(plan, keys[0])
        for k in keys[1:-1]:
            obj = obj[int(k)] if isinstance(obj, list) else obj[k]
        last = keys[-1]
        if isinstance(obj, list):
            obj[int(last)] = value
        else:
            obj[last] = value
    return fn


HEADER_CASES = [
    ("target.device", "tpu", "target.device"),
    ("target.device", "cuda", "target.capability"),
    ("target.extra", "x", "target.extra"),
    ("target.isa", "avx2 " * 100, "target.isa"),
    ("target.name", 7, "target.name"),
    ("inputs.0.shape.2", -5, "inputs[0].shape[2]: expected an int >= 0 or a symbol name, got -5"),
    ("inputs.0.shape.2", True, "inputs[0].shape[2]"),
    ("inputs.0.shape.2", 1.5, "inputs[0].shape[2]"),
    ("inputs.0.shape", "x", "inputs[0].shape"),
    ("inputs.0.dtype", "os.system", "inputs[0].dtype"),
    ("inputs.0.kind", "pickle", "inputs[0].kind"),
    ("inputs.0.name", 5, "inputs[0].name"),
    ("inputs.0.name", "z", "inputs: the names do not match"),
    ("inputs.0.name", "x\ny", "inputs[0].name"),
    ("inputs.0.evil", 1, "inputs[0].evil"),
    ("outputs.0.name", "nope", "outputs: the names do not match"),
    ("outputs.0.dtype", "float16", "outputs[0]"),
    ("profiles.0.x", {"min": [1, 3, 8, 8], "opt": [2, 3, 8, 8]}, "profiles[0].x"),
    ("profiles.0.x.max", [0, 3, 8, 8], "min <= opt <= max"),
    ("profiles.0.x.max", [4, 3, 8], "profiles[0].x.max: rank 3"),
    ("profiles.0.x.max", [4, 3, 8, 9], "static"),
    ("profiles.0.x.min", [-1, 3, 8, 8], "profiles[0].x.min"),
    ("profiles.0.x.opt", "big", "profiles[0].x.opt"),
    ("profiles.0.nope", {"min": [1], "opt": [1], "max": [1]}, "profiles[0].nope: names no input"),
    ("memory.arena_bytes", -1, "memory.arena_bytes"),
    ("memory.arena_bytes", 0, "past the arena"),
    ("memory.offsets.b", "0", "memory.offsets.b"),
    ("memory.sizes", {}, "memory."),
    ("memory.what", 1, "memory.what"),
    ("build.fp16", "yes", "build.fp16"),
    ("build.optimization_level", "3", "build.optimization_level"),
    ("build.tuning", {"a": {"b": []}}, "build.tuning"),
]


@pytest.mark.parametrize("path, value, fragment", HEADER_CASES)
def test_hostile_header_fields_refused_naming_the_field(conv_bytes, path, value, fragment):
    data = _mutate(conv_bytes, _set(path, value))
    _refused(data, "plan header", fragment, at_parse=True)
    with pytest.raises(PlanFormatError, match="plan header"):  # also when the Plan object is handed over
        plan = plan_from_bytes(conv_bytes)
        _set(path, value)(plan)
        Engine(plan)


@pytest.mark.parametrize("edit, fragment", [
    (lambda h: h.update(evil=1), "evil: unknown header field"),
    (lambda h: h.pop("graph"), "graph: missing"),
    (lambda h: h.update(kiln_version=5), "kiln_version"),
    (lambda h: h.update(target=[]), "target"),
    (lambda h: h.update(inputs={}), "inputs"),
    (lambda h: h.update(profiles=[[]]), "profiles[0]"),
    (lambda h: h.update(memory=[]), "memory"),
    (lambda h: h.update(build=None), "build"),
])
def test_hostile_top_level_refused(conv_bytes, edit, fragment):
    header, weights = _split(conv_bytes)
    edit(header)
    _refused(_pack(json.dumps(header).encode(), weights), "plan header", fragment, at_parse=True)


@pytest.mark.parametrize("raw, fragment", [
    (b"[" * 100_000 + b"]" * 100_000, "nested deeper"),
    (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nested deeper"),
    (b"[" * 100_000, "nested deeper"),
    (b"\xff\xfe not utf-8", "not valid JSON"),
    (b"{not json", "not valid JSON"),
    (b"[]", "expected a JSON object"),
    (b'{"target": 1e999}', "plan header"),
    (b'"' + b"[" * 10_000 + b'"', "expected a JSON object"),  # brackets inside a string are not nesting
])
def test_raw_header_refused(raw, fragment):
    _refused(_pack(raw), fragment, at_parse=True)


def test_header_length_and_plan_size_bounds(conv_bytes, monkeypatch):
    bad = bytearray(conv_bytes)
    struct.pack_into("<Q", bad, 16, 2**63)
    _refused(bytes(bad), "truncated", at_parse=True)
    monkeypatch.setenv("KILN_MAX_PLAN_BYTES", "1K")
    _refused(conv_bytes, "KILN_MAX_PLAN_BYTES", at_parse=True)


def test_not_bytes_refused():
    for x in (None, "KILNPLAN", 12):
        with pytest.raises(PlanFormatError, match="expected the plan's bytes"):
            plan_from_bytes(x)  # type: ignore[arg-type]


def test_load_plan_of_a_directory_or_unreadable(tmp_path):
    with pytest.raises(PlanFormatError, match="not found"):
        load_plan(tmp_path)
    with pytest.raises(PlanFormatError):
        load_plan(None)  # type: ignore[arg-type]


# ---- the graph ----------------------------------------------------------------------------------------

def _graph_edit(fn: Callable[[dict[str, Any]], Any]) -> Callable[[Plan], None]:
    return lambda plan: fn(plan.graph)


def _first_attr(g: dict[str, Any]) -> dict[str, Any]:
    return g["steps"][0]["attrs"]


GRAPH_CASES = [
    (lambda g: g["steps"][0].update(opset=99), "steps[0] ('a').opset"),
    (lambda g: g["steps"][0].update(opset="17"), "opset"),
    (lambda g: g["steps"][0].update(domain=5), "domain"),
    (lambda g: g["steps"][0].update(tactic=["x"]), "tactic"),
    (lambda g: g["steps"][0].update(config={"a": {"b": 1}}), "config"),
    (lambda g: g["steps"][0].update(name=7), "steps[0].name"),
    (lambda g: g["steps"][0].update(op=None), ".op"),
    (lambda g: g["steps"][0].update(evil=1), ".evil: unknown field"),
    (lambda g: g["steps"][0].pop("outputs"), ".outputs: missing"),
    (lambda g: g["steps"][0].update(inputs=["x", "nowhere"]), "inputs[1]: value 'nowhere' is not in values"),
    (lambda g: g["steps"][0].update(inputs=["x", 3]), "inputs[1]"),
    (lambda g: g["steps"][0].update(inputs="x"), ".inputs"),
    (lambda g: g["steps"][0].update(inputs=["b", "w1"]), "is used before any step defines it"),
    (lambda g: g["steps"].reverse(), "is used before any step defines it"),
    (lambda g: g["steps"][0].update(outputs=["x"]), "already defined"),
    (lambda g: g["steps"][1].update(outputs=["b"]), "already defined"),
    (lambda g: g["steps"][0].update(outputs=["nope"]), "is not in values"),
    (lambda g: g.update(outputs=["nope"]), "outputs"),
    (lambda g: g.update(inputs=["x", "x"]), "inputs"),
    (lambda g: g.update(captures=["x"]), "captures"),
    (lambda g: g.update(opsets={"": "21"}), "opsets"),
    (lambda g: g.update(values=[]), "values"),
    (lambda g: g.update(steps={}), "steps"),
    (lambda g: g.update(name=None), "graph.name"),
    (lambda g: g["values"]["b"].update(kind="pickle"), "values.b.kind"),
    (lambda g: g["values"]["b"]["type"].update(dtype="os.system"), "values.b.type.dtype"),
    (lambda g: g["values"]["b"]["type"].update(shape=[-1]), "values.b.type.shape[0]"),
    (lambda g: g["values"]["b"].update(type="float32"), "values.b.type"),
    (lambda g: g["values"]["w1"].update(const="w999"), "missing weight 'w999'"),
    (lambda g: g["values"]["w1"].update(const=["w0"]), "missing weight"),
    (lambda g: g["values"]["x"].update(const="w0"), "a graph input cannot be a constant"),
    (lambda g: g["values"].update({"b\x00": {"type": {"dtype": None, "shape": None}}}), "values"),
    (lambda g: _first_attr(g).update(strides={"__pickle__": "x"}), "unknown attribute encoding"),
    (lambda g: _first_attr(g).update(strides={"__tensor__": "w1", "__graph__": {}}), "unknown attribute encoding"),
    (lambda g: _first_attr(g).update(strides={"__tensor__": "nope"}), "missing weight 'nope'"),
    (lambda g: _first_attr(g).update(strides={"__typeproto__": "!!not base64!!"}), "cannot decode the TypeProto"),
    (lambda g: _first_attr(g).update(strides={"__typeproto__": base64.b64encode(b"\xff\xff\xff\xff").decode()}),
     "cannot decode the TypeProto"),
    (lambda g: _first_attr(g).update(strides={"__typeproto__": 5}), "TypeProto"),
    (lambda g: _first_attr(g).update(strides={"__dict__": []}), "strides"),
    (lambda g: _first_attr(g).update(strides={"__graph__": {"name": "g"}}), "__graph__.inputs: missing"),
    (lambda g: _first_attr(g).update(strides={"__graph__": {"name": "g", "inputs": [], "outputs": [], "values": {},
                                                            "steps": [], "captures": ["x"]}}), "captures"),
    (lambda g: _first_attr(g).update(strides="s" * 70_000), "strides"),
    (lambda g: _first_attr(g).update(strides=json.loads("[" * 40 + "1" + "]" * 40)),
     "nested too deeply"),
]


@pytest.mark.parametrize("edit, fragment", GRAPH_CASES)
def test_hostile_graph_refused_naming_the_field(conv_bytes, edit, fragment):
    data = _mutate(conv_bytes, _graph_edit(edit))
    msg = _refused(data, fragment, at_parse=True)
    assert "plan " in msg


def _nested_subgraphs(levels: int) -> dict[str, Any]:
    g: dict[str, Any] = {"name": "leaf", "inputs": [], "outputs": [], "values": {}, "steps": []}
    for k in range(levels):
        g = {"name": f"g{k}", "inputs": [], "outputs": [], "values": {"o": {"type": {"dtype": None, "shape": None}}},
             "steps": [{"name": f"if{k}", "op": "If", "inputs": [], "outputs": ["o"],
                        "attrs": {"then_branch": {"__graph__": g}}}]}
    return g


def test_deep_subgraph_nesting_refused(conv_bytes):
    def edit(plan: Plan) -> None:
        plan.graph["steps"][0]["attrs"]["strides"] = {"__graph__": _nested_subgraphs(70)}
    _refused(_mutate(conv_bytes, edit), "nested deeper than 64", at_parse=True)


def test_subgraph_capturing_a_later_value_refused():
    seeds = pytest.importorskip("tests.fuzz.seeds")
    data = plan_to_bytes(_build(seeds.if_else()))

    def edit(plan: Plan) -> None:  # the If now comes before the Relu whose output its branches capture
        steps = plan.graph["steps"]
        i = next(k for k, s in enumerate(steps) if s["op"] == "If")
        steps.insert(0, steps.pop(i))
        steps[0]["captures"] = []
    _refused(_mutate(data, edit), "captures unknown value 'h'", at_parse=True)


def test_counts_bounded(conv_bytes, monkeypatch):
    import kiln.plan.serialize as ser
    monkeypatch.setattr(ser, "MAX_ITEMS", 5)
    _refused(conv_bytes, "more than 5 values and steps", at_parse=True)


def test_unknown_op_refused(conv_bytes):
    def edit(plan: Plan) -> None:
        s = _step(plan, "a")
        s.update(op="os.system", domain="evil", tactic="ref", config={}, attrs={})
    _refused(_mutate(conv_bytes, edit), "os.system")


# ---- proven types -------------------------------------------------------------------------------------

def _native_conv_variants(data: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(tactic, config) of the CPU conv tactics that take both layers of the conv net here."""
    plan = plan_from_bytes(data)
    reader = GraphReader(plan.weights)
    g = reader.graph(plan.graph)
    ctx = TacticContext(torch.device("cpu"), extra={"opt_level": 3})
    out = []
    for tid in ("cpu.conv_dnnl", "cpu.conv_onednn", "cpu.conv_winograd", "cpu.conv_matmul"):
        t = get_tactic(tid)
        if t is None or not all(t.supports(n, ctx) for n in g.nodes):
            continue
        cfgs = [t.configs(n, ctx) for n in g.nodes]
        common = [c for c in cfgs[0] if all(c in cs for cs in cfgs[1:])]
        if common:
            out.append((tid, common[0]))
    return out


def _with_tactic(tid: str, cfg: dict[str, Any]) -> Callable[[Plan], None]:
    def fn(plan: Plan) -> None:
        for s in plan.graph["steps"]:
            s["tactic"], s["config"] = tid, dict(cfg)
    return fn


@pytest.mark.parametrize("dtype", ["bfloat16", "bool", "float16", "int64"])
def test_edited_intermediate_dtype_refused_on_native_conv_tactics(conv_bytes, dtype):
    variants = _native_conv_variants(conv_bytes)
    assert variants, "no native CPU conv tactic takes the conv net"
    model = _conv_model()
    for tid, cfg in variants:
        genuine = _mutate(conv_bytes, _with_tactic(tid, cfg))
        feeds = {"x": np.random.default_rng().standard_normal((3, 3, 8, 8)).astype(np.float32)}
        got = _load(genuine).create_execution_context().execute(feeds)["y"]
        assert _rel(got, run_oracle(model, feeds)[0]) <= 1e-4, tid

        def edit(plan: Plan) -> None:
            plan.graph["values"]["b"]["type"]["dtype"] = dtype
        _refused(_mutate(genuine, edit), "value 'b' (output of layer 'a'", f"the plan says {dtype}", "float32")


@pytest.mark.parametrize("edit, fragment", [
    (lambda v: v["b"]["type"].update(shape=["N", 4, 8, 9]), "dim 3 is 9"),
    (lambda v: v["b"]["type"].update(shape=["N", 5, 8, 8]), "dim 1 is 5"),
    (lambda v: v["b"]["type"].update(shape=["N", 4, 8]), "rank 3"),
    (lambda v: v["y"]["type"].update(dtype="float64"), "differs from the graph's value 'y'"),
    (lambda v: v["x"]["type"].update(shape=["N", 3, 8, 9]), "differs from the graph's value 'x'"),
])
def test_edited_intermediate_shapes_refused(conv_bytes, edit, fragment):
    _refused(_mutate(conv_bytes, lambda plan: edit(plan.graph["values"])), fragment)


def test_edited_output_type_refused_with_its_spec(conv_bytes):
    def edit(plan: Plan) -> None:
        plan.graph["values"]["y"]["type"]["dtype"] = "float64"
        plan.outputs[0]["dtype"] = "float64"
    _refused(_mutate(conv_bytes, edit), "value 'y'", "float64", "float32")


def test_edited_input_spec_refused_at_the_layer(conv_bytes):
    """A consistent edit of the input (spec and graph value): inference no longer matches the header's
    intermediate types, or the tactic refuses the layer: a PlanFormatError either way."""
    def edit(plan: Plan) -> None:
        for d in (plan.inputs[0], plan.graph["values"]["x"]["type"]):
            d["dtype"] = "bfloat16"
    _refused(_mutate(conv_bytes, edit), "plan")


def _if_conv_model():
    """If (then [1, 3, 8, 8], else [1, 3, 8, 4]; declared [1, 3, 8, 8] by value_info) -> Conv: the If output's
    last dim is the header's word only (the branches disagree on it), and a native conv kernel reads it."""
    rng = np.random.default_rng(0)
    f = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)  # noqa: E731
    then_g = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["t_out"])], "then", [],
                               [f("t_out", [1, 3, 8, 8])], [numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    i64 = lambda n, v: numpy_helper.from_array(np.array(v, np.int64), n)  # noqa: E731
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e_neg"]),
                                helper.make_node("Slice", ["e_neg", "s0", "s4", "s3"], ["e_out"])], "else", [],
                               [f("e_out", [1, 3, 8, 4])], [i64("s0", [0]), i64("s4", [4]), i64("s3", [3])])
    nodes = [helper.make_node("If", ["c"], ["o"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Conv", ["o", "w"], ["y"], pads=[1, 1, 1, 1])]
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    g = helper.make_graph(nodes, "ifconv", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                            f("x", [1, 3, 8, 8])],
                          [f("y", [1, 4, 8, 8])], [w], value_info=[f("o", [1, 3, 8, 8])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_unconfirmed_type_read_by_a_native_kernel_is_checked_at_run_time():
    model = _if_conv_model()
    plan = _build(model)
    if _step(plan, "y")["tactic"] == "ref":
        pytest.skip("no native conv tactic on this machine")
    engine = _genuine_matches_oracle(model, fixed={"c": np.array(True)})
    assert engine.unproven == set()  # the builder records only what inference proves: o is [1, 3, 8, ?]

    def edit(p: Plan) -> None:  # the header claims o is [1, 3, 8, 8]; the then-branch now makes [2, 3, 8, 8]
        sg = _step(p, "o")["attrs"]["then_branch"]["__graph__"]
        p.weights[sg["values"]["two"]["const"]] = torch.full((2, 1, 1, 1), 2.0)
        sg["values"]["t_out"]["type"] = {"dtype": None, "shape": None}
        p.graph["values"]["o"]["type"] = {"dtype": "float32", "shape": [1, 3, 8, 8]}
        assert _load(plan_to_bytes(p)).unproven == {"o"}
    ctx = _load(_mutate(plan_to_bytes(plan), edit)).create_execution_context()
    feeds = {"c": np.array(True), "x": np.ones((1, 3, 8, 8), np.float32)}
    with pytest.raises(KilnError, match=r"value 'o' is float32\[2, 3, 8, 8\] at run time, but the plan built"):
        ctx.execute(feeds)


def test_unconfirmed_output_of_a_kernel_writing_into_planned_memory_refused():
    from kiln.backends.kernel import Kernel
    from kiln.ir.graph import Node, Value
    from kiln.ir.types import TensorType
    from kiln.runtime.engine import _guard_unproven
    t = TensorType(None, (4,))
    node = Node("Relu", [Value("a", t)], [Value("b", t)], name="r")
    _guard_unproven(node, Kernel(lambda x: x), {"b"}, "plan")  # allocates its own output: fine
    with pytest.raises(PlanFormatError, match="layer 'r' .* its output 'b'"):
        _guard_unproven(node, Kernel(lambda x, out=None: x, writes_out=1), {"b"}, "plan")


# ---- allocation bounds --------------------------------------------------------------------------------

def test_huge_profile_refused_before_allocation(conv_bytes):
    def edit(plan: Plan) -> None:
        plan.profiles[0]["x"]["max"] = [10**12, 3, 8, 8]
    _refused(_mutate(conv_bytes, edit), "value 'x'", "768000000000000 bytes", "max shapes", "KILN_MAX_ACTIVATION_BYTES")


def test_huge_static_shape_refused_before_allocation():
    """A 1e12-element static input (spec, graph value and every inferred intermediate agree)."""
    a, b = 10**6, 10**6
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Neg", ["h"], ["y"])], "big",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["A", "B"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["A", "B"])])
    plan = _build(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))

    def edit(p: Plan) -> None:
        for d in (p.inputs[0], p.graph["values"]["x"]["type"]):
            d["shape"] = [a, b]
    _refused(_mutate(plan_to_bytes(plan), edit), "value 'x'", f"needs {4 * a * b} bytes")


def test_activation_limit_from_settings(conv_bytes, monkeypatch):
    monkeypatch.setenv("KILN_MAX_ACTIVATION_BYTES", "1K")
    _refused(conv_bytes, "KILN_MAX_ACTIVATION_BYTES", "memory.arena_bytes")
    _refused(_mutate(conv_bytes, lambda p: setattr(p, "memory", {})), "KILN_MAX_ACTIVATION_BYTES", "value 'x'",
             "3072 bytes at the profiles' max shapes")
    monkeypatch.setenv("KILN_MAX_ACTIVATION_BYTES", "64M")
    _load(conv_bytes)


def test_huge_constant_of_shape_refused_without_allocating():
    """A tampered ConstantOfShape of a constant [100000, 100000] shape: its type is inferred on meta tensors
    (kiln.ops.infer's budget for ops on real inputs), then the 40 GB value is refused."""
    import resource
    g = helper.make_graph([helper.make_node("Shape", ["x"], ["s"]),
                           helper.make_node("ConstantOfShape", ["s"], ["c"],
                                            value=numpy_helper.from_array(np.array([1.0], np.float32))),
                           helper.make_node("Add", ["x", "c"], ["y"])], "cos",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    plan = _build(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    if not any(s["op"] == "ConstantOfShape" for s in plan.graph["steps"]):
        pytest.skip("the optimizer removed the ConstantOfShape")

    def edit(p: Plan) -> None:
        cos = next(s for s in p.graph["steps"] if s["op"] == "ConstantOfShape")
        p.weights["huge"] = torch.tensor([100_000, 100_000])
        p.graph["values"]["hugeshape"] = {"type": {"dtype": "int64", "shape": [2]}, "kind": "tensor", "const": "huge"}
        cos["inputs"] = ["hugeshape"]
        p.graph["values"][cos["outputs"][0]]["type"]["shape"] = [None, None]  # the builder's [N, 4] would differ
        p.graph["steps"] = [s for s in p.graph["steps"] if s["op"] != "Shape"]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _refused(_mutate(plan_to_bytes(plan), edit), f"value '{cos_output(plan)}'", "needs 40000000000 bytes")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < (1 << 20)  # KiB: < 1 GiB more


def cos_output(plan: Plan) -> str:
    return next(s for s in plan.graph["steps"] if s["op"] == "ConstantOfShape")["outputs"][0]


def test_unbounded_symbols_sized_at_one_and_arena_checked_at_run_time(monkeypatch):
    """Without a profile a symbol has no max: values are sized at 1 for the load-time check (a lower
    bound), and the arena is checked against the limit once the actual input dims are known."""
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Neg", ["h"], ["y"])], "big",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])])

    def edit(plan: Plan) -> None:
        for d in (plan.inputs[0], plan.outputs[0], *(v["type"] for v in plan.graph["values"].values())):
            d["shape"] = ["N", 10**6, 10**6]
    pointwise = plan_to_bytes(_build(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])))
    _refused(_mutate(pointwise, edit), "value 'x'", "needs at least 4000000000000 bytes")
    data = plan_to_bytes(_build(_conv_model("N")))
    monkeypatch.setenv("KILN_MAX_ACTIVATION_BYTES", "64K")
    ctx = _load(data).create_execution_context()
    ctx.execute({"x": np.zeros((4, 3, 8, 8), np.float32)})
    with pytest.raises(KilnError, match="arena, above the limit of 65536"):
        ctx.execute({"x": np.zeros((100, 3, 8, 8), np.float32)})


def test_huge_arena_refused(conv_bytes):
    def edit(plan: Plan) -> None:
        plan.memory["arena_bytes"] = 10**15
    _refused(_mutate(conv_bytes, edit), "memory.arena_bytes", str(10**15))


def test_overlapping_memory_plan_refused():
    """Two buffers alive at once placed at the same offset (kiln.plan.memory.verify)."""
    rng = np.random.default_rng(0)
    ws = {f"w{i}": rng.standard_normal((4, 4, 3, 3)).astype(np.float32) for i in range(4)}
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "w1"], ["b"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["b", "w2"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c0", "a"], ["c"]),
             helper.make_node("Conv", ["c", "w3"], ["y"], pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                          [numpy_helper.from_array(w, k) for k, w in ws.items()])
    plan = _build(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert len(plan.memory["offsets"]) >= 2, plan.memory
    _load(plan_to_bytes(plan))

    def edit(p: Plan) -> None:
        for k in p.memory["offsets"]:
            p.memory["offsets"][k] = 0
    _refused(_mutate(plan_to_bytes(plan), edit), "memory", "overlaps")


# ---- weights ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("blob", [
    b"\x00" * 7,
    b"\xff" * 64,
    struct.pack("<Q", 2**63) + b"{}",
    struct.pack("<Q", 10) + b'{"a": 1}  ',
    struct.pack("<Q", 60) + b'{"w0":{"dtype":"F32","shape":[4,3,3,3],"data_offsets":[0,999999]}}',
    struct.pack("<Q", 64) + b'{"w0":{"dtype":"XX","shape":[1],"data_offsets":[0,4]}}          ' + b"\0" * 4,
])
def test_bad_safetensors_refused(conv_bytes, blob):
    header, _ = _split(conv_bytes)
    _refused(_pack(json.dumps(header).encode(), blob), "plan", at_parse=True)


class _PanicException(BaseException):
    """What safetensors' native parser raises when it panics (pyo3's PanicException derives from BaseException)."""


@pytest.mark.parametrize("exc", [_PanicException("called `Result::unwrap()` on an `Err` value"), MemoryError(),
                                 RecursionError("deep")])
def test_safetensors_panics_and_memory_errors_become_plan_format_errors(conv_bytes, monkeypatch, exc):
    import kiln.plan.format as fmt

    def boom(blob: bytes) -> Any:
        raise exc
    monkeypatch.setattr(fmt, "st_load", boom)
    _refused(conv_bytes, "plan weights", at_parse=True)


def test_interrupts_are_not_swallowed(conv_bytes, monkeypatch):
    import kiln.plan.format as fmt

    def interrupted(blob: bytes) -> Any:
        raise KeyboardInterrupt
    monkeypatch.setattr(fmt, "st_load", interrupted)
    with pytest.raises(KeyboardInterrupt):
        plan_from_bytes(conv_bytes)


def test_weight_of_unsupported_dtype_refused(conv_bytes):
    for dt in ("float8_e8m0fnu", "complex32", "float4_e2m1fn_x2", "uint1"):
        t = getattr(torch, dt, None)
        if t is None:
            continue
        try:
            from safetensors.torch import save as st_save
            st_save({"w": torch.zeros(4, dtype=torch.uint8).view(t) if t.itemsize == 1 else torch.zeros(2, dtype=t)})
        except Exception:
            continue

        def edit(plan: Plan, t: torch.dtype = t) -> None:
            plan.weights["w0"] = torch.zeros(plan.weights["w0"].numel() * 4, dtype=torch.uint8).view(t) \
                if t.itemsize == 1 else torch.zeros(8, dtype=t)
        _refused(_mutate(conv_bytes, edit), "plan weights", "'w0'", at_parse=True)
        return
    pytest.skip("no torch dtype outside Kiln's table round-trips through safetensors here")


def test_weight_shape_contradicting_the_layer_refused(conv_bytes):
    def edit(plan: Plan) -> None:
        plan.weights["w0"] = torch.zeros(4, 5, 3, 3)
    _refused(_mutate(conv_bytes, edit), "plan")


# ---- a structural fuzz: every field of a small plan replaced by junk ------------------------------------

def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


JUNK = [None, -1, 2**70, 1.5, float("nan"), "x", "", [], {}, True, [None], {"__tensor__": "w0"}, "a\nb"]


def test_field_junk_never_escapes_as_another_exception(conv_bytes):
    header, weights = _split(conv_bytes)
    rng = np.random.default_rng(1234)
    paths = [p for p in _paths(header) if p]
    picks = rng.choice(len(paths), size=min(240, len(paths)), replace=False)
    outcomes = {"ok": 0, "refused": 0}
    for i in picks:
        path = paths[int(i)]
        junk = JUNK[int(rng.integers(len(JUNK)))]
        h = copy.deepcopy(header)
        obj = h
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = junk
        data = _pack(json.dumps(h).encode(), weights)
        try:
            engine = _load(data)
            engine.create_execution_context().execute(
                {"x": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)})
            outcomes["ok"] += 1
        except KilnError as e:
            assert "\n" not in str(e), (path, junk, str(e))
            outcomes["refused"] += 1
        except BaseException as e:  # pragma: no cover - the failure being tested for
            raise AssertionError(f"{path} = {junk!r}: {type(e).__name__}: {e}") from e
    assert outcomes["refused"] > outcomes["ok"]


# ---- execute() inputs ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def conv_engine(conv_bytes) -> Engine:
    return _load(conv_bytes)


@pytest.mark.parametrize("inputs, fragment", [
    (np.zeros((2, 3, 8, 8), np.float32), "must be a dict"),
    (torch.zeros(2, 3, 8, 8), "must be a dict"),
    ("x", "must be a dict"),
    ([], "takes 1 inputs"),
    ([np.zeros((2, 3, 8, 8), np.float32)] * 2, "takes 1 inputs"),
    ({"x": None}, "input 'x' must be an array"),
    ({"x": "abc"}, "input 'x' must be an array"),
    ({"x": np.array(["a", "b"])}, "string"),
    ({"x": np.array([object(), 1], dtype=object)}, "object arrays"),
    ({"x": [[1.0, 2.0], [3.0]]}, "input 'x'"),
    ({"x": [[[[object()]]]]}, "input 'x'"),
    ({"x": np.zeros((2, 3, 8, 8), np.longdouble)}, "unsupported numpy dtype"),
    ({"x": np.zeros((2, 3, 8, 8), "datetime64[s]")}, "unsupported numpy dtype"),
    ({"x": np.zeros((2, 3, 8, 8), [("a", "f4"), ("b", "f4")])}, "unsupported numpy dtype"),
    ({"x": np.zeros((2, 3, 8, 8), ">f4")}, None),  # big-endian float32: converted, runs
    ({"x": np.zeros((2, 3, 8, 8), np.float64)}, "dtype float64, expected float32"),
    ({"x": torch.zeros(2, 3, 8, 8).to_sparse()}, "dense"),
    ({"x": object()}, "input 'x' must be an array"),
    ({1: np.zeros((2, 3, 8, 8), np.float32), "x": np.zeros((2, 3, 8, 8), np.float32)}, "unknown input 1"),
])
def test_execute_inputs_give_input_errors(conv_engine, inputs, fragment):
    ctx = conv_engine.create_execution_context()
    if fragment is None:
        ctx.execute(inputs)
        return
    with pytest.raises(InputError) as e:
        ctx.execute(inputs)
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_shared_symbol_must_agree_across_inputs():
    g = helper.make_graph([helper.make_node("Add", ["x", "z"], ["y"])], "add",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                           helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    engine = _load(plan_to_bytes(_build(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))))
    ctx = engine.create_execution_context()
    with pytest.raises(InputError, match="N=1"):
        ctx.execute({"x": np.ones((3, 4), np.float32), "z": np.ones((1, 4), np.float32)})
    y = ctx.execute([np.ones((3, 4), np.float32), np.ones((3, 4), np.float32)])["y"]
    assert y.shape == (3, 4) and float(y.sum()) == 24.0


# ---- genuine plans load and match onnxruntime -------------------------------------------------------------

def test_genuine_conv_net_dynamic_and_static():
    _genuine_matches_oracle(_conv_model(), [OptimizationProfile().set_shape(*_PROFILE)])
    _genuine_matches_oracle(_conv_model(2), optimization_level=3)


def test_genuine_plan_format_and_elision_models():
    from tests.test_elision import _model as elision_model
    from tests.test_plan_format import _model as mlp_model
    _genuine_matches_oracle(mlp_model()[0])
    _genuine_matches_oracle(elision_model(2))
    _genuine_matches_oracle(elision_model("N"), [OptimizationProfile().set_shape("x", (1, 4, 5, 6), (2, 4, 5, 6),
                                                                                 (3, 4, 5, 6))])


def test_genuine_control_flow_models():
    """If and Loop: subgraph values whose header types inference cannot confirm are accepted (kept)."""
    seeds = pytest.importorskip("tests.fuzz.seeds")
    engine = _genuine_matches_oracle(seeds.if_else(), fixed={"c": np.array(True)})
    assert engine.unproven <= {"y", "o"}
    _genuine_matches_oracle(seeds.loop(), fixed={"M": np.array(3, np.int64), "cond": np.array(True)})


@pytest.mark.parametrize("name", ["conv_net", "mlp", "pointwise", "pool_resize", "shape_ops"])
def test_genuine_seed_models(name):
    seeds = pytest.importorskip("tests.fuzz.seeds")
    _genuine_matches_oracle(seeds.SEEDS[name](), seeds.seed_profiles(name))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "inception_v1", "squeezenet", "densenet121"])
def test_genuine_light_models(name):
    from tests.passes.models import LIGHT_DIR, randomize_light
    engine = _genuine_matches_oracle(randomize_light(os.path.join(LIGHT_DIR, f"light_{name}.onnx")))
    assert not engine.unproven


@pytest.mark.slow
def test_genuine_zoo_models():
    zoo = pytest.importorskip("examples.zoo.yolov4_tiny")
    m = zoo.onnx_model(0, "N")
    engine = _genuine_matches_oracle(m, [OptimizationProfile().set_shape(m.graph.input[0].name, (1, 3, 416, 416),
                                                                          (1, 3, 416, 416), (2, 3, 416, 416))])
    assert not engine.unproven
    from examples.zoo import resnet50
    _genuine_matches_oracle(resnet50.onnx_model(0, 1))


# ---- layering -------------------------------------------------------------------------------------------

def test_runtime_imports_nothing_from_frontend_passes_or_builder(conv_bytes, tmp_path):
    path = tmp_path / "m.kiln"
    path.write_bytes(conv_bytes)
    code = ("import sys, numpy as np\n"
            "from kiln.runtime.engine import Engine\n"
            f"e = Engine.load({str(path)!r})\n"
            "e.create_execution_context().execute({'x': np.zeros((2, 3, 8, 8), np.float32)})\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('kiln.frontend', 'kiln.passes', 'kiln.builder')))\n"
            "print(bad)\n"
            "sys.exit(1 if bad else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
