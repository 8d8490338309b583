"""The Pointwise program parser (kiln/ops/pointwise_program.py) and the code generators built on it.

(a) Hostile programs (code in operand strings, unknown ops, forward references, bad constants and
    attributes, huge programs) are refused by the parser, the CPU tactic, the reference op and the Triton
    tactic, and nothing they carry ever runs (a canary file is never created).
(b) A real plan whose Pointwise step is edited to carry such a program does not load (or run).
(c) Random programs over the vocabulary agree with onnx's reference evaluator on the same ONNX graph.
"""
from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from kiln.backends.tactic import TacticContext, get_tactic
from kiln.errors import KilnError, UnsupportedOpError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Value
from kiln.ir.types import TensorType
from kiln.ops.pointwise_program import MAX_INSTRS, OPS, Instr, PointwiseProgram, Ref
from kiln.ops.registry import lookup

CPU = TacticContext(torch.device("cpu"))
SHAPE = (2, 3, 4)


def _node(program: Any, consts: Any = None, outputs: Any = None, n_in: int = 2,
          out_dtype: DType = DType.FLOAT32) -> Node:
    ins = [Value(f"x{k}", TensorType(DType.FLOAT32, SHAPE)) for k in range(n_in)]
    attrs: dict[str, Any] = {"program": program}
    if consts is not None:
        attrs["consts"] = consts
    if outputs is not None:
        attrs["outputs"] = outputs
    return Node("Pointwise", ins, [Value("y", TensorType(out_dtype, SHAPE))], attrs, name="pw", domain="kiln")


def _ins(op: Any, *args: Any, **attrs: Any) -> dict[str, Any]:
    return {"op": op, "args": list(args), "attrs": attrs}


# ---- (a) hostile programs ------------------------------------------------------------------------

def _payload(canary: str) -> str:
    return f"__import__('os').system('touch {canary}')"


def _hostile(canary: str) -> dict[str, tuple[Any, Any, Any]]:
    """name -> (program, consts, outputs); every one must be refused."""
    code = _payload(canary)
    relu = _ins("Relu", "i0")
    return {
        "operand-code": ([_ins("Relu", f"i0)\n{code}#")], None, None),
        "operand-code-clip-bound": ([_ins("Clip", "i0", f"c0)\n{code}#", "c1")], [0.0, 1.0], None),
        "operand-trailing-newline": ([_ins("Relu", "i0\n")], None, None),
        "operand-unicode-digit": ([_ins("Relu", "i\u0663")], None, None),
        "operand-too-long": ([_ins("Relu", "i0000000")], None, None),
        "operand-not-str": ([_ins("Relu", 0)], None, None),
        "operand-missing": ([_ins("Add", "i0", "")], None, None),
        "args-a-string": ([{"op": "Relu", "args": "i0", "attrs": {}}], None, None),
        "op-code": ([_ins(f"Relu(i0)\n{code}#", "i0")], None, None),
        "op-unknown": ([_ins("Loop", "i0")], None, None),
        "op-identity": ([_ins("Identity", "i0")], None, None),
        "op-not-str": ([_ins(7, "i0")], None, None),
        "instr-extra-key": ([{"op": "Relu", "args": ["i0"], "attrs": {}, "source": code}], None, None),
        "instr-not-dict": (["Relu(i0)"], None, None),
        "arity-unary": ([_ins("Relu", "i0", "i1")], None, None),
        "arity-binary": ([_ins("Add", "i0")], None, None),
        "arity-where": ([_ins("Where", "i0", "i1")], None, None),
        "arity-variadic-empty": ([_ins("Max")], None, None),
        "clip-bound-not-const": ([_ins("Clip", "i0", "i1", "c0")], [1.0], None),
        "temp-forward": ([_ins("Relu", "t1"), _ins("Relu", "i0")], None, None),
        "temp-self": ([_ins("Relu", "t0")], None, None),
        "input-out-of-range": ([_ins("Add", "i0", "i2")], None, None),
        "const-out-of-range": ([_ins("Add", "i0", "c1")], [1.0], None),
        "const-string": ([_ins("Add", "i0", "c0")], [f"1.0)\n{code}#"], None),
        "const-list": ([_ins("Add", "i0", "c0")], [[1.0]], None),
        "const-bool": ([_ins("Add", "i0", "c0")], [True], None),
        "const-dict": ([_ins("Add", "i0", "c0")], [{"__import__": "os"}], None),
        "const-none": ([_ins("Add", "i0", "c0")], [None], None),
        "consts-a-string": ([relu], "1.0", None),
        "attr-alpha-string": ([_ins("LeakyRelu", "i0", alpha=f"0.1)\n{code}#")], None, None),
        "attr-alpha-bool": ([_ins("LeakyRelu", "i0", alpha=True)], None, None),
        "attr-gelu-foo": ([_ins("Gelu", "i0", approximate="foo")], None, None),
        "attr-gelu-code": ([_ins("Gelu", "i0", approximate=f"tanh')\n{code}#")], None, None),
        "attr-cast-to": ([_ins("Cast", "i0", to=999)], None, None),
        "attr-unknown": ([_ins("Relu", "i0", evil=code)], None, None),
        "attrs-a-list": ([{"op": "Relu", "args": ["i0"], "attrs": [code]}], None, None),
        "output-code": ([relu], None, [f"t0)\n{code}#"]),
        "output-out-of-range": ([relu], None, ["t1"]),
        "outputs-a-string": ([relu], None, "t0"),
        "outputs-empty": ([relu], None, []),
        "program-empty": ([], None, None),
        "program-a-string": (f"Relu(i0)\n{code}", None, None),
        "program-huge": ([relu] * (MAX_INSTRS + 1), None, None),
        "variadic-huge": ([_ins("Sum", *(["i0"] * 5000))], None, None),
    }


