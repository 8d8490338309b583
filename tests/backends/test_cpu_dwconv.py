"""cpu.dwconv_c (native/dwconv.c): depthwise convolutions against float64 torch math on random inputs, on dense and
strided channels-last views (a channel slice of a wider buffer, read and written in place), every fused activation,
the residual in both orders, both vector builds; and a GhostNet module built end to end against onnxruntime."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.cpu import native
from kiln.backends.cpu.dwconv import ACTIVATIONS, _library
from kiln.backends.tactic import get_tactic
from kiln.builder import Builder, BuilderConfig
from kiln.logger import Logger, Severity
from kiln.runtime.engine import Engine
from kiln.testing import run_oracle
from tests.backends.test_cpu_tactics import CPU, _fused_conv

pytestmark = pytest.mark.skipif(_library(512) is None, reason=f"no C compiler here: {native.error('dwconv')}")
TACTIC = get_tactic("cpu.dwconv_c")

CASES = [  # C, H, W, k, stride, pads (b_h, b_w, e_h, e_w), dilation
    (8, 12, 13, 3, 1, (1, 1, 1, 1), 1),
    (16, 9, 9, 3, 2, (1, 1, 1, 1), 1),
    (37, 11, 7, 5, 1, (2, 2, 2, 2), 1),  # a channel tail, a row shorter than two pixel blocks
    (24, 14, 14, 5, 2, (1, 2, 2, 1), 1),  # asymmetric
    (7, 10, 17, 3, 1, (2, 2, 2, 2), 2),  # dilated, fewer channels than a vector
    (1, 6, 6, 7, 1, (3, 3, 3, 3), 1),
    (48, 7, 7, 3, 1, (0, 0, 0, 0), 1),  # no padding
]
ACTS = [("", 0.0, 0.0), ("Relu", 0.0, 0.0), ("LeakyRelu", 0.1, 0.0), ("Clip", 0.0, 6.0), ("Sigmoid", 0.0, 0.0),
        ("SiLU", 0.0, 0.0), ("HardSwish", 0.0, 0.0), ("HardSigmoid", 0.2, 0.5), ("Mish", 0.0, 0.0),
        ("Gelu", 0.0, 0.0), ("GeluTanh", 0.0, 0.0)]


def _oracle(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, case: tuple[Any, ...], act: tuple[str, float, float],
            z: torch.Tensor | None, before_add: int) -> torch.Tensor:
    c, _, _, _, s, p, d = case
    xp = F.pad(x.double(), (p[1], p[3], p[0], p[2]))
    y = F.conv2d(xp, w.double(), b.double(), stride=s, dilation=d, groups=c)
    name, a, bb = act
    fns = {"": lambda v: v, "Relu": torch.relu, "LeakyRelu": lambda v: F.leaky_relu(v, a),
           "Clip": lambda v: v.clamp(a, bb), "Sigmoid": torch.sigmoid, "SiLU": F.silu, "HardSwish": F.hardswish,
           "HardSigmoid": lambda v: (a * v + bb).clamp(0, 1), "Mish": F.mish, "Gelu": F.gelu,
           "GeluTanh": lambda v: F.gelu(v, approximate="tanh")}
    f = fns[name]
    if z is None:
        return f(y)
    return f(y) + z.double() if before_add else f(y + z.double())


def _inputs(case: tuple[Any, ...], seed: int, batch: int = 2) -> tuple[torch.Tensor, ...]:
    c, h, w_, k, s, p, d = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, c, h, w_), generator=g)
    w = torch.randn((c, 1, k, k), generator=g) / k
    b = torch.randn((c,), generator=g)
    oh = (h + p[0] + p[2] - d * (k - 1) - 1) // s + 1
    ow = (w_ + p[1] + p[3] - d * (k - 1) - 1) // s + 1
    z = torch.randn((batch, c, oh, ow), generator=g)
    return x, w, b, z


def _slice(t: torch.Tensor, extra: int, at: int) -> torch.Tensor:
    """t's values as channels [at, at + C) of a channels-last buffer of C + extra channels (the rest NaN)."""
    n, c, h, w = t.shape
    buf = torch.full((n, c + extra, h, w), float("nan")).contiguous(memory_format=torch.channels_last)
    view = buf[:, at:at + c]
    view.copy_(t)
    return view


def _node(case: tuple[Any, ...], x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, z: torch.Tensor | None,
          act: tuple[str, float, float], before_add: int) -> Any:
    c, _, _, k, s, p, d = case
    return _fused_conv((c, c, 0, k, s, p, d, c, True), x, w, b, z, act, before_add)


