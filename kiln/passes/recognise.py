"""Pattern recognition: exporters' decompositions of GELU, HardSwish / HardSigmoid and LayerNorm back into the
single ONNX ops, and of ShuffleNet's channel shuffle into Kiln's ChannelShuffle.

Exporters write GELU as elementwise arithmetic and many write LayerNorm as reductions; each piece would
run as its own layer (or one Pointwise pass per chain). As single ops, GELU becomes a GEMM / conv
epilogue (FuseGemm, FuseConv) and LayerNorm one normalisation kernel. A channel shuffle is exported as
two Reshapes around a Transpose, whose last Reshape copies into NCHW (and the next conv back to NHWC);
as one ChannelShuffle it is one copy in the channels-last layout (kiln.ops.shuffle).

    erf GELU:   0.5 * x * (1 + Erf(x / sqrt(2)))          (x * 0.7071.. or x / 1.4142..; products in any order)
    tanh GELU:  0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))       (x^3 as Pow(x, 3) or x * x * x)
    HardSwish:  x * Clip(x + 3, 0, 6) / 6                 (/ 6 or * (1/6), after or before the product with x)
    HardSigmoid: Clip(x + 3, 0, 6) / 6                     (the same without the product: HardSigmoid(1/6, 1/2))
    LayerNorm:  d = x - ReduceMean(x); y = d / Sqrt(ReduceMean(d^2) + eps) [* gamma] [+ beta]
                over trailing axes, d^2 as Pow(d, 2) or d * d; gamma/beta constants over the normalized dims
    GroupNorm:  Reshape(x [N, C, ...] -> [N, G, -1]) / InstanceNormalization(s [G], b [G]) / Reshape back to
                x's shape [* gamma] [+ beta]   (gamma/beta per-channel constants; PyTorch's GroupNorm as the
                TorchScript exporter writes it)

Every constant must equal the formula's (to its dtype's precision), every intermediate must be read
only inside the pattern and must not be a graph output, so the rewrite computes exactly what the
nodes it replaces computed.
"""
from __future__ import annotations

import math

import torch

from kiln.ir.graph import Graph, Node, Value
from kiln.ir.types import Dim
from kiln.passes.base import Pass, PassContext
from kiln.passes.rewrite import Uses, const, is_op, per_channel, remove_node, replace_nodes, runtime, same_shape, scalar

Tensor = torch.Tensor
GELU_OPSET = 20           # the first ai.onnx opset with Gelu
HARDSWISH_OPSET = 14      # the first ai.onnx opset with HardSwish
HARDSIGMOID_OPSET = 6
LAYERNORM_OPSET = 17      # the first ai.onnx opset with LayerNormalization
GROUPNORM_OPSET = 21      # the first ai.onnx opset whose GroupNormalization takes per-channel scale and bias


def _close(v: Value | None, want: float) -> bool:
    """v is a one-element float constant equal to `want` to the precision of its dtype."""
    c = const(v)
    if c is None or c.numel() != 1 or not c.dtype.is_floating_point:
        return False
    tol = 1e-6 if c.dtype in (torch.float32, torch.float64) else 2e-3
    return abs(float(c.reshape(()).item()) - want) <= tol * abs(want)


def _operands(n: Node, x: Value) -> Value | None:
    """The other input of a two-input node that reads x once (None when it reads x twice or not at all)."""
    if len(n.inputs) != 2:
        return None
    a, b = n.inputs
    if a is x and b is not x:
        return b
    if b is x and a is not x:
        return a
    return None


def _scalar_fits(v: Value | None, x: Value) -> bool:
    """A constant operand that broadcasting against x cannot grow x's shape."""
    c = const(v)
    return c is not None and c.numel() == 1 and x.type.rank is not None and c.dim() <= x.type.rank


def _only(uses: Uses, v: Value, *ops: str) -> Node | None:
    n = uses.only(v)
    return n if is_op(n, *ops) else None


