"""MatMul, Gemm, Einsum, Det and MatMulInteger against onnxruntime (and the ONNX reference)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.ops.linalg import _int_einsum
from kiln.testing import check_model, make_node_model, run_kiln


def _rand(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    if np.dtype(dtype).kind in "iu":
        lo = 0 if np.dtype(dtype).kind == "u" else -9
        return rng.integers(lo, 10, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("sa,sb", [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((2, 1, 3, 4), (5, 4, 2)),
                                   ((4,), (4, 5)), ((2, 3, 4), (4,)), ((4,), (4,))])
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int32", "int64", "uint32", "uint64"])
def test_matmul(sa: tuple[int, ...], sb: tuple[int, ...], dtype: str) -> None:
    rng = np.random.default_rng()
    feeds = {"a": _rand(rng, sa, dtype), "b": _rand(rng, sb, dtype)}
    tol = 2e-3 if dtype == "float16" else 1e-4
    check_model(make_node_model("MatMul", feeds, 1, opset=13), feeds, rtol=tol, atol=tol,
                oracle="reference" if dtype in ("uint32", "uint64") else "auto")


@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (1, 0), (0, 1), (1, 1)])
@pytest.mark.parametrize("c_shape", [None, (), (5,), (1, 5), (3, 1), (3, 5)])
def test_gemm(trans_a: int, trans_b: int, c_shape: tuple[int, ...] | None) -> None:
    rng = np.random.default_rng()
    a = _rand(rng, (4, 3) if trans_a else (3, 4), "float32")
    b = _rand(rng, (5, 4) if trans_b else (4, 5), "float32")
    feeds = {"a": a, "b": b}
    consts = {} if c_shape is None else {"c": _rand(rng, c_shape, "float32")}
    attrs = {"transA": trans_a, "transB": trans_b, "alpha": float(rng.uniform(0.5, 2)), "beta": 0.75}
    check_model(make_node_model("Gemm", feeds, 1, attrs, opset=13, const_inputs=consts), feeds)


@pytest.mark.parametrize("dtype", ["int32", "int64", "float16", "float64"])
def test_gemm_dtypes(dtype: str) -> None:
    rng = np.random.default_rng()
    feeds = {"a": _rand(rng, (3, 4), dtype), "b": _rand(rng, (4, 5), dtype), "c": _rand(rng, (5,), dtype)}
    tol = 2e-3 if dtype == "float16" else 1e-5
    check_model(make_node_model("Gemm", feeds, 1, opset=13), feeds, rtol=tol, atol=tol)


EINSUM = [
    ("ij,jk->ik", [(3, 4), (4, 5)]),
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),
    ("ij->ji", [(3, 4)]),
    ("ij->", [(3, 4)]),
    ("i,i", [(5,), (5,)]),
    ("...ii->...i", [(2, 3, 4, 4)]),
    ("ii", [(4, 4)]),
    ("i,j->ij", [(3,), (4,)]),
    ("b...c,c->b...", [(2, 3, 4, 5), (5,)]),
    ("ijk,ikl,ilm->ijm", [(2, 3, 4), (2, 4, 5), (2, 5, 3)]),
    ("ij", [(3, 4)]),
]


@pytest.mark.parametrize("eq,shapes", EINSUM)
@pytest.mark.parametrize("dtype", ["float32", "int64"])
def test_einsum(eq: str, shapes: list[tuple[int, ...]], dtype: str) -> None:
    rng = np.random.default_rng()
    feeds = {f"x{i}": _rand(rng, s, dtype) for i, s in enumerate(shapes)}
    check_model(make_node_model("Einsum", feeds, 1, {"equation": eq}, opset=12), feeds)


@pytest.mark.parametrize("eq,shapes", EINSUM)
def test_int_einsum_matches_float(eq: str, shapes: list[tuple[int, ...]]) -> None:
    ts = [torch.randint(-7, 8, s) for s in shapes]
    want = torch.einsum(eq, *[t.double() for t in ts]).round().long()
    assert torch.equal(_int_einsum(eq, ts), want)


@pytest.mark.parametrize("sa,sb", [((2, 3, 7), (7, 4)), ((7,), (7, 4)), ((2, 3, 7), (7,)), ((7,), (7,)),
                                   ((5, 1, 3, 7), (4, 7, 2))])
def test_chunked_int_matmul(monkeypatch: pytest.MonkeyPatch, sa: tuple[int, ...], sb: tuple[int, ...]) -> None:
    """The path for devices without integer GEMM agrees with torch.matmul, also when K is chunked."""
    import kiln.ops.linalg as linalg
    monkeypatch.setattr(linalg, "_CHUNK_ELEMS", 7)
    a, b = torch.randint(-9, 9, sa), torch.randint(-9, 9, sb)
    assert torch.equal(linalg.chunked_int_matmul(a, b), torch.matmul(a, b))


@pytest.mark.parametrize("shape", [(3, 3), (2, 4, 4), (1, 2, 2, 2)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_det(shape: tuple[int, ...], dtype: str) -> None:
    feeds = {"x": np.random.default_rng().standard_normal(shape).astype(dtype)}
    check_model(make_node_model("Det", feeds, 1, opset=11), feeds, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ta,tb", [("uint8", "uint8"), ("int8", "int8"), ("uint8", "int8"), ("int8", "uint8")])
@pytest.mark.parametrize("zp", ["none", "scalar", "per_column"])
@pytest.mark.parametrize("shapes", [((3, 4), (4, 5)), ((2, 3, 4), (4, 5))])
def test_matmul_integer(ta: str, tb: str, zp: str, shapes: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
    rng = np.random.default_rng()
    sa, sb = shapes
    info_a, info_b = np.iinfo(ta), np.iinfo(tb)
    feeds = {"A": rng.integers(info_a.min, info_a.max + 1, sa).astype(ta),
             "B": rng.integers(info_b.min, info_b.max + 1, sb).astype(tb)}
    consts: dict[str, np.ndarray] = {}
    if zp == "scalar":
        consts = {"a_zp": np.array(rng.integers(info_a.min, info_a.max + 1), dtype=ta),
                  "b_zp": np.array(rng.integers(info_b.min, info_b.max + 1), dtype=tb)}
    elif zp == "per_column":
        consts = {"a_zp": np.array(rng.integers(info_a.min, info_a.max + 1), dtype=ta),
                  "b_zp": rng.integers(info_b.min, info_b.max + 1, sb[-1]).astype(tb)}
    # the ONNX reference evaluator (exact integer numpy): onnxruntime's u8 x s8 kernel saturates 16-bit pair sums
    # on x86 CPUs without VNNI (vpmaddubsw), so it is no oracle there
    check_model(make_node_model("MatMulInteger", feeds, 1, opset=10, const_inputs=consts), feeds, oracle="reference")


def test_matmul_integer_per_row() -> None:
    """Per-row zero point of A (onnxruntime only takes a scalar one): checked against int64 numpy."""
    rng = np.random.default_rng()
    a, b = rng.integers(0, 256, (2, 3, 4)).astype(np.uint8), rng.integers(-128, 128, (4, 5)).astype(np.int8)
    a_zp, b_zp = rng.integers(0, 256, 3).astype(np.uint8), rng.integers(-128, 128, 5).astype(np.int8)
    model = make_node_model("MatMulInteger", {"A": a, "B": b}, 1, opset=10, const_inputs={"a_zp": a_zp, "b_zp": b_zp})
    (got,) = run_kiln(model, {"A": a, "B": b})
    want = (a.astype(np.int64) - a_zp[:, None]) @ (b.astype(np.int64) - b_zp)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
