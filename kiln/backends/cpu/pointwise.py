"""Pointwise tactic for the CPU: a fused elementwise program compiled once into a small Python function.

At kernel build, the node's program, parsed and validated by kiln.ops.pointwise_program, becomes the
source of one function (one line per instruction, each a direct torch call bound in the function's
namespace), compiled with ``exec``: no per-inference interpretation of the program, no Node objects,
no attribute look-ups. The source is fixed text plus integer-numbered names only (arguments ``i<k>``,
temporaries ``t<k>``, constant tensors ``c<k>``, functions ``f<k>``, Clip bounds ``b<pos>_<k>``); every
value (a function with its attributes, a constant) is an object bound in the namespace, so no string
of the node or the plan ever becomes code. When all
input shapes are static, the program is first run on meta tensors to learn every temporary's
shape and dtype; an instruction then writes in place (``out=`` / ``op_``) into a temporary that dies
there and has the result's shape and dtype, so a chain allocates one tensor, not one per op.

Only float32/bool programs, or bfloat16/bool ones (a bf16 build: each torch op on bfloat16 tensors computes
in float32 and rounds its result, as the reference's instructions do), whose ops are all in the fast table
are accepted; anything else stays with the reference tactic (which evaluates each instruction with the op's
own definition).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from kiln.backends.cpu.common import CpuTactic
from kiln.backends.kernel import Kernel
from kiln.backends.tactic import Built, register_tactic
from kiln.errors import UnsupportedOpError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node
from kiln.ops.pointwise_program import Instr, PointwiseProgram, Ref

Tensor = torch.Tensor
Fn = Callable[..., Tensor]


def _unary(attrs: Mapping[str, Any], op: str) -> tuple[Fn, str | None] | None:
    """(fn(x), name of the in-place tensor method or None) for a unary op (attrs already validated)."""
    a = attrs.get
    simple: dict[str, tuple[Fn, str | None]] = {
        "Relu": (torch.relu, "relu_"), "Sigmoid": (torch.sigmoid, "sigmoid_"), "Tanh": (torch.tanh, "tanh_"),
        "Exp": (torch.exp, "exp_"), "Log": (torch.log, "log_"), "Erf": (torch.erf, "erf_"),
        "Sqrt": (torch.sqrt, "sqrt_"), "Neg": (torch.neg, "neg_"), "Abs": (torch.abs, "abs_"),
        "Reciprocal": (torch.reciprocal, "reciprocal_"), "Floor": (torch.floor, "floor_"),
        "Ceil": (torch.ceil, "ceil_"), "Round": (torch.round, "round_"), "Sin": (torch.sin, "sin_"),
        "Cos": (torch.cos, "cos_"), "Sign": (torch.sign, "sign_"), "Not": (torch.logical_not, None),
        "HardSwish": (F.hardswish, None), "Mish": (F.mish, None), "Softsign": (F.softsign, None),
        "Softplus": (F.softplus, None),
    }
    if op in simple:
        return simple[op]
    if op == "LeakyRelu":
        alpha = float(a("alpha", 0.01))
        return (lambda x: F.leaky_relu(x, alpha)), None
    if op == "Elu":
        alpha = float(a("alpha", 1.0))
        return (lambda x: F.elu(x, alpha)), None
    if op == "Selu":
        alpha, gamma = float(a("alpha", 1.67326319217681884765625)), float(a("gamma", 1.05070102214813232421875))
        return (lambda x: F.elu(x, alpha).mul_(gamma)), None
    if op == "Celu":
        alpha = float(a("alpha", 1.0))
        return (lambda x: torch.celu(x, alpha)), None
    if op == "HardSigmoid":
        alpha, beta = float(a("alpha", 0.2)), float(a("beta", 0.5))
        return (lambda x: torch.add(torch.mul(x, alpha), beta).clamp_(0.0, 1.0)), None
    if op == "ThresholdedRelu":
        alpha = float(a("alpha", 1.0))
        return (lambda x: F.threshold(x, alpha, 0.0)), None
    if op == "Gelu":
        approx = "tanh" if a("approximate", "none") == "tanh" else "none"
        return (lambda x: F.gelu(x, approximate=approx)), None
    if op == "Swish":
        alpha = float(a("alpha", 1.0))
        return (lambda x: x * torch.sigmoid(x * alpha)), None
    return None


_BINARY: dict[str, tuple[Fn, bool]] = {  # fn(a, b), supports out=
    "Add": (torch.add, True), "Sub": (torch.sub, True), "Mul": (torch.mul, True), "Div": (torch.div, True),
    "Pow": (torch.pow, True), "Max": (torch.maximum, True), "Min": (torch.minimum, True),
    "Equal": (torch.eq, False), "Less": (torch.lt, False), "Greater": (torch.gt, False),
    "LessOrEqual": (torch.le, False), "GreaterOrEqual": (torch.ge, False), "And": (torch.logical_and, False),
    "Or": (torch.logical_or, False), "Xor": (torch.logical_xor, False),
}
_VARIADIC = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add}


def _prelu(x: Tensor, slope: Tensor) -> Tensor:
    return torch.where(x < 0, x * slope, x)


def _mean(*xs: Tensor) -> Tensor:
    acc = xs[0]
    for x in xs[1:]:
        acc = acc + x
    return acc / len(xs)


def _fold(fn: Fn) -> Fn:
    def f(*xs: Tensor) -> Tensor:
        if len(xs) == 1:  # a fresh tensor: the result may be overwritten in place later, its operand may not
            return xs[0].clone()
        acc = xs[0]
        for x in xs[1:]:
            acc = fn(acc, x)
        return acc
    return f


class _Instr:
    """One compiled instruction: fn, operand refs, and how it may run in place."""

    def __init__(self, fn: Fn, args: tuple[Ref, ...], out_ok: bool = False, method: str | None = None,
                 clip: bool = False) -> None:
        self.fn, self.args, self.out_ok, self.method, self.clip = fn, args, out_ok, method, clip


def _instr(ins: Instr) -> _Instr | None:
    """The fast form of a parsed instruction, or None (Cast has none). The arity is already checked."""
    op, args = ins.op, ins.args
    if op == "Clip":
        return _Instr(torch.clamp, args, method="clamp_", clip=True)
    if op == "Where":
        return _Instr(torch.where, args)
    if op == "PRelu":
        return _Instr(_prelu, args)
    if op in _VARIADIC and len(args) != 2:
        return _Instr(_fold(_VARIADIC[op]), args)
    if op == "Sum":
        return _Instr(torch.add, args, out_ok=True)
    if op == "Mean":
        return _Instr(_mean, args)
    if op in _BINARY:
        fn, out_ok = _BINARY[op]
        return _Instr(fn, args, out_ok=out_ok)
    un = _unary(ins.attrs, op)
    return None if un is None else _Instr(un[0], args, method=un[1])


def _parse(node: Node) -> PointwiseProgram | None:
    try:
        return PointwiseProgram.parse(node)
    except UnsupportedOpError:
        return None


def _fast(prog: PointwiseProgram) -> list[_Instr] | None:
    instrs = [_instr(ins) for ins in prog.instrs]
    return None if any(i is None for i in instrs) else instrs  # type: ignore[return-value]


# Generated source is built only from these integer-named variables and the fixed text of this module:
# nothing from the node (no operand string, op name, attribute or constant) is ever formatted into it.
_PREFIX = {"input": "i", "temp": "t", "const": "c"}


def _var(ref: Ref) -> str:
    """The variable of a value operand: i<k> (argument), t<k> (temporary), c<k> (constant tensor)."""
    return f"{_PREFIX[ref.kind]}{int(ref.index):d}"


def compile_program(node: Node, prog: PointwiseProgram | None = None) -> Callable[..., Any]:
    """The node's program as one generated function; raises UnsupportedOpError for a program that does not
    parse or has an op without a fast form."""
    prog = PointwiseProgram.parse(node) if prog is None else prog
    instrs = _fast(prog)
    if instrs is None:
        raise UnsupportedOpError(f"node '{node.name}': Pointwise program has ops without a fast CPU form")
    ns: dict[str, Any] = {}
    shapes = _meta_run(node, instrs, prog.consts)
    last_use: dict[Ref, int] = {}
    for k, ins in enumerate(instrs):
        for r in ins.args:
            last_use[r] = k
    lines = [f"def pointwise({', '.join(f'i{k:d}' for k in range(int(prog.n_inputs)))}):"]
    for k, ins in enumerate(instrs):
        ns[f"f{k:d}"] = ins.fn
        args = [_operand(r, ins.clip, pos, prog.consts, ns) for pos, r in enumerate(ins.args)]
        target = _inplace_target(k, ins, shapes, last_use, prog.outputs)
        if target is not None and ins.out_ok:
            lines.append(f"    t{k:d} = f{k:d}({', '.join(args)}, out={_var(target)})")
        elif target is not None and ins.method is not None and ins.args[0] == target:
            lines.append(f"    t{k:d} = {_var(target)}.{ins.method}({', '.join(args[1:])})")
        else:
            lines.append(f"    t{k:d} = f{k:d}({', '.join(args)})")
    outs = [_operand(r, False, 0, prog.consts, ns) for r in prog.outputs]
    lines.append(f"    return {outs[0]}" if len(outs) == 1 else f"    return ({', '.join(outs)},)")
    source = "\n".join(lines) + "\n"
    exec(compile(source, "<kiln pointwise>", "exec"), ns)  # noqa: S102  (source made of integers and fixed text)
    fn = ns["pointwise"]
    fn.source = source  # for inspection and tests
    return fn


def _operand(ref: Ref, clip: bool, pos: int, consts: tuple[float, ...], ns: dict[str, Any]) -> str:
    """Source text of one operand: a variable whose value (a constant) is bound in the namespace `ns`."""
    if clip and pos > 0:  # clamp's bounds are Python floats bound by name (a missing one: -inf / +inf)
        value = consts[ref.index] if ref.kind == "const" else (-math.inf if pos == 1 else math.inf)
        name = f"b{pos:d}_{ref.index:d}" if ref.kind == "const" else f"b{pos:d}_none"
        ns.setdefault(name, float(value))
        return name
    if ref.kind == "none":
        return "None"
    if ref.kind == "const":
        ns.setdefault(_var(ref), torch.tensor(float(consts[ref.index]), dtype=torch.float32))
    return _var(ref)


def _meta_run(node: Node, instrs: list[_Instr], consts: tuple[float, ...]) -> list[tuple[tuple[int, ...], torch.dtype]] | None:
    """(shape, dtype) of every temporary at the node's static input shapes (None when not all static)."""
    ins_meta: list[Tensor] = []
    for v in node.inputs:
        if v is None or not v.type.is_static or v.type.dtype is None:
            return None
        ins_meta.append(torch.empty([int(d) for d in v.type.shape], dtype=v.type.dtype.torch,  # type: ignore[union-attr]
                                    device="meta"))
    temps: list[Tensor] = []
    try:
        for ins in instrs:
            args: list[Any] = []
            for pos, r in enumerate(ins.args):
                if ins.clip and pos > 0:
                    args.append(consts[r.index] if r.kind == "const" else (-math.inf if pos == 1 else math.inf))
                elif r.kind == "none":
                    args.append(None)
                elif r.kind == "input":
                    args.append(ins_meta[r.index])
                elif r.kind == "temp":
                    args.append(temps[r.index])
                else:
                    args.append(torch.empty((), device="meta"))
            temps.append(ins.fn(*args))
    except Exception:
        return None
    return [(tuple(t.shape), t.dtype) for t in temps]