def _check(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    err = (got.double() - want).abs()
    assert bool((err <= 1e-5 * want.abs() + 1e-5).all()), float(err.max())


@pytest.mark.parametrize("case", CASES, ids=[f"c{c[0]}_k{c[3]}_s{c[4]}_d{c[6]}" for c in CASES])
@pytest.mark.parametrize("vec", [512, 256])
@pytest.mark.parametrize("layout", ["dense", "slices"])
def test_depthwise_matches_float64(case: tuple[Any, ...], vec: int, layout: str) -> None:
    if vec == 256 and _library(256) is None:
        pytest.skip(f"no C compiler here: {native.error('dwconv256')}")
    x, w, b, _ = _inputs(case, hash((case, vec)) % 1000)
    node = _node(case, x, w, b, None, ("Relu", 0.0, 0.0), 0)
    assert TACTIC.supports(node, CPU)
    kern = TACTIC.make(node, {"vec": vec}, torch.device("cpu"))
    want = _oracle(x, w, b, case, ("Relu", 0.0, 0.0), None, 0)
    if layout == "dense":
        got = kern(x.contiguous(memory_format=torch.channels_last))
        _check(got, want)
        return
    xs = _slice(x, 5, 3)  # read from a channel slice; written into another (NaN around it must stay NaN)
    dest = _slice(torch.zeros(want.shape), 9, 4)
    assert kern(xs, out=dest) is dest
    _check(dest, want)
    base = dest._base if dest._base is not None else dest
    assert bool(base[:, :4].isnan().all()) and bool(base[:, 4 + want.shape[1]:].isnan().all())


@pytest.mark.parametrize("act", ACTS, ids=[a[0] or "none" for a in ACTS])
@pytest.mark.parametrize("before_add", [None, 0, 1])
def test_epilogues_match_float64(act: tuple[str, float, float], before_add: int | None) -> None:
    case = CASES[2]
    x, w, b, z = _inputs(case, 7)
    zz = None if before_add is None else z
    node = _node(case, x, w, b, zz, act, before_add or 0)
    assert act[0] in ACTIVATIONS and TACTIC.supports(node, CPU)
    kern = TACTIC.make(node, {"vec": 512}, torch.device("cpu"))
    got = kern(x, None, None, zz)  # NCHW input: the kernel reads its channels-last copy
    _check(got, _oracle(x, w, b, case, act, zz, before_add or 0))


def test_bound_call_repeats_into_the_arena_slot() -> None:
    case = CASES[3]
    x, w, b, z = _inputs(case, 3)
    node = _node(case, x, w, b, z, ("SiLU", 0.0, 0.0), 1)
    kern = TACTIC.make(node, TACTIC.configs(node, CPU)[-1], torch.device("cpu"))
    xs, zc = _slice(x, 8, 8), z.contiguous(memory_format=torch.channels_last)
    dest = torch.empty(z.shape).contiguous(memory_format=torch.channels_last)
    args = [xs, None, None, zc]
    assert kern(*args, out=dest) is dest
    call = kern.bind(args, dest)
    assert call is not None
    x2 = torch.randn(x.shape)
    xs.copy_(x2)  # same tensors, new values: the bound call reads them
    dest.fill_(float("nan"))
    assert call() is dest
    _check(dest, _oracle(x2, w, b, case, ("SiLU", 0.0, 0.0), z, 1))


def test_declines_what_it_was_not_made_for() -> None:
    case = CASES[0]
    x, w, b, _ = _inputs(case, 1)
    dense = _fused_conv((8, 8, 0, 3, 1, (1, 1, 1, 1), 1, 1, True), x, torch.randn(8, 8, 3, 3), b, None,
                        ("Relu", 0.0, 0.0), 0)
    assert not TACTIC.supports(dense, CPU)  # not depthwise
    tanh = _node(case, x, w, b, None, ("Tanh", 0.0, 0.0), 0)
    assert not TACTIC.supports(tanh, CPU)  # an activation dwconv.c does not compute
    node = _node(case, x, w, b, None, ("Relu", 0.0, 0.0), 0)
    kern = TACTIC.make(node, {"vec": 512}, torch.device("cpu"))
    x64 = x.double()  # another dtype at run time: the reference runs
    _check(kern(x64), _oracle(x, w, b, case, ("Relu", 0.0, 0.0), None, 0))


def _ghost_module(rng: np.random.Generator, c_in: int = 16, c: int = 8) -> Any:
    """GhostNet's module: a 1x1 primary conv (+ReLU) to c channels, a cheap depthwise 3x3 (+ReLU) on them, the
    two concatenated, then a depthwise conv on the Concat (the next layer reads the whole buffer)."""
    def f(*s: int) -> np.ndarray:
        return (rng.standard_normal(s) * 0.3).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for n, a in [("wp", f(c, c_in, 1, 1)), ("bp", f(c)), ("wc", f(c, 1, 3, 3)),
                                                         ("bc", f(c)), ("wd", f(2 * c, 1, 3, 3))]]
    mk = helper.make_node
    nodes = [mk("Conv", ["x", "wp", "bp"], ["p0"]), mk("Relu", ["p0"], ["p"]),
             mk("Conv", ["p", "wc", "bc"], ["q0"], group=c, pads=[1, 1, 1, 1]), mk("Relu", ["q0"], ["q"]),
             mk("Concat", ["p", "q"], ["cat"], axis=1),
             mk("Conv", ["cat", "wd"], ["y"], group=2 * c, pads=[1, 1, 1, 1], strides=[2, 2])]
    g = helper.make_graph(nodes, "ghost", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, 20, 20])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("level", [0, 3])
