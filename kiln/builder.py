"""Builder + BuilderConfig + OptimizationProfile: the one place that wires the stages together.

    import -> passes (pipeline.py) -> reduced precision (fp16/bf16) -> shape inference per profile
           -> tactic choice (autotuner + timing cache) -> memory plan -> Plan
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import onnx
import torch

from kiln import __version__
from kiln.backends.tactic import TacticContext, get_tactic
from kiln.errors import BuildError, KilnError, ProfileError
from kiln.ir.graph import Graph
from kiln.ir.types import TensorType
from kiln.logger import Logger
from kiln.passes.base import PassContext, PassManager
from kiln.passes.cast import FoldCasts
from kiln.passes.pipeline import default_pipeline
from kiln.passes.precision import ReducedPrecision, precision_dtype
from kiln.passes.shape_inference import infer_types
from kiln.plan.format import Plan
from kiln.plan.memory import aliases, lifetimes, plan_memory
from kiln.plan.serialize import GraphWriter, type_to_json
from kiln.tune.autotuner import Autotuner
from kiln.tune.timing_cache import TimingCache

Shape = tuple[int, ...]


@dataclass
class OptimizationProfile:
    """min/opt/max shapes per dynamic input; the engine accepts any shape within [min, max]."""

    shapes: dict[str, tuple[Shape, Shape, Shape]] = field(default_factory=dict)

    def set_shape(self, name: str, min: Shape, opt: Shape, max: Shape) -> "OptimizationProfile":
        self.shapes[name] = (tuple(min), tuple(opt), tuple(max))
        return self

    def to_json(self) -> dict[str, dict[str, list[int]]]:
        return {n: {"min": list(a), "opt": list(b), "max": list(c)} for n, (a, b, c) in self.shapes.items()}


@dataclass
class BuilderConfig:
    """Every build option travels here: target, precision, profiles, workspace, tuning.

    device: "cpu", "cuda" (or "cuda:N") or "auto" (CUDA when a GPU is present).
    fp16 / bf16: run layers that tolerate it in that type (kiln.passes.precision); `fp32_layers`
    names layers to keep in float32. optimization_level: 0 = heuristic tactics, no timing; 3+ = time
    every candidate. timing_cache: a JSON file read before and merged back after tuning.
    """

    device: str = "cpu"
    profiles: list[OptimizationProfile] = field(default_factory=list)
    fp16: bool = False
    bf16: bool = False
    tf32: bool = True
    int8: bool = False
    workspace_bytes: int | None = None
    optimization_level: int = 3
    timing_cache: str | None = None
    fp32_layers: list[str] = field(default_factory=list)


def resolve_device(device: str | None) -> str:
    """'auto' (or None) -> 'cuda' when a CUDA GPU is present, else 'cpu'."""
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _device_target(device: str) -> dict[str, Any]:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BuildError("--device cuda requested but no CUDA GPU is available")
        idx = dev.index or 0
        cc = torch.cuda.get_device_capability(idx)
        return {"device": "cuda", "capability": f"{cc[0]}.{cc[1]}", "name": torch.cuda.get_device_name(idx),
                "cuda": str(torch.version.cuda)}
    if dev.type != "cpu":
        raise BuildError(f"unsupported target device '{device}' (use cpu or cuda)")
    return {"device": "cpu"}


class Builder:
    """Optimizes a Graph (or ONNX model) for one target and returns a Plan."""

    def __init__(self, logger: Logger | None = None) -> None:
        self.logger = logger or Logger()

    def build(self, model: Graph | onnx.ModelProto | str | os.PathLike, config: BuilderConfig | None = None, *,
              base_dir: str | os.PathLike | None = None) -> Plan:
        """base_dir: folder of an ONNX model's external data (default: the model file's folder).

        Only KilnError leaves: a failure this code did not foresee is a BuildError naming its cause."""
        try:
            return self._build(model, config or BuilderConfig(), base_dir)
        except KilnError:
            raise
        except MemoryError:
            raise BuildError("out of memory while building the plan") from None
        except (Exception, RecursionError) as e:
            msg = (str(e).strip().splitlines() or [""])[0][:200]
            raise BuildError(f"internal error while building: {type(e).__name__}: {msg}") from e

    def _build(self, model: Graph | onnx.ModelProto | str | os.PathLike, config: BuilderConfig,
               base_dir: str | os.PathLike | None) -> Plan:
        if config.int8:
            raise BuildError("INT8 is not implemented yet: build without int8 (FP32, --fp16 or --bf16)")
        t0 = time.perf_counter()
        device = resolve_device(config.device)
        target = _device_target(device)
        if isinstance(model, Graph):
            g = model
        elif isinstance(getattr(model, "graph", None), Graph):  # a NetworkDefinition
            g = model.graph  # type: ignore[union-attr]
        else:
            from kiln.frontend.onnx import load_onnx
            g = load_onnx(model, self.logger, base_dir=base_dir)
        self.logger.info(f"Building '{g.name}' for {target['device']}: {len(g.nodes)} layers")
        _validate_profiles(g, config.profiles)
        ctx = PassContext(self.logger, device=target["device"], options={"fp16": config.fp16, "bf16": config.bf16})
        PassManager(default_pipeline()).run(g, ctx)
        low = precision_dtype(config.fp16, config.bf16)
        if low is not None:
            PassManager([ReducedPrecision(low, config.fp32_layers)]
                        + ([FoldCasts()] if target["device"] == "cuda" else [])).run(g, ctx)
        self.logger.info(f"After graph optimization: {len(g.nodes)} layers")
        opt_types = _infer_at(g, config.profiles, "opt", self.logger)
        tctx = TacticContext(torch.device(device), fp16=config.fp16, bf16=config.bf16, tf32=config.tf32,
                             workspace_bytes=config.workspace_bytes, extra={"opt_level": config.optimization_level})
        tactics, tuning = self._choose_tactics(g, tctx, opt_types, config)
        counts = _layer_counts(g, tactics)
        memory = self._plan_memory(g, opt_types, aliases(g, tactics))
        writer = GraphWriter()
        spec = writer.graph(g, tactics)
        plan = Plan(
            target=target,
            inputs=[{"name": v.name, **type_to_json(v.type), "kind": v.kind} for v in g.inputs],
            outputs=[{"name": v.name, **type_to_json(v.type), "kind": v.kind} for v in g.outputs],
            profiles=[p.to_json() for p in config.profiles],
            graph=spec, memory=memory, kiln_version=__version__, weights=writer.weights,
            build={"fp16": config.fp16, "bf16": config.bf16, "tf32": config.tf32, "int8": config.int8,
                   "optimization_level": config.optimization_level, **counts,
                   "build_seconds": round(time.perf_counter() - t0, 3), "torch": torch.__version__,
                   "tuning": tuning},
        )
        from kiln.runtime.engine import check_plan
        try:
            check_plan(plan, "built plan")
        except KilnError as e:
            raise BuildError(f"the model builds into a plan that fails Kiln's own load checks ({e}); "
                             "the model's declared shapes or names are inconsistent") from None
        self.logger.info(f"Built plan: {counts['layers']} layers (+{counts['views']} zero-copy views, "
                         f"{counts['elided']} concats elided), {sum(w.numel() * w.element_size() for w in writer.weights.values())} "
                         f"weight bytes, activation arena {memory.get('arena_bytes', '?')} bytes "
                         f"(naive {memory.get('naive_bytes', '?')}), {time.perf_counter() - t0:.2f} s")
        return plan

    def _choose_tactics(self, g: Graph, tctx: TacticContext, types: dict[str, TensorType],
                        config: BuilderConfig) -> tuple[dict[int, tuple[str, dict[str, Any]]], dict[str, Any]]:
        """The autotuner's choice per node, with the timing cache file read before and merged after."""
        cache = TimingCache.load(config.timing_cache) if config.timing_cache else TimingCache()
        tuner = Autotuner(self.logger, tctx, config.optimization_level, cache)
        chosen = tuner.choose(g, types)
        if config.timing_cache:
            cache.save(config.timing_cache)
        return chosen, dict(tuner.stats)

    def _plan_memory(self, g: Graph, types: dict[str, TensorType], aliases: dict[str, list[str]]) -> dict[str, Any]:
        sizes = {name: t.nbytes() for name, t in types.items() if t.nbytes() is not None}
        bufs = lifetimes(g, sizes, aliases)  # type: ignore[arg-type]
        if not bufs:
            return {}
        mp = plan_memory(bufs)
        self.logger.verbose(f"Activation memory: arena {mp.arena_bytes} bytes for {len(bufs)} tensors "
                            f"(naive sum {mp.naive_bytes} bytes, {mp.arena_bytes / max(mp.naive_bytes, 1):.2f}x)")
        return mp.to_json()


