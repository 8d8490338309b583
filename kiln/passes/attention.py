"""Attention fusion: scaled dot-product attention as exporters write it -> one ONNX ``Attention`` node.

Exporters (torch.onnx's TorchScript and dynamo paths, transformers' eager and SDPA attention, timm) write
attention as separate layers; each runs as its own kernel and the [B, H, Sq, Skv] scores make four trips
through memory. The pattern recognised, ending at a Softmax over the last axis:

    s = MatMul(q [* a], kt [* b]) [* c | / c]       a, b, c one-element constants (Mul or Div)
    p = Softmax(s [+ bias], axis=-1)                bias: additive float mask, last dim = Skv
    p = Where(IsNaN(p), 0, p)                       optional: the exporters' NaN guard
    y = MatMul(p, v)

q [B, H, Sq, D], kt [B, Hkv, D, Skv] (K transposed), v [B, Hkv, Skv, Dv]. The node is ONNX's own
Attention (opset 23; kiln.ops.attention: its reference is the unfused fallback tactic) with the product
of the scales as `scale`, K as kt's producer Transpose with its last two axes swapped back (or a new
Transpose), and the bias as `attn_mask`. Where q, kt and v are the usual head split of [B, S, H*D]
projections (Reshape to [B, S, H, D], Transpose) and y is merged back (Transpose, Reshape to
[B, S, H*Dv]), the node takes the projections and produces the merged output directly (Attention's 3-D
form with q_num_heads / kv_num_heads): no head-split copy remains, the kernels address heads by strides.

Grouped-query attention written with transformers' repeat_kv (K and V heads unsqueezed, expanded and reshaped
to the Q head count) takes the K and V heads before the repeat: Attention repeats them itself (`_unrepeated`).

Every intermediate must be read only inside the pattern and must not be a graph output. One difference is
deliberate: a row whose scores are all -inf (every key masked) gives zeros, where the unfused graph without
the NaN guard gives NaN - Attention's semantics, and what the guarded exports compute.
"""
from __future__ import annotations

import math

from kiln.ir.graph import Graph, Node, Value, is_op
from kiln.ir.types import Dim, TensorType
from kiln.passes.base import Pass, PassContext
from kiln.passes.rewrite import Uses, columns_slice, replace_nodes, restore_order, runtime, scalar

ATTENTION_OPSET = 23  # the first ai.onnx opset with Attention


def _float4(v: Value | None) -> bool:
    return v is not None and v.type.rank == 4 and v.type.dtype is not None and v.type.dtype.is_float


def _scaled(v: Value, reader: Node, uses: Uses) -> tuple[Value, float, list[Node]]:
    """(x, c, nodes) for v = x * c or x / c (c a one-element constant, v read only by `reader`), else (v, 1, [])."""
    p = v.producer
    if not is_op(p, "Mul", "Div") or uses.only(v) is not reader or len(p.inputs) != 2:  # type: ignore[union-attr]
        return v, 1.0, []
    a, b = p.inputs  # type: ignore[union-attr]
    for x, c in ((a, b), (b, a)) if is_op(p, "Mul") else ((a, b),):
        s = scalar(c)
        if s is not None and runtime(x) and c.type.rank is not None and x.type.rank is not None \
                and c.type.rank <= x.type.rank and math.isfinite(s) and s != 0.0:
            return x, (s if is_op(p, "Mul") else 1.0 / s), [p]  # type: ignore[list-item]
    return v, 1.0, []


def _same(a: Dim, b: Dim) -> bool:
    return a is not None and a == b


def _bias_fits(bias: Value, scores: TensorType) -> bool:
    """An additive mask that broadcasts to the scores without growing them, over all of Skv."""
    t = bias.type
    if t.shape is None or scores.shape is None or t.dtype is None or not t.dtype.is_float or t.rank > 4:  # type: ignore[operator]
        return False
    for d, s in zip(reversed(t.shape), reversed(scores.shape)):
        if not (d == 1 or _same(d, s)):
            return False
    return _same(t.shape[-1], scores.shape[-1]) if t.shape else False


Heads = tuple[Value, int, int, int, int]
"""(x [B, S, C], first column, end column, H, D): a head split of columns [first, end) of x."""


