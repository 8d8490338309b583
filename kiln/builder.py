"""Builder + BuilderConfig + OptimizationProfile: the one place that wires the stages together.

    import -> passes (pipeline.py) -> reduced precision (fp16/bf16) -> shape inference per profile
           -> tactic choice (autotuner + timing cache) -> memory plan -> Plan
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import onnx
import torch

from kiln import __version__
from kiln.backends.tactic import TacticContext, get_tactic
from kiln.build_report import plan_figures, summary_lines
from kiln.errors import BuildError, KilnError, ProfileError
from kiln.ir.dtype import DType
from kiln.ir.graph import Graph
from kiln.ir.types import TensorType
from kiln.logger import BuildProgress, Logger
from kiln.ops.qlayers import fp8_layer, quant_layer
from kiln.ops.symbolic import profile_bounds, symbol_bounds
from kiln.passes.base import PassContext, PassManager, bodies as _bodies
from kiln.passes.cast import FoldCasts
from kiln.passes.pipeline import default_pipeline
from kiln.passes.precision import ReducedPrecision, cpu_precision, low_precision_ops, precision_dtype
from kiln.passes.quantize import has_qdq
from kiln.passes.shape_inference import infer_types
from kiln.plan.format import Plan
from kiln.plan.memory import aliases, lifetimes, plan_memory
from kiln.plan.records import layer_records, snapshot
from kiln.plan.serialize import GraphWriter, type_to_json
from kiln.quant.build import Int8Lowering, layer_constraints, quantize_graph
from kiln.tune.autotuner import Autotuner
from kiln.tune.timing_cache import TimingCache

Shape = tuple[int, ...]
_PRECISION_FLAG = {DType.FLOAT16: "--fp16", DType.BFLOAT16: "--bf16"}


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
    names layers to keep in float32 (and out of INT8). int8: conv/gemm layers run on integer kernels with ranges
    from `dynamic_ranges` (tensor name -> amax or (lo, hi)), else the `calibration_cache` file, else calibration
    over `calibration_data` (any iterable of input dicts; `calibration_batches` caps it) with `calibrator`
    ("entropy", "minmax", "percentile" at `percentile`, "mse"); a Q/DQ model is built to integer layers with or
    without it (kiln.quant.build). layer_precisions: layer name -> "fp32" | "fp16" | "bf16" | "int8" (a layer
    constrained to a float type stays out of INT8; "fp32" also out of fp16/bf16). int8_report: per-layer INT8 error
    against float on held-out calibration batches (logged, kept in plan.build["int8_report"]); accuracy_budget:
    the largest relative error of the outputs allowed, layers going back to float until it holds. int8_by_speed:
    True keeps a layer INT8 only where that is faster counting the reformats around it, by measurement
    (kiln.quant.speed; a layer constrained to "int8" stays INT8); None (default) does so at optimization_level >= 2;
    False runs every layer with an integer kernel INT8. A Q/DQ model keeps its own placement. fp8 (instead of
    int8): the GEMM-shaped layers (gemms, 1x1 convs) in float8 e4m3 from the same ranges (scales amax / 448), where
    the target has an FP8 kernel (a GPU of compute capability 8.9+; the CPU computes them in float32, with a warning).
    flush_denormals: a CPU plan runs (and its tactics are timed) with float denormals flushed to zero (FTZ/DAZ),
    as kiln.backends.cpu.fpmode explains; False keeps IEEE gradual underflow.
    optimization_level: 0 = heuristic tactics, no timing; 3+ = time every candidate. timing_cache: a JSON file read
    before and merged back after tuning.
    """

    device: str = "cpu"
    profiles: list[OptimizationProfile] = field(default_factory=list)
    fp16: bool = False
    bf16: bool = False
    tf32: bool = True
    flush_denormals: bool = True
    int8: bool = False
    workspace_bytes: int | None = None
    optimization_level: int = 3
    timing_cache: str | None = None
    fp32_layers: list[str] = field(default_factory=list)
    calibration_data: Iterable[Mapping[str, Any]] | None = None
    calibrator: str = "entropy"
    percentile: float = 99.99
    calibration_cache: str | None = None
    calibration_batches: int | None = None
    dynamic_ranges: dict[str, Any] = field(default_factory=dict)
    layer_precisions: dict[str, str] = field(default_factory=dict)
    int8_report: bool = False
    accuracy_budget: float | None = None
    int8_by_speed: bool | None = None
    fp8: bool = False


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
    from kiln.backends.cpu.features import cpu_model, vector_isa
    return {"device": "cpu", "name": cpu_model(), "isa": vector_isa()}  # what its tactics were timed on


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
        t0 = time.perf_counter()
        device = resolve_device(config.device)
        target = _device_target(device)
        with self.logger.progress("Building") as progress:
            if isinstance(model, Graph):
                g = model
            elif isinstance(getattr(model, "graph", None), Graph):  # a NetworkDefinition
                g = model.graph  # type: ignore[union-attr]
            else:
                from kiln.frontend.onnx import load_onnx
                with progress.stage("import"):
                    g = load_onnx(model, self.logger, base_dir=base_dir)
            progress.title = f"Building '{g.name}'"
            self.logger.verbose(f"Building '{g.name}' for {target['device']}: {len(g.nodes)} layers")
            _validate_profiles(g, config.profiles)
            origin = snapshot(g)  # the model's nodes, for the fused members of each layer (`kiln inspect`)
            notes: dict[str, Any] = {}
            low, int8_report, relower = self._optimize(g, config, target["device"], progress, notes)
            self.logger.verbose(f"After graph optimization: {len(g.nodes)} layers")
            _check_guards(g, config.profiles, self.logger)
            with progress.stage("autotune", "layers"):
                tuning_profiles = config.profiles or _tuning_profile(g, self.logger)
                if not config.profiles and tuning_profiles:
                    notes["tuned_at"] = {n: "x".join(map(str, s[1])) for n, s in tuning_profiles[0].shapes.items()}
                fp16, bf16 = low == DType.FLOAT16, low == DType.BFLOAT16  # what the plan runs, not what was asked
                flush = config.flush_denormals and _can_flush(device, self.logger)
                tctx = TacticContext(torch.device(device), fp16=fp16, bf16=bf16, tf32=config.tf32,
                                     flush_denormals=flush,
                                     workspace_bytes=config.workspace_bytes,
                                     extra={"opt_level": config.optimization_level})
                cache = TimingCache.load(config.timing_cache) if config.timing_cache else TimingCache()
                if relower is not None:
                    notes.update(self._int8_by_speed(g, *relower, tctx, cache, tuning_profiles, config, low))
                all_types = _infer_at(g, tuning_profiles, "opt", self.logger)
                tactics, tuning = self._choose_tactics(g, tctx, all_types, config, cache)
            with progress.stage("plan"):
                build = {"fp16": fp16, "bf16": bf16, "tf32": config.tf32, "int8": config.int8,
                         "flush_denormals": flush,
                         "optimization_level": config.optimization_level, "torch": torch.__version__,
                         "tuning": tuning, **notes, **(int8_report or {}),
                         **layer_records(origin, g, tactics, all_types[id(g)], device)}
                plan = self._make_plan(g, target, config, tactics, all_types, build)
        plan.build["stage_seconds"] = {k: round(v, 3) for k, v in progress.seconds.items()}
        plan.build["build_seconds"] = round(time.perf_counter() - t0, 3)
        for line in summary_lines(plan):
            self.logger.info(line)
        return plan

    def _optimize(self, g: Graph, config: BuilderConfig, device: str, progress: BuildProgress, notes: dict[str, Any]
                  ) -> tuple[DType | None, dict[str, Any] | None, tuple[Graph, Callable[[set[str]], Graph]] | None]:
        """The passes, INT8 and reduced precision, under the profiles' bounds: (the low type the plan runs,
        the INT8 accuracy report's build entries, and where INT8 layers are to be chosen by speed: the float graph
        before quantization and a function lowering it again with the named layers kept float). `notes` gets a
        requested precision the target lacks."""
        ctx = PassContext(self.logger, device=device, options={"fp16": config.fp16, "bf16": config.bf16})
        bounds = profile_bounds([(v.type.shape, [(p.shapes[v.name][0], p.shapes[v.name][2]) if v.name in p.shapes
                                                  else None for p in config.profiles]) for v in g.inputs])
        _pin_fixed_dims(g, bounds)
        with symbol_bounds(bounds):  # the runtime refuses inputs outside the profiles: inference may use them
            with progress.stage("optimize"):
                # the import typed the graph without the ranges: a dim they pin to one value is static from the
                # first fold on (a frame count that is 1 for every accepted length decides its exporter's If)
                infer_types(g, self.logger)
                PassManager(default_pipeline(), subgraphs=True).run(g, ctx)  # If / Loop / Scan bodies too
            int8_report = None
            lowering = Int8Lowering() if self._speed_selection(g, config) else None
            quiet_ctx = PassContext(self.logger.demoted(), device=device, options=ctx.options)
            if device == "cpu" and config.int8 and not has_qdq(g):
                from kiln.backends.cpu.features import exact_int8
                if not exact_int8():
                    self.logger.info("INT8 on a CPU without VNNI: uint8 activations (zero point 128) and weights "
                                     "within +-64 (7 bits), which oneDNN's AVX2 int8 kernels compute exactly")
            if config.int8 or config.fp8 or has_qdq(g):  # integer / FP8 layers from Q/DQ nodes or calibrated ranges
                # its progress and report lines are details here: the summary and `kiln build` give them
                with progress.stage("calibrate" if config.calibration_data is not None else "quantize"):
                    int8_report = quantize_graph(g, config, quiet_ctx, lowering)
            with progress.stage("optimize"):
                asked = low = precision_dtype(config.fp16, config.bf16)
                if low is not None and device == "cpu":
                    low = cpu_precision(low, self.logger)  # None (with a warning) where the CPU lacks such kernels
                if asked is not None and low is None:
                    notes["precision_fallback"] = f"{_PRECISION_FLAG[asked]} asked, no kernels on {device}: fp32"
                _lower_precision(g, low, config, device, ctx)

        def variant(exclude: set[str]) -> Graph:
            with symbol_bounds(bounds):
                h = lowering.lower(exclude, quiet_ctx)  # type: ignore[union-attr]
                _lower_precision(h, low, config, device, ctx)
            return h
        if lowering is None or lowering.pre is None:
            return low, int8_report, None
        return low, int8_report, (lowering.pre, variant)

    def _speed_selection(self, g: Graph, config: BuilderConfig) -> bool:
        """Whether INT8 layers are chosen by measured speed (BuilderConfig.int8_by_speed) for this model."""
        if not config.int8 or config.int8_by_speed is False or has_qdq(g):
            return False  # a Q/DQ model's own placement is kept, as TensorRT keeps it
        if config.int8_by_speed is None:
            return config.optimization_level >= 2
        if config.optimization_level < 1:
            self.logger.warning("INT8 by measured speed needs timing (optimization level >= 1): every layer with an "
                                "integer kernel runs INT8")
            return False
        return True

    def _int8_by_speed(self, g: Graph, pre: Graph, variant: Callable[[set[str]], Graph], tctx: TacticContext,
                       cache: TimingCache, profiles: list[OptimizationProfile], config: BuilderConfig,
                       low: DType | None) -> dict[str, Any]:
        """g's integer layers kept only where faster (kiln.quant.speed), timed by an autotuner sharing the
        build's timing cache; the plan's build entries saying what was chosen."""
        from kiln.quant.speed import select_by_speed
        tuner = Autotuner(self.logger.demoted(), tctx, config.optimization_level, cache)
        float_name = {DType.FLOAT16: "fp16", DType.BFLOAT16: "bf16"}.get(low, "fp32")  # type: ignore[arg-type]
        forced = {name for name, prec in config.layer_precisions.items() if prec == "int8"}
        return select_by_speed(g, pre, variant, lambda h: _infer_at(h, profiles, "opt", self.logger)[id(h)], tuner,
                               self.logger, float_name, forced) or {}

    def _make_plan(self, g: Graph, target: dict[str, Any], config: BuilderConfig,
                   tactics: dict[int, tuple[str, dict[str, Any]]], all_types: dict[int, dict[str, TensorType]],
                   build: dict[str, Any]) -> Plan:
        """Memory plan, graph spec and weights into a Plan, its figures (build_report) in its build record,
        checked as a load would check it."""
        counts = _layer_counts(g, tactics)
        self._log_subgraphs(g, tactics)
        memory = self._plan_memory(g, all_types[id(g)], aliases(g, tactics))
        sub_arena = sum(self._plan_memory(sub, all_types.get(id(sub), {}), aliases(sub, tactics), label).get(
            "arena_bytes", 0) for sub, label in _bodies(g))
        if sub_arena:
            counts["subgraph_arena_bytes"] = sub_arena
        writer = GraphWriter()
        spec = writer.graph(g, tactics)
        plan = Plan(
            target=target,
            inputs=[{"name": v.name, **type_to_json(v.type), "kind": v.kind} for v in g.inputs],
            outputs=[{"name": v.name, **type_to_json(v.type), "kind": v.kind} for v in g.outputs],
            profiles=[p.to_json() for p in config.profiles],
            graph=spec, memory=memory, kiln_version=__version__, weights=writer.weights,
            build={**build, **counts},
        )
        plan.build.update(plan_figures(plan))
        from kiln.runtime.engine import check_plan
        try:
            check_plan(plan, "built plan")
        except KilnError as e:
            raise BuildError(f"the model builds into a plan that fails Kiln's own load checks ({e}); "
                             "the model's declared shapes or names are inconsistent") from None
        return plan

    def _choose_tactics(self, g: Graph, tctx: TacticContext, types: dict[int, dict[str, TensorType]],
                        config: BuilderConfig, cache: TimingCache
                        ) -> tuple[dict[int, tuple[str, dict[str, Any]]], dict[str, Any]]:
        """The autotuner's choice per node (subgraph nodes included), with the timing cache (read from the
        file before) merged back into the file after. `types`: per graph (id), its values' types at the opt
        shape (`_infer_at`)."""
        # its totals line is a detail here (the build summary gives them); its progress counts on the display
        tuner = Autotuner(self.logger.demoted(), tctx, config.optimization_level, cache)
        chosen = tuner.choose(g, types[id(g)], types)
        from kiln.runtime.prologue import shape_prologue
        for i in shape_prologue(g, g.input_symbols()):  # they run on the host with their references, once per shape
            chosen[id(g.nodes[i])] = ("ref", {})
        self._warn_slow_quant_layers(g, chosen)
        if config.timing_cache:
            cache.save(config.timing_cache)
        return chosen, dict(tuner.stats)

    def _warn_slow_quant_layers(self, g: Graph, chosen: dict[int, tuple[str, dict[str, Any]]]) -> None:
        """A warning naming the INT8 / FP8 layers that no fast kernel took (they run on the exact, slow reference)."""
        slow = [n for sub in g.all_graphs() for n in sub.nodes
                if quant_layer(n) and chosen.get(id(n), ("ref", {}))[0] == "ref"]
        if not slow:
            return
        kind = "FP8" if any(fp8_layer(n) for n in slow) else "INT8"
        names = [n.name for n in slow]
        self.logger.warning(f"{len(slow)} {kind} layer(s) have no fast kernel here and run on the reference "
                            f"implementation (exact but slow): {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                            "; --verbose says why each kernel was skipped, --layer-precisions NAME:fp16 keeps a "
                            "layer in float")

    def _plan_memory(self, g: Graph, types: dict[str, TensorType], aliases: dict[str, list[str]],
                     label: str = "") -> dict[str, Any]:
        """Liveness-planned arena of one graph's activations at the opt shape (a subgraph's own, for a body:
        the runtime gives each body its own arena, kiln.runtime.arena)."""
        sizes = {name: t.nbytes() for name, t in types.items() if t.nbytes() is not None}
        bufs = lifetimes(g, sizes, aliases)  # type: ignore[arg-type]
        if not bufs:
            return {}
        mp = plan_memory(bufs)
        where = f" of subgraph {label}" if label else ""
        self.logger.verbose(f"Activation memory{where}: arena {mp.arena_bytes} bytes for {len(bufs)} tensors "
                            f"(naive sum {mp.naive_bytes} bytes, {mp.arena_bytes / max(mp.naive_bytes, 1):.2f}x)")
        return mp.to_json()

    def _log_subgraphs(self, g: Graph, tactics: dict[int, tuple[str, dict[str, Any]]]) -> None:
        """Verbose: each If / Loop / Scan body's layers and the tactics they run on."""
        for sub, label in _bodies(g):
            chosen = [(n, tactics.get(id(n), ("ref", {}))[0]) for n in sub.nodes]
            self.logger.verbose(f"Subgraph {label}: {len(chosen)} layers: "
                                + ", ".join(f"{n.name} ({n.op_type}) {tid}" for n, tid in chosen))


