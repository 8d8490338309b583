"""The plugin API (kiln.plugins, docs/PLUGINS.md): registering plugins the four ways, the importer's fallback,
plans that record the plugins they need, and plugin tactics in the autotuner.

The SwishBeta plugin is examples/plugins/swish_beta.py, the file docs/PLUGINS.md shows verbatim; its outputs
are checked against y = x * sigmoid(beta * x) computed in float64 numpy on fresh random inputs.
"""
from __future__ import annotations

import io
import json
import os
import re
import sys
import textwrap
from importlib.metadata import EntryPoint

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import kiln.plugins as kp
from kiln.tune.autotuner import CPU_TORCH_MARGIN
from kiln.backends.tactic import TacticContext, candidate_tactics, get_tactic
from kiln.builder import Builder, BuilderConfig
from kiln.errors import KilnError, PlanFormatError, UnsupportedOpError
from kiln.ir.graph import Graph, Node, Value
from kiln.ir.types import TensorType
from kiln.logger import Logger, Severity
from kiln.ops.attrs import Attr
from kiln.ops.registry import OpDef, lookup
from kiln.plan.format import Plan, load_plan, plan_from_bytes, plan_to_bytes, save_plan
from kiln.plugins import PluginError
from kiln.runtime.engine import Engine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "plugins", "swish_beta.py")
DOC = os.path.join(ROOT, "docs", "PLUGINS.md")
DOMAIN, OP, FAST = "example.ops", "SwishBeta", "example.swish_beta_silu"


@pytest.fixture(scope="module", autouse=True)
def swish():
    """The doc's plugin, registered by kiln.plugins.load for this module's tests, removed afterwards."""
    with kp.isolated():
        yield kp.load(EXAMPLE)


def _rng() -> np.random.Generator:
    return np.random.default_rng()  # fresh inputs on every run


def _oracle(x: np.ndarray, scale: float, beta: float) -> np.ndarray:
    t = x.astype(np.float64) * scale
    return t / (1.0 + np.exp(-beta * t))


def _model(beta: float | str | None = 1.7, scale: float = 0.5, op: str = OP, domain: str = DOMAIN, **attrs):
    """x -> Mul(scale) -> <op>(beta) -> Identity -> y: a plugin layer between built-in ones."""
    if beta is not None:
        attrs["beta"] = beta
    nodes = [helper.make_node("Mul", ["x", "c"], ["t"], name="mul"),
             helper.make_node(op, ["t"], ["u"], domain=domain, name="sw", **attrs),
             helper.make_node("Identity", ["u"], ["y"], name="id")]
    graph = helper.make_graph(nodes, "plugged", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 5, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.full([1], scale, np.float32), "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)])
    model.ir_version = min(model.ir_version, 10)
    return model


def _build(model, level: int = 0, **kw) -> Plan:
    cfg = BuilderConfig(device="cpu", optimization_level=level, **kw)
    return Builder(Logger(Severity.ERROR, io.StringIO())).build(model, cfg)


def _run(plan: Plan, x: np.ndarray) -> np.ndarray:
    return np.asarray(Engine(plan).create_execution_context().execute({"x": x})["y"])


def _step(plan: Plan, name: str) -> dict:
    return next(s for s in plan.graph["steps"] if s["name"] == name)


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg and msg, msg
    return msg


# ---- the doc's example ---------------------------------------------------------------------------------

def test_doc_shows_the_example_verbatim():
    """docs/PLUGINS.md's complete plugin is the file these tests load, and it is under 50 lines."""
    doc = open(DOC).read()
    m = re.search(r"<!-- examples/plugins/swish_beta\.py -->\s*```python\n(.*?)```", doc, re.S)
    assert m, "docs/PLUGINS.md lost its example block"
    code = open(EXAMPLE).read()
    assert m.group(1) == code
    assert len(code.splitlines()) < 50


def test_loaded_plugin_is_registered(swish):
    info = kp.get_plugin(OP, DOMAIN)
    assert info is not None and info.version == 1 and type(info.opdef) is swish.SwishBeta
    assert [t.id for t in info.tactics] == [FAST] and get_tactic(FAST) is info.tactics[0]
    assert lookup(OP, DOMAIN) is info.opdef
    assert kp.load(EXAMPLE) is swish  # the same file again: the module loaded the first time, nothing re-run


# ---- the importer's fallback, plans, outputs against the oracle ------------------------------------------

@pytest.mark.parametrize("level", [0, 3])
def test_model_builds_runs_and_round_trips(tmp_path, level):
    beta, scale = float(_rng().uniform(0.3, 3.0)), float(_rng().uniform(0.5, 2.0))
    plan = _build(_model(beta, scale), level)
    assert plan.graph["plugins"] == [{"domain": DOMAIN, "op": OP, "version": 1}]
    step = _step(plan, "sw")
    assert (step["op"], step["domain"], step["attrs"]) == (OP, DOMAIN, {"beta": pytest.approx(beta)})
    x = _rng().standard_normal([2, 3, 5, 7]).astype(np.float32)
    got = _run(plan, x)
    np.testing.assert_allclose(got, _oracle(x, scale, beta), rtol=1e-5, atol=1e-6)
    path = tmp_path / "plugged.kiln"
    save_plan(plan, path)
    again = Engine.load(path)
    assert again.plan.graph["plugins"] == plan.graph["plugins"]
    x2 = _rng().standard_normal([2, 3, 5, 7]).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(again.create_execution_context().execute({"x": x2})["y"]), _run(plan, x2))
    np.testing.assert_allclose(_run(plan, x2), _oracle(x2, scale, beta), rtol=1e-5, atol=1e-6)