CASES = sorted(_hostile("X"))


@pytest.fixture
def canary(tmp_path: Any) -> str:
    return str(tmp_path / "canary")


def test_canary_payload_would_run(tmp_path: Any) -> None:
    """The payload really creates the canary when executed, so its absence below means nothing ran."""
    path = str(tmp_path / "proof")
    exec(_payload(path))  # noqa: S102
    assert os.path.exists(path)


@pytest.mark.parametrize("case", CASES)
def test_hostile_program_refused_everywhere(case: str, canary: str) -> None:
    program, consts, outputs = _hostile(canary)[case]
    node = _node(program, consts, outputs)
    with pytest.raises(UnsupportedOpError) as err:
        PointwiseProgram.parse(node)
    msg = str(err.value)
    assert "\n" not in msg and "'pw'" in msg and len(msg) < 400
    with pytest.raises(UnsupportedOpError):
        lookup("Pointwise", "kiln").check(node)
    tactic = get_tactic("cpu.pointwise")
    assert tactic is not None and not tactic.supports(node, CPU)
    with pytest.raises(UnsupportedOpError):
        tactic.make(node, {}, torch.device("cpu"))
    xs = [torch.randn(SHAPE), torch.randn(SHAPE)]
    with pytest.raises(UnsupportedOpError):
        lookup("Pointwise", "kiln").compute(node, *xs)
    assert not os.path.exists(canary)


@pytest.mark.parametrize("case", CASES)
def test_hostile_program_refused_by_triton(case: str, canary: str) -> None:
    pytest.importorskip("triton", reason="triton is not installed")
    from kiln.backends.cuda import triton_pointwise  # noqa: F401  (registers the tactic)
    program, consts, outputs = _hostile(canary)[case]
    node = _node(program, consts, outputs)
    t = get_tactic("cuda.triton_pointwise")
    assert t is not None and not t.supports(node, TacticContext(torch.device("cuda")))
    with pytest.raises(UnsupportedOpError):
        t.build(node, {"BLOCK": 1024, "num_warps": 4}, torch.device("cpu"))
    assert not os.path.exists(canary)


