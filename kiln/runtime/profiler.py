"""LayerProfiler: per-layer times of an ExecutionContext's runs (`kiln bench --dump-profile`)."""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

import torch

from kiln.backends.tactic import is_layer


@dataclass(frozen=True)
class LayerTime:
    """One layer's accumulated time: `calls` runs of it, times in milliseconds."""

    name: str
    index: int  # the layer's position in the plan's step list
    op: str
    tactic: str
    calls: int
    total_ms: float
    mean_ms: float
    median_ms: float
    percent: float  # of the summed time of all layers
    cumulative_percent: float  # this layer's and every slower layer's


class LayerProfiler:
    """Times each layer of an engine's runs, accumulated over any number of iterations.

        profiler = LayerProfiler(engine)
        ctx.profiler = profiler          # CUDA graphs are not used while a profiler is set
        for _ in range(20):
            ctx.execute(feeds)
        print(profiler.table())          # or profiler.to_dict() for JSON

    Layers are the plan's launching steps (`plan.graph["steps"][i]["name"]`, the steps whose tactic
    launches work, kiln.backends.tactic.is_layer), each with its op type and tactic. On the CPU a layer's
    time is the host time of its kernel call. On CUDA an event is recorded on the stream after each layer
    (and one when an iteration begins): a layer's time is the GPU time between the previous layer's end
    and its own, its kernels plus any idle gap the host left before them (views launch nothing: their
    host time falls to the next layer). The events are resolved at `report()` / `to_dict()` / `table()`,
    which synchronise the device once. A profiler serves one context (one thread) at a time.
    """

    def __init__(self, engine: Any) -> None:
        self.device = engine.device
        self._info: dict[str, tuple[int, str, str]] = {}  # layer name -> (step index, op, tactic)
        for i, s in enumerate(engine.plan.graph["steps"]):
            if is_layer(s["tactic"]):
                self._info.setdefault(s["name"], (i, s["op"], s["tactic"]))
        self._times: dict[str, list[float]] = {}
        self._marks: list[tuple[str | None, Any, float]] = []  # CUDA: (layer, None at a start; event; host s)
        self.iterations = 0

    @property
    def timing(self) -> str:
        """How layer times are measured on this device, in words."""
        if self.device.type == "cuda":
            return "GPU time between consecutive layers' CUDA events (no CUDA graph)"
        return "host time of each layer's kernel call"

    def begin_iteration(self) -> None:
        """Called by the context before each run it profiles."""
        self.iterations += 1
        if self.device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self._marks.append((None, e, 0.0))

    def __call__(self, node: Any, host_seconds: float, result: Any = None) -> None:
        """The interpreter's step hook: after each step, with the seconds the host spent on it."""
        name = node.name
        if name not in self._info:
            return
        if self.device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self._marks.append((name, e, host_seconds))
        else:
            self._times.setdefault(name, []).append(host_seconds * 1e3)

    def _resolve(self) -> None:
        if not self._marks:
            return
        torch.cuda.synchronize(self.device)
        prev = None
        for name, e, host in self._marks:
            if name is not None:
                # no start mark (the hook used outside a context): the first layer gets its host time
                ms = prev.elapsed_time(e) if prev is not None else host * 1e3
                self._times.setdefault(name, []).append(ms)
            prev = e
        self._marks.clear()

    def reset(self) -> None:
        """Forget every time recorded so far."""
        self._times.clear()
        self._marks.clear()
        self.iterations = 0

    def report(self) -> list[LayerTime]:
        """Every layer that ran, slowest (by total time) first."""
        self._resolve()
        rows = sorted(((sum(v), name, v) for name, v in self._times.items()), key=lambda r: (-r[0], r[1]))
        grand = sum(r[0] for r in rows)
        out, cum = [], 0.0
        for total, name, v in rows:
            index, op, tactic = self._info[name]
            pct = 100.0 * total / grand if grand > 0 else 0.0
            cum += pct
            out.append(LayerTime(name, index, op, tactic, len(v), total, total / len(v), statistics.median(v),
                                 pct, cum))
        return out

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-able data."""
        layers = self.report()
        total = sum(r.total_ms for r in layers)
        iters = self.iterations or max((r.calls for r in layers), default=0)
        return {"device": self.device.type, "timing": self.timing, "iterations": iters, "total_ms": total,
                "ms_per_iteration": total / iters if iters else 0.0, "layers": [asdict(r) for r in layers]}

    def table(self, top: int | None = None) -> str:
        """A readable table (like trtexec's --dumpProfile): total, average and median time, % and cumulative %."""
        d = self.to_dict()
        layers = d["layers"] if top is None else d["layers"][:top]
        width = max([len("Tactic")] + [len(r["tactic"]) for r in layers])
        opw = max([len("Op")] + [len(r["op"]) for r in layers])
        lines = [f"Per-layer profile: {len(d['layers'])} layers, {d['iterations']} iterations; {d['timing']}",
                 f"{'Total ms':>10} {'Avg ms':>9} {'Median ms':>9} {'%':>6} {'Cum %':>6} {'Calls':>6}  "
                 f"{'Op':<{opw}}  {'Tactic':<{width}}  Layer"]
        for r in layers:
            lines.append(f"{r['total_ms']:10.4f} {r['mean_ms']:9.4f} {r['median_ms']:9.4f} {r['percent']:6.1f} "
                         f"{r['cumulative_percent']:6.1f} {r['calls']:6d}  {r['op']:<{opw}}  {r['tactic']:<{width}}  "
                         f"{r['name']}")
        if top is not None and len(d["layers"]) > top:
            lines.append(f"... {len(d['layers']) - top} more layers")
        lines.append(f"{d['total_ms']:10.4f} ms in all layers, {d['ms_per_iteration']:.4f} ms per iteration")
        return "\n".join(lines)
