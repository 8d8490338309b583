"""INT8: Q/DQ models and calibrated ranges become integer layers (QConv, QGemm: kiln.ops.qlayers).

Both roads meet in one representation, QuantizeLinear / DequantizeLinear around float layers:

* explicit: a Q/DQ model (onnxruntime's quantize_static, PyTorch's exporters, Model Optimizer) brings them.
  `FoldWeightDequantize` (first in the pipeline) folds each weight's DequantizeLinear into a float constant
  that remembers its scales (Value.quant), so the float passes (conv and gemm fusion) run as on any model;
* implicit: `InsertQuantization` (the builder, after calibration or with explicit dynamic ranges) puts a
  symmetric int8 Q/DQ pair of each calibrated range in front of every conv/gemm layer's input and residual and
  behind outputs that only such layers read.

`FuseQuantizedLayers` then turns DequantizeLinear -> FusedConv/FusedGemm (bias, activation, residual) ->
QuantizeLinear into one integer layer with int8 weights (the remembered scales, else per output channel), where
the target has an integer kernel for it (else the layer stays float between its Q/DQ nodes, as in TensorRT).
`PropagateQuantization` moves a DequantizeLinear below the ops that commute with it (max pooling, reshapes,
transposes, slices, nearest resizing: they then move int8 data) and removes each DequantizeLinear ->
QuantizeLinear pair of equal parameters, so int8 activations flow from one integer layer to the next.

FP8 (float8_e4m3fn Q/DQ, zero points 0) takes the same road: weights fold with their scales, a float8 DQ ->
FusedConv/FusedGemm (-> float8 Q) becomes a QConv/QGemm on float8 elements where the target has an FP8 kernel,
and equal float8 DQ -> Q pairs cancel; float8 data is not moved across other ops.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kiln.backends.cpu.features import exact_int8_layer, int8_activation_zero_point, int8_weight_max
from kiln.backends.fp8 import gemm_shaped
from kiln.backends.tactic import TacticContext, candidate_tactics
from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, Value
from kiln.ir.types import QuantParams, TensorType
from kiln.errors import UnsupportedOpError
from kiln.ops.qlayers import FLOAT, FLOAT8E4M3FN, FP8, FP8_MAX, INT8, UINT8, QuantSpec
from kiln.ops.registry import lookup
from kiln.passes.base import Pass, PassContext
from kiln.passes.rewrite import Uses, const, is_op, remove_node, replace_nodes, restore_order

Tensor = torch.Tensor

_CODE = {torch.int8: INT8, torch.uint8: UINT8, FP8: FLOAT8E4M3FN}
COMMUTING_OPS = frozenset({"MaxPool", "GlobalMaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose",
                           "Identity", "Slice", "Resize", "DepthToSpace", "SpaceToDepth"})
"""Ops whose result on dequantized data equals the dequantization of their result on the integers (per-tensor
parameters): they only select, move or take the maximum of elements (Resize only in nearest mode)."""


def moves_8bit_data(n: Node) -> bool:
    """n only moves its first input's values (a COMMUTING_OPS op with one output, its data a run-time tensor, its
    other inputs constant; Resize only in nearest mode): it commutes with a per-tensor Q/DQ pair."""
    return (is_op(n, *COMMUTING_OPS) and len(n.outputs) == 1 and bool(n.inputs) and n.inputs[0] is not None
            and not n.inputs[0].is_const and all(x is None or x.is_const for x in n.inputs[1:])
            and (n.op_type != "Resize" or (n.attr("mode", "nearest") or "nearest") == "nearest"))


@dataclass(frozen=True)
class QParams:
    """The per-tensor parameters of a QuantizeLinear / DequantizeLinear of 8-bit integers."""

    scale: float
    zero_point: int
    dtype: torch.dtype


def qparams(n: Node | None, float8: bool = False) -> QParams | None:
    """n's constant per-tensor scale, zero point and integer type; None for anything else (per-axis, blocked,
    a runtime scale, a non-positive scale; float8 unless `float8`, and then float8_e4m3fn with zero point 0)."""
    if not is_op(n, "QuantizeLinear", "DequantizeLinear") or int(n.attr("block_size", 0) or 0):  # type: ignore[union-attr]
        return None
    s, z = const(n.input(1)), const(n.input(2))  # type: ignore[union-attr]
    if s is None or s.numel() != 1 or (n.input(2) is not None and (z is None or z.numel() != 1)):  # type: ignore[union-attr]
        return None
    scale = float(s.reshape(()).item())
    if not (math.isfinite(scale) and scale > 0):
        return None
    if n.op_type == "DequantizeLinear":  # type: ignore[union-attr]
        dtype = n.inputs[0].type.dtype  # type: ignore[union-attr]
        dtype = None if dtype is None else dtype.torch
    elif z is not None:
        dtype = z.dtype
    else:
        code = int(n.attr("output_dtype", 0) or 0)  # type: ignore[union-attr]
        dtype = {0: torch.uint8, 2: torch.uint8, 3: torch.int8}.get(code)
    if float8 and dtype == FP8:
        if z is not None and (z.dtype != FP8 or float(z.float().reshape(())) != 0.0):
            return None
        return QParams(scale, 0, FP8)
    if dtype not in (torch.int8, torch.uint8) or (z is not None and z.dtype != dtype):
        return None
    return QParams(scale, 0 if z is None else int(z.reshape(()).item()), dtype)


class FoldWeightDequantize(Pass):
    """DequantizeLinear of an int8 or float8_e4m3fn constant (zero point 0: a quantized weight) -> a float
    constant whose Value.quant keeps the scales, so that the integer or FP8 layer gets the model's own weights
    back. A float8 weight with a non-zero zero point is refused (one line): FP8 layers take zero points 0."""

    name = "weight dequantize folding"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        changed = False
        outputs = {id(v) for v in g.outputs}
        for n in list(g.nodes):
            if not is_op(n, "DequantizeLinear") or id(n.outputs[0]) in outputs:
                continue
            x, s, z = const(n.input(0)), const(n.input(1)), const(n.input(2))
            if x is None or s is None or x.dtype not in (torch.int8, FP8) or (n.input(2) is not None and z is None):
                continue
            if x.dtype == FP8 and z is not None and bool((z.float() != 0).any()):
                raise UnsupportedOpError(f"node '{n.name}': the float8 weight '{n.inputs[0].name}' has a non-zero "
                                         f"zero point: FP8 weights need zero point 0")
            if (z is not None and bool((z.float() != 0).any())) or int(n.attr("block_size", 0) or 0) or s.dim() > 1:
                continue
            w = lookup("DequantizeLinear", "").compute(n, x, s, z)
            v = g.constant(n.outputs[0].name + "_folded", w.contiguous())
            axis = int(n.attr("axis", 1)) % max(x.dim(), 1) if s.numel() > 1 else None
            v.quant = QuantParams(tuple(float(e) for e in s.reshape(-1).tolist()), 0, axis,
                                  DType.from_torch(x.dtype))
            g.replace_uses(n.outputs[0], v)
            remove_node(g, n)
            changed = True
        return changed


def quantize_weight(v: Value, channels: int, qmax: int = 127) -> tuple[Tensor, list[float]]:
    """int8 weights [channels, ...] (symmetric, zero point 0) and their scales (one, or one per output channel).

    A constant folded from the model's own DequantizeLinear (Value.quant, per tensor or along axis 0) keeps its
    scales. Otherwise a weight lying exactly on one per-tensor grid amax/127 (a per-tensor quantized weight the
    float passes moved, e.g. transposed) keeps that grid; any other gets per-channel scales amax_k / qmax (the
    target's `int8_weight_max`)."""
    w = v.const.float()  # type: ignore[union-attr]
    scales = _remembered(v, channels, DType.INT8)
    if scales is not None:
        s = torch.tensor(scales, dtype=torch.float32).reshape(-1, *([1] * (w.dim() - 1)))
        return torch.round(w / s).clamp(-127, 127).to(torch.int8), scales
    amax_t = float(w.abs().max()) if w.numel() else 0.0
    if amax_t > 0:
        s_t = amax_t / 127.0
        if float((torch.round(w / s_t) * s_t - w).abs().max()) <= 1e-6 * amax_t:
            return torch.round(w / s_t).clamp(-127, 127).to(torch.int8), [s_t]
    amax = w.reshape(channels, -1).abs().amax(dim=1).double()
    scales_t = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    wq = torch.round(w.double() / scales_t.reshape(-1, *([1] * (w.dim() - 1)))).clamp(-qmax, qmax)
    return wq.to(torch.int8), [float(s) for s in scales_t]


def quantize_weight_fp8(v: Value, channels: int) -> tuple[Tensor, list[float]]:
    """float8_e4m3fn weights [channels, ...] and their scales: a weight folded from the model's own float8
    DequantizeLinear gets its float8 values back (w / s is exact: w was float8 * s in float32); any other gets
    per-channel scales amax_k / 448."""
    w = v.const.float()  # type: ignore[union-attr]
    scales = _remembered(v, channels, DType.FLOAT8E4M3FN)
    if scales is None:
        amax = w.reshape(channels, -1).abs().amax(dim=1).double()
        scales = [float(s) for s in torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))]
    s = torch.tensor(scales, dtype=torch.float32).reshape(-1, *([1] * (w.dim() - 1)))
    return (w / s).clamp(-FP8_MAX, FP8_MAX).to(FP8), scales