def _lower_precision(g: Graph, low: DType | None, config: BuilderConfig, device: str, ctx: PassContext) -> None:
    """FP16/BF16 lowering where the plan runs a low type (bodies too, each after the graph holding it: a body reads
    its captures in their lowered types, re-inferred under the caller's bounds: without them a dim the pipeline
    proved comes back unknown), with the boundary Casts folded on CUDA."""
    if low is None:
        return
    lowering = ReducedPrecision(low, layer_constraints(config)[1], low_precision_ops(device))
    PassManager([lowering], subgraphs=True).run(g, ctx)
    if device == "cuda":
        PassManager([FoldCasts()]).run(g, ctx)


def _layer_counts(g: Graph, tactics: dict[int, tuple[str, dict[str, Any]]]) -> dict[str, int]:
    """Layers that launch work (subgraph layers included), zero-copy views, and elided concats (which launch
    nothing); how many of the layers run on the reference tactic, how many sit in If/Loop/Scan bodies, and how
    many are shape layers the runtime computes on the host once per input shape (kiln.runtime.prologue)."""
    from kiln.runtime.prologue import shape_prologue
    host = set(shape_prologue(g, g.input_symbols()))
    views = elided = ref = layers = inside = on_host = 0
    for sub in g.all_graphs():
        for i, n in enumerate(sub.nodes):
            tid = tactics.get(id(n), ("ref", {}))[0]
            t = get_tactic(tid)
            view, elide = t is not None and t.is_view, t is not None and t.elides
            views += int(view)
            elided += int(elide)
            if not (view or elide):
                layers += 1
                ref += int(tid == "ref")
                inside += int(sub is not g)
                on_host += int(sub is g and i in host)
    return {"layers": layers, "views": views, "elided": elided, "ref_layers": ref, "subgraph_layers": inside,
            "host_layers": on_host}


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


