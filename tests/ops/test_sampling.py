"""GridSample and AffineGrid (kiln/ops/sampling.py) against onnxruntime / the ONNX reference evaluator."""
from __future__ import annotations

import numpy as np
import pytest

from kiln.testing import make_node_model, run_kiln, run_oracle

FLOATS = [np.float32, np.float16, np.float64]


def rand(*shape: int, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    return np.random.default_rng().uniform(lo, hi, shape).astype(np.float32)


def check(op: str, inputs: dict[str, np.ndarray], attrs: dict, opset: int, dtype: type,
          const_inputs: dict[str, np.ndarray] | None = None, oracle: str = "auto") -> None:
    """Kiln on float inputs cast to `dtype` vs the oracle on the same values in float32."""
    cast = {k: v.astype(dtype) for k, v in inputs.items()}
    ref_in = {k: v.astype(np.float32) for k, v in cast.items()}
    got = run_kiln(make_node_model(op, cast, 1, attrs, opset=opset, const_inputs=const_inputs), cast)[0]
    ref_model = make_node_model(op, ref_in, 1, attrs, opset=opset, const_inputs=const_inputs)
    if oracle == "reference":
        from onnx.reference import ReferenceEvaluator
        want = ReferenceEvaluator(ref_model).run(None, ref_in)[0]
    else:
        want = run_oracle(ref_model, ref_in)[0]
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == np.float16 else {"rtol": 1e-4, "atol": 1e-5}
    assert got.shape == want.shape and got.dtype == np.dtype(dtype)
    np.testing.assert_allclose(got.astype(np.float64), want, **tol)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("align", [0, 1])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("mode", ["linear", "nearest", "cubic"])
def test_grid_sample_2d(mode, padding, align, dtype) -> None:
    attrs = {"mode": mode, "padding_mode": padding, "align_corners": align}
    check("GridSample", {"x": rand(2, 3, 5, 6), "grid": rand(2, 4, 7, 2, lo=-1.4, hi=1.4)}, attrs, 20, dtype)


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic"])
def test_grid_sample_opset16_names(mode) -> None:
    attrs = {"mode": mode, "padding_mode": "border"}
    check("GridSample", {"x": rand(1, 2, 4, 5), "grid": rand(1, 3, 3, 2, lo=-1.2, hi=1.2)}, attrs, 16, np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("align", [0, 1])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_grid_sample_3d(mode, padding, align, dtype) -> None:
    attrs = {"mode": mode, "padding_mode": padding, "align_corners": align}
    check("GridSample", {"x": rand(1, 2, 3, 4, 5), "grid": rand(1, 2, 3, 2, 3, lo=-1.3, hi=1.3)}, attrs, 20, dtype)


@pytest.mark.parametrize("padding", ["zeros", "reflection"])
def test_grid_sample_3d_cubic(padding) -> None:
    attrs = {"mode": "cubic", "padding_mode": padding, "align_corners": 0}
    check("GridSample", {"x": rand(1, 1, 3, 3, 4), "grid": rand(1, 1, 2, 2, 3, lo=-1.3, hi=1.3)}, attrs, 20,
          np.float32, oracle="reference")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("align", [0, 1])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("size", [(2, 3, 4, 5), (2, 1, 3, 4, 2), (2, 3, 1, 5)])
def test_affine_grid(size, align, dtype) -> None:
    nd = len(size) - 2
    # a size-1 dim under align_corners=1 has no agreed coordinate (onnxruntime: +1, torch: 0, ONNX reference: -1)
    oracle = "reference" if align and 1 in size[2:] else "auto"
    check("AffineGrid", {"theta": rand(size[0], nd, nd + 1)}, {"align_corners": align}, 20, dtype,
          const_inputs={"size": np.array(size, np.int64)}, oracle=oracle)
