"""Triton LayerNormalization and global average pooling tactics against the op references on random inputs.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, small shapes, CPU
tensors); with one they run compiled on CUDA. When triton is absent these tests skip. Float32 results
are compared with the reference; float16 / bfloat16 results with a float64 computation of the same
formula (the kernels keep float32 statistics and round once, the reference rounds in between).
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton.jit

pytest.importorskip("triton", reason="triton is not installed (pip install triton; the test extra has it): Triton tactics untested")

from kiln.backends.tactic import TacticContext, candidate_tactics, get_tactic  # noqa: E402
from kiln.ir.dtype import DType  # noqa: E402
from kiln.ir.graph import Node, Value  # noqa: E402
from kiln.ir.types import TensorType  # noqa: E402
from kiln.ops.registry import lookup  # noqa: E402
from tests.backends.test_cuda_pool import _layout  # noqa: E402  (NCHW, NHWC and channel-slice inputs)

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CTX = TacticContext(DEV, fp16=True)
CUDA_CTX = TacticContext(torch.device("cuda"), fp16=True)  # candidate lists only: nothing runs there
CL = torch.channels_last
LN, GAP = "cuda.triton_layernorm", "cuda.triton_global_avgpool"


def _x(name: str, dtype: torch.dtype, shape: tuple | None) -> Value:
    return Value(name, TensorType(DType.from_torch(dtype), shape))


def _rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0, scale: float = 1.0,
          shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype).to(DEV)


def _kernel(tactic_id: str, node: Node, cfg: int = 0):
    t = get_tactic(tactic_id)
    assert t is not None and t.supports(node, CTX), f"{tactic_id} should support {node}"
    assert t.writes_out and t.devices == ("cuda",) and t.priority == 20
    return t.make(node, t.configs(node, CTX)[cfg], DEV)


def _reference(node: Node, *xs: torch.Tensor | None) -> torch.Tensor:
    dev = next(x.device for x in xs if x is not None)
    consts = [None if v is None or v.const is None else v.const.to(dev) for v in node.inputs[len(xs):]]
    return lookup(node.op_type, node.domain).compute(node, *xs, *consts)


def _close(got: torch.Tensor, want64: torch.Tensor, dtype: torch.dtype) -> None:
    """got (dtype) against a float64 result: 1e-5 for float32, 1e-2 (relative to the values' scale) else."""
    assert got.dtype == dtype and got.shape == want64.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    err = (got.double() - want64).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, want64.abs().max().item() if got.numel() else 1.0)
    assert err <= tol * scale, f"max abs error {err:.3g} (scale {scale:.3g}, dtype {dtype})"


# ---- LayerNormalization ---------------------------------------------------------------------------

def layernorm(dtype: torch.dtype, shape: tuple, axis: int = -1, bias: bool = True, eps: float = 1e-5,
              outputs: int = 1, seed: int = 0, param_dtype: torch.dtype | None = None, **attrs) -> Node:
    rank = len(shape)
    inner = shape[axis % rank:]
    pdt = param_dtype or dtype
    ins = [_x("x", dtype, shape),
           Value("scale", const=_rand(*inner, seed=seed + 1, scale=0.5, shift=1.0).cpu().to(pdt))]
    if bias:
        ins.append(Value("bias", const=_rand(*inner, seed=seed + 2).cpu().to(pdt)))
    outs = [_x("y", dtype, shape)] + [_x(f"o{i}", torch.float32, None) for i in range(1, outputs)]
    return Node("LayerNormalization", ins, outs, {"axis": axis, "epsilon": eps, **attrs}, name="ln", opset=17)


def _layernorm64(node: Node, x: torch.Tensor) -> torch.Tensor:
    """The LayerNormalization formula in float64 (scale and bias rounded to X's type, as the op does)."""
    axis = int(node.attr("axis", -1)) % x.dim()
    dims = list(range(axis, x.dim()))
    xd = x.double()
    d = xd - xd.mean(dims, keepdim=True)
    y = d * torch.rsqrt((d * d).mean(dims, keepdim=True) + float(node.attr("epsilon", 1e-5)))
    y = y * node.inputs[1].const.to(x.dtype).double().to(x.device)
    b = node.input(2)
    return y if b is None else y + b.const.to(x.dtype).double().to(x.device)


