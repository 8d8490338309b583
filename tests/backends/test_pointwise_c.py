"""cpu.pointwise_c: Pointwise programs compiled into one C loop (kiln/backends/cpu/pointwise_c.py).

(a) Random programs over the whole vocabulary, on fresh random inputs with broadcasting patterns (per-channel,
    squeeze-and-excite, row vectors, scalars, channels-last, strided views, expanded tensors), agree with the
    op's reference (OpDef.compute) at rtol 1e-5 / atol 1e-6, with and without a destination (contiguous,
    channels-last, a channel slice of a larger tensor, one overlapping an input).
(b) What the tactic declines (types the reference refuses, casts to other types, several outputs) and what a
    kernel does with calls it was not made for (the reference runs, or a KilnError for a bad destination).
(c) Hostile programs are refused and the generated source holds nothing from the node; without a C compiler
    the tactic declines and a plan naming it fails to build its kernel with one line.
(d) A network at opt level 0 runs its Pointwise layer on this tactic, writing into the arena.
Timing is not asserted here: benchmarks/pointwise_cpu.py prints cpu.pointwise vs cpu.pointwise_c.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
import torch

from kiln.backends.cpu import pointwise_c, pointwise_codegen
from kiln.backends.tactic import TacticContext, get_tactic
from kiln.errors import KilnError, PlanFormatError, UnsupportedOpError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Value
from kiln.ir.types import TensorType
from kiln.ops.pointwise_program import OPS, PointwiseProgram
from kiln.ops.registry import lookup
from tests.backends.test_pointwise_program import _attrs_for  # the same attribute draws as the ONNX-oracle test

pytestmark = pytest.mark.skipif(pointwise_c.math_mode() is None,
                                reason=f"no working C compiler for the generated kernels ({pointwise_c.error()})")

CPU = TacticContext(torch.device("cpu"))
TID = "cpu.pointwise_c"


def _ins(op: str, *args: str, **attrs: Any) -> dict[str, Any]:
    return {"op": op, "args": list(args), "attrs": attrs}


def _node(program: list[dict[str, Any]], in_types: list[tuple[DType, Any]], consts: list[float] | None = None,
          out_dtype: DType = DType.FLOAT32, out_shape: Any = None, outputs: list[str] | None = None,
          name: str = "pw") -> Node:
    ins = [Value(f"x{k}", TensorType(dt, shp)) for k, (dt, shp) in enumerate(in_types)]
    attrs: dict[str, Any] = {"program": program}
    if consts is not None:
        attrs["consts"] = consts
    if outputs is not None:
        attrs["outputs"] = outputs
    return Node("Pointwise", ins, [Value("y", TensorType(out_dtype, out_shape))], attrs, name=name, domain="kiln")


def _kernel(node: Node) -> Any:
    t = get_tactic(TID)
    assert t is not None and t.supports(node, CPU), "cpu.pointwise_c declines the node"
    return t.make(node, {}, torch.device("cpu"))


def _reference(node: Node, xs: list[torch.Tensor]) -> torch.Tensor:
    return lookup("Pointwise", "kiln").compute(node, *xs)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    if want.dtype == torch.bool:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)


# ---- (a) random programs ---------------------------------------------------------------------------

CONT_UNARY = ["Relu", "LeakyRelu", "Sigmoid", "Tanh", "Exp", "Erf", "Neg", "Abs", "Elu", "Selu", "Celu", "Softplus",
              "Softsign", "HardSigmoid", "HardSwish", "Mish", "Gelu", "Sin", "Cos", "ThresholdedRelu", "Swish"]
POS_UNARY = ["Log", "Sqrt", "Reciprocal"]  # operand drawn from the positive values
STEP_UNARY = ["Floor", "Ceil", "Round", "Sign"]  # discontinuous: operand drawn from the exact values
COMPARE = ["Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"]  # likewise
LOGIC = ["And", "Or", "Xor"]
ARITH = ["Add", "Sub", "Mul", "Div", "Pow"]
COVERED = set(CONT_UNARY + POS_UNARY + STEP_UNARY + COMPARE + LOGIC + ARITH
              + ["Not", "PRelu", "Max", "Min", "Sum", "Mean", "Where", "Clip", "Cast"])
_EXACT_KEEP = {"Floor", "Ceil", "Round", "Sign", "Neg", "Abs", "Relu", "Max", "Min", "Where", "Clip", "Cast"}

N, CH, H, W = 2, 6, 5, 7
OUT = (N, CH, H, W)
LAYOUTS = ["contiguous", "channels_last", "strided", "expanded"]


def _patterns(out: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """(layout, shape) of inputs that broadcast to `out`: full-size in four layouts, then broadcast ones."""
    full = [(layout, out) for layout in LAYOUTS]
    r = len(out)
    if r == 4:
        n, c, h, w = out
        return full + [("contiguous", (1, c, 1, 1)), ("contiguous", (n, c, 1, 1)), ("contiguous", (w,)),
                       ("contiguous", ()), ("contiguous", (1, 1, h, w)), ("contiguous", (n, 1, h, w)),
                       ("contiguous", (h, 1)), ("channels_last", (n, c, 1, w))]
    extra = [("contiguous", ()), ("contiguous", (out[-1],))]
    if r >= 2:
        extra.append(("contiguous", (out[0],) + (1,) * (r - 1)))
    return full + extra


def test_random_programs_cover_the_vocabulary() -> None:
    assert COVERED == OPS
    assert pointwise_codegen.SUPPORTED_OPS == OPS


class _Val:
    def __init__(self, ref: str, kind: str, exact: bool, pos: bool) -> None:
        self.ref, self.kind, self.exact, self.pos = ref, kind, exact, pos


def _layout(x: torch.Tensor, layout: str, rng: np.random.Generator) -> torch.Tensor:
    """x (contiguous) in the given memory layout, values unchanged."""
    if layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided" and x.dim() >= 1:  # every other element of a larger tensor
        big = torch.empty(*x.shape[:-1], 2 * x.shape[-1])
        big[..., ::2] = x
        return big[..., ::2]
    if layout == "expanded" and x.dim() >= 1:  # stride 0 along its first dim
        return x[:1].expand(x.shape)
    return x


def _random_program(rng: np.random.Generator, out_shape: tuple[int, ...] = OUT
                    ) -> tuple[list[torch.Tensor], list[tuple[DType, Any]], dict[str, Any]]:
    """(inputs, their (dtype, shape), Pointwise attributes) of a random program over the vocabulary."""
    n_in = int(rng.integers(1, 5))
    patterns = _patterns(out_shape)
    pats = [patterns[int(rng.integers(0, 4))]]
    pats += [patterns[int(rng.integers(0, len(patterns)))] for _ in range(n_in - 1)]
    xs: list[torch.Tensor] = []
    types: list[tuple[DType, Any]] = []
    vals: list[_Val] = []
    for k, (layout, shp) in enumerate(pats):
        positive = k == 1 or rng.random() < 0.2
        exact = rng.random() < 0.3
        if exact:  # multiples of 1/4 in [-4, 4]: discontinuous ops see the same values everywhere
            x = np.round(rng.uniform(-4, 4, shp) * 4) / 4
            x = np.abs(x) + 0.25 if positive else x
        else:
            x = rng.uniform(0.25, 2.0, shp) if positive else rng.standard_normal(shp) * 1.5
        t = torch.from_numpy(np.asarray(x, np.float32).copy())
        xs.append(_layout(t, layout, rng))
        types.append((DType.FLOAT32, tuple(shp)))
        vals.append(_Val(f"i{k}", "f", exact, positive))
    if rng.random() < 0.4:
        shp = (out_shape[0], 1, *out_shape[2:]) if len(out_shape) == 4 else out_shape
        xs.append(torch.from_numpy(rng.random(shp) < 0.5))
        types.append((DType.BOOL, tuple(shp)))
        vals.append(_Val(f"i{len(xs) - 1}", "b", True, False))
    consts: list[float] = []

    def const(lo: float, hi: float) -> _Val:
        consts.append(float(np.float32(rng.uniform(lo, hi))))
        return _Val(f"c{len(consts) - 1}", "f", True, consts[-1] > 0)

    def pick(pred: Any) -> _Val | None:
        c = [v for v in vals if pred(v)]
        return c[int(rng.integers(0, len(c)))] if c else None

    program: list[dict[str, Any]] = []
    ops = sorted(COVERED)
    n_instrs = int(rng.integers(2, 12))
    flt = lambda v: v.kind == "f"  # noqa: E731
    want_kind = "b" if rng.random() < 0.1 else "f"
    for _ in range(1000):
        if len(program) >= n_instrs and vals[-1].ref[0] == "t" and vals[-1].kind == want_kind:
            break
        op = ops[int(rng.integers(0, len(ops)))]
        attrs = _attrs_for(op, rng)
        if op in CONT_UNARY:
            args = [pick(flt)]
        elif op in POS_UNARY:
            args = [pick(lambda v: v.kind == "f" and v.pos)]
        elif op in STEP_UNARY:
            args = [pick(lambda v: v.kind == "f" and v.exact)]
        elif op == "Not":
            args = [pick(lambda v: v.kind == "b")]
        elif op == "Cast":
            src = pick(lambda v: v.exact)
            attrs = {"to": int(DType.FLOAT32.onnx if rng.random() < 0.6 else DType.BOOL.onnx)}
            args = [src]
        elif op in COMPARE:
            args = [pick(lambda v: v.kind == "f" and v.exact), pick(lambda v: v.kind == "f" and v.exact)]
        elif op in LOGIC:
            args = [pick(lambda v: v.kind == "b"), pick(lambda v: v.kind == "b")]
        elif op == "Div":
            args = [pick(flt), pick(lambda v: v.kind == "f" and v.pos)]
        elif op == "Pow":
            args = [pick(lambda v: v.kind == "f" and v.pos), const(-2.0, 2.0) if rng.random() < 0.7
                    else pick(lambda v: v.kind == "f" and v.ref[0] == "i" and not v.pos)]
        elif op in ARITH:
            args = [pick(flt), pick(flt) if rng.random() < 0.7 else const(-2.0, 2.0)]
        elif op == "PRelu":
            args = [pick(flt), pick(flt) if rng.random() < 0.5 else const(0.05, 0.5)]
        elif op in ("Max", "Min", "Sum", "Mean"):
            args = [pick(flt) for _ in range(int(rng.integers(1, 4)))]
        elif op == "Where":
            args = [pick(lambda v: v.kind == "b"), pick(flt), pick(flt)]
        else:  # Clip, a bound may be missing
            x = pick(flt)
            if x is None:
                continue
            lo, hi = sorted(float(np.float32(b)) for b in rng.uniform(-1.5, 1.5, 2))
            refs = [x.ref, const(lo, lo).ref if rng.random() < 0.8 else "",
                    const(hi, hi).ref if rng.random() < 0.8 else ""]
            program.append(_ins(op, *refs))
            vals.append(_Val(f"t{len(program) - 1}", "f", x.exact, bool(refs[1]) and lo > 0))
            continue
        if any(a is None for a in args):
            continue
        j = len(program)
        program.append({"op": op, "args": [a.ref for a in args], "attrs": attrs})
        if op == "Cast":
            kind = "b" if attrs["to"] == DType.BOOL.onnx else "f"
        else:
            kind = "b" if op in COMPARE + LOGIC + ["Not"] or (op == "Where" and args[1].kind == "b") else "f"
        exact = kind == "b" or (op in _EXACT_KEEP and all(a.exact for a in args))
        pos = (op in ("Exp", "Sigmoid", "Softplus") or (op in ("Sqrt", "Reciprocal", "Add", "Mul", "Sum", "Mean",
                                                               "Max", "Min", "Div")
                                                        and all(a.pos for a in args)) or op == "Pow")
        vals.append(_Val(f"t{j}", kind, exact, pos and kind == "f"))
    else:
        raise _Redraw
    return xs, types, {"program": program, "consts": consts, "outputs": [f"t{len(program) - 1}"]}


class _Redraw(Exception):
    """The random program did not end as wanted: draw another."""


def _oracle(rng: np.random.Generator, out_shape: tuple[int, ...] = OUT
            ) -> tuple[Node, list[torch.Tensor]]:
    """A random program whose float temporaries stay finite and moderate under the reference (else draw
    again), as a node typed like its inputs."""
    for _ in range(200):
        try:
            xs, types, attrs = _random_program(rng, out_shape)
        except _Redraw:
            continue
        prog = attrs["program"]
        temps = []
        for j in range(len(prog)):  # every temporary, through the reference
            sub = _node(prog[: j + 1], types, attrs["consts"], outputs=[f"t{j}"])
            with np.errstate(all="ignore"):
                temps.append(_reference(sub, xs))
        floats = [t for t in temps if t.dtype != torch.bool]
        if all(torch.isfinite(t).all() and float(t.abs().max()) < 1e4 for t in floats):
            out = temps[-1]
            out_dtype = DType.BOOL if out.dtype == torch.bool else DType.FLOAT32
            return _node(prog, types, attrs["consts"], out_dtype=out_dtype, out_shape=tuple(out.shape)), xs
    raise AssertionError("no well-conditioned random program in 200 draws")


@pytest.mark.parametrize("seed", range(60))
def test_random_program_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(7000 + seed)
    node, xs = _oracle(rng)
    kernel = _kernel(node)
    saved = [x.clone() for x in xs]
    got = kernel(*xs)
    _close(got, _reference(node, xs))
    assert kernel.fallback is not None and kernel.fallback.reason is None, kernel.fallback.reason
    for x, s in zip(xs, saved):  # kernels never write into their inputs
        assert torch.equal(x, s)
    # into given destinations: contiguous, channels-last, a channel slice of a larger tensor
    want = _reference(node, xs)
    shape = tuple(want.shape)
    dests = [torch.empty(shape, dtype=want.dtype)]
    if len(shape) == 4:
        dests.append(torch.empty(shape, dtype=want.dtype).contiguous(memory_format=torch.channels_last))
        big = torch.zeros(shape[0], shape[1] + 5, *shape[2:], dtype=want.dtype).contiguous(
            memory_format=torch.channels_last if seed % 2 else torch.contiguous_format)
        dests.append(big[:, 2:2 + shape[1]])
    for d in dests:
        r = kernel(*xs, out=d)
        assert r is d
        _close(d, want)
    if len(shape) == 4:
        assert not big[:, :2].any() and not big[:, 2 + shape[1]:].any()  # nothing written outside the slice


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("shape", [(1, 3, 1, 700), (2, 16, 64, 65), (3, 5), (1,), (1, 1, 1, 1)],
                         ids=["long-inner", "threaded", "2d", "1d", "one"])
def test_random_program_sizes(seed: int, shape: tuple[int, ...]) -> None:
    """Inner dims longer than a block, tensors large enough to run on several threads, small ranks."""
    node, xs = _oracle(np.random.default_rng(9100 + seed), shape)
    kernel = _kernel(node)
    _close(kernel(*xs), _reference(node, xs))
    assert kernel.fallback.reason is None


@pytest.mark.parametrize("seed", range(6))
def test_one_loop_and_segmented_forms_agree(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls to libm get loops of their own (temporaries through block buffers); a program needing more
    buffers than MAX_BUFFERS runs as one loop. Both forms give the reference's results."""
    node, xs = _oracle(np.random.default_rng(4400 + seed))
    want = _reference(node, xs)
    _close(_kernel(node)(*xs), want)
    monkeypatch.setattr(pointwise_codegen, "MAX_BUFFERS", 0)
    kernel = _kernel(node)
    assert " B0[BLK]" not in kernel.fn.source
    _close(kernel(*xs), want)


