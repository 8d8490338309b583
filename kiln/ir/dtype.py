"""Element types: one table mapping Kiln DType <-> ONNX TensorProto <-> torch <-> numpy."""
from __future__ import annotations

import enum

import numpy as np
import torch
from onnx import TensorProto

from kiln.errors import UnsupportedDTypeError


class DType(enum.Enum):
    """Tensor element type. Values are Kiln's stable names, used in plan files."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT64 = "float64"
    INT8 = "int8"
    INT16 = "int16"
    INT32 = "int32"
    INT64 = "int64"
    UINT8 = "uint8"
    UINT16 = "uint16"
    UINT32 = "uint32"
    UINT64 = "uint64"
    BOOL = "bool"
    FLOAT8E4M3FN = "float8_e4m3fn"
    FLOAT8E4M3FNUZ = "float8_e4m3fnuz"
    FLOAT8E5M2 = "float8_e5m2"
    FLOAT8E5M2FNUZ = "float8_e5m2fnuz"
    COMPLEX64 = "complex64"
    COMPLEX128 = "complex128"

    @property
    def torch(self) -> torch.dtype:
        return _TO_TORCH[self]

    @property
    def onnx(self) -> int:
        return _TO_ONNX[self]

    @property
    def itemsize(self) -> int:
        return _TO_TORCH[self].itemsize

    @property
    def is_float(self) -> bool:
        return _TO_TORCH[self].is_floating_point

    @staticmethod
    def from_torch(dt: torch.dtype) -> "DType":
        try:
            return _FROM_TORCH[dt]
        except KeyError:
            raise UnsupportedDTypeError(f"unsupported torch dtype {dt}") from None

    @staticmethod
    def from_onnx(code: int, where: str = "") -> "DType":
        try:
            return _FROM_ONNX[code]
        except KeyError:
            name = TensorProto.DataType.Name(code) if code in TensorProto.DataType.values() else str(code)
            at = f" ({where})" if where else ""
            raise UnsupportedDTypeError(f"unsupported element type {name}{at}") from None

    @staticmethod
    def from_numpy(dt: np.dtype) -> "DType":
        return DType.from_torch(torch.from_numpy(np.zeros(0, dtype=dt)).dtype)

    @staticmethod
    def from_name(name: str) -> "DType":
        return DType(name)


_PAIRS = [
    (DType.FLOAT32, torch.float32, TensorProto.FLOAT),
    (DType.FLOAT16, torch.float16, TensorProto.FLOAT16),
    (DType.BFLOAT16, torch.bfloat16, TensorProto.BFLOAT16),
    (DType.FLOAT64, torch.float64, TensorProto.DOUBLE),
    (DType.INT8, torch.int8, TensorProto.INT8),
    (DType.INT16, torch.int16, TensorProto.INT16),
    (DType.INT32, torch.int32, TensorProto.INT32),
    (DType.INT64, torch.int64, TensorProto.INT64),
    (DType.UINT8, torch.uint8, TensorProto.UINT8),
    (DType.UINT16, torch.uint16, TensorProto.UINT16),
    (DType.UINT32, torch.uint32, TensorProto.UINT32),
    (DType.UINT64, torch.uint64, TensorProto.UINT64),
    (DType.BOOL, torch.bool, TensorProto.BOOL),
    (DType.FLOAT8E4M3FN, torch.float8_e4m3fn, TensorProto.FLOAT8E4M3FN),
    (DType.FLOAT8E4M3FNUZ, torch.float8_e4m3fnuz, TensorProto.FLOAT8E4M3FNUZ),
    (DType.FLOAT8E5M2, torch.float8_e5m2, TensorProto.FLOAT8E5M2),
    (DType.FLOAT8E5M2FNUZ, torch.float8_e5m2fnuz, TensorProto.FLOAT8E5M2FNUZ),
    (DType.COMPLEX64, torch.complex64, TensorProto.COMPLEX64),
    (DType.COMPLEX128, torch.complex128, TensorProto.COMPLEX128),
]
_TO_TORCH = {k: t for k, t, _ in _PAIRS}
_TO_ONNX = {k: o for k, _, o in _PAIRS}
_FROM_TORCH = {t: k for k, t, _ in _PAIRS}
_FROM_ONNX = {o: k for k, _, o in _PAIRS}


def onnx_to_torch(code: int) -> torch.dtype:
    """torch dtype of an ONNX TensorProto element type (raises UnsupportedDTypeError)."""
    return DType.from_onnx(code).torch


# ml_dtypes' numpy types that torch.from_numpy cannot take: their bits are viewed as the torch type
_ML_DTYPES = {"bfloat16": DType.BFLOAT16, "float8_e4m3fn": DType.FLOAT8E4M3FN, "float8_e4m3fnuz": DType.FLOAT8E4M3FNUZ,
              "float8_e5m2": DType.FLOAT8E5M2, "float8_e5m2fnuz": DType.FLOAT8E5M2FNUZ}
_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def array_to_torch(arr: np.ndarray, dtype: DType | None = None) -> torch.Tensor:
    """numpy (including ml_dtypes bfloat16/float8 arrays) -> a CPU torch tensor of its own, without going
    through float. `dtype` names the element type of raw (void) arrays. Anything torch cannot hold (strings,
    objects, datetimes, structured or other ml_dtypes types, float128) is an UnsupportedDTypeError."""
    if not isinstance(arr, np.ndarray):
        raise UnsupportedDTypeError(f"expected a numpy array, got {type(arr).__name__}")
    dt = arr.dtype
    if dt.kind in ("U", "S", "O"):
        raise UnsupportedDTypeError("string tensors are not supported" if dt.kind != "O"
                                    else "object arrays are not supported (strings or ragged nested lists?)")
    arr = np.ascontiguousarray(arr).reshape(np.shape(arr))  # ascontiguousarray makes 0-d arrays 1-d
    named = _ML_DTYPES.get(dt.name)
    if named is not None or dt.kind == "V":
        target = named or dtype
        if target is None or dt.fields is not None or dt.itemsize != target.itemsize or dt.itemsize not in _BITS:
            raise UnsupportedDTypeError(f"unsupported numpy dtype {dt}")
        return torch.from_numpy(arr.view(_BITS[dt.itemsize]).copy()).view(target.torch)
    if not dt.isnative:
        arr = arr.astype(dt.newbyteorder("="))
    try:
        t = torch.from_numpy(arr.copy())
    except (TypeError, ValueError, RuntimeError):
        raise UnsupportedDTypeError(f"unsupported numpy dtype {dt}") from None
    if t.dtype not in _FROM_TORCH:
        raise UnsupportedDTypeError(f"unsupported numpy dtype {dt}")
    return t
