"""Shape/layout ops (kiln/ops/shape.py) against onnxruntime / the ONNX reference evaluator."""
from __future__ import annotations

import numpy as np
import pytest

from onnx.reference import ReferenceEvaluator

from kiln.testing import check_model, make_node_model, run_kiln

DTYPES = [np.float32, np.float16, np.int64, np.int32, np.uint8, np.int8, np.bool_]


def rand(*shape: int, dtype: type = np.float32) -> np.ndarray:
    rng = np.random.default_rng()
    if np.dtype(dtype) == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    if np.dtype(dtype).kind in "iu":
        return rng.integers(0, 100, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def i64(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.int64)


def check(op: str, inputs: dict, attrs: dict | None = None, opset: int = 17, outputs: int = 1,
          const: dict | None = None, **tol: float) -> None:
    check_model(make_node_model(op, inputs, outputs, attrs, opset=opset, const_inputs=const), inputs, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,target,allowzero", [
    ((2, 3, 4), (4, 6), 0), ((2, 3, 4), (0, -1), 0), ((2, 3, 4), (-1,), 0), ((2, 0, 4), (0, 4), 1),
    ((2, 3, 4), (2, 0, 2, -1), 0)])
def test_reshape(shape, target, allowzero, dtype) -> None:
    check("Reshape", {"x": rand(*shape, dtype=dtype)}, {"allowzero": allowzero}, opset=14,
          const={"s": i64(*target)})


def test_reshape_runtime_shape() -> None:
    check("Reshape", {"x": rand(2, 3, 4), "s": i64(3, -1)})


@pytest.mark.parametrize("perm", [None, [0, 2, 1, 3], [3, 1, 0, 2]])
@pytest.mark.parametrize("dtype", DTYPES)
def test_transpose(perm, dtype) -> None:
    check("Transpose", {"x": rand(2, 3, 4, 5, dtype=dtype)}, {"perm": perm} if perm else None)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_concat(axis) -> None:
    shapes = [[2, 3, 4] for _ in range(3)]
    for k, s in enumerate(shapes):
        s[axis] = k + 1
    check("Concat", {f"x{k}": rand(*s) for k, s in enumerate(shapes)}, {"axis": axis})


@pytest.mark.parametrize("opset,attrs,split,outs", [
    (11, {"axis": 1}, None, 3), (11, {"axis": 1, "split": [1, 4, 1]}, None, 3),
    (13, {"axis": -1}, (2, 0, 3), 3), (13, {}, None, 2), (18, {"axis": 1, "num_outputs": 4}, None, 4),
    (18, {"axis": 2, "num_outputs": 2}, None, 2)])
def test_split(opset, attrs, split, outs) -> None:
    check("Split", {"x": rand(4, 6, 5)}, attrs, opset=opset, outputs=outs,
          const={"split": i64(*split)} if split else None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tile_expand(dtype) -> None:
    x = rand(2, 1, 3, dtype=dtype)
    check("Tile", {"x": x}, const={"r": i64(2, 3, 1)})
    check("Expand", {"x": x}, const={"s": i64(4, 2, 5, 1)})
    check("Expand", {"x": x}, const={"s": i64(3, 1)})


@pytest.mark.parametrize("opset", [11, 13])
def test_squeeze_unsqueeze(opset) -> None:
    x = rand(1, 3, 1, 4)
    if opset < 13:
        check("Squeeze", {"x": x}, {"axes": [0, -2]}, opset=opset)
        check("Unsqueeze", {"x": x}, {"axes": [-1, 0, 3]}, opset=opset)
    else:
        check("Squeeze", {"x": x}, opset=opset, const={"a": i64(0, -2)})
        check("Unsqueeze", {"x": x}, opset=opset, const={"a": i64(-1, 0, 3)})
    check("Squeeze", {"x": x}, opset=opset)


@pytest.mark.parametrize("axis", [0, 1, 2, 4, -1, -3])
def test_flatten(axis) -> None:
    check("Flatten", {"x": rand(2, 3, 4, 5)}, {"axis": axis}, opset=13)


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_depth_space(mode) -> None:
    check("DepthToSpace", {"x": rand(2, 12, 3, 4)}, {"blocksize": 2, "mode": mode}, opset=13)
    check("SpaceToDepth", {"x": rand(2, 3, 6, 4)}, {"blocksize": 2})


@pytest.mark.parametrize("attrs", [{}, {"start": 1}, {"end": -1}, {"start": -3, "end": 10}, {"start": 3, "end": 1}])
def test_shape_size(attrs) -> None:
    check("Shape", {"x": rand(2, 3, 4, 5)}, attrs, opset=15)
    check("Size", {"x": rand(2, 3, 4, 5)})


@pytest.mark.parametrize("upper", [0, 1])
@pytest.mark.parametrize("k", [None, -2, 0, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.int64])
def test_trilu(upper, k, dtype) -> None:
    check("Trilu", {"x": rand(2, 4, 6, dtype=dtype)}, {"upper": upper}, opset=14,
          const={"k": np.array(k, dtype=np.int64)} if k is not None else None)


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.uint8])
def test_pad(mode, dtype) -> None:
    x = rand(2, 3, 4, 5, dtype=dtype)
    if mode == "wrap":
        check("Pad", {"x": x}, {"mode": mode}, opset=19, const={"p": i64(0, 1, 2, 3, 1, 0, 3, 2)})
        return
    pads = i64(0, 1, 2, 0, 1, 0, 3, 2)
    check("Pad", {"x": x}, {"mode": mode}, opset=13, const={"p": pads})
    check("Pad", {"x": x}, {"mode": mode}, opset=18, const={"p": i64(2, 1, 1, 3), "_c": np.array([]),
                                                             "a": i64(-1, 1)})
    check("Pad", {"x": x.astype(np.float32)}, {"mode": mode, "pads": [0, 1, 2, 0, 1, 0, 3, 2], "value": 1.5},
          opset=10)
    if mode == "constant":
        check("Pad", {"x": x}, {"mode": mode}, opset=13,
              const={"p": i64(0, -1, 2, 0, 1, 0, -2, 2), "c": np.array(7, dtype=dtype)})