def test_calls_run_in_loops_of_their_own() -> None:
    prog = [_ins("Add", "i0", "i1"), _ins("Sigmoid", "t0"), _ins("Mul", "t0", "t1"), _ins("Greater", "t2", "c0"),
            _ins("Tanh", "t2"), _ins("Where", "t3", "t4", "t0")]
    node = _node(prog, [(DType.FLOAT32, (3, 300)), (DType.FLOAT32, (300,))], [0.1], out_shape=(3, 300))
    kernel = _kernel(node)
    assert kernel.fn.source.count("for (long j = 0; j < len; j++) {") == 5  # add | sigmoid | mul, > | tanh | where
    x, y = torch.randn(3, 300), torch.randn(300)
    _close(kernel(x, y), _reference(node, [x, y]))


def test_threads_agree() -> None:
    rng = np.random.default_rng(5)
    node, xs = _oracle(rng, (2, 16, 64, 65))
    kernel = _kernel(node)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel(*xs)
        torch.set_num_threads(max(2, before))
        many = kernel(*xs)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


def _chain(shapes: list[tuple[int, ...]]) -> tuple[Node, list[torch.Tensor]]:
    """x0 * x1 + x2, relu, over inputs of these shapes."""
    prog = [_ins("Mul", "i0", "i1"), _ins("Add", "t0", "i2"), _ins("Relu", "t1")]
    out = tuple(torch.broadcast_shapes(*shapes))
    node = _node(prog, [(DType.FLOAT32, s) for s in shapes], out_shape=out)
    gen = torch.Generator().manual_seed(3)
    return node, [torch.randn(s, generator=gen) for s in shapes]