def _half_x_times(r: Value, x: Value, uses: Uses) -> tuple[list[Node], Value] | None:
    """(nodes, y) for y = 0.5 * x * r written as two Muls in any association and order."""
    m1 = _only(uses, r, "Mul")
    if m1 is None:
        return None
    o = _operands(m1, r)
    if o is x or (o is not None and _close(o, 0.5) and _scalar_fits(o, x)):
        m2 = _only(uses, m1.outputs[0], "Mul")
        last = None if m2 is None else _operands(m2, m1.outputs[0])
        want_x = o is not x
        if last is not None and ((want_x and last is x) or (not want_x and _close(last, 0.5) and _scalar_fits(last, x))):
            return [m1, m2], m2.outputs[0]  # type: ignore[list-item]
        return None
    h = None if o is None else o.producer
    if h is not None and is_op(h, "Mul") and uses.only(o) is m1:  # type: ignore[arg-type]
        half = _operands(h, x)
        if half is not None and _close(half, 0.5) and _scalar_fits(half, x):
            return [h, m1], m1.outputs[0]
    return None


def _plus_one(v: Value, x: Value, uses: Uses) -> Node | None:
    a = _only(uses, v, "Add")
    o = None if a is None else _operands(a, v)
    return a if o is not None and _close(o, 1.0) and _scalar_fits(o, x) else None


def _scaled(v: Value, scale: float, uses: Uses) -> tuple[Node, Value] | None:
    """(node, x) where v = x * scale or x / (1 / scale), v read only by its one reader."""
    p = v.producer
    if p is None or not is_op(p, "Mul", "Div") or len(p.inputs) != 2 or uses.only(v) is None:
        return None
    x, c = p.inputs
    if is_op(p, "Mul") and const(x) is not None:
        x, c = c, x
    if not runtime(x) or not _scalar_fits(c, x):
        return None
    if (is_op(p, "Mul") and _close(c, scale)) or (is_op(p, "Div") and _close(c, 1.0 / scale)):
        return p, x
    return None


def _cube(v: Value, uses: Uses) -> tuple[list[Node], Value] | None:
    """(nodes, x) for v = Pow(x, 3) or x * x * x, v read only once."""
    p = v.producer
    if p is None or uses.only(v) is None:
        return None
    if is_op(p, "Pow") and len(p.inputs) == 2 and runtime(p.inputs[0]) and _close(p.inputs[1], 3.0):
        return [p], p.inputs[0]
    if is_op(p, "Mul") and len(p.inputs) == 2:
        for sq, x in (p.inputs, p.inputs[::-1]):
            q = sq.producer
            if q is not None and is_op(q, "Mul") and list(q.inputs) == [x, x] and uses.only(sq) is p:
                return [q, p], x
    return None


