"""Detection post-processing: NonMaxSuppression.

Greedy NMS exactly as ONNX (and its reference implementation) defines it, for every (batch, class)
row at once, in memory linear in the box count -- never the (M, M) IoU matrix. Each row's candidates
(score above score_threshold, when given) are sorted by score, ties keeping the lower box index
first. Blocks of `b` ranks of every unfinished row are then decided in turn:

1. a candidate is suppressed when a box already kept in its row overlaps it by more than
   iou_threshold;
2. the block's survivors are resolved in greedy order on the sparse graph of their overlapping pairs:
   keep = survivors overlapped by no kept, higher-ranked survivor, iterated to its unique fixed point
   (Jacobi sweeps; the number of sweeps is the longest suppression chain inside the block);
3. the kept boxes join their row's kept set, which is held sorted by x_min, and a row stops once it
   holds max_output_boxes_per_class boxes or runs out of candidates.

Pairs are only tested where two boxes can overlap by more than the threshold: the other set is sorted
by x_min and a box at [x0, x1) of width w is compared with those whose x_min lies in a window. The
window is [x0 - W, x1) with W the widest box of the other set; for 0 < iou_threshold = t < 1 it is
[x0 - (1 - t) W, x1 - t w) with W <= w / t, as IoU > t implies that the x-overlap exceeds t times
either width (so their ratio lies in (t, 1/t)). The bounds carry a relative slack far above the
float error of the IoU, and are only used where areas and sides are normal floats. The windows of
T consecutive queries (in x_min order) are evaluated as one dense T x W tile, T chosen per call to
minimise the work; tiles are evaluated in chunks of about _PAIR_CHUNK pairs, a block's overlap graph
holds at most _BLOCK_PAIRS edges and a row's kept set at most one entry per candidate: the peak is
O(boxes + _PAIR_CHUNK + _BLOCK_PAIRS) -- about 20-35 MB at SSDlite's sizes (27,000 boxes in one
class, or 91 classes of 3,234), where the (M, M) matrix took 24 GB.

Boxes of no positive area (or NaN) never suppress and are never suppressed -- the reference's IoU
test is false for them -- so they are kept, counting towards max_output_boxes_per_class, without an
IoU test; an IoU above a threshold >= 1 (or NaN) cannot happen, so then every candidate is kept. A
pair's IoU is computed with the reference's own float operations.

`rank_candidates` (input checks, score filter, ranking, corner columns) and `Ranked.selected` (the
output rows) are shared with the CPU tactic (kiln/backends/cpu/nms.py), which replaces only the greedy
selection, with a sequential C loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from kiln.errors import UnsupportedOpError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node
from kiln.ir.types import TensorType
from kiln.ops.conv import require_float
from kiln.ops.registry import OpDef, register

Tensor = torch.Tensor

_PAIR_CHUNK = 1 << 18     # candidate pairs whose IoU is evaluated at once
_TILES = (1, 4, 16, 64)   # heights (queries) of the dense tiles tried
_BLOCK_PAIRS = 1 << 20    # bound on rows * b^2 of one block (its pairs, hence its overlap graph's edges)
_MAX_BLOCK = 1024         # at most this many ranks of one row per block
_SLACK = 1e-5             # relative slack of the window bounds (the float IoU is within ~1e-6 of exact)

Cols = list[Tensor]       # x_min, y_min, x_max, y_max, area: same-shaped tensors


def _corners(boxes: Tensor, center: bool) -> Cols:
    """x_min, y_min, x_max, y_max, area of boxes (..., 4), computed as the ONNX reference does."""
    if center:
        xc, yc, w, h = boxes.unbind(-1)
        x0, x1 = xc - w / 2, xc + w / 2
        y0, y1 = yc - h / 2, yc + h / 2
    else:
        a0, b0, a1, b1 = boxes.unbind(-1)  # y1, x1, y2, x2, corners in either order
        x0, x1 = torch.minimum(b0, b1), torch.maximum(b0, b1)
        y0, y1 = torch.minimum(a0, a1), torch.maximum(a0, a1)
    return [c.contiguous() for c in (x0, y0, x1, y1, (x1 - x0) * (y1 - y0))]


def _take(cols: Cols, idx: Tensor) -> Cols:
    return [c.index_select(0, idx) for c in cols]


def _overlap(a: Cols, b: Cols, threshold: float) -> Tensor:
    """Pairwise: IoU of a[i] and b[i] (both of positive area) above threshold, decided by the ONNX
    reference's float operations (its union > 0 test always holds when both areas are positive)."""
    iw = torch.minimum(a[2], b[2]).sub_(torch.maximum(a[0], b[0])).clamp_min_(0)
    ih = torch.minimum(a[3], b[3]).sub_(torch.maximum(a[1], b[1])).clamp_min_(0)
    inter = iw.mul_(ih)
    union = torch.add(a[4], b[4]).sub_(inter)
    return (inter > 0).logical_and_(inter.div_(union) > threshold)


