"""Fused layers made by the graph optimizer (domain "kiln"): FusedConv, FusedGemm, Pointwise.

The contract these definitions implement is shared with the CPU and CUDA backends:

* ``FusedConv(X, W, B?, Z?)``: convolution with explicit ``pads`` (all begins, then all ends),
  ``strides``, ``dilations``, ``group``, an optional bias, an optional residual ``Z`` of the output's
  shape and an activation epilogue. ``act_before_add`` 0: ``act(conv + B + Z)``; 1: ``act(conv + B) + Z``.
* Optional ``out_dtype`` (ONNX element type): the result is stored in that float type; an X/A of
  another float type than W is converted to W's on load (both from folded Casts, kiln.passes.cast).
* ``FusedGemm(A, W, B?, Z?)``: ``act(A @ W^T + B (+ Z))`` with W stored ``[N, K]`` (like nn.Linear) and
  A of any rank >= 2 (contraction over its last dim); same activation attributes.
* ``FusedConvNorm(X, W, B?, Scale, NB?)``: a FusedConv without residual whose output is transposed to
  ``[N, OH, OW, C]`` and layer-normalized over C (ConvNeXt's depthwise conv + LayerNorm).
* ``Pointwise(*inputs)``: a small program of elementwise ONNX ops (numpy broadcasting), each evaluated
  with that op's own registered definition at opset 21.

Activations are named by ``activation`` with parameters ``alpha``/``beta``; they and the epilogue
attributes (``EPILOGUE``) are one table, kiln.ops.activations. float16/bfloat16 activations are evaluated
in float32 and rounded back, like the ONNX activation ops.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from kiln.errors import UnsupportedOpError
from kiln.ir.dtype import DType, onnx_to_torch
from kiln.ir.graph import Node, Value
from kiln.ir.types import TensorType
from kiln.ops.activations import EPILOGUE, TABLE, Epilogue, activate
from kiln.ops.attrs import REQUIRED, Attr
from kiln.ops.conv import (CONV_TRANSPOSE_ATTRS, WINDOW, WindowOp, check_window_attrs, kernel_shape, require_float,
                           spatial_rank, strides_dilations, torch_pad, window_ints)
from kiln.ops.linalg import symbolic_operands
from kiln.ops.norm import layer_norm
from kiln.ops.pointwise_program import PointwiseProgram, Ref, program_opset
from kiln.ops.registry import OpDef, lookup, register

Tensor = torch.Tensor
_CONV: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

ACTIVATIONS: dict[str, Callable[[Tensor, float, float], Tensor]] = {a.name: a.fn for a in TABLE.values()}
"""activation name -> fn(x, alpha, beta), from the one table (kiln.ops.activations.TABLE)."""


def _epilogue(node: Node, y: Tensor, z: Tensor | None) -> Tensor:
    """Residual add and activation in the order `act_before_add` asks for, then the `out_dtype` cast."""
    ep = Epilogue.of(node)
    if z is not None and not ep.act_before_add:
        y = y + z.to(y.dtype)
        z = None
    y = activate(y, ep.activation, ep.alpha, ep.beta)
    y = y if z is None else y + z.to(y.dtype)
    return y if ep.out_dtype is None else y.to(onnx_to_torch(ep.out_dtype))


def _as_weight_type(x: Tensor, w: Tensor) -> Tensor:
    """The activation converted to the weight's float type (a folded input Cast; see kiln.passes.cast)."""
    return x.to(w.dtype) if x.dtype != w.dtype and x.is_floating_point() and w.is_floating_point() else x


class _FusedBase(OpDef):
    domain = "kiln"
    attributes = dict(EPILOGUE)

    def check(self, node: Node) -> None:
        if str(node.attr("activation", "") or "") not in ACTIVATIONS:
            raise UnsupportedOpError(f"node '{node.name}': unknown fused activation {node.attr('activation')!r}")


