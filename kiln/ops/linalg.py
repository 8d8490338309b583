"""Linear algebra: MatMul, Gemm, Einsum, Det, MatMulInteger.

torch has no integer matmul on CUDA and no unsigned 32/64-bit arithmetic kernels, so integer
products are computed exactly in int64 (wrapping arithmetic, which is also exact for uint64)
by `int_matmul` / `_int_einsum` and cast back.
"""
from __future__ import annotations

from typing import Sequence

import torch

from kiln.errors import UnsupportedDTypeError, UnsupportedOpError
from kiln.ir.graph import Node
from kiln.ir.types import TensorType
from kiln.ops.registry import OpDef, register

Tensor = torch.Tensor

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CHUNK_ELEMS = 1 << 24


def _is_int(t: Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex()


def int_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Exact numpy-style matmul of integer (or bool) tensors, accumulated in int64."""
    a64, b64 = a.to(torch.int64), b.to(torch.int64)
    if a64.device.type in ("cpu", "meta"):
        return torch.matmul(a64, b64)
    return chunked_int_matmul(a64, b64)


def chunked_int_matmul(a: Tensor, b: Tensor) -> Tensor:
    """int64 matmul from broadcast products summed over chunks of K (for devices without int GEMM)."""
    squeeze_a, squeeze_b = a.dim() == 1, b.dim() == 1
    if squeeze_a:
        a = a.unsqueeze(0)
    if squeeze_b:
        b = b.unsqueeze(1)
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    step = max(1, _CHUNK_ELEMS // max(1, m * n * torch.Size(batch).numel()))
    out = torch.zeros((*batch, m, n), dtype=torch.int64, device=a.device)
    for k0 in range(0, k, step):
        out += (a[..., :, k0:k0 + step, None] * b[..., None, k0:k0 + step, :]).sum(-2)
    if squeeze_b:
        out = out.squeeze(-1)
    if squeeze_a:
        out = out.squeeze(-1 if squeeze_b else -2)
    return out


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """numpy-style matmul in the inputs' dtype (exact for integers)."""
    if a.dtype != b.dtype:
        raise UnsupportedDTypeError(f"MatMul operands differ in dtype: {a.dtype} and {b.dtype}")
    if _is_int(a):
        return int_matmul(a, b).to(a.dtype)
    if a.dtype not in _FLOATS:
        raise UnsupportedDTypeError(f"MatMul does not support dtype {a.dtype}")
    if a.device.type == "cpu" and a.dtype == torch.float16:
        return torch.matmul(a.float(), b.float()).to(a.dtype)
    return torch.matmul(a, b)


Dim = int | str | None


def broadcast_dim(x: Dim, y: Dim) -> Dim:
    """One dim of a numpy broadcast of two dims that may be symbols (str) or unknown (None)."""
    if x == y:
        return x
    if x == 1:
        return y
    if y == 1:
        return x
    if isinstance(x, int) and isinstance(y, int):
        raise ValueError(f"dims {x} and {y} do not broadcast")
    if isinstance(x, int) or isinstance(y, int):  # a symbol or unknown dim against a size n > 1: it is n or 1
        return x if isinstance(x, int) else y
    return None  # two different symbols (or unknowns): either may be 1


def matmul_dims(a: Sequence[Dim], b: Sequence[Dim]) -> tuple[Dim, ...]:
    """numpy matmul's result dims from its operands' dims (ValueError where they cannot match)."""
    if not a or not b:
        raise ValueError("MatMul operands must have rank >= 1")
    a2 = (1, *a) if len(a) == 1 else tuple(a)
    b2 = (*b, 1) if len(b) == 1 else tuple(b)
    ka, kb = a2[-1], b2[-2]
    if isinstance(ka, int) and isinstance(kb, int) and ka != kb:
        raise ValueError(f"MatMul contracts a dim of {ka} with one of {kb}")
    ra, rb = a2[:-2], b2[:-2]
    n = max(len(ra), len(rb))
    ra, rb = (1,) * (n - len(ra)) + ra, (1,) * (n - len(rb)) + rb
    out = tuple(broadcast_dim(x, y) for x, y in zip(ra, rb)) + (a2[-2], b2[-1])
    if len(b) == 1:
        out = out[:-1]
    if len(a) == 1:
        out = out[:-2] + out[-1:] if len(b) > 1 else out[:-1]
    return out


def symbolic_operands(types: Sequence[TensorType | None]) -> bool:
    """Every present operand has a known rank and some dim is a symbol or unknown: the case the shape rules
    below decide by themselves (a fake-tensor run of torch's matmul may guard on a symbolic size)."""
    known = [t for t in types if t is not None]
    return (bool(known) and all(t.shape is not None for t in known)
            and any(not isinstance(d, int) for t in known for d in t.shape))  # type: ignore[union-attr]


@register
class MatMul(OpDef):
    op_type = "MatMul"

    def compute(self, node: Node, a: Tensor, b: Tensor) -> Tensor:
        if a.dim() == 0 or b.dim() == 0:
            raise UnsupportedOpError(f"node '{node.name}': MatMul operands must have rank >= 1")
        return matmul(a, b)

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        a, b = (types[0], types[1]) if len(types) >= 2 else (None, None)
        if a is None or b is None or not symbolic_operands([a, b]) or a.dtype != b.dtype:
            return super().infer(node, types, consts)
        return [TensorType(a.dtype, matmul_dims(a.shape, b.shape))]  # type: ignore[arg-type]


@register
class Gemm(OpDef):
    op_type = "Gemm"

    def compute(self, node: Node, a: Tensor, b: Tensor, c: Tensor | None = None) -> Tensor:
        if a.dim() != 2 or b.dim() != 2:
            raise UnsupportedOpError(f"node '{node.name}': Gemm needs 2-D A and B, got ranks {a.dim()} and {b.dim()}")
        if node.attr("transA", 0):
            a = a.t()
        if node.attr("transB", 0):
            b = b.t()
        alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))
        y = matmul(a, b)
        if alpha != 1.0:
            y = (y * alpha).to(a.dtype)
        if c is not None and beta != 0.0:
            cb = c if beta == 1.0 else (c * beta).to(c.dtype)
            y = (y.to(torch.int64) + cb.to(torch.int64)).to(a.dtype) if _is_int(y) else y + cb
        return y