@pytest.mark.parametrize("shapes", [
    [(1, 64, 7, 7), (1, 64, 1, 1), (1, 64, 1, 1)],  # per-channel scale and shift
    [(4, 32, 9, 9), (4, 32, 1, 1), (1, 32, 9, 9)],  # squeeze-and-excite scale, a residual without batch
    [(2, 3, 8, 8), (8,), ()],  # a row vector, a scalar
    [(2, 1, 8, 1), (1, 3, 1, 8), (1,)],  # no input has the output's shape
], ids=["per-channel", "se", "row-scalar", "outer"])
def test_broadcast_patterns(shapes: list[tuple[int, ...]]) -> None:
    node, xs = _chain(shapes)
    kernel = _kernel(node)
    _close(kernel(*xs), _reference(node, xs))
    cl = [x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in xs]
    got = kernel(*cl)
    _close(got, _reference(node, xs))
    if cl[0].shape == got.shape and cl[0].dim() == 4 and not cl[0].is_contiguous():
        assert got.is_contiguous(memory_format=torch.channels_last)  # a new output takes the input's layout


def test_destination_overlapping_an_input() -> None:
    node, xs = _chain([(2, 8, 5, 5), (1, 8, 1, 1), (1, 8, 1, 1)])
    want = _reference(node, xs)
    kernel = _kernel(node)
    x0 = xs[0].clone()
    r = kernel(x0, xs[1], xs[2], out=x0)  # in place
    assert r is x0
    _close(x0, want)
    buf = torch.cat([xs[0].flatten(), torch.zeros(7)])
    x0v, dst = buf[:xs[0].numel()].view(xs[0].shape), buf[7:].view(xs[0].shape)  # partial overlap
    kernel(x0v, xs[1], xs[2], out=dst)
    _close(dst, want)