def _remembered(v: Value, channels: int, dtype: DType) -> list[float] | None:
    """The scales FoldWeightDequantize kept for v (per tensor or along axis 0) when it was quantized to `dtype`."""
    q = v.quant
    if q is None or q.axis not in (None, 0) or (q.dtype != dtype and not (q.dtype is None and dtype == DType.INT8)):
        return None
    scales = list(q.scale) if isinstance(q.scale, tuple) else [float(q.scale)]
    return scales if len(scales) in (1, channels) else None


def _layer_kind(n: Node) -> str | None:
    """'QConv' / 'QGemm' for the float layers an integer layer can replace (2-D convs, gemms), else None."""
    if n.domain != "kiln" or n.attr("out_dtype") is not None:
        return None
    w = const(n.input(1))
    if w is None or w.dtype != torch.float32 or (n.input(2) is not None and const(n.input(2)) is None):
        return None
    if n.op_type == "FusedConv" and w.dim() == 4:
        return "QConv"
    if n.op_type == "FusedGemm" and w.dim() == 2:
        return "QGemm"
    return None


def has_integer_kernel(node: Node, device: str) -> bool:
    """Whether a tactic other than the reference runs this integer layer on the target."""
    ctx = TacticContext(torch.device(device))
    return any(t.id != "ref" for t in candidate_tactics(node, ctx))


