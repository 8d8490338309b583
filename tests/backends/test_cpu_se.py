"""cpu.se_gate (SEGate in C) against the op's formula in float64, and what it refuses.

The oracle is the SEGate reference run on float64 copies of the inputs and weights. Layouts: NCHW,
channels-last and a channel slice; maps small (one thread) and large (the OpenMP path).
"""
from __future__ import annotations

import pytest
import torch

from kiln.backends.cpu.se import _library
from kiln.backends.tactic import TacticContext, get_tactic
from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Value
from kiln.ir.types import TensorType
from kiln.ops.registry import lookup

pytestmark = pytest.mark.skipif(_library() is None, reason="no C compiler builds cpu.se_gate's kernel here")

PARAMS = {"Relu": (0.0, 0.0), "SiLU": (0.0, 0.0), "HardSwish": (0.0, 0.0), "": (0.0, 0.0),
          "Sigmoid": (0.0, 0.0), "HardSigmoid": (1.0 / 6.0, 0.5)}


def _rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def se_node(dtype: torch.dtype, c: int, r: int, shape: tuple = ("N", None, "H", "W"), act1: str = "SiLU",
            gate: str = "Sigmoid", seed: int = 0, w_dtype: torch.dtype | None = None) -> Node:
    """An SEGate over C channels with hidden size R (weights ~ N(0, 1/fan_in), biases ~ N(0, 1))."""
    wd = w_dtype or dtype
    shape = tuple(c if d is None else d for d in shape)
    ins = [Value("x", TensorType(DType.from_torch(dtype), shape)),
           Value("w1", const=_rand(r, c, seed=seed + 1, scale=c ** -0.5).to(wd)),
           Value("b1", const=_rand(r, seed=seed + 2).to(wd)),
           Value("w2", const=_rand(c, r, seed=seed + 3, scale=r ** -0.5).to(wd)),
           Value("b2", const=_rand(c, seed=seed + 4).to(wd))]
    out = Value("g", TensorType(DType.from_torch(dtype), (shape[0], c, 1, 1)))
    a1, b1 = PARAMS[act1]
    a2, b2 = PARAMS[gate]
    return Node("SEGate", ins, [out], {"reduce_activation": act1, "reduce_alpha": a1, "reduce_beta": b1,
                                       "gate_activation": gate, "gate_alpha": a2, "gate_beta": b2},
                name="se", domain="kiln", opset=1)


def _oracle(node: Node, x: torch.Tensor) -> torch.Tensor:
    """The SEGate formula in float64 on the same inputs and weights."""
    ws = [v.const.double() for v in node.inputs[1:]]  # type: ignore[union-attr]
    return lookup("SEGate", "kiln").compute(node, x.cpu().double(), *ws)


CPU = torch.device("cpu")
CTX = TacticContext(CPU)
TID = "cpu.se_gate"


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "nchw":
        return x.contiguous()
    if layout == "nhwc":
        return x.contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    big = torch.randn(n, c + 5, h, w, dtype=x.dtype).contiguous(memory_format=torch.channels_last)
    big[:, 3:3 + c] = x
    return big[:, 3:3 + c]


def _kernel(node):
    t = get_tactic(TID)
    assert t is not None and t.supports(node, CTX)
    return t.make(node, {}, CPU)


def _check(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and tuple(got.shape) == tuple(want.shape)
    err = (got.double() - want).abs().max().item()
    assert err <= 1e-5 * max(1.0, want.abs().max().item()), err


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "slice"])
@pytest.mark.parametrize("c,r,h,w,n,act1,gate", [
    (72, 24, 7, 5, 3, "SiLU", "Sigmoid"),
    (96, 4, 9, 11, 1, "Relu", "HardSigmoid"),
    (40, 10, 1, 1, 2, "HardSwish", "Sigmoid"),
    (20, 6, 3, 3, 1, "", "HardSigmoid"),
    (32, 8, 112, 112, 1, "SiLU", "Sigmoid"),  # a map large enough for the threads
])
def test_matches_float64(layout, c, r, h, w, n, act1, gate) -> None:
    node = se_node(torch.float32, c, r, act1=act1, gate=gate, seed=c)
    x = _layout(torch.randn(n, c, h, w) + 0.3, layout)
    kern = _kernel(node)
    got = kern(x)
    _check(got, _oracle(node, x))
    assert torch.equal(got, kern(x))


def test_inputs_it_was_not_made_for_run_the_reference() -> None:
    node = se_node(torch.float32, 24, 6)
    kern = _kernel(node)
    x64 = torch.randn(2, 24, 4, 4, dtype=torch.float64)
    assert kern(x64).dtype == torch.float64
    _check(kern(x64.float()), _oracle(node, x64.float()))
    with pytest.raises(ValueError, match="channels"):
        kern(torch.randn(1, 20, 4, 4))
    assert kern(torch.randn(0, 24, 4, 4)).shape == (0, 24, 1, 1)