def test_nan_inf_constants_and_values() -> None:
    prog = [_ins("Clip", "i0", "c0", "c1"), _ins("Add", "t0", "c2"), _ins("Max", "t1", "i1"), _ins("Relu", "t2")]
    node = _node(prog, [(DType.FLOAT32, (4, 4)), (DType.FLOAT32, (4, 4))], [-np.inf, np.inf, 0.5])
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0] * 4).reshape(4, 4)
    y = x.flip(0)
    _close(_kernel(node)(x, y), _reference(node, [x, y]))
    nan_bound = _node([_ins("Clip", "i0", "c0", "")], [(DType.FLOAT32, (4, 4))], [float("nan")])
    _close(_kernel(nan_bound)(x), _reference(nan_bound, [x]))
    huge = _node([_ins("Mul", "i0", "c0")], [(DType.FLOAT32, (4, 4))], [1e300])  # float32 inf, as the reference
    _close(_kernel(huge)(x), _reference(huge, [x]))


@pytest.mark.parametrize("op", sorted(set(CONT_UNARY + POS_UNARY + STEP_UNARY)))
def test_unary_special_values(op: str) -> None:
    """Each unary op on a sweep of values with NaN, +-inf, +-0, tiny and huge magnitudes."""
    vals = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-30, -1e-30, 1e-7, -1e-7, 0.5, -0.5, 1.5, -2.5,
            3.0, -3.0, 20.5, -20.5, 88.0, -88.0, 100.0, -100.0, 1e30, -1e30]
    x = torch.cat([torch.tensor(vals), torch.linspace(-12, 12, 2001)])
    if op in POS_UNARY:
        x = x.abs()
    if op == "Gelu":  # torch's erf-based gelu gives NaN at +inf (its vectorized erf); the formula gives inf
        x = x[torch.isfinite(x) | torch.isnan(x)]
    attrs = {"alpha": 0.7} if op in ("LeakyRelu", "Elu", "Celu", "ThresholdedRelu", "Swish") else {}
    node = _node([_ins(op, "i0", **attrs)], [(DType.FLOAT32, tuple(x.shape))], out_shape=tuple(x.shape))
    got = _kernel(node)(x)
    want = _reference(node, [x])
    finite = torch.isfinite(want)
    _close(got[~finite], want[~finite])
    _close(got[finite], want[finite])