class FuseQuantizedLayers(Pass):
    """DequantizeLinear -> FusedConv/FusedGemm (-> QuantizeLinear) -> QConv/QGemm (see the module doc)."""

    name = "integer layer fusion"

    def __init__(self, exclude: set[str] | frozenset[str] = frozenset()) -> None:
        self.exclude = set(exclude)  # layers a precision constraint keeps float
        self.declined: list[str] = []  # CPU layers between Q/DQ nodes oneDNN would not compute exactly here

    def run(self, g: Graph, ctx: PassContext) -> bool:
        changed = False
        uses = Uses(g)
        for n in list(g.nodes):
            kind = _layer_kind(n)
            if kind is not None and n.name not in self.exclude and self._fuse(g, n, kind, uses, ctx):
                changed = True
                uses.refresh()
        return changed

    def _fuse(self, g: Graph, n: Node, kind: str, uses: Uses, ctx: PassContext) -> bool:
        dq = n.inputs[0].producer
        xp = qparams(dq, float8=True)
        if xp is None or not is_op(dq, "DequantizeLinear"):
            return False
        fp8 = xp.dtype == FP8  # an FP8 layer: float8 weights, float8 or float residual
        wv = n.inputs[1]
        channels = int(wv.const.shape[0])  # type: ignore[union-attr]
        wq, w_scales = quantize_weight_fp8(wv, channels) if fp8 else \
            quantize_weight(wv, channels, int8_weight_max(ctx.device))
        b = const(n.input(2))
        attrs = {k: v for k, v in n.attrs.items() if k != "out_dtype"}
        attrs.update(x_scale=xp.scale, x_zero_point=xp.zero_point, w_scales=w_scales)
        z = n.input(3)
        if z is not None:
            zp = qparams(z.producer, float8=fp8) if is_op(z.producer, "DequantizeLinear") else None
            if zp is not None and (zp.dtype == FP8) == fp8:
                attrs.update(z_scale=zp.scale, z_zero_point=zp.zero_point)
                z = z.producer.inputs[0]  # type: ignore[union-attr]
            elif z.type.dtype != DType.FLOAT32:
                return False
        y = n.outputs[0]
        q = uses.only(y)
        qp = qparams(q, float8=fp8) if is_op(q, "QuantizeLinear") else None
        if qp is not None:
            out = q.outputs[0]  # type: ignore[union-attr]
            attrs.update(y_scale=qp.scale, y_zero_point=qp.zero_point, out_dtype=_CODE[qp.dtype])
        else:
            out = y
            attrs["out_dtype"] = FLOAT
        inputs = [dq.inputs[0], g.constant(wv.name + ("_fp8" if fp8 else "_int8"), wq),  # type: ignore[union-attr]
                  None if b is None else g.constant(n.input(2).name + "_f32", b.float().contiguous()), z]  # type: ignore[union-attr]
        while inputs[-1] is None:
            inputs.pop()
        probe = Node(kind, inputs, [Value("probe", out.type)], attrs, name=n.name, domain="kiln", opset=1)
        what = "FP8" if fp8 else "integer"
        if not has_integer_kernel(probe, ctx.device):
            ctx.logger.verbose(f"Keeping {n.name} in float between its Q/DQ nodes: no {what} kernel on "
                               f"{ctx.device} for it")
            if not fp8 and ctx.device == "cpu" and not exact_int8_layer(dq.inputs[0].type.dtype, wq):  # type: ignore[union-attr]
                self.declined.append(n.name)
            return False
        fused = Node(kind, inputs, [out], attrs, name=n.name, domain="kiln", opset=1)
        replace_nodes(g, [n] + ([q] if qp is not None else []), [fused])  # type: ignore[list-item]
        per = "per-channel" if len(w_scales) > 1 else "per-tensor"
        ctx.logger.verbose(f"Fusing {dq.name} -> {n.name}" + (f" -> {q.name}" if qp is not None else "")  # type: ignore[union-attr]
                           + f" into {what} layer {kind} {n.name} ({str(xp.dtype).replace('torch.', '')} in, "
                           f"{out.type.dtype.value if out.type.dtype else '?'} out, {per} "
                           f"{'float8' if fp8 else 'int8'} weights"
                           + (", quantized residual" if "z_scale" in attrs else "") + ")")
        return True


