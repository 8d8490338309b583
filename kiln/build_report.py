"""What a build did, in numbers and in a few lines: the figures the builder keeps in plan.build and the
summary `kiln build` prints at its default level (and `kiln inspect` can print from a saved plan).

Every figure is computed from the plan itself (its graph spec, weights and memory plan), so a plan loaded
from disk gives the same summary as the one just built.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterator, Mapping

# layers that compute on integer kernels whatever type they write (a QConv may dequantize its output)
INT8_LAYERS = frozenset({"QConv", "QGemm"})


def walk_steps(spec: Mapping[str, Any]) -> Iterator[tuple[dict[str, Any], Mapping[str, Any]]]:
    """(step, the graph spec holding it) for every step of a plan's graph spec, those of If / Loop / Scan
    bodies (stored in the steps' attributes) included."""
    for step in spec.get("steps", []):
        yield step, spec
        for attr in step.get("attrs", {}).values():
            for sub in _graphs(attr):
                yield from walk_steps(sub)


def _graphs(attr: Any) -> Iterator[Mapping[str, Any]]:
    if isinstance(attr, dict) and isinstance(attr.get("__graph__"), dict):
        yield attr["__graph__"]
    elif isinstance(attr, list):
        for a in attr:
            yield from _graphs(a)


def step_precision(step: Mapping[str, Any], spec: Mapping[str, Any]) -> str:
    """A layer's precision: int8 / fp8 for the integer / float8 conv/gemm layers, else the element type of its first
    output (its kind, e.g. "sequence", where it has none; "?" where the plan does not know it)."""
    if step.get("op") in INT8_LAYERS:
        ins = step.get("inputs") or []
        w = (spec.get("values", {}).get(ins[1]) if len(ins) > 1 and ins[1] else None) or {}
        return "fp8" if (w.get("type") or {}).get("dtype") == "float8_e4m3fn" else "int8"
    outs = step.get("outputs") or []
    value = (spec.get("values", {}).get(outs[0]) if outs else None) or {}
    return (value.get("type") or {}).get("dtype") or (value.get("kind") if value.get("kind") != "tensor" else None) or "?"


def plan_figures(plan: Any) -> dict[str, Any]:
    """Launching layers per tactic id and per precision, and the weights' bytes, from the plan's own graph
    spec and weights (flat dicts: they go into plan.build as they are)."""
    from kiln.backends.tactic import is_layer
    tactics: Counter[str] = Counter()
    precisions: Counter[str] = Counter()
    for step, spec in walk_steps(plan.graph):
        if is_layer(step["tactic"]):
            tactics[step["tactic"]] += 1
            precisions[step_precision(step, spec)] += 1
    weights = sum(w.numel() * w.element_size() for w in plan.weights.values())
    return {"tactics": dict(tactics.most_common()), "precisions": dict(precisions.most_common()),
            "weights_bytes": weights}


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n} bytes ({n / scale:.1f} {unit})"
    return f"{n} bytes"


def _counts(d: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: (-kv[1], kv[0])))


def _shapes(d: Mapping[str, Any]) -> str:
    return ", ".join(f"{name}:{'x'.join(map(str, s))}" for name, s in d.items())


def summary_lines(plan: Any) -> list[str]:
    """The build summary: layers, tactics by kind, precision mix, shapes tuned at, memory, autotuning and
    time per stage (from plan.build, plan.memory and plan.profiles; a figure a plan lacks is left out)."""
    b = plan.build
    device = plan.target.get("device", "?")
    stages = b.get("stage_seconds") or {}
    took = f" in {b['build_seconds']:.2f} s" if isinstance(b.get("build_seconds"), (int, float)) else ""
    per = f" ({', '.join(f'{k} {v:.2f} s' for k, v in stages.items())})" if stages else ""
    lines = [f"Built '{plan.graph.get('name', '?')}' for {device}{took}{per}"]
    if "layers" in b:
        free = [f"{b[k]} {what}" for k, what in (("views", "zero-copy views"), ("elided", "concats elided"))
                if b.get(k)]
        extra = [f"{b['subgraph_layers']} in If/Loop/Scan bodies"] if b.get("subgraph_layers") else []
        extra += [f"{b['host_layers']} shape layers on the host"] if b.get("host_layers") else []
        lines.append(f"  layers      {b['layers']} launching" + (f" (+{', '.join(free)})" if free else "")
                     + f"; {b.get('ref_layers', 0)} on the reference tactic"
                     + (f"; {', '.join(extra)}" if extra else ""))
    if b.get("tactics"):
        lines.append(f"  tactics     {_counts(b['tactics'])}")
    if b.get("precisions"):
        lines.append(f"  precision   {_counts(b['precisions'])} (layers by compute type)")
    if plan.profiles:
        lines.append("  shapes      " + "; ".join(
            f"profile {k} opt {_shapes({n: r['opt'] for n, r in p.items()})}" for k, p in enumerate(plan.profiles)))
    elif b.get("tuned_at"):
        lines.append(f"  shapes      tuned at {', '.join(f'{n}:{s}' for n, s in b['tuned_at'].items())} "
                     "(default: no profile given; the plan takes any shape)")
    mem = []
    if "weights_bytes" in b:
        mem.append(f"weights {_size(b['weights_bytes'])}")
    if plan.memory.get("arena_bytes") is not None:
        mem.append(f"activation arena {_size(plan.memory['arena_bytes'])} at the opt shapes")
    if mem:
        lines.append(f"  memory      {'; '.join(mem)}")
    t = b.get("tuning") or {}
    if b.get("optimization_level") == 0:
        lines.append("  autotuning  off (optimization level 0): heuristic tactics")
    elif t:
        lines.append(f"  autotuning  {t.get('layers_timed', 0)} layers timed, {t.get('measured', 0)} candidates "
                     f"measured, {t.get('cached', 0)} from the timing cache, {t.get('skipped', 0)} skipped")
    return lines
