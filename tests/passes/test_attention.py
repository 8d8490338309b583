"""Attention as exporters write it becomes one Attention layer, and computes what the decomposition does.

Models follow the three layouts real exports use (transformers' BERT/GPT-2: per-projection head splits
and a merged output; timm's ViT: one packed qkv projection split by Reshape/Transpose/Split/Squeeze; plain
4-D q/k/v inputs), with the scale on q and k, or on the scores, additive masks and the NaN guard. Each is
built for the CPU at optimization level 0 (tactics by priority: attention.sdpa), run at shapes of a
dynamic profile on fresh random inputs and compared with onnxruntime on the original model. Near misses
must stay unfused.
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

H, D = 4, 8
E = H * D


def _i64(*v: int) -> np.ndarray:
    return np.array(v, np.int64)


def _f(v: float) -> np.ndarray:
    return np.array(v, np.float32)


def _model(nodes: list, consts: dict[str, np.ndarray], inputs: list[tuple[str, list]], outs: list[str]) -> object:
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
                          [numpy_helper.from_array(v, k) for k, v in consts.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _build_run(model: object, feeds: dict[str, np.ndarray], shapes: dict[str, tuple]) -> tuple[list[dict], list]:
    p = OptimizationProfile()
    for name, (lo, opt, hi) in shapes.items():
        p.set_shape(name, lo, opt, hi)
    plan = Builder(Logger()).build(model, BuilderConfig(optimization_level=0, profiles=[p]))
    out = Engine(plan).create_execution_context().execute({k: torch.from_numpy(v) for k, v in feeds.items()})
    return plan.graph["steps"], [v.numpy() for v in out.values()]


def _check(model: object, feeds: dict[str, np.ndarray], shapes: dict[str, tuple], tol: float = 2e-5) -> list[dict]:
    steps, got = _build_run(model, feeds, shapes)
    want = run_oracle(model, feeds)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert np.isfinite(w).all()
        err = np.abs(g - w).max() / max(np.abs(w).max(), 1e-30)
        assert err <= tol, err
    return steps


def _proj(rng: np.random.Generator, name: str, src: str, width: int) -> tuple[list, dict[str, np.ndarray]]:
    w = (rng.standard_normal((E, width)) / math.sqrt(E)).astype(np.float32)
    b = rng.standard_normal(width).astype(np.float32)
    return ([helper.make_node("MatMul", [src, f"{name}_w"], [f"{name}_m"]),
             helper.make_node("Add", [f"{name}_m", f"{name}_b"], [name])], {f"{name}_w": w, f"{name}_b": b})


def _bert(rng: np.random.Generator, guard: bool = True, extra_reader: bool = False) -> object:
    """BERT's self-attention as the TorchScript exporter writes it (scale sqrt(1/sqrt(D)) on q and on k^T)."""
    nodes, consts = [], {"split": _i64(0, 0, H, D), "merge": _i64(0, 0, E), "flat": _i64(-1, E),
                         "c": _f(1 / math.sqrt(math.sqrt(D))), "zero": _f(0.0)}
    for p in ("q", "k", "v"):
        n, c = _proj(rng, p, "x", E)
        nodes += n + [helper.make_node("Reshape", [p, "split"], [f"{p}4"])]
        consts.update(c)
    nodes += [helper.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
              helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
              helper.make_node("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),
              helper.make_node("Mul", ["qh", "c"], ["qs"]), helper.make_node("Mul", ["kt", "c"], ["ks"]),
              helper.make_node("MatMul", ["qs", "ks"], ["s"]), helper.make_node("Add", ["s", "mask"], ["l"]),
              helper.make_node("Softmax", ["l"], ["p"], axis=-1)]
    if guard:
        nodes += [helper.make_node("IsNaN", ["p"], ["nan"]), helper.make_node("Where", ["nan", "zero", "p"], ["pg"])]
    nodes += [helper.make_node("MatMul", ["pg" if guard else "p", "vh"], ["o4"]),
              helper.make_node("Transpose", ["o4"], ["ot"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ot", "merge"], ["y"])]
    outs = ["y"]
    if extra_reader:
        nodes.append(helper.make_node("Reshape", ["ot", "flat"], ["y2"]))
        outs.append("y2")
    return _model(nodes, consts, [("x", ["b", "s", E]), ("mask", ["b", 1, 1, "s"])], outs)


def _mask(rng: np.random.Generator, b: int, s: int) -> np.ndarray:
    m = np.zeros((b, 1, 1, s), np.float32)
    for i in range(b):
        m[i, ..., rng.integers(1, s + 1):] = np.finfo(np.float32).min  # padding at the end of each row
    return m


BERT_SHAPES = {"x": ((1, 1, E), (2, 9, E), (4, 24, E)), "mask": ((1, 1, 1, 1), (2, 1, 1, 9), (4, 1, 1, 24))}


@pytest.mark.parametrize("b,s", [(2, 9), (3, 17), (1, 1)])
def test_bert_attention_becomes_one_layer_reading_the_projections(b: int, s: int) -> None:
    rng = np.random.default_rng(b * 100 + s)
    feeds = {"x": rng.standard_normal((b, s, E)).astype(np.float32), "mask": _mask(rng, b, s)}
    steps = _check(_bert(rng), feeds, BERT_SHAPES)
    ops = [st["op"] for st in steps]
    assert ops.count("Attention") == 1 and "Softmax" not in ops and "Transpose" not in ops, ops
    attn = next(st for st in steps if st["op"] == "Attention")
    assert attn["attrs"]["q_num_heads"] == H and attn["tactic"] == "attention.sdpa"
    assert attn["attrs"]["scale"] == pytest.approx(1 / math.sqrt(D), rel=1e-6)


def test_other_readers_of_the_merged_heads_read_the_fused_output() -> None:
    rng = np.random.default_rng(7)
    feeds = {"x": rng.standard_normal((2, 9, E)).astype(np.float32), "mask": _mask(rng, 2, 9)}
    steps = _check(_bert(rng, guard=False, extra_reader=True), feeds, BERT_SHAPES)
    assert [st["op"] for st in steps].count("Attention") == 1


def test_fully_masked_rows_give_zeros_like_the_guarded_export() -> None:
    rng = np.random.default_rng(8)
    mask = _mask(rng, 2, 9)
    mask[1] = -np.inf  # every key of the second sequence masked: softmax is NaN, the guard makes it 0
    feeds = {"x": rng.standard_normal((2, 9, E)).astype(np.float32), "mask": mask}
    model = _bert(rng)
    steps, got = _build_run(model, feeds, BERT_SHAPES)
    want = run_oracle(model, feeds)[0]
    assert [st["op"] for st in steps].count("Attention") == 1
    np.testing.assert_allclose(got[0], want, rtol=2e-5, atol=2e-5)
    assert not np.isnan(got[0]).any()


def test_vit_packed_qkv_becomes_one_layer_over_column_views() -> None:
    rng = np.random.default_rng(3)
    n, c = _proj(rng, "qkv", "x", 3 * E)
    nodes = n + [helper.make_node("Reshape", ["qkv", "split"], ["r"]),
                 helper.make_node("Transpose", ["r"], ["t"], perm=[2, 0, 3, 1, 4]),
                 helper.make_node("Split", ["t"], ["s0", "s1", "s2"], axis=0),
                 helper.make_node("Squeeze", ["s0", "ax0"], ["q"]), helper.make_node("Squeeze", ["s1", "ax0"], ["k"]),
                 helper.make_node("Squeeze", ["s2", "ax0"], ["v"]),
                 helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
                 helper.make_node("MatMul", ["q", "kt"], ["sc"]), helper.make_node("Div", ["sc", "d"], ["sd"]),
                 helper.make_node("Softmax", ["sd"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["o"]),
                 helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
                 helper.make_node("Reshape", ["ot", "merge"], ["y"])]
    consts = {**c, "split": _i64(0, 0, 3, H, D), "ax0": _i64(0), "d": _f(math.sqrt(D)), "merge": _i64(0, 0, E)}
    model = _model(nodes, consts, [("x", ["b", 11, E])], ["y"])
    feeds = {"x": rng.standard_normal((3, 11, E)).astype(np.float32)}
    steps = _check(model, feeds, {"x": ((1, 11, E), (2, 11, E), (4, 11, E))})
    ops = [st["op"] for st in steps]
    assert ops.count("Attention") == 1 and "Transpose" not in ops and "Split" not in ops, ops
    assert {st["tactic"] for st in steps if st["op"] == "Slice"} == {"view.slice"}


def test_paddle_packed_qkv_with_slices_and_an_int32_shape_round_trip() -> None:
    """Paddle2ONNX's SVTR attention (PP-OCR's recogniser): the qkv Reshape target computed as
    Concat([0], Cast(Slice(Cast(Shape(x), int32), 1, 2), int64), [3, H, D]), the parts taken by Slice [i, i + 1)
    on axis 0 and an opset-11 Squeeze with an axes attribute, the scale a Mul on q. The int32 cast is proven
    lossless from the profile's range of the sequence dim, so the heads are known and the attention fuses."""
    rng = np.random.default_rng(5)
    n, c = _proj(rng, "qkv", "x", 3 * E)
    nodes = n + [helper.make_node("Shape", ["x"], ["shp"]), helper.make_node("Cast", ["shp"], ["shp32"], to=6),
                 helper.make_node("Slice", ["shp32", "one", "two"], ["s32"]),
                 helper.make_node("Cast", ["s32"], ["s64"], to=7),
                 helper.make_node("Concat", ["zero", "s64", "hd"], ["split"], axis=0),
                 helper.make_node("Reshape", ["qkv", "split"], ["r"]),
                 helper.make_node("Transpose", ["r"], ["t"], perm=[2, 0, 3, 1, 4])]
    for i, name in enumerate("qkv"):
        nodes += [helper.make_node("Slice", ["t", f"st{i}", f"en{i}", "zero"], [f"p{i}"]),
                  helper.make_node("Squeeze", [f"p{i}"], [f"{name}0"], axes=[0])]
        c.update({f"st{i}": _i64(i), f"en{i}": _i64(i + 1)})
    nodes += [helper.make_node("Mul", ["q0", "scale"], ["qs"]),
              helper.make_node("Transpose", ["k0"], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["qs", "kt"], ["sc"]), helper.make_node("Softmax", ["sc"], ["p"], axis=3),
              helper.make_node("MatMul", ["p", "v0"], ["o"]),
              helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ot", "merge"], ["y"])]
    consts = {**c, "one": _i64(1), "two": _i64(2), "zero": _i64(0), "hd": _i64(3, H, D), "scale": _f(D ** -0.5),
              "merge": _i64(0, 0, E)}
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", E])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    feeds = {"x": rng.standard_normal((2, 13, E)).astype(np.float32)}
    steps = _check(model, feeds, {"x": ((1, 5, E), (2, 9, E), (4, 40, E))})
    ops = [st["op"] for st in steps]
    assert ops.count("Attention") == 1 and "Softmax" not in ops and "Transpose" not in ops, ops


def test_four_d_inputs_with_a_causal_mask_constant() -> None:
    rng = np.random.default_rng(4)
    s = 6
    causal = np.triu(np.full((s, s), -1e9, np.float32), 1)[None, None]
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["sc"]), helper.make_node("Mul", ["sc", "c"], ["ss"]),
             helper.make_node("Add", ["causal", "ss"], ["l"]),
             helper.make_node("Softmax", ["l"], ["p"], axis=3), helper.make_node("MatMul", ["p", "v"], ["y"])]
    model = _model(nodes, {"c": _f(0.3), "causal": causal},
                   [("q", ["b", H, s, D]), ("k", ["b", H, s, D]), ("v", ["b", H, s, 5])], ["y"])
    feeds = {n: rng.standard_normal((2, H, s, 5 if n == "v" else D)).astype(np.float32) for n in ("q", "k", "v")}
    shapes = {n: ((1, H, s, w), (2, H, s, w), (3, H, s, w)) for n, w in (("q", D), ("k", D), ("v", 5))}
    steps = _check(model, feeds, shapes)
    ops = [st["op"] for st in steps]
    assert ops == ["Attention"], ops  # K's transpose composed away: the layer reads k itself


def test_near_misses_stay_unfused() -> None:
    rng = np.random.default_rng(5)
    s = 5
    base = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", ["q", "kt"], ["sc"])]
    inputs = [("q", [1, H, s, D]), ("k", [1, H, s, D]), ("v", [1, H, s, D]), ("t", [1])]
    feeds = {n: rng.standard_normal((1, H, s, D)).astype(np.float32) for n in ("q", "k", "v")}
    feeds["t"] = np.array([0.7], np.float32)
    shapes = {n: ((1, H, s, D),) * 3 for n in ("q", "k", "v")} | {"t": ((1,),) * 3}
    # a scale that is an input, not a constant
    m1 = _model(base + [helper.make_node("Mul", ["sc", "t"], ["ss"]), helper.make_node("Softmax", ["ss"], ["p"]),
                        helper.make_node("MatMul", ["p", "v"], ["y"])], {}, inputs, ["y"])
    # the probabilities are a graph output too
    m2 = _model(base + [helper.make_node("Softmax", ["sc"], ["p"]), helper.make_node("MatMul", ["p", "v"], ["y"]),
                        helper.make_node("Mul", ["t", "t"], ["tt"])], {}, inputs, ["y", "p", "tt"])
    # softmax over another axis
    m3 = _model(base + [helper.make_node("Softmax", ["sc"], ["p"], axis=2), helper.make_node("MatMul", ["p", "v"], ["y"]),
                        helper.make_node("Mul", ["t", "t"], ["tt"])], {}, inputs, ["y", "tt"])
    for m in (m1, m2, m3):
        steps = _check(m, feeds, shapes)
        assert "Attention" not in [st["op"] for st in steps]


def test_fused_layers_are_typed_without_meta_execution(monkeypatch) -> None:
    """The fused layer's output type comes from a rule on symbolic dims, not from a meta run of the reference
    (which torch 2.11 could not do: every Shape after GPT-2's attentions then ran on the device and the
    model lost its CUDA graph). With meta inference failing for every op, the output is still typed."""
    from kiln.ops import registry
    from kiln.runtime.cuda_graph import capturable
    from kiln.runtime.prologue import shape_prologue
    rng = np.random.default_rng(11)
    real = registry.OpDef.infer

    def blind(self, node, types, consts):  # type: ignore[no-untyped-def]
        if node.op_type == "Attention":
            raise AssertionError("Attention was typed by meta execution")
        return real(self, node, types, consts)
    monkeypatch.setattr(registry.OpDef, "infer", blind)
    model = _bert(rng)
    p = OptimizationProfile()
    for name, (lo, opt, hi) in BERT_SHAPES.items():
        p.set_shape(name, lo, opt, hi)
    plan = Builder(Logger()).build(model, BuilderConfig(optimization_level=0, profiles=[p], fp16=True))
    eng = Engine(plan)
    g = eng.graph
    attn = next(n for n in g.nodes if n.op_type == "Attention")
    assert attn.outputs[0].type.shape == ("b", "s", E) and attn.outputs[0].type.dtype is not None
    assert capturable(g, shape_prologue(g, g.input_symbols()))[0]


def _shape_slice(src: str, start: int, end: int, out: str) -> list:
    return [helper.make_node("Shape", [src], [f"{out}_shape"]),
            helper.make_node("Slice", [f"{out}_shape", f"i{start}", f"i{end}"], [out])]


def test_dynamo_style_export_becomes_the_three_d_form() -> None:
    """torch's dynamo exporter: head splits by Reshape targets a shape chain computes with -1 for the heads
    (allowzero 1), and k.transpose(-2, -1) as Reshape [B*H, S, D] / Transpose [0, 2, 1] / Reshape back. The -1
    is derived from the symbols (H = E / D) and the 3-D transpose recognised: one Attention, no Transpose."""
    rng = np.random.default_rng(21)
    nodes, consts = [], {"i0": _i64(0), "i1": _i64(1), "i2": _i64(2), "i3": _i64(3), "i4": _i64(4),
                         "tail": _i64(-1, D), "m1": _i64(-1), "d": _i64(D), "c": _f(1 / math.sqrt(math.sqrt(D))),
                         "merge": _i64(0, 0, E)}
    nodes += _shape_slice("x", 0, 2, "bs") + [helper.make_node("Concat", ["bs", "tail"], ["split"], axis=0)]
    for p in ("q", "k", "v"):
        n, c = _proj(rng, p, "x", E)
        nodes += n + [helper.make_node("Reshape", [p, "split"], [f"{p}4r"], allowzero=1),
                      helper.make_node("Transpose", [f"{p}4r"], [f"{p}4"], perm=[0, 2, 1, 3])]
        consts.update(c)
    nodes += _shape_slice("k4", 2, 4, "sd") + _shape_slice("k4", 0, 2, "bh") + _shape_slice("k4", 2, 3, "sk")
    nodes += [helper.make_node("Concat", ["m1", "sd"], ["flat3"], axis=0),
              helper.make_node("Reshape", ["k4", "flat3"], ["k3"]),
              helper.make_node("Transpose", ["k3"], ["k3t"], perm=[0, 2, 1]),
              helper.make_node("Concat", ["bh", "d", "sk"], ["back"], axis=0),
              helper.make_node("Reshape", ["k3t", "back"], ["kt"]),
              helper.make_node("Mul", ["q4", "c"], ["qs"]), helper.make_node("Mul", ["kt", "c"], ["ks"]),
              helper.make_node("MatMul", ["qs", "ks"], ["s"]), helper.make_node("Add", ["s", "mask"], ["l"]),
              helper.make_node("Softmax", ["l"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v4"], ["o4"]),
              helper.make_node("Transpose", ["o4"], ["ot"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ot", "merge"], ["y"])]
    model = _model(nodes, consts, [("x", ["b", "s", E]), ("mask", ["b", 1, 1, "s"])], ["y"])
    feeds = {"x": rng.standard_normal((3, 10, E)).astype(np.float32), "mask": _mask(rng, 3, 10)}
    steps = _check(model, feeds, BERT_SHAPES)
    ops = [st["op"] for st in steps]
    assert ops.count("Attention") == 1 and "Transpose" not in ops, ops
    assert next(st for st in steps if st["op"] == "Attention")["attrs"]["q_num_heads"] == H


def _repeat_kv(src: str, out: str, rep: int, heads: int) -> list:
    """transformers' repeat_kv: x[:, :, None].expand(b, hkv, rep, s, d).reshape(b, hkv * rep, s, d)."""
    return [helper.make_node("Unsqueeze", [src, f"{out}_ax"], [f"{out}_u"]),
            helper.make_node("Expand", [f"{out}_u", f"{out}_to"], [f"{out}_e"]),
            helper.make_node("Reshape", [f"{out}_e", f"{out}_shape"], [out])]


def test_grouped_query_attention_reads_the_kv_heads_before_repeat_kv() -> None:
    """Llama's grouped-query attention: K and V heads repeated by repeat_kv before the scores. The fused layer
    takes the K/V heads as they are (Attention repeats them itself), so the two Expand copies disappear."""
    rng = np.random.default_rng(8)
    s, hkv, rep = 7, 2, 2
    nodes = _repeat_kv("k", "kr", rep, hkv) + _repeat_kv("v", "vr", rep, hkv) + [
        helper.make_node("Transpose", ["kr"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["sc"]), helper.make_node("Mul", ["sc", "c"], ["ss"]),
        helper.make_node("Softmax", ["ss"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "vr"], ["y"])]
    consts = {"c": _f(D ** -0.5)}
    for n in ("kr", "vr"):
        consts.update({f"{n}_ax": _i64(2), f"{n}_to": _i64(1, 1, rep, 1, 1), f"{n}_shape": _i64(0, hkv * rep, -1, D)})
    model = _model(nodes, consts, [("q", ["b", hkv * rep, s, D]), ("k", ["b", hkv, s, D]), ("v", ["b", hkv, s, D])],
                   ["y"])
    feeds = {"q": rng.standard_normal((2, hkv * rep, s, D)).astype(np.float32),
             "k": rng.standard_normal((2, hkv, s, D)).astype(np.float32),
             "v": rng.standard_normal((2, hkv, s, D)).astype(np.float32)}
    shapes = {n: ((1, h, s, D), (2, h, s, D), (3, h, s, D)) for n, h in (("q", hkv * rep), ("k", hkv), ("v", hkv))}
    steps = _check(model, feeds, shapes)
    assert [st["op"] for st in steps] == ["Attention"], [st["op"] for st in steps]
