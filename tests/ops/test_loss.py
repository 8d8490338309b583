"""NegativeLogLikelihoodLoss and SoftmaxCrossEntropyLoss against onnxruntime."""
from __future__ import annotations

import numpy as np
import pytest

from kiln.testing import check_model, make_node_model

SHAPES = [(4, 5), (2, 5, 3), (2, 4, 3, 2)]


def _case(rng: np.random.Generator, shape: tuple[int, ...], weight: bool, ignore: int | None,
          dtype: type, tdtype: type) -> dict[str, np.ndarray]:
    n, c, *rest = shape
    feeds = {"x": rng.standard_normal(shape).astype(dtype),
             "t": rng.integers(0, c, (n, *rest)).astype(tdtype)}
    if ignore is not None:
        feeds["t"].reshape(-1)[::3] = ignore
    if weight:
        feeds["w"] = rng.random(c).astype(dtype) + 0.1
    return feeds


def _attrs(reduction: str, ignore: int | None) -> dict:
    attrs: dict = {"reduction": reduction}
    if ignore is not None:
        attrs["ignore_index"] = ignore
    return attrs


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("ignore", [None, 1, -3])
def test_nll(shape: tuple[int, ...], reduction: str, weight: bool, ignore: int | None) -> None:
    rng = np.random.default_rng()
    feeds = _case(rng, shape, weight, ignore, np.float32, np.int64)
    model = make_node_model("NegativeLogLikelihoodLoss", feeds, ["loss"], _attrs(reduction, ignore), opset=13)
    check_model(model, feeds)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("ignore", [None, 2])
@pytest.mark.parametrize("log_prob", [False, True])
def test_sce(shape: tuple[int, ...], reduction: str, weight: bool, ignore: int | None, log_prob: bool) -> None:
    rng = np.random.default_rng()
    feeds = _case(rng, shape, weight, ignore, np.float32, np.int64)
    outs = ["loss", "log_prob"] if log_prob else ["loss"]
    model = make_node_model("SoftmaxCrossEntropyLoss", feeds, outs, _attrs(reduction, ignore), opset=13)
    check_model(model, feeds)


@pytest.mark.parametrize("op", ["NegativeLogLikelihoodLoss", "SoftmaxCrossEntropyLoss"])
@pytest.mark.parametrize("dtype,tdtype", [(np.float64, np.int32), (np.float16, np.int64)])
def test_dtypes(op: str, dtype: type, tdtype: type) -> None:
    rng = np.random.default_rng()
    feeds = _case(rng, (3, 4, 2), True, 0, dtype, tdtype)
    model = make_node_model(op, feeds, ["loss"], _attrs("mean", 0), opset=13)
    tol = 2e-3 if dtype == np.float16 else 1e-7
    check_model(model, feeds, rtol=tol, atol=tol)


def test_bad_reduction_is_clear() -> None:
    from kiln.errors import KilnError
    feeds = _case(np.random.default_rng(), (3, 4), False, None, np.float32, np.int64)
    model = make_node_model("NegativeLogLikelihoodLoss", feeds, ["loss"], {"reduction": "max"}, opset=13)
    with pytest.raises(KilnError, match="reduction"):
        check_model(model, feeds)