def test_parsed_structure_holds_only_ints_and_known_names() -> None:
    prog = PointwiseProgram.parse(_node([_ins("Mul", "i0", "i1"), _ins("Clip", "t0", "c0", ""),
                                         _ins("LeakyRelu", "t1", alpha=1)], [-0.5], ["t2"]))
    assert prog.instrs[0] == Instr("Mul", (Ref("input", 0), Ref("input", 1)))
    assert prog.instrs[1].args == (Ref("temp", 0), Ref("const", 0), Ref("none"))
    assert prog.instrs[2].attrs["alpha"] == 1.0 and type(prog.instrs[2].attrs["alpha"]) is float
    assert prog.consts == (-0.5,) and prog.outputs == (Ref("temp", 2),)
    with pytest.raises(TypeError):
        prog.instrs[2].attrs["alpha"] = "x"  # type: ignore[index]
    for bad in [("temp", "0)\nimport os"), ("temp", 1.0), ("temp", True), ("code", 0), ("temp", -1)]:
        with pytest.raises(ValueError):
            Ref(*bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Instr("__import__", (Ref("input", 0),))


def test_consts_nan_and_inf_are_values() -> None:
    """NaN / inf constants are allowed (ONNX Clip bounds may hold them) and never become source text."""
    x = torch.randn(SHAPE)
    node = _node([_ins("Clip", "i0", "c0", "c1"), _ins("Add", "t0", "c2")], [-np.inf, np.inf, float("nan")], n_in=1)
    kernel = get_tactic("cpu.pointwise").make(node, {}, torch.device("cpu"))  # type: ignore[union-attr]
    assert torch.isnan(kernel(x)).all()
    src = kernel.fn.source
    assert "inf" not in src and "nan" not in src


def test_cpu_source_is_integers_and_fixed_text() -> None:
    node = _node([_ins("Add", "i0", "i1"), _ins("LeakyRelu", "t0", alpha=0.25), _ins("Clip", "t1", "c0", "c1"),
                  _ins("Mul", "t2", "c2")], [-1.0, 1.0, 3.0])
    src = get_tactic("cpu.pointwise").make(node, {}, torch.device("cpu")).fn.source  # type: ignore[union-attr]
    body = src.replace("def pointwise(i0, i1):", "")
    for token in ("0.25", "1.0", "3.0", "LeakyRelu", "Clip", "pw"):
        assert token not in body
    x, y = torch.randn(SHAPE), torch.randn(SHAPE)
    want = torch.clamp(torch.nn.functional.leaky_relu(x + y, 0.25), -1.0, 1.0) * 3.0
    torch.testing.assert_close(get_tactic("cpu.pointwise").make(node, {}, torch.device("cpu"))(x, y), want)


def test_single_operand_max_does_not_alias_its_input() -> None:
    x = torch.randn(SHAPE)
    node = _node([_ins("Max", "i0"), _ins("Relu", "t0")], n_in=1)
    saved = x.clone()
    out = get_tactic("cpu.pointwise").make(node, {}, torch.device("cpu"))(x)  # type: ignore[union-attr]
    torch.testing.assert_close(x, saved, rtol=0, atol=0)
    torch.testing.assert_close(out, torch.relu(x))


# ---- (b) a real plan, edited ---------------------------------------------------------------------

def _chain_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Add", ["x", "y"], ["a"], name="add"),
             helper.make_node("Mul", ["a", "s"], ["b"], name="mul"),
             helper.make_node("Sigmoid", ["b"], ["c"], name="sig"),
             helper.make_node("Clip", ["c", "lo", "hi"], ["d"], name="clip"),
             helper.make_node("Greater", ["x", "y"], ["g"], name="gt"),
             helper.make_node("Where", ["g", "d", "x"], ["out"], name="where")]
    inits = [numpy_helper.from_array(np.array([[[0.5]], [[2.0]], [[-1.0]]], np.float32), "s"),
             numpy_helper.from_array(np.array(0.2, np.float32), "lo"),
             numpy_helper.from_array(np.array(0.8, np.float32), "hi")]
    graph = helper.make_graph(nodes, "chain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4]),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def chain_plan() -> bytes:
    from kiln.builder import Builder, BuilderConfig
    from kiln.plan.format import plan_to_bytes
    plan = Builder().build(_chain_model(), BuilderConfig(device="cpu", optimization_level=0))
    return plan_to_bytes(plan)


def _pointwise_step(plan: Any) -> dict[str, Any]:
    steps = [s for s in plan.graph["steps"] if s["op"] == "Pointwise"]
    assert len(steps) == 1
    return steps[0]


def _instr_dict(step: dict[str, Any], j: int) -> dict[str, Any]:
    ins = step["attrs"]["program"][j]
    return ins["__dict__"] if "__dict__" in ins else ins


def test_plan_runs_fused(chain_plan: bytes) -> None:
    from kiln.plan.format import plan_from_bytes
    from kiln.runtime.engine import Engine
    plan = plan_from_bytes(chain_plan)
    step = _pointwise_step(plan)
    assert [_instr_dict(step, j)["op"] for j in range(len(step["attrs"]["program"]))] == \
        ["Add", "Mul", "Sigmoid", "Clip", "Greater", "Where"]
    assert step["tactic"] in ("cpu.pointwise", "cpu.pointwise_c") and len(plan.graph["steps"]) == 1
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((1, 3, 4, 4), np.float32), rng.standard_normal((1, 3, 4, 4), np.float32)
    got = Engine(plan).create_execution_context().execute({"x": x, "y": y})["out"]
    want = ReferenceEvaluator(_chain_model()).run(None, {"x": x, "y": y})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _edits(canary: str) -> dict[str, Any]:
    code = _payload(canary)

    def operand(step: dict[str, Any]) -> None:
        _instr_dict(step, 0)["args"][0] = f"x)\n{code}#"

    def clip_bound(step: dict[str, Any]) -> None:
        _instr_dict(step, 3)["args"][1] = f"c0)\n{code}#"

    def op(step: dict[str, Any]) -> None:
        _instr_dict(step, 2)["op"] = f"Sigmoid(t1)\n{code}#"

    def const(step: dict[str, Any]) -> None:
        step["attrs"]["consts"][0] = f"0.2)\n{code}#"

    def attr(step: dict[str, Any]) -> None:
        _instr_dict(step, 2)["op"] = "LeakyRelu"
        _instr_dict(step, 2)["attrs"] = {"__dict__": {"alpha": f"0.1)\n{code}#"}}

    def forward(step: dict[str, Any]) -> None:
        _instr_dict(step, 0)["args"][0] = "t5"

    def output(step: dict[str, Any]) -> None:
        step["attrs"]["outputs"] = [f"t5)\n{code}#"]

    return {"operand": operand, "clip-bound": clip_bound, "op": op, "const": const, "attr": attr,
            "forward-ref": forward, "output": output}


@pytest.mark.parametrize("tactic", ["cpu.pointwise", "ref"])
@pytest.mark.parametrize("edit", sorted(_edits("X")))
def test_edited_plan_does_not_load(chain_plan: bytes, edit: str, tactic: str, canary: str) -> None:
    from kiln.plan.format import plan_from_bytes, plan_to_bytes
    from kiln.runtime.engine import Engine
    plan = plan_from_bytes(chain_plan)
    plan.graph = copy.deepcopy(plan.graph)
    step = _pointwise_step(plan)
    step["tactic"], step["config"] = tactic, {}
    _edits(canary)[edit](step)
    plan = plan_from_bytes(plan_to_bytes(plan))  # as a file on disk would arrive
    x = np.ones((1, 3, 4, 4), np.float32)
    with pytest.raises(KilnError) as err:
        if tactic == "ref":  # the reference tactic builds nothing at load: the program is refused when run
            try:
                engine = Engine(plan)
            except KilnError:
                raise
            engine.create_execution_context().execute({"x": x, "y": x})
        else:
            Engine(plan)
    assert "\n" not in str(err.value)
    assert not os.path.exists(canary)


# ---- (c) random programs vs onnx's reference evaluator ---------------------------------------------

CONT_UNARY = ["Relu", "LeakyRelu", "Sigmoid", "Tanh", "Exp", "Erf", "Neg", "Abs", "Elu", "Selu", "Celu", "Softplus",
              "Softsign", "HardSigmoid", "HardSwish", "Mish", "Gelu", "Sin", "Cos", "ThresholdedRelu", "Swish"]
POS_UNARY = ["Log", "Sqrt", "Reciprocal"]  # operand drawn from the positive values
STEP_UNARY = ["Floor", "Ceil", "Round", "Sign"]  # discontinuous: operand drawn from the exact values
COMPARE = ["Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"]  # likewise
LOGIC = ["And", "Or", "Xor"]
ARITH = ["Add", "Sub", "Mul", "Div", "Pow"]
COVERED = set(CONT_UNARY + POS_UNARY + STEP_UNARY + COMPARE + LOGIC + ARITH
              + ["Not", "PRelu", "Max", "Min", "Sum", "Mean", "Where", "Clip"])
IN_SHAPES = [(2, 3, 4), (3, 1), (4,), (1, 3, 1), (2, 3, 4)]
_EXACT_KEEP = {"Floor", "Ceil", "Round", "Sign", "Neg", "Abs", "Relu", "Max", "Min", "Where", "Clip"}


def test_random_programs_cover_the_vocabulary_but_cast() -> None:
    assert COVERED == OPS - {"Cast"}


class _Val:
    def __init__(self, ref: str, kind: str, shape: tuple[int, ...], exact: bool, pos: bool) -> None:
        self.ref, self.kind, self.shape, self.exact, self.pos = ref, kind, shape, exact, pos


def _attrs_for(op: str, rng: np.random.Generator) -> dict[str, Any]:
    u = lambda lo, hi: float(np.float32(rng.uniform(lo, hi)))  # noqa: E731  (float32-exact attribute values)
    if op in ("LeakyRelu", "Elu", "Celu", "ThresholdedRelu", "Swish"):
        return {"alpha": u(0.1, 1.5)}
    if op == "Selu":
        return {"alpha": u(1.0, 2.0), "gamma": u(0.5, 1.5)}
    if op == "HardSigmoid":
        return {"alpha": u(0.1, 0.5), "beta": u(0.2, 0.8)}
    if op == "Gelu":
        return {"approximate": str(rng.choice(["none", "tanh"]))}
    return {}


def _random_program(rng: np.random.Generator) -> tuple[list[np.ndarray], dict[str, Any], onnx.ModelProto]:
    n_in = int(rng.integers(2, 5))
    shapes = [IN_SHAPES[0]] + [IN_SHAPES[int(rng.integers(0, len(IN_SHAPES)))] for _ in range(n_in - 1)]
    inputs: list[np.ndarray] = []
    vals: list[_Val] = []
    for k, shp in enumerate(shapes):
        positive = k == 1
        x = rng.uniform(0.25, 2.0, shp) if positive else rng.standard_normal(shp) * 1.5
        inputs.append(x.astype(np.float32))
        vals.append(_Val(f"i{k}", "f", shp, True, positive))
    if rng.random() < 0.5:
        shp = (2, 1, 4)
        inputs.append(rng.random(shp) < 0.5)
        vals.append(_Val(f"i{len(shapes)}", "b", shp, True, False))
    consts: list[float] = []

    def const(lo: float, hi: float) -> _Val:
        consts.append(float(np.float32(rng.uniform(lo, hi))))
        return _Val(f"c{len(consts) - 1}", "f", (), True, consts[-1] > 0)

    def pick(pred: Any) -> _Val | None:
        c = [v for v in vals if pred(v)]
        return c[int(rng.integers(0, len(c)))] if c else None

    program: list[dict[str, Any]] = []
    onnx_nodes: list[onnx.NodeProto] = []
    ops = sorted(COVERED)
    n_instrs = int(rng.integers(3, 11))
    while len(program) < n_instrs or vals[-1].ref[0] != "t":
        op = ops[int(rng.integers(0, len(ops)))]
        flt = lambda v: v.kind == "f"  # noqa: E731
        if op in CONT_UNARY:
            args = [pick(flt)]
        elif op in POS_UNARY:
            args = [pick(lambda v: v.kind == "f" and v.pos)]
        elif op in STEP_UNARY:
            args = [pick(lambda v: v.kind == "f" and v.exact)]
        elif op == "Not":
            args = [pick(lambda v: v.kind == "b")]
        elif op in COMPARE:
            args = [pick(lambda v: v.kind == "f" and v.exact), pick(lambda v: v.kind == "f" and v.exact)]
        elif op in LOGIC:
            args = [pick(lambda v: v.kind == "b"), pick(lambda v: v.kind == "b")]
        elif op == "Div":  # a positive denominator
            args = [pick(flt), pick(lambda v: v.kind == "f" and v.pos)]
        elif op == "Pow":  # a positive base, a moderate exponent
            args = [pick(lambda v: v.kind == "f" and v.pos), const(-2.0, 2.0)]
        elif op in ARITH:
            args = [pick(flt), pick(flt) if rng.random() < 0.7 else const(-2.0, 2.0)]
        elif op == "PRelu":
            x = pick(lambda v: v.kind == "f" and v.ref[0] in "it" and len(v.shape) == 3)
            slope = pick(lambda v: v.kind == "f" and np.broadcast_shapes(v.shape, x.shape) == x.shape) if x else None
            args = [x, slope]
        elif op in ("Max", "Min", "Sum", "Mean"):
            args = [pick(flt) for _ in range(int(rng.integers(1, 4)))]
        elif op == "Where":
            args = [pick(lambda v: v.kind == "b"), pick(flt), pick(flt)]
        else:  # Clip, a bound may be missing
            lo, hi = sorted(float(np.float32(b)) for b in rng.uniform(-1.5, 1.5, 2))
            args = [pick(flt), const(lo, lo) if rng.random() < 0.8 else None,
                    const(hi, hi) if rng.random() < 0.8 else None]
            if args[0] is not None:
                consts_refs = ["" if a is None else a.ref for a in args[1:]]
                j = len(program)
                attrs: dict[str, Any] = {}
                program.append({"op": op, "args": [args[0].ref] + consts_refs, "attrs": attrs})
                onnx_nodes.append(helper.make_node(op, [args[0].ref] + consts_refs, [f"t{j}"]))
                vals.append(_Val(f"t{j}", "f", args[0].shape, args[0].exact, bool(args[1] and args[1].pos)))
            continue
        if any(a is None for a in args):
            continue
        if op in ("Max", "Min", "Sum", "Mean") and np.broadcast_shapes(*(a.shape for a in args)) != args[0].shape:
            continue  # onnx's reference Sum/Mean accumulate in place into their first operand
        j = len(program)
        attrs = _attrs_for(op, rng)
        program.append({"op": op, "args": [a.ref for a in args], "attrs": attrs})
        onnx_nodes.append(helper.make_node(op, [a.ref for a in args], [f"t{j}"], **attrs))
        shape = tuple(np.broadcast_shapes(*(a.shape for a in args)))
        kind = "b" if op in COMPARE + LOGIC + ["Not"] else "f"
        exact = (op in COMPARE + LOGIC + ["Not"]) or (op in _EXACT_KEEP and all(a.exact for a in args))
        pos = (op in ("Exp", "Sigmoid", "Softplus") or (op in ("Sqrt", "Reciprocal", "Add", "Mul", "Sum", "Mean",
                                                               "Max", "Min", "Div")
                                                        and all(a.pos for a in args)) or op == "Pow")
        vals.append(_Val(f"t{j}", kind, shape, exact, pos))
    elem = {"f": TensorProto.FLOAT, "b": TensorProto.BOOL}
    graph = helper.make_graph(
        onnx_nodes, "random",
        [helper.make_tensor_value_info(v.ref, elem[v.kind], list(v.shape)) for v in vals if v.ref[0] == "i"],
        [helper.make_tensor_value_info(v.ref, elem[v.kind], None) for v in vals if v.ref[0] == "t"],
        [numpy_helper.from_array(np.array(c, np.float32), f"c{k}") for k, c in enumerate(consts)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])
    attrs = {"program": program, "consts": consts, "outputs": [f"t{len(program) - 1}"]}
    return inputs, attrs, model


def _oracle(rng: np.random.Generator) -> tuple[list[np.ndarray], dict[str, Any], np.ndarray]:
    """A random program whose every temporary is finite and moderate under the oracle (else draw again)."""
    for _ in range(200):
        inputs, attrs, model = _random_program(rng)
        feeds = {f"i{k}": x for k, x in enumerate(inputs)}
        with np.errstate(all="ignore"):
            temps = ReferenceEvaluator(model).run(None, feeds)
        floats = [t for t in temps if t.dtype != np.bool_]
        if all(np.isfinite(t).all() and np.abs(t).max(initial=0) < 1e4 for t in floats):
            return inputs, attrs, temps[-1]
    raise AssertionError("no well-conditioned random program in 200 draws")


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("seed", range(30))
def test_random_program_matches_onnx_reference(seed: int, dynamic: bool) -> None:
    rng = np.random.default_rng(1000 + seed)
    inputs, attrs, want = _oracle(rng)
    ins = [Value(f"x{k}", TensorType(DType.BOOL if x.dtype == np.bool_ else DType.FLOAT32,
                                     None if dynamic else x.shape)) for k, x in enumerate(inputs)]
    out_dtype = DType.BOOL if want.dtype == np.bool_ else DType.FLOAT32
    node = Node("Pointwise", ins, [Value("y", TensorType(out_dtype, want.shape))], attrs, name="pw", domain="kiln")
    xs = [torch.from_numpy(x.copy()) for x in inputs]
    tactic = get_tactic("cpu.pointwise")
    assert tactic is not None and tactic.supports(node, CPU)
    kernel = tactic.make(node, {}, torch.device("cpu"))
    for got in (kernel(*xs), lookup("Pointwise", "kiln").compute(node, *xs)):
        got = got.numpy()
        assert got.shape == want.shape and got.dtype == want.dtype
        if want.dtype == np.bool_:
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for x, orig in zip(xs, inputs):  # kernels never write into their inputs
        np.testing.assert_array_equal(x.numpy(), orig)


@pytest.mark.parametrize("seed", range(24))
def test_random_program_on_triton(seed: int) -> None:
    """The same programs through the generated Triton kernel (the interpreter on a machine without a GPU)."""
    pytest.importorskip("triton", reason="triton is not installed")
    from kiln.backends.cuda.triton_pointwise import program_ok
    rng = np.random.default_rng(1000 + seed)
    inputs, attrs, want = _oracle(rng)
    ins = [Value(f"x{k}", TensorType(DType.BOOL if x.dtype == np.bool_ else DType.FLOAT32, x.shape))
           for k, x in enumerate(inputs)]
    node = Node("Pointwise", ins, [Value("y", TensorType(DType.FLOAT32, want.shape))], attrs, name="pw", domain="kiln")
    if want.dtype == np.bool_ or not program_ok(PointwiseProgram.parse(node)):
        pytest.skip("not a Triton program (a bool result, or Round, which has no Triton lowering)")
    if np.broadcast_shapes(*(x.shape for x in inputs)) != want.shape:
        pytest.skip("the kernel iterates over all inputs' broadcast shape (as in every fused program)")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tactic = get_tactic("cuda.triton_pointwise")
    assert tactic is not None and tactic.supports(node, TacticContext(dev))
    got = tactic.make(node, {"BLOCK": 1024, "num_warps": 4}, dev)(*[torch.from_numpy(x.copy()).to(dev) for x in inputs])
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-5, atol=1e-5)
