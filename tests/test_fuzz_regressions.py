"""Regressions for fuzz findings (tests/fuzz/corpus, docs/FUZZING.md): each test pins the class of bug, not
only the case the fuzzer found.

1. HANG: a window attribute of absurd size (MaxPool kernel_shape 2^31..2^63) made the CPU pool tactic loop
   over the window's taps for ever, from both the builder and the plan loader (corpus
   plans/d517f649e4924135, models/615006713a73f239). Now: declared bounds (int32), a runtime bound
   (kiln.ops.conv.MAX_WINDOW) and "the window fits the padded input" in the reference and every pool tactic.
2. WRONG RESULT: a window attribute list of the wrong length (strides [1] on a 2-D MaxPool) was accepted and
   cpu.pool disagreed with the reference (models/90cb4b054e2e0b02, plans/a73711ae00a0ecd7). Now every window
   op refuses it (one value per spatial dim, two pads per dim) and every pool tactic declines it.
3. WRONG RESULT: an extra `captures` entry on an ordinary plan step reached the kernel as an extra positional
   input (plans/397986233f9b9178, plans/af9f3d604247eec6). Now a step's captures must be exactly what its
   subgraphs capture, in order; and a step's number of inputs / outputs must be what its op accepts.
"""
from __future__ import annotations

import contextlib
import io
import signal
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.tactic import get_tactic
from kiln.builder import Builder, BuilderConfig
from kiln.errors import KilnError, PlanFormatError, UnsupportedOpError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Value
from kiln.ir.types import TensorType
from kiln.logger import Logger, Severity
from kiln.ops.attrs import check_arity, validate_attrs
from kiln.ops.conv import MAX_WINDOW
from kiln.ops.pool import Window
from kiln.plan.format import Plan, plan_from_bytes, plan_to_bytes
from kiln.runtime.engine import Engine
from kiln.testing import run_kiln, run_oracle

BIG = [2**20 + 1, 2**31 - 1, 2**31, 2**32, 2**63 - 1]
"""Window sizes above Kiln's bound: the first still an int32, the last the largest int64."""


# ---- helpers ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def _within(seconds: float) -> Iterator[None]:
    """Fail with TimeoutError instead of hanging (the bugs here were hangs)."""
    def _alarm(*_: Any) -> None:
        raise TimeoutError(f"no answer within {seconds} s")
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _one_line(e: BaseException, *fragments: str) -> str:
    msg = str(e)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return msg


def _model(nodes: list[Any], inits: list[Any] = (), shape: tuple[int, ...] = (1, 4, 8, 8), opset: int = 17) -> Any:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _window_model(op: str, shape: tuple[int, ...] = (1, 4, 8, 8), **attrs: Any) -> Any:
    """One window op on x; Conv / ConvTranspose get a constant 3x3 (or 3) weight."""
    nd = len(shape) - 2
    if op in ("Conv", "ConvTranspose"):
        w = np.random.default_rng(0).standard_normal((4, 4, *[3] * nd)).astype(np.float32)
        return _model([helper.make_node(op, ["x", "w"], ["y"], name="win", **attrs)],
                      [numpy_helper.from_array(w, "w")], shape)
    return _model([helper.make_node(op, ["x"], ["y"], name="win", **attrs)], (), shape)


def _feeds(shape: tuple[int, ...], seed: int | None = None) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def _build(model: Any, **kw: Any) -> Plan:
    return Builder(Logger(Severity.ERROR, io.StringIO())).build(model, BuilderConfig(device="cpu", **kw))


def _mutate(plan: Plan, fn: Callable[[Plan], Any]) -> bytes:
    copy = plan_from_bytes(plan_to_bytes(plan))  # fresh JSON structures
    fn(copy)
    return plan_to_bytes(copy)


def _step(plan: Plan, op: str) -> dict[str, Any]:
    return next(s for s in plan.graph["steps"] if s["op"] == op)


def _load_and_run(data: bytes, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    return Engine(plan_from_bytes(data)).create_execution_context().execute(feeds)


def _close(got: Any, want: Any, tol: float = 1e-5) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    if want.size:
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, float(np.abs(want).max())))


def _matches_oracle(model: Any, shape: tuple[int, ...], runs: int = 2) -> None:
    """Kiln (built, plan round-tripped through bytes, run) against onnxruntime on fresh random inputs."""
    for _ in range(runs):
        feeds = _feeds(shape)
        got, want = run_kiln(model, feeds), run_oracle(model, feeds)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _close(g, w)


