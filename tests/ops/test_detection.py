"""NonMaxSuppression (kiln/ops/detection.py) against onnxruntime."""
from __future__ import annotations

import numpy as np
import pytest

from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Value
from kiln.ops.registry import lookup
from kiln.testing import make_node_model, run_kiln, run_oracle


def boxes(b: int, n: int, center: bool, flip: bool = False) -> np.ndarray:
    rng = np.random.default_rng()
    lo = rng.uniform(0, 10, (b, n, 2))
    size = rng.uniform(0.5, 4, (b, n, 2))
    if center:
        return np.concatenate([lo + size / 2, size], -1).astype(np.float32)
    out = np.concatenate([lo, lo + size], -1)
    if flip:
        out = out[..., [2, 3, 0, 1]]
    return out.astype(np.float32)


def run(inputs: dict[str, np.ndarray], const: dict[str, np.ndarray], attrs: dict | None = None,
        dtype: type = np.float32) -> None:
    cast = {k: v.astype(dtype) if k in ("boxes", "scores") else v for k, v in inputs.items()}
    got = run_kiln(make_node_model("NonMaxSuppression", cast, 1, attrs, opset=11, const_inputs=const), cast)[0]
    ref = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in cast.items()}
    want = run_oracle(make_node_model("NonMaxSuppression", ref, 1, attrs, opset=11, const_inputs=const), ref)[0]
    assert got.dtype == np.int64 and got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_array_equal(got, want)


def consts(max_out: int | None, iou: float | None, score: float | None) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if max_out is not None:
        out["max_out"] = np.array([max_out], np.int64)
    elif iou is not None or score is not None:
        out["_max_out"] = np.zeros(0, np.int64)
    if iou is not None:
        out["iou"] = np.array([iou], np.float32)
    elif score is not None:
        out["_iou"] = np.zeros(0, np.float32)
    if score is not None:
        out["score"] = np.array([score], np.float32)
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("center", [0, 1])
@pytest.mark.parametrize("max_out,iou,score", [
    (3, 0.5, None), (100, 0.3, 0.4), (2, 0.0, 0.2), (50, 0.7, None), (0, 0.5, None), (None, None, None),
])
def test_nms(max_out, iou, score, center, dtype) -> None:
    b, c, n = 2, 3, 40
    inputs = {"boxes": boxes(b, n, bool(center)), "scores": np.random.default_rng().random((b, c, n), np.float32)}
    run(inputs, consts(max_out, iou, score), {"center_point_box": center}, dtype=dtype)


def test_nms_flipped_corners_and_runtime_thresholds() -> None:
    inputs = {"boxes": boxes(1, 30, False, flip=True), "scores": np.random.default_rng().random((1, 2, 30), np.float32),
              "max_out": np.array([10], np.int64), "iou": np.array([0.4], np.float32),
              "score": np.array([0.1], np.float32)}
    run(inputs, {})


def test_nms_no_candidates() -> None:
    inputs = {"boxes": boxes(1, 5, False), "scores": np.random.default_rng().random((1, 1, 5), np.float32)}
    run(inputs, consts(5, 0.5, 2.0))


def test_nms_infer_is_data_dependent() -> None:
    node = Node("NonMaxSuppression", [Value("b"), Value("s")], [Value("y")], {}, opset=11)
    (t,) = lookup("NonMaxSuppression").infer(node, [None, None], [None, None])
    assert t.dtype == DType.INT64 and t.shape == (None, 3)