class FuseQuantizedResidual(Pass):
    """Integer layer -> Q -> DQ -> Add(+ DQ(residual)) (-> Relu) -> Q -> one integer layer with an int8 residual.

    The model's Q/DQ pair between the layer and the Add is kept inside the layer (`a_scale`: its result is
    requantized there before the residual is added), so the fused layer computes what the Q/DQ graph says. Of an
    Add of two integer layers' outputs, the later layer takes the Add (the earlier one's output is its residual).
    Only where the target's integer kernel takes the result (else the Add stays a float layer between Q/DQ)."""

    name = "integer residual fusion"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        changed = False
        uses = Uses(g)
        for add in [n for n in g.nodes if is_op(n, "Add")]:
            if add in g.nodes and self._fuse(g, add, uses, ctx):
                changed = True
                uses.refresh()
        return changed

    @staticmethod
    def _branch(v: Value | None, uses: Uses) -> tuple[Node, Node] | None:
        """(DQ, integer layer) when v = DQ(layer's int8 output), read only by that path, the layer without Z."""
        dq = v.producer if v is not None else None
        if not is_op(dq, "DequantizeLinear") or qparams(dq) is None or uses.only(v) is None:  # type: ignore[arg-type]
            return None
        layer = dq.inputs[0].producer  # type: ignore[union-attr]
        if layer is None or layer.domain != "kiln" or layer.op_type not in ("QConv", "QGemm") or \
                layer.input(3) is not None or uses.only(dq.inputs[0]) is not dq:  # type: ignore[union-attr]
            return None
        q = QuantSpec.of(layer)
        p = qparams(dq)
        if not q.quantized_out or q.a_scale > 0 or p is None or (p.scale, p.zero_point) != (q.y_scale, q.y_zero_point):
            return None
        return dq, layer  # type: ignore[return-value]

    def _fuse(self, g: Graph, add: Node, uses: Uses, ctx: PassContext) -> bool:
        a, b = add.inputs[0], add.inputs[1] if len(add.inputs) > 1 else None
        if a is None or b is None or a.type.shape is None or a.type.shape != b.type.shape:
            return False
        cands = [(self._branch(x, uses), other) for x, other in ((a, b), (b, a))]
        cands = [(c, other) for c, other in cands if c is not None]
        cands.sort(key=lambda co: -uses.pos(co[0][1]))  # the later layer absorbs the Add
        for (dq_a, layer), other in cands:
            zdq = other.producer
            zp = qparams(zdq) if is_op(zdq, "DequantizeLinear") else None
            if zp is None:
                continue
            nxt, act = uses.only(add.outputs[0]), None
            if is_op(nxt, "Relu"):
                act, nxt = nxt, uses.only(nxt.outputs[0])  # type: ignore[union-attr]
            q_out = qparams(nxt) if is_op(nxt, "QuantizeLinear") else None
            if q_out is None:
                continue
            attrs = dict(layer.attrs)
            if act is not None:
                if attrs.get("activation"):
                    continue  # an activation on both sides of the add: not one epilogue
                attrs.update(activation="Relu", act_before_add=0)
            elif attrs.get("activation"):
                attrs["act_before_add"] = 1
            attrs.update(a_scale=attrs["y_scale"], a_zero_point=attrs.get("y_zero_point", 0),
                         a_dtype=attrs.get("out_dtype", INT8), z_scale=zp.scale, z_zero_point=zp.zero_point,
                         y_scale=q_out.scale, y_zero_point=q_out.zero_point, out_dtype=_CODE[q_out.dtype])
            inputs = list(layer.inputs) + [None] * (3 - len(layer.inputs)) + [zdq.inputs[0]]  # type: ignore[union-attr]
            out = nxt.outputs[0]  # type: ignore[union-attr]
            probe = Node(layer.op_type, inputs, [Value("probe", out.type)], attrs, name=layer.name, domain="kiln",
                         opset=1)
            if not has_integer_kernel(probe, ctx.device):
                continue
            fused = Node(layer.op_type, inputs, [out], attrs, name=layer.name, domain="kiln", opset=1)
            old = [layer, dq_a, add, nxt] + ([act] if act is not None else [])
            replace_nodes(g, old, [fused])  # type: ignore[list-item]
            ctx.logger.verbose(f"Fusing {add.name}" + (f" + {act.name}" if act is not None else "") +
                               f" into integer layer {layer.name}: int8 residual from {zdq.name}, the Q/DQ pair "  # type: ignore[union-attr]
                               f"between them kept inside")
            return True
        return False