# ---- (b) declines and per-call checks ----------------------------------------------------------------

F32 = (DType.FLOAT32, (2, 3))


@pytest.mark.parametrize("case", ["cast-int64", "cast-fp16", "bool-add", "float-and", "float-where-cond",
                                  "int-input", "fp16-input", "two-outputs", "output-is-input", "out-type-mismatch",
                                  "const-only", "celu-alpha-0"])
def test_declines(case: str) -> None:
    b = (DType.BOOL, (2, 3))
    nodes = {
        "cast-int64": _node([_ins("Cast", "i0", to=int(DType.INT64.onnx)), _ins("Relu", "i0")], [F32],
                            outputs=["t0"], out_dtype=DType.INT64),
        "cast-fp16": _node([_ins("Cast", "i0", to=int(DType.FLOAT16.onnx))], [F32], out_dtype=DType.FLOAT16),
        "bool-add": _node([_ins("Add", "i0", "i1")], [F32, b]),
        "float-and": _node([_ins("And", "i0", "i1")], [F32, b], out_dtype=DType.BOOL),
        "float-where-cond": _node([_ins("Where", "i0", "i0", "i0")], [F32]),
        "int-input": _node([_ins("Relu", "i0")], [(DType.INT32, (2, 3))], out_dtype=DType.INT32),
        "fp16-input": _node([_ins("Relu", "i0")], [(DType.FLOAT16, (2, 3))], out_dtype=DType.FLOAT16),
        "two-outputs": Node("Pointwise", [Value("x0", TensorType(DType.FLOAT32, (2, 3)))],
                            [Value(f"y{k}", TensorType(DType.FLOAT32, (2, 3))) for k in range(2)],
                            {"program": [_ins("Relu", "i0"), _ins("Neg", "t0")], "outputs": ["t0", "t1"]},
                            name="pw", domain="kiln"),
        "output-is-input": _node([_ins("Relu", "i0")], [F32], outputs=["i0"]),
        "out-type-mismatch": _node([_ins("Less", "i0", "i0")], [F32], out_dtype=DType.FLOAT32),
        "const-only": _node([_ins("Add", "c0", "c0"), _ins("Relu", "i0")], [F32], [1.0], outputs=["t0"]),
        "celu-alpha-0": _node([_ins("Celu", "i0", alpha=0.0)], [F32]),
    }
    node = nodes[case]
    t = get_tactic(TID)
    assert t is not None and not t.supports(node, CPU)
    with pytest.raises(KilnError):
        t.make(node, {}, torch.device("cpu"))


