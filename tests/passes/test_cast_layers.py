"""Cast layers a float16 transformer on CUDA no longer launches (BERT-base had two):

* an integer -> bool / float32 Cast moves below the data-movement ops it feeds and joins the elementwise program
  after them (kiln.passes.cast.SinkIntCasts): BERT's attention mask, cast to bool, flattened, gathered and
  reshaped before its And / Where;
* the Cast widening the last norm's float16 Y to the float32 graph output folds into the norm (out_dtype), the
  other readers of Y (a row Gather -> the pooler's FusedGemm) reading the float32 Y (kiln.passes.cast.FoldCasts).

The rewritten graphs run on the CPU through the ops' references against onnxruntime on the original model, on
fresh random inputs; the generated Triton kernel (under the interpreter without a GPU) against the Pointwise
reference."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from kiln.frontend.onnx import load_onnx
from kiln.logger import Logger
from kiln.passes.base import PassContext, PassManager
from kiln.passes.pipeline import default_pipeline
from kiln.runtime.interpreter import GraphFunction
from kiln.testing import run_oracle

S = 7


def _mask_model(to: int = TensorProto.BOOL):
    """mask [B, S] int64 -> Cast -> Flatten -> Gather(run-time indices) -> Reshape [B, 1, 1, S] -> And / Where."""
    inits = [numpy_helper.from_array(np.array([-1], np.int64), "flat"),
             numpy_helper.from_array(np.array([-1, 1, 1, S], np.int64), "shape4"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(-1e4, np.float32), "neg")]
    nodes = [helper.make_node("Cast", ["mask"], ["mb"], to=to),
             helper.make_node("Flatten", ["mb"], ["mf"], axis=0),
             helper.make_node("Gather", ["mf", "idx"], ["mg"], axis=1),
             helper.make_node("Reshape", ["mg", "shape4"], ["m4"])]
    if to == TensorProto.BOOL:
        nodes += [helper.make_node("And", ["m4", "keep"], ["ok"]),
                  helper.make_node("Where", ["ok", "zero", "neg"], ["bias"])]
    else:
        nodes += [helper.make_node("Sub", ["m4", "zero"], ["d"]), helper.make_node("Mul", ["d", "neg"], ["bias"])]
    ins = [helper.make_tensor_value_info("mask", TensorProto.INT64, ["b", S]),
           helper.make_tensor_value_info("idx", TensorProto.INT64, [1, "n"]),
           helper.make_tensor_value_info("keep", TensorProto.BOOL, [1, 1, 1, S])]
    g = helper.make_graph(nodes, "mask", ins, [helper.make_tensor_value_info("bias", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(seed: int, b: int = 3):
    rng = np.random.default_rng(seed)
    return {"mask": rng.integers(-2, 3, size=(b, S)).astype(np.int64),
            "idx": rng.permutation(b * S)[None, :].astype(np.int64),
            "keep": rng.random((1, 1, 1, S)) > 0.3}


@pytest.mark.parametrize("to", [TensorProto.BOOL, TensorProto.FLOAT])
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_int_cast_sinks_into_the_program(to: int, device: str) -> None:
    model = _mask_model(to)
    g = load_onnx(model, Logger())
    PassManager(default_pipeline(), subgraphs=True).run(g, PassContext(Logger(), device=device))
    ops = [n.op_type for n in g.nodes]
    if device == "cuda":
        assert "Cast" not in ops, ops
        (pw,) = [n for n in g.nodes if n.op_type == "Pointwise"]
        assert pw.inputs[0].type.dtype.value == "int64" and pw.attr("program")[0]["op"] == "Cast"
        gather = next(n for n in g.nodes if n.op_type == "Gather")
        assert gather.outputs[0].type.dtype.value == "int64"
    else:
        assert "Cast" in ops  # the CPU tactics take float / bool programs: left as it was
    for seed in (1, 2):
        feeds = _feeds(seed)
        got = GraphFunction(g)([torch.from_numpy(v) for v in feeds.values()])
        np.testing.assert_array_equal(np.asarray(got[0]), run_oracle(model, feeds)[0])


@pytest.mark.parametrize("to", [TensorProto.BOOL, TensorProto.FLOAT])
def test_triton_program_reads_integers_through_its_casts(to: int) -> None:
    pytest.importorskip("triton", reason="triton is not installed: the Triton pointwise kernel is untested")
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from kiln.backends.tactic import TacticContext, get_tactic
    from kiln.ops.registry import lookup
    model = _mask_model(to)
    g = load_onnx(model, Logger())
    PassManager(default_pipeline(), subgraphs=True).run(g, PassContext(Logger(), device="cuda"))
    (pw,) = [n for n in g.nodes if n.op_type == "Pointwise"]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t = get_tactic("cuda.triton_pointwise")
    assert t.supports(pw, TacticContext(dev, fp16=True))
    rng = np.random.default_rng(3)
    args = []
    for v in pw.inputs:
        if v.const is not None:
            args.append(v.const.to(dev))
        elif v.type.dtype.value == "int64":
            m = torch.from_numpy(rng.integers(-3, 4, size=(2, 1, 1, S)).astype(np.int64))
            m[0, 0, 0, 0] = 2**40  # far beyond float32's integers: still nonzero
            args.append(m.to(dev))
        else:
            args.append(torch.from_numpy(rng.random((1, 1, 1, S)) > 0.3).to(dev))
    want = lookup("Pointwise", "kiln").compute(pw, *[a.cpu() for a in args])
    got = t.make(pw, t.configs(pw, TacticContext(dev, fp16=True))[0], dev)(*args)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)
    lone = pw.inputs[0]
    prog = [dict(i) for i in pw.attr("program")]
    prog.append({"op": "Add", "args": ["i0", "t0"], "attrs": {}})  # the integer read as a number: declined
    from kiln.ir.graph import Node
    bad = Node("Pointwise", list(pw.inputs), [pw.outputs[0]], {**pw.attrs, "program": prog,
               "outputs": [f"t{len(prog) - 1}"]}, name="bad", domain="kiln", opset=1)
    assert lone.type.dtype.value == "int64" and not t.supports(bad, TacticContext(dev, fp16=True))


def _bert_tail(pooler: bool = True):
    """BERT's end: LayerNorm(x + x @ W + b) is the float32 output and, through a row Gather, the pooler's input
    (GPT-2's: the output only)."""
    rng = np.random.default_rng(4)
    h = 16
    inits = [numpy_helper.from_array((rng.standard_normal((h, h)) / 4).astype(np.float32), "w"),
             numpy_helper.from_array((0.1 * rng.standard_normal(h)).astype(np.float32), "b"),
             numpy_helper.from_array((1 + 0.1 * rng.standard_normal(h)).astype(np.float32), "g"),
             numpy_helper.from_array((0.1 * rng.standard_normal(h)).astype(np.float32), "beta"),
             numpy_helper.from_array((rng.standard_normal((h, h)) / 4).astype(np.float32), "wp"),
             numpy_helper.from_array((0.1 * rng.standard_normal(h)).astype(np.float32), "bp"),
             numpy_helper.from_array(np.array(0, np.int64), "row")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["mb"]),
             helper.make_node("Add", ["mb", "x"], ["s"]),
             helper.make_node("LayerNormalization", ["s", "g", "beta"], ["y"], epsilon=1e-5),
             helper.make_node("Gather", ["y", "row"], ["first"], axis=1),
             helper.make_node("Gemm", ["first", "wp", "bp"], ["p"]), helper.make_node("Tanh", ["p"], ["pooled"])]
    outs = ("y", "pooled") if pooler else ("y",)
    if not pooler:
        nodes = nodes[:4]
    g = helper.make_graph(nodes, "tail", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 5, h])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("pooler", [True, False])
