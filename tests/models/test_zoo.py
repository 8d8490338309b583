"""The sample models of examples/zoo: torch eager == onnxruntime on the ONNX model, sizes, decode + NMS."""
from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.zoo import resnet50, yolov4_tiny  # noqa: E402
from examples.zoo.common import param_count  # noqa: E402
from examples.zoo.yolo_decode import decode, nms  # noqa: E402

ort = pytest.importorskip("onnxruntime")

MODELS = {"resnet50": resnet50, "yolov4_tiny": yolov4_tiny}


def _torch_outputs(net: torch.nn.Module, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        out = net(torch.from_numpy(x))
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _ort_outputs(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def _input(mod: ModuleType, batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *mod.INPUT_SHAPE)).astype(np.float32)


@pytest.fixture(scope="module", params=list(MODELS))
def zoo(request: pytest.FixtureRequest) -> tuple[str, ModuleType, torch.nn.Module]:
    mod = MODELS[request.param]
    return request.param, mod, mod.build_torch(seed=0)


def test_torch_matches_onnxruntime(zoo: tuple[str, ModuleType, torch.nn.Module]) -> None:
    name, mod, net = zoo
    model = mod.onnx_model(seed=0, batch=1)
    x = _input(mod, 1, seed=123)
    want, got = _torch_outputs(net, x), _ort_outputs(model, x)
    assert [o.name for o in model.graph.output] == (["logits"] if name == "resnet50" else ["head13", "head26"])
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert _rel_err(g, w) <= 1e-4
        std = float(w.std())
        print(f"{name}: output {w.shape} std {std:.3f}")
        assert 0.3 < std < 5.0, "activations exploded or vanished"


def test_dynamic_batch(zoo: tuple[str, ModuleType, torch.nn.Module]) -> None:
    _, mod, net = zoo
    model = mod.onnx_model(seed=0, batch="N")
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert all(o.type.tensor_type.shape.dim[0].dim_param == "N" for o in model.graph.output)
    x = _input(mod, 2, seed=7)
    for g, w in zip(_ort_outputs(model, x), _torch_outputs(net, x)):
        assert g.shape[0] == 2
        assert _rel_err(g, w) <= 1e-4


def test_weights_deterministic_and_shared(zoo: tuple[str, ModuleType, torch.nn.Module]) -> None:
    _, mod, net = zoo
    again = mod.build_torch(seed=0).state_dict()
    for k, v in net.state_dict().items():
        assert torch.equal(v, again[k]), k
    model = mod.onnx_model(seed=0)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    sd = {k.removeprefix("layers."): v for k, v in net.state_dict().items() if "num_batches_tracked" not in k}
    for k, v in sd.items():
        np.testing.assert_array_equal(inits[k], v.numpy(), err_msg=k)
    # BatchNorm is kept as separate nodes, with non-trivial statistics (so that folding is exercised).
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    var = inits[bns[0].input[4]]
    assert var.std() > 0.01 and np.abs(inits[bns[0].input[3]]).max() > 0.01


def test_seed_changes_weights() -> None:
    a, b = yolov4_tiny.build_torch(seed=0).state_dict(), yolov4_tiny.build_torch(seed=1).state_dict()
    assert not torch.equal(a["layers.stem1.conv.weight"], b["layers.stem1.conv.weight"])
    assert not torch.equal(a["layers.head13.conv.bias"], b["layers.head13.conv.bias"])


def test_parameter_counts() -> None:
    n_resnet = param_count(resnet50.build_torch())
    n_yolo = param_count(yolov4_tiny.build_torch())
    print(f"parameters: resnet50 {n_resnet:,}, yolov4_tiny {n_yolo:,}")
    assert n_resnet == 25_557_032  # torchvision resnet50
    assert abs(n_yolo - 6.06e6) <= 0.02 * 6.06e6


def test_yolo_graph_ops() -> None:
    model = yolov4_tiny.onnx_model(batch=1)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Slice") == 3 and ops.count("Resize") == 1 and ops.count("LeakyRelu") == 19
    resize = next(n for n in model.graph.node if n.op_type == "Resize")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert inits[resize.input[2]].tolist() == [1.0, 1.0, 2.0, 2.0]
    shapes = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    assert shapes == {"head13": [1, 255, 13, 13], "head26": [1, 255, 26, 26]}


# --------------------------------------------------------------------------- decode + NMS
def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + np.exp(-v))