def _unpack(t: Node | None, perm: list[int], rank: int) -> tuple[Value, Value] | None:
    """(x, y) for t = Transpose(y = Reshape(x [B, S, C]) of the given rank, perm), else None."""
    if not is_op(t, "Transpose") or list(t.attr("perm") or []) != perm:  # type: ignore[union-attr]
        return None
    r = t.inputs[0].producer  # type: ignore[union-attr]
    if not is_op(r, "Reshape") or not runtime(r.inputs[0]):  # type: ignore[union-attr]
        return None
    x, y = r.inputs[0], r.outputs[0]  # type: ignore[union-attr]
    xs, ys = x.type.shape, y.type.shape
    if xs is None or ys is None or len(xs) != 3 or len(ys) != rank or not isinstance(xs[2], int):
        return None
    if not (_same(xs[0], ys[0]) and _same(xs[1], ys[1]) and all(isinstance(k, int) and k > 0 for k in ys[2:])):
        return None
    return (x, y) if math.prod(ys[2:]) == xs[2] else None  # type: ignore[arg-type]


def _swapped_back(kt: Value) -> Value | None:
    """k where kt = Reshape(Transpose(Reshape(k [B, H, S, D] -> [B*H, S, D]), [0, 2, 1]) -> [B, H, D, S]): the
    dynamo exporter's k.transpose(-2, -1) through 3-D (equal to a Transpose [0, 1, 3, 2] of k), else None."""
    r2 = kt.producer
    if not is_op(r2, "Reshape"):
        return None
    t = r2.inputs[0].producer  # type: ignore[union-attr]
    if not is_op(t, "Transpose") or list(t.attr("perm") or []) != [0, 2, 1]:  # type: ignore[union-attr]
        return None
    r1 = t.inputs[0].producer  # type: ignore[union-attr]
    if not is_op(r1, "Reshape"):
        return None
    k = r1.inputs[0]  # type: ignore[union-attr]
    ks, s1, s2 = k.type.shape, r1.outputs[0].type.shape, kt.type.shape  # type: ignore[union-attr]
    if ks is None or s1 is None or s2 is None or len(ks) != 4 or len(s1) != 3 or len(s2) != 4:
        return None
    same = all(_same(a, b) for a, b in ((s1[1], ks[2]), (s1[2], ks[3]), (s2[0], ks[0]), (s2[1], ks[1]),
                                        (s2[2], ks[3]), (s2[3], ks[2])))
    return k if same and runtime(k) else None


def _unrepeated(v: Value) -> tuple[Value, int] | None:
    """(x, r) where v [B, Hkv*r, S, D] = Reshape(Expand(x with a size-1 axis inserted at 2 -> [B, Hkv, r, S, D])):
    transformers' repeat_kv for grouped-query attention, i.e. x's heads each repeated r times in a row (what
    Attention does itself with fewer K/V heads than Q heads). Proven from the types alone: the Expand grows only
    the inserted axis and the Reshape merges it into the heads, so the element order is repeat_interleave's."""
    r = v.producer
    if not is_op(r, "Reshape") or v.type.shape is None or len(v.type.shape) != 4:
        return None
    e = r.inputs[0]  # type: ignore[union-attr]
    ep = e.producer
    if not is_op(ep, "Expand") or e.type.shape is None or len(e.type.shape) != 5:
        return None
    u = ep.inputs[0]  # type: ignore[union-attr]
    up = u.producer
    if not is_op(up, "Unsqueeze", "Reshape") or u.type.shape is None or len(u.type.shape) != 5:
        return None
    x = up.inputs[0]  # type: ignore[union-attr]
    xs, us, es, vs = x.type.shape, u.type.shape, e.type.shape, v.type.shape
    if xs is None or len(xs) != 4 or not runtime(x) or us[2] != 1:
        return None
    rep, hkv = es[2], xs[1]
    if not (isinstance(rep, int) and rep > 1 and isinstance(hkv, int) and vs[1] == hkv * rep):
        return None
    inserted = all(_same(a, b) for a, b in zip(us[:2] + us[3:], xs))
    expanded = all(_same(a, b) for a, b in zip(es[:2] + es[3:], xs))
    merged = _same(vs[0], xs[0]) and _same(vs[2], xs[2]) and _same(vs[3], xs[3])
    return (x, rep) if inserted and expanded and merged else None