LN_CASES = [  # (shape, axis)
    ((4, 1), -1), ((3, 7), -1), ((2, 5, 197), -1), ((2, 3, 768), -1), ((2, 3000), -1),
    ((2, 3, 5, 7), -1), ((2, 4, 6, 9), -2), ((3, 5, 13), 1),
]


@pytest.mark.parametrize("shape,axis", LN_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_fp32_matches_reference(shape, axis, bias) -> None:
    node = layernorm(torch.float32, shape, axis, bias, seed=len(shape))
    x = _rand(*shape, seed=3, scale=2.0, shift=0.5)
    t = get_tactic(LN)
    for cfg in range(len(t.configs(node, CTX))):  # one pass and, for long rows, chunked
        got = _kernel(LN, node, cfg)(x, None, None)
        want = _reference(node, x)
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        _close(got, _layernorm64(node, x), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,axis", [((3, 7), -1), ((2, 5, 197), -1), ((2, 3000), -1), ((2, 4, 6, 9), -2)])
def test_rmsnorm_matches_float64(dtype, shape, axis) -> None:
    """RMSNormalization through the same kernel (RMS: no centring), every config, against the float64 formula."""
    inner = shape[axis % len(shape):]
    scale = _rand(*inner, seed=5, scale=0.5, shift=1.0).cpu().to(dtype)
    node = Node("RMSNormalization", [_x("x", dtype, shape), Value("scale", const=scale)], [_x("y", dtype, shape)],
                {"axis": axis, "epsilon": 1e-6}, name="rms", opset=23)
    x = _rand(*shape, seed=7, scale=2.0, shift=0.5, dtype=dtype)
    dims = list(range(axis % len(shape), len(shape)))
    xd = x.double()
    want = xd * torch.rsqrt((xd * xd).mean(dims, keepdim=True) + 1e-6) * scale.double().to(x.device)
    t = get_tactic(LN)
    for cfg in range(len(t.configs(node, CTX))):
        _close(_kernel(LN, node, cfg)(x, None), want, dtype)


def add_layernorm(dtype: torch.dtype, shape: tuple, axis: int, rms: bool, bias: bool, outputs: int,
                  seed: int = 0) -> Node:
    inner = shape[axis % len(shape):]
    ins = [_x("x", dtype, shape), _x("r", dtype, shape),
           Value("scale", const=_rand(*inner, seed=seed + 1, scale=0.5, shift=1.0).cpu().to(dtype))]
    if bias:
        ins.append(Value("bias", const=_rand(*inner, seed=seed + 2).cpu().to(dtype)))
    outs = [_x("y", dtype, shape)] + ([_x("s", dtype, shape)] if outputs == 2 else [])
    return Node("AddLayerNormalization", ins, outs, {"axis": axis, "epsilon": 1e-5, "rms": int(rms)},
                name="addln", domain="kiln", opset=1)


def _norm64(node: Node, s: torch.Tensor, dims: list[int], rms: bool) -> torch.Tensor:
    """AddLayerNormalization's Y in float64 from the (rounded) sum s: LayerNorm or RMSNorm over dims, Scale, B."""
    sd = s.double()
    d = sd if rms else sd - sd.mean(dims, keepdim=True)
    want = d * torch.rsqrt((d * d).mean(dims, keepdim=True) + 1e-5) * node.inputs[2].const.double().to(s.device)
    return want + node.inputs[3].const.double().to(s.device) if len(node.inputs) > 3 else want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,axis", [((3, 7), -1), ((2, 5, 197), -1), ((2, 3000), -1), ((2, 4, 6, 9), -2)])
@pytest.mark.parametrize("rms,bias", [(False, True), (False, False), (True, False)])
@pytest.mark.parametrize("outputs", [1, 2])
def test_add_layernorm_matches_float64(dtype, shape, axis, rms, bias, outputs) -> None:
    """AddLayerNormalization (kiln.passes.residual_norm): the residual added on load (rounded to X's type, as
    the Add it replaces), LayerNorm or RMSNorm of the sum, the sum stored when asked; every config (one pass,
    chunked) against the float64 formula on the rounded sum, and the op's reference within the same bound."""
    node = add_layernorm(dtype, shape, axis, rms, bias, outputs, seed=len(shape))
    x = _rand(*shape, seed=11, scale=2.0, shift=0.5, dtype=dtype)
    r = _rand(*shape, seed=12, scale=1.5, dtype=dtype)
    s = x + r  # X's type, as the op defines the sum
    dims = list(range(axis % len(shape), len(shape)))
    want = _norm64(node, s, dims, rms)
    t = get_tactic(LN)
    assert t.supports(node, CTX)
    for cfg in range(len(t.configs(node, CTX))):
        got = _kernel(LN, node, cfg)(x, r, None, None)
        if outputs == 2:
            got, got_sum = got
            assert torch.equal(got_sum, s)
        _close(got, want, dtype)
    ref = _reference(node, x, r)
    _close(ref[0] if outputs == 2 else ref, want, dtype)


@pytest.mark.parametrize("outputs", [1, 2])
def test_add_layernorm_stores_a_wider_y(outputs: int) -> None:
    """out_dtype float32 on a float16 norm (a folded Cast: BERT's last norm writing its float32 output): Y is stored
    in float32 from the float32 statistics (closer to float64 than a float16 Y), the sum in float16."""
    node = add_layernorm(torch.float16, (3, 96), -1, False, True, outputs, seed=5)
    node.attrs["out_dtype"] = 1
    node.outputs[0].type = TensorType(DType.FLOAT32, (3, 96))
    x = _rand(3, 96, seed=21, scale=2.0, shift=0.5, dtype=torch.float16)
    r = _rand(3, 96, seed=22, scale=1.5, dtype=torch.float16)
    want = _norm64(node, x + r, [1], rms=False)
    t = get_tactic(LN)
    assert t.supports(node, CTX)
    for cfg in range(len(t.configs(node, CTX))):
        got = _kernel(LN, node, cfg)(x, r, None, None)
        if outputs == 2:
            got, got_sum = got
            assert got_sum.dtype == torch.float16 and torch.equal(got_sum, x + r)
        assert got.dtype == torch.float32
        _close(got, want, torch.float32)
    ref = _reference(node, x, r)  # the op computes Y in X's type, then widens it
    ref = ref[0] if outputs == 2 else ref
    assert ref.dtype == torch.float32 and (ref.double() - want).abs().max().item() <= 1e-2 * want.abs().max().item()


@pytest.mark.parametrize("r_shape,layout", [((4, 6, 32), "transposed"), ((1, 6, 32), "dense"), ((4, 1, 32), "dense"),
                                            ((1, 6, 32), "transposed")])
def test_add_layernorm_residual_with_own_strides_or_broadcast(r_shape, layout) -> None:
    """A residual with other strides than X's (a transposed view) or broadcast over outer dims (ViT's position
    embedding [1, S, D] for every image) is read in place, by its own strides: no fallback, the reference's result."""
    node = add_layernorm(torch.float16, (4, 6, 32), -1, False, True, 2)
    node.inputs[1] = _x("r", torch.float16, r_shape)
    assert get_tactic(LN).supports(node, CTX)
    x = _rand(4, 6, 32, seed=1, dtype=torch.float16)
    r = _rand(*r_shape, seed=2, dtype=torch.float16)
    if layout == "transposed":
        r = _rand(r_shape[0], 32, r_shape[1], seed=2, dtype=torch.float16).transpose(1, 2)
    k = _kernel(LN, node)
    y, s = k(x, r, None, None)
    assert torch.equal(s, x + r)  # X's type, as the op defines the sum
    d = s.double() - s.double().mean(-1, keepdim=True)
    want = (d * torch.rsqrt((d * d).mean(-1, keepdim=True) + 1e-5) * node.inputs[2].const.double().to(x.device)
            + node.inputs[3].const.double().to(x.device))
    _close(y, want, torch.float16)
    assert k.fallback.reason is None


def test_add_layernorm_declines_residual_layouts_it_cannot_address() -> None:
    """A residual whose normalized dims are not one strided run (permuted among themselves) runs the op's
    reference; one that does not broadcast to X's shape is refused at build time."""
    node = add_layernorm(torch.float32, (4, 6, 8), -2, False, True, 2)
    x = _rand(4, 6, 8, seed=1)
    r = _rand(4, 8, 6, seed=2).transpose(1, 2)
    k = _kernel(LN, node)
    y, s = k(x, r, None, None)
    want_y, want_s = _reference(node, x, r)
    torch.testing.assert_close(y, want_y)
    torch.testing.assert_close(s, want_s)
    assert k.fallback.reason is not None
    bad = add_layernorm(torch.float32, (4, 6, 8), -1, False, True, 1)
    bad.inputs[1] = _x("r", torch.float32, (4, 3, 8))
    assert not get_tactic(LN).supports(bad, CTX)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,axis", [((3, 7), -1), ((2, 3, 768), -1), ((2, 3000), -1), ((2, 4, 6, 9), -2)])
def test_layernorm_half_types(dtype, shape, axis) -> None:
    node = layernorm(dtype, shape, axis, seed=5)
    x = _rand(*shape, dtype=dtype, seed=6, scale=3.0, shift=-1.0)
    want64 = _layernorm64(node, x)
    for cfg in range(len(get_tactic(LN).configs(node, CTX))):
        _close(_kernel(LN, node, cfg)(x, None, None), want64, dtype)
    _close(_reference(node, x), want64, dtype)  # the reference itself within the same bound


def test_layernorm_large_mean_is_stable() -> None:
    """Rows with a mean far above their spread (300 +- 0.01): the corrected mean and the shifted, pairwise
    merged chunk statistics keep the result to float32 rounding of the spread (torch's own float32
    mean-then-variance, the reference, is off by about 7e-3 here)."""
    node = layernorm(torch.float32, (2, 4000), bias=False, seed=7)
    x = _rand(2, 4000, seed=8, scale=0.01, shift=300.0)
    t = get_tactic(LN)
    cfgs = t.configs(node, CTX)
    assert any(c["BLOCK_D"] < 4000 for c in cfgs)
    for cfg in range(len(cfgs)):
        got = _kernel(LN, node, cfg)(x, None)
        err = (got.double() - _layernorm64(node, x)).abs().max().item()
        assert err < 1e-4, err


def test_layernorm_strided_rows_in_place_and_fallback() -> None:
    node = layernorm(torch.float32, ("B", "T", 24), bias=True, seed=9)
    kern = _kernel(LN, node)
    base = _rand(3, 9, 48, seed=10)
    views = {
        "token slice": base[:, 1:, :24],            # outer dims in two runs, rows of stride 1
        "every other": base[:, :, ::2],              # rows of element stride 2
        "batch-major transposed": base.transpose(0, 1)[:, :, 10:34],
    }
    for what, x in views.items():
        assert not x.is_contiguous()
        got = kern(x, None, None)
        torch.testing.assert_close(got, _reference(node, x), rtol=1e-5, atol=1e-5, msg=what)
    assert kern.fallback is not None and kern.fallback.reason is None  # all of those ran the kernel
    # the normalized dims permuted among themselves: not one run -> the reference, still correct
    node2 = layernorm(torch.float32, ("B", 6, 8), axis=1, seed=11)
    kern2 = _kernel(LN, node2)
    kern2.fallback.quiet = True
    x = _rand(2, 8, 6, seed=12).transpose(1, 2)
    got = kern2(x, None, None)
    assert kern2.fallback.reason is not None
    torch.testing.assert_close(got, _reference(node2, x), rtol=1e-5, atol=1e-5)


def test_layernorm_channels_last_4d_and_out() -> None:
    """[N, H, W, C] held channels-last (its last dim strided) normalizes in place; out= is written."""
    node = layernorm(torch.float16, ("N", 5, 6, 16), seed=13)
    kern = _kernel(LN, node)
    x = _rand(2, 5, 6, 16, dtype=torch.float16, seed=14).contiguous(memory_format=CL)
    assert x.stride(3) != 1
    want64 = _layernorm64(node, x)
    _close(kern(x, None, None), want64, torch.float16)
    out = torch.empty(2, 5, 6, 16, dtype=torch.float16, device=DEV).contiguous(memory_format=CL)
    assert kern(x, None, None, out=out) is out
    _close(out, want64, torch.float16)
    buf = torch.zeros(2, 5, 6, 20, dtype=torch.float16, device=DEV)
    assert kern(x, None, None, out=buf[..., 2:18]) is not None
    _close(buf[..., 2:18], want64, torch.float16)
    assert not buf[..., :2].any() and not buf[..., 18:].any()
    assert kern.fallback.reason is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rms", [False, True])
def test_layernorm_channels_first_column_form(dtype, rms) -> None:
    """timm's LayerNorm2d as exported (NCHW -> Transpose [0,2,3,1] -> norm over C): the rows are adjacent in memory,
    each row's elements H*W apart. The column-form configurations are offered and every configuration matches the
    float64 formula in place, its output laid out like the input (Transpose back: NCHW again), and into out=."""
    shape = (2, 5, 7, 24)  # [N, H, W, C]
    if rms:
        scale = _rand(24, seed=30, scale=0.5, shift=1.0).cpu().to(dtype)
        node = Node("RMSNormalization", [_x("x", dtype, shape), Value("scale", const=scale)], [_x("y", dtype, shape)],
                    {"axis": -1, "epsilon": 1e-6}, name="rms", opset=23)
    else:
        node = layernorm(dtype, shape, seed=31)
    t = get_tactic(LN)
    cfgs = t.configs(node, CTX)
    assert sum(1 for c in cfgs if c.get("COLS")) == 2
    x = _rand(2, 24, 5, 7, dtype=dtype, seed=32, scale=1.5, shift=0.3).permute(0, 2, 3, 1)
    assert x.stride(3) == 35 and x.stride(2) == 1
    if rms:
        xd = x.double()
        want64 = xd * torch.rsqrt((xd * xd).mean(-1, keepdim=True) + 1e-6) * scale.double().to(DEV)
    else:
        want64 = _layernorm64(node, x)
    for cfg in range(len(cfgs)):
        kern = t.make(node, cfgs[cfg], DEV)
        got = kern(x, None, None)
        _close(got, want64, dtype)
        assert got.stride() == x.stride() and kern.fallback.reason is None
        out = torch.empty(2, 24, 5, 7, dtype=dtype, device=DEV).permute(0, 2, 3, 1)
        assert kern(x, None, None, out=out) is out
        _close(out, want64, dtype)
        dense = torch.empty(shape, dtype=dtype, device=DEV)  # a row-major destination from a column-major source
        assert kern(x, None, None, out=dense) is dense
        _close(dense, want64, dtype)


def test_layernorm_runtime_scale_and_fp32_params() -> None:
    x_v = _x("x", torch.float32, ("N", 33))
    node = Node("LayerNormalization", [x_v, _x("s", torch.float32, (33,)), _x("b", torch.float32, (33,))],
                [_x("y", torch.float32, ("N", 33))], {"epsilon": 1e-3}, opset=17)
    kern = _kernel(LN, node)
    assert kern.prepacked == frozenset()
    x, s, b = _rand(5, 33, seed=15), _rand(33, seed=16), _rand(33, seed=17)
    torch.testing.assert_close(kern(x, s, b), _reference(node, x, s, b), rtol=1e-5, atol=1e-5)
    # fp16 X with float32 constants (prepacked rounded to fp16, as the reference rounds them); scale [1, 33]
    node16 = layernorm(torch.float16, ("N", 33), param_dtype=torch.float32, seed=18)
    node16.inputs[1] = Value("scale", const=node16.inputs[1].const.reshape(1, 33))
    kern16 = _kernel(LN, node16)
    assert kern16.prepacked == frozenset({1, 2})
    x16 = _rand(4, 33, dtype=torch.float16, seed=19)
    _close(kern16(x16, None, None), _layernorm64(node16, x16), torch.float16)


def test_layernorm_refusals_and_candidates() -> None:
    t = get_tactic(LN)
    f32 = torch.float32
    assert not t.supports(layernorm(f32, ("N", 8), outputs=2), CTX)  # Mean output
    assert not t.supports(layernorm(f32, ("N", 8), outputs=3), CTX)  # Mean and InvStdDev
    assert not t.supports(layernorm(f32, ("N", 8), stash_type=11), CTX)
    assert not t.supports(layernorm(torch.int32, ("N", 8)), CTX)
    old = layernorm(f32, ("N", 8))
    old.opset = 16
    assert not t.supports(old, CTX)
    outer = layernorm(f32, (2, 8))  # a scale of [2, 8] broadcasts over the rows
    outer.inputs[1] = Value("scale", const=torch.ones(2, 8))
    assert not t.supports(outer, CTX)
    rt = Node("LayerNormalization", [_x("x", f32, ("N", 8)), _x("s", torch.float16, (8,))],
              [_x("y", f32, ("N", 8))], {}, opset=17)
    assert not t.supports(rt, CTX)  # run-time scale of another type
    unknown = Node("LayerNormalization", [_x("x", f32, None), _x("s", f32, (8,))], [_x("y", f32, None)], {}, opset=17)
    assert not t.supports(unknown, CTX)
    ids = [c.id for c in candidate_tactics(layernorm(torch.float16, ("N", 197, 768)), CUDA_CTX)]
    assert ids[0] == LN and "ref" in ids


def test_layernorm_from_onnx_model_is_a_cuda_candidate() -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from kiln.frontend.onnx import load_onnx
    from kiln.logger import Logger
    g = torch.Generator().manual_seed(20)
    scale = numpy_helper.from_array(torch.randn(64, generator=g).numpy(), "scale")
    bias = numpy_helper.from_array(torch.randn(64, generator=g).numpy(), "bias")
    graph = helper.make_graph(
        [helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["y"], axis=-1, epsilon=1e-6)], "ln",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10, 64])], [scale, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    node = load_onnx(model, Logger()).nodes[0]
    assert [c.id for c in candidate_tactics(node, CUDA_CTX)][0] == LN
    x = _rand(2, 10, 64, seed=21)
    torch.testing.assert_close(_kernel(LN, node)(x, None, None), _reference(node, x), rtol=1e-5, atol=1e-5)


# ---- GlobalAveragePool / spatial ReduceMean -------------------------------------------------------

def gap(dtype: torch.dtype, c: int = 24) -> Node:
    return Node("GlobalAveragePool", [_x("x", dtype, ("N", c, "H", "W"))], [_x("y", dtype, ("N", c, 1, 1))],
                {}, name="gap", opset=13)


def reduce_mean(dtype: torch.dtype, axes: list[int] | None = (2, 3), opset: int = 18, keepdims: int = 1,
                c: int = 24, **attrs) -> Node:
    ins = [_x("x", dtype, ("N", c, "H", "W"))]
    if opset >= 18:
        if axes is not None:
            ins.append(Value("axes", const=torch.tensor(list(axes), dtype=torch.int64)))
    elif axes is not None:
        attrs["axes"] = list(axes)
    out_shape = ("N", c, 1, 1) if keepdims else ("N", c)
    return Node("ReduceMean", ins, [_x("y", dtype, out_shape)], {"keepdims": keepdims, **attrs}, name="rm",
                opset=opset)


def _check_gap(node: Node, x: torch.Tensor, cfg: int) -> None:
    got = _kernel(GAP, node, cfg)(x, None)
    want64 = x.double().mean((2, 3), keepdim=True)
    assert got.shape == (x.shape[0], x.shape[1], 1, 1)
    _close(got, want64, x.dtype)
    ref = _reference(node, x)
    tol = 1e-5 if x.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("hw", [1, 7, 14, 56])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "slice"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_global_avgpool_matches_reference(hw, layout, dtype) -> None:
    n, c = (1, 24) if hw == 56 else (2, 24)
    x = _layout(_rand(n, c, hw, hw, dtype=dtype, seed=hw, shift=0.3), layout)
    cfgs = [0, 1] if hw in (7, 56) else [0]  # split and unsplit
    for cfg in cfgs:
        _check_gap(gap(dtype), x, cfg)


@pytest.mark.parametrize("axes,opset", [((2, 3), 18), ((-2, -1), 18), ((3, 2), 13), ((-1, -2), 11)])
def test_reduce_mean_spatial_matches_reference(axes, opset) -> None:
    node = reduce_mean(torch.float32, axes, opset)
    x = _rand(2, 24, 9, 11, seed=22).contiguous(memory_format=CL)
    _check_gap(node, x, 0)
    kern = _kernel(GAP, node)
    assert kern.prepacked == (frozenset({1}) if opset >= 18 else frozenset())


def test_global_avgpool_odd_strides_and_out_slice() -> None:
    """H and W that do not collapse into one pixel index (a spatial crop), and out= a channel slice."""
    node = gap(torch.float16, c=12)
    big = _rand(2, 12, 9, 13, dtype=torch.float16, seed=23).contiguous(memory_format=CL)
    x = big[:, :, 1:8, 2:11]
    kern = _kernel(GAP, node, 0)
    _close(kern(x), x.double().mean((2, 3), keepdim=True), torch.float16)
    buf = torch.zeros(2, 20, 1, 1, dtype=torch.float16, device=DEV).contiguous(memory_format=CL)
    out = buf[:, 4:16]
    assert kern(x, out=out) is out
    _close(buf[:, 4:16], x.double().mean((2, 3), keepdim=True), torch.float16)
    assert not buf[:, :4].any() and not buf[:, 16:].any()


def test_global_avgpool_split_is_used_and_deterministic() -> None:
    from kiln.backends.cuda.triton_reduce import split_of
    assert split_of(1, 24, 56 * 56, 16, 32) > 1
    assert split_of(64, 1024, 49, 16, 128) == 1
    t = get_tactic(GAP)
    assert t.workspace_bytes(gap(torch.float32), {"TILE": 2048, "split": 1}, (1, 24, 1, 1)) > 0
    assert t.workspace_bytes(gap(torch.float32), {"TILE": 2048, "split": 0}, (1, 24, 1, 1)) == 0
    x = _rand(1, 24, 40, 40, seed=24).contiguous(memory_format=CL)
    kern = _kernel(GAP, gap(torch.float32), 0)
    assert torch.equal(kern(x), kern(x))


def test_global_avgpool_refusals_and_candidates() -> None:
    t = get_tactic(GAP)
    f32 = torch.float32
    assert not t.supports(reduce_mean(f32, keepdims=0), CTX)
    assert not t.supports(reduce_mean(f32, axes=None), CTX)  # all axes (or noop_with_empty_axes)
    assert not t.supports(reduce_mean(f32, axes=None, noop_with_empty_axes=1), CTX)
    assert not t.supports(reduce_mean(f32, axes=(1, 2, 3)), CTX)
    assert not t.supports(reduce_mean(f32, axes=(1, 3)), CTX)
    assert not t.supports(reduce_mean(f32, axes=(2, 3), opset=13, keepdims=0), CTX)
    runtime_axes = reduce_mean(f32)
    runtime_axes.inputs[1] = _x("axes", torch.int64, (2,))
    assert not t.supports(runtime_axes, CTX)
    assert not t.supports(gap(torch.int32), CTX)
    gap3 = Node("GlobalAveragePool", [_x("x", f32, ("N", 8, "L"))], [_x("y", f32, ("N", 8, 1))], {}, opset=13)
    assert not t.supports(gap3, CTX)
    assert [c.id for c in candidate_tactics(gap(torch.float16), CUDA_CTX)][0] == GAP
    assert [c.id for c in candidate_tactics(reduce_mean(f32, (-1, -2), 13), CUDA_CTX)][0] == GAP
