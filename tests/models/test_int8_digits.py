"""INT8 post-training quantization of a CNN trained here on scikit-learn's digits (shipped inside the package):
with every calibrator the INT8 engine keeps >= 99 % top-1 agreement with its own FP32 self on held-out images,
and its layers really are integer layers."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from kiln.builder import Builder, BuilderConfig
from kiln.runtime import Engine

datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn (the test extra) ships the digits data set")

from kiln.testing import calibrated_int8_cpu  # noqa: E402

CALIBRATED_INT8, NO_CALIBRATED_INT8 = calibrated_int8_cpu()
needs_int8 = pytest.mark.skipif(not CALIBRATED_INT8, reason=NO_CALIBRATED_INT8)


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.c3 = torch.nn.Conv2d(32, 32, 3, padding=1)
        self.fc = torch.nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
        y = torch.nn.functional.max_pool2d(torch.relu(self.c2(y)), 2)
        y = torch.relu(self.c3(y) + y)
        return self.fc(y.flatten(1))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, np.ndarray, np.ndarray]:
    """(ONNX path, calibration images, held-out images): digits upsampled to 16x16, a CNN trained on 1400."""
    d = datasets.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    torch.manual_seed(0)
    net = _Net()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(12):
        for i in range(0, 1400, 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(x[1400:]).argmax(1) == y[1400:]).float().mean().item()
    assert acc > 0.9, f"the test's CNN trained to only {acc:.3f} accuracy"
    path = str(tmp_path_factory.mktemp("digits") / "digits.onnx")
    torch.onnx.export(net, x[:1], path, input_names=["x"], output_names=["logits"], opset_version=17,
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    onnx.checker.check_model(onnx.load(path))
    return path, x[:1400:5].numpy(), x[1400:].numpy()


def _run(plan, images: np.ndarray) -> np.ndarray:
    ctx = Engine(plan).create_execution_context()
    return np.concatenate([ctx.execute({"x": images[i:i + 64]})["logits"] for i in range(0, len(images), 64)])


def _profile():
    from kiln.builder import OptimizationProfile
    return [OptimizationProfile().set_shape("x", (1, 1, 16, 16), (64, 1, 16, 16), (64, 1, 16, 16))]


_CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU to build for the CUDA target")])


@pytest.mark.parametrize("device", ["cpu", _CUDA])
@pytest.mark.parametrize("calibrator", ["entropy", "minmax", "percentile", "mse"])
def test_int8_ptq_keeps_top1(trained, calibrator: str, device: str, capsys: pytest.CaptureFixture) -> None:
    if device == "cpu" and not CALIBRATED_INT8:
        pytest.skip(NO_CALIBRATED_INT8)
    path, calib, held = trained
    fp32 = _run(Builder().build(path, BuilderConfig(device=device, profiles=_profile(), optimization_level=0)), held)
    batches = [{"x": calib[i:i + 32]} for i in range(0, len(calib), 32)]
    plan = Builder().build(path, BuilderConfig(device=device, profiles=_profile(), int8=True, optimization_level=0,
                                               calibrator=calibrator, calibration_data=batches))
    steps = plan.graph["steps"]
    ops = [s["op"] for s in steps]
    assert ops.count("QConv") == 3 and ops.count("QGemm") == 1, ops
    assert all(s["tactic"].startswith(device + ".") for s in steps if s["op"] in ("QConv", "QGemm")), steps
    q = _run(plan, held)
    agree = float((q.argmax(1) == fp32.argmax(1)).mean())
    rel = float(np.linalg.norm(q - fp32) / np.linalg.norm(fp32))
    with capsys.disabled():
        print(f"\n[int8 digits] {device} {calibrator}: top-1 agreement with FP32 {agree:.4f}, logits rel. error {rel:.3e}")
    assert agree >= 0.99
    assert 0 < rel < 0.3  # integer math really ran (not the float plan)


@needs_int8
def test_int8_report_and_accuracy_budget(trained) -> None:
    path, calib, _ = trained
    batches = [{"x": calib[i:i + 40]} for i in range(0, 280, 40)]
    plan = Builder().build(path, BuilderConfig(device="cpu", profiles=_profile(), int8=True, optimization_level=0,
                                               calibrator="minmax", calibration_data=batches, int8_report=True))
    rep, per_layer = plan.build["int8_report"], plan.build["int8_layer_error"]
    assert rep["batches"] == 1 and len(per_layer) == 4
    assert all(0 < e < 0.2 for e in per_layer.values())
    assert 0 < rep["output_rel"] < 0.2 and rep["kept_float"] == ""
    # a budget below what INT8 gives: the layers adding most error go back to float until it holds
    tight = rep["output_rel"] / 3
    plan2 = Builder().build(path, BuilderConfig(device="cpu", profiles=_profile(), int8=True, optimization_level=0,
                                                calibrator="minmax", calibration_data=batches,
                                                accuracy_budget=tight))
    rep2 = plan2.build["int8_report"]
    kept = rep2["kept_float"].split(",")
    ops = [s["op"] for s in plan2.graph["steps"]]
    assert rep2["kept_float"] and rep2["output_rel"] <= tight
    assert ops.count("QConv") + ops.count("QGemm") == 4 - len(kept)
    assert all(n in [s["name"] for s in plan2.graph["steps"] if s["op"] in ("FusedConv", "FusedGemm")] for n in kept)


@needs_int8
def test_layer_precision_keeps_a_layer_float(trained) -> None:
    path, calib, _ = trained
    first = "/c1/Conv"
    plan = Builder().build(path, BuilderConfig(device="cpu", profiles=_profile(), int8=True, optimization_level=0,
                                               calibrator="minmax", calibration_data=[{"x": calib[:32]}],
                                               layer_precisions={first: "fp32"}))
    steps = {s["name"]: s["op"] for s in plan.graph["steps"]}
    assert steps[first] == "FusedConv"
    assert list(steps.values()).count("QConv") == 2