def test_declines_an_output_type_inference_cannot_prove() -> None:
    """A writes_out tactic must not take a layer whose declared output type says more than inference (the
    loader refuses such plans): a symbolic input with a declared static output, or an unknown input rank."""
    t = get_tactic(TID)
    assert t is not None
    proven = _node([_ins("Relu", "i0")], [(DType.FLOAT32, ("N", 3))], out_shape=("N", 3))
    assert t.supports(proven, CPU)
    for in_shape, out_shape in ((("N", 3), (2, 3)), (None, (2, 3)), (None, None)):
        node = _node([_ins("Relu", "i0")], [(DType.FLOAT32, in_shape)], out_shape=out_shape)
        assert not t.supports(node, CPU), (in_shape, out_shape)
        assert get_tactic("cpu.pointwise").supports(node, CPU)  # type: ignore[union-attr]


def test_priority_above_torch_tactic() -> None:
    from kiln.backends.tactic import candidate_tactics
    node, _ = _chain([(1, 4, 3, 3), (1, 4, 1, 1), (1, 4, 1, 1)])
    ids = [t.id for t in candidate_tactics(node, CPU)]
    assert ids.index(TID) < ids.index("cpu.pointwise")
    t = get_tactic(TID)
    assert t is not None and t.writes_out == 1 and t.strided_out