class PropagateQuantization(Pass):
    """DequantizeLinear moved below commuting ops; DequantizeLinear -> QuantizeLinear pairs of equal parameters
    removed (see the module doc)."""

    name = "Q/DQ propagation"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        changed = False
        uses = Uses(g)
        for n in list(g.nodes):
            if is_op(n, "QuantizeLinear"):
                changed |= self._cancel(g, n, uses, ctx)
            elif is_op(n, *COMMUTING_OPS):
                if self._commute(g, n, uses, ctx):
                    changed = True
                    uses.refresh()
        if changed:
            restore_order(g)
        return changed

    @staticmethod
    def _cancel(g: Graph, q: Node, uses: Uses, ctx: PassContext) -> bool:
        dq = q.inputs[0].producer
        if not is_op(dq, "DequantizeLinear") or uses.is_output(q.outputs[0]):
            return False
        a, b = qparams(dq, float8=True), qparams(q, float8=True)
        if a is None or a != b:
            return False
        g.replace_uses(q.outputs[0], dq.inputs[0])  # type: ignore[union-attr]
        remove_node(g, q)
        ctx.logger.verbose(f"Removing {dq.name} -> {q.name}: equal quantization, the int8 values flow on")  # type: ignore[union-attr]
        return True

    @staticmethod
    def _commute(g: Graph, op: Node, uses: Uses, ctx: PassContext) -> bool:
        dq = op.inputs[0].producer if op.inputs and op.inputs[0] is not None else None
        p = qparams(dq) if is_op(dq, "DequantizeLinear") else None
        if p is None or not moves_8bit_data(op):
            return False
        out = op.outputs[0]
        shape = out.type.shape
        vi = Value(g.unique_name(out.name + "_int8"), TensorType(DType.from_torch(p.dtype), shape))
        op.inputs[0] = dq.inputs[0]  # type: ignore[union-attr]
        op.outputs = [vi]
        vi.producer = op
        new_dq = Node("DequantizeLinear", [vi, dq.inputs[1], *dq.inputs[2:3]], [out], {},  # type: ignore[union-attr]
                      name=g.unique_name(dq.name + "_after_" + op.name), opset=max(dq.opset, 13))  # type: ignore[union-attr]
        g.nodes.insert(g.nodes.index(op) + 1, new_dq)
        ctx.logger.verbose(f"Moving {dq.name} below {op.name} ({op.op_type} commutes with it: int8 data moves)")  # type: ignore[union-attr]
        return True


