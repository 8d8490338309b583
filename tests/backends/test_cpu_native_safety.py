"""Native CPU tactics (oneDNN through ctypes, Winograd's C transforms) in front of untrusted plans (issue 10).

Each tactic's `accepts` must refuse every node its native code cannot run safely (empty or wrong-length
bias, weights with more input channels than the input, non-float32 types), and each kernel must refuse,
with a KilnError, any tensor it was not made for (another dtype, other channels, a destination of another
shape or dtype) instead of handing it to native code. A released kernel refuses to run; a dropped one
frees its oneDNN objects.
"""
from __future__ import annotations

import gc
from typing import Any, Callable

import pytest
import torch

from kiln.backends.cpu import dnnl
from kiln.backends.cpu.conv_winograd import _kernels
from kiln.backends.cpu.dnnl_primitive import Primitive
from kiln.backends.tactic import get_tactic
from kiln.errors import KilnError
from kiln.ir.dtype import DType
from tests.backends.test_cpu_tactics import CPU, make_node

pytestmark = pytest.mark.skipif(dnnl.library() is None,
                                reason="the oneDNN library (pip install onednn-cpu-gomp) is not installed")

C, K, HW = 8, 16, 6
CONVS = ["cpu.conv_dnnl", "cpu.conv_winograd", "cpu.conv_matmul"]
NATIVE = [*CONVS, "cpu.linear_dnnl", "cpu.pool_dnnl"]


def _skip_without(tid: str) -> None:
    if tid == "cpu.conv_winograd" and _kernels() is None:
        pytest.skip("no C compiler for the Winograd transforms")


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _ksize(tid: str) -> int:
    return 1 if tid == "cpu.conv_matmul" else 3