def test_calls_it_was_not_made_for() -> None:
    node, xs = _chain([(2, 4, 3, 3), (1, 4, 1, 1), (1, 4, 1, 1)])
    kernel = _kernel(node)
    assert kernel.fallback is not None
    kernel.fallback.quiet = True
    want = _reference(node, xs)
    # another dtype: the reference runs (and the autotuner would not credit the tactic with it)
    xd = [x.double() for x in xs]
    torch.testing.assert_close(kernel(*xd), _reference(node, xd))
    assert kernel.fallback.reason is not None
    # the compiled path still serves float32 calls
    kernel.fallback.reason = None
    _close(kernel(*xs), want)
    assert kernel.fallback.reason is None
    # shapes that do not broadcast, or a wrong number of inputs: the reference's own error
    with pytest.raises(Exception):
        kernel(torch.randn(2, 4, 3, 3), torch.randn(1, 5, 1, 1), xs[2])
    with pytest.raises(KilnError):
        kernel(*xs[:2])
    # destinations of another shape or dtype, or with repeated elements
    with pytest.raises(KilnError):
        kernel(*xs, out=torch.empty(2, 4, 3, 4))
    with pytest.raises(KilnError):
        kernel(*xs, out=torch.empty(2, 4, 3, 3, dtype=torch.float64))
    with pytest.raises(KilnError):
        kernel(*xs, out=torch.empty(1, 4, 3, 3).expand(2, 4, 3, 3))
    # non-tensors run the reference, which refuses them
    with pytest.raises(Exception):
        kernel(np.ones((2, 4, 3, 3), np.float32), xs[1], xs[2])
    # empty tensors
    e = [torch.empty(0, 4, 3, 3), xs[1], xs[2]]
    assert kernel(*e).shape == (0, 4, 3, 3)


def test_prelu_slope_aligned_by_the_reference() -> None:
    """A 1-D slope that does not broadcast is aligned by the reference with x's only dim of its length: the
    kernel hands that call to the reference."""
    node = _node([_ins("PRelu", "i0", "i1")], [(DType.FLOAT32, (2, 5, 3, 3)), (DType.FLOAT32, (5,))],
                 out_shape=(2, 5, 3, 3))
    kernel = _kernel(node)
    kernel.fallback.quiet = True
    x, s = torch.randn(2, 5, 3, 3), torch.rand(5)
    _close(kernel(x, s), _reference(node, [x, s]))
    s3 = torch.rand(3)  # broadcasts along the last dim
    _close(kernel(x, s3), _reference(node, [x, s3]))


# ---- (c) generated source, hostile programs, no compiler ------------------------------------------------

def test_source_is_integers_literals_and_fixed_text() -> None:
    name = "evil\"); system(\"touch /tmp/x\"); //"
    node = _node([_ins("Add", "i0", "i1"), _ins("LeakyRelu", "t0", alpha=0.25), _ins("Clip", "t1", "c0", "c1"),
                  _ins("Mul", "t2", "c2")], [F32, F32], [-1.0, 1.0, 3.0], name=name)
    kernel = _kernel(node)
    src = kernel.fn.source
    body = src[src.index("void kiln_pointwise"):]  # the prelude before it is fixed text
    for token in ("evil", "system", "LeakyRelu", "Clip", "0.25", "3.0"):
        assert token not in src if token in ("evil", "system", "LeakyRelu", "Clip") else token not in body
    assert "0x1.0000000000000p-2f" in body and "0x1.8000000000000p+1f" in body  # 0.25 and 3.0 as hex literals
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    want = torch.clamp(torch.nn.functional.leaky_relu(x + y, 0.25), -1.0, 1.0) * 3.0
    torch.testing.assert_close(kernel(x, y), want)


def test_literals_are_exact() -> None:
    for v in [0.1, -0.0, 1e-45, 3.4028234663852886e38, 1e39, -1e39, float("nan"), 1 / 3]:
        lit = pointwise_codegen._lit(v)
        want = float(torch.tensor(v, dtype=torch.float32))
        if want != want:
            assert lit == "NAN"
        elif abs(want) == float("inf"):
            assert lit in ("INFINITY", "(-INFINITY)")
        else:
            assert float.fromhex(lit.strip("()").rstrip("f")) == want
    with pytest.raises(TypeError):
        pointwise_codegen._lit("1.0); system(\"x\")")  # type: ignore[arg-type]


def test_hostile_programs_refused(tmp_path: Any) -> None:
    from tests.backends.test_pointwise_program import _hostile
    from tests.backends.test_pointwise_program import _node as hostile_node
    canary = str(tmp_path / "canary")
    t = get_tactic(TID)
    assert t is not None
    for case, (program, consts, outputs) in sorted(_hostile(canary).items()):
        node = hostile_node(program, consts, outputs)
        assert not t.supports(node, CPU), case
        with pytest.raises(UnsupportedOpError):
            t.make(node, {}, torch.device("cpu"))
    assert not os.path.exists(canary)


