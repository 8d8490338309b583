"""The C activation pass (native/act.c, kiln.backends.cpu.activation_c) against float64 torch math, and the oneDNN
layer tactics' {"act": "c"} config against the ops' reference compute."""
from __future__ import annotations

import ctypes as C
import os
from typing import Any

import pytest
import torch

from kiln.backends.cpu import native
from kiln.backends.cpu.activation_c import C_ACTS, InPlaceActivation, available
from kiln.backends.cpu.dnnl import library as dnnl_library
from kiln.backends.tactic import get_tactic
from kiln.errors import KilnError
from kiln.ir.dtype import DType
from tests.backends.test_cpu_tactics import CONV_CASES, CPU, _conv_inputs, _fused_conv, make_node, rel_err, run_both

pytestmark = pytest.mark.skipif(not available("SiLU"), reason=f"no C compiler here: {native.error('act')}")
need_dnnl = pytest.mark.skipif(dnnl_library() is None, reason="the oneDNN library (onednn-cpu-gomp) is not installed")


def _oracle(act: str, x: torch.Tensor) -> torch.Tensor:
    v = x.double()
    if act == "Sigmoid":
        return torch.sigmoid(v)
    if act == "SiLU":
        return v * torch.sigmoid(v)
    if act == "Mish":
        return v * torch.tanh(torch.nn.functional.softplus(v))
    if act == "Gelu":
        return 0.5 * v * torch.erfc(-v / 2 ** 0.5)
    return 0.5 * v * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (v + 0.044715 * v ** 3)))  # GeluTanh


