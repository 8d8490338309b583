"""A layered drawing of a DAG (for the engine report's graph): ranks top to bottom, few crossings, straight chains.

Sugiyama's steps in their plainest form: rank = longest path from a source; an edge spanning several ranks runs
through a dummy point per rank it crosses (the edges leaving one node share one such lane, so a value read far
below costs one lane, not one per reader); nodes are ordered within ranks by the
barycenter of their neighbours, sweeping down and up; x is the mean of the neighbours' x (a lane's: the
lane's own x where it goes on, so it runs straight), pushed apart to the minimum gap from both sides and the rank
shifted back onto the mean of its wishes. Everything is linear in the edges per sweep.
"""
from __future__ import annotations

from dataclasses import dataclass, field

SWEEPS = 8


@dataclass
class Placed:
    """A drawn graph: node centres, edge polylines (through the dummy points), and the extent."""

    x: dict[int, float] = field(default_factory=dict)
    y: dict[int, float] = field(default_factory=dict)
    edges: list[tuple[int, int, list[tuple[float, float]]]] = field(default_factory=list)
    width: float = 0.0
    height: float = 0.0


def layered(widths: list[float], edges: list[tuple[int, int]], height: float = 44.0, rank_gap: float = 36.0,
            gap: float = 22.0, lane: float = 12.0, margin: float = 16.0) -> Placed:
    """Place nodes 0..n-1 (widths[i] wide, `height` tall) of a DAG whose edges go from earlier to later nodes
    (edges (u, v) with u >= v are dropped). Returns centres and, per edge, the points of its polyline from the
    bottom of u to the top of v."""
    n = len(widths)
    edges = sorted({(u, v) for u, v in edges if 0 <= u < v < n})
    rank = [0] * n
    for u, v in edges:  # sorted by u: each rank final before it is propagated
        rank[v] = max(rank[v], rank[u] + 1)
    # one chain of dummy points per source, down to the rank above its farthest reader: the edges of one
    # value share a lane and branch off it
    w = list(widths)
    rk = list(rank)
    lanes: dict[int, list[int]] = {}
    links: set[tuple[int, int]] = set()
    for u, v in edges:
        pts = lanes.setdefault(u, [])
        while rank[u] + 1 + len(pts) < rank[v]:
            d = len(w)
            w.append(lane)
            rk.append(rank[u] + 1 + len(pts))
            links.add((pts[-1] if pts else u, d))
            pts.append(d)
        links.add((pts[rank[v] - rank[u] - 2] if rank[v] - rank[u] >= 2 else u, v))
    chain = {(u, v): lanes.get(u, [])[:max(rank[v] - rank[u] - 1, 0)] for u, v in edges}
    total = len(w)
    up: list[list[int]] = [[] for _ in range(total)]
    down: list[list[int]] = [[] for _ in range(total)]
    for a, b in sorted(links):
        down[a].append(b)
        up[b].append(a)
    levels: list[list[int]] = [[] for _ in range(max(rk, default=-1) + 1)]
    for i in range(total):
        levels[rk[i]].append(i)
    pos = [0.0] * total
    for lv in levels:
        for k, i in enumerate(lv):
            pos[i] = float(k)
    for sweep in range(SWEEPS):
        order = levels[1:] if sweep % 2 == 0 else levels[-2::-1]
        for lv in order:
            for i in lv:
                nb = up[i] if sweep % 2 == 0 else down[i]
                if nb:
                    pos[i] = sum(pos[j] for j in nb) / len(nb)
            lv.sort(key=lambda i: pos[i])
            for k, i in enumerate(lv):
                pos[i] = float(k)
    # x: wished at the neighbours' mean, then pushed apart in order and shifted back onto the wish
    x = [0.0] * total
    for lv in levels:
        acc = 0.0
        for i in lv:
            x[i] = acc + w[i] / 2
            acc += w[i] + gap
    for sweep in range(SWEEPS):
        order = levels[1:] if sweep % 2 == 0 else levels[-2::-1]
        for lv in order:
            wish = []
            for i in lv:
                nb = up[i] if sweep % 2 == 0 else down[i]
                if i >= n:  # a lane follows its own lane where it goes on
                    nb = [j for j in nb if j >= n] or nb
                wish.append(sum(x[j] for j in nb) / len(nb) if nb else x[i])
            placed = _apart(wish, [w[i] for i in lv], gap)
            shift = sum(a - b for a, b in zip(wish, placed)) / len(lv) if lv else 0.0
            for k, i in enumerate(lv):
                x[i] = placed[k] + shift
    left = min((x[i] - w[i] / 2 for i in range(total)), default=0.0)
    out = Placed()
    step = height + rank_gap
    for i in range(total):
        x[i] += margin - left
    for i in range(n):
        out.x[i] = x[i]
        out.y[i] = margin + rk[i] * step + height / 2
    for u, v in edges:
        pts = [(x[u], out.y[u] + height / 2)]
        for d in chain[(u, v)]:
            top = margin + rk[d] * step
            pts += [(x[d], top), (x[d], top + height)]
        pts.append((x[v], out.y[v] - height / 2))
        out.edges.append((u, v, pts))
    out.width = max((x[i] + w[i] / 2 for i in range(total)), default=0.0) + margin
    out.height = margin * 2 + len(levels) * step - rank_gap
    return out


def _apart(wish: list[float], widths: list[float], gap: float) -> list[float]:
    """Positions in the given order, as close to `wish` as the gaps allow: the mean of pushing left-to-right and
    right-to-left (both keep the order and the gaps, so their mean does too)."""
    m = len(wish)
    left, right = list(wish), list(wish)
    for k in range(1, m):
        left[k] = max(wish[k], left[k - 1] + (widths[k - 1] + widths[k]) / 2 + gap)
    for k in range(m - 2, -1, -1):
        right[k] = min(wish[k], right[k + 1] - (widths[k + 1] + widths[k]) / 2 - gap)
    return [(a + b) / 2 for a, b in zip(left, right)]