def test_plan_without_plugins_has_no_record():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "plain", [x],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    assert "plugins" not in _build(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])).graph


def test_unclaimed_op_names_op_and_domain():
    with pytest.raises(UnsupportedOpError) as e:
        _build(_model(op="Frobnicate"))
    msg = _one_line(e.value)
    assert "Frobnicate (domain example.ops)" in msg and "no built-in op or registered plugin" in msg


def test_attributes_checked_against_declarations():
    with pytest.raises(UnsupportedOpError, match=r"'beta' must be >= 0\.0, got -1\.0"):
        _build(_model(beta=-1.0))
    with pytest.raises(UnsupportedOpError, match="'gamma' is not an attribute of SwishBeta"):
        _build(_model(gamma=2.0))
    with pytest.raises(UnsupportedOpError, match="'beta' must be a number"):
        _build(_model(beta="steep"))
    plan = _build(_model(beta=None))  # the declared default, 1.0
    x = _rng().standard_normal([2, 3, 5, 7]).astype(np.float32)
    np.testing.assert_allclose(_run(plan, x), _oracle(x, 0.5, 1.0), rtol=1e-5, atol=1e-6)


# ---- loading plans: the plugins they need ---------------------------------------------------------------

@pytest.fixture(scope="module")
def plan_bytes() -> bytes:
    return plan_to_bytes(_build(_model(1.25)))


def _mutated(data: bytes, fn) -> Plan:
    plan = plan_from_bytes(data)
    fn(plan)
    return plan_from_bytes(plan_to_bytes(plan))


def test_unregistered_plugin_refused_in_one_line(plan_bytes, tmp_path):
    path = tmp_path / "p.kiln"
    path.write_bytes(plan_bytes)
    with kp.isolated():
        assert kp.unregister_plugin(OP, DOMAIN) is not None
        assert get_tactic(FAST) is None  # its tactic went with it
        with pytest.raises(PlanFormatError) as e:
            Engine.load(path)
    msg = _one_line(e.value)
    assert msg.startswith(f"{path}: plan needs plugin SwishBeta (domain example.ops) version 1, which is not registered")
    assert "'kiln.plugins' entry point" in msg and "kiln.plugins.load(" in msg
    Engine.load(path)  # registered again on leaving isolated()