def _heads(v: Value, transposed: bool) -> Heads | None:
    """How v ([B, H, S, D], or [B, H, D, S] when `transposed`) splits heads out of a [B, S, C] tensor:
    Transpose(Reshape(x -> [B, S, H, D])), or one of N equal parts of a packed projection (timm's qkv:
    Reshape(x -> [B, S, N, H, D]), Transpose [2, 0, 3, 1, 4], Split on axis 0, Squeeze), transposed by a
    Transpose [0, 1, 3, 2] when `transposed`. None otherwise."""
    t = v.producer
    u = _unpack(t, [0, 2, 3, 1] if transposed else [0, 2, 1, 3], 4)
    if u is not None:
        x, y = u
        return x, 0, int(x.type.shape[2]), int(y.type.shape[2]), int(y.type.shape[3])  # type: ignore[index, arg-type]
    if transposed:
        k = _swapped_back(v)
        if k is not None:
            return _heads(k, False)
        if not is_op(t, "Transpose") or list(t.attr("perm") or []) != [0, 1, 3, 2]:  # type: ignore[union-attr]
            return None
        return _heads(t.inputs[0], False)  # type: ignore[union-attr]
    part = _packed_part(t)
    if part is None:
        return None
    packed, i, parts = part
    u = _unpack(packed.producer, [2, 0, 3, 1, 4], 5)
    if u is None:
        return None
    x, y = u
    n, h, d = (int(k) for k in y.type.shape[2:])  # type: ignore[index, arg-type]
    if not 0 <= i < n or parts not in (None, n):
        return None
    return x, i * h * d, (i + 1) * h * d, h, d


def _packed_part(sq: Node | None) -> tuple[Value, int, int | None] | None:
    """(p, i, parts) where sq = Squeeze(axis 0) of part i of p along axis 0, taken by a Split into `parts` equal
    parts of one (timm, torch.unbind) or by a Slice [i, i + 1) (Paddle's qkv[0], an opset-11 Squeeze with an axes
    attribute; parts None), else None."""
    if not is_op(sq, "Squeeze"):
        return None
    axes = sq.inputs[1].const.reshape(-1).tolist() if sq.input(1) is not None and sq.inputs[1].const is not None \
        else (None if sq.input(1) is not None else list(sq.attr("axes", None) or []))  # type: ignore[union-attr]
    if axes != [0]:
        return None
    part = sq.inputs[0]  # type: ignore[union-attr]
    sp = part.producer
    if is_op(sp, "Split") and int(sp.attr("axis", 0)) == 0:  # type: ignore[union-attr]
        sizes = sp.input(1)  # type: ignore[union-attr]
        if sizes is not None and (sizes.const is None or set(sizes.const.reshape(-1).tolist()) != {1}):
            return None
        i = next(k for k, o in enumerate(sp.outputs) if o is part)  # type: ignore[union-attr]
        return sp.inputs[0], i, len(sp.outputs)  # type: ignore[union-attr]
    if is_op(sp, "Slice") and sp.opset >= 10:  # type: ignore[union-attr]
        args = [sp.input(k) for k in range(1, 5)]  # type: ignore[union-attr]
        if any(a is not None and a.const is None for a in args) or args[0] is None or args[1] is None:
            return None
        starts, ends = (a.const.reshape(-1).tolist() for a in args[:2])  # type: ignore[union-attr]
        axes_s = args[2].const.reshape(-1).tolist() if args[2] is not None else [0]  # type: ignore[union-attr]
        steps = args[3].const.reshape(-1).tolist() if args[3] is not None else [1]  # type: ignore[union-attr]
        if len(starts) != 1 or axes_s != [0] or steps != [1] or starts[0] < 0 or ends[0] != starts[0] + 1:
            return None
        return sp.inputs[0], int(starts[0]), None  # type: ignore[union-attr]
    return None


