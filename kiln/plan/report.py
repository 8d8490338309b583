"""The HTML engine report of `kiln inspect PLAN --report engine.html`: one self-contained file (inline CSS and
SVG; no script, font or stylesheet from anywhere else) with the engine totals, the optimized graph drawn as
layers coloured by precision (labelled with their time when a profile is given) and the layer table.

It is drawn from `kiln.plan.inspect.describe`'s document, so it shows what the text and JSON output show. Every
string from the plan is HTML-escaped (plan names are untrusted); the file is written atomically.
"""
from __future__ import annotations

from html import escape
from typing import Any

from kiln.plan.inspect import config_text, dims, format_text, fused_text, output_text, size, summary_rows
from kiln.plan.inspect import _safe as safe
from kiln.plan.layout import layered

# fill colours of the layers by compute precision (anything else: OTHER)
COLOURS = {"float32": "#4c78a8", "float16": "#54a24b", "bfloat16": "#2a9d8f", "int8": "#f58518",
           "float64": "#8c564b", "float8_e4m3fn": "#e45756", "float8_e5m2": "#e45756"}
OTHER = "#8a8a8a"
BOX_W, IO_W, BOX_H = 212.0, 150.0, 52.0
TIME = "#c0392b"

_CSS = """
:root { --ink:#1f2933; --muted:#616e7c; --line:#d9dee4; --bg:#f7f8fa; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
       color:var(--ink); background:var(--bg); }
header { padding:18px 28px 10px; background:#fff; border-bottom:1px solid var(--line); }
h1 { margin:0; font-size:22px; } h2 { margin:0 0 10px; font-size:16px; }
.sub { margin:4px 0 0; color:var(--muted); word-break:break-all; }
main { padding:18px 28px 28px; }
section { background:#fff; border:1px solid var(--line); border-radius:8px; padding:14px 16px; margin-bottom:18px; }
table { border-collapse:collapse; }
.totals td { padding:3px 14px 3px 0; vertical-align:top; }
.totals td:first-child { color:var(--muted); white-space:nowrap; }
.totals td.sub1 { padding-left:16px; }
.mix { display:flex; height:10px; width:420px; max-width:100%; border-radius:5px; overflow:hidden; margin:2px 0; }
.mix span { display:block; height:100%; }
.panes { display:flex; gap:18px; align-items:flex-start; }
.graph { flex:0 0 auto; width:min-content; max-width:48%; }
.graph .scroll { overflow:auto; max-height:none; }
.layers { flex:1 1 auto; min-width:0; overflow-x:auto; }
.legend { display:flex; flex-wrap:wrap; gap:6px 14px; margin-bottom:10px; color:var(--muted); font-size:12px; }
.legend > span { white-space:nowrap; }
.sw { display:inline-block; width:12px; height:12px; border-radius:3px; vertical-align:-2px; margin-right:5px; }
.lt th, .lt td { padding:4px 7px; border-bottom:1px solid var(--line); text-align:left; vertical-align:top;
                 font-size:12.5px; }
.lt th { position:sticky; top:0; background:#fff; color:var(--muted); font-weight:600; white-space:nowrap; }
.lt td.n { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
.lt tr.view td { color:var(--muted); }
.lt tr:target td { background:#fff6d6; }
.mono { font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace; font-size:12px; }
.cfg { color:var(--muted); }
.fused { color:var(--muted); max-width:260px; }
.lt td.fmt { white-space:nowrap; }
.tac { color:var(--muted); margin-top:1px; }
svg text { font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif; }
svg .l1 { font-size:12px; font-weight:600; fill:#1f2933; }
svg .l2 { font-size:10.5px; fill:#3e4c59; }
svg .l3 { font-size:10.5px; fill:#616e7c; }
svg .t { font-size:10.5px; font-weight:600; fill:#c0392b; }
svg a:hover rect.box { stroke-width:2.5; }
footer { color:var(--muted); font-size:12px; padding:0 28px 24px; }
"""


def colour(precision: str) -> str:
    """The fill colour of a precision in the graph and the legend."""
    return COLOURS.get(precision, OTHER)


