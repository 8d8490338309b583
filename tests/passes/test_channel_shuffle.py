"""Channel shuffles (Reshape [N, g, C/g, H, W] -> Transpose [0, 2, 1, 3, 4] -> Reshape [N, C, H, W]) become one
ChannelShuffle layer and compute what onnxruntime computes on the original model.

Models are built for the CPU at optimization level 0 (tactics by priority: nothing depends on timing), run on
fresh random inputs and compared with onnxruntime (exact data movement: normwise relative error <= 1e-6).
Layer counts are compared with a build whose recognition pass is switched off: each shuffle is 2 layers
fewer. Near misses (another perm, a split that mixes C and H, an intermediate read elsewhere, a final shape
that is not [N, C, H, W]) keep their Reshapes and Transpose and still match. The two tactics' kernels are
checked against numpy on channels-last, contiguous and strided tensors.
"""
from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.tactic import TacticContext, candidate_tactics, get_tactic
from kiln.builder import Builder, BuilderConfig, OptimizationProfile
from kiln.errors import KilnError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Value
from kiln.ir.types import TensorType
from kiln.logger import Logger, Severity
from kiln.passes.recognise import RecogniseChannelShuffle
from kiln.plan.format import plan_from_bytes, plan_to_bytes
from kiln.runtime.engine import Engine
from kiln.testing import run_oracle
from tests.passes.models import rel_error

TOL = 1e-6


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)


def _i64(*v: int) -> np.ndarray:
    return np.array(v, np.int64)


