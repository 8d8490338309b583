"""The C source of a Pointwise program for ``cpu.pointwise_c`` (kiln/backends/cpu/pointwise_c.py, whose
docstring describes the loop, the types and the accuracy rules): the closed op tables, the static analysis of
a parsed program (operand kinds, declines) and the generated function. Only this module's fixed text,
integer-numbered names and float literals from ``_lit`` reach the source."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Node
from kiln.ops.pointwise_program import PointwiseProgram, Ref

BLK = 256
"""Elements of the inner dim per block (every operand's block buffer is BLK values on the stack)."""
MAX_INSTRS = 256
"""Longest program (live instructions) compiled; longer ones are declined (gcc takes about 4 s at 256; the
fusion pass makes groups of at most 48)."""
MAX_INPUTS = 64
"""Most inputs a compiled program reads (each has a block buffer on the thread's stack)."""
MAX_OPERANDS = 4096
"""Most operands of the live instructions together."""
MAX_DIMS = 16
"""Most dims after merging (the loop's odometer is a fixed array)."""

# ---- the closed op table: C expressions over this module's own names ------------------------------

_F, _B = "f", "b"
_FLOAT = DType.FLOAT32.onnx
_BOOL = DType.BOOL.onnx


def _lit(x: float) -> str:
    """A float32 C literal of x (rounded to float32 as the reference's constant tensors are): the hex
    spelling of a Python float, or the fixed names of NaN and the infinities; never text of anything else."""
    if type(x) is not float:
        raise TypeError(f"a C literal must be a float, got {type(x).__name__}")
    v = float(torch.tensor(x, dtype=torch.float32).item())
    if math.isnan(v):
        return "NAN"
    if math.isinf(v):
        return "INFINITY" if v > 0 else "(-INFINITY)"
    return f"({v.hex()}f)" if v < 0 or (v == 0 and math.copysign(1.0, v) < 0) else f"{v.hex()}f"


def _attr(attrs: Mapping[str, Any], name: str, default: float) -> str:
    return _lit(float(attrs.get(name, default)))


# unary float ops: C expression of one float operand "{0}" (helpers are static inline functions of _PRELUDE)
_UNARY: dict[str, str] = {
    "Relu": "k_relu({0})", "Sigmoid": "k_sigmoid({0})", "Tanh": "tanhf({0})", "Exp": "expf({0})",
    "Log": "logf({0})", "Erf": "erff({0})", "Sqrt": "sqrtf({0})", "Neg": "(-{0})", "Abs": "fabsf({0})",
    "Reciprocal": "(1.0f / {0})", "Floor": "floorf({0})", "Ceil": "ceilf({0})", "Round": "rintf({0})",
    "Softplus": "k_softplus({0})", "Softsign": "({0} / (1.0f + fabsf({0})))", "HardSwish": "k_hardswish({0})",
    "Mish": "k_mish({0})", "Sin": "sinf({0})", "Cos": "cosf({0})", "Sign": "k_sign({0})",
}
_BINARY: dict[str, str] = {
    "Add": "({0} + {1})", "Sub": "({0} - {1})", "Mul": "({0} * {1})", "Div": "({0} / {1})",
    "Pow": "powf({0}, {1})", "PRelu": "({0} < 0.0f ? {0} * {1} : {0})",
}
_COMPARE: dict[str, str] = {"Equal": "==", "Less": "<", "Greater": ">", "LessOrEqual": "<=", "GreaterOrEqual": ">="}
_LOGIC: dict[str, str] = {"And": "&", "Or": "|", "Xor": "^"}
_ATTR_UNARY = frozenset({"LeakyRelu", "Elu", "Selu", "Celu", "HardSigmoid", "ThresholdedRelu", "Gelu", "Swish"})
SUPPORTED_OPS = (frozenset(_UNARY) | frozenset(_BINARY) | frozenset(_COMPARE) | frozenset(_LOGIC) | _ATTR_UNARY
                 | {"Not", "Cast", "Max", "Min", "Sum", "Mean", "Clip", "Where"})
"""Pointwise ops this tactic compiles (with the operand kinds of `_result_kind`)."""


def _attr_unary(op: str, x: str, attrs: Mapping[str, Any]) -> str:
    """C expression of a unary op with validated float attributes (read through float() only)."""
    if op == "LeakyRelu":
        return f"({x} > 0.0f ? {x} : {x} * {_attr(attrs, 'alpha', 0.01)})"
    if op == "Elu":
        return f"({x} > 0.0f ? {x} : {_attr(attrs, 'alpha', 1.0)} * expm1f({x}))"
    if op == "Selu":
        a = _attr(attrs, "alpha", 1.67326319217681884765625)
        g = _attr(attrs, "gamma", 1.05070102214813232421875)
        return f"({g} * ({x} > 0.0f ? {x} : {a} * expm1f({x})))"
    if op == "Celu":
        alpha = float(attrs.get("alpha", 1.0))
        inv = _lit(1.0 / alpha) if alpha != 0.0 else "INFINITY"
        return f"({x} > 0.0f ? {x} : {_lit(alpha)} * expm1f({x} * {inv}))"
    if op == "HardSigmoid":
        return (f"k_minc(k_maxc({_attr(attrs, 'alpha', 0.2)} * {x} + {_attr(attrs, 'beta', 0.5)}, 0.0f), "
                "1.0f)")
    if op == "ThresholdedRelu":
        return f"({x} > {_attr(attrs, 'alpha', 1.0)} ? {x} : 0.0f)"
    if op == "Swish":
        return f"({x} * k_sigmoid({_attr(attrs, 'alpha', 1.0)} * {x}))"
    if op == "Gelu":
        return f"k_gelu_tanh({x})" if attrs.get("approximate", "none") == "tanh" else f"k_gelu({x})"
    raise ValueError(f"Pointwise op {op} has no C form")


def _extremum(fn: str, a: str, b: str, b_const: float | None) -> str:
    """k_max/k_min of a and b; against a constant that is not NaN, the one-instruction form (k_maxc/k_minc:
    x86 max/min return their second operand, a, when either is NaN)."""
    if b_const is not None and not math.isnan(b_const):
        return f"{fn}c({a}, {b})"
    return f"{fn}({a}, {b})"


def _expr(op: str, args: list[str], kinds: list[str], attrs: Mapping[str, Any],
          consts: list[float | None] | None = None) -> str:
    """C expression of one instruction over operand expressions `args` (this module's names and literals);
    `consts` has the value of each operand that is a program constant (else None)."""
    consts = consts if consts is not None else [None] * len(args)
    if op in _UNARY:
        return _UNARY[op].format(args[0])
    if op in _ATTR_UNARY:
        return _attr_unary(op, args[0], attrs)
    if op in _BINARY:
        return _BINARY[op].format(args[0], args[1])
    if op in _COMPARE:
        return f"({args[0]} {_COMPARE[op]} {args[1]})"
    if op in _LOGIC:
        return f"({args[0]} {_LOGIC[op]} {args[1]})"
    if op == "Not":
        return f"({args[0]} == 0)"
    if op == "Cast":
        to = int(attrs["to"])
        if to == _BOOL:
            return f"({args[0]} != 0.0f)" if kinds[0] == _F else args[0]
        return f"((float){args[0]})" if kinds[0] == _B else args[0]
    if op in ("Max", "Min"):
        fn = "k_max" if op == "Max" else "k_min"
        out = args[0]
        for a, c in zip(args[1:], consts[1:]):
            out = _extremum(fn, out, a, c)
        return out
    if op in ("Sum", "Mean"):
        out = args[0]
        for a in args[1:]:
            out = f"({out} + {a})"
        return f"({out} / {_lit(float(len(args)))})" if op == "Mean" and len(args) > 1 else out
    if op == "Clip":
        x = args[0]
        if args[1]:
            x = _extremum("k_max", x, args[1], consts[1])
        if args[2]:
            x = _extremum("k_min", x, args[2], consts[2])
        return x
    if op == "Where":
        return f"({args[0]} ? {args[1]} : {args[2]})"
    raise ValueError(f"Pointwise op {op} has no C form")


def _result_kind(op: str, kinds: list[str], attrs: Mapping[str, Any]) -> str | None:
    """The kind of an instruction's result from its operands' kinds, or None when the op's reference
    definition would refuse those kinds (or the op has no C form here). `kinds` has "" for a missing
    Clip bound."""
    if op == "Not" or op in _LOGIC:
        return _B if all(k == _B for k in kinds) else None
    if op == "Equal":
        return _B if kinds[0] == kinds[1] else None
    if op in _COMPARE:
        return _B if kinds == [_F, _F] else None
    if op == "Cast":
        to = attrs.get("to")
        return {_FLOAT: _F, _BOOL: _B}.get(to) if type(to) is int else None  # type: ignore[return-value]
    if op == "Where":
        return kinds[1] if kinds[0] == _B and kinds[1] == kinds[2] else None
    if op == "Clip":
        return _F if kinds[0] == _F else None
    if op == "Celu" and float(attrs.get("alpha", 1.0)) == 0.0:
        return None  # the reference divides by alpha
    if op in SUPPORTED_OPS:
        return _F if all(k == _F for k in kinds) else None
    return None


# ---- program analysis ---------------------------------------------------------------------------

@dataclass(frozen=True)
class CProgram:
    """What the generator and the kernel need of a parsed program: the live instructions (in order), the
    inputs read (`used`, ascending) with their kinds, every value's kind, and the inputs each live temporary
    depends on."""

    prog: PointwiseProgram
    live: tuple[int, ...]
    used: tuple[int, ...]
    in_kinds: tuple[str, ...]
    temp_kinds: tuple[str, ...]
    deps: tuple[frozenset[int], ...]
    out: int
    prelu_slopes: tuple[tuple[Ref, Ref], ...]  # (x, slope) of each live PRelu whose slope is not a constant

    @property
    def out_kind(self) -> str:
        return self.temp_kinds[self.out]


_DTYPE_KIND = {DType.FLOAT32: _F, DType.BOOL: _B}


def analyse(node: Node, prog: PointwiseProgram) -> CProgram | None:
    """The program's C form, or None when this tactic declines it (see the module docstring)."""
    if len(node.outputs) != 1 or len(prog.outputs) != 1 or prog.outputs[0].kind != "temp":
        return None
    in_kinds = []
    for v in node.inputs:
        kind = _DTYPE_KIND.get(v.type.dtype) if v is not None else None  # type: ignore[arg-type]
        if kind is None:
            return None
        in_kinds.append(kind)
    temp_kinds: list[str] = []
    deps: list[frozenset[int]] = []
    for ins in prog.instrs:
        if ins.op not in SUPPORTED_OPS:
            return None
        kinds: list[str] = []
        dep: frozenset[int] = frozenset()
        for r in ins.args:
            if r.kind == "input":
                kinds.append(in_kinds[r.index])
                dep = dep | {r.index}
            elif r.kind == "temp":
                kinds.append(temp_kinds[r.index])
                dep = dep | deps[r.index]
            elif r.kind == "const":
                kinds.append(_F)
            else:
                kinds.append("")
        kind = _result_kind(ins.op, kinds, ins.attrs)
        if kind is None:
            return None
        temp_kinds.append(kind)
        deps.append(dep)
    out = prog.outputs[0].index
    want = _DTYPE_KIND.get(node.outputs[0].type.dtype)  # type: ignore[arg-type]
    if want != temp_kinds[out] or not deps[out]:
        return None
    # live instructions: those the output depends on
    need = {out}
    for j in range(out, -1, -1):
        if j in need:
            need.update(r.index for r in prog.instrs[j].args if r.kind == "temp")
    live = tuple(sorted(need))
    if len(live) > MAX_INSTRS or sum(len(prog.instrs[j].args) for j in live) > MAX_OPERANDS:
        return None
    used = tuple(sorted(deps[out]))
    if len(used) > MAX_INPUTS:
        return None
    slopes = tuple((prog.instrs[j].args[0], prog.instrs[j].args[1]) for j in live
                   if prog.instrs[j].op == "PRelu" and prog.instrs[j].args[1].kind != "const")
    return CProgram(prog, live, used, tuple(in_kinds), tuple(temp_kinds), tuple(deps), out, slopes)


# ---- C source -----------------------------------------------------------------------------------

_MATH = ("expf", "logf", "tanhf", "erff", "expm1f", "log1pf", "sinf", "cosf")
_SIMD_DECLS = "".join(f'__attribute__((simd("notinbranch"))) float {f}(float);\n' for f in _MATH) + \
    '__attribute__((simd("notinbranch"))) float powf(float, float);\n'

_PRELUDE = r"""
#include <math.h>

#define BLK %(blk)d
#define MAXD %(maxd)d

/* NaN-propagating max/min (torch.maximum/minimum/clamp): a NaN operand gives NaN. k_maxc/k_minc take a
 * constant c that is not NaN as their second operand: one x86 max/min, which returns x when either is NaN. */
static inline float k_max(float a, float b) { return b != b ? b : (b > a ? b : a); }
static inline float k_min(float a, float b) { return b != b ? b : (b < a ? b : a); }
static inline float k_maxc(float x, float c) { return c > x ? c : x; }
static inline float k_minc(float x, float c) { return c < x ? c : x; }
static inline float k_relu(float x) { return k_maxc(x, 0.0f); }
static inline float k_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
static inline float k_softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }
static inline float k_mish(float x) { return x * tanhf(log1pf(expf(x))); }
static inline float k_hardswish(float x) { return x * k_minc(k_maxc(x + 3.0f, 0.0f), 6.0f) / 6.0f; }
static inline float k_sign(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : x); }
static inline float k_gelu(float x) { return x * 0.5f * (1.0f + erff(x * %(sqrt_half)s)); }
static inline float k_gelu_tanh(float x) {
    const float inner = %(beta)s * (x + %(kappa)s * (x * x * x));
    return 0.5f * x * (1.0f + tanhf(inner));
}
"""


def _val(ref: Ref, consts: tuple[float, ...]) -> str:
    """An operand in the loop: v<k> (input value), t<k> (temporary) or a float literal (constant)."""
    if ref.kind == "input":
        return f"v{int(ref.index):d}"
    if ref.kind == "temp":
        return f"t{int(ref.index):d}"
    if ref.kind == "const":
        return _lit(consts[ref.index])
    return ""


CALL_OPS = frozenset({"Sigmoid", "Tanh", "Exp", "Log", "Erf", "Softplus", "Mish", "Sin", "Cos", "Pow", "Elu", "Selu",
                      "Celu", "Swish", "Gelu"})
"""Ops whose C form calls libm: each runs in a loop of its own over the block (see `_segments`)."""
MAX_BUFFERS = 16
"""Most block buffers of temporaries passed between segments (else the program runs as one loop)."""

Segment = tuple[list[int], dict[Ref, int], dict[int, int]]


def _segments(cp: CProgram) -> tuple[list[Segment], list[str]]:
    """The live instructions as loops over a block: each instruction whose C form calls libm alone, runs of the
    others together. A call in a long loop body spills every live vector around it and serialises the
    iterations (measured: a fused SiLU chain 26% faster split at its exp), a loop of only the call keeps
    several in flight; in scalar-libm mode it also lets the other loops vectorise. Temporaries read by a later
    loop go through block buffers (reused once dead). Returns ([(instructions, loads: input/temp ref ->
    buffer (-1 for an input), stores: temp -> buffer)], buffer kinds); one loop when more than MAX_BUFFERS
    buffers would be needed."""
    prog = cp.prog
    groups: list[list[int]] = []
    for j in cp.live:
        call = prog.instrs[j].op in CALL_OPS
        if groups and not call and prog.instrs[groups[-1][-1]].op not in CALL_OPS:
            groups[-1].append(j)
        else:
            groups.append([j])
    seg_of = {j: g for g, js in enumerate(groups) for j in js}
    last_use: dict[int, int] = {}
    for g, js in enumerate(groups):
        for j in js:
            for r in prog.instrs[j].args:
                if r.kind == "temp":
                    last_use[r.index] = g
    buffers: list[str] = []
    free: dict[str, list[int]] = {_F: [], _B: []}
    buf_of: dict[int, int] = {}
    release: dict[int, list[int]] = {}
    segs: list[Segment] = []
    for g, js in enumerate(groups):
        loads: dict[Ref, int] = {}
        stores: dict[int, int] = {}
        for j in js:
            for r in prog.instrs[j].args:
                if r.kind == "input":
                    loads[r] = -1
                elif r.kind == "temp" and seg_of[r.index] != g:
                    loads[r] = buf_of[r.index]
            if last_use.get(j, g) > g:  # read by a later loop: through a buffer
                kind = cp.temp_kinds[j]
                if free[kind]:
                    b = free[kind].pop()
                else:
                    b = len(buffers)
                    buffers.append(kind)
                buf_of[j] = stores[j] = b
                release.setdefault(last_use[j], []).append(j)
        for j in release.pop(g, []):  # dead after this loop: its buffer serves later loops
            free[cp.temp_kinds[j]].append(buf_of[j])
        segs.append((js, loads, stores))
    if len(buffers) > MAX_BUFFERS:
        used = {Ref("input", k): -1 for k in cp.used}
        return [(list(cp.live), used, {})], []
    return segs, buffers


def generate_source(cp: CProgram, simd_math: bool) -> str:
    """The C source of `kiln_pointwise` for an analysed program (see the module docstring for its form).

    Signature: ``void kiln_pointwise(const void *const *in, void *out, const long *shape, const long *st,
    long nd, long nthreads)``: `in` the used inputs' data pointers (ascending input index), `shape` the nd
    merged dims (outermost first), `st` one row of nd element strides per used input, then the output's."""
    prog, used = cp.prog, cp.used
    nops = len(used) + 1
    lines = ["/* generated by kiln.backends.cpu.pointwise_c */"]
    if simd_math:
        lines.append(_SIMD_DECLS)
    lines.append(_PRELUDE % {"blk": BLK, "maxd": MAX_DIMS, "sqrt_half": _lit(math.sqrt(0.5)),
                             "beta": _lit(math.sqrt(2.0 / math.pi)), "kappa": _lit(0.044715)})
    o = nops - 1  # the output's operand index
    lines += [
        "void kiln_pointwise(const void *const *in, void *out, const long *shape, const long *st, long nd,",
        "                    long nthreads) {",
        "    const long inner = shape[nd - 1];",
        "    long rows = 1;",
        "    for (long d = 0; d < nd - 1; d++) rows *= shape[d];",
        "    const long nb = (inner + BLK - 1) / BLK;",
        "    const long G = inner >= BLK ? 1 : BLK / inner;",
        "    const long groups = (rows + G - 1) / G;",
        "    const long work = groups * nb;",
        "    #pragma omp parallel for schedule(static) num_threads((int)nthreads) if(nthreads > 1)",
        "    for (long w = 0; w < work; w++) {",
        "        const long j0 = (w % nb) * BLK, r0 = (w / nb) * G;",
        "        const long len = inner - j0 < BLK ? inner - j0 : BLK;",
        "        const long r1 = r0 + G < rows ? r0 + G : rows;",
        f"        long idx[MAXD], off[{nops:d}];",
        f"        for (int k = 0; k < {nops:d}; k++) off[k] = 0;",
        "        long r = r0;",
        "        for (long d = nd - 2; d >= 0; d--) {",
        "            idx[d] = r % shape[d];",
        "            r /= shape[d];",
        f"            for (int k = 0; k < {nops:d}; k++) off[k] += idx[d] * st[k * nd + d];",
        "        }",
    ]
    for p, k in enumerate(used):
        ctype = "float" if cp.in_kinds[k] == _F else "int"
        lines.append(f"        {ctype} b{p:d}[BLK];")
        lines.append(f"        const long s{p:d} = st[{p:d} * nd + nd - 1];")
    out_ctype = "float" if cp.out_kind == _F else "unsigned char"
    segments, buffers = _segments(cp)
    for b, kind in enumerate(buffers):  # temporaries passed from one loop to a later one
        lines.append(f"        {'float' if kind == _F else 'int'} B{b:d}[BLK];")
    lines += [f"        {out_ctype} ob[BLK];", f"        const long so = st[{o:d} * nd + nd - 1];",
              "        for (long row = r0; row < r1; row++) {"]
    for p, k in enumerate(used):
        base = f"off[{p:d}] + j0 * s{p:d}"
        if cp.in_kinds[k] == _F:
            lines += [
                f"            const float *p{p:d} = (const float *)in[{p:d}] + {base};",
                f"            const float *restrict x{p:d} = p{p:d};",
                f"            if (s{p:d} == 0) {{ const float c = *p{p:d}; "
                f"for (long j = 0; j < len; j++) b{p:d}[j] = c; x{p:d} = b{p:d}; }}",
                f"            else if (s{p:d} != 1) {{ for (long j = 0; j < len; j++) b{p:d}[j] = p{p:d}[j * s{p:d}]; "
                f"x{p:d} = b{p:d}; }}",
            ]
        else:
            lines += [
                f"            const unsigned char *p{p:d} = (const unsigned char *)in[{p:d}] + {base};",
                f"            for (long j = 0; j < len; j++) b{p:d}[j] = p{p:d}[j * s{p:d}] != 0;",
                f"            const int *restrict x{p:d} = b{p:d};",
            ]
    lines += [
        f"            {out_ctype} *po = ({out_ctype} *)out + off[{o:d}] + j0 * so;",
        f"            {out_ctype} *restrict y = so == 1 ? po : ob;",
    ]
    pos = {k: p for p, k in enumerate(used)}
    for n_seg, (instrs, loads, stores) in enumerate(segments):
        lines.append("            for (long j = 0; j < len; j++) {")
        for r in sorted(loads, key=lambda r: (r.kind, r.index)):
            ctype = "float" if (cp.in_kinds[r.index] if r.kind == "input" else cp.temp_kinds[r.index]) == _F else "int"
            src = f"x{pos[r.index]:d}[j]" if r.kind == "input" else f"B{loads[r]:d}[j]"
            lines.append(f"                const {ctype} {_val(r, prog.consts)} = {src};")
        for j in instrs:
            ins = prog.instrs[j]
            args = [_val(r, prog.consts) for r in ins.args]
            kinds = [cp.in_kinds[r.index] if r.kind == "input" else cp.temp_kinds[r.index] if r.kind == "temp"
                     else _F if r.kind == "const" else "" for r in ins.args]
            ctype = "float" if cp.temp_kinds[j] == _F else "int"
            cvals = [prog.consts[r.index] if r.kind == "const" else None for r in ins.args]
            lines.append(f"                const {ctype} t{j:d} = {_expr(ins.op, args, kinds, ins.attrs, cvals)};")
        for j, b in sorted(stores.items()):
            lines.append(f"                B{b:d}[j] = t{j:d};")
        if n_seg == len(segments) - 1:
            store = f"t{cp.out:d}" if cp.out_kind == _F else f"(unsigned char)(t{cp.out:d} != 0)"
            lines.append(f"                y[j] = {store};")
        lines.append("            }")
    lines += [
        "            if (so != 1) for (long j = 0; j < len; j++) po[j * so] = ob[j];",
        "            for (long d = nd - 2; d >= 0; d--) {",
        f"                idx[d]++;",
        f"                for (int k = 0; k < {nops:d}; k++) off[k] += st[k * nd + d];",
        "                if (idx[d] < shape[d]) break;",
        f"                for (int k = 0; k < {nops:d}; k++) off[k] -= st[k * nd + d] * shape[d];",
        "                idx[d] = 0;",
        "            }",
        "        }",
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"
