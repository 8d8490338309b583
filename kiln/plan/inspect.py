"""Human-readable description of a plan (for `kiln inspect`)."""
from __future__ import annotations

from collections import Counter
from typing import Any

from kiln.backends.tactic import is_layer
from kiln.plan.format import Plan


def _t(d: dict[str, Any]) -> str:
    shape = d.get("shape")
    s = "*" if shape is None else "x".join("?" if x is None else str(x) for x in shape)
    return f"{d.get('dtype') or '?'}[{s}]"


def describe(plan: Plan, layers: bool = True) -> str:
    g = plan.graph
    lines = [f"Kiln plan (format {plan.format_version}, built by kiln {plan.kiln_version})",
             f"target: {', '.join(f'{k}={v}' for k, v in plan.target.items())}",
             f"build: {', '.join(f'{k}={v}' for k, v in plan.build.items())}"]
    for d in plan.inputs:
        lines.append(f"input  {d['name']}: {_t(d)}")
    for k, p in enumerate(plan.profiles):
        for name, r in p.items():
            lines.append(f"profile {k} {name}: min {r['min']} opt {r['opt']} max {r['max']}")
    for d in plan.outputs:
        lines.append(f"output {d['name']}: {_t(d)}")
    wbytes = sum(w.numel() * w.element_size() for w in plan.weights.values())
    mem = plan.memory
    lines.append(f"weights: {len(plan.weights)} tensors, {wbytes} bytes")
    if mem:
        ratio = mem["arena_bytes"] / max(mem["naive_bytes"], 1)
        lines.append(f"activations: arena {mem['arena_bytes']} bytes vs naive sum {mem['naive_bytes']} bytes "
                     f"({ratio:.2f}x) at the opt shapes")
    steps = g["steps"]
    launching = [s for s in steps if is_layer(s["tactic"])]
    counts = Counter(s["op"] for s in launching)
    free = Counter(s["op"] for s in steps if not is_layer(s["tactic"]))
    lines.append(f"layers: {len(launching)} ({', '.join(f'{op} {n}' for op, n in counts.most_common())})"
                 + (f"; launching nothing: {', '.join(f'{op} {n}' for op, n in free.most_common())}" if free else ""))
    if layers:
        vals = g["values"]
        for i, s in enumerate(steps):
            outs = ", ".join(f"{o}:{_t(vals[o]['type'])}" for o in s["outputs"] if o in vals)
            lines.append(f"  [{i:3d}] {s['name']} {s['op']} tactic={s['tactic']}{(' ' + str(s['config'])) if s['config'] else ''} -> {outs}")
    return "\n".join(lines)
