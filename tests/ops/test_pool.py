"""Pooling ops (kiln/ops/pool.py) against onnxruntime / the ONNX reference evaluator.

float16/float64 cases run Kiln on the cast inputs and compare with the oracle run in float32 on the
same values (onnxruntime lacks float64 kernels for several of these ops).
"""
from __future__ import annotations

import numpy as np
import pytest

from kiln.testing import make_node_model, run_kiln, run_oracle

FLOATS = [np.float32, np.float16, np.float64]


def rand(*shape: int, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    return np.random.default_rng().uniform(lo, hi, shape).astype(np.float32)


def check(op: str, inputs: dict[str, np.ndarray], attrs: dict | None = None, opset: int = 17,
          dtype: type = np.float32, outputs: int = 1, const_inputs: dict[str, np.ndarray] | None = None) -> None:
    """Kiln on float inputs cast to `dtype` vs the oracle on the same values in float32 (or in `dtype`
    itself for integer types)."""
    cast = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in inputs.items()}
    oracle_dt = np.float32 if np.dtype(dtype).kind == "f" else dtype
    ref_in = {k: v.astype(oracle_dt) if v.dtype.kind == "f" else v for k, v in cast.items()}
    got = run_kiln(make_node_model(op, cast, outputs, attrs, opset=opset, const_inputs=const_inputs), cast)
    want = run_oracle(make_node_model(op, ref_in, outputs, attrs, opset=opset, const_inputs=const_inputs), ref_in)
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == np.float16 else {"rtol": 1e-4, "atol": 1e-5}
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape, f"output {i}: shape {g.shape} != {w.shape}"
        if w.dtype.kind == "f":
            assert g.dtype == np.dtype(dtype), f"output {i}: dtype {g.dtype}"
            np.testing.assert_allclose(g.astype(np.float64), w, err_msg=f"output {i}", **tol)
        else:
            assert g.dtype == w.dtype, f"output {i}: dtype {g.dtype} != {w.dtype}"
            np.testing.assert_array_equal(g, w, err_msg=f"output {i}")


WINDOW_CASES = [
    ((2, 3, 11), {"kernel_shape": [3], "strides": [2]}),
    ((1, 2, 7, 8), {"kernel_shape": [3, 2], "pads": [1, 0, 2, 1]}),
    ((1, 2, 7, 8), {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),
    ((1, 2, 8, 7), {"kernel_shape": [2, 3], "strides": [3, 2], "pads": [1, 1, 0, 1], "ceil_mode": 1}),
    ((1, 2, 8, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1}),
    ((1, 2, 9, 9), {"kernel_shape": [3, 2], "dilations": [2, 3], "strides": [2, 1]}),
    ((1, 2, 9, 8), {"kernel_shape": [2, 2], "dilations": [2, 2], "ceil_mode": 1, "strides": [2, 2],
                    "pads": [1, 0, 0, 1]}),
    ((1, 2, 7, 8), {"kernel_shape": [3, 3], "strides": [2, 3], "auto_pad": "SAME_UPPER"}),
    ((1, 2, 7, 8), {"kernel_shape": [2, 4], "strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    ((1, 2, 7, 8), {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "VALID"}),
    ((1, 2, 5, 6, 7), {"kernel_shape": [2, 3, 2], "strides": [2, 1, 2], "pads": [0, 1, 1, 1, 0, 0]}),
]


@pytest.mark.parametrize("dtype", FLOATS + [np.uint8, np.int8])
@pytest.mark.parametrize("shape,attrs", WINDOW_CASES)
def test_max_pool(shape, attrs, dtype) -> None:
    x = rand(*shape, lo=-100, hi=100)
    if np.dtype(dtype).kind != "f":
        x = np.random.default_rng().integers(np.iinfo(dtype).min, np.iinfo(dtype).max, shape).astype(dtype)
    check("MaxPool", {"x": x}, attrs, opset=12, dtype=dtype)


@pytest.mark.parametrize("storage_order", [0, 1])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape,attrs", WINDOW_CASES)
def test_max_pool_indices(shape, attrs, dtype, storage_order) -> None:
    if len(shape) != 4 and storage_order:
        pytest.skip("onnxruntime supports storage_order=1 for 2-D only")
    check("MaxPool", {"x": rand(*shape, lo=-100, hi=100)}, {**attrs, "storage_order": storage_order},
          opset=12, dtype=dtype, outputs=2)


@pytest.mark.parametrize("count_include_pad", [0, 1])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape,attrs", WINDOW_CASES)
def test_average_pool(shape, attrs, dtype, count_include_pad) -> None:
    check("AveragePool", {"x": rand(*shape)}, {**attrs, "count_include_pad": count_include_pad}, opset=19,
          dtype=dtype)


@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape,attrs", WINDOW_CASES[:2] + WINDOW_CASES[5:6] + WINDOW_CASES[7:])
def test_lp_pool(shape, attrs, dtype, p) -> None:
    check("LpPool", {"x": rand(*shape)}, {**attrs, "p": p}, opset=18, dtype=dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("op,attrs", [("GlobalAveragePool", {}), ("GlobalMaxPool", {}), ("GlobalLpPool", {"p": 3})])
@pytest.mark.parametrize("shape", [(2, 3, 7), (1, 2, 4, 5), (1, 2, 3, 4, 2)])
def test_global_pools(op, attrs, shape, dtype) -> None:
    check(op, {"x": rand(*shape)}, attrs, dtype=dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("with_shape", [False, True])
def test_max_unpool(dtype, with_shape) -> None:
    x = rand(1, 2, 7, 6) if with_shape else rand(1, 2, 8, 6)
    pool = make_node_model("MaxPool", {"x": x}, 2, {"kernel_shape": [2, 2], "strides": [2, 2]})
    y, idx = run_oracle(pool, {"x": x})
    attrs = {"kernel_shape": [2, 2], "strides": [2, 2]}
    const = {"shape": np.array([1, 2, 7, 6], np.int64)} if with_shape else None
    check("MaxUnpool", {"x": y, "i": idx}, attrs, opset=11, dtype=dtype, const_inputs=const)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_max_roi_pool(dtype, scale) -> None:
    rng = np.random.default_rng()
    n = 4
    x1y1 = rng.uniform(0, 12, (n, 2))
    x2y2 = x1y1 + rng.uniform(0, 10, (n, 2))
    rois = np.concatenate([rng.integers(0, 2, (n, 1)), x1y1, x2y2], 1).astype(np.float32)
    check("MaxRoiPool", {"x": rand(2, 3, 10, 11), "rois": rois}, {"pooled_shape": [3, 2], "spatial_scale": scale},
          dtype=dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("ctm,ratio", [("half_pixel", 0), ("output_half_pixel", 2), ("half_pixel", 3)])
def test_roi_align(dtype, mode, ctm, ratio) -> None:
    rng = np.random.default_rng()
    n = 5
    x1y1 = rng.uniform(-2, 14, (n, 2))
    rois = np.concatenate([x1y1, x1y1 + rng.uniform(0, 12, (n, 2))], 1).astype(np.float32)
    attrs = {"mode": mode, "coordinate_transformation_mode": ctm, "sampling_ratio": ratio,
             "output_height": 3, "output_width": 4, "spatial_scale": 0.75}
    check("RoiAlign", {"x": rand(2, 3, 10, 12), "rois": rois, "bi": rng.integers(0, 2, n).astype(np.int64)},
          attrs, opset=16, dtype=dtype)