def _pin_fixed_dims(g: Graph, bounds: dict[str, tuple[int, int]]) -> None:
    """A symbolic dim that every profile fixes to one size (min = max: the runtime accepts nothing else) is
    that size, in every graph's declared types: the sizes derived from it (a strided conv's output length)
    are then static, and shape guards on them (an exporter's `if x.shape[-1] == 1: squeeze`) fold."""
    fixed = {d: lo for d, (lo, hi) in bounds.items() if lo == hi}
    if not fixed:
        return
    for sub in g.all_graphs():
        for v in sub.values():
            shape = v.type.shape
            if shape is not None and any(isinstance(d, str) and d in fixed for d in shape):
                v.type = TensorType(v.type.dtype, tuple(fixed.get(d, d) if isinstance(d, str) else d
                                                        for d in shape))


def _can_flush(device: str, logger: Logger) -> bool:
    """Whether a plan for `device` runs with denormals flushed to zero as asked (CPU plans only: GPU kernels set
    their own denormal modes); a warning where this machine cannot (kiln.backends.cpu.fpmode)."""
    if torch.device(device).type != "cpu":
        return False
    from kiln.backends.cpu import fpmode
    if not fpmode.available():
        logger.warning("denormals cannot be flushed here (no C compiler, or a CPU without a flush mode): "
                       "the plan keeps IEEE denormals, which can run far slower on x86")
        return False
    logger.verbose("Denormals flushed to zero (FTZ/DAZ) while the plan runs and while its tactics are timed")
    return True