def _merged(y: Value, uses: Uses) -> tuple[list[Node], Value, list[Node]] | None:
    """([Transpose, Reshape], z, others) where y [B, H, S, Dv] is only merged into z [B, S, H*Dv] (other
    Reshapes of the transposed value, by constant targets without 0 entries, can read z instead), else None."""
    t = uses.only(y)
    if not is_op(t, "Transpose") or list(t.attr("perm") or []) != [0, 2, 1, 3]:  # type: ignore[union-attr]
        return None
    ty = t.outputs[0]  # type: ignore[union-attr]
    readers = uses.of(ty)
    if uses.is_output(ty) or not readers or not all(is_op(r, "Reshape") and r.inputs[0] is ty for r in readers):
        return None
    ys = y.type.shape
    if ys is None or not all(isinstance(k, int) for k in ys[1::2]):
        return None
    for r in readers:
        zs = r.outputs[0].type.shape
        if zs is not None and len(zs) == 3 and _same(zs[0], ys[0]) and _same(zs[1], ys[2]) \
                and zs[2] == ys[1] * ys[3]:  # type: ignore[operator]
            others = [o for o in readers if o is not r]
            if all(o.input(1) is not None and o.inputs[1].const is not None and bool((o.inputs[1].const != 0).all())
                   for o in others):
                return [t, r], r.outputs[0], others  # type: ignore[list-item]
    return None


def _columns(g: Graph, h: Heads, name: str, new: list[Node]) -> Value:
    """The columns [first, end) of h's tensor: itself, or a constant Slice of its last axis (a view)."""
    x, first, end = h[0], h[1], h[2]
    if first == 0 and end == x.type.shape[2]:  # type: ignore[index]
        return x
    shape = x.type.shape[:2] + (end - first,)  # type: ignore[index]
    y = g.new_value(name, TensorType(x.type.dtype, shape))
    new.append(columns_slice(g, x, first, end, y, f"{name}_slice"))
    return y


