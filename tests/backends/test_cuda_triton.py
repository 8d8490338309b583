"""Triton tactics (conv, GEMM, pointwise) against the reference implementations on random inputs.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, small shapes, CPU
tensors); with one they run compiled on CUDA. Triton is a ~290 MB wheel that CI does not install:
when it is absent these tests skip.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton.jit

pytest.importorskip("triton", reason="triton is not installed (pip install triton; the test extra has it): Triton tactics untested")

from kiln.backends.tactic import TacticContext, get_tactic  # noqa: E402
from kiln.ir.dtype import DType  # noqa: E402
from kiln.ir.graph import Node, Value  # noqa: E402
from kiln.ir.types import TensorType  # noqa: E402
from kiln.ops.registry import lookup  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    assert not torch.isnan(got).any(), "NaN in output"
    return float((got - want).abs().max() / max(want.abs().max().item(), 1e-30))


def _val(name: str, t: torch.Tensor | None = None, shape: tuple[int, ...] | None = None,
         dtype: torch.dtype = torch.float32) -> Value:
    if t is not None:
        return Value(name, const=t)
    return Value(name, TensorType(DType.from_torch(dtype), shape))


def fused_conv(x_shape, w, b, z_shape, out_shape, dtype, **attrs) -> Node:
    ins = [_val("x", shape=x_shape, dtype=dtype), _val("w", w), None if b is None else _val("b", b),
           None if z_shape is None else _val("z", shape=z_shape, dtype=dtype)]
    while ins and ins[-1] is None:
        ins.pop()
    return Node("FusedConv", ins, [_val("y", shape=out_shape, dtype=dtype)], attrs, name="conv", domain="kiln")


def _ctx(level: int = 3) -> TacticContext:
    return TacticContext(DEV, fp16=True, extra={"opt_level": level})


def _check(tactic_id: str, node: Node, inputs: list, dtype: torch.dtype, max_cfgs: int = 2) -> None:
    t = get_tactic(tactic_id)
    assert t is not None and t.supports(node, _ctx()), f"{tactic_id} should support {node.op_type}"
    ref = lookup(node.op_type, node.domain).compute
    const_args = [None if v is None else (v.const.to(DEV) if v.is_const else None) for v in node.inputs]
    args = [a if a is not None else c for a, c in zip(inputs + [None] * len(const_args), const_args)]
    want = ref(node, *[a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args])
    cfgs = t.configs(node, _ctx())
    assert cfgs
    for cfg in cfgs[:max_cfgs]:
        kern = t.make(node, cfg, DEV)
        got = kern(*inputs)
        assert got.shape == want.shape and got.dtype == dtype
        err = rel_err(got, want)
        assert err <= TOL[dtype], f"{tactic_id} {cfg}: rel err {err:.3g}"


CONV_CASES = [
    # (N, C, H, W, K, kernel, stride, pads, dilation)
    (2, 8, 7, 6, 16, 3, 1, [1, 1, 1, 1], 1),
    (1, 16, 9, 9, 24, 3, 2, [1, 1, 1, 1], 1),
    (2, 3, 11, 11, 16, 7, 2, [3, 3, 3, 3], 1),
    (1, 8, 6, 6, 16, 1, 1, [0, 0, 0, 0], 1),
    (1, 8, 8, 7, 16, 1, 2, [0, 0, 0, 0], 1),
    (1, 8, 8, 8, 16, 3, 2, [0, 0, 1, 1], 1),
    (1, 8, 9, 9, 8, 3, 1, [2, 2, 2, 2], 2),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_conv_geometry(case, dtype) -> None:
    n, c, h, w, k, ks, s, pads, d = case
    g = torch.Generator().manual_seed(CONV_CASES.index(case))
    wt = (torch.randn(k, c, ks, ks, generator=g) / (c * ks * ks) ** 0.5).to(dtype)
    bias = torch.randn(k, generator=g).to(dtype)
    oh = (h + pads[0] + pads[2] - d * (ks - 1) - 1) // s + 1
    ow = (w + pads[1] + pads[3] - d * (ks - 1) - 1) // s + 1
    node = fused_conv((n, c, h, w), wt, bias, None, (n, k, oh, ow), dtype, strides=[s, s], pads=pads,
                      dilations=[d, d], group=1, activation="Relu")
    x = torch.randn(n, c, h, w, generator=g).to(dtype).to(DEV).contiguous(memory_format=torch.channels_last)
    _check("cuda.triton_conv", node, [x], dtype)


@pytest.mark.parametrize("act,alpha,beta", [("", 0, 0), ("LeakyRelu", 0.1, 0), ("Clip", -0.5, 0.7), ("Sigmoid", 0, 0),
                                            ("Tanh", 0, 0), ("SiLU", 0, 0), ("HardSwish", 0, 0),
                                            ("HardSigmoid", 0.2, 0.5), ("Mish", 0, 0), ("Gelu", 0, 0),
                                            ("GeluTanh", 0, 0)])
def test_triton_conv_activations(act, alpha, beta) -> None:
    dtype = torch.float16
    g = torch.Generator().manual_seed(1)
    wt = (torch.randn(16, 8, 3, 3, generator=g) / 8.5).to(dtype)
    node = fused_conv((1, 8, 5, 5), wt, torch.randn(16, generator=g).to(dtype), None, (1, 16, 5, 5), dtype,
                      strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1], group=1, activation=act,
                      alpha=alpha, beta=beta)
    x = torch.randn(1, 8, 5, 5, generator=g).to(dtype).to(DEV)
    _check("cuda.triton_conv", node, [x], dtype, max_cfgs=1)


@pytest.mark.parametrize("act_before_add", [0, 1])
def test_triton_conv_residual_and_sliced_input(act_before_add) -> None:
    dtype = torch.float16
    g = torch.Generator().manual_seed(2)
    wt = (torch.randn(16, 8, 3, 3, generator=g) / 8.5).to(dtype)
    node = fused_conv((2, 8, 6, 6), wt, torch.randn(16, generator=g).to(dtype), (2, 16, 6, 6), (2, 16, 6, 6), dtype,
                      strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1], group=1, activation="Relu",
                      act_before_add=act_before_add)
    big = torch.randn(2, 16, 6, 6, generator=g).to(dtype).to(DEV).contiguous(memory_format=torch.channels_last)
    x = big[:, 8:]  # channel slice of an NHWC tensor: a strided view, read without a copy
    z = torch.randn(2, 16, 6, 6, generator=g).to(dtype).to(DEV)  # NCHW residual
    _check("cuda.triton_conv", node, [x, None, None, z], dtype)


def test_triton_conv_without_bias_fp32() -> None:
    g = torch.Generator().manual_seed(3)
    node = fused_conv((1, 4, 5, 5), torch.randn(8, 4, 3, 3, generator=g), None, None, (1, 8, 3, 3), torch.float32,
                      strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1], group=1, activation="")
    x = torch.randn(1, 4, 5, 5, generator=g).to(DEV)
    _check("cuda.triton_conv", node, [x], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_z", [False, True])
def test_triton_gemm_fused_gemm(dtype, with_z) -> None:
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(24, 40, generator=g) / 6).to(dtype)
    ins = [_val("a", shape=(2, 5, 40), dtype=dtype), _val("w", w), _val("b", torch.randn(24, generator=g).to(dtype))]
    if with_z:
        ins.append(_val("z", shape=(2, 5, 24), dtype=dtype))
    node = Node("FusedGemm", ins, [_val("y", shape=(2, 5, 24), dtype=dtype)],
                {"activation": "GeluTanh", "act_before_add": 1}, name="fc", domain="kiln")
    a = torch.randn(2, 5, 40, generator=g).to(dtype).to(DEV)
    z = torch.randn(2, 5, 24, generator=g).to(dtype).to(DEV) if with_z else None
    _check("cuda.triton_gemm", node, [a, None, None] + ([z] if with_z else []), dtype)


def test_triton_gemm_matmul_const() -> None:
    g = torch.Generator().manual_seed(5)
    node = Node("MatMul", [_val("a", shape=(7, 32)), _val("b", torch.randn(32, 20, generator=g))],
                [_val("y", shape=(7, 20))], name="mm")
    a = torch.randn(7, 32, generator=g).to(DEV)
    _check("cuda.triton_gemm", node, [a], torch.float32)


def test_triton_gemm_conv1x1_nhwc_with_residual() -> None:
    dtype = torch.float16
    g = torch.Generator().manual_seed(6)
    wt = (torch.randn(32, 16, 1, 1, generator=g) / 4).to(dtype)
    node = fused_conv((2, 16, 5, 5), wt, torch.randn(32, generator=g).to(dtype), (2, 32, 5, 5), (2, 32, 5, 5), dtype,
                      strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1], group=1, activation="Relu")
    x = torch.randn(2, 16, 5, 5, generator=g).to(dtype).to(DEV).contiguous(memory_format=torch.channels_last)
    z = torch.randn(2, 32, 5, 5, generator=g).to(dtype).to(DEV).contiguous(memory_format=torch.channels_last)
    _check("cuda.triton_gemm", node, [x, None, None, z], dtype)


def _pointwise(program, consts, in_specs, out_shape, dtype=torch.float16) -> Node:
    ins = [_val(f"i{k}", shape=s, dtype=dt) for k, (s, dt) in enumerate(in_specs)]
    return Node("Pointwise", ins, [_val("y", shape=out_shape, dtype=dtype)],
                {"program": program, "consts": consts, "outputs": [f"t{len(program) - 1}"]},
                name="pw", domain="kiln")


def test_triton_pointwise_bias_relu_nhwc() -> None:
    f16 = torch.float16
    node = _pointwise([{"op": "Add", "args": ["i0", "i1"], "attrs": {}}, {"op": "Relu", "args": ["t0"], "attrs": {}}],
                      [], [((2, 8, 5, 5), f16), ((1, 8, 1, 1), f16)], (2, 8, 5, 5))
    x = torch.randn(2, 8, 5, 5).to(f16).to(DEV).contiguous(memory_format=torch.channels_last)
    b = torch.randn(1, 8, 1, 1).to(f16).to(DEV)
    _check("cuda.triton_pointwise", node, [x, b], f16)


def test_triton_pointwise_many_ops() -> None:
    f16 = torch.float16
    prog = [
        {"op": "Sigmoid", "args": ["i0"], "attrs": {}},
        {"op": "Mul", "args": ["i0", "t0"], "attrs": {}},                    # SiLU
        {"op": "Clip", "args": ["t1", "c0", "c1"], "attrs": {}},
        {"op": "LeakyRelu", "args": ["i1"], "attrs": {"alpha": 0.2}},
        {"op": "Add", "args": ["t2", "t3"], "attrs": {}},
        {"op": "Gelu", "args": ["t4"], "attrs": {}},
        {"op": "Pow", "args": ["t5", "c2"], "attrs": {}},
        {"op": "Max", "args": ["t6", "i2", "t0"], "attrs": {}},
        {"op": "Where", "args": ["i3", "t7", "i1"], "attrs": {}},
        {"op": "Tanh", "args": ["t8"], "attrs": {}},
    ]
    node = _pointwise(prog, [-0.5, 2.0, 2.0], [((3, 4, 6), f16), ((4, 6), f16), ((), f16), ((3, 1, 6), torch.bool)],
                      (3, 4, 6))
    x0 = torch.randn(3, 4, 6).to(f16).to(DEV)
    x1 = torch.randn(4, 6).to(f16).to(DEV)
    x2 = torch.tensor(0.1).to(f16).to(DEV)
    x3 = (torch.rand(3, 1, 6) > 0.5).to(DEV)
    _check("cuda.triton_pointwise", node, [x0, x1, x2, x3], f16)


def test_triton_pointwise_transposed_input_fp32() -> None:
    node = _pointwise([{"op": "Sub", "args": ["i0", "i1"], "attrs": {}}, {"op": "Abs", "args": ["t0"], "attrs": {}}],
                      [], [((5, 7), torch.float32), ((5, 7), torch.float32)], (5, 7), torch.float32)
    a = torch.randn(7, 5).to(DEV).t()
    b = torch.randn(5, 7).to(DEV)
    _check("cuda.triton_pointwise", node, [a, b], torch.float32)


def test_triton_tactics_refuse_what_they_cannot_run() -> None:
    f16 = torch.float16
    grouped = fused_conv((1, 8, 5, 5), torch.randn(8, 4, 3, 3).to(f16), None, None, (1, 8, 5, 5), f16,
                         strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1], group=2, activation="")
    assert not get_tactic("cuda.triton_conv").supports(grouped, _ctx())
    cmp = _pointwise([{"op": "Equal", "args": ["i0", "i1"], "attrs": {}}], [], [((4,), f16), ((4,), f16)], (4,))
    assert not get_tactic("cuda.triton_pointwise").supports(cmp, _ctx())


def test_triton_pointwise_comparisons_and_logic() -> None:
    f32 = torch.float32
    prog = [
        {"op": "Greater", "args": ["i0", "i1"], "attrs": {}},
        {"op": "Less", "args": ["i0", "c0"], "attrs": {}},
        {"op": "Or", "args": ["t0", "t1"], "attrs": {}},
        {"op": "Not", "args": ["t2"], "attrs": {}},
        {"op": "PRelu", "args": ["i0", "i1"], "attrs": {}},
        {"op": "Swish", "args": ["i1"], "attrs": {}},
        {"op": "Mean", "args": ["t4", "t5", "i0"], "attrs": {}},
        {"op": "Sign", "args": ["i1"], "attrs": {}},
        {"op": "Where", "args": ["t3", "t6", "t7"], "attrs": {}},
    ]
    node = _pointwise(prog, [-0.3], [((2, 3, 4), f32), ((3, 1), f32)], (2, 3, 4), f32)
    _check("cuda.triton_pointwise", node, [torch.randn(2, 3, 4).to(DEV), torch.randn(3, 1).to(DEV)], f32)


def test_triton_split_k_conv_and_gemm() -> None:
    """Few output tiles, long reduction: split-K configs are offered and sum the partial products right."""
    f16 = torch.float16
    g = torch.Generator().manual_seed(7)
    wt = (torch.randn(32, 128, 3, 3, generator=g) / 34).to(f16)
    node = fused_conv((1, 128, 4, 4), wt, torch.randn(32, generator=g).to(f16), (1, 32, 4, 4), (1, 32, 4, 4), f16,
                      strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1], group=1, activation="Relu")
    t = get_tactic("cuda.triton_conv")
    split = [c for c in t.configs(node, _ctx()) if c.get("SPLIT_K", 1) > 1]
    assert split, "a small-M, long-K conv should get split-K configs"
    x = torch.randn(1, 128, 4, 4, generator=g).to(f16).to(DEV)
    z = torch.randn(1, 32, 4, 4, generator=g).to(f16).to(DEV)
    want = lookup("FusedConv", "kiln").compute(node, x.float(), wt.float().to(DEV),
                                               node.inputs[2].const.float().to(DEV), z.float())
    for cfg in split:
        for _ in range(2):  # a second run must start from a fresh (zeroed) workspace
            got = t.make(node, cfg, DEV)(x, None, None, z)
            assert rel_err(got, want) <= TOL[f16], cfg
    w = (torch.randn(24, 2048, generator=g) / 45).to(f16)
    gemm = Node("FusedGemm", [_val("a", shape=(3, 2048), dtype=f16), _val("w", w)],
                [_val("y", shape=(3, 24), dtype=f16)], {"activation": ""}, name="fc", domain="kiln")
    tg = get_tactic("cuda.triton_gemm")
    split = [c for c in tg.configs(gemm, _ctx()) if c.get("SPLIT_K", 1) > 1]
    assert split
    a = torch.randn(3, 2048, generator=g).to(f16).to(DEV)
    want = a.float() @ w.float().to(DEV).t()
    for cfg in split:
        assert rel_err(tg.make(gemm, cfg, DEV)(a), want) <= TOL[f16], cfg


# ---- destination passing (elided Concats) and folded Casts -------------------------------------------
def _conv_node(k: int, ks: int, dtype: torch.dtype, x_dtype: torch.dtype | None = None,
               out_dtype: torch.dtype | None = None, seed: int = 7) -> tuple[Node, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    wt = (torch.randn(k, 8, ks, ks, generator=g) / (8 * ks * ks) ** 0.5).to(dtype)
    attrs: dict = dict(strides=[1, 1], pads=[ks // 2] * 4, dilations=[1, 1], group=1, activation="LeakyRelu", alpha=0.1)
    if out_dtype is not None:
        attrs["out_dtype"] = DType.from_torch(out_dtype).onnx
    node = fused_conv((2, 8, 5, 6), wt, torch.randn(k, generator=g).to(dtype), None, (2, k, 5, 6), dtype, **attrs)
    node.inputs[0].type = TensorType(DType.from_torch(x_dtype or dtype), (2, 8, 5, 6))
    node.outputs[0].type = TensorType(DType.from_torch(out_dtype or dtype), (2, k, 5, 6))
    return node, torch.randn(2, 8, 5, 6, generator=g).to(x_dtype or dtype).to(DEV)


@pytest.mark.parametrize("tactic_id,ks", [("cuda.triton_conv", 3), ("cuda.triton_gemm", 1)])
@pytest.mark.parametrize("homes", [1, 2])
def test_conv_writes_into_concat_slices(tactic_id: str, ks: int, homes: int) -> None:
    """out= one or two channel slices of channels-last buffers: the result lands there, nothing else changes."""
    dtype = torch.float16
    node, x = _conv_node(16, ks, dtype)
    t = get_tactic(tactic_id)
    assert t.writes_out >= homes and t.supports(node, _ctx())
    want = lookup("FusedConv", "kiln").compute(node, x.float(), node.inputs[1].const.float().to(DEV),
                                                node.inputs[2].const.float().to(DEV))
    bufs = [torch.randn(2, 40, 5, 6).to(dtype).to(DEV).contiguous(memory_format=torch.channels_last)
            for _ in range(homes)]
    before = [b.clone() for b in bufs]
    outs = tuple(b[:, 8 + 4 * k: 24 + 4 * k] for k, b in enumerate(bufs))
    kern = t.make(node, t.configs(node, _ctx())[0], DEV)
    got = kern(x, out=outs[0] if homes == 1 else outs)
    assert got.data_ptr() == outs[0].data_ptr()
    for k, (b, b0) in enumerate(zip(bufs, before)):
        lo, hi = 8 + 4 * k, 24 + 4 * k
        assert rel_err(b[:, lo:hi], want) <= TOL[dtype]
        assert torch.equal(b[:, :lo], b0[:, :lo]) and torch.equal(b[:, hi:], b0[:, hi:])


@pytest.mark.parametrize("tactic_id,ks", [("cuda.triton_conv", 3), ("cuda.triton_gemm", 1)])
def test_conv_with_folded_casts(tactic_id: str, ks: int) -> None:
    """float32 input converted on load, float16 weights, float32 output converted on store."""
    node, x = _conv_node(16, ks, torch.float16, x_dtype=torch.float32, out_dtype=torch.float32)
    t = get_tactic(tactic_id)
    assert t.supports(node, _ctx())
    assert get_tactic("cuda.cudnn_conv").supports(node, _ctx())  # with separate conversions around cuDNN
    want = lookup("FusedConv", "kiln").compute(node, x, node.inputs[1].const.to(DEV), node.inputs[2].const.to(DEV))
    assert want.dtype == torch.float32
    got = t.make(node, t.configs(node, _ctx())[0], DEV)(x)
    assert got.dtype == torch.float32 and rel_err(got, want) <= TOL[torch.float16]


def test_out_of_the_wrong_shape_is_refused() -> None:
    node, x = _conv_node(16, 3, torch.float16)
    t = get_tactic("cuda.triton_conv")
    kern = t.make(node, t.configs(node, _ctx())[0], DEV)
    bad = torch.empty(2, 16, 4, 6, dtype=torch.float16, device=DEV)
    with pytest.raises(Exception, match="shape"):
        kern(x, out=bad)
