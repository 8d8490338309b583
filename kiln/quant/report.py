"""What INT8 costs in accuracy, layer by layer: the integer graph against its float self on held-out data.

`compare` runs the optimized float graph and the quantized graph (both on the reference kernels, on the CPU)
over the same batches and reports, for every integer layer, the error of its output (dequantized) against the
float layer of the same name, and the error of the network's outputs. Errors accumulate through the network
(each graph runs on its own values), so `added` — a layer's error minus the largest error of the integer layers
feeding it — says where the loss appears. The builder prints the table (`--int8-report`) and uses it for
`--accuracy-budget`: while the outputs' error is over budget, the layer that adds the most goes back to float.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from kiln.ir.graph import Graph, Node, Value
from kiln.ops.qlayers import QuantSpec, quant_layer


@dataclass
class LayerError:
    """One integer layer's output against the float layer's: relative L2 error, cosine similarity, and the error
    it adds over the integer layers it reads."""

    name: str
    op: str
    rel: float
    cosine: float
    added: float


@dataclass
class Report:
    """Per-layer errors (worst added first) and the network outputs' relative error (max over outputs)."""

    layers: list[LayerError]
    output_rel: float
    batches: int

    def summary(self, budget: float | None, kept: list[str]) -> dict[str, dict[str, Any]]:
        """The plan's build entries (flat objects of scalars): `int8_report` (outputs' error, batches, budget, the
        layers kept float) and `int8_layer_error` (integer layer -> relative error of its output)."""
        head: dict[str, Any] = {"output_rel": self.output_rel, "batches": self.batches, "kept_float": ",".join(kept)}
        if budget is not None:
            head["budget"] = budget
        return {"int8_report": head, "int8_layer_error": {e.name: e.rel for e in self.layers}}

    def lines(self, top: int = 10) -> list[str]:
        out = [f"INT8 accuracy over {self.batches} held-out batch(es): outputs' relative error {self.output_rel:.3e}",
               f"  {'layer':40s} {'op':6s} {'rel. err':>9s} {'cosine':>8s} {'added':>9s}"]
        for e in self.layers[:top]:
            out.append(f"  {e.name[:40]:40s} {e.op:6s} {e.rel:9.3e} {e.cosine:8.5f} {e.added:9.3e}")
        return out


def clone_graph(g: Graph) -> Graph:
    """An independent copy (nodes, values, constants). Nodes are copied in graph order first, so that each copy
    finds its inputs' producers already copied: a plain deepcopy follows producer links from the last node back to
    the first, one recursion level per node, and overflows Python's stack on a deep graph (BERT-base: ~900)."""
    memo: dict[int, object] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the name counter's copy
        for sub in g.all_graphs():
            for n in sub.nodes:
                copy.deepcopy(n, memo)
        return copy.deepcopy(g, memo)


def _dequantized(n: Node, t: torch.Tensor) -> torch.Tensor:
    q = QuantSpec.of(n)
    if not q.quantized_out:
        return t.double()
    return (t.double() - q.y_zero_point) * q.y_scale


def _run(g: Graph, watch: list[Value], batches: Sequence[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Per batch: the graph outputs followed by the watched values."""
    from kiln.runtime.interpreter import GraphFunction
    saved = list(g.outputs)
    g.outputs = saved + [v for v in watch if all(v is not o for o in saved)]
    try:
        fn = GraphFunction(g, "cpu")
        with torch.inference_mode():
            res = [fn(b) for b in batches]
    finally:
        outs = list(g.outputs)
        g.outputs = saved
    index = {id(v): i for i, v in enumerate(outs)}
    return [[r[i] for i in range(len(saved))] + [r[index[id(v)]] for v in watch] for r in res]


def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    nb = float(b.norm())
    rel = float((a - b).norm()) / nb if nb > 0 else float((a - b).norm())
    na = float(a.norm())
    cos = float(a @ b) / (na * nb) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
    return rel, cos


class ReferenceRun:
    """The float graph's outputs and conv/gemm layer outputs on the held-out batches, computed once."""

    def __init__(self, reference: Graph, batches: Sequence[list[torch.Tensor]]) -> None:
        layers = [n for n in reference.nodes if n.domain == "kiln" and n.op_type in ("FusedConv", "FusedGemm")]
        res = _run(reference, [n.outputs[0] for n in layers], batches)
        n_out = len(reference.outputs)
        self.batches = batches
        self.outputs = [r[:n_out] for r in res]
        self.layers = {n.name: [r[n_out + i] for r in res] for i, n in enumerate(layers)}


def compare(ref: ReferenceRun, quantized: Graph) -> Report:
    """The report of the module doc, for the integer graph against the float graph's run."""
    batches = ref.batches
    layers = [n for n in quantized.nodes if quant_layer(n) and n.name in ref.layers]
    q_res = _run(quantized, [n.outputs[0] for n in layers], batches)
    f_res = [ref.outputs[b] + [ref.layers[n.name][b] for n in layers] for b in range(len(batches))]
    n_out = len(quantized.outputs)
    output_rel = 0.0
    sums: dict[str, list[float]] = {n.name: [0.0, 0.0] for n in layers}
    for qr, fr in zip(q_res, f_res):
        for a, b in zip(qr[:n_out], fr[:n_out]):
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                output_rel = max(output_rel, _rel(a, b)[0])
        for n, a, b in zip(layers, qr[n_out:], fr[n_out:]):
            r, c = _rel(_dequantized(n, a), b)
            sums[n.name][0] += r / len(batches)
            sums[n.name][1] += c / len(batches)
    producer_layer = {id(n.outputs[0]): n.name for n in layers}
    errors = []
    for n in layers:
        rel, cos = sums[n.name]
        feeding = [sums[producer_layer[id(_source(v))]][0] for v in n.inputs[:1] + n.inputs[3:4]
                   if v is not None and id(_source(v)) in producer_layer]
        errors.append(LayerError(n.name, n.op_type, rel, cos, rel - max(feeding, default=0.0)))
    errors.sort(key=lambda e: -e.added)
    return Report(errors, output_rel if math.isfinite(output_rel) else float("inf"), len(batches))


def _source(v: Value) -> Value:
    """The value an integer layer's input comes from, through int8 data movement (max pools, reshapes)."""
    seen = 0
    while v.producer is not None and not quant_layer(v.producer) and v.producer.inputs and seen < 64:
        if v.producer.inputs[0] is None:
            break
        v = v.producer.inputs[0]
        seen += 1
    return v


def as_batches(g: Graph, data: Sequence[Mapping[str, Any]]) -> list[list[torch.Tensor]]:
    """Input dicts as lists of the graph's input tensors."""
    from kiln.quant.calibrate import input_batch
    return [input_batch(g, feed, i) for i, feed in enumerate(data)]