def test_refusals() -> None:
    t = get_tactic(TID)
    assert t is not None
    assert not t.supports(se_node(torch.float16, 24, 6), CTX)
    assert not t.supports(se_node(torch.float32, 24, 6), TacticContext(torch.device("cuda")))
    short_bias = se_node(torch.float32, 24, 6)
    short_bias.inputs[2] = Value("b1", const=torch.zeros(5))
    assert not t.supports(short_bias, CTX)
    other_c = se_node(torch.float32, 24, 6)
    other_c.inputs[0] = Value("x", TensorType(DType.FLOAT32, ("N", 25, "H", "W")))
    assert not t.supports(other_c, CTX)
    runtime_w = se_node(torch.float32, 24, 6)
    runtime_w.inputs[3] = Value("w2", TensorType(DType.FLOAT32, (24, 6)))
    assert not t.supports(runtime_w, CTX)


# The kernel's code paths (native/se_gate.c): channels-last sums in blocks of up to 12 vectors of 16 channels
# (several blocks, then an 8-channel vector, then single channels), pixel runs of 64 with a few pixels a step;
# NCHW maps summed contiguously (1024-value chunks) or with a stride; one image split over threads by pixels
# (fewer than 128 channels a thread) or by channels; a batch shared out by images.

def _views(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """`x` [N, C, H, W] in every layout the kernel reads differently (equal values)."""
    n, c, h, w = x.shape
    cl_big = torch.randn(n, c + 3, h + 2, 2 * w + 1).contiguous(memory_format=torch.channels_last)
    cl_big[:, 1:1 + c, 1:1 + h, 1:1 + 2 * w:2] = x
    nchw_big = torch.randn(n, c + 2, h + 1, 2 * w)
    nchw_big[:, 2:, 1:, ::2] = x
    nchw_crop = torch.randn(n, c, h, w + 3)
    nchw_crop[..., :w] = x
    return {"nchw": x.contiguous(), "nhwc": x.contiguous(memory_format=torch.channels_last),
            "slice": _layout(x, "slice"),  # channels-last, pixels C + 5 floats apart
            "cl_crop": cl_big[:, 1:1 + c, 1:1 + h, 1:1 + 2 * w:2],  # rows that do not follow on
            "nchw_strided": nchw_big[:, 2:, 1:, ::2],  # W stride 2
            "nchw_crop": nchw_crop[..., :w]}  # contiguous rows, not maps


@pytest.mark.parametrize("c,h,w", [
    (1, 5, 7), (3, 2, 9), (7, 1, 1), (8, 3, 5), (15, 9, 8), (17, 5, 13), (24, 1, 1), (40, 11, 6), (200, 3, 3),
    (205, 8, 9), (208, 2, 5), (1160, 3, 2), (33, 13, 10), (48, 40, 40),
])
def test_channel_blocks_and_pixel_runs(c, h, w) -> None:
    """Channel counts around the blocks (1-7 single channels, 8-wide tail, 12- and 13-vector blocks), pixel
    counts around the steps and the 64-pixel runs (65, 130, 1600), 1x1 maps; every layout, two images."""
    node = se_node(torch.float32, c, max(1, c // 4), seed=c + h)
    kern = _kernel(node)
    x = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(c * h * w)) + 0.5
    want = _oracle(node, x)
    for name, v in _views(x).items():
        assert torch.equal(v, x), name
        got = kern(v)
        _check(got, want)
        assert torch.equal(got, kern(v)), name


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("c,h,w,n", [(24, 30, 31, 1), (96, 7, 9, 1), (272, 9, 10, 1), (1160, 3, 3, 1),
                                     (40, 6, 5, 3), (1, 17, 19, 1)])
def test_threads(monkeypatch, threads, c, h, w, n) -> None:
    """Every map on `threads` threads (PARALLEL_MIN 0): pixel split (few channels), channel split (272 and
    1160 channels), images shared out (n = 3); equal to float64, and to itself on the same thread count."""
    from kiln.backends.cpu import se
    monkeypatch.setattr(se, "PARALLEL_MIN", 0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        node = se_node(torch.float32, c, max(1, c // 6), act1="HardSwish", gate="HardSigmoid", seed=h)
        kern = _kernel(node)
        x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(threads + c)) - 0.2
        want = _oracle(node, x)
        for name, v in _views(x).items():
            got = kern(v)
            _check(got, want)
            assert torch.equal(got, kern(v)), name
    finally:
        torch.set_num_threads(before)


def test_batch_is_computed_per_image() -> None:
    """Shared-out images are each computed as alone: a batch gives each image's own result, bit for bit."""
    node = se_node(torch.float32, 72, 18)
    kern = _kernel(node)
    x = (torch.randn(5, 72, 12, 12) + 0.1).contiguous(memory_format=torch.channels_last)
    got = kern(x)
    _check(got, _oracle(node, x))
    for i in range(5):
        assert torch.equal(got[i:i + 1], kern(x[i:i + 1].contiguous(memory_format=torch.channels_last)))


@pytest.mark.parametrize("act1", ["", "Relu", "SiLU", "HardSwish"])
@pytest.mark.parametrize("gate", ["Sigmoid", "HardSigmoid"])
def test_activations_far_out(act1, gate) -> None:
    """Pre-activations from -150 to 150 (biases; the kernel's exponential clamps its argument to [-87, 88]),
    with small weights so that float32 rounds the pre-activations little: within 1e-5 of float64."""
    node = se_node(torch.float32, 40, 24, act1=act1, gate=gate, seed=3)
    node.inputs[2].const = torch.linspace(-120, 120, 24)
    node.inputs[3].const = node.inputs[3].const * 1e-3  # type: ignore[union-attr, operator]
    node.inputs[4].const = torch.cat([torch.linspace(-150, 150, 20), torch.linspace(-4, 4, 20)])
    kern = _kernel(node)
    x = torch.randn(3, 40, 5, 5, generator=torch.Generator().manual_seed(7)) * 2
    want = _oracle(node, x)
    assert (want < 1e-6).any() and (want > 1 - 1e-6).any() and ((want > 0.01) & (want < 0.99)).any()
    _check(kern(x.contiguous(memory_format=torch.channels_last)), want)


# ---- cpu.se_gate_bf16: a bfloat16 map (CPU BF16 builds) ----------------------------------------------------

@pytest.mark.parametrize("layout", ["nchw", "nhwc", "slice"])
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("c,r,h,w,n,act1,gate", [
    (72, 24, 7, 5, 3, "SiLU", "Sigmoid"),
    (96, 4, 9, 11, 1, "Relu", "HardSigmoid"),
    (32, 8, 56, 56, 2, "SiLU", "Sigmoid"),
])
def test_bf16_map_matches_float64_rounded_once(layout, w_dtype, c, r, h, w, n, act1, gate) -> None:
    node = se_node(torch.bfloat16, c, r, act1=act1, gate=gate, seed=c, w_dtype=w_dtype)
    t = get_tactic("cpu.se_gate_bf16")
    assert t is not None and t.supports(node, CTX) and not get_tactic(TID).supports(node, CTX)
    kern = t.make(node, {}, CPU)
    x = _layout((torch.randn(n, c, h, w) + 0.3).bfloat16(), layout)
    got = kern(x)
    assert got.dtype == torch.bfloat16 and tuple(got.shape) == (n, c, 1, 1)
    want = _oracle(node, x)  # float64 on the same bfloat16 values and weights, not rounded
    # the gate is rounded to bfloat16 once: within half a bfloat16 step (at most 2**-8 relative) of the formula,
    # plus the float32 mean's own rounding
    err = ((got.double() - want).abs() / want.abs().clamp_min(1e-3)).max().item()
    assert err <= 2.0 ** -8 + 1e-5, err
    out = torch.empty((n, c, 1, 1), dtype=torch.bfloat16)
    assert kern(x, out=out) is out and torch.equal(out, got)


def test_bf16_build_keeps_the_gate_in_bfloat16() -> None:
    """A CPU BF16 build lowers an SE block's gate too: no Cast layers around it, the gate on cpu.se_gate_bf16."""
    from kiln.backends.cpu.features import native_low_precision
    if not native_low_precision(DType.BFLOAT16):
        pytest.skip("this CPU has no BF16 instructions: a --bf16 CPU build is FP32 here")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from kiln.builder import Builder, BuilderConfig
    from kiln.logger import Logger
    from kiln.runtime.engine import Engine
    from kiln.testing import run_oracle
    rng = np.random.default_rng()
    c, r = 32, 8
    inits = [numpy_helper.from_array((rng.standard_normal(s) * k).astype(np.float32), name) for name, s, k in (
        ("wc", (c, 3, 3, 3), 0.3), ("w1", (r, c, 1, 1), c ** -0.5), ("b1", (r,), 1.0), ("w2", (c, r, 1, 1), r ** -0.5),
        ("b2", (c,), 1.0))]
    nodes = [helper.make_node("Conv", ["x", "wc"], ["f"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["f"], ["a"]),
             helper.make_node("GlobalAveragePool", ["a"], ["m"]),
             helper.make_node("Conv", ["m", "w1", "b1"], ["h"]),
             helper.make_node("Relu", ["h"], ["hr"]),
             helper.make_node("Conv", ["hr", "w2", "b2"], ["g"]),
             helper.make_node("Sigmoid", ["g"], ["gs"]),
             helper.make_node("Mul", ["a", "gs"], ["y"])]
    g = helper.make_graph(nodes, "se", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 40, 40])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    plan = Builder(Logger()).build(m, BuilderConfig(device="cpu", bf16=True))
    steps = plan.graph["steps"]
    assert any(s["tactic"] == "cpu.se_gate_bf16" for s in steps), [(s["op"], s["tactic"]) for s in steps]
    assert sum(s["op"] == "Cast" for s in steps) <= 2, [(s["op"], s["tactic"]) for s in steps]  # input and output
    x = rng.standard_normal((1, 3, 40, 40)).astype(np.float32)
    got = Engine(plan).create_execution_context().execute({"x": x})["y"]
    want = run_oracle(m, {"x": x})[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-2
