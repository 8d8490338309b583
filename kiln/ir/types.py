"""TensorType: element type + shape whose dims are ints, symbol names, or None (unknown)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from kiln.ir.dtype import DType

Dim = Union[int, str, None]


@dataclass(frozen=True)
class TensorType:
    """Type of a tensor value. shape None means unknown rank."""

    dtype: DType | None
    shape: tuple[Dim, ...] | None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def is_static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)

    def numel(self) -> int | None:
        if not self.is_static:
            return None
        n = 1
        for d in self.shape:  # type: ignore[union-attr]
            n *= d  # type: ignore[operator]
        return n

    def nbytes(self) -> int | None:
        n = self.numel()
        return None if n is None or self.dtype is None else n * self.dtype.itemsize

    def __str__(self) -> str:
        dt = self.dtype.value if self.dtype else "?"
        if self.shape is None:
            return f"{dt}[*]"
        return f"{dt}[{'x'.join('?' if d is None else str(d) for d in self.shape)}]"


@dataclass(frozen=True)
class QuantParams:
    """Quantization scale (and zero point) attached to a value: set by calibration or Q/DQ import."""

    scale: float | tuple[float, ...]
    zero_point: int | tuple[int, ...] = 0
    axis: int | None = None
    dtype: DType | None = None  # the element type the values were quantized to (a folded weight's), if known