def _conv(tid: str, w: torch.Tensor | None = None, b: torch.Tensor | None = None, x_dtype: torch.dtype = torch.float32,
          out_dtype: DType = DType.FLOAT32, x_shape: Any = None, fused_z: bool = False) -> Any:
    """A Conv (FusedConv with a residual when fused_z) that `tid` accepts with the defaults."""
    k = _ksize(tid)
    x = _rand(1, C, HW, HW).to(x_dtype)
    w = _rand(K, C, k, k) / 8 if w is None else w
    b = _rand(K, seed=1) if b is None else b
    ins: list[tuple[Any, bool]] = [(x, False), (w, True), (b, True)]
    attrs: dict[str, Any] = {"pads": [k // 2] * 4}
    if fused_z:
        ins.append((_rand(1, K, HW, HW, seed=2), False))
        attrs.update(activation="Relu", alpha=0.0, beta=0.0, act_before_add=0)
    return make_node("FusedConv" if fused_z else "Conv", ins, (1, K, HW, HW), attrs, domain="kiln" if fused_z else "",
                     shapes={0: x_shape} if x_shape is not None else None, out_dtype=out_dtype)


def _linear(w: torch.Tensor | None = None, b: torch.Tensor | None = None, a_dtype: torch.dtype = torch.float32,
            out_dtype: DType = DType.FLOAT32, a_shape: Any = None) -> Any:
    a = _rand(1, C).to(a_dtype)
    w = _rand(K, C) / 4 if w is None else w
    b = _rand(K, seed=1) if b is None else b
    return make_node("FusedGemm", [(a, False), (w, True), (b, True)], (1, K), {"activation": ""}, domain="kiln",
                     shapes={0: a_shape} if a_shape is not None else None, out_dtype=out_dtype)


def _pool(x_dtype: torch.dtype = torch.float32, out_dtype: DType = DType.FLOAT32, **attrs: Any) -> Any:
    x = _rand(1, C, HW, HW).to(x_dtype)
    attrs = attrs or {"kernel_shape": [2, 2], "strides": [2, 2]}
    return make_node("MaxPool", [(x, False)], (1, C, HW // 2, HW // 2), attrs, opset=17, out_dtype=out_dtype)


def _node(tid: str, **kw: Any) -> Any:
    if tid == "cpu.linear_dnnl":
        return _linear(**{k.replace("x_", "a_"): v for k, v in kw.items()})
    if tid == "cpu.pool_dnnl":
        return _pool(**kw)
    return _conv(tid, **kw)


def _accepts(tid: str, node: Any) -> bool:
    tactic = get_tactic(tid)
    assert tactic is not None
    return tactic.supports(node, CPU)


@pytest.mark.parametrize("tid", NATIVE)
def test_accepts_the_plain_layer(tid: str) -> None:
    _skip_without(tid)
    assert _accepts(tid, _node(tid))


def _bad_bias(tid: str, n: int) -> Any:
    b = _rand(n, seed=3) if n else torch.empty(0)
    return _linear(b=b) if tid == "cpu.linear_dnnl" else _conv(tid, b=b)


@pytest.mark.parametrize("tid", [*CONVS, "cpu.linear_dnnl"])
@pytest.mark.parametrize("n", [0, 1, K - 1, K + 1], ids=lambda n: f"bias{n}")
def test_refuses_a_bias_of_the_wrong_length(tid: str, n: int) -> None:
    _skip_without(tid)
    assert not _accepts(tid, _bad_bias(tid, n))


@pytest.mark.parametrize("tid", [*CONVS, "cpu.linear_dnnl"])
def test_refuses_a_bias_that_is_not_a_vector(tid: str) -> None:
    _skip_without(tid)
    b = _rand(1, K, seed=3)
    assert not _accepts(tid, _linear(b=b) if tid == "cpu.linear_dnnl" else _conv(tid, b=b))


@pytest.mark.parametrize("tid", [*CONVS, "cpu.linear_dnnl"])
@pytest.mark.parametrize("extra", [1, 5])
def test_refuses_weights_with_more_input_channels_than_the_input(tid: str, extra: int) -> None:
    _skip_without(tid)
    if tid == "cpu.linear_dnnl":
        node = _linear(w=_rand(K, C + extra))
    else:
        k = _ksize(tid)
        node = _conv(tid, w=_rand(K, C + extra, k, k))
    assert not _accepts(tid, node)


@pytest.mark.parametrize("tid", NATIVE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.bool, torch.float16, torch.float64])
def test_refuses_other_input_types(tid: str, dtype: torch.dtype) -> None:
    _skip_without(tid)
    # a bfloat16 input with a float32 output is a BF16 layer (kiln.backends.cpu.common.bf16_layer), which the oneDNN
    # conv and linear tactics take: their primitives are made for bf16 and check every tensor's dtype per call
    # (tests/backends/test_cpu_bf16.py checks what they compute)
    bf16_layer = dtype == torch.bfloat16 and tid in ("cpu.conv_dnnl", "cpu.linear_dnnl")
    assert _accepts(tid, _node(tid, x_dtype=dtype)) == bf16_layer


@pytest.mark.parametrize("tid", NATIVE)
@pytest.mark.parametrize("dtype", [DType.BFLOAT16, DType.BOOL])
def test_refuses_other_output_types(tid: str, dtype: DType) -> None:
    _skip_without(tid)
    assert not _accepts(tid, _node(tid, out_dtype=dtype))


@pytest.mark.parametrize("tid", CONVS)
def test_conv_attributes_are_checked(tid: str) -> None:
    _skip_without(tid)
    k = _ksize(tid)
    for bad in ({"strides": [0, 1]}, {"strides": [1, -1]}, {"dilations": [0, 1]}, {"pads": [-1, 0, 0, 0]},
                {"pads": [0, 0]}, {"group": 0}, {"group": 3}, {"kernel_shape": [k + 2, k]}, {"auto_pad": "BOGUS"}):
        node = _conv(tid)
        node.attrs.update(bad)
        assert not _accepts(tid, node), bad
    node = _conv(tid, fused_z=True)
    assert _accepts(tid, node)
    node.inputs[3].type = type(node.inputs[3].type)(DType.FLOAT32, (1, K, HW, HW + 1))  # a residual of another shape
    assert not _accepts(tid, node)


def test_pool_attributes_are_checked() -> None:
    for bad in ({"kernel_shape": [0, 2]}, {"kernel_shape": [2]}, {"kernel_shape": [2, 2], "strides": [0, 2]},
                {"kernel_shape": [2, 2], "pads": [-1, 0, 0, 0]}, {"kernel_shape": [2, 2], "dilations": [0, 1]}):
        assert not _accepts("cpu.pool_dnnl", _pool(**bad)), bad


# ---- call-time checks ------------------------------------------------------------------------------------

def _kernel(tid: str, node: Any) -> Callable[..., Any]:
    tactic = get_tactic(tid)
    assert tactic is not None and tactic.supports(node, CPU)
    kernel = tactic.make(node, tactic.configs(node, CPU)[0], torch.device("cpu"))
    own = kernel.prepacked

    def call(*args: Any, **kw: Any) -> Any:
        return kernel(*[None if i in own else a for i, a in enumerate(args)], **kw)
    call.kernel = kernel  # type: ignore[attr-defined]
    return call


def _inputs(tid: str, channels: int = C, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(a valid input, the matching destination) of the plain layer, with other channels or dtype if asked."""
    if tid == "cpu.linear_dnnl":
        return _rand(1, channels).to(dtype), torch.empty(1, K)
    x = _cl(_rand(1, channels, HW, HW).to(dtype))
    if tid == "cpu.pool_dnnl":
        return x, _cl(torch.empty(1, C, HW // 2, HW // 2))
    return x, _cl(torch.empty(1, K, HW, HW))


@pytest.mark.parametrize("tid", NATIVE)
def test_kernel_refuses_tensors_it_was_not_made_for(tid: str) -> None:
    _skip_without(tid)
    node = _node(tid)
    call = _kernel(tid, node)
    x, out = _inputs(tid)
    want = call(x, out=out).clone()  # the valid call first: the checks below hit a primitive that exists
    for dtype in (torch.bfloat16, torch.bool, torch.float16, torch.float64):
        xb, _ = _inputs(tid, dtype=dtype)
        with pytest.raises(KilnError, match="float32"):
            call(xb, out=out)
        if xb.dim() == 4:  # an NCHW tensor goes through the reorder into channels-last first
            with pytest.raises(KilnError, match="float32"):
                call(xb.contiguous(), out=out)
    for channels in (C - 1, C + 1, 2 * C):
        xc, _ = _inputs(tid, channels=channels)
        with pytest.raises(KilnError):
            call(xc, out=out)
    n, k, h, w = [*out.shape, 0, 0][:4]
    for shape in ([n, k, h, w + 1], [n, k + 1, h, w], [2 * n, k, h, w]) if out.dim() == 4 else ([n, k + 1], [2 * n, k]):
        bad = torch.empty(shape)
        with pytest.raises(KilnError):
            call(x, out=_cl(bad) if bad.dim() == 4 else bad)
    for dtype in (torch.bfloat16, torch.bool):
        with pytest.raises(KilnError):
            call(x, out=torch.empty_like(out, dtype=dtype))
    torch.testing.assert_close(call(x, out=out), want, rtol=0, atol=0)  # nothing above disturbed the kernel


@pytest.mark.parametrize("tid", CONVS)
def test_conv_kernel_checks_the_residual(tid: str) -> None:
    _skip_without(tid)
    call = _kernel(tid, _conv(tid, fused_z=True))
    x, out = _inputs(tid)
    z = _cl(_rand(1, K, HW, HW, seed=4))
    call(x, None, None, z, out=out)
    for bad in (_cl(_rand(1, K, HW, HW - 1)), _cl(_rand(1, K - 1, HW, HW)), z.to(torch.bfloat16),
                z.contiguous().to(torch.bfloat16)):
        with pytest.raises(KilnError):
            call(x, None, None, bad, out=out)


@pytest.mark.parametrize("tid", CONVS)
def test_dynamic_channels_are_checked_per_call(tid: str) -> None:
    """An input whose channel dim is not static: accepted, and each call checks it against the weights."""
    _skip_without(tid)
    node = _conv(tid, x_shape=(1, "C", HW, HW))
    assert _accepts(tid, node)
    call = _kernel(tid, node)
    x, out = _inputs(tid)
    call(x, out=out)
    with pytest.raises(KilnError):
        call(_inputs(tid, channels=C + 3)[0], out=out)


# ---- resources ---------------------------------------------------------------------------------------------

def _live_primitives() -> list[Primitive]:
    gc.collect()
    return [o for o in gc.get_objects() if issubclass(type(o), Primitive) and not o.closed and o._finalizer.alive]


@pytest.mark.parametrize("tid", NATIVE)
def test_release_destroys_the_primitives_and_refuses_calls(tid: str) -> None:
    _skip_without(tid)
    call = _kernel(tid, _node(tid))
    x, out = _inputs(tid)
    x_nchw = x.contiguous()  # through the kernel's reorder as well
    call(x, out=out)
    call(x_nchw, out=out)
    before = _live_primitives()
    call.kernel.close()  # type: ignore[attr-defined]
    call.kernel.close()  # type: ignore[attr-defined]  # idempotent
    after = _live_primitives()
    assert len(after) < len(before)
    with pytest.raises(KilnError, match="released"):
        call(x, out=out)
    with pytest.raises(KilnError, match="released"):
        call(x_nchw, out=out)


def test_winograd_scratch_goes_with_the_last_kernel() -> None:
    """The per-thread Winograd buffers are shared by every Winograd layer; releasing or dropping the last
    Winograd kernel drops them (for every thread)."""
    from kiln.backends.cpu import conv_winograd
    _skip_without("cpu.conv_winograd")
    gc.collect()
    live = conv_winograd._Users.live
    a, b = (_kernel("cpu.conv_winograd", _conv("cpu.conv_winograd")) for _ in range(2))
    assert conv_winograd._Users.live == live + 2
    x, out = _inputs("cpu.conv_winograd")
    a(x, out=out)
    a.kernel.close()  # type: ignore[attr-defined]
    a.kernel.close()  # type: ignore[attr-defined]
    assert conv_winograd._Users.live == live + 1
    b(x, out=out)
    local = conv_winograd._LOCAL
    del b
    gc.collect()
    assert conv_winograd._Users.live == live
    if live == 0:
        assert conv_winograd._LOCAL is not local  # a new, empty per-thread store


@pytest.mark.parametrize("tid", NATIVE)
def test_dropping_a_kernel_frees_its_primitives(tid: str) -> None:
    _skip_without(tid)
    before = {id(p) for p in _live_primitives()}
    call = _kernel(tid, _node(tid))
    x, out = _inputs(tid)
    call(x, out=out)
    call(x.contiguous(), out=out)
    finalizers = [p._finalizer for p in _live_primitives() if id(p) not in before]
    assert finalizers
    del call
    gc.collect()
    assert not any(f.alive for f in finalizers)  # the collected primitives destroyed their oneDNN objects


def test_a_primitive_runs_on_several_threads_at_once() -> None:
    """Concurrent calls on one primitive each take their own argument set: no handle is re-pointed under
    another call."""
    import threading
    call = _kernel("cpu.conv_dnnl", _conv("cpu.conv_dnnl"))
    xs = [_cl(_rand(1, C, HW, HW, seed=s)) for s in range(4)]
    want = [call(x).clone() for x in xs]
    bad: list[int] = []

    def work(k: int) -> None:
        out = _cl(torch.empty(1, K, HW, HW))
        for i in range(300):
            j = (i + k) % len(xs)
            if not torch.equal(call(xs[j], out=out), want[j]):
                bad.append(k)
                return
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad
