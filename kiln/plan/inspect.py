"""`kiln inspect`: a plan described from its header alone, without torch: engine totals and every layer, as
readable text or as one JSON document (`describe`), and the HTML engine report (kiln.plan.report).

The header is untrusted input. kiln.plan.header checks the file's layout and checksum as the loader does;
every header field read here is checked for its type before use (a PlanFormatError of one line names it),
and text output shows names with control characters escaped. The full schema check, graph rebuild and
type proof stay the loader's (`kiln run`, Engine.load): inspect does not run the plan.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import Counter
from typing import Any, Iterator

from kiln.errors import KilnError, PlanFormatError
from kiln.plan.formats import parse_record
from kiln.plan.header import PlanHeader, read_header

SCHEMA = "kiln-inspect/1"
# Tactics whose steps launch nothing (kiln.backends.views: Tactic.is_view / Tactic.elides); the registry
# imports torch, so this table stands in for it here (tests/test_inspect.py holds it against the registry).
NON_LAUNCHING = {"view.slice": "view", "view.gather": "view", "concat.elide": "elided"}
MAX_PROFILE_BYTES = 64 << 20
_SUBGRAPH_DEPTH = 64


# ---- reading the untrusted header ------------------------------------------------------------------------

class _Check:
    """Type checks of header fields: each failure is a PlanFormatError naming the field."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, path: str, msg: str) -> PlanFormatError:
        pre = "" if self.where == "plan" else f"{self.where}: "
        return PlanFormatError(f"{pre}plan header: {path}: {msg}")

    def obj(self, x: Any, path: str) -> dict[str, Any]:
        if not isinstance(x, dict):
            raise self.fail(path, f"expected a JSON object, got {_kind(x)}")
        return x

    def list(self, x: Any, path: str) -> list[Any]:
        if not isinstance(x, list):
            raise self.fail(path, f"expected a list, got {_kind(x)}")
        return x

    def str(self, x: Any, path: str, null: bool = False) -> Any:
        if not (isinstance(x, str) or (null and x is None)):
            raise self.fail(path, f"expected a string, got {_kind(x)}")
        return x

    def count(self, x: Any, path: str) -> int:
        if not _is_count(x):
            raise self.fail(path, f"expected an int >= 0, got {_kind(x)}")
        return x

    def shape(self, x: Any, path: str) -> list[Any] | None:
        if x is None:
            return None
        for k, d in enumerate(self.list(x, path)):
            if not (_is_count(d) or isinstance(d, str) or d is None):
                raise self.fail(f"{path}[{k}]", f"expected a dim (int >= 0, symbol or null), got {_kind(d)}")
        return x


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _kind(x: Any) -> str:
    return "null" if x is None else type(x).__name__


def _spec(c: _Check, s: Any, path: str) -> dict[str, Any]:
    s = c.obj(s, path)
    return {"name": c.str(s.get("name"), f"{path}.name"), "dtype": c.str(s.get("dtype"), f"{path}.dtype", null=True),
            "shape": c.shape(s.get("shape"), f"{path}.shape"), "kind": c.str(s.get("kind", "tensor"), f"{path}.kind")}


def _profiles(c: _Check, profiles: Any) -> list[dict[str, dict[str, list[int]]]]:
    out = []
    for i, p in enumerate(c.list(profiles, "profiles")):
        entry = {}
        for name, r in c.obj(p, f"profiles[{i}]").items():
            r = c.obj(r, f"profiles[{i}].{_short(name)}")
            entry[name] = {k: [c.count(d, f"profiles[{i}].{_short(name)}.{k}")
                               for d in c.list(r.get(k), f"profiles[{i}].{_short(name)}.{k}")]
                           for k in ("min", "opt", "max")}
        out.append(entry)
    return out


def _steps(c: _Check, graph: dict[str, Any], path: str, depth: int = 0
           ) -> Iterator[tuple[dict[str, Any], dict[str, Any], int]]:
    """(step, its graph's values, subgraph depth) for every step of a graph spec and of the graphs in its steps'
    attributes, each step's fields used here checked."""
    if depth > _SUBGRAPH_DEPTH:
        raise c.fail(path, f"subgraphs nested deeper than {_SUBGRAPH_DEPTH} levels")
    values = c.obj(graph.get("values", {}), f"{path}.values")
    for i, s in enumerate(c.list(graph.get("steps"), f"{path}.steps")):
        at = f"{path}.steps[{i}]"
        s = c.obj(s, at)
        for k in ("name", "op", "tactic"):
            c.str(s.get(k), f"{at}.{k}")
        c.str(s.get("domain", ""), f"{at}.domain")
        for k in ("inputs", "outputs"):
            for j, v in enumerate(c.list(s.get(k, []), f"{at}.{k}")):
                c.str(v, f"{at}.{k}[{j}]", null=k == "inputs")
        cfg = s.get("config", {})
        if not isinstance(cfg, dict):
            raise c.fail(f"{at}.config", f"expected a JSON object, got {_kind(cfg)}")
        yield s, values, depth
        attrs = s.get("attrs", {})
        for k, a in (attrs.items() if isinstance(attrs, dict) else ()):
            for sub in _graphs_in(a):
                yield from _steps(c, c.obj(sub, f"{at}.attrs.{_short(k)}"), f"{at}.attrs.{_short(k)}", depth + 1)


def _graphs_in(a: Any) -> Iterator[Any]:
    if isinstance(a, dict) and "__graph__" in a:
        yield a["__graph__"]
    elif isinstance(a, list):
        for x in a:
            if isinstance(x, dict) and "__graph__" in x:
                yield x["__graph__"]


def _value_type(c: _Check, values: dict[str, Any], name: str, path: str) -> dict[str, Any]:
    """{name, dtype, shape} of a value of the graph (dtype and shape null where the plan does not say)."""
    v = values.get(name)
    if v is None:
        return {"name": name, "dtype": None, "shape": None}
    t = c.obj(c.obj(v, path).get("type", {}), f"{path}.type")
    return {"name": name, "dtype": c.str(t.get("dtype"), f"{path}.type.dtype", null=True),
            "shape": c.shape(t.get("shape"), f"{path}.type.shape")}


def _is_const(values: dict[str, Any], name: str | None) -> bool:
    v = values.get(name) if name is not None else None
    return isinstance(v, dict) and "const" in v


def step_precision(step: dict[str, Any], values: dict[str, Any]) -> str:
    """A layer's compute precision as the build summary counts it (kiln.build_report.step_precision)."""
    from kiln.build_report import step_precision as precision
    return precision(step, {"values": values})


def _fused(c: _Check, build: dict[str, Any]) -> dict[str, tuple[list[dict[str, str]], int]] | None:
    """build["fused"] (kiln.plan.records): layer -> ([{name, op}], members left out); None when not recorded."""
    rec = build.get("fused")
    if rec is None:
        return None
    out = {}
    for layer, text in c.obj(rec, "build.fused").items():
        path = f"build.fused.{_short(layer)}"
        try:
            members = json.loads(c.str(text, path))
        except (ValueError, RecursionError):
            raise c.fail(path, "expected JSON text of [[name, op], ...]") from None
        more = members.pop() if isinstance(members, list) and members and _is_count(members[-1]) else 0
        if not (isinstance(members, list) and all(isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m)
                                                  for m in members)):
            raise c.fail(path, "expected JSON text of [[name, op], ...]")
        out[layer] = ([{"name": n, "op": op} for n, op in members], more)
    return out


def _formats(c: _Check, build: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """build["formats"] (kiln.plan.formats): layer -> {"host": bool, "inputs": [format], "outputs": [format]};
    None when the plan does not record them."""
    rec = build.get("formats")
    if rec is None:
        return None
    out = {}
    for layer, text in c.obj(rec, "build.formats").items():
        try:
            sides = parse_record(text)
        except ValueError as e:
            raise c.fail(f"build.formats.{_short(layer)}", str(e)) from None
        out[layer] = ({"host": True, "inputs": [], "outputs": []} if sides is None
                      else {"host": False, "inputs": sides[0], "outputs": sides[1]})
    return out


# ---- the document -------------------------------------------------------------------------------------------

def describe(ph: PlanHeader) -> dict[str, Any]:
    """The plan as one JSON-able document, keys in this order (schema "kiln-inspect/1"):

    schema; plan {path, file_bytes, format_version, kiln_version, name}; target; inputs, outputs [{name, dtype,
    shape, kind}]; profiles [{input: {min, opt, max}}]; totals {steps, layers (launching, bodies included), views,
    elided, reference_layers, subgraph_layers, host_layers, layers_by_op, layers_by_tactic, layers_by_precision,
    weights {tensors, bytes}, activations {arena_bytes, naive_bytes} | null, workspace {max_bytes, max_layer,
    layers} | null}; build {seconds, optimization_level, precision_flags, torch, [stage_seconds, tuned_at,
    precision_fallback, int8_report]}; tuning (the autotuner's counts) | null; fused_recorded; layers: one per
    step of the main graph {index, name, op, domain, launches, kind (layer | view | elided), tactic, config,
    precision, fused [{name, op}] | null (not recorded), fused_more, inputs (runtime value names), outputs
    [{name, dtype, shape}], workspace_bytes | null, formats {host, inputs [format], outputs [format]} | null (not
    recorded; kiln.plan.formats: what the layer's kernel read and wrote at the opt shape, e.g. "fp32 NHWC")};
    formats_recorded, formats_note (why the build could not record them) | null; with a profile (attach_profile)
    "profile" at the top and per layer."""
    c = _Check(ph.path)
    h = c.obj(ph.header, "(top level)")
    for k in ("target", "inputs", "outputs", "profiles", "graph"):
        if k not in h:
            raise c.fail(k, "missing")
    target = {k: c.str(v, f"target.{_short(k)}") for k, v in c.obj(h["target"], "target").items()}
    inputs = [_spec(c, s, f"inputs[{i}]") for i, s in enumerate(c.list(h["inputs"], "inputs"))]
    outputs = [_spec(c, s, f"outputs[{i}]") for i, s in enumerate(c.list(h["outputs"], "outputs"))]
    profiles = _profiles(c, h["profiles"])
    graph = c.obj(h["graph"], "graph")
    memory = c.obj(h.get("memory", {}), "memory")
    build = c.obj(h.get("build", {}), "build")
    fused = _fused(c, build)
    formats = _formats(c, build)
    work = {k: c.count(v, f"build.workspace.{_short(k)}")
            for k, v in c.obj(build.get("workspace", {}), "build.workspace").items()}
    work_recorded = "workspace" in build

    main_values = graph.get("values", {})
    by_op: Counter[str] = Counter()
    by_tactic: Counter[str] = Counter()
    by_precision: Counter[str] = Counter()
    layers = views = elided = ref = inside = 0
    for s, values, depth in _steps(c, graph, "graph"):
        kind = NON_LAUNCHING.get(s["tactic"], "layer")
        views += kind == "view"
        elided += kind == "elided"
        if kind == "layer":
            layers += 1
            ref += s["tactic"] == "ref"
            inside += depth > 0
            by_op[s["op"]] += 1
            by_tactic[s["tactic"]] += 1
            by_precision[step_precision(s, values)] += 1

    rows = []
    for i, s in enumerate(c.list(graph.get("steps"), "graph.steps")):
        kind = NON_LAUNCHING.get(s["tactic"], "layer")
        members, more = fused.get(s["name"], ([{"name": s["name"], "op": s["op"]}], 0)) if fused is not None else (None, 0)
        rows.append({
            "index": i, "name": s["name"], "op": s["op"], "domain": s.get("domain", ""),
            "launches": kind == "layer", "kind": kind, "tactic": s["tactic"], "config": s.get("config", {}),
            "precision": step_precision(s, main_values),
            "fused": members, "fused_more": more,
            "inputs": [n for n in s.get("inputs", []) if n is not None and not _is_const(main_values, n)],
            "outputs": [_value_type(c, main_values, o, f"graph.values.{_short(o)}") for o in s.get("outputs", [])],
            "workspace_bytes": work.get(s["name"], 0) if work_recorded else None,
            "formats": formats.get(s["name"]) if formats is not None else None,
        })

    weights = {"tensors": len(ph.weights), "bytes": sum(w.nbytes for w in ph.weights.values())}
    arena = None
    if memory:
        arena = {"arena_bytes": c.count(memory.get("arena_bytes"), "memory.arena_bytes"),
                 "naive_bytes": c.count(memory.get("naive_bytes"), "memory.naive_bytes")}
    workspace = None
    if work_recorded:
        top = max(work.items(), key=lambda kv: kv[1], default=(None, 0))
        workspace = {"max_bytes": top[1], "max_layer": top[0], "layers": len(work)}
    tuning = build.get("tuning")
    tuning = ({k: v for k, v in c.obj(tuning, "build.tuning").items()} if tuning is not None else None)
    return {
        "schema": SCHEMA,
        "plan": {"path": ph.path, "file_bytes": ph.file_bytes, "format_version": ph.format_version,
                 "kiln_version": c.str(h.get("kiln_version", ""), "kiln_version"), "name": graph.get("name")
                 if isinstance(graph.get("name"), str) else None},
        "target": target, "inputs": inputs, "outputs": outputs, "profiles": profiles,
        "totals": {"steps": len(rows), "layers": layers, "views": views, "elided": elided, "reference_layers": ref,
                   "subgraph_layers": inside,
                   "host_layers": build["host_layers"] if _is_count(build.get("host_layers")) else None,
                   "layers_by_op": dict(_ranked(by_op)), "layers_by_tactic": dict(_ranked(by_tactic)),
                   "layers_by_precision": dict(_ranked(by_precision)),
                   "weights": weights, "activations": arena, "workspace": workspace},
        "build": _build_info(c, build),
        "tuning": tuning,
        "fused_recorded": fused is not None,
        "formats_recorded": formats is not None,
        "formats_note": build["formats_note"] if isinstance(build.get("formats_note"), str) else None,
        "layers": rows,
    }


def _ranked(counts: Counter[str]) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def _build_info(c: _Check, b: dict[str, Any]) -> dict[str, Any]:
    def num(k: str) -> float | None:
        v = b.get(k)
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None
    flags = {k: b[k] for k in ("fp16", "bf16", "int8", "tf32", "flush_denormals") if isinstance(b.get(k), bool)}
    out: dict[str, Any] = {"seconds": num("build_seconds"), "optimization_level": num("optimization_level"),
                           "precision_flags": flags, "torch": b.get("torch") if isinstance(b.get("torch"), str) else None}
    for k in ("stage_seconds", "tuned_at", "precision_fallback", "int8_report"):
        if k in b:
            out[k] = b[k]
    return out


# ---- the profile of `kiln bench --export-profile` -------------------------------------------------------------

def load_profile(path: str, doc: dict[str, Any]) -> dict[str, Any]:
    """A per-layer profile (`kiln bench --export-profile`: {"layers": [{"name", "mean_ms", "percent", ...}]}; also
    {"layers": {name: {"ms", "percent"}}} or {name: {"ms", "percent"}}), checked against the plan's layers.
    Returns {"path", "sum_ms" (the layers' mean times added up), "layers": {name: {"ms", "percent"}},
    "unknown": [names not in the plan]}."""
    what = f"--profile {path}"
    if not os.path.isfile(path):
        raise KilnError(f"{what}: file not found")
    try:
        if os.path.getsize(path) > MAX_PROFILE_BYTES:
            raise KilnError(f"{what}: larger than {MAX_PROFILE_BYTES >> 20} MiB, not a profile")
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise KilnError(f"{what}: cannot read ({e.strerror or type(e).__name__})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise KilnError(f"{what}: not valid JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise KilnError(f"{what}: expected a JSON object of per-layer entries, got {_kind(data)}")
    entries = data.get("layers", data)
    if isinstance(entries, list):
        pairs = [(e.get("name") if isinstance(e, dict) else None, e) for e in entries]
    elif isinstance(entries, dict):
        pairs = [(k, e) for k, e in entries.items() if isinstance(e, dict)]
    else:
        raise KilnError(f"{what}: \"layers\" must be a list or an object, got {_kind(entries)}")
    times: dict[str, dict[str, float]] = {}
    for k, (name, e) in enumerate(pairs):
        if not isinstance(name, str) or not isinstance(e, dict):
            raise KilnError(f"{what}: entry {k} has no layer name")
        ms = e.get("ms", e.get("mean_ms"))
        pct = e.get("percent")
        if not _finite(ms) or ms < 0:
            raise KilnError(f"{what}: layer {_safe(name, 60)}: \"ms\" must be a number >= 0, got {_short_val(ms)}")
        if pct is not None and (not _finite(pct) or not 0 <= pct <= 100.5):
            raise KilnError(f"{what}: layer {_safe(name, 60)}: \"percent\" must be in [0, 100], got {_short_val(pct)}")
        if name in times:
            raise KilnError(f"{what}: layer {_safe(name, 60)} appears twice")
        times[name] = {"ms": float(ms), "percent": None if pct is None else float(pct)}
    if not times:
        raise KilnError(f"{what}: no per-layer entries")
    names = {r["name"] for r in doc["layers"]}
    known = {n: t for n, t in times.items() if n in names}
    if not known:
        raise KilnError(f"{what}: none of its {len(times)} layers is a layer of this plan (a profile of another plan?)")
    total = sum(t["ms"] for t in times.values())
    for t in known.values():
        if t["percent"] is None:
            t["percent"] = 100.0 * t["ms"] / total if total > 0 else 0.0
    return {"path": path, "sum_ms": total, "layers": known, "unknown": sorted(set(times) - names)}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _short_val(x: Any) -> str:
    r = json.dumps(x) if isinstance(x, (int, float, str, bool)) or x is None else type(x).__name__
    return r if len(r) <= 40 else r[:37] + "..."


def attach_profile(doc: dict[str, Any], profile: dict[str, Any]) -> None:
    """Each layer's time and share into the document (null for layers the profile does not time)."""
    doc["profile"] = {"path": profile["path"], "sum_ms": profile["sum_ms"],
                      "layers_timed": len(profile["layers"]), "unknown_layers": profile["unknown"]}
    for r in doc["layers"]:
        r["profile"] = profile["layers"].get(r["name"])


# ---- text -------------------------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _safe(s: Any, width: int | None = None) -> str:
    """A plan string for a terminal: control characters escaped, cut to `width` with an ellipsis."""
    s = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(s))
    return s if width is None or len(s) <= width else s[:max(width - 1, 1)] + "…"


def _short(k: Any) -> str:
    return _safe(k, 40)


def size(n: int | None) -> str:
    """Bytes in words: '7.2 MiB'."""
    if n is None:
        return "?"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def dims(shape: list[Any] | None) -> str:
    """A shape as 1x3x224x224 (symbols by name, unknown dims as ?; '*' for an unknown rank, 'scalar' for [])."""
    if shape is None:
        return "*"
    return "x".join("?" if d is None else _safe(d, 16) for d in shape) if shape else "scalar"


def config_text(cfg: dict[str, Any]) -> str:
    """A tactic config in short form: 'tile=4 block=64,32'."""
    def v(x: Any) -> str:
        return ",".join(v(y) for y in x) if isinstance(x, list) else _safe(x if isinstance(x, str) else json.dumps(x), 24)
    return " ".join(f"{_safe(k, 24)}={v(x)}" for k, x in cfg.items())


def fused_text(r: dict[str, Any], width: int | None = None) -> str:
    """'Conv(n0) + BatchNormalization(n1) + Relu(n2)' (ops only where the names make it wider than `width`);
    '-' for a layer that is its own model node."""
    m = r.get("fused")
    if m is None:
        return "?"
    if not m:
        return "(added by the optimizer)"
    if len(m) == 1 and m[0]["name"] == r["name"] and m[0]["op"] == r["op"] and not r.get("fused_more"):
        return "-"
    more = r.get("fused_more", 0)
    tail = f" + {more} more" if more else ""
    text = " + ".join(f"{_safe(x['op'], 32)}({_safe(x['name'], 40)})" for x in m)
    if width is None or len(text + tail) <= width:
        return text + tail
    parts = [_safe(x["op"], 32) for x in m]
    keep: list[str] = []
    for p in parts:
        if len(" + ".join(keep + [p])) > width - 12:
            break
        keep.append(p)
    more += len(parts) - len(keep)
    return " + ".join(keep) + (f" + {more} more" if more else "")


def format_text(r: dict[str, Any]) -> str:
    """A layer's formats as 'fp32 NCHW -> fp32 NHWC' (a run of equal formats as 'fp32 NHWC x2'); 'host' for a
    shape layer computed on the host; '-' where the plan does not record them."""
    f = r.get("formats")
    if f is None:
        return "-"
    if f["host"]:
        return "host"

    def side(fs: list[str]) -> str:
        runs: list[list[Any]] = []
        for x in fs:
            if runs and runs[-1][0] == x:
                runs[-1][1] += 1
            else:
                runs.append([x, 1])
        return ", ".join(_safe(x) + (f" x{n}" if n > 1 else "") for x, n in runs) or "(none)"
    return f"{side(f['inputs'])} -> {side(f['outputs'])}"


def output_text(o: dict[str, Any], precision: str) -> str:
    """An output's shape, with its element type where that is not the layer's precision."""
    return dims(o["shape"]) if o["dtype"] in (None, precision) else f"{_safe(o['dtype'])} {dims(o['shape'])}"


def summary_rows(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """The engine totals as (label, text) rows: the text summary and the HTML report both show these."""
    t, b, p = doc["totals"], doc["build"], doc["plan"]
    torch = f" with torch {_safe(b['torch'])}" if b.get("torch") else ""
    rows = [("Plan", f"{_safe(p['path'])}: {size(p['file_bytes'])}, format {p['format_version']}, "
                     f"built by kiln {_safe(p['kiln_version'] or '?')}{torch}")]
    tgt = doc["target"]
    rows.append(("Target", _safe(tgt.get("device", "?")) + "".join(
        f", {k} {_safe(v)}" for k, v in tgt.items() if k != "device")))
    for label, specs in (("Inputs", doc["inputs"]), ("Outputs", doc["outputs"])):
        rows.append((label, "; ".join(f"{_safe(s['name'], 48)} {_safe(s['dtype'] or '?')} {dims(s['shape'])}"
                                      + ("" if s["kind"] == "tensor" else f" ({_safe(s['kind'])})")
                                      for s in specs) or "none"))
    for k, prof in enumerate(doc["profiles"]):
        rows.append(("Profiles" if k == 0 else "", f"profile {k} " + "; ".join(
            f"{_safe(n, 32)}: min {dims(r['min'])} opt {dims(r['opt'])} max {dims(r['max'])}" for n, r in prof.items())))
    tuned = b.get("tuned_at")
    if not doc["profiles"]:
        rows.append(("Profiles", "none" + (
            f" (dynamic inputs tuned at {', '.join(f'{_safe(n)}:{_safe(s)}' for n, s in tuned.items())})"
            if isinstance(tuned, dict) and tuned else "")))
    free = [f"{t[k]} {w}" for k, w in (("views", "zero-copy views"), ("elided", "concats elided")) if t[k]]
    extra = [f"{t['subgraph_layers']} in If/Loop/Scan bodies"] if t["subgraph_layers"] else []
    extra += [f"{t['host_layers']} shape layers on the host"] if t.get("host_layers") else []
    rows.append(("Layers", f"{t['layers']} launching" + (f" (+{', '.join(free)})" if free else "")
                 + f"; {t['reference_layers']} on the reference tactic" + (f"; {', '.join(extra)}" if extra else "")))
    rows.append(("  by op", _counts(t["layers_by_op"])))
    rows.append(("  by tactic", _counts(t["layers_by_tactic"])))
    rows.append(("  precision", _counts(t["layers_by_precision"]) + _flags(b)))
    rows.append(("  formats", _formats_text(doc)))
    w = t["weights"]
    rows.append(("Weights", f"{size(w['bytes'])} in {w['tensors']} tensor{'s' if w['tensors'] != 1 else ''} "
                            f"({w['bytes']} bytes)"))
    a = t["activations"]
    rows.append(("Activations", "not planned" if a is None else
                 f"arena {size(a['arena_bytes'])} vs {size(a['naive_bytes'])} naive "
                 f"({a['arena_bytes'] / max(a['naive_bytes'], 1):.2f}x), at the opt shapes"))
    ws = t["workspace"]
    rows.append(("Workspace", "not recorded in this plan" if ws is None else "none" if not ws["layers"] else
                 f"largest {size(ws['max_bytes'])} ({_safe(ws['max_layer'], 48)}); {ws['layers']} "
                 f"layer{'s' if ws['layers'] != 1 else ''} need scratch memory"))
    stages = b.get("stage_seconds")
    per = (" (" + ", ".join(f"{_safe(k)} {v:.2f} s" for k, v in stages.items() if _finite(v)) + ")"
           if isinstance(stages, dict) and stages else "")
    took = f"{b['seconds']:.2f} s" if b.get("seconds") is not None else "? s"
    level = f", optimization level {b['optimization_level']:g}" if b.get("optimization_level") is not None else ""
    rows.append(("Build", took + per + level))
    rows.append(("Autotuning", _tuning_text(doc["tuning"], b.get("optimization_level"))))
    rep = b.get("int8_report")
    if isinstance(rep, dict) and _finite(rep.get("output_rel")):
        rows.append(("INT8 check", f"outputs' relative error {rep['output_rel']:.3g} against float on "
                     f"{_safe(rep.get('batches', '?'))} held-out batches"
                     + (f" (budget {rep['budget']:g})" if _finite(rep.get("budget")) else "")
                     + (f"; kept in float: {_safe(rep['kept_float'], 200)}" if rep.get("kept_float") else "")))
    if doc.get("profile"):
        pr = doc["profile"]
        unknown = pr["unknown_layers"]
        rows.append(("Profile", f"{pr['sum_ms']:.3f} ms per run in {pr['layers_timed']} timed layers "
                                f"(from {_safe(pr['path'])})"
                     + (f"; {len(unknown)} entries name no layer of this plan" if unknown else "")))
    return rows


def _formats_text(doc: dict[str, Any]) -> str:
    """The launching layers' output formats, counted; or why the plan has none."""
    if not doc["formats_recorded"]:
        note = doc.get("formats_note")
        return _safe(note, 200) if note else "not recorded (the plan was built by an older Kiln)"
    seen: Counter[str] = Counter()
    host = 0
    for r in doc["layers"]:
        f = r["formats"]
        if not r["launches"] or f is None:
            continue
        host += f["host"]
        seen.update(f["outputs"])
    return (_counts(dict(_ranked(seen))) + " (layer outputs, at the opt shapes)"
            + (f"; {host} shape layer{'s' if host != 1 else ''} on the host" if host else ""))


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{_safe(k, 40)} {v}" for k, v in d.items()) or "none"


def _flags(b: dict[str, Any]) -> str:
    f = b.get("precision_flags") or {}
    on = [k for k in ("fp16", "bf16", "int8", "tf32", "flush_denormals") if f.get(k)]
    text = f" (build flags: {', '.join(on) if on else 'none'})"
    if isinstance(b.get("precision_fallback"), str):
        text += f"; {_safe(b['precision_fallback'])}"
    return text


def _tuning_text(t: dict[str, Any] | None, level: Any) -> str:
    if level == 0:
        return "off (optimization level 0): heuristic tactics"
    if not t:
        return "not recorded"
    def n(k: str) -> Any:
        v = t.get(k, 0)
        return v if _finite(v) else "?"
    secs = t.get("seconds")
    text = (f"{n('layers_timed')} layers timed: {n('measured')} candidate runs measured, {n('cached')} taken from "
            f"the timing cache, {n('skipped')} skipped" + (f", {secs:.2f} s" if _finite(secs) else ""))
    return text


def render_text(doc: dict[str, Any], layers: bool = True) -> str:
    """The document as readable text: totals, then (layers=True) one row per step."""
    rows = summary_rows(doc)
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"{label:<{width}}{text}" for label, text in rows]
    if not doc["fused_recorded"]:
        lines.append(f"{'':<{width}}(fused members not recorded: the plan was built by an older Kiln)")
    if layers:
        lines.append("")
        if doc["totals"]["subgraph_layers"]:
            lines.append("Steps of the main graph (the layers inside If/Loop/Scan bodies are counted above, not listed):")
        lines.extend(_table(doc))
    return "\n".join(lines)


def _table(doc: dict[str, Any]) -> list[str]:
    prof = "profile" in doc
    head = ["#", "Layer", "Op", "Tactic", "Precision", "Output", "Format (in -> out)", "Workspace"]
    head += ["ms", "%"] if prof else []
    head.append("Fused from")
    body = []
    for r in doc["layers"]:
        outs = ", ".join(output_text(o, r["precision"]) for o in r["outputs"])
        tac = _safe(r["tactic"], 28) + (f" {config_text(r['config'])}" if r["config"] else "")
        if not r["launches"]:
            tac += f" ({r['kind']})"
        ws = r["workspace_bytes"]
        row = [str(r["index"]), _safe(r["name"], 36), _safe(r["op"], 24), tac, _safe(r["precision"], 10),
               _safe(outs, 40), _safe(format_text(r), 60), "?" if ws is None else size(ws) if ws else "-"]
        if prof:
            t = r.get("profile")
            row += [f"{t['ms']:.4f}", f"{t['percent']:.1f}"] if t else ["-", "-"]
        row.append(fused_text(r, 90))
        body.append(row)
    widths = [max(len(x[k]) for x in [head] + body) for k in range(len(head))]
    right = {0, 7} | ({8, 9} if prof else set())

    def fmt(row: list[str]) -> str:
        cells = [row[k].rjust(widths[k]) if k in right else row[k].ljust(widths[k]) for k in range(len(row) - 1)]
        return ("  ".join(cells) + "  " + row[-1]).rstrip()
    return [fmt(head)] + [fmt(r) for r in body]


# ---- the command ------------------------------------------------------------------------------------------------

def run_inspect(args: argparse.Namespace) -> int:
    """`kiln inspect PLAN [--format text|json] [--summary] [--report HTML] [--profile JSON]`."""
    if args.report:
        from kiln.fileio import check_writable
        if os.path.exists(args.report) and os.path.samefile(args.report, args.plan):
            raise KilnError(f"--report {args.report} is the plan itself; choose another file")
        check_writable(args.report, "report")
    doc = describe(read_header(args.plan))
    if args.profile:
        attach_profile(doc, load_profile(args.profile, doc))
    if args.report:
        from kiln.plan.report import write_report
        write_report(doc, args.report)
    if args.format == "json":
        if args.summary:
            doc = {k: v for k, v in doc.items() if k != "layers"}
        print(json.dumps(doc, indent=2))
    else:
        print(render_text(doc, layers=not args.summary))
    if args.report:
        print(f"wrote {args.report}", file=sys.stderr if args.format == "json" else sys.stdout)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `kiln inspect` flags."""
    p.add_argument("plan")
    p.add_argument("--format", choices=("text", "json"), default="text", help="text (default) or one JSON document")
    p.add_argument("--summary", action="store_true", help="totals only, no per-layer table")
    p.add_argument("--report", metavar="HTML", help="also write a self-contained HTML engine report")
    p.add_argument("--profile", metavar="JSON", help="per-layer times from `kiln bench --export-profile FILE`")