def _check_guards(g: Graph, profiles: list[OptimizationProfile], logger: Logger) -> None:
    """The dim equalities the plan's types rest on (kiln.ir.dims.DimGuard; the runtime checks them per input
    shape) at each profile's points: a ProfileError where the opt point breaks one (the model cannot run there,
    so nothing can be tuned), a warning where min or max does (the runtime will refuse such shapes)."""
    guards = [gd for n in g.nodes for gd in n.guards]
    for gd in guards:
        logger.verbose(f"shape guard: layer '{gd.node}' needs {gd.lhs} == {gd.rhs} (not proven over the profile: "
                       "checked for each new input shape)")
    if not guards:
        return
    for k, prof in enumerate(profiles):
        for which, idx in (("opt", 1), ("min", 0), ("max", 2)):
            dims = {d: int(prof.shapes[v.name][idx][j]) for v in g.inputs if v.name in prof.shapes
                    for j, d in enumerate(v.type.shape or ()) if isinstance(d, str)}
            bad = next((gd for gd in guards if (gd.lhs_symbols | gd.rhs_symbols) <= set(dims)
                        and not gd.holds(dims)), None)
            if bad is None:
                continue
            if which == "opt":
                raise ProfileError(f"profile {k}: the model cannot run at its opt shapes: {bad.failure(dims)}")
            logger.warning(f"profile {k}: the model cannot run at its {which} shapes ({bad.failure(dims)}); "
                           "such inputs are refused at run time")