def test_other_version_refused_naming_both(plan_bytes):
    with kp.isolated():
        kp.unregister_plugin(OP, DOMAIN)

        @kp.plugin
        class SwishBeta2(OpDef):
            op_type, domain, version = OP, DOMAIN, 2
            attributes = {"beta": Attr("float", 1.0)}

            def compute(self, node, x):
                return x * torch.sigmoid(node.attrs.get("beta", 1.0) * x)

        with pytest.raises(PlanFormatError) as e:
            Engine(plan_from_bytes(plan_bytes))
    assert _one_line(e.value) == ("plan was built with plugin SwishBeta (domain example.ops) version 1, but version 2 "
                                  "is registered; register version 1 or rebuild the plan")
    # the same from the plan's side: a record naming version 7
    plan = _mutated(plan_bytes, lambda p: p.graph["plugins"][0].update(version=7))
    with pytest.raises(PlanFormatError, match="built with plugin SwishBeta .* version 7, but version 1 is registered"):
        Engine(plan)


@pytest.mark.parametrize("edit, message", [
    (lambda g: g.update(plugins="SwishBeta"), r"plan graph\.plugins: expected a list, got str"),
    (lambda g: g["plugins"][0].pop("version"), r"plan graph\.plugins\[0\]: expected \{domain, op, version\}"),
    (lambda g: g["plugins"][0].update(extra=1), r"plan graph\.plugins\[0\]: expected \{domain, op, version\}"),
    (lambda g: g["plugins"][0].update(version="1"), r"plugins\[0\]\.version: expected an int in \[1, 2147483647\], "
                                                    r"got '1'"),
    (lambda g: g["plugins"][0].update(version=True), r"plugins\[0\]\.version: expected an int"),
    (lambda g: g["plugins"][0].update(version=0), r"plugins\[0\]\.version: expected an int"),
    (lambda g: g["plugins"][0].update(domain="ai.onnx"), r"plugins\[0\]\.domain: expected a custom domain name"),
    (lambda g: g["plugins"][0].update(op="Swish\nBeta"), r"plugins\[0\]\.op: expected an op name"),
    (lambda g: g["plugins"].append(dict(g["plugins"][0])), r"plugins\[1\]: lists plugin SwishBeta .* twice"),
    (lambda g: g.update(plugins=[{"domain": "x", "op": "Y", "version": 1}] * 5000), r"5000 entries, above the limit"),
    (lambda g: g.pop("plugins"), r"layer 'sw' uses op SwishBeta \(domain example.ops\), which is neither a built-in "
                                 r"op nor a plugin the plan lists"),
    (lambda g: g["plugins"].append({"domain": "other", "op": "Unused", "version": 3}),
     r"plan lists plugin Unused \(domain other\) version 3, which no layer uses"),
])
def test_malformed_plugins_section_refused(plan_bytes, edit, message):
    plan = plan_from_bytes(plan_bytes)
    edit(plan.graph)
    with pytest.raises(PlanFormatError) as e:
        Engine(plan_from_bytes(plan_to_bytes(plan)))  # parsing or loading: either refuses in one line
    assert re.search(message, _one_line(e.value)), str(e.value)


def test_plugins_only_at_top_level(plan_bytes):
    plan = plan_from_bytes(plan_bytes)
    sub = {"name": "b", "inputs": [], "outputs": [], "values": {}, "steps": [], "plugins": []}
    _step(plan, "mul")["attrs"] = {"body": {"__graph__": sub}}
    with pytest.raises(PlanFormatError, match="only the top-level graph lists plugins"):
        plan_from_bytes(plan_to_bytes(plan))


# ---- registering: decorator, register_plugin, entry points, load(path) ----------------------------------

def _reference(cls_name: str, op: str, version: int = 1, domain: str = "test.ops", **body):
    def compute(self, node, x):
        return x * 3.0
    return type(cls_name, (OpDef,), {"op_type": op, "domain": domain, "version": version, "compute": compute, **body})