def test_ghost_module_matches_onnxruntime(level: int) -> None:
    """The cheap conv reads the primary conv's part of the Concat and writes its own part in place; at level 0
    (tactics that write slices first) it is this kernel and the Concat launches nothing."""
    rng = np.random.default_rng()
    m = _ghost_module(rng)
    plan = Builder(Logger(Severity.ERROR)).build(m, BuilderConfig(device="cpu", optimization_level=level))
    tactics = {s["name"]: s["tactic"] for s in plan.graph["steps"]}
    if level == 0:
        assert "cpu.dwconv_c" in tactics.values(), tactics
        assert "concat.elide" in tactics.values(), tactics
    ctx = Engine(plan).create_execution_context()
    for _ in range(2):
        x = rng.standard_normal((1, 16, 20, 20)).astype(np.float32)
        got, want = np.asarray(ctx.execute({"x": x})["y"]), run_oracle(m, {"x": x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("flags", [["-O2", "-mno-avx", "-mno-avx2", "-mno-avx512f"], ["-O2", "-mavx2", "-mfma",
                                                                                           "-mno-avx512f"]],
                         ids=["scalar", "avx2"])
def test_other_instruction_sets_compute_the_same(flags: list[str]) -> None:
    """dwconv.c's plain-C and AVX2 paths (masked channel tails included), compiled here on purpose (-march=native
    picks one), through the tactic's own argument packing."""
    import os
    from kiln.backends.cpu import dwconv
    if os.uname().machine not in ("x86_64", "AMD64"):
        pytest.skip("the x86 instruction-set flags only apply on x86-64")
    if "avx2" in flags[1:2] and "avx2" not in open("/proc/cpuinfo").read():
        pytest.skip("this CPU has no AVX2")
    lib = native.compile_source("dwconv_isa_test", native.source("dwconv").decode(),
                                [*flags, "-fopenmp", "-shared", "-fPIC", "-std=c99"])
    lib.kiln_dwconv_f32.argtypes = [dwconv._P, dwconv._P, *[dwconv._L] * 6, dwconv._P, *[dwconv._L] * 5, dwconv._P,
                                    *[dwconv._L] * 3, dwconv._I]
    for case in (CASES[2], CASES[4]):
        x, w, b, z = _inputs(case, 5)
        c, _, _, k, s, p, d = case
        cp = -(-c // 16) * 16
        taps = torch.zeros((k * k, cp))
        taps[:, :c] = w.reshape(c, k * k).t()
        bias = torch.zeros(cp)
        bias[:c] = b
        params = dwconv._Params(taps.data_ptr(), bias.data_ptr(), c, cp, k, k, s, s, d, d, p[0], p[1], 6, 0, 0.0, 0.0)
        xs = _slice(x, 3, 1)
        y = torch.empty(z.shape).contiguous(memory_format=torch.channels_last)
        zc = z.contiguous(memory_format=torch.channels_last)
        rc = lib.kiln_dwconv_f32(dwconv.C.addressof(params), xs.data_ptr(), x.shape[0], x.shape[2], x.shape[3],
                                 xs.stride(0), xs.stride(2), xs.stride(3), y.data_ptr(), y.shape[2], y.shape[3],
                                 y.stride(0), y.stride(2), y.stride(3), zc.data_ptr(), zc.stride(0), zc.stride(2),
                                 zc.stride(3), 2)
        assert rc == 0
        _check(y, _oracle(x, w, b, case, ("SiLU", 0.0, 0.0), z, 0))


def test_untrusted_layers_and_tensors_are_refused() -> None:
    """What a crafted plan could hand the kernel: attributes and biases `accepts` refuses, and tensors the kernel
    refuses with a KilnError before any native call (other channels, a destination of another shape or dtype)."""
    from kiln.errors import KilnError
    case = CASES[0]
    x, w, b, _ = _inputs(case, 2)
    for bad in ({"strides": [0, 1]}, {"dilations": [0, 1]}, {"pads": [-1, 0, 0, 0]}, {"group": 4},
                {"kernel_shape": [5, 3]}):
        node = _node(case, x, w, b, None, ("Relu", 0.0, 0.0), 0)
        node.attrs.update(bad)
        assert not TACTIC.supports(node, CPU), bad
    assert not TACTIC.supports(_node(case, x, w, torch.randn(3), None, ("Relu", 0.0, 0.0), 0), CPU)
    kern = TACTIC.make(_node(case, x, w, b, None, ("Relu", 0.0, 0.0), 0), {"vec": 512}, torch.device("cpu"))
    xc = x.contiguous(memory_format=torch.channels_last)
    want = kern(xc)
    with pytest.raises(KilnError, match="channels"):
        kern(torch.randn(2, 9, 12, 13).contiguous(memory_format=torch.channels_last))
    for bad in (torch.empty(2, 8, 12, 12), torch.empty(2, 8, 12, 13, dtype=torch.float64)):
        with pytest.raises(KilnError, match="destination"):
            kern(xc, out=bad)
        with pytest.raises(KilnError, match="destination"):
            kern(x.double(), out=bad)  # the reference's result is checked too
    torch.testing.assert_close(kern(xc), want, rtol=0, atol=0)
