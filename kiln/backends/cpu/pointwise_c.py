"""Pointwise programs as one generated C function on the CPU (tactic ``cpu.pointwise_c``): one memory pass.

``cpu.pointwise`` runs one torch call per instruction, so a program of n instructions reads and writes
its activation n times. Here the node's program, parsed and validated by kiln.ops.pointwise_program,
becomes one C function that makes a single pass over the output, compiled once with the machine's C
compiler (kiln.backends.cpu.native: per-user cache, ``KILN_CC``) and called through ctypes on the tensors'
memory. Per block of the output (``BLK`` elements, in L1), instructions run in registers, a run of plain
arithmetic in one vectorised loop; an instruction that calls libm (exp, tanh, erf, ...) gets a loop of its
own over the block, its operands and result passing through L1 block buffers (the codegen's `_segments`: a call inside a
long loop body spills every live vector around it and serialises iterations).

Source (kiln/backends/cpu/pointwise_codegen.py). The C text is that module's fixed code plus integer-numbered names (``v<k>`` input values,
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
from typing import Any, Callable

import torch

from kiln.backends.cpu import native
from kiln.backends.cpu.common import CpuTactic
from kiln.backends.cpu.fallback import ReferenceFallback
from kiln.backends.cpu.features import cpu_flags
from kiln.backends.cpu.pointwise_codegen import _B, _F, _SIMD_DECLS, MAX_DIMS, CProgram, analyse, generate_source
from kiln.backends.kernel import Kernel
from kiln.backends.tactic import Built, register_tactic
from kiln.backends.strides import merge_dims
from kiln.errors import KilnError, PlanFormatError, UnsupportedOpError
from kiln.ir.graph import Node
from kiln.ops.pointwise_program import PointwiseProgram, Ref

Tensor = torch.Tensor

PARALLEL_MIN = 1 << 15
"""Outputs with fewer elements run on one thread (an OpenMP fork costs more than it saves); torch's own
grain size for elementwise ops, so both tactics start using threads at the same size."""

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
    flags = cpu_flags()
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

    def bind(self, xs: Any, out: Any) -> Callable[[], Tensor] | None:
        """The call `self(*xs, out=out)` that just ran, repeated on these very tensors (Kernel.bind): its plan and
        pointers prebuilt; None where that call did not run the program straight into `out`."""
        if not isinstance(out, Tensor) or len(xs) != self.n_inputs:
            return None
        ins = [xs[k] for k in self.used]
        if not all(isinstance(x, Tensor) for x in ins):
            return None
        plan = self.plans.get((tuple([(x.shape, x.stride(), x.dtype, x.is_cpu) for x in ins]),
                               (out.shape, out.stride(), out.is_cpu)))
        if plan is None or out.dtype is not self.out_dtype:
            return None
        ptrs = [x.data_ptr() for x in ins]
        dst = out.data_ptr()
        o_lo, o_hi = dst, dst + plan.out_span[1]
        if any(p + lo < o_hi and o_lo < p + hi for p, (lo, hi) in zip(ptrs, plan.spans)):
            return None  # an input overlaps the destination: the call went through a temporary
        fn, args = self.fn, (self.ptrs_t(*ptrs), C.c_void_p(dst), plan.dims, plan.st, plan.nd)
        big = plan.numel >= PARALLEL_MIN
        kept = (ins, out)

        def bound() -> Tensor:
            if plan.numel:
                fn(*args, torch.get_num_threads() if big else 1)
            return kept[1]
        return bound

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
        return Kernel(k, fallback=k.fallback, out_format="like_input", bind=k.bind)


register_tactic(CpuPointwiseCTactic())
