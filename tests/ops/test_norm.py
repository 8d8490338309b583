"""Normalization ops (kiln/ops/norm.py) against onnxruntime / the ONNX reference evaluator.

float16/float64 cases run Kiln on the cast inputs and compare with the oracle run in float32 on the
same values (onnxruntime lacks float64 kernels for several of these ops).
"""
from __future__ import annotations

import numpy as np
import pytest

from kiln.testing import make_node_model, run_kiln, run_oracle

FLOATS = [np.float32, np.float16, np.float64]


def rand(*shape: int, lo: float = -2.0, hi: float = 2.0) -> np.ndarray:
    return np.random.default_rng().uniform(lo, hi, shape).astype(np.float32)


def check(op: str, inputs: dict[str, np.ndarray], attrs: dict | None = None, opset: int = 17,
          dtype: type = np.float32, outputs: int = 1, out_dtypes: list | None = None) -> None:
    """Kiln on float inputs cast to `dtype` vs the oracle on the same values in float32."""
    cast = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in inputs.items()}
    ref_in = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in cast.items()}
    got = run_kiln(make_node_model(op, cast, outputs, attrs, opset=opset), cast)
    want = run_oracle(make_node_model(op, ref_in, outputs, attrs, opset=opset), ref_in)
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == np.float16 else {"rtol": 1e-4, "atol": 1e-4}
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = np.asarray(g), np.asarray(w)
        want_dt = np.dtype(out_dtypes[i] if out_dtypes else dtype)
        assert g.shape == w.shape, f"output {i}: shape {g.shape} != {w.shape}"
        assert g.dtype == want_dt, f"output {i}: dtype {g.dtype} != {want_dt}"
        np.testing.assert_allclose(g.astype(np.float64), w, err_msg=f"output {i}", **tol)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 5), (2, 3, 4, 5), (1, 2, 3, 2, 4)])
def test_batch_norm_inference(shape, dtype) -> None:
    c = shape[1]
    inputs = {"x": rand(*shape), "s": rand(c), "b": rand(c), "m": rand(c), "v": rand(c, lo=0.1, hi=2.0)}
    check("BatchNormalization", inputs, {"epsilon": 1e-3}, opset=15, dtype=dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("outputs", [1, 3])
def test_batch_norm_training(dtype, outputs) -> None:
    inputs = {"x": rand(3, 4, 5, 2), "s": rand(4), "b": rand(4), "m": rand(4), "v": rand(4, lo=0.1, hi=2.0)}
    check("BatchNormalization", inputs, {"training_mode": 1, "momentum": 0.8}, opset=15, dtype=dtype,
          outputs=outputs)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(2, 3, 7), (2, 3, 4, 5), (1, 2, 3, 4, 2)])
def test_instance_norm(shape, dtype) -> None:
    c = shape[1]
    check("InstanceNormalization", {"x": rand(*shape), "s": rand(c), "b": rand(c)}, {"epsilon": 1e-4}, dtype=dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("axis", [-1, 1, -2, 0])
@pytest.mark.parametrize("bias", [False, True])
def test_layer_norm(axis, bias, dtype) -> None:
    shape = (2, 3, 4, 5)
    norm_shape = shape[axis:] if axis < 0 else shape[axis:]
    inputs = {"x": rand(*shape), "s": rand(*norm_shape)}
    if bias:
        inputs["b"] = rand(*norm_shape)
    check("LayerNormalization", inputs, {"axis": axis, "epsilon": 1e-3}, dtype=dtype, outputs=3,
          out_dtypes=[dtype, np.float32, np.float32])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("opset,groups", [(18, 2), (18, 6), (21, 3), (21, 1)])
def test_group_norm(opset, groups, dtype) -> None:
    c = 6
    n_param = groups if opset == 18 else c
    inputs = {"x": rand(2, c, 4, 3), "s": rand(n_param), "b": rand(n_param)}
    check("GroupNormalization", inputs, {"num_groups": groups, "epsilon": 1e-4}, opset=opset, dtype=dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("axis", [-1, 1, -3])
def test_rms_norm(axis, dtype) -> None:
    shape = (2, 3, 4, 5)
    check("RMSNormalization", {"x": rand(*shape), "s": rand(*shape[axis:])}, {"axis": axis}, opset=23, dtype=dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("size", [1, 3, 5])
def test_lrn(size, dtype) -> None:
    check("LRN", {"x": rand(2, 6, 4, 3)}, {"size": size, "alpha": 0.02, "beta": 0.6, "bias": 1.5}, dtype=dtype)


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("shape", [(2, 6, 4, 3), (1, 5, 7)])
def test_lrn_even_size_and_any_rank(size, shape) -> None:
    """onnxruntime rejects even sizes and the reference evaluator's LRN is wrong: check the spec's formula."""
    x = rand(*shape)
    attrs = {"size": size, "alpha": 0.03, "beta": 0.7, "bias": 1.2}
    got = run_kiln(make_node_model("LRN", {"x": x}, 1, attrs), {"x": x})[0]
    sq = np.zeros_like(x)
    for c in range(shape[1]):
        lo, hi = max(0, c - (size - 1) // 2), min(shape[1] - 1, c + size // 2)
        sq[:, c] = (x[:, lo:hi + 1] ** 2).sum(1)
    want = x / (1.2 + 0.03 / size * sq) ** 0.7
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_lp_normalization(p, axis, dtype) -> None:
    check("LpNormalization", {"x": rand(3, 4, 5)}, {"p": p, "axis": axis}, dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float32])
@pytest.mark.parametrize("axes", [None, [1], [0, 1, 2, 3], [2, 3]])
def test_mean_variance_normalization(axes, dtype) -> None:
    # float64 oracle: onnxruntime's E[x^2]-E[x]^2 form loses ~4e-4 on small groups
    x = rand(2, 3, 4, 5).astype(dtype)
    got = run_kiln(make_node_model("MeanVarianceNormalization", {"x": x}, 1, {"axes": axes} if axes else {},
                                   opset=13), {"x": x})[0]
    ax = tuple(axes) if axes else (0, 2, 3)
    x64 = x.astype(np.float64)
    want = (x64 - x64.mean(axis=ax, keepdims=True)) / np.sqrt(x64.var(axis=ax, keepdims=True) + 1e-9)
    assert got.dtype == dtype
    tol = 1e-2 if dtype == np.float16 else 1e-4
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_mean_variance_normalization_dtypes(dtype) -> None:
    x = rand(2, 3, 4, 5).astype(dtype)
    got = run_kiln(make_node_model("MeanVarianceNormalization", {"x": x}, 1, opset=13), {"x": x})[0]
    want = run_oracle(make_node_model("MeanVarianceNormalization", {"x": x.astype(np.float32)}, 1, opset=13),
                      {"x": x.astype(np.float32)})[0]
    assert got.dtype == dtype
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=1e-2, atol=1e-2)