class RecogniseGelu(Pass):
    """Erf and tanh GELU decompositions -> one Gelu node (approximate "none" / "tanh")."""

    name = "gelu recognition"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        changed = False
        uses = Uses(g)
        gone: set[int] = set()  # ids of nodes an earlier rewrite replaced
        for n in list(g.nodes):
            if id(n) in gone or not is_op(n, "Erf", "Tanh"):
                continue
            m = self._erf(n, uses) if n.op_type == "Erf" else self._tanh(n, uses)
            if m is None:
                continue
            nodes, x, y, approx = m
            gone |= {id(k) for k in nodes}
            if x.type.dtype is None or not x.type.dtype.is_float:
                continue
            gelu = Node("Gelu", [x], [y], {"approximate": approx}, name=g.unique_name(f"{nodes[-1].name}_gelu"),
                        opset=GELU_OPSET)
            replace_nodes(g, nodes, [gelu])
            ctx.logger.verbose(f"Recognised GELU ({approx}) {gelu.name} from {len(nodes)} nodes: "
                               + ", ".join(k.name for k in nodes))
            changed = True
            uses.refresh()
        return changed

    @staticmethod
    def _erf(e: Node, uses: Uses) -> tuple[list[Node], Value, Value, str] | None:
        s = _scaled(e.inputs[0], 1.0 / math.sqrt(2.0), uses)
        if s is None or uses.only(e.inputs[0]) is not e:
            return None
        one = _plus_one(e.outputs[0], s[1], uses)
        tail = None if one is None else _half_x_times(one.outputs[0], s[1], uses)
        if tail is None:
            return None
        return [s[0], e, one] + tail[0], s[1], tail[1], "none"  # type: ignore[list-item]

    @staticmethod
    def _tanh(t: Node, uses: Uses) -> tuple[list[Node], Value, Value, str] | None:
        s = _scaled(t.inputs[0], math.sqrt(2.0 / math.pi), uses)
        if s is None or uses.only(t.inputs[0]) is not t:
            return None
        add = s[1].producer                       # x + 0.044715 * x^3
        if add is None or not is_op(add, "Add") or len(add.inputs) != 2 or uses.only(s[1]) is None:
            return None
        for x, q in (add.inputs, add.inputs[::-1]):
            k = _scaled(q, 0.044715, uses)
            c = None if k is None else _cube(k[1], uses)
            if c is not None and c[1] is x and runtime(x):
                break
        else:
            return None
        one = _plus_one(t.outputs[0], x, uses)
        tail = None if one is None else _half_x_times(one.outputs[0], x, uses)
        if tail is None:
            return None
        return c[0] + [k[0], add, s[0], t, one] + tail[0], x, tail[1], "tanh"  # type: ignore[index]


def _sixth(n: Node | None, v: Value) -> bool:
    """n computes v / 6 or v * (1/6), reading v once, with a constant that cannot grow v's shape."""
    if n is None or not is_op(n, "Mul", "Div") or len(n.inputs) != 2:
        return False
    if is_op(n, "Div"):
        return n.inputs[0] is v and n.inputs[1] is not v and _close(n.inputs[1], 6.0) and _scalar_fits(n.inputs[1], v)
    o = _operands(n, v)
    return o is not None and _close(o, 1.0 / 6.0) and _scalar_fits(o, v)


class RecogniseHardSwish(Pass):
    """x * Clip(x + 3, 0, 6) / 6 -> one HardSwish; Clip(x + 3, 0, 6) / 6 alone -> one HardSigmoid(1/6, 1/2).

    Paddle2ONNX writes MobileNetV3's hard-swish this way (Add, Clip, Mul, Div): four layers, or one Pointwise
    program behind every convolution, where a HardSwish is the convolution's epilogue (FuseConv)."""

    name = "hardswish recognition"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        changed = False
        uses = Uses(g)
        gone: set[int] = set()
        for clip in list(g.nodes):
            if id(clip) in gone or not is_op(clip, "Clip"):
                continue
            m = self._match(clip, uses)
            if m is None:
                continue
            nodes, x, y, op = m
            gone |= {id(k) for k in nodes}
            attrs = {"alpha": 1.0 / 6.0, "beta": 0.5} if op == "HardSigmoid" else {}
            node = Node(op, [x], [y], attrs, name=g.unique_name(f"{nodes[-1].name}_{op.lower()}"),
                        opset=HARDSWISH_OPSET if op == "HardSwish" else HARDSIGMOID_OPSET)
            replace_nodes(g, nodes, [node])
            ctx.logger.verbose(f"Recognised {op} {node.name} from {', '.join(k.name for k in nodes)}")
            changed = True
            uses.refresh()
        return changed

    @staticmethod
    def _match(clip: Node, uses: Uses) -> tuple[list[Node], Value, Value, str] | None:
        from kiln.ops.activations import from_onnx
        act = from_onnx(clip)
        if act is None or act[0] != "Clip" or act[1] != 0.0 or act[2] != 6.0:
            return None
        add = clip.inputs[0].producer if clip.inputs and clip.inputs[0] is not None else None
        if add is None or not is_op(add, "Add") or len(add.inputs) != 2 or uses.only(add.outputs[0]) is not clip:
            return None
        x = next((v for v, o in (add.inputs, add.inputs[::-1]) if runtime(v) and _close(o, 3.0)
                  and _scalar_fits(o, v)), None)
        if x is None or x.type.dtype is None or not x.type.dtype.is_float:
            return None
        c = clip.outputs[0]
        n = uses.only(c)
        if n is None:
            return None
        if is_op(n, "Mul") and _operands(n, c) is x:  # x * clip, then / 6
            k = uses.only(n.outputs[0])
            if not _sixth(k, n.outputs[0]):
                return None
            return [add, clip, n, k], x, k.outputs[0], "HardSwish"  # type: ignore[list-item,union-attr]
        if not _sixth(n, c):
            return None
        h = n.outputs[0]
        mul = uses.only(h)
        if is_op(mul, "Mul") and _operands(mul, h) is x:  # type: ignore[arg-type]
            return [add, clip, n, mul], x, mul.outputs[0], "HardSwish"  # type: ignore[list-item,union-attr]
        return [add, clip, n], x, h, "HardSigmoid"


