"""Triton SEGate tactic (cuda.triton_se_gate) against the op's formula evaluated in float64 on random inputs.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, small shapes, CPU
tensors); with one they run compiled on CUDA. When triton is absent these tests skip. The float64
oracle is the SEGate reference run on float64 copies of the same (already rounded) inputs and weights,
so the tolerance only covers the kernel's float32 accumulation and its one rounding to the output type.
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
from tests.backends.test_cpu_se import _oracle, _rand, se_node  # noqa: E402  (SEGate nodes, the float64 oracle)
from tests.backends.test_cuda_pool import _layout  # noqa: E402  (NCHW, NHWC and channel-slice inputs)

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CTX = TacticContext(DEV, fp16=True)
CUDA_CTX = TacticContext(torch.device("cuda"), fp16=True)  # candidate lists only: nothing runs there
SE = "cuda.triton_se_gate"


def _close(got: torch.Tensor, want64: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and tuple(got.shape) == tuple(want64.shape)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    err = (got.cpu().double() - want64).abs().max().item()
    scale = max(1.0, want64.abs().max().item())
    assert err <= tol * scale, f"max abs error {err:.3g} (scale {scale:.3g}, dtype {dtype})"


def _configs(node: Node) -> list[dict]:
    t = get_tactic(SE)
    assert t is not None and t.supports(node, CTX), f"{SE} should support {node}"
    assert t.writes_out == 1 and t.devices == ("cuda",) and t.priority == 20
    return t.configs(node, CTX)


CASES = {
    # name: (C, R, H, W, batch, act1, gate)
    "effnet_late": (1152, 48, 7, 7, 1, "SiLU", "Sigmoid"),
    "effnet_mid": (240, 10, 14, 14, 3, "SiLU", "Sigmoid"),
    "mbv3": (72, 24, 28, 28, 1, "Relu", "HardSigmoid"),
    "odd_small_r": (96, 4, 9, 11, 3, "HardSwish", "Sigmoid"),
    "no_act": (40, 10, 5, 3, 2, "", "HardSigmoid"),
    "large_r": (600, 300, 3, 3, 1, "Relu", "Sigmoid"),  # small channel and output blocks (W tiles of R x 8)
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_se_gate_matches_float64(case: str, dtype: torch.dtype) -> None:
    c, r, h, w, n, act1, gate = CASES[case]
    node = se_node(dtype, c, r, act1=act1, gate=gate)
    x = _layout(_rand(n, c, h, w, dtype=dtype, seed=7).to(DEV), "nhwc")
    want = _oracle(node, x)
    cfgs = _configs(node)
    assert {cfg["split"] for cfg in cfgs} == {0, 1}
    for cfg in cfgs:
        _close(get_tactic(SE).make(node, cfg, DEV)(x), want, dtype)  # type: ignore[union-attr]


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "slice"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_se_gate_layouts(layout: str, dtype: torch.dtype) -> None:
    node = se_node(dtype, 72, 24, act1="Relu", gate="HardSigmoid", seed=3)
    x = _layout(_rand(2, 72, 13, 6, dtype=dtype, seed=8).to(DEV), layout)
    want = _oracle(node, x)
    for cfg in _configs(node):
        _close(get_tactic(SE).make(node, cfg, DEV)(x), want, dtype)  # type: ignore[union-attr]


def test_pooled_input_has_no_split_and_out_slice() -> None:
    """X already pooled ([N, C, 1, 1]): no split configurations; the gate lands in a channel slice of out=."""
    node = se_node(torch.float32, 200, 12, shape=(3, None, 1, 1), act1="SiLU", gate="Sigmoid", seed=5)
    cfgs = _configs(node)
    assert {cfg["split"] for cfg in cfgs} == {0} and {cfg["ochunk"] for cfg in cfgs} == {0, 128}
    x = _rand(3, 200, 1, 1, seed=9).to(DEV)
    want = _oracle(node, x)
    for cfg in cfgs:
        kern = get_tactic(SE).make(node, cfg, DEV)  # type: ignore[union-attr]
        buf = torch.zeros(3, 210, 1, 1, device=DEV)
        out = buf[:, 4:204]
        assert kern(x, out=out) is out
        _close(out, want, torch.float32)
        assert not buf[:, :4].any() and not buf[:, 204:].any()


def test_split_is_deterministic_and_has_a_workspace() -> None:
    node = se_node(torch.float32, 24, 6, seed=6)
    t = get_tactic(SE)
    split = next(cfg for cfg in _configs(node) if cfg["split"])
    assert t.workspace_bytes(node, split, (1, 24, 1, 1)) > 0  # type: ignore[union-attr]
    assert t.workspace_bytes(node, {**split, "split": 0}, (1, 24, 1, 1)) == 0  # type: ignore[union-attr]
    x = _layout(_rand(1, 24, 40, 40, seed=10).to(DEV), "nhwc")
    kern = t.make(node, split, DEV)  # type: ignore[union-attr]
    got = kern(x)
    assert torch.equal(got, kern(x))
    _close(got, _oracle(node, x), torch.float32)


@pytest.mark.parametrize("tile", [1024, 4096])
def test_two_phase_spreads_pixels_and_channels_deterministically(tile: int) -> None:
    """Partial hidden vectors over (image x channel block, pixel chunk) programs (here up to 3 channel blocks
    and dozens of chunks), added in order by the excite kernel: equal on repeat, float64-close."""
    node = se_node(torch.float32, 300, 20, act1="SiLU", gate="Sigmoid", seed=11)
    t = get_tactic(SE)
    cfg = next(c for c in _configs(node) if c.get("two_phase") == tile)
    assert t.workspace_bytes(node, cfg, (2, 300, 1, 1)) == 4 * 2 * (300 + 256) * 20  # type: ignore[union-attr]
    kern = t.make(node, cfg, DEV)  # type: ignore[union-attr]
    for layout in ("nhwc", "nchw"):
        x = _layout(_rand(2, 300, 37, 29, seed=12).to(DEV), layout)
        got = kern(x)
        assert torch.equal(got, kern(x))
        _close(got, _oracle(node, x), torch.float32)


def test_other_channel_counts_run_the_reference_checks() -> None:
    node = se_node(torch.float32, 24, 6)
    kern = get_tactic(SE).make(node, _configs(node)[0], DEV)  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="channels"):
        kern(_rand(1, 20, 4, 4).to(DEV))


def test_refusals_and_candidates() -> None:
    t = get_tactic(SE)
    assert t is not None
    assert not t.supports(se_node(torch.float32, 8, 1100), CTX)  # hidden size above MAX_R
    assert not t.supports(se_node(torch.float16, 24, 6, w_dtype=torch.float32), CTX)  # weights of another type
    runtime_w = se_node(torch.float32, 24, 6)
    runtime_w.inputs[1] = Value("w1", TensorType(DType.FLOAT32, (6, 24)))
    assert not t.supports(runtime_w, CTX)
    rank3 = se_node(torch.float32, 24, 6)
    rank3.inputs[0] = Value("x", TensorType(DType.FLOAT32, ("N", 24, "L")))
    assert not t.supports(rank3, CTX)
    assert [c.id for c in candidate_tactics(se_node(torch.float16, 72, 24), CUDA_CTX)][0] == SE