class FloatQuantizeDequantize(Pass):
    """A QuantizeLinear whose 8-bit result only DequantizeLinear nodes of its own parameters read, directly or
    through one op that commutes with them (a max pool, a flatten: the layers around stayed float, with no exact
    integer kernel on the target or by a precision constraint) -> the elementwise ops computing the pair in float32,
    (clip(round(x / s) + zp, lo, hi) - zp) * s, the same float32 operations in the same order (bit-equal), and the
    commuting op on their float result; kiln.passes.pointwise then makes them one pass with the elementwise ops
    around, instead of two passes with an 8-bit tensor between. CPU only: the CUDA Pointwise kernels divide with
    Triton's fast division, which can round x / s differently from the Q/DQ kernels' IEEE one."""

    name = "float Q/DQ pairs"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        if ctx.device != "cpu":
            return False
        uses = Uses(g)
        done = 0
        for q in [n for n in g.nodes if is_op(n, "QuantizeLinear")]:
            p, x, y = qparams(q), q.inputs[0], q.outputs[0]
            readers = uses.of(y)
            if p is None or x.type.dtype != DType.FLOAT32 or uses.is_output(y) or not readers:
                continue
            direct = [r for r in readers if self._dq_of(r, p)]
            moved = [r for r in readers if r not in direct and self._moves(r, y, p, uses)]
            if len(direct) + len(moved) != len(readers) or sum(uses.is_output(r.outputs[0]) for r in direct) > 1:
                continue
            first = next((r for r in direct if uses.is_output(r.outputs[0])), direct[0] if direct else None)
            if first is not None:
                out = first.outputs[0]  # the float ops write the DQ's own value: a graph output keeps its name
                remove_node(g, first)
            else:
                out = Value(g.unique_name(y.name + "_float"), TensorType(DType.FLOAT32, x.type.shape))
            self._float_pair(g, q, p, out)
            for r in direct:
                if r is not first:
                    g.replace_uses(r.outputs[0], out)
            for op in moved:  # the op now moves the float values, writing its DQ's value (a graph output's name)
                op.inputs[0] = out
                dqs = uses.of(op.outputs[0])
                keep = next((d for d in dqs if uses.is_output(d.outputs[0])), dqs[0])
                op.outputs = [keep.outputs[0]]
                keep.outputs[0].producer = op
                remove_node(g, keep)
                for d in dqs:
                    if d is not keep:
                        g.replace_uses(d.outputs[0], op.outputs[0])
            done += 1
            uses.refresh()
        if done:
            restore_order(g)
            ctx.logger.verbose(f"{done} Q/DQ pair(s) around float layers computed in float (one elementwise pass "
                               "each)")
        return done > 0

    @staticmethod
    def _dq_of(n: Node, p: QParams) -> bool:
        return is_op(n, "DequantizeLinear") and qparams(n) == p and n.outputs[0].type.dtype == DType.FLOAT32

    def _moves(self, op: Node, y: Value, p: QParams, uses: Uses) -> bool:
        """op moves y's 8-bit values (`moves_8bit_data`) and only DQs of the pair's parameters read its one output, at
        most one of them a graph output."""
        if not moves_8bit_data(op) or op.inputs[0] is not y:
            return False
        v = op.outputs[0]
        dqs = uses.of(v)
        return bool(dqs) and not uses.is_output(v) and all(self._dq_of(d, p) for d in dqs) and \
            sum(uses.is_output(d.outputs[0]) for d in dqs) <= 1

    @staticmethod
    def _float_pair(g: Graph, q: Node, p: QParams, result: Value) -> None:
        """The float ops of the pair before q, the last writing `result`."""
        x = q.inputs[0]
        lo, hi = (-128, 127) if p.dtype == torch.int8 else (0, 255)

        def c(tag: str, v: float) -> Value:
            return g.constant(f"{q.name}_{tag}", torch.tensor(v, dtype=torch.float32))
        scale, zp = c("scale", p.scale), c("zero_point", float(p.zero_point))
        steps = [("Div", [scale]), ("Round", []), ("Add", [zp]), ("Clip", [c("lo", lo), c("hi", hi)]), ("Sub", [zp]),
                 ("Mul", [scale])]
        v, at = x, g.nodes.index(q)
        for i, (op, args) in enumerate(steps):
            out = result if i == len(steps) - 1 else \
                Value(g.unique_name(f"{q.name}_{op.lower()}"), TensorType(DType.FLOAT32, x.type.shape))
            g.nodes.insert(at, Node(op, [v, *args], [out], {}, name=g.unique_name(f"{q.name}_{op.lower()}"), opset=13))
            v, at = out, at + 1