def _reduce_axes(n: Node) -> list[int] | None:
    """A keepdims ReduceMean's axes (attribute or constant input), None otherwise."""
    if not is_op(n, "ReduceMean") or not int(n.attr("keepdims", 1)):
        return None
    if n.opset >= 18:
        c = const(n.input(1))
        return None if c is None else [int(a) for a in c.reshape(-1).tolist()]
    axes = n.attr("axes")
    return None if axes is None else [int(a) for a in axes]


def _trailing(axes: list[int] | None, rank: int | None) -> int | None:
    """The first axis when `axes` are exactly the trailing axes [k, rank) of a rank-`rank` tensor."""
    if axes is None or rank is None or not axes:
        return None
    norm = sorted(a + rank if a < 0 else a for a in axes)
    k = norm[0]
    return k if norm == list(range(k, rank)) and k >= 0 else None


def _affine(v: Value, axis: int, x: Value, uses: Uses, op: str) -> tuple[Node, Tensor] | None:
    """(node, constant) for v's only reader `op`(v, c) with c over the normalized dims only."""
    n = _only(uses, v, op)
    o = None if n is None else _operands(n, v)
    c = const(o)
    rank = x.type.rank
    if c is None or rank is None or not c.dtype.is_floating_point or c.dim() > rank - axis:
        return None
    norm = x.type.shape[axis:] if x.type.shape is not None else None
    if norm is None or not all(isinstance(d, int) for d in norm):
        return None
    try:
        full = torch.broadcast_to(c, tuple(norm))  # type: ignore[arg-type]
    except RuntimeError:
        return None
    return n, full.contiguous()  # type: ignore[return-value]


class _RecogniseNorm(Pass):
    """A normalisation decomposed around an anchor node (by default a keepdims ReduceMean), matched from that node
    (`_match`) and replaced by one node."""

    what = ""

    @staticmethod
    def _anchor(n: Node) -> bool:
        return _reduce_axes(n) is not None

    @staticmethod
    def _detail(norm: Node) -> str:
        return f"axis {norm.attr('axis')}"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        changed = False
        uses = Uses(g)
        gone: set[int] = set()  # ids of nodes an earlier rewrite replaced
        for n in list(g.nodes):
            if id(n) in gone or not self._anchor(n):
                continue
            m = self._match(g, n, uses)
            if m is None:
                continue
            nodes, norm = m
            gone |= {id(k) for k in nodes}
            replace_nodes(g, nodes, [norm])
            ctx.logger.verbose(f"Recognised {self.what} {norm.name} ({self._detail(norm)}) from {len(nodes)} nodes: "
                               f"{', '.join(k.name for k in nodes)}")
            changed = True
            uses.refresh()
        return changed

    @staticmethod
    def _match(g: Graph, mean: Node, uses: Uses) -> tuple[list[Node], Node] | None:
        raise NotImplementedError