def test_last_norm_stores_the_float32_output_its_pooler_reads_too(pooler: bool) -> None:
    """FP16 on CUDA: the Cast of the last norm's Y back to the float32 graph output folds into the norm
    (out_dtype), and the row Gather -> FusedGemm that read the float16 Y read the float32 one (converted on
    load): no Cast is left after the norm. Against onnxruntime FP32 within FP16 rounding."""
    from kiln.builder import BuilderConfig, _lower_precision
    from kiln.ir.dtype import DType
    model = _bert_tail(pooler)
    g = load_onnx(model, Logger())
    ctx = PassContext(Logger(), device="cuda")
    PassManager(default_pipeline(), subgraphs=True).run(g, ctx)
    _lower_precision(g, DType.FLOAT16, BuilderConfig(fp16=True), "cuda", ctx)
    casts = [n for n in g.nodes if n.op_type == "Cast"]
    assert [c.inputs[0].name for c in casts] == ["x"], casts  # only the input's (it is also the norm's residual)
    norm = next(n for n in g.nodes if n.op_type == "AddLayerNormalization")
    assert norm.attr("out_dtype") == TensorProto.FLOAT and norm.outputs[0].type.dtype.value == "float32"
    if pooler:
        gather = next(n for n in g.nodes if n.op_type == "Gather")
        assert gather.inputs[0] is norm.outputs[0] and gather.outputs[0].type.dtype.value == "float32"
    for seed in (5, 6):
        x = np.random.default_rng(seed).standard_normal((3, 5, 16)).astype(np.float32)
        got = GraphFunction(g)([torch.from_numpy(x)])
        for a, b in zip(got, run_oracle(model, {"x": x})):
            a = np.asarray(a.float() if isinstance(a, torch.Tensor) else a)
            assert a.dtype == np.float32
            np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2)