def _decode_ref(head: np.ndarray, anchors: list[tuple[float, float]], size: int, nc: int) -> np.ndarray:
    """Cell-by-cell float64 decode, rows anchor-major then y then x."""
    _, ch, h, w = head.shape
    rows = []
    for a, (aw, ah) in enumerate(anchors):
        for y in range(h):
            for x in range(w):
                v = head[0, a * (5 + nc):(a + 1) * (5 + nc), y, x].astype(np.float64)
                rows.append([(_sigmoid(v[0]) + x) * size / w, (_sigmoid(v[1]) + y) * size / h,
                             np.exp(v[2]) * aw, np.exp(v[3]) * ah] + [_sigmoid(t) for t in v[4:]])
    return np.array(rows)


def _nms_ref(rows: np.ndarray, conf: float, iou_thr: float) -> list[tuple[int, float, tuple[float, ...]]]:
    """Per-class greedy NMS in float64; returns (class, score, xyxy box) by descending score."""
    cls = rows[:, 5:].argmax(1)
    score = rows[:, 4] * rows[:, 5:].max(1)
    xyxy = np.stack([rows[:, 0] - rows[:, 2] / 2, rows[:, 1] - rows[:, 3] / 2,
                     rows[:, 0] + rows[:, 2] / 2, rows[:, 1] + rows[:, 3] / 2], 1)

    def iou(p: np.ndarray, q: np.ndarray) -> float:
        iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
        ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
        inter = iw * ih
        return inter / ((p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter)

    out = []
    for c in np.unique(cls):
        cand = sorted((i for i in range(len(rows)) if cls[i] == c and score[i] > conf), key=lambda i: -score[i])
        kept: list[int] = []
        for i in cand:
            if all(iou(xyxy[i], xyxy[j]) <= iou_thr for j in kept):
                kept.append(i)
        out += [(int(c), float(score[i]), tuple(xyxy[i])) for i in kept]
    return sorted(out, key=lambda t: -t[1])


def _synthetic_head(seed: int, grid: int, nc: int) -> np.ndarray:
    """A small head where boxes overlap and a few classes dominate, so NMS has work to do."""
    rng = np.random.default_rng(seed)
    head = rng.normal(0.0, 1.0, (1, 3, 5 + nc, grid, grid))
    head[:, :, 5:] -= 4.0
    for a in range(3):
        for y in range(grid):
            for x in range(grid):
                head[0, a, 5 + rng.integers(0, 3), y, x] += 6.0
    return head.reshape(1, 3 * (5 + nc), grid, grid).astype(np.float32)


def test_decode_matches_float64_reference() -> None:
    nc, anchors = 80, list(yolov4_tiny.ANCHORS_13)
    head = _synthetic_head(0, 3, nc)
    got = decode(torch.from_numpy(head), anchors, 416, nc)
    assert got.shape == (1, 27, 85)
    want = _decode_ref(head, anchors, 416, nc)
    np.testing.assert_allclose(got[0].numpy(), want, rtol=1e-5, atol=1e-6)


def test_nms_matches_float64_reference() -> None:
    nc, anchors = 80, list(yolov4_tiny.ANCHORS_26)
    head = _synthetic_head(1, 4, nc)
    rows = decode(torch.from_numpy(head), anchors, 104, nc)[0]
    boxes, scores, classes = nms(rows, conf_thresh=0.2, iou_thresh=0.3)
    want = _nms_ref(_decode_ref(head, anchors, 104, nc), 0.2, 0.3)
    assert 3 <= len(want) < 48, "synthetic case should both keep and suppress boxes"
    assert len(boxes) == len(want)
    assert classes.tolist() == [c for c, _, _ in want]
    np.testing.assert_allclose(scores.numpy(), [s for _, s, _ in want], rtol=1e-5)
    np.testing.assert_allclose(boxes.numpy(), [b for _, _, b in want], rtol=1e-5, atol=1e-4)
    assert boxes.dtype == torch.float32 and classes.dtype == torch.int64