def _values(n: int, seed: int) -> torch.Tensor:
    """Normal values at three scales, with the extremes the clamps guard (+-100, +-88, +-20, 0) spread in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.tensor([0.1, 3.0, 12.0])[torch.randint(0, 3, (n,), generator=g)]
    special = torch.tensor([0.0, -0.0, 1e-20, -1e-20, 20.0, -20.0, 20.5, 88.0, -88.0, 100.0, -100.0, 9.0, -9.0])
    k = min(n, len(special))
    x[torch.randperm(n, generator=g)[:k]] = special[:k]
    return x


def _check(act: str, got: torch.Tensor, x: torch.Tensor, z: torch.Tensor | None = None) -> None:
    want = _oracle(act, x) + (0 if z is None else z.double())
    err = (got.double() - want).abs()
    # relative accuracy to a few float32 ulps, absolute near zero (GELU's x/2 erfc(z) at z ~ 10: exp(-z^2) loses
    # 100 ulps of its argument in float32)
    assert bool((err <= 2e-6 * want.abs() + 1e-6).all()), (act, float(err.max()), x[err.argmax()].item())


@pytest.mark.parametrize("act", sorted(C_ACTS))
@pytest.mark.parametrize("n", [1, 15, 17, 1000, 70001])
def test_pass_matches_float64(act: str, n: int) -> None:
    x = _values(n, n)
    y = x.clone()
    InPlaceActivation(act)(y)
    _check(act, y, x)


@pytest.mark.parametrize("act", ["SiLU", "Gelu"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pass_adds_a_residual_after_the_activation(act: str, channels_last: bool) -> None:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(3)
    x = (torch.randn((2, 24, 9, 13), generator=g) * 3).contiguous(memory_format=fmt)
    z = torch.randn((2, 24, 9, 13), generator=g).contiguous(memory_format=fmt)
    y = x.clone()
    call = InPlaceActivation(act).bind(y, z)
    call()
    _check(act, y, x, z)


def test_pass_refuses_what_it_cannot_address() -> None:
    a = InPlaceActivation("SiLU")
    x = torch.randn(4, 6, 5, 5)
    with pytest.raises(KilnError, match="dense float32"):
        a(x[:, ::2])
    with pytest.raises(KilnError, match="dense float32"):
        a(x.double())
    with pytest.raises(KilnError, match="laid out as its output"):
        a(x, x.contiguous(memory_format=torch.channels_last))
    with pytest.raises(KilnError, match="cannot run"):
        InPlaceActivation("Relu")


@pytest.mark.parametrize("flags", [["-O2", "-mno-avx", "-mno-avx2", "-mno-avx512f"], ["-O2", "-mavx2", "-mfma",
                                                                                           "-mno-avx512f"]],
                         ids=["scalar", "avx2"])
def test_other_instruction_sets_compute_the_same(flags: list[str]) -> None:
    """The plain-C and AVX2 paths of native/act.c, compiled here on purpose (-march=native picks one of the three)."""
    if os.uname().machine not in ("x86_64", "AMD64"):
        pytest.skip("the x86 instruction-set flags only apply on x86-64")
    code = native.source("act").decode()  # vec.h expanded
    lib = native.compile_source("act_isa_test", code, [*flags, "-fopenmp", "-shared", "-fPIC", "-std=c99"])
    if "avx2" in flags[1:2] and "avx2" not in open("/proc/cpuinfo").read():
        pytest.skip("this CPU has no AVX2")
    lib.kiln_act.argtypes = [C.c_void_p, C.c_void_p, C.c_long, C.c_int, C.c_int]
    for act, code_ in C_ACTS.items():
        x = _values(1001, code_)
        y = x.clone()
        assert lib.kiln_act(y.data_ptr(), None, y.numel(), code_, 2) == 0
        _check(act, y, x)


# ---- the layer tactics' {"act": "c"} config ---------------------------------------------------------

C_LAYER_ACTS = [(a, 0.0, 0.0) for a in sorted(C_ACTS)]


@need_dnnl
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("act", C_LAYER_ACTS, ids=lambda a: a[0])
def test_conv_with_the_c_pass(case: tuple[Any, ...], act: tuple[str, float, float]) -> None:
    x, w, b, _ = _conv_inputs(case, 11)
    node = _fused_conv(case, x, w, b, None, act, 0)
    assert {"act": "c"} in get_tactic("cpu.conv_dnnl").configs(node, CPU)  # type: ignore[union-attr]
    got, want = run_both(node, "cpu.conv_dnnl", [x, w, b], {"act": "c"})
    assert rel_err(got, want) <= 1e-5


@need_dnnl
@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[3], CONV_CASES[6]], ids=["3x3", "depthwise", "1x1"])
@pytest.mark.parametrize("act", [("SiLU", 0.0, 0.0), ("Mish", 0.0, 0.0)], ids=lambda a: a[0])
@pytest.mark.parametrize("before_add", [0, 1])
@pytest.mark.parametrize("bound", [False, True])
def test_conv_residual_with_the_c_pass(case: tuple[Any, ...], act: tuple[str, float, float], before_add: int,
                                       bound: bool) -> None:
    x, w, b, z = _conv_inputs(case, 12, batch=2)
    node = _fused_conv(case, x, w, b, z, act, before_add)
    if not bound:
        got, want = run_both(node, "cpu.conv_dnnl", [x, w, b, z], {"act": "c"})
    else:  # the runtime's repeated call into an arena slot (Kernel.bind)
        kern = get_tactic("cpu.conv_dnnl").make(node, {"act": "c"}, torch.device("cpu"))  # type: ignore[union-attr]
        xc, zc = x.contiguous(memory_format=torch.channels_last), z.contiguous(memory_format=torch.channels_last)
        dest = torch.empty(z.shape).contiguous(memory_format=torch.channels_last)
        args = [xc, None, None, zc]
        assert kern(*args, out=dest) is dest
        dest.fill_(float("nan"))
        call = kern.bind(args, dest)
        assert call is not None
        call()
        got = dest
        from kiln.ops.registry import lookup
        want = lookup("FusedConv", "kiln").compute(node, x, w, b, z)
    assert rel_err(got, want) <= 1e-5


@need_dnnl
@pytest.mark.parametrize("a_shape", [(1, 64), (5, 64), (2, 3, 64)])
@pytest.mark.parametrize("act", C_LAYER_ACTS, ids=lambda a: a[0])
@pytest.mark.parametrize("residual", [None, 0, 1])
@pytest.mark.parametrize("prim", [{}, {"prim": "matmul"}], ids=["ip", "matmul"])
def test_linear_with_the_c_pass(a_shape: tuple[int, ...], act: tuple[str, float, float], residual: int | None,
                                prim: dict[str, str]) -> None:
    g = torch.Generator().manual_seed(13)
    a = torch.randn(a_shape, generator=g)
    w = torch.randn((40, 64), generator=g) / 8
    b = torch.randn((40,), generator=g)
    z = torch.randn(a_shape[:-1] + (40,), generator=g) if residual is not None else None
    attrs = {"activation": act[0], "alpha": 0.0, "beta": 0.0, "act_before_add": residual or 0}
    ins: list[tuple[Any, bool]] = [(a, False), (w, True), (b, True)] + ([(z, False)] if z is not None else [])
    node = make_node("FusedGemm", ins, a_shape[:-1] + (40,), attrs, domain="kiln")
    cfg = {**prim, "act": "c"}
    assert cfg in get_tactic("cpu.linear_dnnl").configs(node, CPU)  # type: ignore[union-attr]
    got, want = run_both(node, "cpu.linear_dnnl", [a, w, b] + ([z] if z is not None else []), cfg)
    assert rel_err(got, want) <= 1e-5


@need_dnnl
def test_only_the_c_activations_get_the_config() -> None:
    x, w, b, _ = _conv_inputs(CONV_CASES[0], 0)
    for act, offered in (("Relu", False), ("HardSwish", False), ("", False), ("SiLU", True), ("Gelu", True)):
        node = _fused_conv(CONV_CASES[0], x, w, b, None, (act, 0.0, 0.0), 0)
        assert ({"act": "c"} in get_tactic("cpu.conv_dnnl").configs(node, CPU)) == offered, act  # type: ignore[union-attr]


# ---- cpu.layernorm_c (kiln_layernorm) -----------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 197, 64), (2, 5, 768), (4, 13), (1, 1, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_c_layernorm_matches_float64(shape: tuple[int, ...], bias: bool) -> None:
    g = torch.Generator().manual_seed(len(shape) * 100 + shape[-1])
    x = torch.randn(shape, generator=g) * 4 + 3  # an offset mean: the two-pass variance matters
    w, b = torch.randn(shape[-1], generator=g), torch.randn(shape[-1], generator=g)
    ins: list[tuple[Any, bool]] = [(x, False), (w, True)] + ([(b, True)] if bias else [])
    node = make_node("LayerNormalization", ins, shape, {"axis": -1, "epsilon": 1e-5}, opset=17)
    t = get_tactic("cpu.layernorm_c")
    assert t is not None and t.supports(node, CPU)
    kern = t.make(node, {}, torch.device("cpu"))
    x64 = x.double()
    want = (x64 - x64.mean(-1, keepdim=True)) / torch.sqrt(x64.var(-1, unbiased=False, keepdim=True) + 1e-5) \
        * w.double() + (b.double() if bias else 0)
    got = kern(x, None, None)
    assert (got.double() - want).abs().max().item() <= 2e-5 * max(1.0, want.abs().max().item())
    dest = torch.full(shape, float("nan"))
    args = [x, None, None]
    assert kern(*args, out=dest) is dest
    dest.fill_(float("nan"))
    call = kern.bind(args, dest)
    assert call is not None and call() is dest
    torch.testing.assert_close(dest, got, rtol=0, atol=0)
    strided = x.transpose(0, -1).contiguous().transpose(0, -1)  # non-contiguous rows: aten's path, same values
    assert (kern.bind([strided, None, None], dest) is None) == (not strided.is_contiguous())
    torch.testing.assert_close(kern(strided, None, None), got, rtol=1e-5, atol=1e-5)


def test_c_layernorm_declines_other_axes_and_types() -> None:
    x, w = torch.randn(2, 5, 7), torch.randn(5, 7)
    t = get_tactic("cpu.layernorm_c")
    two_axes = make_node("LayerNormalization", [(x, False), (w, True)], (2, 5, 7), {"axis": 1}, opset=17)
    assert not t.supports(two_axes, CPU) and get_tactic("cpu.layernorm").supports(two_axes, CPU)  # type: ignore[union-attr]
    xb = torch.randn(2, 7).bfloat16()
    bf = make_node("LayerNormalization", [(xb, False), (torch.randn(7), True)], (2, 7), {"axis": -1}, opset=17,
                   out_dtype=DType.BFLOAT16)
    assert not t.supports(bf, CPU)  # type: ignore[union-attr]