@register
class FusedConv(_FusedBase, WindowOp):
    """Conv (explicit pads) + bias + optional residual Z + activation epilogue."""

    op_type = "FusedConv"
    arity = (2, 4)  # X, W, B?, Z?
    out_arity = (1, 1)
    attributes = {**EPILOGUE, **{k: WINDOW[k] for k in ("strides", "dilations", "pads", "kernel_shape")},
                  "group": Attr("int", 1, min=1)}

    def check(self, node: Node) -> None:
        super().check(node)
        check_window_attrs(node)

    def compute(self, node: Node, x: Tensor, w: Tensor, b: Tensor | None = None,
                z: Tensor | None = None) -> Tensor:
        require_float(node, x, w, b)
        x = _as_weight_type(x, w)
        nd = spatial_rank(node, x)
        kernel_shape(node, w)  # an explicit kernel_shape must be the weight's
        strides, dilations = strides_dilations(node, nd)
        pads = window_ints(node, "pads", nd, 0)
        begin, end = pads[:nd], pads[nd:]
        if begin == end:
            padding: list[int] = begin
        else:
            x = F.pad(x, torch_pad(begin, end))
            padding = [0] * nd
        y = _CONV[nd](x, w, b, strides, padding, dilations, int(node.attr("group", 1)))
        return _epilogue(node, y, z)


@register
class FusedConvTranspose(_FusedBase, WindowOp):
    """ConvTranspose (its own attributes: pads or auto_pad, output_padding, output_shape) + bias + optional residual
    Z + activation epilogue: the upsampling of a segmentation or text-detection decoder with the ReLU after it."""

    op_type = "FusedConvTranspose"
    arity = (2, 4)  # X, W, B?, Z?
    out_arity = (1, 1)
    attributes = {**EPILOGUE, **CONV_TRANSPOSE_ATTRS}

    def check(self, node: Node) -> None:
        super().check(node)
        check_window_attrs(node)

    def compute(self, node: Node, x: Tensor, w: Tensor, b: Tensor | None = None,
                z: Tensor | None = None) -> Tensor:
        return _epilogue(node, lookup("ConvTranspose", "").compute(node, x, w, b), z)


@register
class FusedConvNorm(FusedConv):
    """A depthwise-style conv (+ bias + activation) whose channels are then normalized per pixel, as one layer
    (domain "kiln", made by kiln.passes.conv_norm on the CUDA target)::

        Y = FusedConv(X, W, B)                        (no residual)
        T = Transpose(Y, perm=[0, 2, 3, 1])           [N, OH, OW, C]
        out = LayerNormalization(T, Scale, NB, axis=-1, epsilon)   statistics in float32

    ConvNeXt's block opens with exactly this (7x7 depthwise conv, channels-last LayerNorm). The output is the
    normalized tensor in [N, OH, OW, C] order; Scale and NB are [C]."""

    op_type = "FusedConvNorm"
    arity = (4, 5)  # X, W, B?, Scale, NB?
    attributes = {**{k: EPILOGUE[k] for k in ("activation", "alpha", "beta")},
                  **{k: WINDOW[k] for k in ("strides", "dilations", "pads", "kernel_shape")},
                  "group": Attr("int", 1, min=1), "epsilon": Attr("float", 1e-5)}

    def compute(self, node: Node, x: Tensor, w: Tensor, b: Tensor | None = None,  # type: ignore[override]
                scale: Tensor | None = None, nb: Tensor | None = None) -> Tensor:
        if scale is None:
            raise UnsupportedOpError(f"node '{node.name}': FusedConvNorm needs a Scale input")
        require_float(node, scale, nb)
        y = super().compute(node, x, w, b)
        if y.dim() != 4:
            raise UnsupportedOpError(f"node '{node.name}': FusedConvNorm takes 2-D convolutions")
        t = y.permute(0, 2, 3, 1)
        stat = torch.float64 if t.dtype == torch.float64 else torch.float32
        return layer_norm(t, scale, nb, [-1], float(node.attr("epsilon", 1e-5)), stat)[0]