def _e(s: Any) -> str:
    """A plan string for HTML: control characters made visible, then escaped (quotes too)."""
    return escape(safe(s), quote=True)


def _fit(s: str, chars: int) -> str:
    return s if len(s) <= chars else s[:max(chars - 1, 1)] + "…"


def render_report(doc: dict[str, Any]) -> str:
    """The report's HTML text."""
    name = doc["plan"].get("name") or doc["plan"]["path"]
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>Kiln engine report: {_e(name)}</title>", f"<style>{_CSS}</style></head><body>",
             f"<header><h1>Kiln engine report: {_e(name)}</h1>",
             f'<p class="sub">{_e(doc["plan"]["path"])} &middot; target {_e(doc["target"].get("device", "?"))} '
             f'&middot; built by kiln {_e(doc["plan"]["kiln_version"] or "?")}</p></header><main>',
             _summary(doc), '<div class="panes">', _graph_section(doc), _table_section(doc), "</div></main>",
             "<footer>Written by <code>kiln inspect --report</code>. Boxes are the plan's steps in the order "
             "the runtime runs them; an edge is a tensor one step writes and another reads.</footer>",
             "</body></html>", ""]
    return "\n".join(parts)


def write_report(doc: dict[str, Any], path: str) -> None:
    """Render and write the report atomically (kiln.fileio.atomic_write)."""
    from kiln.fileio import atomic_write
    atomic_write(path, render_report(doc).encode("utf-8"), "report")


def _summary(doc: dict[str, Any]) -> str:
    rows = []
    for label, text in summary_rows(doc):
        sub = label.startswith("  ")
        rows.append(f'<tr><td class="{"sub1" if sub else ""}">{escape(label.strip())}</td><td>{escape(text)}</td></tr>')
        if label.strip() == "precision":
            rows.append(f"<tr><td></td><td>{_mix(doc['totals']['layers_by_precision'])}</td></tr>")
    return f'<section><h2>Engine</h2><table class="totals">{"".join(rows)}</table></section>'


def _mix(counts: dict[str, int]) -> str:
    total = sum(counts.values()) or 1
    bars = "".join(f'<span style="width:{100 * n / total:.2f}%;background:{colour(p)}" title="{_e(p)}: {n}"></span>'
                   for p, n in counts.items())
    return f'<div class="mix">{bars}</div>'


def _legend(doc: dict[str, Any]) -> str:
    seen = list(doc["totals"]["layers_by_precision"])
    items = [f'<span><span class="sw" style="background:{colour(p)}"></span>{_e(p)}</span>' for p in seen]
    if doc["totals"]["views"] or doc["totals"]["elided"]:
        items.append('<span><span class="sw" style="background:#fff;border:1.5px dashed #8a8a8a"></span>'
                     "view / elided (no launch)</span>")
    items.append('<span><span class="sw" style="background:#eef1f4;border:1px solid #9aa5b1"></span>'
                 "graph input / output</span>")
    if "profile" in doc:
        items.append(f'<span><span class="sw" style="background:{TIME}"></span>time, bar relative to the slowest '
                     "layer</span>")
    return f'<div class="legend">{"".join(items)}</div>'


def _graph_section(doc: dict[str, Any]) -> str:
    return (f'<section class="graph"><h2>Optimized graph</h2>{_legend(doc)}'
            f'<div class="scroll">{graph_svg(doc)}</div></section>')