def _int_einsum(equation: str, operands: list[Tensor]) -> Tensor:
    """Einsum by broadcast products in int64 (exact; memory ~ product of all index sizes)."""
    lhs, _, rhs = equation.partition("->")
    specs = lhs.split(",")
    used = set(equation) - set(".,->")
    spare = iter(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in used)
    ell_rank = max((t.dim() - len(s.replace("...", "")) for s, t in zip(specs, operands) if "..." in s),
                   default=0)
    ell = "".join(next(spare) for _ in range(ell_rank))
    if "->" not in equation:
        counts = {c: lhs.count(c) for c in used}
        rhs = "..." + "".join(sorted(c for c, k in counts.items() if k == 1))
    rhs = rhs.replace("...", ell)
    terms: list[tuple[str, Tensor]] = []
    for s, t in zip(specs, operands):
        if "..." in s:
            n = t.dim() - len(s.replace("...", ""))
            s = s.replace("...", ell[ell_rank - n:])
        t = t.to(torch.int64)
        letters = list(s)
        while len(set(letters)) < len(letters):
            c = next(x for x in letters if letters.count(x) > 1)
            i = letters.index(c)
            j = letters.index(c, i + 1)
            t = torch.diagonal(t, dim1=i, dim2=j)
            letters = [x for k, x in enumerate(letters) if k not in (i, j)] + [c]
        terms.append(("".join(letters), t))
    order = list(dict.fromkeys(ell + "".join(s for s, _ in terms)))
    prod: Tensor | None = None
    for s, t in terms:
        perm = sorted(range(len(s)), key=lambda k: order.index(s[k]))
        t = t.permute(perm)
        present = sorted(s, key=order.index)
        view = [t.shape[present.index(c)] if c in present else 1 for c in order]
        t = t.reshape(view)
        prod = t if prod is None else prod * t
    assert prod is not None
    reduce = [k for k, c in enumerate(order) if c not in rhs]
    if reduce:
        prod = prod.sum(dim=reduce)
    kept = [c for c in order if c in rhs]
    return prod.permute([kept.index(c) for c in rhs])


@register
class Einsum(OpDef):
    op_type = "Einsum"
    opsets = (12, 28)

    def compute(self, node: Node, *operands: Tensor) -> Tensor:
        eq = str(node.attr("equation", "")).replace(" ", "")
        dtype = operands[0].dtype
        if _is_int(operands[0]):
            return _int_einsum(eq, list(operands)).to(dtype)
        if dtype not in _FLOATS:
            raise UnsupportedDTypeError(f"node '{node.name}': Einsum does not support dtype {dtype}")
        if operands[0].device.type == "cpu" and dtype == torch.float16:
            return torch.einsum(eq, *(t.float() for t in operands)).to(dtype)
        return torch.einsum(eq, *operands)


@register
class Det(OpDef):
    op_type = "Det"
    opsets = (11, 28)

    def compute(self, node: Node, x: Tensor) -> Tensor:
        if x.dtype not in _FLOATS:
            raise UnsupportedDTypeError(f"node '{node.name}': Det does not support dtype {x.dtype}")
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()
        return torch.linalg.det(work).to(x.dtype)


def _row_zp(zp: Tensor | None) -> Tensor | int:
    """Per-row zero point of A ([M] or [..., M]) as a column broadcastable against [..., M, K]."""
    if zp is None:
        return 0
    zp = zp.to(torch.int64)
    return zp.reshape(()) if zp.numel() == 1 else zp.unsqueeze(-1)


def _col_zp(zp: Tensor | None) -> Tensor | int:
    """Per-column zero point of B ([N] or [..., N]) broadcastable against [..., K, N]."""
    if zp is None:
        return 0
    zp = zp.to(torch.int64)
    return zp.reshape(()) if zp.numel() == 1 else zp.unsqueeze(-2)


@register
class MatMulInteger(OpDef):
    op_type = "MatMulInteger"
    opsets = (10, 28)

    def compute(self, node: Node, a: Tensor, b: Tensor, a_zp: Tensor | None = None,
                b_zp: Tensor | None = None) -> Tensor:
        for t in (a, b):
            if t.dtype not in (torch.int8, torch.uint8):
                raise UnsupportedDTypeError(f"node '{node.name}': MatMulInteger needs int8/uint8 inputs, got {t.dtype}")
        if a.dim() == 1:
            return self.compute(node, a.unsqueeze(0), b, a_zp, b_zp).squeeze(-2)
        if b.dim() == 1:
            return self.compute(node, a, b.unsqueeze(-1), a_zp, b_zp).squeeze(-1)
        a64 = a.to(torch.int64) - _row_zp(a_zp)
        b64 = b.to(torch.int64) - _col_zp(b_zp)
        return int_matmul(a64, b64).to(torch.int32)
