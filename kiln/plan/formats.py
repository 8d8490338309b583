"""Tensor formats (element type + memory layout), as a plan records them per layer and `kiln inspect` shows them.

A format is one short string, "<type> <layout>", as TensorRT's engine inspector names a binding's format:

    fp32 NCHW        a 4-D tensor, dense, row-major
    fp16 NHWC        a 4-D tensor, dense, channels innermost (torch.channels_last)
    int64 row-major  any other rank, dense, last dim innermost
    fp32 NHWC view   that order, with gaps: a slice of a larger buffer (a channel slice of an elided Concat's
                     output, a constant Slice's view)
    fp32 strided     any other strides (a transposed view, broadcast strides)

and "-" for a value that is not a tensor or was not seen. A 4-D tensor dense in both orders (a size-1 channel or
spatial extent) is NCHW. Types are short names (fp32, fp16, bf16, int8, ...; others as torch names them).

A layer's record, plan.build["formats"][layer name], is "<inputs> -> <outputs>": each side the formats of the
layer's runtime inputs (constants and absent optional inputs left out, as `kiln inspect` lists them) or outputs,
joined by ", ". A shape layer the runtime computes on the host once per input shape (kiln.runtime.prologue)
is recorded as "host". This module imports nothing heavy: `kiln inspect` and the plan schema read records with it.
"""
from __future__ import annotations

import re
from typing import Sequence

UNKNOWN = "-"
HOST = "host"
ARROW = " -> "
DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int8": "int8",
          "uint8": "uint8", "int16": "int16", "int32": "int32", "int64": "int64", "bool": "bool",
          "float8_e4m3fn": "fp8e4m3", "float8_e5m2": "fp8e5m2"}
ORDERS = ("NCHW", "NHWC", "row-major")
LAYOUTS = frozenset([*ORDERS, *(f"{o} view" for o in ORDERS), "strided"])
_TYPE = re.compile(r"[a-z][a-z0-9_]{0,23}\Z")
MAX_VALUES = 4096  # formats on one side of a record


def short_dtype(name: str) -> str:
    """A torch / Kiln element type name ("float16", "torch.float16") as a format shows it ("fp16")."""
    name = name.removeprefix("torch.")
    return DTYPES.get(name, name)


def layout_of(shape: Sequence[int], strides: Sequence[int]) -> str:
    """The layout (see the module doc) of a tensor with these sizes and element strides."""
    rank = len(shape)
    orders = [("NCHW", (0, 1, 2, 3)), ("NHWC", (0, 2, 3, 1))] if rank == 4 else [("row-major", tuple(range(rank)))]
    for dense in (True, False):
        for name, perm in orders:
            if _fits(shape, strides, perm, dense):
                return name if dense else f"{name} view"
    return "strided"


def _fits(shape: Sequence[int], strides: Sequence[int], perm: Sequence[int], dense: bool) -> bool:
    """Whether the dims, outermost to innermost in `perm`, are laid out in that order without overlap (and, when
    `dense`, without gaps). Size-1 dims may have any stride; an empty tensor fits every order."""
    if any(d == 0 for d in shape):
        return True
    need = 1  # the smallest stride the next dim outwards may have
    for k in reversed(perm):
        if shape[k] == 1:
            continue
        if strides[k] < need or (dense and strides[k] != need):
            return False
        need = strides[k] * shape[k]
    return True


def tensor_format(dtype: str, shape: Sequence[int], strides: Sequence[int]) -> str:
    """'fp16 NHWC' for a tensor of element type `dtype` (a torch or Kiln name) with these sizes and strides."""
    return f"{short_dtype(dtype)} {layout_of(shape, strides)}"


def is_format(s: object) -> bool:
    """Whether `s` is a format string (or "-")."""
    if s == UNKNOWN:
        return True
    if not isinstance(s, str):
        return False
    dtype, sep, layout = s.partition(" ")
    return bool(sep) and bool(_TYPE.match(dtype)) and layout in LAYOUTS


def make_record(inputs: Sequence[str], outputs: Sequence[str]) -> str:
    """A layer's record from its inputs' and outputs' formats."""
    return ", ".join(inputs) + ARROW + ", ".join(outputs)


def parse_record(text: object) -> tuple[list[str], list[str]] | None:
    """(input formats, output formats) of a layer's record; None for a host layer. ValueError (its message says
    what is wrong) when `text` is not a record."""
    if text == HOST:
        return None
    if not isinstance(text, str) or text.count(ARROW) != 1:
        raise ValueError(f'expected "<input formats> -> <output formats>" or "{HOST}"')
    sides = [[f for f in side.split(", ")] if side else [] for side in text.split(ARROW)]
    for side in sides:
        if len(side) > MAX_VALUES:
            raise ValueError(f"more than {MAX_VALUES} formats on one side")
        bad = next((f for f in side if not is_format(f)), None)
        if bad is not None:
            shown = bad if len(bad) <= 40 else bad[:37] + "..."
            raise ValueError(f"{shown!r} is not a format (expected '<type> <layout>', layout one of "
                             f"{', '.join(sorted(LAYOUTS))}, or '{UNKNOWN}')")
    return sides[0], sides[1]