def graph_svg(doc: dict[str, Any]) -> str:
    """The optimized main graph as inline SVG: one <g class="layer"> (or "view") per step, graph inputs and
    outputs as <g class="io">, an edge per tensor between them."""
    ins, outs, layers = doc["inputs"], doc["outputs"], doc["layers"]
    k = len(ins)
    widths = [IO_W] * k + [BOX_W] * len(layers) + [IO_W] * len(outs)
    made = {s["name"]: i for i, s in enumerate(ins)}
    edges: list[tuple[int, int]] = []
    label: dict[tuple[int, int], str] = {}
    shapes = {s["name"]: s for s in ins}
    for j, r in enumerate(layers):
        for v in r["inputs"]:
            if v in made:
                edges.append((made[v], k + j))
                label.setdefault((made[v], k + j), v)
        for o in r["outputs"]:
            made[o["name"]] = k + j
            shapes[o["name"]] = o
    for j, s in enumerate(outs):
        if s["name"] in made:
            edges.append((made[s["name"]], k + len(layers) + j))
            label.setdefault((made[s["name"]], k + len(layers) + j), s["name"])
    placed = layered(widths, edges, height=BOX_H)
    slowest = max((r["profile"]["ms"] for r in layers if r.get("profile")), default=0.0)
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{placed.width:.0f}" height="{placed.height:.0f}" '
           f'viewBox="0 0 {placed.width:.0f} {placed.height:.0f}" role="img" aria-label="optimized graph">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#9aa5b1"/></marker></defs>',
           '<g class="edges" fill="none" stroke="#9aa5b1" stroke-width="1.3">']
    for u, v, pts in placed.edges:
        name = label.get((u, v), "")
        t = shapes.get(name)
        tip = f"{safe(name)}: {safe(t['dtype'] or '?')} {dims(t['shape'])}" if t else safe(name)
        svg.append(f'<path d="{_path(pts)}" marker-end="url(#arrow)"><title>{escape(tip)}</title></path>')
    svg.append("</g>")
    for j, s in enumerate(ins + outs):
        i = j if j < k else k + len(layers) + (j - k)
        svg.append(_io_box(s, placed.x[i], placed.y[i], "input" if j < k else "output"))
    for j, r in enumerate(layers):
        svg.append(_layer_box(r, placed.x[k + j], placed.y[k + j], slowest))
    svg.append("</svg>")
    return "".join(svg)


def _path(pts: list[tuple[float, float]]) -> str:
    """Straight through each dummy's rank, an S-curve between ranks."""
    d = [f"M{pts[0][0]:.1f},{pts[0][1]:.1f}"]
    for (x1, y1), (x2, y2) in zip(pts, pts[1:]):
        if abs(x1 - x2) < 0.5:
            d.append(f"L{x2:.1f},{y2:.1f}")
        else:
            m = (y1 + y2) / 2
            d.append(f"C{x1:.1f},{m:.1f} {x2:.1f},{m:.1f} {x2:.1f},{y2:.1f}")
    return " ".join(d)


def _io_box(s: dict[str, Any], cx: float, cy: float, what: str) -> str:
    x, y = cx - IO_W / 2, cy - BOX_H / 2
    tip = f"graph {what} {safe(s['name'])}: {safe(s['dtype'] or '?')} {dims(s['shape'])}"
    return (f'<g class="io"><title>{escape(tip)}</title>'
            f'<rect x="{x:.1f}" y="{y + 6:.1f}" width="{IO_W:.0f}" height="{BOX_H - 12:.0f}" rx="20" '
            f'fill="#eef1f4" stroke="#9aa5b1"/>'
            f'<text class="l1" x="{cx:.1f}" y="{cy - 2:.1f}" text-anchor="middle">{escape(_fit(safe(s["name"]), 22))}</text>'
            f'<text class="l3" x="{cx:.1f}" y="{cy + 11:.1f}" text-anchor="middle">'
            f'{escape(_fit(safe(s["dtype"] or "?") + " " + dims(s["shape"]), 26))}</text></g>')


