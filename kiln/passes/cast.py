"""Cast folding: float Casts at the edges of reduced-precision convolutions and GEMMs become part of them.

After ReducedPrecision a float16 network reads its float32 input through a Cast and hands its float32
outputs back through Casts. A Cast between float types whose only readers are FusedConv/FusedGemm
activation inputs is dropped (the layer reads the wider tensor and converts on load), and a Cast of a
FusedConv/FusedGemm output that nothing else reads is dropped with the layer storing the cast type
directly (attribute ``out_dtype``). The Triton tactics convert on load and store, so one kernel and
one tensor disappear; the cuDNN/cuBLAS tactics take one element type and convert with separate kernels
(``converting`` in kiln.backends.cuda.common), and the autotuner weighs both. The builder runs this
pass for the CUDA target; the CPU tactics take float32 only.
"""
from __future__ import annotations

from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, Value
from kiln.ir.types import TensorType
from kiln.ops.pointwise_program import INT_CAST_TARGETS, INT_INPUTS
from kiln.passes.base import Pass, PassContext
from kiln.passes.rewrite import Uses, is_op, remove_node, take_output

_FLOATS = (DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16)
MOVE_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Gather", "Slice", "Expand", "Identity")
"""Ops that move elements without reading their values (input 0 is the data): a Cast commutes with them."""


def _fused(n: Node | None) -> bool:
    return n is not None and n.domain == "kiln" and n.op_type in ("FusedConv", "FusedGemm")


class FoldCasts(Pass):
    """Folds float-to-float Casts into the FusedConv/FusedGemm layers on either side (see module doc)."""

    name = "cast folding"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        changed = False
        uses = Uses(g)
        for c in list(g.nodes):
            if not is_op(c, "Cast") or len(c.inputs) != 1 or c.inputs[0] is None:
                continue
            x, y = c.inputs[0], c.outputs[0]
            if x.is_const or x.type.dtype not in _FLOATS or y.type.dtype not in _FLOATS:
                continue
            readers = uses.of(y)
            p = x.producer
            if readers and not uses.is_output(y) and all(_reads_converting(r, y) for r in readers):
                for r in readers:
                    r.inputs[0] = x
                remove_node(g, c)
                ctx.logger.verbose(f"Folding {c.name} into {', '.join(r.name for r in readers)} (convert on load)")
            elif _fused(p) and p in g.nodes and uses.only(x) is c and len(p.outputs) == 1:  # type: ignore[operator]
                take_output(p, x, y)  # type: ignore[arg-type]
                p.attrs["out_dtype"] = y.type.dtype.onnx  # type: ignore[union-attr]
                remove_node(g, c)
                ctx.logger.verbose(f"Fusing {p.name} with {c.name} (convert on store)")  # type: ignore[union-attr]
            elif _wide_norm(p, x, y, c, uses):
                moved = _widen(x, y, c, uses)
                take_output(p, x, y)  # type: ignore[arg-type]
                p.attrs["out_dtype"] = y.type.dtype.onnx  # type: ignore[union-attr]
                remove_node(g, c)
                ctx.logger.verbose(f"Fusing {p.name} with {c.name} (stores {y.type.dtype.value}"  # type: ignore
                                   + (f"; {', '.join(moved)} read it" if moved else "") + ")")
            else:
                continue
            changed = True
            uses.refresh()
        return changed


def _reads_converting(r: Node, v: Value) -> bool:
    """r is a FusedConv / FusedGemm reading v once, as its activation (a wider float type is converted on load)."""
    return _fused(r) and r.inputs[0] is v and sum(u is v for u in r.inputs) == 1


def _wide_readers(v: Value, uses: Uses, skip: Node | None = None, depth: int = 0) -> bool:
    """Every reader of `v` but `skip` could read it in a wider float type: one reading it converted on load, or an
    op that moves elements (MOVE_OPS, v as input 0) whose output's readers could too; v is not a graph output."""
    if uses.is_output(v) or depth > 16:
        return False
    for r in uses.of(v):
        if r is skip or _reads_converting(r, v):
            continue
        if not (is_op(r, *MOVE_OPS) and r.inputs[0] is v and len(r.outputs) == 1
                and _wide_readers(r.outputs[0], uses, None, depth + 1)):
            return False
    return True


