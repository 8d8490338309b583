"""Pointwise programs as one generated C function on the CPU (tactic ``cpu.pointwise_c``): one memory pass.

``cpu.pointwise`` runs one torch call per instruction, so a program of n instructions reads and writes
its activation n times. Here the node's program, parsed and validated by kiln.ops.pointwise_program,
becomes one C function that makes a single pass over the output, compiled once with the machine's C
compiler (kiln.backends.cpu.native: per-user cache, ``KILN_CC``) and called through ctypes on the tensors'
memory. Per block of the output (``BLK`` elements, in L1), instructions run in registers, a run of plain
arithmetic in one vectorised loop; an instruction that calls libm (exp, tanh, erf, ...) gets a loop of its
own over the block, its operands and result passing through L1 block buffers (`_segments`: a call inside a
long loop body spills every live vector around it and serialises iterations).

Source. The C text is this module's fixed code plus integer-numbered names (``v<k>`` input values,
``t<k>`` temporaries, ``x<k>``/``b<k>`` input pointers and buffers), C expressions from the closed op
tables (``_UNARY``, ``_BINARY``, ``_COMPARE``, ``_LOGIC`` and ``_expr``'s fixed cases) and float literals
written by ``_lit`` (a Python ``float`` rounded to float32, as the reference's constant tensors are, and
printed with ``float.hex``; NaN and infinities as ``NAN``/``INFINITY``): constants and validated float
attributes. No string of the node or the plan reaches the source. Each distinct program is compiled once
per machine (about 0.3-0.5 s with gcc -O3) into the per-user cache; identical programs share a library.

Types. Values are float32 (``float``) or bool (``int`` 0/1 inside the loop, one byte in memory). Every
operand's kind is checked statically against what the op's reference definition accepts; a program the
reference would reject (a bool added, a float in And), a Cast to anything but float32/bool, several
outputs, or a bool/float output other than the node's declared type is declined, and so is anything
else outside the table, so ``cpu.pointwise`` or the reference runs it.

Iteration. Per call (cached per input shapes/strides/dtypes and destination), the output's shape is the
broadcast of the inputs the result depends on; the iteration follows the destination's memory order
(a new output takes the layout of a full-size input, e.g. channels-last), size-1 dims are dropped and
neighbouring dims merged where every operand walks them contiguously, so equal shapes become one dim and
per-channel / squeeze-and-excite operands two or three. Each operand gets a stride vector (0 along its
broadcast axes). The C loop walks blocks of up to ``BLK`` elements of the innermost dim: an operand
with inner stride 1 is read in place, a broadcast one (stride 0) is splatted and any other gathered into
an L1 buffer, so the instruction loops always read unit-stride arrays and are vectorised (AVX2 where the
CPU has it). Blocks (grouped rows when the inner dim is short) are split over OpenMP threads
(``torch.get_num_threads()``, passed explicitly; one thread under ``PARALLEL_MIN`` elements, as torch). The
library shares torch's libgomp (its soname is already loaded), as the Winograd transforms do.

Accuracy. Compiled without -ffast-math: IEEE float32 arithmetic (``-ffp-contract=off``: no FMA
contraction, every op rounds like torch's), NaN-propagating Max/Min/Clip/Relu as torch's. Only
``-fno-math-errno`` and ``-fno-trapping-math`` are added: they change whether errno / FP exception flags
are set, never a value, and let sqrt/floor/ceil/rint vectorise. Transcendentals (exp, log, tanh, erf,
expm1, log1p, sin, cos, pow) are glibc's: where its vector math library (libmvec, glibc >= 2.35) links,
the calls are declared ``simd`` and vectorise through it (measured within 4 ulp of float64 over wide
ranges, like torch's own vectorised kernels: 1-4 ulp); otherwise they are the scalar libm calls (correctly
rounded or nearly, but 10-50x slower for tanh/erf/expm1/log1p). Tests compare with the reference at rtol
1e-5 / atol 1e-6.

Safety. Every call checks that each input the program reads is a strided CPU tensor of its declared dtype
(float32 / bool) and the destination the output's shape and dtype; strides are read from the tensors
themselves, so every address the loop forms lies inside them. Anything else (another dtype or device, a
PRelu slope the reference aligns specially, shapes that do not broadcast) runs the op's reference
implementation (``Kernel.fallback``), a destination of the wrong shape or dtype is a KilnError. A
destination that overlaps an input is computed into a temporary first.

Destinations. ``writes_out = 1``, ``strided_out``: the runtime may hand the kernel its arena slot
(channels-last for 4-D outputs) or a channel slice of an elided Concat's buffer; the loop stores through
the destination's own strides. As the loader refuses such kernels on outputs whose type inference cannot
confirm, the tactic declines those layers (`output_proven`) and cpu.pointwise runs them.
"""
from __future__ import annotations