def test_decorator_returns_class_and_registers():
    with kp.isolated():
        @kp.plugin
        class Triple(OpDef):
            op_type, domain, version = "Triple", "test.ops", 1

            def compute(self, node, x):
                return x * 3.0

        assert isinstance(Triple, type) and issubclass(Triple, OpDef)
        assert type(kp.find_plugin("Triple", "test.ops")) is Triple
        x = _rng().standard_normal([4]).astype(np.float32)
        plan = _build(_model(op="Triple", domain="test.ops", beta=None))
        np.testing.assert_allclose(_run(plan, np.resize(x, [2, 3, 5, 7])), np.resize(x, [2, 3, 5, 7]) * 0.5 * 3.0,
                                   rtol=1e-6)
    assert kp.find_plugin("Triple", "test.ops") is None  # gone with isolated()


def test_register_plugin_instance_and_duplicates():
    with kp.isolated():
        A = _reference("A", "Dup")
        a = A()
        assert kp.register_plugin(a) is a
        assert kp.register_plugin(A()) is a  # the same class again: a no-op keeping the first instance
        assert kp.register_plugin(A) is a
        with pytest.raises(PluginError) as e:
            kp.register_plugin(_reference("B", "Dup")())
        assert _one_line(e.value) == (f"plugin Dup (domain test.ops) version 1 is already registered by {__name__}.A; "
                                      f"cannot register {__name__}.B under the same name and version")
        with pytest.raises(PluginError, match=r"Dup \(domain test.ops\) version 2: version 1 is already registered"):
            kp.register_plugin(_reference("C", "Dup", version=2)())
        assert kp.find_plugin("Dup", "test.ops") is a


@pytest.mark.parametrize("cls, message", [
    (_reference("E1", "Relu", domain=""), "domain must name a custom domain"),
    (_reference("E2", "Relu", domain="ai.onnx"), "domain must name a custom domain"),
    (_reference("E3", "X", version="1"), "'version' must be an int"),
    (_reference("E4", "X", version=0), "'version' must be an int"),
    (_reference("E5", ("X", "Y")), "op_type must be one op name"),
    (type("E6", (OpDef,), {"op_type": "X", "domain": "test.ops", "version": 1}), "defines no compute"),
    (_reference("E7", "FusedConv", domain="kiln"), "FusedConv (domain kiln) is a built-in op of Kiln"),
    (_reference("E8", "X", attributes={"kiln_elide": Attr("int", 0)}), "cannot declare an attribute named"),
    (_reference("E9", "X", tactics=(object(),)), "'tactics' must hold Tactic subclasses or instances"),
])
def test_bad_plugin_refused(cls, message):
    before = kp.registered()
    with kp.isolated():
        with pytest.raises(PluginError) as e:
            kp.register_plugin(cls)
        assert message in _one_line(e.value)
        assert kp.registered() == before