def _fmt(s: Any) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in s) + "]"



DEFAULT_OPT_BATCH = 1      # the opt point a build without a profile tunes dynamic dims at: the batch (dim 0),
DEFAULT_OPT_SPATIAL = 224  # the spatial dims of an image-like (rank-4) input,
DEFAULT_OPT_DIM = 128      # any other dynamic dim (a sequence)


def _tuning_profile(g: Graph, logger: Logger) -> list[OptimizationProfile]:
    """For a build without profiles whose inputs have dynamic dims: the point the autotuner times layers
    at (a warning names it). It is not a profile of the plan: the plan still takes any input shape."""
    opt: dict[str, tuple[int, ...]] = {}
    for v in g.inputs:
        shape = v.type.shape
        if shape is None or all(isinstance(d, int) for d in shape):
            continue
        opt[v.name] = tuple(d if isinstance(d, int) else DEFAULT_OPT_BATCH if k == 0 else
                            DEFAULT_OPT_SPATIAL if len(shape) == 4 and k >= 2 else DEFAULT_OPT_DIM
                            for k, d in enumerate(shape))
    if not opt:
        return []
    shown = ",".join(f"{n}:{'x'.join(map(str, s))}" for n, s in opt.items())
    declared = ", ".join(f"{v.name}:{_fmt(v.type.shape)}" for v in g.inputs if v.name in opt)
    form = ",".join(f"{v.name}:{'x'.join(str(d) if isinstance(d, int) else 'N' for d in v.type.shape or ())}"
                    for v in g.inputs if v.name in opt)
    logger.warning(f"no optimization profile for the dynamic input(s) {declared}: tuned at the default shape "
                   f"{shown}, and the plan takes any shape; to tune for your shapes give --shapes {form} "
                   "or --min-shapes/--opt-shapes/--max-shapes (Python: BuilderConfig(profiles=[OptimizationProfile()"
                   ".set_shape(...)]))")
    prof = OptimizationProfile()
    for n, s in opt.items():
        prof.set_shape(n, s, s, s)
    return [prof]


def _infer_at(g: Graph, profiles: list[OptimizationProfile], which: str, logger: Logger
              ) -> dict[int, dict[str, TensorType]]:
    """Concrete types of every value with dynamic inputs pinned at a profile point (opt by default), per graph:
    {id(graph): {value name: type}} for g and each of its subgraphs (names may repeat across subgraphs). A
    body's values follow the outer values it captures; those computed from a body input whose declared dims
    are symbolic (a loop-carried value) stay symbolic."""
    idx = {"min": 0, "opt": 1, "max": 2}[which]
    saved_all = [(v, v.type) for sub in g.all_graphs() for v in sub.values()]
    try:
        if profiles:
            for v in g.inputs:
                if v.name in profiles[0].shapes:
                    v.type = TensorType(v.type.dtype, profiles[0].shapes[v.name][idx])
        infer_types(g, logger)
        return {id(sub): {v.name: v.type for v in sub.values() if not v.is_const} for sub in g.all_graphs()}
    finally:  # every type back as it was: re-inference would keep the opt point's dims where it sees symbols
        for v, t in saved_all:
            v.type = t