class InsertQuantization(Pass):
    """Implicit INT8: symmetric int8 Q/DQ pairs of calibrated ranges around the conv/gemm layers (module doc).

    ranges: tensor name -> amax (the int8 scale is amax / 127); layers named in `exclude` stay float. With `fp8`:
    float8_e4m3fn pairs (scale amax / 448, zero point 0) around the GEMM-shaped layers only (gemms, 1x1 convs: the
    FP8 kernels' layers), and float8 data is not carried through other ops."""

    name = "Q/DQ insertion"

    def __init__(self, ranges: dict[str, float], exclude: set[str] | frozenset[str] = frozenset(),
                 fp8: bool = False) -> None:
        self.ranges, self.exclude, self.fp8 = ranges, set(exclude), fp8

    def run(self, g: Graph, ctx: PassContext) -> bool:
        uses = Uses(g)
        layers = {id(n) for n in g.nodes if _layer_kind(n) is not None and n.name not in self.exclude
                  and (not self.fp8 or gemm_shaped(n))}
        amax: dict[int, float] = {}  # value -> its range (a commuting op's output: its input's range)
        targets: dict[int, Value] = {}
        for n in g.nodes:
            if id(n) not in layers:
                continue
            for v in (n.inputs[0], n.input(3)):
                if v is not None and not v.is_const:
                    targets[id(v)] = v
            y = n.outputs[0]
            chain = _int8_chain(y, uses, layers)
            if self.fp8 and chain:
                chain = None
            found = [self.ranges[u.name] for u in [y, *(chain or [])] if u.name in self.ranges]
            a = max(found) if found else None  # the widest: a max pool's output (what the layers read) is wider
            if chain is not None and a is not None:
                targets[id(y)] = y
                for u in [y, *chain]:  # the int8 data moves through these ops unchanged: one scale for all
                    amax[id(u)] = a
                    targets[id(u)] = u
        inserted = 0
        shifted = None if self.fp8 else int8_activation_zero_point(ctx.device)
        never_negative = {id(v) for v in targets.values() if _non_negative(v)}  # before any pair rewires a reader
        for v in targets.values():
            a = amax.get(id(v), self.ranges.get(v.name))
            if a is None or not (math.isfinite(a) and a > 0) or v.type.dtype != DType.FLOAT32:
                continue
            readers = [r for r in uses.of(v) if (id(r) in layers and _reads_as_data(r, v))
                       or (is_op(r, *COMMUTING_OPS) and id(r.outputs[0]) in amax)]
            if readers:
                # uint8 storage: a tensor never negative (a ReLU's) takes zero point 0, the same values as int8's
                # 0..127 with no zero-point correction in the integer kernels (oneDNN's AVX2 3x3 convs: ~20 % faster)
                zp = None if shifted is None else 0 if id(v) in never_negative else shifted
                self._insert(g, v, a / (FP8_MAX if self.fp8 else 127.0), readers, self.fp8, zp)
                inserted += 1
        if inserted:
            restore_order(g)
            what = "float8" if self.fp8 else "int8" if shifted is None else \
                f"uint8 (zero point {shifted}, 0 where never negative)"
            ctx.logger.verbose(f"Inserted {what} Q/DQ pairs on {inserted} tensors from their ranges")
        return inserted > 0

    @staticmethod
    def _insert(g: Graph, v: Value, scale: float, readers: list[Node], fp8: bool = False,
                shifted: int | None = None) -> None:
        """A Q/DQ pair on v for `readers`: float8, int8 (zero point 0), or uint8 with zero point `shifted` (128, or 0
        for a tensor never negative)."""
        s = g.constant(v.name + "_scale", torch.tensor(scale, dtype=torch.float32))
        if shifted is not None:
            zp, qt = g.constant(v.name + "_zero_point", torch.tensor(shifted, dtype=torch.uint8)), DType.UINT8
        else:
            zp = g.constant(v.name + "_zero_point", torch.zeros((), dtype=FP8 if fp8 else torch.int8))
            qt = DType.FLOAT8E4M3FN if fp8 else DType.INT8
        vq = Value(g.unique_name(v.name + "_q"), TensorType(qt, v.type.shape))
        vd = Value(g.unique_name(v.name + "_dq"), v.type)
        opset = 21 if fp8 else 13
        qn = Node("QuantizeLinear", [v, s, zp], [vq], {}, name=g.unique_name(v.name + "_quantize"), opset=opset)
        dn = Node("DequantizeLinear", [vq, s, zp], [vd], {}, name=g.unique_name(v.name + "_dequantize"), opset=opset)
        at = g.nodes.index(v.producer) + 1 if v.producer is not None and v.producer in g.nodes else 0
        g.nodes[at:at] = [qn, dn]
        for r in readers:
            r.inputs = [vd if (x is v and i in ((0, 3) if r.domain == "kiln" else (0,))) else x
                        for i, x in enumerate(r.inputs)]