class FuseAttention(Pass):
    """MatMul / scale / mask Add / Softmax / NaN guard / MatMul -> one Attention (module doc)."""

    name = "attention fusion"

    def run(self, g: Graph, ctx: PassContext) -> bool:
        changed = False
        uses = Uses(g)
        gone: set[int] = set()
        for n in list(g.nodes):
            if id(n) in gone or not is_op(n, "Softmax"):
                continue
            m = self._match(g, n, uses)
            if m is None:
                continue
            old, new = m
            gone |= {id(k) for k in old}
            replace_nodes(g, old, new)
            attn = new[-1]
            form = "3-D, heads by strides" if attn.attr("q_num_heads") else "4-D"
            ctx.logger.verbose(f"Fused attention {attn.name} ({form}, scale {attn.attr('scale'):.6g}, "
                               f"{'additive mask' if len(attn.inputs) > 3 else 'no mask'}) from {len(old)} layers")
            changed = True
            uses.refresh()
        if changed:
            restore_order(g)  # Reshapes rewired to a merged output may stand before it
        return changed

    @staticmethod
    def _match(g: Graph, sm: Node, uses: Uses) -> tuple[list[Node], list[Node]] | None:
        logits = sm.inputs[0]
        rank = logits.type.rank
        if rank != 4 or int(sm.attr("axis", -1 if sm.opset >= 13 else 1)) not in (-1, 3):
            return None
        nodes: list[Node] = [sm]
        bias: Value | None = None
        s = logits
        add = s.producer
        if is_op(add, "Add") and uses.only(s) is sm and len(add.inputs) == 2:  # type: ignore[union-attr]
            for a, b in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):  # type: ignore[union-attr]
                x, _, _ = _scaled(a, add, uses)  # type: ignore[arg-type]
                if is_op(x.producer, "MatMul") and b is not None and _bias_fits(b, a.type):
                    nodes.append(add)  # type: ignore[arg-type]
                    bias, s = b, a
                    break
            else:
                return None
        reader = nodes[-1]
        s0, c, scl = _scaled(s, reader, uses)
        nodes += scl
        mm = s0.producer
        if not is_op(mm, "MatMul") or uses.only(s0) is not (scl[0] if scl else reader):
            return None
        nodes.append(mm)  # type: ignore[arg-type]
        q, a, qn = _scaled(mm.inputs[0], mm, uses)  # type: ignore[union-attr, arg-type]
        kt, b, kn = _scaled(mm.inputs[1], mm, uses)  # type: ignore[union-attr, arg-type]
        nodes += qn + kn
        scale = a * b * c
        # the probabilities: Softmax -> [IsNaN / Where guard] -> MatMul
        p = sm.outputs[0]
        readers = uses.of(p)
        if uses.is_output(p):
            return None
        if len(readers) == 2 and {r.op_type for r in readers} == {"IsNaN", "Where"}:
            isnan = next(r for r in readers if r.op_type == "IsNaN")
            where = next(r for r in readers if r.op_type == "Where")
            zero = scalar(where.inputs[1])
            if uses.only(isnan.outputs[0]) is not where or list(where.inputs[::2]) != [isnan.outputs[0], p] \
                    or zero != 0.0 or len(where.inputs) != 3:
                return None
            nodes += [isnan, where]
            p = where.outputs[0]
        mm2 = uses.only(p)
        if not is_op(mm2, "MatMul") or mm2.inputs[0] is not p:  # type: ignore[union-attr]
            return None
        nodes.append(mm2)  # type: ignore[arg-type]
        v, y = mm2.inputs[1], mm2.outputs[0]  # type: ignore[union-attr]
        if not (_float4(q) and _float4(kt) and _float4(v) and _float4(y)):
            return None
        dt = q.type.dtype
        if kt.type.dtype != dt or v.type.dtype != dt or (bias is not None and bias.type.dtype != dt):
            return None
        qs, ks, vs = q.type.shape, kt.type.shape, v.type.shape
        if not (_same(qs[3], ks[2]) and _same(ks[3], vs[2])):  # type: ignore[index]
            return None
        name = g.unique_name(f"{sm.name}_attention")
        attrs = {"scale": float(scale), "is_causal": 0, "softmax_precision": 1}  # float32 softmax
        # 3-D form: the projections in, the merged heads out
        hq, hk, hv, out = _heads(q, False), _heads(kt, True), _heads(v, False), _merged(y, uses)
        if hq and hk and hv and out and hk[3] == hv[3] and hk[4] == hq[4] and hq[3] % hk[3] == 0:
            nodes += out[0]
            for r in out[2]:  # a Reshape of the merged heads reads them in the same element order
                r.inputs[0] = out[1]
            new3: list[Node] = []
            ins = [_columns(g, h, f"{name}_{w}", new3) for h, w in ((hq, "q"), (hk, "k"), (hv, "v"))]
            attn = Node("Attention", ins + ([bias] if bias is not None else []), [out[1]],
                        {**attrs, "q_num_heads": hq[3], "kv_num_heads": hk[3]}, name=name, opset=ATTENTION_OPSET)
            return nodes, new3 + [attn]
        # 4-D form: K is kt with its last two axes swapped back
        new: list[Node] = []
        t = kt.producer
        back = _swapped_back(kt)
        if back is not None:
            src, perm = back, [0, 1, 2, 3]
        elif is_op(t, "Transpose") and t.attr("perm") is not None and sorted(t.attr("perm")) == [0, 1, 2, 3]:  # type: ignore[union-attr]
            perm = list(t.attr("perm"))  # type: ignore[union-attr]
            src, perm = t.inputs[0], perm[:2] + [perm[3], perm[2]]  # type: ignore[union-attr]
        else:
            src, perm = kt, [0, 1, 3, 2]
        rk, rv = (_unrepeated(src) if perm == [0, 1, 2, 3] else None), _unrepeated(v)
        if rk is not None and rv is not None and rk[1] == rv[1]:  # grouped-query attention: K/V heads as they are
            src, v = rk[0], rv[0]
        if perm == [0, 1, 2, 3]:
            k = src
        else:
            shape = tuple(src.type.shape[i] for i in perm) if src.type.shape is not None else None  # type: ignore[union-attr, index]
            k = g.new_value(f"{name}_k", TensorType(src.type.dtype, shape))  # type: ignore[union-attr]
            new.append(Node("Transpose", [src], [k], {"perm": perm}, name=g.unique_name(f"{name}_k_transpose"),
                            opset=13))
        attn = Node("Attention", [q, k, v] + ([bias] if bias is not None else []), [y], attrs, name=name,
                    opset=ATTENTION_OPSET)
        return nodes, new + [attn]