def _wide_norm(p: Node | None, x: Value, y: Value, c: Node, uses: Uses) -> bool:
    """A Cast widening a kiln AddLayerNormalization's Y, whose other readers (if any) could read the wide Y instead:
    the norm stores the wide type (out_dtype) and they read that (GPT-2's last norm: the float32 graph output;
    BERT's: that, and the pooler's row Gather -> FusedGemm)."""
    if p is None or p.domain != "kiln" or p.op_type != "AddLayerNormalization" or p.outputs[0] is not x \
            or p.attr("out_dtype") is not None or x.type.dtype is None or y.type.dtype is None \
            or y.type.dtype.torch.itemsize <= x.type.dtype.torch.itemsize:
        return False
    return _wide_readers(x, uses, skip=c)


def _widen(x: Value, y: Value, c: Node, uses: Uses) -> list[str]:
    """Point x's other readers at the wide y and retype the element-moving ops' outputs on the way."""
    moved: list[str] = []
    todo = [r for r in uses.of(x) if r is not c]
    for r in todo:
        r.inputs = [y if v is x else v for v in r.inputs]
    while todo:
        r = todo.pop()
        if _fused(r):
            continue
        out = r.outputs[0]
        out.type = TensorType(y.type.dtype, out.type.shape)
        moved.append(r.name)
        todo.extend(uses.of(out))
    return moved


def int_cast(n: Node) -> bool:
    """A Cast of integers to bool or float32, which the CUDA Pointwise kernels evaluate in a program
    (kiln.ops.pointwise_program.INT_INPUTS / INT_CAST_TARGETS)."""
    if not is_op(n, "Cast") or len(n.inputs) != 1 or n.inputs[0] is None or len(n.outputs) != 1:
        return False
    return n.inputs[0].type.dtype in INT_INPUTS and n.outputs[0].type.dtype in INT_CAST_TARGETS


class SinkIntCasts(Pass):
    """Moves a Cast of integers to bool / float32 below the data-movement ops it feeds (Flatten, Reshape, Gather,
    ...), so that it meets the elementwise op that reads it and joins its Pointwise program (the CUDA target:
    BERT's int64 attention mask, cast to bool, gathered and reshaped before the mask's And / Where, was a layer
    of its own). Moving the Cast does not change a value: the ops move elements without reading them."""

    name = "cast sinking"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        if ctx.device != "cuda":
            return False
        changed = False
        uses = Uses(g)
        for c in list(g.nodes):
            while int_cast(c):
                y = c.outputs[0]
                shapes = [r for r in uses.of(y) if is_op(r, "Shape", "Size")]
                for r in shapes:  # they read the shape only: the Cast's input has it too
                    r.inputs = [c.inputs[0] if v is y else v for v in r.inputs]
                if shapes:
                    uses.refresh()
                readers = uses.of(y)
                if uses.is_output(y) or len(readers) != 1:
                    break
                m = readers[0]
                if not is_op(m, *MOVE_OPS) or len(m.outputs) != 1 or m.inputs[0] is not y \
                        or sum(v is y for v in m.inputs) != 1 or m.outputs[0].type.shape is None:
                    break
                x, z = c.inputs[0], m.outputs[0]
                moved = g.new_value(f"{z.name}_{x.type.dtype.value}", TensorType(x.type.dtype, z.type.shape))
                m.inputs[0] = x
                take_output(m, z, moved)
                c.inputs[0] = moved
                take_output(c, y, z)
                g.nodes.remove(c)
                g.nodes.insert(g.nodes.index(m) + 1, c)
                ctx.logger.verbose(f"Moving {c.name} below {m.name} ({m.op_type} of {x.type.dtype.value})")
                changed = True
                uses.refresh()
        return changed
