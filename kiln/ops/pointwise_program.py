"""The program of a kiln ``Pointwise`` node, parsed and validated once: the only form anything runs.

A Pointwise node carries its program as plain attributes (``program``: a list of ``{"op", "args",
"attrs"}``; ``consts``: numbers; ``outputs``: references). Plans are untrusted files, so nothing reads
those attributes directly: ``PointwiseProgram.parse(node)`` checks every part of them and returns
frozen objects in which every reference is a kind from a closed set plus an ``int`` index, every op a
name from the closed vocabulary below, every constant a Python ``float`` and every instruction's
attributes the values ``kiln.ops.attrs.validate_attrs`` declared (plus the choices the backends need).
The reference op, the CPU code generator and the Triton code generator all work from this object;
none of them ever sees a string from the plan.

What parse enforces (any violation is an UnsupportedOpError naming the node and the instruction):

* ``program`` is a non-empty list of at most ``MAX_INSTRS`` instructions, each a dict with only the
  keys ``op``, ``args``, ``attrs``;
* ``op`` is in ``OPS``; the number of operands fits it (``ARITY``);
* every operand is a string matching ``[itc][0-9]{1,6}`` exactly (input, temporary, constant), or ""
  where the op has an optional input (Clip's bounds); inputs < the node's inputs, temporaries < the
  instruction's own index (single assignment, no forward references), constants < len(consts); Clip's
  bounds are constants;
* ``consts`` are real numbers (int or float; not bool, not strings or containers). NaN and infinities
  are allowed: they are values an ONNX Clip bound may legitimately hold, and no backend ever turns a
  constant into source text (the CPU binds it as an object, Triton passes it as a kernel argument);
* ``outputs`` (default: the last temporary) are input/temporary/constant references (``from_attrs``
  can also require one per output of the node: ``n_outputs``);
* each instruction's ``attrs`` pass ``validate_attrs`` for that op, plus Gelu ``approximate`` in
  {"none", "tanh"}, Cast ``to`` a known element type, and alpha/beta/gamma being floats.
"""
from __future__ import annotations

import numbers
import re
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Literal, Mapping

from kiln.errors import KilnError, UnsupportedOpError
from kiln.ir.dtype import DType
from kiln.ops.attrs import validate_attrs

UNARY = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Exp", "Log", "Erf", "Sqrt", "Neg", "Abs", "Reciprocal",
    "Floor", "Ceil", "Round", "Elu", "Selu", "Celu", "Softplus", "Softsign", "HardSigmoid", "HardSwish",
    "Mish", "Gelu", "Sin", "Cos", "Sign", "Not", "ThresholdedRelu", "Cast", "Swish",
})
"""Ops of one operand."""
BINARY = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "PRelu", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual",
    "And", "Or", "Xor",
})
"""Ops of exactly two operands."""
VARIADIC = frozenset({"Max", "Min", "Sum", "Mean"})
"""Ops of one or more operands."""
OPS = UNARY | BINARY | VARIADIC | {"Where", "Clip"}
"""The closed vocabulary of Pointwise instructions (what kiln.passes.pointwise fuses)."""
BOOL_RESULT = frozenset({"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Not"})
"""Ops whose result is bool."""
INT_INPUTS = (DType.INT8, DType.INT16, DType.INT32, DType.INT64, DType.UINT8)
"""Integer element types a program may read on CUDA, through Casts to INT_CAST_TARGETS only."""
INT_CAST_TARGETS = (DType.BOOL, DType.FLOAT32)
"""What such a Cast may make of an integer: x != 0, or its nearest float32 (both exact from a float32 load)."""

MAX_INSTRS = 4096
MAX_ARGS = 1024  # operands of one (variadic) instruction
MAX_OPERANDS = 65536  # operands of the whole program
MAX_CONSTS = 2 * MAX_INSTRS
MAX_OUTPUTS = 256
PROGRAM_OPSET = 21
"""Instructions have the semantics of this ai.onnx opset (or of the op's first one, if later: Swish)."""