def _tiles(q: Cols, t: Cols, lo: Tensor, hi: Tensor, thr: float) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Dense tiles covering every query's window of targets.

    q, t: columns (ra, nq) and (ra, nt), each row sorted by x_min (entries that must never overlap have
    x_min = +inf); lo, hi: (ra, nq) target window [lo, hi) of each query. Consecutive queries of a row
    are grouped by T (one of _TILES) and each group is tested against the union of its windows, in
    chunks of about _PAIR_CHUNK pairs: yields (qi (k, T), ti (k, W), over (k, T, W)), the flat query and target indices
    and IoU > thr of each pair. Pairs outside a query's own window are tested exactly like the others."""
    ra, nq = (int(d) for d in lo.shape)
    nt = int(t[0].shape[1])
    dev = lo.device
    some = hi > lo
    top = min(_TILES[-1], 1 << max(0, (nq - 1).bit_length()))
    pad = (-nq) % top
    s = torch.nn.functional.pad(torch.where(some, lo, nt), (0, pad), value=nt)
    e = torch.nn.functional.pad(torch.where(some, hi, 0), (0, pad), value=0)
    best = None
    tile = 1
    while True:  # the tile height that minimises pairs plus target reads, (T + 1) * W per tile
        if tile in _TILES:
            w = (e - s).clamp_min_(0)
            cost = int(w.sum().item()) * (tile + 1)
            if best is None or cost < best[0]:
                best = (cost, tile, s, w)
        if tile >= top:
            break
        s, e = torch.minimum(s[:, 0::2], s[:, 1::2]), torch.maximum(e[:, 0::2], e[:, 1::2])
        tile *= 2
    _, tile, s, w = best
    if pad:
        q = [torch.nn.functional.pad(c, (0, pad), value=math.inf) for c in q]
    nqp = nq + pad
    tr, tc = w.nonzero(as_tuple=True)
    if tr.numel() == 0:
        return
    w = w[tr, tc]
    w, o = torch.sort(w, descending=True)
    tr, tc = tr.index_select(0, o), tc.index_select(0, o)
    first = (tr * nqp + tc * tile)[:, None] + torch.arange(tile, device=dev)   # (tiles, T) flat query index
    start = (tr * nt + s[tr, tc])[:, None]
    end = ((tr + 1) * nt - 1)[:, None]
    qf = [c.reshape(-1) for c in q]
    tf = [c.reshape(-1) for c in t]
    widths = w.tolist()
    i = 0
    while i < len(widths):
        wc = widths[i]
        k = max(1, min(len(widths) - i, _PAIR_CHUNK // (tile * wc)))
        qi = first[i:i + k]
        ti = torch.minimum(start[i:i + k] + torch.arange(wc, device=dev), end[i:i + k])
        a = [c.index_select(0, qi.reshape(-1)).view(k, tile, 1) for c in qf]
        b = [c.index_select(0, ti.reshape(-1)).view(k, 1, wc) for c in tf]
        if pad:  # padding queries (x_min = +inf: no overlaps) stand for the row's last query
            qi = torch.div(qi, nqp, rounding_mode="floor") * nq + (qi % nqp).clamp_max_(nq - 1)
        yield qi, ti, _overlap(a, b, thr)
        i += k


def _rounded(v: Tensor, dt: torch.dtype, toward: float, nan: float) -> Tensor:
    """float64 bounds v in dt, rounded outwards (toward +-inf), NaN replaced."""
    v = torch.where(torch.isnan(v), torch.full_like(v, nan), v).to(dt)
    return torch.nextafter(v, torch.full_like(v, toward))


def _windows(x0: Tensor, x1: Tensor, wmax: Tensor, thr: float, ratio: bool,
             dt: torch.dtype) -> tuple[Tensor, Tensor]:
    """x_min bounds (lo, hi) of the boxes that may overlap boxes [x0, x1) by more than thr, where the
    other set's widest box is wmax (broadcast): dt tensors rounded outwards."""
    x0d, x1d = x0.to(torch.float64), x1.to(torch.float64)
    w = (x1 - x0).to(torch.float64)
    wb = wmax.to(torch.float64)
    if ratio:
        wb = torch.minimum(wb, w * ((1 + _SLACK) / thr))
        lo = x0d - wb * ((1 - thr) + _SLACK)
        hi = x1d - w * (thr * (1 - _SLACK))
    else:
        lo = x0d - wb * (1 + _SLACK)
        hi = x1d
    return _rounded(lo, dt, -math.inf, -math.inf), _rounded(hi, dt, math.inf, math.inf)


def _nms(cols: Cols, order: Tensor, counts: Tensor, batch_of_row: Tensor, n: int, limit: int, thr: float,
         mode: str) -> Tensor:
    """Greedy NMS of every row: row * m + rank of the kept candidates, ascending.

    cols: flat (nb * n,) corner/area columns; order: (R, m) box index by rank; counts: (R,) candidates per
    row; mode: 'none' (no pair can be suppressed), 'ratio' (0 < thr < 1 with normal floats) or 'plain'."""
    dev = order.device
    dt = cols[0].dtype
    n_rows, m = int(order.shape[0]), int(order.shape[1])
    inf = torch.tensor(math.inf, dtype=dt, device=dev)
    ratio = mode == "ratio"
    rows = torch.arange(n_rows, device=dev)                       # the unfinished rows
    row_counts = counts
    kept_n = torch.zeros(n_rows, dtype=torch.int64, device=dev)   # kept per row (for the limit)
    # each unfinished row's kept set: positive-area boxes, sorted by x_min, +inf padded
    k_cols: Cols = [torch.empty((n_rows, 0), dtype=dt, device=dev) for _ in range(5)]
    k_n = torch.zeros(n_rows, dtype=torch.int64, device=dev)
    k_wmax = torch.full((n_rows, 1), -math.inf, dtype=dt, device=dev)
    found: list[Tensor] = []
    lo = 0
    while lo < m and rows.numel():
        ra = int(rows.numel())
        b = max(1, min(_MAX_BLOCK, math.isqrt(max(1, _BLOCK_PAIRS // ra)), m - lo))
        hi = lo + b
        valid = torch.arange(lo, hi, device=dev)[None, :] < row_counts[:, None]                # (ra, b)
        flat_idx = (batch_of_row.index_select(0, rows)[:, None] * n + order[rows, lo:hi]).reshape(-1)
        box = [c.view(ra, b) for c in _take(cols, flat_idx)]
        active = valid & (box[4] > 0)
        if mode == "none":
            keep, new_cols, new = active, None, active
        else:
            keep, new_cols, new = _suppress_block(box, active, k_cols, k_n, k_wmax, thr, ratio)

        # boxes of no positive area are kept without IoU tests; then the per-row limit
        keep = keep | (valid & ~active)
        within = (kept_n.index_select(0, rows)[:, None] + torch.cumsum(keep, 1)) <= limit
        keep &= within
        r, j = keep.nonzero(as_tuple=True)
        found.append(rows.index_select(0, r) * m + (lo + j))
        kept_n.index_add_(0, rows, keep.sum(1))

        # the kept boxes join their row's kept set
        if new_cols is not None:
            new = new & torch.gather(within, 1, new_cols[5])  # new_cols are in x_min order
            n_new = new.sum(1)
            if bool((n_new > 0).any()):
                k_cols = _merge(k_cols, k_n, new_cols[:5], new)
                k_n = k_n + n_new
                width = torch.where(new, new_cols[2] - new_cols[0], -inf)
                k_wmax = torch.maximum(k_wmax, width.max(1, keepdim=True).values)

        lo = hi
        going = (kept_n.index_select(0, rows) < limit) & (row_counts > hi)
        if not bool(going.all()):
            rows, row_counts = rows[going], row_counts[going]
            k_n, k_wmax = k_n[going], k_wmax[going]
            cap = int(k_n.max().item()) if k_n.numel() else 0
            k_cols = [k[going, :cap] for k in k_cols]
    if not found:
        return torch.zeros(0, dtype=torch.int64, device=dev)
    return torch.sort(torch.cat(found)).values


def _merge(k_cols: Cols, k_n: Tensor, n_cols: Cols, new: Tensor) -> Cols:
    """The kept sets (ra, K) merged with the entries `new` of n_cols (ra, b), both sorted by x_min."""
    inf = torch.tensor(math.inf, dtype=n_cols[0].dtype, device=new.device)
    nx0 = torch.where(new, n_cols[0], inf)
    if bool((~new).any()):  # move the entries that do not join behind the others
        nx0, p = torch.sort(nx0, 1)
        n_cols = [nx0] + [torch.gather(c, 1, p) for c in n_cols[1:]]
    else:
        n_cols = [nx0] + n_cols[1:]
    ra, kk = (int(d) for d in k_cols[0].shape)
    b = int(nx0.shape[1])
    cap = int((k_n + new.sum(1)).max().item())
    dev = new.device
    to_new = torch.searchsorted(k_cols[0], nx0, right=True) + torch.arange(b, device=dev)
    to_old = torch.searchsorted(nx0, k_cols[0]) + torch.arange(kk, device=dev)
    out = []
    for k, c in zip(k_cols, n_cols):
        o = torch.empty((ra, kk + b), dtype=c.dtype, device=dev)
        o.scatter_(1, to_old, k).scatter_(1, to_new, c)
        out.append(o[:, :cap].contiguous())
    return out


def _suppress_block(box: Cols, active: Tensor, k_cols: Cols, k_n: Tensor, k_wmax: Tensor, thr: float,
                    ratio: bool) -> tuple[Tensor, list[Tensor], Tensor]:
    """Greedy NMS of one block (columns (ra, b) in rank order) after the kept sets: (keep (ra, b) in rank
    order, the block's columns sorted by x_min with the sorting permutation as a sixth entry, keep in
    that order)."""
    ra, b = (int(d) for d in active.shape)
    dev, dt = active.device, box[0].dtype
    inf = torch.tensor(math.inf, dtype=dt, device=dev)
    s_x0, pos = torch.sort(torch.where(active, box[0], inf), 1)
    s_active = torch.gather(active, 1, pos)
    s_cols = [s_x0] + [torch.gather(c, 1, pos) for c in box[1:]]

    # 1. suppressed by a box of the row's kept set
    alive = s_active
    cap = int(k_cols[0].shape[1])
    if cap and bool((k_n > 0).any()):
        lo_v, hi_v = _windows(s_x0, s_cols[2], k_wmax, thr, ratio, dt)
        w_lo = torch.searchsorted(k_cols[0], lo_v)
        w_hi = torch.where(s_active, torch.searchsorted(k_cols[0], hi_v), w_lo)
        hits = torch.zeros(ra * b, dtype=torch.int32, device=dev)
        for qi, _, over in _tiles(s_cols, k_cols, w_lo, w_hi, thr):
            hits.index_add_(0, qi.reshape(-1), over.any(2).reshape(-1).to(torch.int32))
        alive = s_active & (hits.view(ra, b) == 0)

    # 2. the survivors in greedy order, on their overlap graph
    cur = alive.reshape(-1)
    if int(alive.sum().item()) > 1:
        wmax = torch.where(alive, s_cols[2] - s_x0, -inf).max(1, keepdim=True).values
        lo_v, _ = _windows(s_x0, s_cols[2], wmax, thr, ratio, dt)
        w_lo = torch.searchsorted(s_x0, lo_v)
        w_hi = torch.where(alive, torch.arange(b, device=dev)[None, :], w_lo)  # partners before it in x order
        flat_alive = alive.reshape(-1)
        rank = pos.reshape(-1)  # rank in the block; compared within a row only
        src_l: list[Tensor] = []
        dst_l: list[Tensor] = []
        for qi, ti, over in _tiles(s_cols, s_cols, w_lo, w_hi, thr):
            over &= flat_alive.index_select(0, ti.reshape(-1)).view(ti.shape)[:, None, :]
            over &= flat_alive.index_select(0, qi.reshape(-1)).view(qi.shape)[:, :, None]
            tile, i, j = over.nonzero(as_tuple=True)
            q, t = qi[tile, i], ti[tile, j]
            other = q != t
            q, t = q[other], t[other]
            t_first = rank.index_select(0, t) < rank.index_select(0, q)
            src_l.append(torch.where(t_first, t, q))
            dst_l.append(torch.where(t_first, q, t))
        if src_l:
            src, dst = torch.cat(src_l), torch.cat(dst_l)
            if src.numel():
                counts = torch.zeros(ra * b, dtype=torch.int32, device=dev)
                while True:  # at most b sweeps: after k of them the first k ranks are final
                    nxt = counts.zero_().index_add_(0, dst, cur.index_select(0, src).to(torch.int32)) == 0
                    nxt &= flat_alive
                    if torch.equal(nxt, cur):
                        break
                    cur = nxt
    s_keep = cur.view(ra, b)
    keep = torch.zeros_like(active).scatter_(1, pos, s_keep)
    return keep, s_cols + [pos], s_keep


def _scalar(t: Tensor | None) -> float | None:
    if t is None or t.numel() == 0:
        return None
    return float(t.reshape(-1)[0].item())


@dataclass
class Ranked:
    """One NonMaxSuppression call's candidates, ranked: what the greedy selection runs on.

    cols: the corner/area columns (nb * n,) of every box (`_corners`, in the compute dtype); order (R, m):
    box index of each rank of each (batch, class) row, R = nb * nc, candidates first by descending score,
    ties keeping the lower box index first; counts (R,): candidates per row (score above score_threshold);
    limit: max_output_boxes_per_class, at most n; thr: the IoU threshold."""

    cols: Cols
    order: Tensor
    counts: Tensor
    nb: int
    nc: int
    n: int
    limit: int
    thr: float

    @property
    def m(self) -> int:
        return int(self.order.shape[1])

    def row_batch(self) -> Tensor:
        """(R,) batch index of each row."""
        return torch.arange(self.nb * self.nc, device=self.order.device) // self.nc

    def selected(self, keys: Tensor) -> Tensor:
        """The op's output (k, 3) from the kept candidates' keys row * m + rank, ascending."""
        m, nc = self.m, self.nc
        r, rank = keys // m, keys % m
        return torch.stack([r // nc, r % nc, self.order[r, rank]], 1).to(torch.int64)


def rank_candidates(node: Node, boxes: Tensor, scores: Tensor, max_output: Tensor | None = None,
                    iou_threshold: Tensor | None = None, score_threshold: Tensor | None = None) -> Ranked | None:
    """NonMaxSuppression's inputs checked and its candidates ranked; None when nothing can be selected."""
    require_float(node, boxes, scores)
    if (boxes.dim() != 3 or int(boxes.shape[-1]) != 4 or scores.dim() != 3
            or scores.shape[0] != boxes.shape[0] or scores.shape[2] != boxes.shape[1]):
        raise UnsupportedOpError(f"node '{node.name}': NonMaxSuppression needs boxes (B, N, 4) and "
                                 f"scores (B, C, N), got {tuple(boxes.shape)} and {tuple(scores.shape)}")
    nb, nc, n = (int(d) for d in scores.shape)
    limit_f = _scalar(max_output)
    if limit_f is None or not limit_f >= 1 or nb * nc * n == 0:
        return None
    limit = int(min(limit_f, n))
    iou_thr = _scalar(iou_threshold)
    iou_thr = 0.0 if iou_thr is None else iou_thr
    score_thr = _scalar(score_threshold)
    center = bool(node.attr("center_point_box", 0))
    dt = torch.float32 if boxes.dtype in (torch.float16, torch.bfloat16) else boxes.dtype

    flat_scores = scores.to(dt).reshape(nb * nc, n)
    candidate = torch.ones_like(flat_scores, dtype=torch.bool) if score_thr is None else flat_scores > score_thr
    ranked = torch.where(candidate, flat_scores, torch.full_like(flat_scores, float("-inf")))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    counts = candidate.sum(1)
    m = int(counts.max().item())
    if m == 0:
        return None
    cols = _corners(boxes.to(dt).reshape(nb * n, 4), center)
    return Ranked(cols, order[:, :m], counts, nb, nc, n, limit, iou_thr)


def no_selection(device: torch.device) -> Tensor:
    return torch.zeros((0, 3), dtype=torch.int64, device=device)


def box_columns(boxes: Tensor, center: bool) -> Cols:
    """x_min, y_min, x_max, y_max, area of boxes (..., 4) as NonMaxSuppression computes them. BatchedNMS
    (kiln.plugins.detection) shares them and `iou_above`, so both ops decide every IoU test alike; for its
    [x1, y1, x2, y2] rows the two axes trade names, which changes no IoU (products of the same two sides)."""
    return _corners(boxes, center)


def iou_above(a: Cols, b: Cols, threshold: float) -> Tensor:
    """IoU of boxes a and b (columns, broadcast against each other) above threshold, as NonMaxSuppression
    decides it (only boxes of positive area can pass)."""
    return _overlap(a, b, threshold)


@register
class NonMaxSuppression(OpDef):
    op_type = "NonMaxSuppression"
    opsets = (10, 28)
    value_inputs = (2, 3, 4)

    def compute(self, node: Node, boxes: Tensor, scores: Tensor, max_output: Tensor | None = None,
                iou_threshold: Tensor | None = None, score_threshold: Tensor | None = None) -> Tensor:
        c = rank_candidates(node, boxes, scores, max_output, iou_threshold, score_threshold)
        if c is None:
            return no_selection(boxes.device)
        dt = c.cols[0].dtype
        if not c.thr < 1:  # IoU <= 1 as the reference computes it: nothing is ever suppressed
            mode = "none"
        elif c.thr >= 1e-6 and _normal(c.cols, dt):
            mode = "ratio"
        else:
            mode = "plain"
        return c.selected(_nms(c.cols, c.order, c.counts, c.row_batch(), c.n, c.limit, c.thr, mode))

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        return [TensorType(DType.INT64, (None, 3))]


def _normal(cols: Cols, dt: torch.dtype) -> bool:
    """Whether every positive-area box has sides and area far from subnormal, where the float IoU is
    within a few ulps of the exact one (what the window bounds of 'ratio' mode rely on)."""
    area = cols[4]
    pos = area > 0
    if not bool(pos.any()):
        return True
    tiny = torch.finfo(dt).tiny * 2.0 ** 24
    sides = torch.stack([area, cols[2] - cols[0], cols[3] - cols[1]])
    return bool((sides[:, pos].min() >= tiny).item())