def test_without_compiler_the_tactic_declines(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("KILN_CC", "/nonexistent/cc")
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(pointwise_c, "_STATE", {})
    node, _ = _chain([(1, 4, 3, 3), (1, 4, 1, 1), (1, 4, 1, 1)])
    t = get_tactic(TID)
    assert t is not None and not t.supports(node, CPU)
    assert pointwise_c.math_mode() is None and pointwise_c.error()
    with pytest.raises(PlanFormatError) as err:
        t.make(node, {}, torch.device("cpu"))
    assert "\n" not in str(err.value) and "C compiler" in str(err.value)


def test_scalar_libm_mode_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same programs compiled without glibc's vector math library (scalar libm calls)."""
    monkeypatch.setattr(pointwise_c, "_STATE", {"mode": "scalar", "error": ""})
    prog = [_ins("Sigmoid", "i0"), _ins("Tanh", "i0"), _ins("Erf", "i0"), _ins("Mul", "t0", "t1"),
            _ins("Add", "t3", "t2"), _ins("Gelu", "t4"), _ins("Softplus", "t5"), _ins("Mish", "t6"), _ins("Elu", "t7")]
    node = _node(prog, [(DType.FLOAT32, (3, 1000))])
    kernel = _kernel(node)
    assert "simd" not in kernel.fn.source
    x = torch.randn(3, 1000) * 3
    _close(kernel(x), _reference(node, [x]))


# ---- (d) in a network ---------------------------------------------------------------------------------

def _model() -> Any:
    """x, y -> Pointwise(add, scale, SiLU, clip) -> 1x1 Conv: the Pointwise output lives in the arena."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    c = 8
    nodes = [helper.make_node("Add", ["x", "y"], ["a"]),
             helper.make_node("Mul", ["a", "s"], ["b"]),
             helper.make_node("Sigmoid", ["b"], ["e"]),
             helper.make_node("Mul", ["b", "e"], ["f"]),
             helper.make_node("Clip", ["f", "lo", "hi"], ["g"]),
             helper.make_node("Conv", ["g", "w"], ["out"])]
    inits = [numpy_helper.from_array((rng.standard_normal((c, c, 1, 1)) / 3).astype(np.float32), "w"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, (1, c, 1, 1)).astype(np.float32), "s"),
             numpy_helper.from_array(np.array(-0.2, np.float32), "lo"),
             numpy_helper.from_array(np.array(1.5, np.float32), "hi")]
    info = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, c, 12, 12]) for n in ("x", "y")]
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, c, 12, 12])
    graph = helper.make_graph(nodes, "g", info, [out], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_network_at_opt_level_0() -> None:
    import onnxruntime as ort
    from kiln.builder import Builder, BuilderConfig
    from kiln.plan.format import plan_from_bytes, plan_to_bytes
    from kiln.runtime.engine import Engine
    model = _model()
    plan = Builder().build(model, BuilderConfig(device="cpu", optimization_level=0))
    steps = [s for s in plan.graph["steps"] if s["op"] == "Pointwise"]
    assert steps and all(s["tactic"] == TID for s in steps)
    plan = plan_from_bytes(plan_to_bytes(plan))  # through the loader's checks
    rng = np.random.default_rng(1)
    x, y = (rng.standard_normal((1, 8, 12, 12)).astype(np.float32) for _ in range(2))
    got = Engine(plan).create_execution_context().execute({"x": x, "y": y})["out"]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(got, sess.run(None, {"x": x, "y": y})[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("edit", ["operand", "clip-bound", "op", "const", "attr", "forward-ref", "output"])
def test_edited_plan_naming_the_tactic_does_not_load(edit: str, tmp_path: Any) -> None:
    """A plan whose Pointwise step runs cpu.pointwise_c and carries a hostile program does not load, and
    nothing it carries runs (the loader re-checks the step with supports(), which parses the program)."""
    import copy
    from kiln.builder import Builder, BuilderConfig
    from kiln.plan.format import plan_from_bytes, plan_to_bytes
    from kiln.runtime.engine import Engine
    from tests.backends.test_pointwise_program import _chain_model, _edits, _pointwise_step
    canary = str(tmp_path / "canary")
    plan = Builder().build(_chain_model(), BuilderConfig(device="cpu", optimization_level=0))
    plan.graph = copy.deepcopy(plan.graph)
    step = _pointwise_step(plan)
    assert step["tactic"] == TID
    _edits(canary)[edit](step)
    plan = plan_from_bytes(plan_to_bytes(plan))
    with pytest.raises(KilnError) as err:
        Engine(plan)
    assert "\n" not in str(err.value)
    assert not os.path.exists(canary)
