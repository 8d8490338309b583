"""cuda.triton_qdq (QuantizeLinear / DequantizeLinear in one strided pass) against the ops' references, bit for bit.

Inputs sit on and next to the rounding ties (k + 0.5 steps), at and beyond the saturation limits, in NCHW, NHWC
and sliced layouts; the output is NHWC for 4-D tensors. Without a GPU the kernel runs under the Triton interpreter
(TRITON_INTERPRET=1, CPU tensors); with one, compiled on CUDA.
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
from tests.qdq_inputs import layout as _layout, near_ties as _near_ties  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CTX = TacticContext(DEV)
CL = torch.channels_last


def _node(op: str, x_dtype: torch.dtype, y_dtype: torch.dtype, shape: tuple, scale: torch.Tensor,
          zp: torch.Tensor | None, axis: int = 1) -> Node:
    ins = [Value("x", TensorType(DType.from_torch(x_dtype), shape)), Value("s", const=scale)]
    if zp is not None:
        ins.append(Value("z", const=zp))
    return Node(op, ins, [Value("y", TensorType(DType.from_torch(y_dtype), shape))], {"axis": axis}, name="q",
                opset=13)


def _run(node: Node, x: torch.Tensor, cfg: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    t = get_tactic("cuda.triton_qdq")
    assert t is not None and t.supports(node, CTX)
    kern = t.make(node, t.configs(node, CTX)[cfg], DEV)
    return kern(x, None, None, out=out) if out is not None else kern(x, None, None)


def _reference(node: Node, x: torch.Tensor) -> torch.Tensor:
    return lookup(node.op_type, "").compute(node, x.cpu(), *[v.const for v in node.inputs[1:]])


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "slice"])
@pytest.mark.parametrize("int_t,zp", [(torch.int8, 0), (torch.int8, -7), (torch.uint8, 128), (torch.uint8, None)])
@pytest.mark.parametrize("float_t", [torch.float32, torch.float16])
def test_quantize_per_tensor_exact(layout, int_t, zp, float_t) -> None:
    scale = torch.tensor(0.0173, dtype=torch.float32)
    z = None if zp is None else torch.tensor(zp, dtype=int_t)
    node = _node("QuantizeLinear", float_t, int_t, ("N", 5, "H", "W"), scale, z)
    x = _layout(_near_ties((2, 5, 7, 9), scale, float_t, seed=1), layout).to(DEV)
    got = _run(node, x)
    want = _reference(node, x)
    assert got.dtype == int_t and got.is_contiguous(memory_format=CL)
    assert torch.equal(got.cpu(), want), f"{(got.cpu().int() - want.int()).abs().max()} steps apart"


def test_quantize_in_float16_work_type_and_per_channel() -> None:
    """float16 input and scale: the reference divides in float16; a per-channel scale and zero point (axis 1)."""
    s16 = torch.tensor(0.0371, dtype=torch.float16)
    node = _node("QuantizeLinear", torch.float16, torch.int8, ("N", 4, 6, 6), s16, torch.tensor(3, dtype=torch.int8))
    x = _near_ties((3, 4, 6, 6), s16.float(), torch.float16, seed=2).to(DEV)
    assert torch.equal(_run(node, x).cpu(), _reference(node, x))
    sc = torch.tensor([0.01, 0.2, 0.033, 1.5], dtype=torch.float32)
    zc = torch.tensor([0, 10, 250, 128], dtype=torch.uint8)
    node = _node("QuantizeLinear", torch.float32, torch.uint8, ("N", 4, "H", "W"), sc, zc)
    x = _layout(_near_ties((2, 4, 5, 3), sc, torch.float32, seed=3), "nhwc").to(DEV)
    assert torch.equal(_run(node, x, cfg=1).cpu(), _reference(node, x))


@pytest.mark.parametrize("out_t", [torch.float32, torch.float16])
@pytest.mark.parametrize("int_t", [torch.int8, torch.uint8])
def test_dequantize_exact_into_out(out_t, int_t) -> None:
    g = torch.Generator().manual_seed(4)
    lo, hi = (-128, 128) if int_t == torch.int8 else (0, 256)
    x = torch.randint(lo, hi, (2, 6, 5, 4), generator=g).to(int_t).contiguous(memory_format=CL).to(DEV)
    sc = torch.rand(6, generator=g) * 0.1 + 1e-3
    zc = torch.randint(lo, hi, (6,), generator=g).to(int_t)
    for scale, zp in ((sc[:1].reshape(()), zc[:1].reshape(())), (sc, zc), (sc, None)):
        node = _node("DequantizeLinear", int_t, out_t, ("N", 6, "H", "W"), scale.to(out_t), zp)
        want = _reference(node, x)
        out = torch.empty(x.shape, dtype=out_t, device=DEV).contiguous(memory_format=CL)
        got = _run(node, x, out=out)
        assert got is out and torch.equal(got.cpu(), want)


def test_other_ranks_and_refusals() -> None:
    scale = torch.tensor(0.05)
    node = _node("QuantizeLinear", torch.float32, torch.int8, (7, 33), scale, torch.tensor(1, dtype=torch.int8))
    x = _near_ties((7, 33), scale, torch.float32, seed=5).to(DEV)
    for cfg in (0, 1):  # [N, C] (a classifier's features): tiles along C only
        assert get_tactic("cuda.triton_qdq").configs(node, CTX)[cfg]["BLOCK_P"] == 1
        got = _run(node, x, cfg)
        assert got.is_contiguous() and torch.equal(got.cpu(), _reference(node, x))
    t = get_tactic("cuda.triton_qdq")
    assert not t.supports(_node("QuantizeLinear", torch.float32, torch.int8, (4, 4), torch.tensor(-1.0), None), CTX)
    assert not t.supports(_node("QuantizeLinear", torch.float32, torch.int8, (4, 4), torch.tensor(0.1),
                                torch.tensor(0, dtype=torch.uint8)), CTX)  # zero point of another type
    blocked = _node("DequantizeLinear", torch.int8, torch.float32, (4, 4), torch.full((4, 2), 0.1), None)
    blocked.attrs["block_size"] = 2
    blocked.opset = 21
    assert not t.supports(blocked, CTX)
    f8 = _node("QuantizeLinear", torch.float32, torch.float8_e4m3fn, (4, 4), torch.tensor(0.1),
               torch.zeros((), dtype=torch.float8_e4m3fn))
    assert t.supports(f8, CTX)
    f8.attrs["saturate"] = 0  # overflow to NaN: not this kernel's
    f8.opset = 19
    assert not t.supports(f8, CTX)


def _same_float8(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal values, NaN where the reference has NaN. Under the Triton interpreter (no GPU) NaN is not compared:
    its float8 conversion stores NaN as 384 (the compiled kernel's conversion keeps it, checked on the GPU)."""
    g, w = got.cpu().float(), want.float()
    assert got.dtype == want.dtype == torch.float8_e4m3fn
    if DEV.type != "cuda":
        g, w = g[~torch.isnan(w)], w[~torch.isnan(w)]
    assert torch.equal(torch.isnan(g), torch.isnan(w)) and torch.equal(g.nan_to_num(0.0), w.nan_to_num(0.0)), \
        f"{int((g.nan_to_num(0.0) != w.nan_to_num(0.0)).sum())} of {g.numel()} differ"


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "slice"])
@pytest.mark.parametrize("float_t", [torch.float32, torch.float16])
def test_float8_quantize_and_dequantize_exact(layout, float_t) -> None:
    """float8 e4m3 boundaries (an FP8 plan's): the quotient rounded to nearest even, saturated to +-448 (inf too),
    NaN kept, per tensor and per channel, a non-zero zero point; and back to float. Bit-equal to the reference."""
    f8 = torch.float8_e4m3fn
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, 7, 9, generator=g) * 30 * torch.exp2(torch.randint(-12, 3, (2, 5, 7, 9), generator=g))
    x[0, 0, 0, :4] = torch.tensor([float("nan"), 1e6, -1e6, 0.0])
    x = _layout(x.to(float_t), layout).to(DEV)
    per_c = torch.rand(5, generator=g) * 0.1 + 0.01
    for scale, zp in ((torch.tensor(0.05), torch.zeros((), dtype=f8)), (per_c, torch.zeros(5, dtype=f8)),
                      (torch.tensor(0.05), torch.tensor(1.5).to(f8))):
        node = _node("QuantizeLinear", float_t, f8, ("N", 5, "H", "W"), scale, zp)
        q = _run(node, x)
        _same_float8(q, _reference(node, x))
        dq = _node("DequantizeLinear", f8, float_t, ("N", 5, "H", "W"), scale.to(float_t), zp)
        back, want = _run(dq, q).cpu(), _reference(dq, q)
        assert torch.equal(torch.isnan(back), torch.isnan(want)) and torch.equal(back.nan_to_num(0.0), want.nan_to_num(0.0))
        assert bool((q.cpu().float().abs() == 448).any()), "some values saturate"
