"""The one-pass Triton epilogue (kiln/backends/cuda/triton_epilogue.py) against torch's separate epilogue ops
computed in float64, for every fused activation, with and without bias and residual, both add orders.

Without a GPU the kernel runs under the Triton interpreter (CPU tensors); with one, compiled on CUDA.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton.jit

pytest.importorskip("triton", reason="triton is not installed (the test extra has it): Triton kernels untested")

from kiln.backends.cuda.common import apply_epilogue_  # noqa: E402
from kiln.backends.cuda.triton_epilogue import channels_innermost, epilogue_  # noqa: E402
from kiln.ops.activations import TABLE, Epilogue  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ACTS = sorted(TABLE)
PARAMS = {"LeakyRelu": (0.1, 0.0), "Clip": (-1.0, 2.5), "HardSigmoid": (0.2, 0.5), "Elu": (1.0, 0.0)}


def _want(y: torch.Tensor, b: torch.Tensor | None, z: torch.Tensor | None, ep: Epilogue) -> torch.Tensor:
    y64 = y.double() + (b.double().view(1, -1, 1, 1) if y.dim() == 4 and b is not None else
                        (b.double() if b is not None else 0.0))
    return apply_epilogue_(y64.clone(), None if z is None else z.double(), ep)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("residual", [None, "after", "before"])
@pytest.mark.parametrize("c", [24, 48])  # the flat walk (C % 16 != 0) and the row tiles
def test_epilogue_matches_torch_ops_nhwc(act, residual, c):
    g = torch.Generator().manual_seed(hash((act, residual, c)) % 2**31)
    n, h, w = 2, 5, 7
    alpha, beta = PARAMS.get(act, (0.0, 0.0))
    ep = Epilogue(act, alpha, beta, residual == "before")
    y = (torch.randn(n, c, h, w, generator=g) * 3).to(DEV).contiguous(memory_format=torch.channels_last)
    b = torch.randn(c, generator=g).to(DEV)
    z = torch.randn(n, c, h, w, generator=g).to(DEV) if residual else None  # NCHW: made channels_last by epilogue_
    want = _want(y, b, z, ep)
    got = epilogue_(y.clone(memory_format=torch.channels_last), b, z, ep)
    assert channels_innermost(got)
    err = float((got.double() - want).abs().max() / want.abs().max())
    assert err < 1e-5, (act, residual, err)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_epilogue_on_a_gemm_output_keeps_dtype(dtype, bias):
    g = torch.Generator().manual_seed(7)
    rows, c = 300, 40  # not a multiple of the block: the tail is masked
    y = torch.randn(rows, c, generator=g).to(dtype).to(DEV)
    b = torch.randn(c, generator=g).to(dtype).to(DEV) if bias else None
    ep = Epilogue("Mish")
    want = torch.nn.functional.mish(y.double() + (b.double() if bias else 0.0))
    got = epilogue_(y.clone(), b, None, ep)
    assert got.dtype == dtype
    err = float((got.double() - want).abs().max() / want.abs().max())
    assert err < (2e-3 if dtype == torch.float16 else 1e-5)


def test_epilogue_refuses_a_layout_it_cannot_address():
    y = torch.randn(1, 4, 3, 3, device=DEV)  # NCHW-contiguous with C > 1: the channel is not innermost
    with pytest.raises(ValueError, match="channels_last"):
        epilogue_(y, None, None, Epilogue("Relu"))


@pytest.mark.parametrize("act", ["Mish", "LeakyRelu", "Sigmoid"])
def test_epilogue_row_tiles_with_column_blocks_and_row_tail(act):
    """C = 272 (a multiple of 16 above the 256-channel block: two column blocks, the second mostly masked) and
    a row count that is not a multiple of the row tile, with bias and a residual, against float64."""
    g = torch.Generator().manual_seed(11)
    alpha, beta = PARAMS.get(act, (0.0, 0.0))
    ep = Epilogue(act, alpha, beta, False)
    y = (torch.randn(3, 272, 3, 5, generator=g) * 3).to(DEV).contiguous(memory_format=torch.channels_last)
    b = torch.randn(272, generator=g).to(DEV)
    z = torch.randn(3, 272, 3, 5, generator=g).to(DEV).contiguous(memory_format=torch.channels_last)
    want = _want(y, b, z, ep)
    got = epilogue_(y.clone(memory_format=torch.channels_last), b, z, ep)
    err = float((got.double() - want).abs().max() / want.abs().max())
    assert err < 1e-5, (act, err)


def test_mish_over_its_whole_range():
    """Mish as x * n / (n + 2), n = e^x (e^x + 2), against float64 x * tanh(softplus(x)) from -100 to 100 (past 20
    the value is x itself; far below 0 it underflows towards 0), absolute error relative to max(1, |mish|)."""
    x = torch.cat([torch.linspace(-100.0, 100.0, 4000), torch.linspace(-25.0, 25.0, 3200)]).reshape(-1, 16)
    got = epilogue_(x.clone().to(DEV), None, None, Epilogue("Mish")).cpu().double()
    xd = x.double()
    want = xd * torch.tanh(torch.nn.functional.softplus(xd))
    err = ((got - want).abs() / want.abs().clamp(min=1.0)).max().item()
    assert err < 2e-6, err