@register
class FusedGemm(_FusedBase):
    """A @ W^T + B (W constant [N, K]) + optional residual Z + activation epilogue."""

    op_type = "FusedGemm"
    arity = (2, 4)  # A, W, B?, Z?
    out_arity = (1, 1)

    def compute(self, node: Node, a: Tensor, w: Tensor, b: Tensor | None = None,
                z: Tensor | None = None) -> Tensor:
        require_float(node, a, w, b)
        a = _as_weight_type(a, w)
        if a.dim() < 2:
            raise UnsupportedOpError(f"node '{node.name}': FusedGemm needs an input of rank >= 2")
        if a.device.type == "cpu" and a.dtype == torch.float16:
            y = F.linear(a.float(), w.float(), None if b is None else b.float()).to(a.dtype)
        else:
            y = F.linear(a, w.to(a.dtype), None if b is None else b.to(a.dtype))
        return _epilogue(node, y, z)

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        """By rule where A has symbolic dims: [..., K] @ W^T -> [..., N], W's float type (or out_dtype)."""
        a, w = types[0], types[1] if len(types) > 1 else None
        z = types[3] if len(types) > 3 else None
        if (a is None or w is None or a.shape is None or w.shape is None or len(w.shape) != 2 or len(a.shape) < 2
                or not symbolic_operands([a]) or a.dtype is None or w.dtype is None
                or not (a.dtype.is_float and w.dtype.is_float)):
            return super().infer(node, types, consts)
        k, n = a.shape[-1], w.shape[0]
        if isinstance(k, int) and isinstance(w.shape[1], int) and k != w.shape[1]:
            raise ValueError(f"FusedGemm contracts a dim of {k} with a weight of {w.shape[1]}")
        shape = (*a.shape[:-1], n)
        if z is not None and (z.shape is None or tuple(z.shape) != shape):
            return super().infer(node, types, consts)
        out_dtype = Epilogue.of(node).out_dtype
        return [TensorType(DType.from_onnx(out_dtype) if out_dtype is not None else w.dtype, shape)]


def _ref(ref: Ref, inputs: tuple[Any, ...], temps: list[Any], consts: tuple[float, ...], like: Tensor | None) -> Any:
    if ref.kind == "input":
        return inputs[ref.index]
    if ref.kind == "temp":
        return temps[ref.index]
    if ref.kind == "const":
        dtype = like.dtype if like is not None else torch.float32
        device = like.device if like is not None else "cpu"
        return torch.tensor(consts[ref.index], dtype=dtype, device=device)
    return None  # a missing optional operand


@register
class Pointwise(OpDef):
    """A fused chain / small DAG of elementwise ops, evaluated instruction by instruction.

    The program is parsed and validated (kiln.ops.pointwise_program) before anything runs: `check`
    rejects a bad one at import, and `compute` evaluates only the parsed form."""

    op_type = "Pointwise"
    domain = "kiln"
    attributes = {"program": Attr("struct", REQUIRED), "consts": Attr("floats"), "outputs": Attr("strs")}

    def check(self, node: Node) -> None:
        PointwiseProgram.parse(node)

    def compute(self, node: Node, *inputs: Any) -> Any:
        return self.bind(node)(*inputs)

    def bind(self, node: Node) -> Callable[..., Any]:
        """The program parsed once, each instruction's op definition and node made once: a run only evaluates."""
        prog = PointwiseProgram.parse(node)
        steps = [(ins, Node(ins.op, [], [Value(f"{node.name}.t{j}")], dict(ins.attrs), name=f"{node.name}/{ins.op}",
                            opset=program_opset(ins.op)), lookup(ins.op, "").compute)
                 for j, ins in enumerate(prog.instrs)]

        def run(*inputs: Any) -> Any:
            if len(inputs) != prog.n_inputs:
                raise UnsupportedOpError(f"node '{node.name}': Pointwise got {len(inputs)} inputs, "
                                         f"its program reads {prog.n_inputs}")
            temps: list[Any] = []
            for ins, step, fn in steps:
                like = next((x for x in (_ref(r, inputs, temps, prog.consts, None) for r in ins.args
                                         if r.kind in ("input", "temp"))
                             if isinstance(x, Tensor) and x.is_floating_point()), None)
                r = fn(step, *[_ref(r, inputs, temps, prog.consts, like) for r in ins.args])
                temps.append(r[0] if isinstance(r, tuple) else r)
            outs = [_ref(r, inputs, temps, prog.consts, None) for r in prog.outputs]
            return outs[0] if len(outs) == 1 else tuple(outs)
        return run