class RecogniseLayerNorm(_RecogniseNorm):
    """ReduceMean / Sub / Pow / ReduceMean / Add / Sqrt / Div (/ Mul / Add) -> one LayerNormalization."""

    name = "layernorm recognition"
    what = "LayerNorm"

    @staticmethod
    def _match(g: Graph, mean: Node, uses: Uses) -> tuple[list[Node], Node] | None:
        x = mean.inputs[0]
        axis = _trailing(_reduce_axes(mean), x.type.rank)
        if axis is None or not runtime(x) or x.type.dtype is None or not x.type.dtype.is_float:
            return None
        sub = _only(uses, mean.outputs[0], "Sub")
        if sub is None or list(sub.inputs) != [x, mean.outputs[0]]:
            return None
        d = sub.outputs[0]
        readers = uses.of(d)
        if uses.is_output(d) or len(readers) not in (2, 3):
            return None
        div = next((r for r in readers if is_op(r, "Div") and list(r.inputs)[0] is d), None)
        sq = next((r for r in readers if r is not div), None)
        if div is None or sq is None:
            return None
        if is_op(sq, "Pow") and list(sq.inputs)[0] is d and _close(sq.inputs[1], 2.0) and len(readers) == 2:
            pass
        elif not (is_op(sq, "Mul") and list(sq.inputs) == [d, d] and len(readers) == 3):
            return None
        var = _only(uses, sq.outputs[0], "ReduceMean")
        if var is None or _trailing(_reduce_axes(var), x.type.rank) != axis:
            return None
        add = _only(uses, var.outputs[0], "Add")
        eps = None if add is None else _operands(add, var.outputs[0])
        e = scalar(eps)
        sqrt = None if add is None else _only(uses, add.outputs[0], "Sqrt")
        if e is None or sqrt is None or not 0.0 <= e < 1.0 or uses.only(sqrt.outputs[0]) is not div \
                or list(div.inputs) != [d, sqrt.outputs[0]]:
            return None
        nodes = [mean, sub, sq, var, add, sqrt, div]
        out = div.outputs[0]
        dt = x.type.dtype.torch
        norm = x.type.shape[axis:] if x.type.shape is not None else None
        if norm is None or not all(isinstance(k, int) for k in norm):
            return None
        gamma, beta = torch.ones(norm, dtype=dt), None  # type: ignore[arg-type]
        m = _affine(out, axis, x, uses, "Mul")
        if m is not None:
            nodes.append(m[0])
            gamma, out = m[1].to(dt), m[0].outputs[0]
            b = _affine(out, axis, x, uses, "Add")
            if b is not None:
                nodes.append(b[0])
                beta, out = b[1].to(dt), b[0].outputs[0]
        name = g.unique_name(f"{mean.name}_layernorm")
        inputs = [x, g.constant(f"{name}_scale", gamma)]
        if beta is not None:
            inputs.append(g.constant(f"{name}_bias", beta))
        ln = Node("LayerNormalization", inputs, [out], {"axis": axis, "epsilon": float(e)}, name=name,
                  opset=LAYERNORM_OPSET)
        return nodes, ln


RMSNORM_OPSET = 23        # the first ai.onnx opset with RMSNormalization