import ctypes as C
import functools
import math
import platform
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from kiln.backends.cpu import native
from kiln.backends.cpu.common import CpuTactic
from kiln.backends.cpu.dnnl import ReferenceFallback
from kiln.backends.kernel import Kernel
from kiln.backends.tactic import Built, register_tactic
from kiln.backends.strides import merge_dims
from kiln.errors import KilnError, PlanFormatError, UnsupportedOpError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node
from kiln.ops.pointwise_program import PointwiseProgram, Ref

Tensor = torch.Tensor

BLK = 256
"""Elements of the inner dim per block (every operand's block buffer is BLK values on the stack)."""
PARALLEL_MIN = 1 << 15
"""Outputs with fewer elements run on one thread (an OpenMP fork costs more than it saves); torch's own
grain size for elementwise ops, so both tactics start using threads at the same size."""
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


# ---- compiler flags and the per-process probe ------------------------------------------------------

_BASE_FLAGS = ("-O3", "-std=c99", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
               "-ffp-contract=off", "-Wl,-z,defs")
_PROBE = r"""
#include <math.h>
float kiln_probe(const float *x, long n) {
    float s = 0.0f;
    for (long j = 0; j < n; j++)
        s += expf(x[j]) + logf(x[j]) + tanhf(x[j]) + erff(x[j]) + expm1f(x[j]) + log1pf(x[j]) + sinf(x[j])
             + cosf(x[j]) + powf(x[j], x[j]);
    return s;
}
"""
_STATE: dict[str, Any] = {}
_STATE_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def isa_flags() -> tuple[str, ...]:
    """-mavx2 -mfma on an x86-64 CPU that has both (AMD Zen, Intel Haswell and later), else nothing: the
    library targets the portable baseline plus that one widely shared level, never -march=native."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ()
    flags = set(native._cpu_flags().split())
    if not flags:
        cap = torch.backends.cpu.get_cpu_capability()
        return ("-mavx2", "-mfma") if cap in ("AVX2", "AVX512") else ()
    return ("-mavx2", "-mfma") if {"avx2", "fma"} <= flags else ()


def _flags(simd_math: bool) -> list[str]:
    return [*_BASE_FLAGS, *isa_flags(), *(["-lmvec"] if simd_math else [])]


def math_mode() -> str | None:
    """How generated programs reach libm here: "simd" (glibc's vector math library links: calls vectorise),
    "scalar" (plain libm), or None when no C compiler works (the tactic then declines every layer; `error()`
    says why). Probed once per process (the probe libraries are cached on disk like any other)."""
    with _STATE_LOCK:
        if "mode" not in _STATE:
            mode, err = None, ""
            for simd in (True, False):
                try:
                    native.compile_source("pointwise_probe", (_SIMD_DECLS if simd else "") + _PROBE, _flags(simd))
                    mode = "simd" if simd else "scalar"
                    break
                except (OSError, ValueError) as e:
                    err = str(e)
            _STATE["mode"], _STATE["error"] = mode, "" if mode else err
        return _STATE["mode"]


def error() -> str:
    """Why `math_mode()` is None ('' when it is not)."""
    return str(_STATE.get("error", ""))


_FN = Callable[..., None]


def compile_program(cp: CProgram) -> tuple[_FN, str]:
    """(the compiled `kiln_pointwise` of an analysed program, its source); OSError when it cannot be built."""
    mode = math_mode()
    if mode is None:
        raise OSError(f"no working C compiler ({error()})")
    src = generate_source(cp, mode == "simd")
    lib = native.compile_source("pointwise", src, _flags(mode == "simd"))
    fn = lib.kiln_pointwise
    if not getattr(fn, "_kiln_typed", False):
        fn.argtypes = [C.POINTER(C.c_void_p), C.c_void_p, C.POINTER(C.c_long), C.POINTER(C.c_long), C.c_long,
                       C.c_long]
        fn.restype = None
        fn._kiln_typed = True
    return fn, src


# ---- the kernel ---------------------------------------------------------------------------------

_TORCH = {_F: torch.float32, _B: torch.bool}


@dataclass
class _Plan:
    """One call pattern: iteration space, strides and the output's layout."""

    shape: tuple[int, ...]
    strides: tuple[int, ...] | None  # a new output's strides (None: the caller gives out=)
    numel: int
    nd: int
    dims: Any  # ctypes long[nd]
    st: Any  # ctypes long[nops * nd]
    spans: tuple[tuple[int, int], ...]  # (first byte offset, one past the last) of each used input, from data_ptr
    out_span: tuple[int, int]  # the same of a given destination


def _span(t: Tensor) -> tuple[int, int]:
    """Byte range [lo, hi) of t's elements relative to its data pointer."""
    if t.numel() == 0:
        return 0, 0
    hi = sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1
    return 0, hi * t.element_size()


def _broadcast_strides(x: Tensor, shape: tuple[int, ...]) -> list[int]:
    """x's element strides over `shape` (x broadcasts to it): 0 along broadcast axes."""
    pad = len(shape) - x.dim()
    out = [0] * len(shape)
    for d in range(x.dim()):
        out[pad + d] = int(x.stride(d)) if int(x.shape[d]) != 1 else 0
    return out


class _Decline(ValueError):
    """This call pattern runs the reference instead (ReferenceFallback.attempt records the reason)."""


class PointwiseKernel:
    """Runs one compiled program: checks and plans each call pattern once, then one native call per run."""

    def __init__(self, node: Node, cp: CProgram, fn: _FN, source: str) -> None:
        self.name = node.name
        self.cp = cp
        self.fn = fn
        self.source = source
        self.n_inputs = cp.prog.n_inputs
        self.used = cp.used
        self.want = tuple(_TORCH[cp.in_kinds[k]] for k in cp.used)
        self.out_dtype = _TORCH[cp.out_kind]
        self.ptrs_t = C.c_void_p * len(cp.used)
        self.plans: dict[Any, _Plan] = {}
        self.fallback = ReferenceFallback(node)
        self.lock = threading.Lock()

    def __call__(self, *xs: Any, out: Tensor | tuple[Tensor, ...] | None = None) -> Tensor:
        if isinstance(out, tuple):
            if len(out) != 1:
                raise KilnError(f"'{self.name}' writes one output, got {len(out)} destinations")
            out = out[0]
        if out is not None and (not isinstance(out, Tensor) or out.dtype is not self.out_dtype):
            raise KilnError(f"'{self.name}' writes a {str(self.out_dtype).replace('torch.', '')} output, got a "
                            f"destination of type {getattr(out, 'dtype', type(out).__name__)}")
        try:
            if len(xs) != self.n_inputs:
                raise _Decline(f"{len(xs)} inputs, the program reads {self.n_inputs}")
            ins = [xs[k] for k in self.used]
            key = (tuple([(x.shape, x.stride(), x.dtype, x.is_cpu) for x in ins]),
                   None if out is None else (out.shape, out.stride(), out.is_cpu))
        except (AttributeError, RuntimeError, TypeError, _Decline) as e:  # not strided tensors
            key = ("declined", repr(e)[:200])
            if key not in self.fallback.declined:
                self.fallback.declined[key] = f"inputs the compiled program does not take ({e})"
            return self.fallback(key, xs, out)
        plan = self.plans.get(key)
        if plan is None:
            plan = self.fallback.attempt(key, lambda: self._plan(ins, out), "call")
            if plan is None:
                return self.fallback(key, xs, out)
            with self.lock:
                self.plans[key] = plan
        if out is None:
            assert plan.strides is not None
            out = torch.empty_strided(plan.shape, plan.strides, dtype=self.out_dtype)
        elif out.shape != plan.shape:  # never: the shape is in the key
            raise KilnError(f"'{self.name}' destination shape {list(out.shape)}, the output is {list(plan.shape)}")
        if plan.numel == 0:
            return out
        ptrs = [x.data_ptr() for x in ins]
        dst = out.data_ptr()
        if plan.strides is None:  # a given destination: no input may overlap it (else compute, then copy)
            o_lo, o_hi = dst, dst + plan.out_span[1]
            if any(p + lo < o_hi and o_lo < p + hi for p, (lo, hi) in zip(ptrs, plan.spans)):
                tmp = torch.empty_like(out, memory_format=torch.contiguous_format)
                out.copy_(self(*xs, out=tmp))
                return out
        threads = torch.get_num_threads() if plan.numel >= PARALLEL_MIN else 1
        self.fn(self.ptrs_t(*ptrs), dst, plan.dims, plan.st, plan.nd, threads)
        return out

    def _plan(self, ins: list[Tensor], out: Tensor | None) -> _Plan:
        """The iteration space of one call pattern; _Decline (a ValueError) sends it to the reference."""
        for x, want in zip(ins, self.want):
            if x.dtype is not want or x.device.type != "cpu" or x.layout is not torch.strided:
                raise _Decline(f"an input of type {x.dtype} on {x.device} ({x.layout}); the program takes "
                               f"{want} on the cpu")
        if out is not None and (out.device.type != "cpu" or out.layout is not torch.strided):
            raise KilnError(f"'{self.name}' writes a strided cpu tensor, got {out.device} {out.layout}")
        cp = self.cp
        pos = {k: p for p, k in enumerate(self.used)}
        try:
            shape = tuple(int(d) for d in torch.broadcast_shapes(*(x.shape for x in ins)))
            for xr, sr in cp.prelu_slopes:  # the reference aligns a 1-D slope with x's only dim of its length
                sshape = self._shape(sr, ins, pos)
                xshape = self._shape(xr, ins, pos)
                n = math.prod(sshape)
                if len(sshape) == 1 and len(xshape) > 1 and n not in (1, xshape[-1]) and list(xshape).count(n) == 1:
                    raise _Decline("a PRelu slope the reference aligns with a dim of its own")
        except RuntimeError as e:  # shapes that do not broadcast: the reference says so
            raise _Decline(f"shapes {[list(x.shape) for x in ins]}: {e}") from None
        if out is not None and tuple(out.shape) != shape:
            raise KilnError(f"'{self.name}' would write an output of shape {list(shape)} into a destination of "
                            f"shape {list(out.shape)} (the plan's shapes disagree with this run)")
        if out is not None and any(st == 0 and n > 1 for n, st in zip(out.shape, out.stride())):
            raise KilnError(f"'{self.name}' writes a destination whose elements are distinct, got strides "
                            f"{list(out.stride())} for shape {list(out.shape)}")
        numel = math.prod(shape)
        if out is None:
            full = next((x for x in ins if tuple(x.shape) == shape), None)
            ref = (torch.empty_like(full, dtype=self.out_dtype, device="meta") if full is not None
                   else torch.empty(shape, dtype=self.out_dtype, device="meta"))
            out_strides = tuple(int(s) for s in ref.stride())
            new_strides: tuple[int, ...] | None = out_strides
        else:
            out_strides = tuple(int(s) for s in out.stride())
            new_strides = None
        # iteration order: the output's memory order (outermost = largest stride; ties keep dim order)
        order = sorted(range(len(shape)), key=lambda d: (-out_strides[d], d)) if shape else []
        sizes = [shape[d] for d in order]
        strides = [[st[d] for d in order] for st in [*(_broadcast_strides(x, shape) for x in ins), list(out_strides)]]
        sizes, strides = merge_dims(sizes, strides)
        if len(sizes) > MAX_DIMS:
            raise _Decline(f"{len(sizes)} dims after merging, at most {MAX_DIMS} are compiled")
        nd = len(sizes)
        dims = (C.c_long * nd)(*sizes)
        st = (C.c_long * (nd * len(strides)))(*[s for row in strides for s in row])
        return _Plan(shape, new_strides, numel, nd, dims, st, tuple(_span(x) for x in ins),
                     _span(out) if out is not None else (0, 0))

    def _shape(self, ref: Ref, ins: list[Tensor], pos: dict[int, int]) -> tuple[int, ...]:
        """The shape of an operand at this call: the broadcast of the inputs it depends on."""
        if ref.kind == "input":
            return tuple(ins[pos[ref.index]].shape)
        if ref.kind == "temp":
            deps = self.cp.deps[ref.index]
            return tuple(torch.broadcast_shapes(*(ins[pos[k]].shape for k in deps))) if deps else ()
        return ()


def output_proven(node: Node) -> bool:
    """Whether the node's output type is what Kiln's inference derives from its inputs' types. A tactic that
    writes into given destinations (writes_out) may only take such layers: the plan loader refuses a kernel
    writing into memory laid out from a type it cannot confirm (kiln.runtime.engine.check_plan), so on a
    layer whose declared type says more than inference (an ONNX value_info shape) cpu.pointwise runs."""
    from kiln.ops.infer import infer_node, merge_types
    inferred = infer_node(node)[0]
    return merge_types(inferred, node.outputs[0].type) == inferred


def _parse(node: Node) -> PointwiseProgram | None:
    try:
        return PointwiseProgram.parse(node)
    except UnsupportedOpError:
        return None


class CpuPointwiseCTactic(CpuTactic):
    """kiln Pointwise programs as one generated, compiled C loop (one memory pass)."""

    id = "cpu.pointwise_c"
    priority = 20  # above cpu.pointwise (10): taken at opt level 0 wherever it applies
    ops = (("kiln", "Pointwise"),)
    writes_out = 1
    strided_out = True

    def accepts(self, node: Node) -> bool:
        prog = _parse(node)
        return (prog is not None and analyse(node, prog) is not None and output_proven(node)
                and math_mode() is not None)

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        prog = PointwiseProgram.parse(node)
        cp = analyse(node, prog)
        if cp is None:
            raise UnsupportedOpError(f"node '{node.name}': Pointwise program has ops or types without a C form")
        if math_mode() is None:
            raise PlanFormatError(f"layer '{node.name}' uses tactic {self.id}, which needs a C compiler to build "
                                  f"its kernel here ({error()}); rebuild the plan without it")
        try:
            fn, src = compile_program(cp)
        except OSError as e:
            raise KilnError(f"layer '{node.name}': its Pointwise program did not compile ({e})") from None
        k = PointwiseKernel(node, cp, fn, src)
        return Kernel(k, fallback=k.fallback)


register_tactic(CpuPointwiseCTactic())
