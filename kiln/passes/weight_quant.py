"""A quantized weight's remembered scales (Value.quant, set by FoldWeightDequantize) carried through the float
passes that rebuild the weight tensor: gemm fusion's transpose to [N, K] and sibling gemm stacking.

Without them the integer / FP8 layer would re-derive scales from the float values (amax per channel), which
gives the model's own weights back only where each channel reaches the format's largest value. Passes that
change the values themselves (BatchNorm or scale folding, alpha != 1) drop the scales instead.
"""
from __future__ import annotations

from typing import Sequence

from kiln.ir.graph import Value
from kiln.ir.types import QuantParams


def transposed(q: QuantParams | None) -> QuantParams | None:
    """The scales of a 2-D weight after a transpose (per-tensor scales stay as they are)."""
    if q is None or q.axis is None:
        return q
    if q.axis not in (0, 1):
        return None
    return QuantParams(q.scale, q.zero_point, 1 - q.axis, q.dtype)


def stacked(weights: Sequence[Value]) -> QuantParams | None:
    """The scales of weights [N_i, K] stacked along axis 0 (sibling gemms merged): one per output row, when
    every weight has per-tensor or axis-0 scales of one element type; None otherwise."""
    scales: list[float] = []
    dtypes = set()
    for v in weights:
        q, w = v.quant, v.const
        if q is None or w is None or q.axis not in (None, 0):
            return None
        rows = int(w.shape[0])
        s = list(q.scale) if isinstance(q.scale, tuple) else [float(q.scale)]
        if len(s) == 1:
            s = s * rows
        if len(s) != rows:
            return None
        scales += s
        dtypes.add(q.dtype)
    if len(dtypes) != 1:
        return None
    return QuantParams(tuple(scales), 0, 0, dtypes.pop())