class RecogniseRMSNorm(_RecogniseNorm):
    """Pow(x, 2) (or x * x) / ReduceMean / Add(eps) / Sqrt, then x / sqrt, x * Reciprocal(sqrt) or x * (1 / sqrt)
    (/ Mul by a constant over the normalized dims) -> one RMSNormalization (Llama, T5, Mistral, Qwen exports)."""

    name = "rmsnorm recognition"
    what = "RMSNorm"

    @staticmethod
    def _match(g: Graph, var: Node, uses: Uses) -> tuple[list[Node], Node] | None:
        sq = var.inputs[0].producer if var.inputs[0] is not None else None
        if sq is None or uses.only(sq.outputs[0]) is not var or uses.is_output(sq.outputs[0]):
            return None
        if is_op(sq, "Pow") and _close(sq.inputs[1], 2.0):
            x = sq.inputs[0]
        elif is_op(sq, "Mul") and len(sq.inputs) == 2 and sq.inputs[0] is sq.inputs[1]:
            x = sq.inputs[0]
        else:
            return None
        axis = _trailing(_reduce_axes(var), x.type.rank if x is not None else None)
        if x is None or axis is None or not runtime(x) or x.type.dtype is None or not x.type.dtype.is_float:
            return None
        add = _only(uses, var.outputs[0], "Add")
        e = None if add is None else scalar(_operands(add, var.outputs[0]))
        sqrt = None if add is None else _only(uses, add.outputs[0], "Sqrt")
        if e is None or sqrt is None or not 0.0 <= e < 1.0:
            return None
        nodes = [sq, var, add, sqrt]
        r = uses.only(sqrt.outputs[0])
        if is_op(r, "Div") and list(r.inputs) == [x, sqrt.outputs[0]]:
            nodes.append(r)
            out = r.outputs[0]
        else:
            if is_op(r, "Reciprocal"):
                inv = r
            elif is_op(r, "Div") and r.inputs[1] is sqrt.outputs[0] and _close(r.inputs[0], 1.0):
                inv = r
            else:
                return None
            mul = _only(uses, inv.outputs[0], "Mul")
            if mul is None or _operands(mul, inv.outputs[0]) is not x:
                return None
            nodes += [inv, mul]
            out = mul.outputs[0]
        if any(uses.is_output(k.outputs[0]) for k in nodes[:-1]):
            return None
        dt = x.type.dtype.torch
        norm = x.type.shape[axis:] if x.type.shape is not None else None
        if norm is None or not all(isinstance(k, int) for k in norm):
            return None
        gamma = torch.ones(norm, dtype=dt)  # type: ignore[arg-type]
        m = _affine(out, axis, x, uses, "Mul")
        if m is not None:
            nodes.append(m[0])
            gamma, out = m[1].to(dt), m[0].outputs[0]
        name = g.unique_name(f"{var.name}_rmsnorm")
        rms = Node("RMSNormalization", [x, g.constant(f"{name}_scale", gamma)], [out],
                   {"axis": axis, "epsilon": float(e)}, name=name, opset=RMSNORM_OPSET)
        return nodes, rms


