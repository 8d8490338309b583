"""Pointwise tactic for the CPU: a fused elementwise program compiled once into a small Python function.

At kernel build, the node's ``program`` becomes the source of one function (one line per
instruction, each a direct torch call bound in the function's namespace), compiled with ``exec``:
no per-inference interpretation of the program, no Node objects, no attribute look-ups. When all
input shapes are static, the program is first run on meta tensors to learn every temporary's
shape and dtype; an instruction then writes in place (``out=`` / ``op_``) into a temporary that dies
there and has the result's shape and dtype, so a chain allocates one tensor, not one per op.

Only float32/bool programs whose ops are all in the fast table are accepted; anything else stays
with the reference tactic (which evaluates each instruction with the op's own definition).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from kiln.backends.cpu.common import CpuTactic
from kiln.backends.tactic import Built, Kernel, register_tactic
from kiln.ir.dtype import DType
from kiln.ir.graph import Node

Tensor = torch.Tensor
Fn = Callable[..., Tensor]


def _unary(node_attrs: dict[str, Any], op: str) -> tuple[Fn, str | None] | None:
    """(fn(x), name of the in-place tensor method or None) for a unary op."""
    a = node_attrs.get
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
        approx = str(a("approximate", "none"))
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
        acc = xs[0]
        for x in xs[1:]:
            acc = fn(acc, x)
        return acc
    return f


class _Instr:
    """One compiled instruction: fn, argument refs, and how it may run in place."""

    def __init__(self, fn: Fn, args: list[str], out_ok: bool = False, method: str | None = None,
                 clip: bool = False) -> None:
        self.fn, self.args, self.out_ok, self.method, self.clip = fn, args, out_ok, method, clip


def _instr(ins: dict[str, Any]) -> _Instr | None:
    op = str(ins["op"])
    attrs = dict(ins.get("attrs") or {})
    args = [str(r) for r in ins.get("args") or []]
    if op == "Clip":
        return _Instr(torch.clamp, args, method="clamp_", clip=True)
    if op == "Where" and len(args) == 3:
        return _Instr(torch.where, args)
    if op == "PRelu" and len(args) == 2:
        return _Instr(_prelu, args)
    if op in _VARIADIC and len(args) != 2:
        return _Instr(_fold(_VARIADIC[op]), args) if args else None
    if op == "Sum" and len(args) == 2:
        return _Instr(torch.add, args, out_ok=True)
    if op == "Mean":
        return _Instr(_mean, args) if args else None
    if op in _BINARY and len(args) == 2:
        fn, out_ok = _BINARY[op]
        return _Instr(fn, args, out_ok=out_ok)
    un = _unary(attrs, op)
    if un is not None and len(args) == 1:
        return _Instr(un[0], args, method=un[1])
    return None


def compile_program(node: Node) -> Callable[..., Any] | None:
    """The node's program as one generated function, or None when some op has no fast form."""
    program = list(node.attr("program", None) or [])
    instrs = [_instr(ins) for ins in program]
    if not program or any(i is None for i in instrs):
        return None
    consts = [float(c) for c in node.attr("consts", None) or []]
    outputs = [str(r) for r in node.attr("outputs", None) or [f"t{len(program) - 1}"]]
    n_in = len(node.inputs)
    ns: dict[str, Any] = {}
    shapes = _meta_run(node, instrs, consts)  # type: ignore[arg-type]
    last_use: dict[str, int] = {}
    for k, ins in enumerate(instrs):
        for r in ins.args:  # type: ignore[union-attr]
            last_use[r] = k
    lines = [f"def pointwise({', '.join(f'i{k}' for k in range(n_in))}):"]
    for k, ins in enumerate(instrs):
        assert ins is not None
        ns[f"f{k}"] = ins.fn
        args = [_operand(r, ins.clip, consts, ns) for r in ins.args]
        target = _inplace_target(k, ins, shapes, last_use, outputs)
        if target is not None and ins.out_ok:
            lines.append(f"    t{k} = f{k}({', '.join(args)}, out={target})")
        elif target is not None and ins.method is not None and ins.args[0] == target:
            lines.append(f"    t{k} = {target}.{ins.method}({', '.join(args[1:])})")
        else:
            lines.append(f"    t{k} = f{k}({', '.join(args)})")
    outs = [_operand(r, False, consts, ns) for r in outputs]
    lines.append(f"    return {outs[0]}" if len(outs) == 1 else f"    return ({', '.join(outs)},)")
    source = "\n".join(lines) + "\n"
    exec(compile(source, f"<kiln pointwise {node.name}>", "exec"), ns)  # noqa: S102  (our own generated code)
    fn = ns["pointwise"]
    fn.source = source  # for inspection and tests
    return fn


def _operand(ref: str, clip: bool, consts: list[float], ns: dict[str, Any]) -> str:
    if not ref:
        return "None"
    if ref[0] in "it":
        return ref
    value = consts[int(ref[1:])]
    if clip:  # clamp takes Python scalars (inf and nan are names bound in the namespace)
        ns.setdefault("inf", math.inf)
        ns.setdefault("nan", math.nan)
        return repr(value)
    name = f"c{int(ref[1:])}"
    ns.setdefault(name, torch.tensor(value, dtype=torch.float32))
    return name


def _meta_run(node: Node, instrs: list[_Instr], consts: list[float]) -> list[tuple[tuple[int, ...], torch.dtype]] | None:
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
            for r in ins.args:
                if not r:
                    args.append(None)
                elif r[0] == "i":
                    args.append(ins_meta[int(r[1:])])
                elif r[0] == "t":
                    args.append(temps[int(r[1:])])
                else:
                    args.append(consts[int(r[1:])] if ins.clip else torch.empty((), device="meta"))
            temps.append(ins.fn(*args))
    except Exception:
        return None
    return [(tuple(t.shape), t.dtype) for t in temps]


def _inplace_target(k: int, ins: _Instr, shapes: list[tuple[tuple[int, ...], torch.dtype]] | None,
                    last_use: dict[str, int], outputs: list[str]) -> str | None:
    """A temporary argument instruction k may overwrite with its result, if any."""
    if shapes is None or not (ins.out_ok or ins.method):
        return None
    for r in ins.args:
        if r and r[0] == "t" and last_use.get(r) == k and r not in outputs and shapes[int(r[1:])] == shapes[k]:
            return r
    return None


_OK_DTYPES = (DType.FLOAT32, DType.BOOL)


class CpuPointwiseTactic(CpuTactic):
    """kiln Pointwise programs as a generated Python function with in-place temporaries."""

    id = "cpu.pointwise"
    priority = 10
    ops = (("kiln", "Pointwise"),)

    def accepts(self, node: Node) -> bool:
        if any(v is None or v.type.dtype not in _OK_DTYPES for v in node.inputs):
            return False
        if any(o.type.dtype not in _OK_DTYPES for o in node.outputs):
            return False
        program = list(node.attr("program", None) or [])
        return bool(program) and all(_instr(ins) is not None for ins in program)

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        fn = compile_program(node)
        if fn is None:
            raise ValueError(f"node '{node.name}': Pointwise program has ops without a fast form")
        return fn


register_tactic(CpuPointwiseTactic())
