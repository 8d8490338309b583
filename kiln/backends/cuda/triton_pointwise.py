"""A generated Triton kernel per Pointwise program: one pass over the output, any broadcasting.

The output's iteration order follows the memory order of a full-size input (NHWC activations stay
NHWC); dims are collapsed where every operand is contiguous across them, so the usual cases (equal
shapes; per-channel operands) index with one or two divisions. Each operand is loaded once, the
program runs in float32 registers, and the result is stored in the output type. The kernel source
is written to a cache folder (Triton reads kernels from files) and imported once per process.

The source is generated from the parsed program (kiln.ops.pointwise_program) only: variables are
integer-numbered names, constants are kernel arguments, and the only values written as literals are
validated float attributes (repr of a Python float). No string of the node or plan reaches the module.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import tempfile
from typing import Any, Callable, Mapping

import torch

from kiln.backends.cuda.triton_launch import launch
from kiln.backends.tactic import Built, Kernel, Tactic, TacticContext, register_tactic
from kiln.backends.strides import merge_dims
from kiln.errors import UnsupportedOpError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node
from kiln.ops.activations import TABLE as ACTIVATION_TABLE
from kiln.ops.pointwise_program import BOOL_RESULT, INT_CAST_TARGETS, INT_INPUTS, OPS, PointwiseProgram, Ref

Tensor = torch.Tensor
_I32 = 2**31 - 1
_FLOATS = (DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16)

_UNARY: dict[str, str] = {
    "Neg": "-({0})", "Abs": "tl.abs({0})", "Relu": "tl.maximum({0}, 0.0)", "Sigmoid": "tl.sigmoid({0})",
    "Tanh": "tanh_f32({0})", "Exp": "tl.exp({0})", "Log": "tl.log({0})", "Sqrt": "tl.sqrt({0})",
    "Reciprocal": "(1.0 / ({0}))", "Erf": "tl.erf({0})", "Floor": "tl.floor({0})", "Ceil": "tl.ceil({0})",
    "Softplus": "softplus_f32({0})",
    "HardSwish": f"apply_act({{0}}, {ACTIVATION_TABLE['HardSwish'].code:d}, 0.0, 0.0)",
    "Mish": f"apply_act({{0}}, {ACTIVATION_TABLE['Mish'].code:d}, 0.0, 0.0)",
    "Softsign": "(({0}) / (1.0 + tl.abs({0})))", "Sin": "tl.sin({0})",
    "Cos": "tl.cos({0})", "Sign": "tl.where({0} > 0.0, 1.0, tl.where({0} < 0.0, -1.0, 0.0))",
}
_BINARY: dict[str, str] = {"Add": "({0} + {1})", "Sub": "({0} - {1})", "Mul": "({0} * {1})", "Div": "({0} / {1})",
                           "Pow": "pow_f32({0}, {1})", "PRelu": "tl.where({0} >= 0.0, {0}, {0} * {1})"}
_COMPARE: dict[str, str] = {"Equal": "==", "Less": "<", "Greater": ">", "LessOrEqual": "<=", "GreaterOrEqual": ">="}
_LOGIC: dict[str, str] = {"And": "&", "Or": "|", "Xor": "^"}
_NARY: dict[str, str] = {"Max": "tl.maximum", "Min": "tl.minimum", "Sum": "+", "Mean": "+"}
SUPPORTED_OPS = (frozenset(_UNARY) | frozenset(_BINARY) | frozenset(_NARY) | frozenset(_COMPARE) | frozenset(_LOGIC)
                 | {"LeakyRelu", "Clip", "Where", "HardSigmoid", "Gelu", "Elu", "Selu", "Celu", "ThresholdedRelu",
                    "Swish", "Not", "Cast"}) & OPS
_CAST_TO = {DType.BOOL.onnx: "({0} != 0.0)", DType.FLOAT32.onnx: "{0}",
            DType.FLOAT16.onnx: "({0}).to(tl.float16).to(tl.float32)",
            DType.BFLOAT16.onnx: "({0}).to(tl.bfloat16).to(tl.float32)"}
"""Cast targets of a program (float args are float32 blocks; a narrower float rounds once and widens back)."""
_INT_TARGETS = tuple(dt.onnx for dt in INT_CAST_TARGETS)


def _lit(x: float) -> str:
    """A Python float as source text: repr of a float (or the fixed spellings of inf/nan); never str() of
    anything else."""
    if type(x) is not float:
        raise TypeError(f"Triton literal must be a float, got {type(x).__name__}")
    if math.isnan(x):
        return 'float("nan")'
    if math.isinf(x):
        return 'float("inf")' if x > 0 else 'float("-inf")'
    return repr(x)


def _fattr(attrs: Mapping[str, Any], name: str, default: float) -> str:
    """A float attribute (validated by the parser) as a literal."""
    return _lit(float(attrs.get(name, default)))


def _expr(op: str, args: list[str], attrs: Mapping[str, Any]) -> str:
    """Triton expression of one instruction (float args are float32 blocks, logic/Where-cond args bool).

    `args` are this module's own names (x<k>, t<k>, c<k>, or "" for a missing Clip bound); `attrs` are
    validated and read only through float()/fixed choices."""
    if op in _UNARY:
        return _UNARY[op].format(args[0])
    if op in _BINARY:
        return _BINARY[op].format(args[0], args[1])
    if op in _COMPARE:
        return f"({args[0]} {_COMPARE[op]} {args[1]})"
    if op in _LOGIC:
        return f"({args[0]} {_LOGIC[op]} {args[1]})"
    if op == "Not":
        return f"({args[0]} == 0)"
    if op in ("Max", "Min"):
        fn = _NARY[op]
        out = args[0]
        for a in args[1:]:
            out = f"{fn}({out}, {a})"
        return out
    if op == "Sum":
        return "(" + " + ".join(args) + ")"
    if op == "Mean":
        return "((" + " + ".join(args) + f") * {_lit(1.0 / len(args))})"
    if op == "LeakyRelu":
        alpha = _fattr(attrs, "alpha", 0.01)
        return f"tl.where({args[0]} >= 0.0, {args[0]}, {args[0]} * {alpha})"
    if op == "Elu":
        alpha = _fattr(attrs, "alpha", 1.0)
        return f"tl.where({args[0]} > 0.0, {args[0]}, {alpha} * (tl.exp({args[0]}) - 1.0))"
    if op == "Selu":
        a, g = _fattr(attrs, "alpha", 1.67326319217681884765625), _fattr(attrs, "gamma", 1.05070102214813232421875)
        return f"({g} * tl.where({args[0]} > 0.0, {args[0]}, {a} * (tl.exp({args[0]}) - 1.0)))"
    if op == "Celu":
        a = _fattr(attrs, "alpha", 1.0)
        return f"(tl.maximum({args[0]}, 0.0) + tl.minimum(0.0, {a} * (tl.exp({args[0]} / {a}) - 1.0)))"
    if op == "ThresholdedRelu":
        a = _fattr(attrs, "alpha", 1.0)
        return f"tl.where({args[0]} > {a}, {args[0]}, 0.0)"
    if op == "Swish":
        a = _fattr(attrs, "alpha", 1.0)
        return f"({args[0]} * tl.sigmoid({a} * {args[0]}))"
    if op == "HardSigmoid":
        a, b = _fattr(attrs, "alpha", 0.2), _fattr(attrs, "beta", 0.5)
        return f"tl.minimum(tl.maximum({a} * {args[0]} + {b}, 0.0), 1.0)"
    if op == "Gelu":
        code = ACTIVATION_TABLE["GeluTanh" if attrs.get("approximate", "none") == "tanh" else "Gelu"].code
        return f"apply_act({args[0]}, {code:d}, 0.0, 0.0)"
    if op == "Clip":
        x = args[0]
        if args[1]:
            x = f"tl.maximum({x}, {args[1]})"
        if args[2]:
            x = f"tl.minimum({x}, {args[2]})"
        return x
    if op == "Where":
        return f"tl.where({args[0]}, {args[1]}, {args[2]})"
    if op == "Cast" and attrs.get("to") in _CAST_TO:
        return _CAST_TO[attrs["to"]].format(args[0])
    raise ValueError(f"Pointwise op {op} has no Triton lowering")


def _casts_to_bool(ins: Any) -> bool:
    return ins.op == "Cast" and ins.attrs.get("to") == DType.BOOL.onnx


def _only_cast(prog: PointwiseProgram, k: int) -> bool:
    """Input k is read only by Casts to INT_CAST_TARGETS: exact from its float32 load (an integer loads as the
    nearest float32, and only zero loads as zero)."""
    readers = [ins for ins in prog.instrs if any(r.kind == "input" and r.index == k for r in ins.args)]
    return bool(readers) and all(ins.op == "Cast" and ins.attrs.get("to") in _INT_TARGETS for ins in readers) \
        and all(r.kind != "input" or r.index != k for r in prog.outputs)


def program_ok(prog: PointwiseProgram) -> bool:
    """Whether every instruction of a parsed program has a Triton lowering (and the result is a float)."""
    if len(prog.outputs) != 1 or any(ins.op not in SUPPORTED_OPS for ins in prog.instrs):
        return False
    if any(ins.op == "Cast" and ins.attrs.get("to") not in _CAST_TO for ins in prog.instrs):
        return False
    res = prog.outputs[0]
    return not (res.kind == "temp" and prog.instrs[res.index].op in BOOL_RESULT)


def _input_mode(sizes: list[int], st: list[int]) -> str:
    """'s' scalar broadcast, 'd' dense in iteration order, 'g' general strided."""
    if all(s == 0 for s in st):
        return "s"
    dense, acc = True, 1
    for size, s in zip(reversed(sizes), reversed(st)):
        if s != acc:
            dense = False
            break
        acc *= size
    return "d" if dense else "g"


_PREFIX = {"input": "x", "temp": "t", "const": "c"}


def _var(ref: Ref) -> str:
    """The kernel variable of a value operand: x<k> (loaded input), t<k> (temporary), c<k> (constant)."""
    return f"{_PREFIX[ref.kind]}{int(ref.index):d}"


def generate_source(prog: PointwiseProgram, modes: list[str], bools: list[bool], rank: int) -> str:
    """Source of a @triton.jit kernel for this parsed program, operand modes and iteration rank.

    The text is this module's fixed code, integer-numbered names, the modes (checked against a fixed
    set) and float literals of validated attributes: nothing else from the node reaches it."""
    n_in, rank = len(modes), int(rank)
    if n_in != prog.n_inputs or len(bools) != n_in or any(m not in ("s", "d", "g") for m in modes):
        raise ValueError("operand modes do not match the program")
    dims = [f"D{d:d}" for d in range(1, rank)]
    params = [f"in{k:d}" for k in range(n_in)] + ["out"] + [f"c{k:d}" for k in range(len(prog.consts))] + ["n"] + dims
    for k, m in enumerate(modes):
        if m == "g":
            params += [f"s{k:d}_{d:d}" for d in range(rank)]
    lines = [
        "import triton", "import triton.language as tl",
        "from kiln.backends.cuda.triton_act import apply_act, pow_f32, softplus_f32, tanh_f32", "", "",
        "@triton.jit",
        f"def pointwise_kernel({', '.join(params)}, BLOCK: tl.constexpr):",
        "    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)",
        "    mask = offs < n",
    ]
    if "g" in modes:
        lines.append("    rem = offs")
        for d in range(rank - 1, 0, -1):
            lines.append(f"    i{d:d} = rem % D{d:d}")
            lines.append(f"    rem = rem // D{d:d}")
        lines.append("    i0 = rem")
    for k, m in enumerate(modes):
        conv = " != 0" if bools[k] else ".to(tl.float32)"
        if m == "s":
            lines.append(f"    x{k:d} = tl.load(in{k:d}){conv}")
        elif m == "d":
            lines.append(f"    x{k:d} = tl.load(in{k:d} + offs, mask=mask, other=0){conv}")
        else:
            off = " + ".join(f"i{d:d} * s{k:d}_{d:d}" for d in range(rank))
            lines.append(f"    x{k:d} = tl.load(in{k:d} + ({off}), mask=mask, other=0){conv}")
    kinds = {f"x{k:d}": ("b" if b else "f") for k, b in enumerate(bools)}
    for j, ins in enumerate(prog.instrs):
        op = ins.op
        args = []
        for pos, r in enumerate(ins.args):
            if r.kind == "none":
                args.append("")
                continue
            name = _var(r)
            kind = kinds.get(name, "f")
            want_bool = op in _LOGIC or op == "Not" or (op == "Where" and pos == 0)
            if want_bool and kind == "f":
                name = f"({name} != 0.0)"
            elif not want_bool and kind == "b":
                name = f"{name}.to(tl.float32)"
            args.append(name)
        lines.append(f"    t{j:d} = {_expr(op, args, ins.attrs)}")
        kinds[f"t{j:d}"] = "b" if op in BOOL_RESULT or _casts_to_bool(ins) else "f"
    res = _var(prog.outputs[0])
    if kinds.get(res, "f") == "b":
        res = f"{res}.to(tl.float32)"
    lines.append(f"    res = {res} + tl.zeros((BLOCK,), dtype=tl.float32)")
    lines.append("    tl.store(out + offs, res.to(out.dtype.element_ty), mask=mask)")
    return "\n".join(lines) + "\n"


def _cache_dir() -> str:
    from kiln.settings import settings
    d = settings().cache_dir
    d = os.path.join(d, "triton_pointwise")
    try:
        os.makedirs(d, exist_ok=True)
        return d
    except OSError:
        d = os.path.join(tempfile.gettempdir(), "kiln_triton_pointwise")
        os.makedirs(d, exist_ok=True)
        return d


_MODULES: dict[str, Any] = {}


def load_kernel(src: str) -> Callable[..., Any]:
    """Write (once) and import a generated kernel module; returns its pointwise_kernel."""
    digest = hashlib.sha256(src.encode()).hexdigest()[:20]
    mod = _MODULES.get(digest)
    if mod is None:
        path = os.path.join(_cache_dir(), f"pw_{digest}.py")
        if not os.path.exists(path):
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(src)
            os.replace(tmp, path)
        spec = importlib.util.spec_from_file_location(f"kiln_pw_{digest}", path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _MODULES[digest] = mod
    return mod.pointwise_kernel


class PointwiseLauncher:
    """Runs one Pointwise node: plans the iteration space per call, kernels cached per operand pattern."""

    def __init__(self, node: Node, prog: PointwiseProgram, out_dtype: torch.dtype | None, cfg: dict[str, Any]) -> None:
        self.node = node
        self.prog = prog
        self.out_dtype = out_dtype
        self.consts = list(prog.consts)
        self.block = int(cfg.get("BLOCK", 1024))
        self.warps = int(cfg.get("num_warps", 4))
        self.kernels: dict[tuple[Any, ...], Callable[..., Any]] = {}

    def __call__(self, *xs: Tensor) -> Tensor:
        xs = tuple(x if isinstance(x, torch.Tensor) else torch.as_tensor(x) for x in xs)
        shape = torch.broadcast_shapes(*(x.shape for x in xs))
        dtype = self.out_dtype or next(x.dtype for x in xs if x.dtype.is_floating_point)
        full = next((x for x in xs if tuple(x.shape) == tuple(shape)), None)
        nhwc = (len(shape) == 4 and full is not None and full.stride(1) == 1 and shape[1] > 1
                and not full.is_contiguous())
        perm = [0, 2, 3, 1] if nhwc else list(range(len(shape)))
        out = torch.empty(shape, device=xs[0].device, dtype=dtype,
                          memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        numel = out.numel()
        if numel == 0:
            return out
        if numel >= _I32:
            from kiln.ops.registry import lookup
            return lookup("Pointwise", "kiln").compute(self.node, *xs)
        sizes = [int(shape[p]) for p in perm]
        strides = []
        for x in xs:
            st = x.expand(shape).stride() if len(shape) else ()
            strides.append([int(st[p]) for p in perm])
        sizes, strides = merge_dims(sizes, strides)
        modes = [_input_mode(sizes, st) for st in strides]
        bools = [x.dtype == torch.bool for x in xs]
        key = (tuple(modes), tuple(bools), len(sizes))
        kern = self.kernels.get(key)
        if kern is None:
            kern = load_kernel(generate_source(self.prog, modes, bools, len(sizes)))
            self.kernels[key] = kern
        args: list[Any] = list(xs) + [out] + self.consts + [numel] + sizes[1:]
        for st, m in zip(strides, modes):
            if m == "g":
                args += st
        grid = ((numel + self.block - 1) // self.block,)
        launch(kern, grid, args, {"BLOCK": self.block, "num_warps": self.warps})
        return out


class TritonPointwise(Tactic):
    """Pointwise programs as one generated Triton kernel (float32 math, output cast fused)."""

    id = "cuda.triton_pointwise"
    devices = ("cuda",)
    priority = 30

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        if node.op_type != "Pointwise" or node.domain != "kiln" or len(node.outputs) != 1:
            return False
        if node.outputs[0].type.dtype not in _FLOATS:
            return False
        try:
            prog = PointwiseProgram.parse(node)
        except UnsupportedOpError:
            return False
        for k, v in enumerate(node.inputs):
            if v is None or v.kind != "tensor":
                return False
            if v.type.dtype in INT_INPUTS and not _only_cast(prog, k):
                return False
            if v.type.dtype not in _FLOATS + INT_INPUTS and v.type.dtype != DType.BOOL:
                return False
        return program_ok(prog)

    def configs(self, node: Node, ctx: TacticContext) -> list[dict[str, Any]]:
        cfgs = [{"BLOCK": 1024, "num_warps": 4}, {"BLOCK": 2048, "num_warps": 8}, {"BLOCK": 512, "num_warps": 4}]
        return cfgs[:1] if int(ctx.extra.get("opt_level", 3)) <= 1 else cfgs

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        prog = PointwiseProgram.parse(node)
        if not program_ok(prog):
            raise UnsupportedOpError(f"node '{node.name}': Pointwise program has ops without a Triton lowering")
        dt = node.outputs[0].type.dtype
        return PointwiseLauncher(node, prog, dt.torch if dt is not None else None, config)


register_tactic(TritonPointwise())