def _pool_node(shape: tuple[int, ...] = (1, 4, 8, 8), op: str = "MaxPool", **attrs: Any) -> Node:
    x = Value("x", TensorType(DType.FLOAT32, shape))
    y = Value("y", TensorType(DType.FLOAT32, None))
    return Node(op, [x], [y], {"kernel_shape": [3, 3], **attrs}, name="pool", opset=17)


# ---- 1. window sizes: bounded, never a hang ---------------------------------------------------------

@pytest.mark.parametrize("attrs", [
    *({"kernel_shape": [3, k]} for k in BIG),
    *({"kernel_shape": [k, 3]} for k in BIG[1:]),
    {"kernel_shape": [3, 3], "strides": [1, 2**31]},
    {"kernel_shape": [3, 3], "dilations": [2**40, 1]},
    {"kernel_shape": [3, 3], "pads": [0, 0, 0, 2**31 - 1]},
    {"kernel_shape": [3, 5], "dilations": [1, 2**20], "auto_pad": "SAME_UPPER"},  # SAME asks for a 2^21 pad
    {"kernel_shape": [3, 11], "pads": [1, 1, 1, 1]},  # in bounds, but wider than the padded input (10)
    {"kernel_shape": [3, 6], "dilations": [1, 2]},  # a dilated window (11) wider than the input (8)
])
@pytest.mark.parametrize("op", ["MaxPool", "AveragePool", "LpPool"])
def test_absurd_or_oversized_window_refused_by_builder(op: str, attrs: dict[str, Any]) -> None:
    """models/615006713a73f239: the builder (or, for what only the input size tells, the run) refuses with
    one line instead of looping for ever in cpu.pool's tap loops."""
    model = _window_model(op, **attrs)
    with _within(60), pytest.raises(KilnError) as e:
        run_kiln(model, _feeds((1, 4, 8, 8)))
    _one_line(e.value)