def shuffle_model(c: int = 24, g: int = 2, batch: Any = 1, hw: tuple[Any, Any] = (5, 7), convs: bool = True,
                  t1: tuple[int, ...] | None = None, t2: tuple[int, ...] | None = None, chain: bool = False,
                  perm: tuple[int, ...] = (0, 2, 1, 3, 4), extra_out: str | None = None, blocks: int = 1,
                  seed: int = 0) -> Any:
    """x [batch, c, *hw] (-> 1x1 conv + Relu) -> `blocks` channel shuffles with Relus between (-> 1x1 conv) -> y.

    The shuffle's Reshape targets are constants t1/t2 (default [0, g, c/g, H, W] and [0, c, H, W]) or, with
    `chain`, run-time Shape -> Gather -> Unsqueeze -> Concat chains over the shuffled tensor (as torch.onnx
    exports x.view(n, g, c // g, h, w) with a dynamic batch); `extra_out` is also a graph output."""
    rng = np.random.default_rng(seed)
    h, w = hw
    inits: dict[str, np.ndarray] = {}
    nodes = []
    cur = "x"
    if convs:
        inits |= {"w0": _w(rng, c, c, 1, 1), "b0": _w(rng, c)}
        nodes += [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"]), helper.make_node("Relu", ["c0"], ["a0"])]
        cur = "a0"
    for k in range(blocks):
        p = f"s{k}_"
        if k:  # shuffles back to back would have their Reshapes merged by the shape-op cleanup
            nodes.append(helper.make_node("Relu", [cur], [p + "in"]))
            cur = p + "in"
        if chain:
            inits |= {p + "i0": _i64(0), p + "i2": _i64(2), p + "i3": _i64(3), p + "ax": _i64(0),
                      p + "g": _i64(g), p + "cg": _i64(c // g), p + "c": _i64(c)}
            nodes.append(helper.make_node("Shape", [cur], [p + "shape"]))
            for d in ("0", "2", "3"):
                nodes += [helper.make_node("Gather", [p + "shape", p + "i" + d], [p + "d" + d], axis=0)]
            nodes.append(helper.make_node("Concat", [p + "d0", p + "g", p + "cg", p + "d2", p + "d3"], [p + "t1"],
                                          axis=0))
            nodes.append(helper.make_node("Concat", [p + "d0", p + "c", p + "d2", p + "d3"], [p + "t2"], axis=0))
        else:
            inits[p + "t1"] = _i64(*(t1 or (0, g, c // g, h, w)))
            inits[p + "t2"] = _i64(*(t2 or (0, c, h, w)))
        nodes += [helper.make_node("Reshape", [cur, p + "t1"], [p + "r1"]),
                  helper.make_node("Transpose", [p + "r1"], [p + "tr"], perm=list(perm)),
                  helper.make_node("Reshape", [p + "tr", p + "t2"], [p + "r2"])]
        cur = p + "r2"
    if convs:
        inits |= {"w1": _w(rng, c, c, 1, 1)}
        nodes.append(helper.make_node("Conv", [cur, "w1"], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", [cur], ["y"]))
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if extra_out:
        outs.append(helper.make_tensor_value_info(extra_out, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "shuffle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c, h, w])],
                              outs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = min(m.ir_version, 10)
    return m


def _build(model: Any, **kw: Any) -> Any:
    return Builder(Logger(Severity.ERROR, io.StringIO())).build(model, BuilderConfig(optimization_level=0, **kw))


def _without_pass(model: Any, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> Any:
    with monkeypatch.context() as mp:
        mp.setattr(RecogniseChannelShuffle, "run", lambda self, g, ctx: False)
        return _build(model, **kw)


def _run_check(plan: Any, model: Any, shape: tuple[int, ...], tol: float = TOL) -> None:
    """The plan against onnxruntime on the original model, on a fresh random input."""
    x = np.random.default_rng(int.from_bytes(os.urandom(2), "little")).standard_normal(shape).astype(np.float32)
    got = list(Engine(plan).create_execution_context().execute({"x": torch.from_numpy(x)}).values())
    want = run_oracle(model, {"x": x})
    assert len(got) == len(want)
    for a, b in zip(got, want):
        err = rel_error(a.float().numpy(), b)
        assert err <= tol, f"normwise rel err {err:.3g} > {tol}"


def _ops(plan: Any) -> list[str]:
    return [s["op"] for s in plan.graph["steps"]]


def _steps(plan: Any, op: str) -> list[dict[str, Any]]:
    return [s for s in plan.graph["steps"] if s["op"] == op]


CASES = {
    # name: shuffle_model keywords, input shape
    "shufflenet_g2": (dict(c=24, g=2), (1, 24, 5, 7)),
    "g3_minus_one_targets": (dict(c=12, g=3, t1=(-1, 3, 4, 5, 7), t2=(0, -1, 5, 7)), (1, 12, 5, 7)),
    "g4_static_batch_literal": (dict(c=32, g=4, batch=2, t1=(2, 4, 8, 5, 7), t2=(2, 32, 5, 7)), (2, 32, 5, 7)),
    "g29_channels_per_group_given": (dict(c=58, g=29, t1=(0, -1, 2, 5, 7)), (1, 58, 5, 7)),
    "graph_input_nchw": (dict(c=24, g=2, convs=False), (1, 24, 5, 7)),
    "three_in_a_row": (dict(c=16, g=2, blocks=3), (1, 16, 5, 7)),
    "zero_copies_an_equal_dim": (dict(c=24, g=2, hw=(2, 5), t2=(0, 24, 0, 5)), (1, 24, 2, 5)),  # the 0 copies g = H
}


@pytest.mark.parametrize("case", list(CASES))
def test_shuffle_becomes_one_layer_and_matches(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    kw, shape = CASES[case]
    m = shuffle_model(**kw)
    plan = _build(m)
    ops = _ops(plan)
    blocks = kw.get("blocks", 1)
    assert ops.count("ChannelShuffle") == blocks and "Reshape" not in ops and "Transpose" not in ops, ops
    before = _ops(_without_pass(m, monkeypatch))
    assert before.count("Transpose") == blocks and len(ops) == len(before) - 2 * blocks, (before, ops)
    for step in _steps(plan, "ChannelShuffle"):
        assert step["tactic"] == "cpu.channel_shuffle" and step["attrs"]["groups"] == kw["g"]
    _run_check(plan, m, shape)
    _run_check(plan, m, shape)


def test_dynamic_batch_shape_chains_plan_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    m = shuffle_model(c=24, g=2, batch="N", chain=True, blocks=2)
    prof = OptimizationProfile().set_shape("x", (1, 24, 5, 7), (2, 24, 5, 7), (4, 24, 5, 7))
    plan = _build(m, profiles=[prof])
    assert _ops(plan).count("ChannelShuffle") == 2 and "Transpose" not in _ops(plan), _ops(plan)
    assert len(_ops(plan)) == len(_ops(_without_pass(m, monkeypatch, profiles=[prof]))) - 4
    data = plan_to_bytes(plan)
    loaded = plan_from_bytes(data)
    assert _ops(loaded) == _ops(plan)
    for n in (1, 3, 4):
        _run_check(loaded, m, (n, 24, 5, 7))

    def edit(groups: int) -> bytes:
        bad = plan_from_bytes(data)
        _steps(bad, "ChannelShuffle")[0]["attrs"]["groups"] = groups
        return plan_to_bytes(bad)
    with pytest.raises(KilnError, match="groups"):
        Engine(plan_from_bytes(edit(0)))
    with pytest.raises(KilnError, match="cannot confirm"):
        Engine(plan_from_bytes(edit(5)))  # 24 channels are not 5 groups: no inferred type confirms the header


def test_dynamic_batch_and_height_with_minus_one() -> None:
    m = shuffle_model(c=24, g=2, batch="N", hw=("H", 7), t1=(0, 2, 12, -1, 7), t2=(0, 24, -1, 7))
    prof = OptimizationProfile().set_shape("x", (1, 24, 3, 7), (2, 24, 5, 7), (3, 24, 9, 7))
    plan = _build(m, profiles=[prof])
    assert _ops(plan).count("ChannelShuffle") == 1 and "Transpose" not in _ops(plan), _ops(plan)
    for shape in ((1, 24, 3, 7), (3, 24, 9, 7), (2, 24, 4, 7)):
        _run_check(plan, m, shape)


NEAR_MISSES = {
    "perm_swaps_h_and_w_too": dict(perm=(0, 2, 1, 4, 3), hw=(5, 5)),
    "split_mixes_c_and_h": dict(t1=(0, 2, 24, 2, 7), hw=(4, 7), t2=(0, 24, 4, 7)),
    "transposed_read_elsewhere": dict(extra_out="s0_tr"),
    "split_read_elsewhere": dict(extra_out="s0_r1"),
    "final_shape_not_nchw": dict(t2=(0, 24, 35, 1)),
}


@pytest.mark.parametrize("miss", list(NEAR_MISSES))
def test_near_misses_keep_their_layers(miss: str) -> None:
    kw = NEAR_MISSES[miss]
    m = shuffle_model(**kw)
    plan = _build(m)
    ops = _ops(plan)
    assert "ChannelShuffle" not in ops and ops.count("Transpose") == 1, ops
    hw = kw.get("hw", (5, 7))
    _run_check(plan, m, (1, 24, *hw))


def test_fp16_lowering_shuffles_in_float16(monkeypatch: pytest.MonkeyPatch) -> None:
    # the CUDA target's lowering (a CPU build of --fp16 is float32, and these ops stay float32 on the CPU),
    # run through a CPU build so the op's float16 reference is checked against the oracle here
    import kiln.builder
    from kiln.passes.precision import LOW_PRECISION_OPS
    monkeypatch.setattr(kiln.builder, "cpu_precision", lambda dtype, logger: dtype)
    monkeypatch.setattr(kiln.builder, "low_precision_ops", lambda device: LOW_PRECISION_OPS)
    m = shuffle_model(c=24, g=2, convs=False)
    plan = _build(m, fp16=True)
    (step,) = _steps(plan, "ChannelShuffle")
    assert plan.graph["values"][step["outputs"][0]]["type"]["dtype"] == "float16"
    x = np.random.default_rng(int.from_bytes(os.urandom(2), "little")).standard_normal((1, 24, 5, 7))
    x = x.astype(np.float16).astype(np.float32)  # exactly representable: the shuffle is exact in float16 too
    got = next(iter(Engine(plan).create_execution_context().execute({"x": torch.from_numpy(x)}).values()))
    want = run_oracle(m, {"x": x})[0]
    assert np.array_equal(got.float().numpy(), want)


def _node(c: int, g: int, dtype: DType = DType.FLOAT32) -> Node:
    t = TensorType(dtype, (2, c, 3, 5))
    return Node("ChannelShuffle", [Value("x", t)], [Value("y", t)], {"groups": g}, name="cs", domain="kiln")


def _numpy_shuffle(x: np.ndarray, g: int) -> np.ndarray:
    n, c, h, w = x.shape
    return x.reshape(n, g, c // g, h, w).transpose(0, 2, 1, 3, 4).reshape(n, c, h, w)


@pytest.mark.parametrize("tid", ["cpu.channel_shuffle", "cuda.channel_shuffle"])
@pytest.mark.parametrize("c,g", [(24, 2), (12, 3), (32, 4), (64, 8), (58, 29), (10, 10), (7, 1)])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "strided"])
def test_kernels_match_numpy_on_any_layout(tid: str, c: int, g: int, layout: str) -> None:
    """Both tactics' kernels (the CUDA one is torch only, so it runs on CPU tensors too) write the shuffle into
    a given channels-last destination, a channel slice of a wider tensor, or their own allocation."""
    node = _node(c, g)
    if tid.startswith("cpu"):
        assert [t.id for t in candidate_tactics(node, TacticContext(torch.device("cpu")))][0] == tid
    k = get_tactic(tid).make(node, {}, torch.device("cpu"))  # type: ignore[union-attr]
    assert k.writes_out == 1 and k.out_format == "channels_last"
    base = torch.randn(2, c + 3, 3, 5)
    x = {"channels_last": base[:, :c].contiguous(memory_format=torch.channels_last),
         "contiguous": base[:, :c].contiguous(), "strided": base.contiguous(memory_format=torch.channels_last)[:, 2:c + 2]}[layout]
    want = _numpy_shuffle(x.numpy(), g)
    got = k(x)
    assert got.is_contiguous(memory_format=torch.channels_last) and np.array_equal(got.numpy(), want)
    wide = torch.full((2, c + 4, 3, 5), float("nan")).contiguous(memory_format=torch.channels_last)
    out = wide[:, 1:c + 1]
    assert k(x, out=out) is out and np.array_equal(out.numpy(), want)
    assert torch.isnan(wide[:, 0]).all() and torch.isnan(wide[:, c + 1:]).all()  # nothing outside the slice
    with pytest.raises(KilnError, match="groups"):
        k(torch.randn(1, c, 3))
    if g > 1:
        with pytest.raises(KilnError, match="groups"):
            k(torch.randn(1, 3 * g + 1, 3, 5))


def test_cpu_kernel_other_element_types_take_the_torch_copy() -> None:
    k = get_tactic("cpu.channel_shuffle").make(_node(24, 2), {}, torch.device("cpu"))  # type: ignore[union-attr]
    for dtype in (torch.float16, torch.float64, torch.int32):
        x = (torch.randn(2, 24, 3, 5) * 100).to(dtype)
        assert np.array_equal(k(x).numpy(), _numpy_shuffle(x.numpy(), 2))
    assert not get_tactic("cpu.channel_shuffle").supports(_node(24, 2, DType.FLOAT16),  # type: ignore[union-attr]
                                                          TacticContext(torch.device("cpu")))


def test_reference_and_inference() -> None:
    from kiln.ops.infer import infer_node
    from kiln.ops.registry import lookup
    x = torch.randn(2, 24, 3, 5)
    assert np.array_equal(lookup("ChannelShuffle", "kiln").compute(_node(24, 3), x).numpy(), _numpy_shuffle(x.numpy(), 3))
    node = Node("ChannelShuffle", [Value("x", TensorType(DType.FLOAT32, ("N", 24, "H", 7)))],
                [Value("y", TensorType(None, None))], {"groups": 4}, name="cs", domain="kiln")
    assert infer_node(node)[0] == TensorType(DType.FLOAT32, ("N", 24, "H", 7))
    node.attrs["groups"] = 5
    assert infer_node(node)[0].shape is None  # 24 channels are not 5 groups: no type, the runtime reports it


def _shufflenet_unit(c: int = 24, hw: tuple[int, int] = (5, 7), batch: Any = 1, seed: int = 4) -> Any:
    """ShuffleNet v2's basic unit: x [batch, 2c, H, W] -> halves x1, x2 (Slices) -> x2 through 1x1 conv + Relu ->
    Concat(x1, branch) -> channel shuffle (g = 2) -> y."""
    rng = np.random.default_rng(seed)
    h, w = hw
    inits = {"w": _w(rng, c, c, 1, 1), "s0": _i64(0), "sc": _i64(c), "s2": _i64(2 * c), "ax": _i64(1),
             "t1": _i64(0, 2, c, h, w), "t2": _i64(0, 2 * c, h, w)}
    nodes = [helper.make_node("Slice", ["x", "s0", "sc", "ax"], ["x1"]),
             helper.make_node("Slice", ["x", "sc", "s2", "ax"], ["x2"]),
             helper.make_node("Conv", ["x2", "w"], ["c2"]), helper.make_node("Relu", ["c2"], ["b2"]),
             helper.make_node("Concat", ["x1", "b2"], ["cat"], axis=1),
             helper.make_node("Reshape", ["cat", "t1"], ["r1"]),
             helper.make_node("Transpose", ["r1"], ["tr"], perm=[0, 2, 1, 3, 4]),
             helper.make_node("Reshape", ["tr", "t2"], ["y"])]
    g = helper.make_graph(nodes, "unit", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 2 * c, h, w])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("batch", [1, "N"])
def test_shuffle_reads_the_concat_inputs_on_the_cpu(batch: Any) -> None:
    """A Concat of the g groups read only by the shuffle is gone on the CPU: the shuffle interleaves its inputs (one
    a channel slice of x, one a conv's output) in one pass, equal to onnxruntime on the original model."""
    m = _shufflenet_unit(batch=batch)
    prof = [OptimizationProfile().set_shape("x", (1, 48, 5, 7), (2, 48, 5, 7), (3, 48, 5, 7))] if batch == "N" else []
    buf = io.StringIO()
    plan = Builder(Logger(Severity.VERBOSE, buf)).build(m, BuilderConfig(device="cpu", optimization_level=0,
                                                                           profiles=prof))
    ops = _ops(plan)
    assert "Concat" not in ops and ops.count("ChannelShuffle") == 1, ops
    assert len(_steps(plan, "ChannelShuffle")[0]["inputs"]) == 2
    assert "reads the 2 inputs of" in buf.getvalue()
    ctx = Engine(plan).create_execution_context()
    for n in ([1] if batch == 1 else [1, 3]):
        x = np.random.default_rng().standard_normal((n, 48, 5, 7)).astype(np.float32)
        for _ in range(2):  # the second call runs the bound C call
            got = ctx.execute({"x": x})["y"]
            assert rel_error(got, run_oracle(m, {"x": x})[0]) <= TOL


def test_interleave_kernel_on_any_layout() -> None:
    """ChannelShuffle(a, b) (groups 2) on the CPU: y[:, 2i] = a[:, i], y[:, 2i + 1] = b[:, i] for channels-last,
    contiguous and strided inputs, into its own allocation or a channel slice; the reference agrees."""
    from kiln.ops.registry import lookup
    node = Node("ChannelShuffle", [Value("a", TensorType(DType.FLOAT32, (2, 12, 3, 5))),
                                   Value("b", TensorType(DType.FLOAT32, (2, 12, 3, 5)))],
                [Value("y", TensorType(DType.FLOAT32, (2, 24, 3, 5)))], {"groups": 2}, name="s", domain="kiln")
    k = get_tactic("cpu.channel_shuffle").make(node, {}, torch.device("cpu"))  # type: ignore[union-attr]
    base = torch.randn(2, 30, 3, 5).contiguous(memory_format=torch.channels_last)
    for a, b in ((base[:, :12], base[:, 14:26]), (torch.randn(2, 12, 3, 5), base[:, 3:15].contiguous()),
                 (torch.randn(2, 12, 3, 5).contiguous(memory_format=torch.channels_last), torch.randn(2, 12, 3, 5))):
        want = np.stack([a.numpy(), b.numpy()], axis=2).reshape(2, 24, 3, 5)
        assert np.array_equal(k(a, b).numpy(), want)
        assert np.array_equal(lookup("ChannelShuffle", "kiln").compute(node, a, b).numpy(), want)
        wide = torch.full((2, 28, 3, 5), float("nan")).contiguous(memory_format=torch.channels_last)
        out = wide[:, 2:26]
        assert k(a, b, out=out) is out and np.array_equal(out.numpy(), want)
        assert torch.isnan(wide[:, :2]).all() and torch.isnan(wide[:, 26:]).all()