def _inplace_target(k: int, ins: _Instr, shapes: list[tuple[tuple[int, ...], torch.dtype]] | None,
                    last_use: dict[Ref, int], outputs: tuple[Ref, ...]) -> Ref | None:
    """A temporary operand instruction k may overwrite with its result, if any."""
    if shapes is None or not (ins.out_ok or ins.method):
        return None
    for r in ins.args:
        if r.kind == "temp" and last_use.get(r) == k and r not in outputs and shapes[r.index] == shapes[k]:
            return r
    return None


_OK_DTYPES = (DType.FLOAT32, DType.BOOL)
_BF16_DTYPES = (DType.BFLOAT16, DType.BOOL)


class CpuPointwiseTactic(CpuTactic):
    """kiln Pointwise programs as a generated Python function with in-place temporaries."""

    id = "cpu.pointwise"

    torch_dispatch = True
    priority = 10
    ops = (("kiln", "Pointwise"),)

    def accepts(self, node: Node) -> bool:
        types = [v.type.dtype if v is not None else None for v in (*node.inputs, *node.outputs)]
        if not (all(t in _OK_DTYPES for t in types) or all(t in _BF16_DTYPES for t in types)):
            return False
        prog = _parse(node)
        return prog is not None and _fast(prog) is not None

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        return Kernel(compile_program(node))


register_tactic(CpuPointwiseTactic())