class RecogniseGroupNorm(_RecogniseNorm):
    """Reshape to [N, G, -1] / InstanceNormalization / Reshape back (/ per-channel Mul / Add) -> one
    GroupNormalization: three layers and two copies (a channels-last input reshaped to rows) become one
    normalization read in the input's own layout. Instance normalization of the [N, G, C/G * spatial] view is
    group normalization of x by definition; the instance scale and bias (per group) and the affine after it
    (per channel) fold into one per-channel scale and bias."""

    name = "groupnorm recognition"
    what = "GroupNorm"

    @staticmethod
    def _anchor(n: Node) -> bool:
        return is_op(n, "InstanceNormalization")

    @staticmethod
    def _detail(norm: Node) -> str:
        return f"{norm.attr('num_groups')} groups"

    @staticmethod
    def _match(g: Graph, inst: Node, uses: Uses) -> tuple[list[Node], Node] | None:
        r1 = inst.inputs[0].producer if inst.inputs and inst.inputs[0] is not None else None
        if not is_op(r1, "Reshape") or uses.only(r1.outputs[0]) is not inst or len(inst.outputs) != 1:
            return None
        x = r1.inputs[0]
        shape = x.type.shape if x is not None else None
        if x is None or not runtime(x) or shape is None or len(shape) < 3 or not isinstance(shape[1], int) \
                or x.type.dtype is None or not x.type.dtype.is_float:
            return None
        target = _reshape_target(r1)
        if target is None or len(target[0]) != 3:
            return None
        (t0, groups, rest), allowzero = target
        channels = int(shape[1])
        if rest != -1 or groups <= 0 or channels % groups or not (
                (t0 == 0 and not allowzero) or (isinstance(shape[0], int) and t0 == shape[0])):
            return None
        s, b = const(inst.input(1)), const(inst.input(2))
        if s is None or b is None or tuple(s.shape) != (groups,) or tuple(b.shape) != (groups,) \
                or not s.dtype.is_floating_point or not b.dtype.is_floating_point:
            return None
        r2 = uses.only(inst.outputs[0])
        if not is_op(r2, "Reshape") or not same_shape(r2.outputs[0].type, x.type):
            return None
        nodes = [r1, inst, r2]
        out = r2.outputs[0]
        per = channels // groups
        scale = s.double().repeat_interleave(per)
        bias = b.double().repeat_interleave(per)
        for op in ("Mul", "Add"):
            n = _only(uses, out, op)
            c = None if n is None else const(_operands(n, out))
            v = None if c is None or not c.dtype.is_floating_point else per_channel(c, len(shape), channels)
            if v is None:
                continue
            if op == "Mul":
                scale, bias = scale * v.double(), bias * v.double()
            else:
                bias = bias + v.double()
            nodes.append(n)  # type: ignore[arg-type]
            out = n.outputs[0]  # type: ignore[union-attr]
        if any(uses.is_output(k.outputs[0]) for k in nodes[:-1]):
            return None
        dt = x.type.dtype.torch
        name = g.unique_name(f"{inst.name}_groupnorm")
        norm = Node("GroupNormalization", [x, g.constant(f"{name}_scale", scale.to(dt)),
                                           g.constant(f"{name}_bias", bias.to(dt))], [out],
                    {"num_groups": groups, "epsilon": float(inst.attr("epsilon", 1e-5))}, name=name,
                    opset=GROUPNORM_OPSET)
        return nodes, norm


SHUFFLE_PERM = [0, 2, 1, 3, 4]
_Dim = tuple[int | None, Dim]  # (index of the shuffle input's dim it is, or None; its size: int, symbol or None)


def _reshape_target(n: Node) -> tuple[list[int], bool] | None:
    """(constant target, allowzero) of a Reshape, None when the target is a run-time value."""
    if n.opset < 5:
        return None
    c = const(n.input(1))
    if c is None or c.dim() != 1 or c.dtype != torch.int64:
        return None
    return [int(t) for t in c.tolist()], bool(int(n.attr("allowzero", 0)))


def _same(a: _Dim, b: _Dim) -> bool:
    """Two dims proven equal: the same dim of the shuffle input, or equal static sizes or symbols."""
    return (a[0] is not None and a[0] == b[0]) or (a[1] is not None and a[1] == b[1])


def _reshapes_to(target: list[int], allowzero: bool, have: list[_Dim], want: list[_Dim]) -> bool:
    """Whether Reshape(`have`-shaped input, target) is proven to give the dims `want`: each entry copies an
    equal input dim (0), names an equal static size, or is the one -1 (then the product fixes it)."""
    if len(target) != len(want) or target.count(-1) > 1:
        return False
    for p, t in enumerate(target):
        if t == 0 and not allowzero:
            if p >= len(have) or not _same(have[p], want[p]):
                return False
        elif t >= 0 and want[p][1] != t:
            return False
        elif t < -1:
            return False
    return True