def test_entry_points_lazy_once_and_broken_one_warns(tmp_path, monkeypatch):
    (tmp_path / "kiln_ep_module.py").write_text(textwrap.dedent("""
        from kiln.ops.registry import OpDef
        from kiln.plugins import plugin

        @plugin
        class Quad(OpDef):
            op_type, domain, version = "Quad", "ep.ops", 4
            def compute(self, node, x):
                return x * 4.0
    """))
    (tmp_path / "kiln_ep_callable.py").write_text(textwrap.dedent("""
        from kiln.ops.registry import OpDef
        from kiln.plugins import register_plugin
        CALLS = []

        class Half(OpDef):
            op_type, domain, version = "Half", "ep.ops", 1
            def compute(self, node, x):
                return x / 2.0

        def register():
            CALLS.append(1)
            register_plugin(Half())
    """))
    (tmp_path / "kiln_ep_broken.py").write_text(textwrap.dedent("""
        from kiln.ops.registry import OpDef
        from kiln.plugins import register_plugin

        class Partial(OpDef):
            op_type, domain, version = "Partial", "ep.ops", 1
            def compute(self, node, x):
                return x

        def register():
            register_plugin(Partial())
            raise RuntimeError("the GPU library is missing")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    for m in ("kiln_ep_module", "kiln_ep_callable", "kiln_ep_broken"):
        monkeypatch.delitem(sys.modules, m, raising=False)
    eps = [EntryPoint("quad", "kiln_ep_module", "kiln.plugins"), EntryPoint("half", "kiln_ep_callable:register", "kiln.plugins"),
           EntryPoint("broken", "kiln_ep_broken:register", "kiln.plugins"),
           EntryPoint("missing", "kiln_no_such_module_here", "kiln.plugins")]
    reads = []

    def entry_points(**kw):
        reads.append(kw)
        return [e for e in eps if e.group == kw.get("group")]
    import importlib.metadata
    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    with kp.isolated(reload_entry_points=True):
        assert reads == []  # lazily: nothing read before the first lookup
        with pytest.warns(RuntimeWarning) as w:
            plan = _build(_model(op="Quad", domain="ep.ops", beta=None))  # the importer's lookup loads them
        msgs = [str(x.message) for x in w]
        assert any(m.startswith("kiln: plugin entry point 'broken' (kiln_ep_broken:register) failed to load")
                   and "RuntimeError: the GPU library is missing" in m for m in msgs), msgs
        assert any("'missing' (kiln_no_such_module_here)" in m and "ModuleNotFoundError" in m for m in msgs), msgs
        assert reads == [{"group": "kiln.plugins"}]
        x = _rng().standard_normal([2, 3, 5, 7]).astype(np.float32)
        np.testing.assert_allclose(_run(plan, x), x.astype(np.float64) * 0.5 * 4.0, rtol=1e-6)
        assert kp.get_plugin("Quad", "ep.ops").version == 4
        assert type(kp.find_plugin("Half", "ep.ops")).__name__ == "Half"
        assert kp.find_plugin("Partial", "ep.ops") is None  # the broken entry point's partial work is undone
        kp.find_plugin("Half", "ep.ops")
        assert reads == [{"group": "kiln.plugins"}] and sys.modules["kiln_ep_callable"].CALLS == [1]  # once
    assert kp.find_plugin("Quad", "ep.ops") is None


def test_load_path_errors_leave_nothing_registered(tmp_path):
    with pytest.raises(PluginError) as e:
        kp.load(tmp_path / "absent.py")
    assert _one_line(e.value) == f"{tmp_path / 'absent.py'}: no such plugin file"
    bad = tmp_path / "bad_plugin.py"
    bad.write_text(textwrap.dedent("""
        from kiln.ops.registry import OpDef
        from kiln.plugins import plugin

        @plugin
        class Early(OpDef):
            op_type, domain, version = "Early", "bad.ops", 1
            def compute(self, node, x):
                return x

        1 / 0
    """))
    with kp.isolated():
        with pytest.raises(PluginError) as e:
            kp.load(bad)
        assert _one_line(e.value) == f"{bad}: the plugin file failed to load (ZeroDivisionError: division by zero)"
        assert kp.find_plugin("Early", "bad.ops") is None
    clash = tmp_path / "clash.py"
    clash.write_text(open(EXAMPLE).read())  # the example's classes again, as new class objects
    with pytest.raises(PluginError, match=r"clash.py: plugin SwishBeta \(domain example.ops\) version 1 is already "
                                          r"registered by kiln_plugin_swish_beta_\w+\.SwishBeta; cannot register"):
        kp.load(clash)


# ---- tactics --------------------------------------------------------------------------------------------

def test_autotuner_times_plugin_tactic(tmp_path):
    """At level 3 both candidates are timed (the timing cache records them) and the plan keeps the faster."""
    cache = tmp_path / "timing.json"
    plan = _build(_model(2.0), level=3, timing_cache=str(cache))
    entries = json.loads(cache.read_text())["entries"]
    times = next(e["times"] for e in entries.values() if e["layer"] == "SwishBeta sw")
    assert set(times) == {f"{FAST} {{}}", "ref {}"} and all(t is not None for t in times.values())
    fastest = min(times, key=times.get).split(" ")[0]
    factor, ms_ahead = CPU_TORCH_MARGIN  # on the CPU `ref` (torch ops) must win clearly over a native tactic
    t_ref, t_fast = times["ref {}"], times[f"{FAST} {{}}"]
    if fastest == "ref" and (t_ref * factor > t_fast and t_ref + ms_ahead > t_fast):
        fastest = FAST
    assert _step(plan, "sw")["tactic"] == fastest


def test_plugin_tactic_chosen_and_reloaded():
    """At level 0 the plugin's tactic wins on priority; its plan loads and runs it, matching the oracle; a node
    it declines (beta = 0) keeps the reference; no other layer is offered the plugin's tactic."""
    beta = float(_rng().uniform(0.5, 2.5))
    plan = _build(_model(beta))
    assert _step(plan, "sw")["tactic"] == FAST
    engine = Engine(plan_from_bytes(plan_to_bytes(plan)))
    x = _rng().standard_normal([2, 3, 5, 7]).astype(np.float32)
    np.testing.assert_allclose(np.asarray(engine.create_execution_context().execute({"x": x})["y"]),
                               _oracle(x, 0.5, beta), rtol=1e-5, atol=1e-6)
    zero = _build(_model(0.0))
    assert _step(zero, "sw")["tactic"] == "ref"
    np.testing.assert_allclose(_run(zero, x), _oracle(x, 0.5, 0.0), rtol=1e-6)
    ctx = TacticContext(torch.device("cpu"))
    t = Value("t", TensorType(None, (2, 3)))
    relu = Node("Relu", [t], [Value("r", TensorType(None, (2, 3)))], {}, name="r", opset=17)
    assert FAST not in [c.id for c in candidate_tactics(relu, ctx)]
    assert not get_tactic(FAST).supports(relu, ctx)
    # a crafted plan putting the plugin's tactic on the Mul layer is refused by the loader
    crafted = plan_from_bytes(plan_to_bytes(plan))
    _step(crafted, "mul")["tactic"] = FAST
    with pytest.raises(PlanFormatError, match=f"layer 'mul' \\(Mul\\): tactic '{FAST}' does not support this layer"):
        Engine(plan_from_bytes(plan_to_bytes(crafted)))


def test_cli_one_line_errors(tmp_path, cli):
    """`kiln build` of an unclaimed op and `kiln run` of a plan whose plugin this process lacks: one line each."""
    import onnx
    model = tmp_path / "m.onnx"
    onnx.save(_model(op="Frobnicate"), model)
    r = cli("build", str(model), "-o", str(tmp_path / "m.kiln"))
    assert r.returncode != 0 and not (tmp_path / "m.kiln").exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln: error: ") and "Frobnicate (domain example.ops)" in lines[0]
    plan = tmp_path / "p.kiln"
    save_plan(_build(_model(1.5)), plan)
    r = cli("run", str(plan))
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert lines[0] == (f"kiln: error: {plan}: plan needs plugin SwishBeta (domain example.ops) version 1, which is "
                        "not registered; register it before loading the plan (install the package providing it as a "
                        "'kiln.plugins' entry point, or call kiln.plugins.load('path/to/plugin.py'))")
    assert load_plan(plan).graph["plugins"] == [{"domain": DOMAIN, "op": OP, "version": 1}]  # inspecting needs no plugin


def test_graph_records_cover_subgraphs():
    """A plugin used only inside an If branch is recorded too (the writer walks subgraphs)."""
    from kiln.plugins.registry import graph_records
    inner = Graph("then")
    a = Value("a", TensorType(None, (2,)))
    inner.add_node(Node(OP, [a], [Value("b", TensorType(None, (2,)))], {}, name="in", domain=DOMAIN, opset=1))
    outer = Graph("main")
    outer.add_node(Node("If", [Value("c", TensorType(None, ()))], [Value("o", TensorType(None, (2,)))],
                        {"then_branch": inner, "else_branch": Graph("else")}, name="if", opset=17))
    assert graph_records(outer) == [{"domain": DOMAIN, "op": OP, "version": 1}]


def test_only_kiln_errors_escape():
    with pytest.raises(KilnError):
        kp.register_plugin(42)  # type: ignore[arg-type]
    with pytest.raises(KilnError):
        kp.plugin(int)  # type: ignore[arg-type]
