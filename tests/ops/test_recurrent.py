"""RNN, LSTM and GRU against onnxruntime: directions, layouts, sequence_lens, activations, clip."""
from __future__ import annotations

import numpy as np
import pytest

from kiln.testing import check_model, make_node_model

T, B, I, H = 5, 3, 4, 6
GATES = {"RNN": 1, "LSTM": 4, "GRU": 3}
DIRS = ["forward", "reverse", "bidirectional"]


def _inputs(op: str, direction: str, layout: int = 0, bias: bool = True, lens: bool = False, init: bool = False,
            peep: bool = False, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    rng = rng or np.random.default_rng()
    d = 2 if direction == "bidirectional" else 1
    g = GATES[op]
    f = lambda *s: rng.uniform(-1, 1, s).astype(np.float32)  # noqa: E731
    feeds = {"X": f(B, T, I) if layout else f(T, B, I), "W": f(d, g * H, I), "R": f(d, g * H, H)}
    feeds["B" if bias else "_B"] = f(d, 2 * g * H)
    feeds["sequence_lens" if lens else "_sl"] = rng.integers(1, T + 1, B).astype(np.int32)
    state = (lambda: f(B, d, H)) if layout else (lambda: f(d, B, H))
    feeds["initial_h" if init else "_h"] = state()
    if op == "LSTM":
        feeds["initial_c" if init else "_c"] = state()
        feeds["P" if peep else "_p"] = f(d, 3 * H)
    return _trim(feeds)


def _trim(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop trailing omitted inputs so the node's input list ends with a real one."""
    keys = list(feeds)
    while keys and keys[-1].startswith("_"):
        feeds.pop(keys.pop())
    return feeds


def _check(op: str, feeds: dict[str, np.ndarray], outputs: list[str], attrs: dict, opset: int = 14) -> None:
    model = make_node_model(op, feeds, outputs, {"hidden_size": H, **attrs}, opset=opset)
    kept = [o for o in model.graph.output if o.name]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    check_model(model, {k: v for k, v in feeds.items() if not k.startswith("_")}, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", ["RNN", "LSTM", "GRU"])
@pytest.mark.parametrize("direction", DIRS)
@pytest.mark.parametrize("layout", [0, 1])
def test_directions_layouts(op: str, direction: str, layout: int) -> None:
    feeds = _inputs(op, direction, layout, init=True)
    outs = ["Y", "Y_h", "Y_c"] if op == "LSTM" else ["Y", "Y_h"]
    _check(op, feeds, outs, {"direction": direction, "layout": layout})


@pytest.mark.parametrize("op", ["RNN", "LSTM", "GRU"])
@pytest.mark.parametrize("direction", DIRS)
def test_sequence_lens(op: str, direction: str) -> None:
    feeds = _inputs(op, direction, lens=True, init=True)
    outs = ["Y", "Y_h", "Y_c"] if op == "LSTM" else ["Y", "Y_h"]
    _check(op, feeds, outs, {"direction": direction})


@pytest.mark.parametrize("op", ["RNN", "LSTM", "GRU"])
def test_no_bias_only_y_h(op: str) -> None:
    feeds = _inputs(op, "forward", bias=False)
    _check(op, feeds, ["", "Y_h"], {})


@pytest.mark.parametrize("op", ["RNN", "LSTM", "GRU"])
def test_clip(op: str) -> None:
    feeds = _inputs(op, "bidirectional")
    feeds["X"] *= 4
    _check(op, feeds, ["Y", "Y_h"], {"direction": "bidirectional", "clip": 0.5})


@pytest.mark.parametrize("acts,alpha,beta", [
    (["Relu"], None, None),
    (["LeakyRelu"], [0.3], None),
    (["HardSigmoid"], [0.3], [0.4]),
    (["Softsign"], None, None),
    (["Affine"], [0.7], [0.1]),
])
def test_rnn_activations(acts: list[str], alpha: list[float] | None, beta: list[float] | None) -> None:
    attrs: dict = {"activations": acts}
    if alpha:
        attrs["activation_alpha"] = alpha
    if beta:
        attrs["activation_beta"] = beta
    _check("RNN", _inputs("RNN", "forward"), ["Y", "Y_h"], attrs)


def test_rnn_bidirectional_activations() -> None:
    attrs = {"direction": "bidirectional", "activations": ["LeakyRelu", "Tanh"], "activation_alpha": [0.2]}
    _check("RNN", _inputs("RNN", "bidirectional"), ["Y", "Y_h"], attrs)


def test_lstm_peepholes_input_forget() -> None:
    feeds = _inputs("LSTM", "bidirectional", lens=True, init=True, peep=True)
    _check("LSTM", feeds, ["Y", "Y_h", "Y_c"], {"direction": "bidirectional", "input_forget": 1})


def test_lstm_activations() -> None:
    attrs = {"activations": ["HardSigmoid", "Softsign", "Elu"], "activation_alpha": [0.25, 0.9],
             "activation_beta": [0.45]}
    _check("LSTM", _inputs("LSTM", "forward", peep=True), ["Y", "Y_h", "Y_c"], attrs)


@pytest.mark.parametrize("lbr", [0, 1])
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_gru_linear_before_reset(lbr: int, direction: str) -> None:
    feeds = _inputs("GRU", direction, lens=True, init=True)
    _check("GRU", feeds, ["Y", "Y_h"], {"linear_before_reset": lbr, "direction": direction})


def test_gru_activations() -> None:
    attrs = {"activations": ["Sigmoid", "ScaledTanh"], "activation_alpha": [1.5], "activation_beta": [0.7]}
    _check("GRU", _inputs("GRU", "forward"), ["Y", "Y_h"], attrs)


@pytest.mark.parametrize("op", ["RNN", "LSTM", "GRU"])
def test_opset22(op: str) -> None:
    _check(op, _inputs(op, "forward", init=True), ["Y", "Y_h"], {}, opset=22)


def test_bad_activation_is_clear() -> None:
    from kiln.errors import KilnError
    feeds = _inputs("RNN", "forward")
    model = make_node_model("RNN", feeds, ["Y"], {"hidden_size": H, "activations": ["Gelu"]}, opset=14)
    with pytest.raises(KilnError, match="activation"):
        check_model(model, {k: v for k, v in feeds.items() if not k.startswith("_")})
