"""CausalConvWithState against onnxruntime."""
from __future__ import annotations

import numpy as np
import pytest

from kiln.testing import check_model, make_node_model


@pytest.mark.parametrize("k", [1, 3, 4])
@pytest.mark.parametrize("length", [1, 2, 6])
@pytest.mark.parametrize("bias,past", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("activation", ["none", "silu", "swish"])
def test_causal_conv_with_state(k: int, length: int, bias: bool, past: bool, activation: str) -> None:
    rng = np.random.default_rng()
    b, c = 2, 3
    feeds = {"x": rng.standard_normal((b, c, length)).astype(np.float32),
             "w": rng.standard_normal((c, 1, k)).astype(np.float32)}
    feeds["bias" if bias else "_bias"] = rng.standard_normal(c).astype(np.float32)
    if past:
        feeds["past"] = rng.standard_normal((b, c, k - 1)).astype(np.float32)
    else:
        feeds.pop("_bias", None)
    model = make_node_model("CausalConvWithState", feeds, ["y", "state"], {"activation": activation}, opset=27)
    check_model(model, {n: v for n, v in feeds.items() if not n.startswith("_")})


def test_causal_conv_with_state_fp16() -> None:
    rng = np.random.default_rng()
    feeds = {"x": rng.standard_normal((1, 4, 5)).astype(np.float16),
             "w": rng.standard_normal((4, 1, 3)).astype(np.float16)}
    model = make_node_model("CausalConvWithState", feeds, ["y", "state"], {"activation": "silu"}, opset=27)
    check_model(model, feeds, rtol=2e-3, atol=2e-3)


def test_bad_activation_is_clear() -> None:
    from kiln.errors import KilnError
    rng = np.random.default_rng()
    feeds = {"x": rng.standard_normal((1, 2, 3)).astype(np.float32),
             "w": rng.standard_normal((2, 1, 2)).astype(np.float32)}
    model = make_node_model("CausalConvWithState", feeds, ["y", "state"], {"activation": "gelu"}, opset=27)
    with pytest.raises(KilnError, match="activation"):
        check_model(model, feeds)