def _layer_counts(g: Graph, tactics: dict[int, tuple[str, dict[str, Any]]]) -> dict[str, int]:
    """Layers that launch work, zero-copy views, and elided concats (which launch nothing)."""
    views = elided = 0
    for n in g.nodes:
        t = get_tactic(tactics.get(id(n), ("ref", {}))[0])
        views += int(t is not None and t.is_view)
        elided += int(t is not None and t.elides)
    return {"layers": len(g.nodes) - views - elided, "views": views, "elided": elided}


def _validate_profiles(g: Graph, profiles: list[OptimizationProfile]) -> None:
    names = {v.name: v for v in g.inputs}
    for k, p in enumerate(profiles):
        for name, (mn, op, mx) in p.shapes.items():
            v = names.get(name)
            if v is None:
                raise ProfileError(f"profile {k} names input '{name}', which the model does not have "
                                   f"(inputs: {', '.join(names) or 'none'})")
            shape = v.type.shape
            for which, s in (("kMIN", mn), ("kOPT", op), ("kMAX", mx)):
                if shape is not None and len(s) != len(shape):
                    raise ProfileError(f"{which} dimensions in profile {k} for input '{name}' have rank {len(s)} "
                                       f"but the input has rank {len(shape)} {_fmt(shape)}")
                if any(d < 0 for d in s):
                    raise ProfileError(f"{which} dimensions in profile {k} for input '{name}' are negative: {_fmt(s)}")
                if shape is not None and any(isinstance(d, int) and d != e for d, e in zip(shape, s)):
                    raise ProfileError(f"{which} dimensions in profile {k} for input '{name}' are {_fmt(s)} "
                                       f"but the input has static dimensions {_fmt(shape)}")
            if not all(a <= b <= c for a, b, c in zip(mn, op, mx)):
                raise ProfileError(f"profile {k} for input '{name}' needs min <= opt <= max per dim, "
                                   f"got min {_fmt(mn)} opt {_fmt(op)} max {_fmt(mx)}")


def _fmt(s: Any) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in s) + "]"


def _graphs(g: Graph) -> list[Graph]:
    """g and all its subgraphs, recursively."""
    out = [g]
    for n in g.nodes:
        for sg in n.subgraphs():
            out.extend(_graphs(sg))
    return out


def _infer_at(g: Graph, profiles: list[OptimizationProfile], which: str, logger: Logger) -> dict[str, TensorType]:
    """Concrete types of every value with dynamic inputs pinned at a profile point (opt by default)."""
    idx = {"min": 0, "opt": 1, "max": 2}[which]
    saved_all = [(v, v.type) for sub in _graphs(g) for v in sub.values()]
    try:
        if profiles:
            for v in g.inputs:
                if v.name in profiles[0].shapes:
                    v.type = TensorType(v.type.dtype, profiles[0].shapes[v.name][idx])
        infer_types(g, logger)
        return {v.name: v.type for v in g.values() if not v.is_const}
    finally:  # every type back as it was: re-inference would keep the opt point's dims where it sees symbols
        for v, t in saved_all:
            v.type = t
