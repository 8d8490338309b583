"""GELU and LayerNorm decompositions as exporters write them become one op each, and compute the same.

Each model is built for the CPU at optimization level 0 (tactics by priority, so the test does not depend on timing), run on fresh random inputs
and compared with onnxruntime on the original (decomposed) model. The plan's steps show what the
recognition did: a GELU after a MatMul/Gemm ends up as the FusedGemm's activation, a LayerNorm as
one LayerNormalization layer on cpu.layernorm. Near misses (a wrong constant, an intermediate read
elsewhere) must stay as they are.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from kiln.builder import Builder, BuilderConfig, OptimizationProfile
from kiln.logger import Logger
from kiln.runtime.engine import Engine
from kiln.testing import run_oracle

H = 48


def _model(nodes: list, consts: dict[str, np.ndarray], outs: list[str], shape: list, opset: int = 17) -> object:
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _f(v: float) -> np.ndarray:
    return np.array(v, np.float32)


def _build_run(model: object, x: np.ndarray, dynamic: bool = False) -> tuple[list[dict], list[np.ndarray]]:
    cfg = BuilderConfig(optimization_level=0)
    if dynamic:
        p = OptimizationProfile()
        p.set_shape("x", (1, *x.shape[1:]), x.shape, (8, *x.shape[1:]))
        cfg = BuilderConfig(optimization_level=0, profiles=[p])
    plan = Builder(Logger()).build(model, cfg)
    out = Engine(plan).create_execution_context().execute({"x": torch.from_numpy(x)})
    return plan.graph["steps"], [v.numpy() for v in out.values()]


def _check(model: object, x: np.ndarray, dynamic: bool = False, tol: float = 2e-5) -> list[dict]:
    steps, got = _build_run(model, x, dynamic)
    want = run_oracle(model, {"x": x})
    for g, w in zip(got, want):
        assert g.shape == w.shape
        err = np.abs(g - w).max() / max(np.abs(w).max(), 1e-30)
        assert err <= tol, err
    return steps


def _gemm_head(rng: np.random.Generator) -> tuple[list, dict[str, np.ndarray]]:
    w = (rng.standard_normal((H, H)) / math.sqrt(H)).astype(np.float32)
    return [helper.make_node("MatMul", ["x", "w"], ["a"])], {"w": w}


ERF_FORMS = {
    # x/sqrt2 -> erf -> +1 -> *x -> *0.5 (torch.onnx of nn.GELU)
    "div_x_half": [helper.make_node("Div", ["a", "s2"], ["b"]), helper.make_node("Erf", ["b"], ["e"]),
                   helper.make_node("Add", ["e", "one"], ["r"]), helper.make_node("Mul", ["a", "r"], ["t"]),
                   helper.make_node("Mul", ["t", "half"], ["y"])],
    # x*0.5 first, then * (1 + erf(x*0.7071)) (transformers' gelu)
    "half_first": [helper.make_node("Mul", ["a", "half"], ["h"]), helper.make_node("Mul", ["a", "is2"], ["b"]),
                   helper.make_node("Erf", ["b"], ["e"]), helper.make_node("Add", ["one", "e"], ["r"]),
                   helper.make_node("Mul", ["h", "r"], ["y"])],
    # (1 + erf) * 0.5, then * x
    "r_half_x": [helper.make_node("Div", ["a", "s2"], ["b"]), helper.make_node("Erf", ["b"], ["e"]),
                 helper.make_node("Add", ["e", "one"], ["r"]), helper.make_node("Mul", ["half", "r"], ["t"]),
                 helper.make_node("Mul", ["t", "a"], ["y"])],
}
GELU_CONSTS = {"s2": _f(math.sqrt(2)), "is2": _f(1 / math.sqrt(2)), "one": _f(1.0), "half": _f(0.5),
               "c": _f(math.sqrt(2 / math.pi)), "k": _f(0.044715), "three": _f(3.0)}


@pytest.mark.parametrize("form", sorted(ERF_FORMS))
def test_erf_gelu_fuses_into_the_gemm(form: str) -> None:
    rng = np.random.default_rng(1)
    head, w = _gemm_head(rng)
    m = _model(head + ERF_FORMS[form], {**w, **GELU_CONSTS}, ["y"], ["N", 7, H])
    steps = _check(m, rng.standard_normal((3, 7, H)).astype(np.float32) * 2, dynamic=True)
    assert [(s["op"], s["attrs"].get("activation")) for s in steps] == [("FusedGemm", "Gelu")]


@pytest.mark.parametrize("cube", ["pow", "mul"])
def test_tanh_gelu_fuses_into_the_gemm(cube: str) -> None:
    rng = np.random.default_rng(2)
    head, w = _gemm_head(rng)
    c3 = ([helper.make_node("Pow", ["a", "three"], ["a3"])] if cube == "pow" else
          [helper.make_node("Mul", ["a", "a"], ["a2"]), helper.make_node("Mul", ["a2", "a"], ["a3"])])
    tail = [helper.make_node("Mul", ["a", "half"], ["h"]), *c3, helper.make_node("Mul", ["k", "a3"], ["q"]),
            helper.make_node("Add", ["a", "q"], ["s"]), helper.make_node("Mul", ["c", "s"], ["u"]),
            helper.make_node("Tanh", ["u"], ["t"]), helper.make_node("Add", ["one", "t"], ["r"]),
            helper.make_node("Mul", ["h", "r"], ["y"])]
    m = _model(head + tail, {**w, **GELU_CONSTS}, ["y"], [2, 5, H])
    steps = _check(m, rng.standard_normal((2, 5, H)).astype(np.float32) * 2)
    assert [(s["op"], s["attrs"].get("activation")) for s in steps] == [("FusedGemm", "GeluTanh")]


def test_gelu_near_misses_are_left_alone() -> None:
    rng = np.random.default_rng(3)
    head, w = _gemm_head(rng)
    wrong = {**GELU_CONSTS, "s2": _f(1.5)}  # not sqrt(2): not a GELU
    m = _model(head + ERF_FORMS["div_x_half"], {**w, **wrong}, ["y"], [2, 5, H])
    steps = _check(m, rng.standard_normal((2, 5, H)).astype(np.float32))
    assert not any(s["attrs"].get("activation") for s in steps)
    m = _model(head + ERF_FORMS["div_x_half"], {**w, **GELU_CONSTS}, ["y", "e"], [2, 5, H])  # erf read outside
    steps = _check(m, rng.standard_normal((2, 5, H)).astype(np.float32))
    assert not any(s["attrs"].get("activation") for s in steps)


def _layernorm(axes: list[int], square: str, affine: bool, eps: float = 1e-5) -> tuple[list, dict[str, np.ndarray]]:
    sq = ([helper.make_node("Pow", ["d", "two"], ["sq"])] if square == "pow" else
          [helper.make_node("Mul", ["d", "d"], ["sq"])])
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=axes), helper.make_node("Sub", ["x", "m"], ["d"]),
             *sq, helper.make_node("ReduceMean", ["sq"], ["v"], axes=axes),
             helper.make_node("Add", ["v", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
             helper.make_node("Div", ["d", "sd"], ["n" if affine else "y"])]
    consts = {"two": _f(2.0), "eps": _f(eps)}
    if affine:
        nodes += [helper.make_node("Mul", ["n", "g"], ["ng"]), helper.make_node("Add", ["ng", "b"], ["y"])]
    return nodes, consts


@pytest.mark.parametrize("square", ["pow", "mul"])
@pytest.mark.parametrize("affine", [True, False])
def test_decomposed_layernorm_is_one_layer(square: str, affine: bool) -> None:
    rng = np.random.default_rng(4)
    nodes, consts = _layernorm([-1], square, affine)
    if affine:
        consts |= {"g": rng.standard_normal(H).astype(np.float32), "b": rng.standard_normal(H).astype(np.float32)}
    m = _model(nodes, consts, ["y"], ["N", 9, H])
    x = (rng.standard_normal((2, 9, H)) * 3 + 1).astype(np.float32)
    steps = _check(m, x, dynamic=True)
    assert [s["op"] for s in steps] == ["LayerNormalization"] and steps[0]["tactic"] in LN_TACTICS


def test_layernorm_over_two_trailing_axes_with_broadcast_scale() -> None:
    rng = np.random.default_rng(5)
    nodes, consts = _layernorm([2, 3], "pow", True, eps=1e-6)
    consts |= {"g": rng.standard_normal((1, 6)).astype(np.float32), "b": rng.standard_normal((5, 6)).astype(np.float32)}
    m = _model(nodes, consts, ["y"], [2, 3, 5, 6])
    steps = _check(m, rng.standard_normal((2, 3, 5, 6)).astype(np.float32))
    assert [s["op"] for s in steps] == ["LayerNormalization"]


def test_layernorm_near_misses_are_left_alone() -> None:
    rng = np.random.default_rng(6)
    nodes, consts = _layernorm([1], "pow", False)  # a middle axis of three: not trailing
    m = _model(nodes, consts, ["y"], [2, 5, 7])
    steps = _check(m, rng.standard_normal((2, 5, 7)).astype(np.float32))
    assert "LayerNormalization" not in [s["op"] for s in steps]
    nodes, consts = _layernorm([-1], "pow", False)
    nodes[1] = helper.make_node("Sub", ["m", "x"], ["d"])  # mean - x: the sign differs from LayerNorm
    m = _model(nodes, consts, ["y"], [2, 5, 7])
    steps = _check(m, rng.standard_normal((2, 5, 7)).astype(np.float32))
    assert "LayerNormalization" not in [s["op"] for s in steps]


@pytest.mark.parametrize("shape,axis", [((3, 197, 64), -1), ((2, 7, 7, 96), -1), ((4, 6, 10), 1), ((5, 768), -1)])
def test_cpu_layernorm_matches_onnxruntime(shape: tuple[int, ...], axis: int) -> None:
    rng = np.random.default_rng(7)
    norm = shape[axis % len(shape):]
    consts = {"g": rng.standard_normal(norm).astype(np.float32), "b": rng.standard_normal(norm).astype(np.float32)}
    node = helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=axis, epsilon=1e-6)
    m = _model([node], consts, ["y"], list(shape))
    steps = _check(m, (rng.standard_normal(shape) * 4 - 2).astype(np.float32), tol=1e-5)
    assert len(steps) == 1 and steps[0]["tactic"] in (LN_TACTICS if axis == -1 else ("cpu.layernorm",))


LN_TACTICS = ("cpu.layernorm", "cpu.layernorm_c")  # aten's layer_norm, the C kernel (last axis, float32)


def _conv_head(rng: np.random.Generator, c: int = 8) -> tuple[list, dict[str, np.ndarray]]:
    w = (rng.standard_normal((c, c, 3, 3)) / math.sqrt(9 * c)).astype(np.float32)
    return [helper.make_node("Conv", ["x", "w"], ["a"], pads=[1, 1, 1, 1])], {"w": w}


HS_CONSTS = {"three": _f(3.0), "zero": _f(0.0), "six": _f(6.0), "sixth": _f(1.0 / 6.0)}
HARDSWISH_FORMS = {
    # Paddle2ONNX: x * clip(x + 3, 0, 6) / 6
    "mul_then_div": [helper.make_node("Add", ["a", "three"], ["p"]), helper.make_node("Clip", ["p", "zero", "six"], ["c"]),
                     helper.make_node("Mul", ["a", "c"], ["m"]), helper.make_node("Div", ["m", "six"], ["y"])],
    # the scale first and as a product, operands commuted: x * (clip(3 + x, 0, 6) * 1/6)
    "scale_then_mul": [helper.make_node("Add", ["three", "a"], ["p"]),
                       helper.make_node("Clip", ["p", "zero", "six"], ["c"]),
                       helper.make_node("Mul", ["sixth", "c"], ["h"]), helper.make_node("Mul", ["h", "a"], ["y"])],
}


@pytest.mark.parametrize("form", sorted(HARDSWISH_FORMS))
def test_hardswish_decomposition_fuses_into_the_conv(form: str) -> None:
    rng = np.random.default_rng(11)
    head, w = _conv_head(rng)
    m = _model(head + HARDSWISH_FORMS[form], {**w, **HS_CONSTS}, ["y"], ["N", 8, 9, 11])
    x = rng.standard_normal((2, 8, 9, 11)).astype(np.float32) * 4  # across the clip's both bounds
    steps = _check(m, x, dynamic=True)
    assert [(s["op"], s["attrs"].get("activation")) for s in steps] == [("FusedConv", "HardSwish")]


def test_hardsigmoid_decomposition_becomes_a_gate_activation() -> None:
    rng = np.random.default_rng(12)
    head, w = _conv_head(rng)
    tail = [helper.make_node("Add", ["a", "three"], ["p"]), helper.make_node("Clip", ["p", "zero", "six"], ["c"]),
            helper.make_node("Div", ["c", "six"], ["y"])]
    m = _model(head + tail, {**w, **HS_CONSTS}, ["y"], [1, 8, 7, 5])
    steps = _check(m, rng.standard_normal((1, 8, 7, 5)).astype(np.float32) * 4)
    assert [(s["op"], s["attrs"].get("activation")) for s in steps] == [("FusedConv", "HardSigmoid")]


def test_hardswish_near_misses_are_left_alone() -> None:
    rng = np.random.default_rng(13)
    head, w = _conv_head(rng)
    form = HARDSWISH_FORMS["mul_then_div"]
    for consts, outs in (({**HS_CONSTS, "six": _f(5.0)}, ["y"]),   # clip(x + 3, 0, 5) / 5: not a hard-swish
                         ({**HS_CONSTS, "three": _f(2.5)}, ["y"]),  # x + 2.5
                         (HS_CONSTS, ["y", "c"])):                  # the clip read outside
        m = _model(head + form, {**w, **consts}, outs, [1, 8, 6, 6])
        steps = _check(m, rng.standard_normal((1, 8, 6, 6)).astype(np.float32) * 4)
        assert not any(s["attrs"].get("activation") in ("HardSwish", "HardSigmoid") for s in steps)


def _rmsnorm(form: str, weighted: bool, opset: int = 17) -> tuple[list, dict[str, np.ndarray]]:
    """The exporters' RMSNorm: mean(x^2) + eps -> sqrt, then x / sqrt, x * Reciprocal(sqrt) or x * (1 / sqrt)."""
    sq = helper.make_node("Pow", ["x", "two"], ["sq"]) if form != "mul_div" else helper.make_node("Mul", ["x", "x"], ["sq"])
    mean = (helper.make_node("ReduceMean", ["sq", "axes"], ["v"]) if opset >= 18 else
            helper.make_node("ReduceMean", ["sq"], ["v"], axes=[-1]))
    out = "n" if weighted else "y"
    nodes = [sq, mean, helper.make_node("Add", ["v", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"])]
    if form == "reciprocal":
        nodes += [helper.make_node("Reciprocal", ["sd"], ["r"]), helper.make_node("Mul", ["x", "r"], [out])]
    elif form == "one_over":
        nodes += [helper.make_node("Div", ["one", "sd"], ["r"]), helper.make_node("Mul", ["r", "x"], [out])]
    else:
        nodes += [helper.make_node("Div", ["x", "sd"], [out])]
    consts = {"two": _f(2.0), "eps": _f(1e-6), "one": _f(1.0), "axes": np.array([-1], np.int64)}
    if weighted:
        nodes.append(helper.make_node("Mul", ["g", "n"], ["y"]))
    return nodes, consts


@pytest.mark.parametrize("form", ["reciprocal", "one_over", "mul_div"])
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("opset", [17, 18])
def test_decomposed_rmsnorm_is_one_c_layer(form: str, weighted: bool, opset: int) -> None:
    """Llama / T5 style RMSNorm becomes one RMSNormalization on the C kernel, and matches onnxruntime on the
    decomposed model at two dynamic shapes."""
    rng = np.random.default_rng()
    nodes, consts = _rmsnorm(form, weighted, opset)
    if weighted:
        consts["g"] = (rng.standard_normal(H) * 0.5 + 1).astype(np.float32)
    used = {i for n in nodes for i in n.input}
    m = _model(nodes, {k: v for k, v in consts.items() if k in used}, ["y"], ["N", "S", H], opset=opset)
    for shape in ((2, 9, H), (1, 4, H)):
        x = (rng.standard_normal(shape) * 3 + 0.5).astype(np.float32)
        steps = _check(m, x, dynamic=True)
        assert [s["op"] for s in steps] == ["RMSNormalization"] and steps[0]["tactic"] == "cpu.rmsnorm_c", steps


def test_rmsnorm_near_misses_are_left_alone() -> None:
    rng = np.random.default_rng()
    nodes, consts = _rmsnorm("reciprocal", False)
    nodes[0] = helper.make_node("Pow", ["x", "four"], ["sq"])  # a fourth power: not a mean square
    m = _model(nodes, {**consts, "four": _f(4.0)}, ["y"], [2, 5, H])
    steps = _check(m, rng.standard_normal((2, 5, H)).astype(np.float32), tol=1e-4)
    assert "RMSNormalization" not in [s["op"] for s in steps]
    nodes, consts = _rmsnorm("reciprocal", False)
    m = _model(nodes, consts, ["y", "sd"], [2, 5, H])  # the root mean square is read outside
    steps = _check(m, rng.standard_normal((2, 5, H)).astype(np.float32))
    assert "RMSNormalization" not in [s["op"] for s in steps]


def _groupnorm(groups: int, affine: bool, rng: np.random.Generator, c: int = 8,
               target0: int = 0) -> tuple[list, dict[str, np.ndarray]]:
    """PyTorch's GroupNorm as the TorchScript exporter writes it: Reshape to [N, G, -1], InstanceNormalization with a
    per-group scale and bias (ones and zeros there; random here), Reshape back to Shape(x), per-channel Mul / Add."""
    nodes = [helper.make_node("Reshape", ["x", "t"], ["r"]),
             helper.make_node("InstanceNormalization", ["r", "s", "b"], ["i"], epsilon=1e-5),
             helper.make_node("Shape", ["x"], ["sx"]),
             helper.make_node("Reshape", ["i", "sx"], ["y" if not affine else "r2"])]
    consts = {"t": np.array([target0, groups, -1], np.int64),
              "s": (rng.standard_normal(groups) + 1).astype(np.float32), "b": rng.standard_normal(groups).astype(np.float32)}
    if affine:
        nodes += [helper.make_node("Mul", ["r2", "g"], ["m"]), helper.make_node("Add", ["m", "be"], ["y"])]
        consts |= {"g": rng.standard_normal((c, 1, 1)).astype(np.float32),
                   "be": rng.standard_normal((c, 1, 1)).astype(np.float32)}
    return nodes, consts


@pytest.mark.parametrize("groups", [1, 2, 8])
@pytest.mark.parametrize("affine", [True, False])
def test_exported_groupnorm_is_one_layer(groups: int, affine: bool) -> None:
    rng = np.random.default_rng()
    nodes, consts = _groupnorm(groups, affine, rng)
    m = _model(nodes, consts, ["y"], ["N", 8, 5, 6])
    x = (rng.standard_normal((3, 8, 5, 6)) * 3 + 1).astype(np.float32)
    steps = _check(m, x, dynamic=True, tol=1e-5)
    assert [s["op"] for s in steps] == ["GroupNormalization"] and steps[0]["tactic"] == "cpu.groupnorm"


def test_groupnorm_near_misses_are_left_alone() -> None:
    rng = np.random.default_rng()
    x = rng.standard_normal((2, 8, 5, 6)).astype(np.float32)
    nodes, consts = _groupnorm(2, True, rng)
    m = _model(nodes, consts, ["y", "i"], [2, 8, 5, 6])  # the instance norm's output is read outside the pattern
    assert "GroupNormalization" not in [s["op"] for s in _check(m, x, tol=1e-5)]
    nodes, consts = _groupnorm(2, False, rng)
    nodes[3] = helper.make_node("Reshape", ["i", "back"], ["y"])  # back to [N, C, 30], not x's shape
    m = _model(nodes, consts | {"back": np.array([0, 8, -1], np.int64)}, ["y"], [2, 8, 5, 6])
    assert "GroupNormalization" not in [s["op"] for s in _check(m, x, tol=1e-5)]


@pytest.mark.parametrize("case", ["group21", "group18", "instance3d", "instance_channels_last"])
def test_cpu_groupnorm_matches_onnxruntime(case: str) -> None:
    """cpu.groupnorm (aten's group_norm) on GroupNormalization of opset 21 (per-channel scale) and 18 (per-group),
    and InstanceNormalization on rank 3 and on a conv's channels-last output, against the oracle."""
    rng = np.random.default_rng()
    c, opset, shape = 12, 21, [2, 12, 7, 9]
    consts = {"s": rng.standard_normal(c).astype(np.float32), "b": rng.standard_normal(c).astype(np.float32)}
    if case.startswith("group"):
        opset = int(case[-2:])
        k = 3 if opset == 18 else c
        consts = {"s": rng.standard_normal(k).astype(np.float32), "b": rng.standard_normal(k).astype(np.float32)}
        nodes = [helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=3, epsilon=1e-5)]
    elif case == "instance3d":
        shape = [3, 12, 40]
        nodes = [helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"], epsilon=1e-5)]
    else:
        consts["w"] = (rng.standard_normal((c, c, 3, 3)) / 6).astype(np.float32)
        nodes = [helper.make_node("Conv", ["x", "w"], ["a"], pads=[1, 1, 1, 1]),
                 helper.make_node("InstanceNormalization", ["a", "s", "b"], ["y"], epsilon=1e-5)]
    m = _model(nodes, consts, ["y"], shape, opset=opset)
    steps = _check(m, (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32), tol=1e-5)
    assert steps[-1]["tactic"] == "cpu.groupnorm"


def test_groupnorm_keeps_a_dynamic_batch_in_its_type() -> None:
    """GroupNormalization's output type keeps a symbolic batch (its reference once forced the batch to an int, so
    type inference lost every dim): the pool after it keeps its fast tactic and the plan loads."""
    rng = np.random.default_rng()
    nodes, consts = _groupnorm(4, True, rng)
    nodes.append(helper.make_node("AveragePool", ["y"], ["p"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                  count_include_pad=0))
    m = _model(nodes, consts, ["p"], ["N", 8, 5, 6])
    steps = _check(m, rng.standard_normal((2, 8, 5, 6)).astype(np.float32), dynamic=True, tol=1e-5)
    assert [s["op"] for s in steps] == ["GroupNormalization", "AveragePool"] and steps[1]["tactic"] != "ref"
