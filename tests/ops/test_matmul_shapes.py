"""MatMul / FusedGemm shape rules on symbolic dims (kiln.ops.linalg.matmul_dims), checked against torch.matmul
on real tensors: every symbol substituted by sizes drawn at random must give the shape torch computes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Value
from kiln.ir.types import TensorType
from kiln.ops.infer import infer_node
from kiln.ops.linalg import broadcast_dim, matmul_dims


@st.composite
def operands(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    """Two numpy-matmul-compatible shapes (ranks 1-4, batch dims broadcasting through 1s)."""
    ra, rb = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    m, k, n = (draw(st.integers(1, 5)) for _ in range(3))
    nb = max(ra, rb) - 2
    batch = [draw(st.integers(2, 4)) for _ in range(max(nb, 0))]
    a = [m, k] if ra > 1 else [k]
    b = [k, n] if rb > 1 else [k]
    a = [d if draw(st.booleans()) else 1 for d in batch[len(batch) - (ra - 2):]] + a if ra > 2 else a
    b = [d if draw(st.booleans()) else 1 for d in batch[len(batch) - (rb - 2):]] + b if rb > 2 else b
    return a, b


@settings(max_examples=200, deadline=None)
@given(operands(), st.data())
def test_matmul_dims_match_torch_with_symbols(ab: tuple[list[int], list[int]], data: st.DataObject) -> None:
    a, b = ab
    want = tuple(torch.matmul(torch.empty(a), torch.empty(b)).shape)
    # hide some dims behind symbols (a symbol stands for one size, shared where the sizes agree)
    sa = [f"s{d}" if data.draw(st.booleans()) else d for d in a]
    sb = [f"s{d}" if data.draw(st.booleans()) else d for d in b]
    got = matmul_dims(sa, sb)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if isinstance(g, int):
            assert g == w
        elif isinstance(g, str):
            assert g == f"s{w}"  # a symbol in the result names the size torch computed


def test_broadcast_dim_never_guesses() -> None:
    assert broadcast_dim("n", "n") == "n"
    assert broadcast_dim("n", 1) == "n"
    assert broadcast_dim("n", 4) == 4          # n broadcasts to 4 (n is 4 or 1)
    assert broadcast_dim("n", "m") is None     # either could be 1
    assert broadcast_dim(None, 3) == 3
    with pytest.raises(ValueError):
        broadcast_dim(3, 4)
    with pytest.raises(ValueError):
        matmul_dims([2, 3], [4, 5])


def _node(op: str, domain: str, a: TensorType, b: TensorType | None = None, w: np.ndarray | None = None) -> Node:
    second = Value("w", const=torch.from_numpy(w)) if w is not None else Value("b", b)
    return Node(op, [Value("x", a), second], [Value("y")], {}, name="n", domain=domain, opset=17)


def test_matmul_and_fused_gemm_types_on_symbolic_inputs() -> None:
    rng = np.random.default_rng()
    n = _node("MatMul", "", TensorType(DType.FLOAT16, ("batch", 12, "seq", 64)),
              b=TensorType(DType.FLOAT16, ("batch", 12, 64, "seq")))
    assert infer_node(n) == [TensorType(DType.FLOAT16, ("batch", 12, "seq", "seq"))]
    w = rng.standard_normal((768, 3072)).astype(np.float32)
    n = _node("FusedGemm", "kiln", TensorType(DType.FLOAT32, ("batch", "seq", 768)), w=w.T.copy())
    assert infer_node(n) == [TensorType(DType.FLOAT32, ("batch", "seq", 3072))]
    n = _node("FusedGemm", "kiln", TensorType(DType.FLOAT32, ("batch", "seq", 100)), w=w.T.copy())
    assert infer_node(n)[0].shape is None  # K mismatch: no type, the run reports the error