@pytest.fixture(scope="module")
def maxpool_plan() -> Plan:
    return _build(_window_model("MaxPool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))


def test_genuine_maxpool_plan_matches_oracle(maxpool_plan: Plan) -> None:
    model = _window_model("MaxPool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    for _ in range(2):
        feeds = _feeds((1, 4, 8, 8))
        _close(_load_and_run(plan_to_bytes(maxpool_plan), feeds)["y"], run_oracle(model, feeds)[0])


@pytest.mark.parametrize("tactic", [None, ("cpu.pool", {"algo": "aten"}), ("ref", {})])
@pytest.mark.parametrize("name, value", [
    *(("kernel_shape", [3, k]) for k in BIG),
    ("strides", [2, 2**31 - 1]), ("dilations", [2**30, 1]), ("pads", [1, 1, 1, 2**32]),
    ("kernel_shape", [3, 11]),  # in bounds, wider than the padded input
])
def test_absurd_or_oversized_window_refused_by_plan_loader(maxpool_plan: Plan, name: str, value: list[int],
                                                           tactic: tuple[str, dict[str, Any]] | None) -> None:
    """plans/d517f649e4924135: kernel_shape [3, 2^31 - 1] edited into a plan hung the loader (cpu.pool's
    configs). Whatever tactic the plan names, the load or the run is refused with one line, quickly."""
    def edit(p: Plan) -> None:
        st = _step(p, "MaxPool")
        st["attrs"][name] = value
        if tactic is not None:
            st["tactic"], st["config"] = tactic
    data = _mutate(maxpool_plan, edit)
    with _within(60), pytest.raises(KilnError) as e:
        _load_and_run(data, _feeds((1, 4, 8, 8)))
    _one_line(e.value)


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool", "LpPool", "Conv", "ConvTranspose", "ConvInteger",
                                "QLinearConv", "DeformConv", "MaxUnpool"])
@pytest.mark.parametrize("name", ["kernel_shape", "strides", "dilations", "pads"])
def test_declared_window_sizes_are_int32(op: str, name: str) -> None:
    opset = 19 if op == "DeformConv" else 17
    if op == "MaxUnpool" and name == "dilations":
        pytest.skip("MaxUnpool has no dilations")
    value = [1, 2**31] if name != "pads" else [0, 0, 0, 2**31]
    attrs = {"kernel_shape": [3, 3], name: value}
    with pytest.raises(UnsupportedOpError, match=f"'{name}' must be <= {2**31 - 1}"):
        validate_attrs(op, "", opset, attrs, "n")
    with pytest.raises(UnsupportedOpError, match=f"'{name}' must be <= {2**31 - 1}"):
        validate_attrs("FusedConv", "kiln", 1, {name: value}, "n")


@pytest.mark.parametrize("attrs, fragment", [
    ({"kernel_shape": [3, 11], "pads": [1, 1, 1, 1]}, "more than the padded input"),
    ({"kernel_shape": [3, 5], "dilations": [1, 3]}, "more than the padded input"),
    ({"kernel_shape": [3, MAX_WINDOW + 1]}, "outside"),
    ({"kernel_shape": [3, 3], "strides": [MAX_WINDOW + 1, 1]}, "outside"),
    ({"kernel_shape": [3, 3], "pads": [0, 0, MAX_WINDOW + 1, 0]}, "outside"),
    ({"kernel_shape": [3, 5], "dilations": [1, MAX_WINDOW], "auto_pad": "SAME_LOWER"}, "outside"),  # 2^21 pads
])
def test_reference_window_refuses_absurd_geometry(attrs: dict[str, Any], fragment: str) -> None:
    """kiln.ops.pool.Window (the reference, and the geometry every pool tactic reads) raises at once."""
    node = _pool_node(**attrs)
    with _within(10):
        with pytest.raises(UnsupportedOpError, match=fragment):
            Window(node, torch.empty((1, 4, 8, 8), device="meta"))
        with pytest.raises(UnsupportedOpError, match=fragment):
            from kiln.ops.registry import lookup
            lookup("MaxPool").compute(node, torch.zeros((1, 4, 8, 8)))


def _axis_taps_unbounded(n: int, k: int, s: int, p: int) -> tuple[int, list[tuple[int, int, slice]]]:
    """cpu.pool's _axis_taps as it was (one iteration per tap of the kernel): the oracle for its bounded form."""
    out = (n + 2 * p - k) // s + 1
    taps = []
    for t in range(k):
        off = t - p
        j0 = max(0, (-off + s - 1) // s)
        j1 = min(out, (n - 1 - off) // s + 1)
        if j1 > j0:
            start = j0 * s + off
            taps.append((j0, j1, slice(start, start + (j1 - j0 - 1) * s + 1, s)))
    return out, taps


def test_cpu_pool_tap_loops_are_bounded() -> None:
    from kiln.backends.cpu.pool import _axis_taps
    for n in range(1, 10):
        for k in range(1, 12):
            for s in range(1, 5):
                for p in range(0, 4):
                    want = _axis_taps_unbounded(n, k, s, p)
                    got = _axis_taps(n, k, s, p)
                    assert got[0] == want[0] and (want[0] <= 0 or got[1] == want[1]), (n, k, s, p)
    with _within(5):
        for bad in ((8, 2**40, 1, 0), (8, 3, 2**63 - 1, 0), (8, 3, 1, 2**31), (8, 0, 1, 0)):
            with pytest.raises(ValueError):
                _axis_taps(*bad)
        out, taps = _axis_taps(4, MAX_WINDOW, 1, MAX_WINDOW // 2)  # a loop over the taps that reach the input
        assert out == 5 and len(taps) == 8


@pytest.mark.parametrize("shape, op, attrs", [
    ((1, 4, 8, 8), "MaxPool", {"kernel_shape": [10, 3], "pads": [1, 1, 1, 1]}),  # window = padded input
    ((1, 4, 8, 8), "MaxPool", {"kernel_shape": [8, 8]}),
    ((1, 4, 9, 7), "MaxPool", {"kernel_shape": [3, 2], "strides": [2, 1], "dilations": [4, 6]}),
    ((1, 4, 8, 8), "AveragePool", {"kernel_shape": [8, 3], "strides": [1, 2], "pads": [0, 1, 0, 1]}),
    ((2, 3, 4096), "MaxPool", {"kernel_shape": [4096]}),  # a long 1-D window (the reference)
    ((2, 3, 300), "AveragePool", {"kernel_shape": [257], "strides": [7], "pads": [3, 4]}),
    ((1, 2, 5, 6, 7), "MaxPool", {"kernel_shape": [5, 6, 7]}),
])
def test_large_genuine_windows_match_onnxruntime(shape: tuple[int, ...], op: str, attrs: dict[str, Any]) -> None:
    """Windows up to the padded input's size still compute, and agree with onnxruntime."""
    _matches_oracle(_window_model(op, shape, **attrs), shape)


# ---- 2. window attribute lists: one value per spatial dim -----------------------------------------

WRONG_LENGTHS = [
    ("strides", {"strides": [1]}), ("strides", {"strides": [2]}), ("strides", {"strides": [1, 1, 1]}),
    ("dilations", {"dilations": [2]}), ("pads", {"pads": [1, 1]}), ("pads", {"pads": [1, 1, 1]}),
    ("kernel_shape", {"kernel_shape": [3]}), ("kernel_shape", {"kernel_shape": [3, 3, 3]}),
]


@pytest.mark.parametrize("name, attrs", WRONG_LENGTHS)
@pytest.mark.parametrize("op", ["MaxPool", "AveragePool", "LpPool", "Conv", "ConvTranspose"])
def test_wrong_length_window_lists_refused(op: str, name: str, attrs: dict[str, Any]) -> None:
    """models/90cb4b054e2e0b02: MaxPool strides [1] on a 2-D pool built and ran (cpu.pool and the reference
    disagreed). Every window op refuses a list without one value per spatial dim (pads: two), naming it."""
    if op in ("Conv", "ConvTranspose") and "kernel_shape" not in attrs:
        attrs = {"kernel_shape": [3, 3], **attrs}
    elif op not in ("Conv", "ConvTranspose"):
        attrs = {"kernel_shape": [3, 3], **attrs}
    model = _window_model(op, **attrs)
    with pytest.raises(KilnError) as e:
        run_kiln(model, _feeds((1, 4, 8, 8)))
    _one_line(e.value, name)


@pytest.mark.parametrize("name, attrs", WRONG_LENGTHS)
def test_reference_window_refuses_wrong_lengths(name: str, attrs: dict[str, Any]) -> None:
    node = _pool_node(**attrs)
    for op in ("MaxPool", "AveragePool", "LpPool"):
        node.op_type = op
        with pytest.raises(UnsupportedOpError, match=name):
            Window(node, torch.empty((1, 4, 8, 8), device="meta"))
        with pytest.raises(UnsupportedOpError, match=name):
            from kiln.ops.registry import lookup
            lookup(op).compute(node, torch.zeros((1, 4, 8, 8)))


def _pool_tactics() -> list[tuple[Any, Callable[[Node], bool]]]:
    import kiln.backends.cpu  # noqa: F401  (registers the CPU tactics)
    out = [(get_tactic("cpu.pool"), lambda n: get_tactic("cpu.pool").accepts(n)),
           (get_tactic("cpu.pool_dnnl"), lambda n: get_tactic("cpu.pool_dnnl").accepts(n))]
    try:
        import kiln.backends.cuda.triton_pool as tp
        out.append((tp.TritonMaxPool(), lambda n: tp.TritonMaxPool().supports(n, None)))  # type: ignore[arg-type]
    except Exception:  # no triton here: the CUDA tactic is not importable
        pass
    return out


@pytest.mark.parametrize("attrs", [
    *(a for _, a in WRONG_LENGTHS),
    {"kernel_shape": [3, 2**31 - 1]}, {"kernel_shape": [3, 3], "strides": [1, 2**40]},
    {"kernel_shape": [3, 3], "pads": [0, 0, 0, MAX_WINDOW + 1]},
    {"kernel_shape": [3, 11], "pads": [1, 1, 1, 1]}, {"kernel_shape": [3, 6], "dilations": [1, 2]},
])
def test_pool_tactics_decline_bad_windows(attrs: dict[str, Any]) -> None:
    """cpu.pool, cpu.pool_dnnl and cuda.triton_maxpool decline what the reference refuses, at once."""
    good = _pool_node(strides=[2, 1], pads=[1, 0, 1, 0])
    bad = _pool_node(**({"kernel_shape": [3, 3], **attrs}))
    from kiln.backends.cpu.dnnl import library
    for tactic, takes in _pool_tactics():
        if tactic.id != "cpu.pool_dnnl" or library() is not None:  # without oneDNN it declines everything
            assert takes(good), tactic.id
        with _within(5):
            assert not takes(bad), (tactic.id, attrs)


@pytest.mark.parametrize("tactic", [None, ("cpu.pool", {"algo": "aten"}), ("cpu.pool_dnnl", {}), ("ref", {})])
@pytest.mark.parametrize("edit", ["drop", "extend"])
def test_wrong_length_strides_refused_by_plan_loader(maxpool_plan: Plan, tactic: Any, edit: str) -> None:
    """plans/a73711ae00a0ecd7: a plan's MaxPool strides [2, 2] edited to [2] ran with another output shape
    than the reference's. Whatever tactic the plan names, it is refused."""
    def fn(p: Plan) -> None:
        st = _step(p, "MaxPool")
        st["attrs"]["strides"] = [2] if edit == "drop" else [2, 2, 2]
        if tactic is not None:
            st["tactic"], st["config"] = tactic
    with pytest.raises(KilnError) as e:
        _load_and_run(_mutate(maxpool_plan, fn), _feeds((1, 4, 8, 8)))
    _one_line(e.value)


def test_wrong_length_fused_conv_refused_by_plan_loader() -> None:
    model = _window_model("Conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    plan = _build(model)
    st = _step(plan, "FusedConv")
    for name, value in (("strides", [1]), ("dilations", [1, 1, 1]), ("pads", [1, 1])):
        def fn(p: Plan, name: str = name, value: list[int] = value) -> None:
            _step(p, "FusedConv")["attrs"][name] = value
        with pytest.raises(PlanFormatError) as e:
            _load_and_run(_mutate(plan, fn), _feeds((1, 4, 8, 8)))
        _one_line(e.value, name, st["name"])
    feeds = _feeds((1, 4, 8, 8))
    _close(_load_and_run(plan_to_bytes(plan), feeds)["y"], run_oracle(model, feeds)[0], 1e-4)


# ---- 3. a step's captures and inputs: what its op takes ------------------------------------------

def _if_model(const_capture: bool = False) -> Any:
    """y = If(sum(x) > 0, then: relu(x) + x, else: x * c) with c = -x (or -k, a constant once folded): the
    branches capture b, x and x, c."""
    vi = helper.make_tensor_value_info
    then_g = helper.make_graph([helper.make_node("Add", ["b", "x"], ["t"])], "then", [],
                               [vi("t", TensorProto.FLOAT, [2, 3])])
    else_g = helper.make_graph([helper.make_node("Mul", ["x", "c"], ["e"])], "else", [],
                               [vi("e", TensorProto.FLOAT, [2, 3])])
    nodes = [helper.make_node("Relu", ["x"], ["b"]), helper.make_node("Neg", ["k" if const_capture else "x"], ["c"]),
             helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero"),
             numpy_helper.from_array(np.array([1.0, -2.0, 3.0], np.float32), "k")]
    g = helper.make_graph(nodes, "m", [vi("x", TensorProto.FLOAT, [2, 3])], [vi("y", TensorProto.FLOAT, [2, 3])],
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("level", [0, 3])
@pytest.mark.parametrize("const_capture", [False, True])
def test_genuine_captures_load_and_match_onnxruntime(const_capture: bool, level: int) -> None:
    model = _if_model(const_capture)
    plan = _build(model, optimization_level=level)
    engine = Engine(plan_from_bytes(plan_to_bytes(plan)))
    ctx = engine.create_execution_context()
    rng = np.random.default_rng()
    for sign in (1.0, -1.0, 1.0, -1.0):  # both branches
        x = (np.abs(rng.standard_normal((2, 3))) * sign).astype(np.float32)
        _close(ctx.execute({"x": x})["y"], run_oracle(model, {"x": x})[0])


@pytest.fixture(scope="module")
def conv_plan() -> tuple[Any, Plan]:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="conv3x3"),
             helper.make_node("Relu", ["a"], ["b"], name="relu"),
             helper.make_node("Conv", ["b", "w2"], ["c"], name="conv1x1"),
             helper.make_node("Slice", ["c", "st", "en", "ax"], ["y"], name="slice")]
    inits = [w1, w2, *(numpy_helper.from_array(np.array([v], np.int64), n)
                       for n, v in (("st", 1), ("en", 7), ("ax", 3)))]
    model = _model(nodes, inits)
    return model, _build(model, optimization_level=0)


def test_genuine_conv_plan_matches_onnxruntime(conv_plan: tuple[Any, Plan]) -> None:
    model, plan = conv_plan
    for _ in range(2):
        feeds = _feeds((1, 4, 8, 8))
        _close(_load_and_run(plan_to_bytes(plan), feeds)["y"], run_oracle(model, feeds)[0], 1e-4)


@pytest.fixture(scope="module")
def if_plan() -> Plan:
    return _build(_if_model(), optimization_level=0)


@pytest.mark.parametrize("step, capture", [("conv1x1", "x"), ("conv1x1", "b"), ("conv3x3", "w2"), ("slice", "b"),
                                           ("slice", "st")])
def test_extra_capture_on_ordinary_step_refused(conv_plan: tuple[Any, Plan], step: str, capture: str) -> None:
    """plans/397986233f9b9178 (FusedConv captures += 'b3'), plans/af9f3d604247eec6 (Slice captures += 'idx'):
    the extra capture reached the kernel as an extra input. A step without subgraphs captures nothing."""
    def fn(p: Plan) -> None:
        next(s for s in p.graph["steps"] if s["name"] == step)["captures"] = [capture]
    with pytest.raises(PlanFormatError) as e:
        _load_and_run(_mutate(conv_plan[1], fn), _feeds((1, 4, 8, 8)))
    _one_line(e.value, f"'{step}'", "captures")


@pytest.mark.parametrize("edit", ["drop_last", "drop_first", "reorder", "duplicate", "extra_outer", "extra_const"])
def test_control_flow_captures_must_be_exactly_the_subgraphs(if_plan: Plan, edit: str) -> None:
    caps = _step(if_plan, "If")["captures"]
    assert len(caps) >= 2
    new = {"drop_last": caps[:-1], "drop_first": caps[1:], "reorder": caps[::-1], "duplicate": caps + caps[:1],
           "extra_outer": caps + ["s"], "extra_const": caps + ["zero"]}[edit]

    def fn(p: Plan) -> None:
        _step(p, "If")["captures"] = new
    with pytest.raises(PlanFormatError) as e:
        _load_and_run(_mutate(if_plan, fn), {"x": np.ones((2, 3), np.float32)})
    _one_line(e.value, "captures", f"'{_step(if_plan, 'If')['name']}'")


@pytest.mark.parametrize("which, step, extra, fragment", [
    ("conv", "conv1x1", ["x", "x", "x"], "takes 2 to 4 inputs, got 5"),
    ("conv", "slice", ["st", "st"], "takes 3 to 5 inputs, got 6"),
    ("if", "b", ["x"], "takes 1 input, got 2"),
    ("if", "y", ["cond"], "takes 1 input, got 2"),
])
def test_extra_step_input_refused(conv_plan: tuple[Any, Plan], if_plan: Plan, which: str, step: str,
                                  extra: list[str], fragment: str) -> None:
    """The same class through `inputs`: a step given more inputs than its op takes is refused at load."""
    plan = conv_plan[1] if which == "conv" else if_plan

    def fn(p: Plan) -> None:
        st = next(s for s in p.graph["steps"] if s["name"] == step)
        st["inputs"] = st["inputs"] + extra
    with pytest.raises(PlanFormatError) as e:
        _load_and_run(_mutate(plan, fn), _feeds(tuple(plan.inputs[0]["shape"])))
    _one_line(e.value, f"'{step}'", fragment)


def test_check_arity() -> None:
    x = Value("x", TensorType(DType.FLOAT32, (1, 4, 8, 8)))

    def node(op: str, n_in: int, n_out: int = 1, domain: str = "", opset: int = 17) -> Node:
        return Node(op, [x] * n_in, [Value(f"o{i}") for i in range(n_out)], name="n", domain=domain, opset=opset)

    for ok in (node("Relu", 1), node("Conv", 2), node("Conv", 3), node("Concat", 7), node("MaxPool", 1, 2),
               node("FusedConv", 2, domain="kiln", opset=1), node("FusedConv", 4, domain="kiln", opset=1),
               node("FusedGemm", 3, domain="kiln", opset=1), node("Slice", 5, opset=13), node("Slice", 1, opset=9)):
        check_arity(ok)
    for bad, fragment in ((node("Relu", 2), "takes 1 input, got 2"), (node("Conv", 4), "takes 2 to 3 inputs, got 4"),
                          (node("Conv", 1), "got 1"), (node("Concat", 0), "at least 1 inputs, got 0"),
                          (node("MaxPool", 1, 3), "takes 1 to 2 outputs, got 3"),
                          (node("FusedConv", 5, domain="kiln", opset=1), "takes 2 to 4 inputs, got 5"),
                          (node("FusedGemm", 1, domain="kiln", opset=1), "got 1"),
                          (node("Slice", 2, opset=9), "takes 1 input, got 2")):
        with pytest.raises(UnsupportedOpError, match=fragment):
            check_arity(bad)