def _non_negative(v: Value, depth: int = 8) -> bool:
    """v is >= 0 by construction: a Relu's output, a conv/gemm layer's whose last step is a fused Relu, or what an
    op moving values (a max pool, a reshape, ...) makes of such a tensor."""
    n = v.producer
    if n is None or depth == 0:
        return False
    if is_op(n, "Relu"):
        return True
    if n.domain == "kiln" and n.op_type in ("FusedConv", "FusedGemm"):
        residual_after = n.input(3) is not None and bool(int(n.attr("act_before_add", 0) or 0))
        return str(n.attr("activation", "") or "") == "Relu" and not residual_after
    if moves_8bit_data(n):  # (not a cubic Resize: its taps can undershoot below zero)
        return _non_negative(n.inputs[0], depth - 1)  # type: ignore[arg-type]
    return False


def _int8_chain(y: Value, uses: Uses, layers: set[int]) -> list[Value] | None:
    """The outputs of the commuting ops between y and the layers reading it, when every path from y ends in a
    layer reading it as data (then y can stay int8 all the way); None otherwise."""
    chain: list[Value] = []
    todo = [y]
    while todo:
        v = todo.pop()
        readers = uses.of(v)
        if not readers or uses.is_output(v):
            return None
        for r in readers:
            if id(r) in layers and _reads_as_data(r, v):
                continue
            if moves_8bit_data(r) and r.inputs[0] is v:
                chain.append(r.outputs[0])
                todo.append(r.outputs[0])
                continue
            return None
    return chain


def _reads_as_data(n: Node, v: Value) -> bool:
    """Whether layer n reads v only as its input X or its residual Z."""
    return all(i in (0, 3) for i, x in enumerate(n.inputs) if x is v)


def calibration_targets(g: Graph, exclude: set[str] | frozenset[str] = frozenset()) -> list[Value]:
    """The float tensors InsertQuantization may quantize: each conv/gemm layer's input, residual and output."""
    seen: dict[int, Value] = {}
    for n in g.nodes:
        if _layer_kind(n) is None or n.name in exclude:
            continue
        for v in (n.inputs[0], n.input(3), n.outputs[0]):
            if v is not None and not v.is_const and v.type.dtype == DType.FLOAT32:
                seen.setdefault(id(v), v)
    return list(seen.values())


def has_qdq(g: Graph) -> bool:
    """Whether the graph holds Q/DQ nodes (an explicitly quantized model)."""
    return any(is_op(n, "QuantizeLinear", "DequantizeLinear") for n in g.nodes)