@pytest.mark.parametrize("shape,axes", [((5, 2), None), ((2, 7), [-1, 0]), ((3,), [1])])
def test_center_crop_pad(shape, axes) -> None:
    attrs = {"axes": axes} if axes else None
    check("CenterCropPad", {"x": rand(4, 4, 3)}, attrs, opset=18, const={"s": i64(*shape)})


@pytest.mark.parametrize("image,block,attrs", [
    ((5, 5), (2, 2), {}), ((6, 7), (3, 2), {"strides": [2, 1], "pads": [1, 0, 1, 1], "dilations": [1, 2]}),
    ((4, 5, 4), (2, 2, 2), {})])
def test_col2im(image, block, attrs) -> None:
    nd = len(image)
    strides, dil = attrs.get("strides", [1] * nd), attrs.get("dilations", [1] * nd)
    pads = attrs.get("pads", [0] * 2 * nd)
    nblocks = [(image[d] + pads[d] + pads[nd + d] - dil[d] * (block[d] - 1) - 1) // strides[d] + 1
               for d in range(nd)]
    x = rand(2, 3 * int(np.prod(block)), int(np.prod(nblocks)))
    model = make_node_model("Col2Im", {"x": x}, 1, attrs, opset=18, const_inputs={"i": i64(*image), "b": i64(*block)})
    check_model(model, {"x": x}, oracle="reference")


# ---- Resize -------------------------------------------------------------------------------------

def _resize(x, attrs, scales=None, sizes=None, opset=19, roi=None, oracle="reference", **tol):
    """onnxruntime computes Resize coordinates in float32 and uses the integer output length for
    align_corners, so it differs from the ONNX reference at rounding ties; the reference is the spec."""
    const = {"_roi" if roi is None else "roi": np.array(roi if roi is not None else [], np.float32)}
    if scales is not None:
        const["scales"] = np.array(scales, np.float32)
    else:
        const["_scales"] = np.array([], np.float32)
        const["sizes"] = i64(*sizes)
    model = make_node_model("Resize", {"x": x}, 1, attrs, opset=opset, const_inputs=const)
    check_model(model, {"x": x}, oracle=oracle, **tol)


CTMS = ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "half_pixel_symmetric"]


