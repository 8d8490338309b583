"""DFT, STFT, window functions and MelWeightMatrix against onnxruntime (and the ONNX reference)."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from kiln.testing import check_model, make_node_model


def _signal(shape: tuple[int, ...], complex_: bool, dtype: str = "float32") -> np.ndarray:
    return np.random.default_rng().standard_normal((*shape, 2 if complex_ else 1)).astype(dtype)


@pytest.mark.parametrize("opset", [17, 20])
@pytest.mark.parametrize("axis", [1, 2, -2])
@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("inverse", [0, 1])
def test_dft(opset: int, axis: int, complex_: bool, inverse: int) -> None:
    if opset == 17 and axis < 0:
        pytest.skip("opset 17 takes a non-negative axis attribute")
    x = _signal((2, 6, 5), complex_)
    attrs, consts = {"inverse": inverse}, {}
    if opset == 17:
        attrs["axis"] = axis
    else:
        consts = {"_len": np.zeros(0), "axis": np.array(axis, dtype=np.int64)}
    model = make_node_model("DFT", {"x": x}, 1, attrs, opset=opset, const_inputs=consts)
    check_model(model, {"x": x}, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("length", [4, 6, 9])
@pytest.mark.parametrize("onesided", [0, 1])
def test_dft_length_onesided(length: int, onesided: int) -> None:
    x = _signal((3, 6), False)
    model = make_node_model("DFT", {"x": x}, 1, {"onesided": onesided}, opset=20,
                            const_inputs={"len": np.array(length, dtype=np.int64), "axis": np.array(1)})
    check_model(model, {"x": x}, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("length", [None, 8, 10])
def test_dft_irfft(length: int | None) -> None:
    x = _signal((2, 5, 3), True)
    x[:, 0, :, 1] = 0  # DC bin of a real signal
    consts = {"_len": np.zeros(0)} if length is None else {"len": np.array(length, dtype=np.int64)}
    consts["axis"] = np.array(1, dtype=np.int64)
    model = make_node_model("DFT", {"x": x}, 1, {"onesided": 1, "inverse": 1}, opset=20, const_inputs=consts)
    check_model(model, {"x": x}, rtol=1e-4, atol=1e-4, oracle="reference")


def test_dft_float64() -> None:
    x = _signal((2, 7), True, "float64")
    check_model(make_node_model("DFT", {"x": x}, 1, {"axis": 1}, opset=17), {"x": x}, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("window", ["none", "hann", "rect"])
@pytest.mark.parametrize("onesided", [0, 1])
@pytest.mark.parametrize("step,flen", [(4, 8), (3, 5), (8, 8)])
def test_stft(window: str, onesided: int, step: int, flen: int) -> None:
    rng = np.random.default_rng()
    x = _signal((2, 32), False)
    consts: dict[str, np.ndarray] = {"step": np.array(step, dtype=np.int64)}
    if window == "none":
        consts.update({"_w": np.zeros(0), "len": np.array(flen, dtype=np.int64)})
    else:
        w = np.hanning(flen + 1)[:-1] if window == "hann" else rng.uniform(0.5, 1.5, flen)
        consts["window"] = w.astype(np.float32)
    model = make_node_model("STFT", {"x": x}, 1, {"onesided": onesided}, opset=17, const_inputs=consts)
    check_model(model, {"x": x}, rtol=1e-4, atol=1e-4, oracle="reference")


def test_stft_complex_signal() -> None:
    x = _signal((1, 20), True)
    consts = {"step": np.array(5, dtype=np.int64), "_w": np.zeros(0), "len": np.array(6, dtype=np.int64)}
    model = make_node_model("STFT", {"x": x}, 1, {"onesided": 0}, opset=17, const_inputs=consts)
    check_model(model, {"x": x}, rtol=1e-4, atol=1e-4, oracle="reference")


@pytest.mark.parametrize("op", ["HannWindow", "HammingWindow", "BlackmanWindow"])
@pytest.mark.parametrize("periodic", [0, 1])
@pytest.mark.parametrize("size", [1, 2, 10, 33])
@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.DOUBLE])
def test_windows(op: str, periodic: int, size: int, dtype: int) -> None:
    if size == 1 and not periodic:
        pytest.skip("a symmetric window of size 1 divides by zero in the reference")
    model = make_node_model(op, {}, 1, {"periodic": periodic, "output_datatype": dtype}, opset=17,
                            const_inputs={"size": np.array(size, dtype=np.int64)})
    check_model(model, {}, rtol=1e-5, atol=1e-6, oracle="reference")


@pytest.mark.parametrize("bins,length,rate,lo,hi", [(8, 16, 8192, 0.0, 4096.0), (10, 64, 16000, 20.0, 7600.0),
                                                     (5, 20, 1000, 100.0, 400.0), (3, 7, 100, 0.0, 50.0)])
@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.DOUBLE])
def test_mel_weight_matrix(bins: int, length: int, rate: int, lo: float, hi: float, dtype: int) -> None:
    consts = {"bins": np.array(bins, np.int64), "len": np.array(length, np.int64), "rate": np.array(rate, np.int64),
              "lo": np.array(lo, np.float32), "hi": np.array(hi, np.float32)}
    model = make_node_model("MelWeightMatrix", {}, 1, {"output_datatype": dtype}, opset=17, const_inputs=consts)
    check_model(model, {}, rtol=1e-6, atol=1e-6, oracle="reference")


@pytest.mark.parametrize("onesided", [0, 1])
def test_stft_of_a_rank_2_real_signal(onesided: int) -> None:
    """[batch, length] without the trailing 1: onnxruntime reads it as a real signal and exporters write it so
    (onnx-asr's OnnxScript log-mel preprocessors); the ONNX reference evaluator refuses it, so the oracle is
    onnxruntime, checked against numpy's FFT of the hann-windowed frames."""
    import onnxruntime as ort
    x = np.random.default_rng().standard_normal((2, 50)).astype(np.float32)
    w = (np.hanning(17)[:-1]).astype(np.float32)
    consts = {"step": np.array(6, dtype=np.int64), "window": w}
    model = make_node_model("STFT", {"x": x}, 1, {"onesided": onesided}, opset=17, const_inputs=consts)
    check_model(model, {"x": x}, rtol=1e-4, atol=1e-4, oracle="onnxruntime")
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    frames = np.stack([x[:, i:i + 16] for i in range(0, 50 - 16 + 1, 6)], 1).astype(np.float64) * w
    want = np.fft.fft(frames, axis=-1)[..., : 9 if onesided else 16]
    np.testing.assert_allclose(got, np.stack([want.real, want.imag], -1), rtol=1e-4, atol=1e-4)