class RecogniseChannelShuffle(Pass):
    """Reshape [N, g, C/g, H, W] -> Transpose [0, 2, 1, 3, 4] -> Reshape [N, C, H, W] -> one kiln ChannelShuffle."""

    name = "channel shuffle recognition"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        changed = False
        uses = Uses(g)
        for t in list(g.nodes):
            if not is_op(t, "Transpose") or t.attr("perm") != SHUFFLE_PERM:
                continue
            m = self._match(t, uses)
            if m is None:
                continue
            nodes, x, y, groups = m
            node = Node("ChannelShuffle", [x], [y], {"groups": groups},
                        name=g.unique_name(f"{t.name}_channel_shuffle"), domain="kiln", opset=1)
            replace_nodes(g, nodes, [node])
            ctx.logger.verbose(f"Recognised channel shuffle {node.name} ({groups} groups of {x.type.shape[1]} "  # type: ignore[index]
                               f"channels) from {', '.join(k.name for k in nodes)}")
            cat = self._concat_of_groups(x, groups, uses) if ctx.device == "cpu" else None
            if cat is not None:
                # the shuffle reads the Concat's inputs, one group each: the Concat's copy is gone
                node.inputs = list(cat.inputs)
                remove_node(g, cat)
                ctx.logger.verbose(f"Channel shuffle {node.name} reads the {groups} inputs of {cat.name}")
            changed = True
            uses.refresh()
        return changed

    @staticmethod
    def _concat_of_groups(x: Value, groups: int, uses: Uses) -> Node | None:
        """The Concat on the channel axis making x from `groups` run-time inputs of x.shape[1] / groups channels each
        (ShuffleNet's two branches), where nothing else reads x; else None."""
        cat = x.producer
        if not is_op(cat, "Concat") or len(cat.inputs) != groups or uses.only(x) is None \
                or uses.is_output(x):  # type: ignore[union-attr]
            return None
        axis = int(cat.attr("axis", 0))  # type: ignore[union-attr]
        c = x.type.shape[1]  # type: ignore[index]
        if axis not in (1, -3) or not all(runtime(v) and v.type.shape is not None and len(v.type.shape) == 4
                                          and v.type.shape[1] == c // groups and v.type.dtype == x.type.dtype
                                          for v in cat.inputs):  # type: ignore[union-attr]
            return None
        first = cat.inputs[0].type.shape  # type: ignore[union-attr]
        same = all(v.type.shape == first for v in cat.inputs)  # type: ignore[union-attr]
        return cat if same and all(isinstance(d, (int, str)) for d in first) else None  # type: ignore[union-attr]

    @staticmethod
    def _match(t: Node, uses: Uses) -> tuple[list[Node], Value, Value, int] | None:
        r1 = t.inputs[0].producer if t.inputs and t.inputs[0] is not None else None
        r2 = _only(uses, t.outputs[0], "Reshape")
        if r1 is None or r2 is None or not is_op(r1, "Reshape") or uses.only(r1.outputs[0]) is not t \
                or r2.inputs[0] is not t.outputs[0]:
            return None
        x = r1.inputs[0]
        shape = x.type.shape
        if not runtime(x) or shape is None or len(shape) != 4 or not isinstance(shape[1], int) or shape[1] < 1:
            return None
        a, b = _reshape_target(r1), _reshape_target(r2)
        if a is None or b is None or len(a[0]) != 5:
            return None
        c = shape[1]
        groups = a[0][1] if a[0][1] > 0 else (c // a[0][2] if a[0][2] > 0 and c % a[0][2] == 0 else 0)
        if groups < 1 or c % groups:
            return None
        dims: list[_Dim] = [(k, d) for k, d in enumerate(shape)]
        split = [dims[0], (None, groups), (None, c // groups), dims[2], dims[3]]
        swapped = [dims[0], (None, c // groups), (None, groups), dims[2], dims[3]]
        if not _reshapes_to(*a, dims, split) or not _reshapes_to(*b, swapped, dims):
            return None
        return [r1, t, r2], x, r2.outputs[0], groups