@pytest.mark.parametrize("ctm", CTMS)
@pytest.mark.parametrize("nearest_mode", ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"])
@pytest.mark.parametrize("scales", [[1, 1, 2, 3], [1, 1, 0.6, 1.7], [1, 1, 0.5, 0.25]])
def test_resize_nearest(ctm, nearest_mode, scales) -> None:
    _resize(rand(1, 2, 5, 8), {"mode": "nearest", "coordinate_transformation_mode": ctm,
                               "nearest_mode": nearest_mode}, scales=scales)


@pytest.mark.parametrize("mode", ["linear", "cubic"])
@pytest.mark.parametrize("ctm", CTMS)
@pytest.mark.parametrize("scales,sizes", [([1, 1, 2, 1.5], None), ([1, 1, 0.6, 0.8], None), (None, [2, 3, 7, 3]),
                                          (None, [2, 3, 1, 9])])
def test_resize_interp(mode, ctm, scales, sizes) -> None:
    _resize(rand(2, 3, 5, 6), {"mode": mode, "coordinate_transformation_mode": ctm}, scales=scales, sizes=sizes)


@pytest.mark.parametrize("mode", ["linear", "cubic"])
@pytest.mark.parametrize("scales", [[1, 1, 0.6, 0.4], [1, 1, 1.5, 0.7]])
def test_resize_antialias_exclude(mode, scales) -> None:
    x = rand(1, 2, 10, 9)
    _resize(x, {"mode": mode, "antialias": 1}, scales=scales)
    if mode == "cubic":
        _resize(x, {"mode": mode, "exclude_outside": 1, "cubic_coeff_a": -0.5}, scales=scales)


@pytest.mark.parametrize("policy", ["stretch", "not_larger", "not_smaller"])
@pytest.mark.parametrize("axes", [None, [2, 3], [3, 1]])
def test_resize_policy_axes(policy, axes) -> None:
    attrs = {"mode": "nearest", "keep_aspect_ratio_policy": policy}
    if axes:
        attrs["axes"] = axes
    _resize(rand(1, 3, 4, 6), attrs, sizes=[7, 5] if axes else [1, 3, 7, 5])
    _resize(rand(1, 3, 4, 6), dict(attrs, mode="linear"), sizes=[3, 9] if axes else [1, 3, 3, 9])


@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
def test_resize_crop_and_resize(mode) -> None:
    _resize(rand(1, 1, 6, 6), {"mode": mode, "coordinate_transformation_mode": "tf_crop_and_resize",
                               "extrapolation_value": 3.0}, sizes=[1, 1, 4, 5],
            roi=[0, 0, 0.2, -0.3, 1, 1, 0.9, 1.2])


@pytest.mark.parametrize("shape,scales", [((2, 9), [1, 1.5]), ((1, 2, 3, 4, 5), [1, 1, 2, 0.5, 1.4]),
                                          ((8,), [0.5])])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_nd(shape, scales, mode) -> None:
    _resize(rand(*shape), {"mode": mode}, scales=scales)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.float16, np.float64])
@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
def test_resize_dtypes(dtype, mode) -> None:
    x = rand(1, 2, 5, 6, dtype=dtype)
    const = {"_roi": np.array([], np.float32), "scales": np.array([1, 1, 1.6, 0.7], np.float32)}
    model = make_node_model("Resize", {"x": x}, 1, {"mode": mode}, opset=19, const_inputs=const)
    got = run_kiln(model, {"x": x})[0]
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 1.0 if np.dtype(dtype).kind in "iu" else 1e-2 if dtype == np.float16 else 1e-5
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=tol, atol=tol)


@pytest.mark.parametrize("attrs,scales,sizes", [
    ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, [1, 1, 2, 2], None),
    ({"mode": "nearest"}, [1, 1, 2, 2], None),
    ({"mode": "linear"}, [1, 1, 2, 2], None),
    ({"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}, None, [2, 3, 13, 7]),
    ({"mode": "linear", "coordinate_transformation_mode": "align_corners"}, None, [2, 3, 13, 7]),
    ({"mode": "cubic"}, [1, 1, 2, 2], None),
    ({"mode": "cubic", "cubic_coeff_a": -0.5, "coordinate_transformation_mode": "align_corners"}, None, [2, 3, 3, 9]),
])
def test_resize_vs_onnxruntime(attrs, scales, sizes) -> None:
    """Real-model configurations (YOLO upsample, segmentation heads), where onnxruntime agrees with the spec."""
    _resize(rand(2, 3, 6, 8), attrs, scales=scales, sizes=sizes, oracle="auto")


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("scales", [[1, 1, 2, 3], [1, 1, 0.5, 0.6], [1, 1, 1.5, 2.5]])
def test_resize_opset10_upsample(mode, scales) -> None:
    x = rand(1, 2, 5, 6)
    _resize_legacy("Resize", x, mode, scales, 10)
    if min(scales) >= 1:
        _resize_legacy("Upsample", x, mode, scales, 9)


def _resize_legacy(op, x, mode, scales, opset) -> None:
    model = make_node_model(op, {"x": x}, 1, {"mode": mode}, opset=opset,
                            const_inputs={"scales": np.array(scales, np.float32)})
    check_model(model, {"x": x})


def test_upsample_opset7() -> None:
    check("Upsample", {"x": rand(1, 2, 3, 4)}, {"mode": "nearest", "scales": [1.0, 1.0, 2.0, 3.0]}, opset=7)