def _layer_box(r: dict[str, Any], cx: float, cy: float, slowest: float) -> str:
    x, y = cx - BOX_W / 2, cy - BOX_H / 2
    c = colour(r["precision"])
    outs = ", ".join(dims(o["shape"]) for o in r["outputs"])
    t = r.get("profile")
    tip = [f"#{r['index']} {safe(r['name'])}", f"op {safe(r['op'])}",
           f"tactic {safe(r['tactic'])}" + (f" {config_text(r['config'])}" if r["config"] else ""),
           f"precision {safe(r['precision'])}", f"outputs {outs}", f"formats {format_text(r)}"]
    if r.get("fused"):
        tip.append(f"fused from {fused_text(r)}")
    if r.get("workspace_bytes"):
        tip.append(f"workspace {size(r['workspace_bytes'])}")
    if t:
        tip.append(f"time {t['ms']:.4f} ms ({t['percent']:.1f}%)")
    cls, dash = ("layer", "") if r["launches"] else ("view", ' stroke-dasharray="5 3"')
    fill = f'fill="{c}" fill-opacity="0.16"' if r["launches"] else 'fill="#ffffff"'
    third = (f'<text class="t" x="{x + 10:.1f}" y="{y + 44:.1f}">{t["ms"]:.3f} ms &middot; {t["percent"]:.1f}%</text>'
             if t else f'<text class="l3" x="{x + 10:.1f}" y="{y + 44:.1f}">{escape(_fit(outs, 30))}</text>')
    bar = (f'<rect x="{x + 1.5:.1f}" y="{y + BOX_H - 5:.1f}" width="{max((BOX_W - 3) * t["ms"] / slowest, 1.0):.1f}" '
           f'height="3.5" fill="{TIME}"/>' if t and slowest > 0 else "")
    op = safe(r["op"]) + (f" ×{len(r['fused'])}" if r.get("fused") and len(r["fused"]) > 1 else "")
    return (f'<a href="#layer-{r["index"]}"><g class="{cls}" data-name="{_e(r["name"])}">'
            f'<title>{escape(chr(10).join(tip))}</title>'
            f'<rect class="box" x="{x:.1f}" y="{y:.1f}" width="{BOX_W:.0f}" height="{BOX_H:.0f}" rx="6" {fill} '
            f'stroke="{c}" stroke-width="1.4"{dash}/>'
            f'<rect x="{x:.1f}" y="{y:.1f}" width="5" height="{BOX_H:.0f}" rx="2" fill="{c}"/>'
            f'<text class="l1" x="{x + 10:.1f}" y="{y + 16:.1f}">{escape(_fit(safe(r["name"]), 26))}</text>'
            f'<text class="l2" x="{x + 10:.1f}" y="{y + 30:.1f}">{escape(_fit(op + " · " + safe(r["tactic"]), 36))}</text>'
            f"{third}{bar}</g></a>")


def _table_section(doc: dict[str, Any]) -> str:
    prof = "profile" in doc
    head = ["#", "Layer", "Op &middot; tactic", "Fused from", "Precision", "Output", "Format (in &rarr; out)",
            "Workspace"]
    head += ["ms", "%"] if prof else []
    rows = []
    for r in doc["layers"]:
        outs = "<br>".join(_e(output_text(o, r["precision"])) for o in r["outputs"])
        tac = _e(r["tactic"]) + (f" {_e(config_text(r['config']))}" if r["config"] else "")
        if not r["launches"]:
            tac += f" ({_e(r['kind'])})"
        ws = r["workspace_bytes"]
        cells = [f'<td class="n">{r["index"]}</td>', f'<td class="mono">{_e(r["name"])}</td>',
                 f'<td>{_e(r["op"])}<div class="tac mono">{tac}</div></td>',
                 f'<td class="fused" title="{_e(fused_text(r))}">{_e(fused_text(r, 64))}</td>',
                 f'<td><span class="sw" style="background:{colour(r["precision"])}"></span>{_e(r["precision"])}</td>',
                 f'<td class="mono">{outs}</td>', f'<td class="mono fmt">{_e(format_text(r))}</td>',
                 f'<td class="n">{"?" if ws is None else size(ws) if ws else "-"}</td>']
        if prof:
            t = r.get("profile")
            cells += ([f'<td class="n">{t["ms"]:.4f}</td>', f'<td class="n">{t["percent"]:.1f}</td>'] if t
                      else ['<td class="n">-</td>', '<td class="n">-</td>'])
        cls = "" if r["launches"] else ' class="view"'
        rows.append(f'<tr id="layer-{r["index"]}"{cls}>{"".join(cells)}</tr>')
    th = "".join(f"<th>{h}</th>" for h in head)
    return (f'<section class="layers"><h2>Layers ({doc["totals"]["layers"]} launching of {doc["totals"]["steps"]} '
            f'steps)</h2><table class="lt"><thead><tr>{th}</tr></thead><tbody>{"".join(rows)}</tbody></table></section>')