RefKind = Literal["input", "temp", "const", "none"]
_KINDS: tuple[str, ...] = ("input", "temp", "const", "none")
_LETTER = {"i": "input", "t": "temp", "c": "const"}
_PLURAL = {"input": "inputs", "const": "constants"}
_REF = re.compile(r"[itc][0-9]{1,6}")
_MAX_INDEX = 10**6
_INSTR_KEYS = frozenset({"op", "args", "attrs"})
_FLOAT_ATTRS = ("alpha", "beta", "gamma")
_DICTS = (dict, MappingProxyType)


@dataclass(frozen=True)
class Ref:
    """An operand: the `index`-th input, temporary (instruction result) or constant; or a missing optional
    input ("none", index 0)."""

    kind: RefKind
    index: int = 0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS or type(self.index) is not int or not 0 <= self.index < _MAX_INDEX:
            raise ValueError(f"invalid Pointwise reference ({self.kind!r}, {self.index!r})")
        if self.kind == "none" and self.index != 0:
            raise ValueError("a missing operand has index 0")

    def __str__(self) -> str:
        """The plan's spelling ("i0", "t3", "c1", "")."""
        return "" if self.kind == "none" else f"{self.kind[0]}{self.index:d}"


NONE = Ref("none")


@dataclass(frozen=True)
class Instr:
    """One instruction: an op of OPS, its operands, its validated attributes (read-only)."""

    op: str
    args: tuple[Ref, ...]
    attrs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    def __post_init__(self) -> None:
        if self.op not in OPS or not all(isinstance(a, Ref) for a in self.args):
            raise ValueError(f"invalid Pointwise instruction {self.op!r}")


@dataclass(frozen=True)
class PointwiseProgram:
    """A validated Pointwise program (see the module docstring for what `parse` guarantees)."""

    n_inputs: int
    instrs: tuple[Instr, ...]
    consts: tuple[float, ...]
    outputs: tuple[Ref, ...]

    def __post_init__(self) -> None:
        if (type(self.n_inputs) is not int or not all(isinstance(i, Instr) for i in self.instrs)
                or not all(type(c) is float for c in self.consts) or not all(isinstance(r, Ref) for r in self.outputs)):
            raise ValueError("invalid Pointwise program")

    @staticmethod
    def parse(node: Any) -> "PointwiseProgram":
        """The node's program, validated; raises UnsupportedOpError with one line naming the node."""
        name = _label(getattr(node, "name", ""))
        if any(v is None for v in node.inputs):
            raise UnsupportedOpError(f"node '{name}': Pointwise inputs must all be present")
        attrs = node.attrs
        return PointwiseProgram.from_attrs(attrs.get("program"), attrs.get("consts"), attrs.get("outputs"),
                                           len(node.inputs), name)

    @staticmethod
    def from_attrs(program: Any, consts: Any, outputs: Any, n_inputs: int, where: str = "",
                   n_outputs: int | None = None) -> "PointwiseProgram":
        """A program from the raw attribute values and the node's number of inputs (and outputs, if given)."""
        return _Parser(_label(where)).parse(program, consts, outputs, n_inputs, n_outputs)

    @property
    def n_temps(self) -> int:
        return len(self.instrs)


def program_opset(op: str) -> int:
    """The ai.onnx opset an instruction is validated and evaluated at."""
    return _first_opset(op)


@lru_cache(maxsize=None)
def _first_opset(op: str) -> int:
    from kiln.ops.registry import lookup
    return max(PROGRAM_OPSET, int(lookup(op, "").opsets[0]))


def _one_line(s: str, limit: int) -> str:
    """s with control characters escaped, cut to `limit` characters."""
    s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s[:limit + 1])
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _label(name: Any) -> str:
    """A node name fit for a one-line message."""
    if isinstance(name, str) and len(name) <= 200 and name.isprintable():
        return name
    return _one_line(name if isinstance(name, str) else repr(name), 200)


def _show(v: Any) -> str:
    """A bounded, one-line rendering of a bad value for an error message."""
    if isinstance(v, (list, tuple, dict)) and len(v) > 8:
        return f"a {type(v).__name__} of {len(v)} items"
    try:
        r = repr(v)
    except Exception:
        r = f"<{type(v).__name__}>"
    return _one_line(r, 60)


def _arity_ok(op: str, n: int) -> bool:
    if op in UNARY:
        return n == 1
    if op in BINARY:
        return n == 2
    if op in VARIADIC:
        return 1 <= n <= MAX_ARGS
    return n == 3  # Where, Clip


def _arity_text(op: str) -> str:
    if op in UNARY:
        return "1 operand"
    if op in BINARY:
        return "2 operands"
    if op in VARIADIC:
        return f"1 to {MAX_ARGS} operands"
    return "3 operands"


def _real(v: Any) -> float | None:
    """v as a float when it is a real number (not a bool), else None."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return None
    try:
        return float(v)
    except (TypeError, ValueError, OverflowError):
        return None


def _what(at: tuple[int, str, int] | int) -> str:
    if isinstance(at, tuple):
        return f"instruction {at[0]} ({at[1]}): operand {at[2]}"
    return f"output {at}"


class _Parser:
    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, what: str) -> UnsupportedOpError:
        at = f"node '{self.where}': " if self.where else ""
        return UnsupportedOpError(f"{at}Pointwise {what}")

    def parse(self, program: Any, consts: Any, outputs: Any, n_inputs: int,
              n_outputs: int | None) -> PointwiseProgram:
        if type(n_inputs) is not int or n_inputs < 0:
            raise self.fail(f"has an invalid number of inputs {_show(n_inputs)}")
        cs = self.consts(consts)
        if not isinstance(program, (list, tuple)):
            raise self.fail(f"program must be a list of instructions, got {_show(program)}")
        if not program:
            raise self.fail("program is empty")
        if len(program) > MAX_INSTRS:
            raise self.fail(f"program has {len(program)} instructions, at most {MAX_INSTRS} are allowed")
        instrs: list[Instr] = []
        operands = 0
        for j, raw in enumerate(program):
            ins = self.instr(j, raw, n_inputs, len(cs))
            operands += len(ins.args)
            if operands > MAX_OPERANDS:
                raise self.fail(f"program has more than {MAX_OPERANDS} operands")
            instrs.append(ins)
        outs = self.outputs(outputs, n_inputs, len(instrs), len(cs), n_outputs)
        return PointwiseProgram(n_inputs, tuple(instrs), cs, outs)

    def consts(self, consts: Any) -> tuple[float, ...]:
        if consts is None:
            return ()
        if not isinstance(consts, (list, tuple)):
            raise self.fail(f"consts must be a list of numbers, got {_show(consts)}")
        if len(consts) > MAX_CONSTS:
            raise self.fail(f"has {len(consts)} constants, at most {MAX_CONSTS} are allowed")
        out = []
        for k, c in enumerate(consts):
            x = _real(c)
            if x is None:
                raise self.fail(f"constant c{k} must be a number, got {_show(c)}")
            out.append(x)
        return tuple(out)

    def instr(self, j: int, raw: Any, n_inputs: int, n_consts: int) -> Instr:
        if not isinstance(raw, _DICTS):
            raise self.fail(f"instruction {j} must be a dict with op/args/attrs, got {_show(raw)}")
        if not _INSTR_KEYS.issuperset(raw):
            extra = next(k for k in raw if k not in _INSTR_KEYS)
            raise self.fail(f"instruction {j} has unknown key {_show(extra)}")
        op = raw.get("op")
        if type(op) is not str or op not in OPS:
            raise self.fail(f"instruction {j}: op {_show(op)} is not a fusible elementwise op")
        args = raw.get("args")
        if not isinstance(args, (list, tuple)):
            raise self.fail(f"instruction {j} ({op}): args must be a list of references, got {_show(args)}")
        if not _arity_ok(op, len(args)):
            raise self.fail(f"instruction {j} ({op}): takes {_arity_text(op)}, got {len(args)}")
        refs = []
        clip = op == "Clip"
        for pos, r in enumerate(args):
            bound = clip and pos > 0
            ref = self.ref(r, n_inputs, j, n_consts, bound, (j, op, pos))
            if bound and ref.kind in ("input", "temp"):
                raise self.fail(f"instruction {j} ({op}): operand {pos} (a bound) must be a constant, got {_show(r)}")
            refs.append(ref)
        return Instr(op, tuple(refs), MappingProxyType(self.attrs(op, raw.get("attrs"), f"instruction {j} ({op})")))

    def ref(self, r: Any, n_inputs: int, n_temps: int, n_consts: int, optional: bool,
            at: tuple[int, str, int] | int) -> Ref:
        """One reference; `at` is (instruction, op, operand position) or an output's position."""
        if type(r) is str and _REF.fullmatch(r) is not None:
            kind, k = _LETTER[r[0]], int(r[1:])
            bound = n_inputs if kind == "input" else n_temps if kind == "temp" else n_consts
            if k < bound:
                return Ref(kind, k)  # type: ignore[arg-type]
            what = _what(at)
            if kind == "temp":
                have = f"only t0..t{n_temps - 1} precede it" if n_temps else "no temporary precedes it"
                raise self.fail(f"{what} refers to t{k}, but {have}")
            raise self.fail(f"{what} refers to {r}, but the node has {bound} {_PLURAL[kind]}")
        if r == "" and type(r) is str:
            if optional:
                return NONE
            raise self.fail(f"{_what(at)} is missing")
        raise self.fail(f"{_what(at)} must be a reference like i0/t1/c2, got {_show(r)}")

    def attrs(self, op: str, raw: Any, where: str) -> dict[str, Any]:
        if raw is None:
            raw = {}
        if not isinstance(raw, _DICTS):
            raise self.fail(f"{where}: attrs must be a dict, got {_show(raw)}")
        try:
            attrs = validate_attrs(op, "", program_opset(op), raw, "", private=False)
        except KilnError as e:
            raise self.fail(f"{where}: {e}") from None
        except Exception as e:  # a declaration problem is still one clear line
            raise self.fail(f"{where}: invalid attributes ({type(e).__name__})") from None
        for name in _FLOAT_ATTRS:
            if name in attrs and type(attrs[name]) is not float:
                raise self.fail(f"{where}: attribute '{name}' must be a number, got {_show(attrs[name])}")
        if op == "Gelu" and attrs.get("approximate", "none") not in ("none", "tanh"):
            raise self.fail(f"{where}: approximate must be 'none' or 'tanh', got {_show(attrs.get('approximate'))}")
        if op == "Cast":
            from kiln.ir.dtype import DType
            to = attrs.get("to")
            try:
                DType.from_onnx(to)  # type: ignore[arg-type]
            except (KilnError, TypeError):
                raise self.fail(f"{where}: 'to' must be a known element type, got {_show(to)}") from None
        return attrs

    def outputs(self, outputs: Any, n_inputs: int, n_temps: int, n_consts: int,
                n_outputs: int | None) -> tuple[Ref, ...]:
        if outputs is None:
            outs = (Ref("temp", n_temps - 1),)
        else:
            if not isinstance(outputs, (list, tuple)) or not outputs:
                raise self.fail(f"outputs must be a non-empty list of references, got {_show(outputs)}")
            if len(outputs) > MAX_OUTPUTS:
                raise self.fail(f"has {len(outputs)} outputs, at most {MAX_OUTPUTS} are allowed")
            outs = tuple(self.ref(r, n_inputs, n_temps, n_consts, False, k) for k, r in enumerate(outputs))
        if n_outputs is not None and len(outs) != n_outputs:
            raise self.fail(f"program has {len(outs)} outputs, the node has {n_outputs}")
        return outs


__all__ = ["UNARY", "BINARY", "VARIADIC", "OPS", "BOOL_RESULT", "MAX_INSTRS", "PROGRAM_OPSET", "Ref", "NONE",
           "Instr", "PointwiseProgram", "program_opset"]
