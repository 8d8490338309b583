"""The builder's INT8 step: ranges (explicit, cached or calibrated) -> Q/DQ pairs -> integer layers.

Runs after the optimization pipeline, before reduced precision: layers that get no integer kernel stay float
and may still run in FP16/BF16.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from kiln.backends.cpu.features import NO_VNNI_INT8
from kiln.errors import BuildError
from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node
from kiln.ops.qlayers import fp8_layer
from kiln.passes.base import Fixpoint, PassContext, PassManager
from kiln.passes.dce import DeadCodeElimination
from kiln.passes.rewrite import is_op
from kiln.passes.pointwise import FusePointwise
from kiln.passes.quantize import (FloatQuantizeDequantize, FuseQuantizedLayers, FuseQuantizedResidual,
                                  InsertQuantization, PropagateQuantization, calibration_targets, has_qdq)
from kiln.quant.cache import read_cache, write_cache
from kiln.quant.report import ReferenceRun, as_batches, clone_graph, compare

ALL = "*"
"""A dynamic-ranges key giving every tensor without its own entry this range (speed experiments)."""


def _amax(name: str, r: Any) -> float:
    try:
        vals = [float(r)] if isinstance(r, (int, float)) else [float(x) for x in r]
    except (TypeError, ValueError):
        raise BuildError(f"dynamic range of '{name}' must be a number or (lo, hi), got {r!r}") from None
    if len(vals) not in (1, 2) or not all(math.isfinite(v) for v in vals) or (len(vals) == 2 and vals[0] > vals[1]):
        raise BuildError(f"dynamic range of '{name}' must be a finite amax or lo <= hi, got {r!r}")
    return max(abs(v) for v in vals)


def explicit_ranges(g: Graph, given: dict[str, Any], exclude: set[str], logger: Any) -> dict[str, float]:
    """Tensor name -> amax from user ranges (amax or (lo, hi) per name; ALL for the rest)."""
    names = {v.name for v in calibration_targets(g, exclude)}
    ranges = {k: _amax(k, r) for k, r in given.items() if k != ALL}
    unknown = sorted(set(ranges) - names)
    if unknown:
        logger.warning(f"{len(unknown)} dynamic range(s) name no tensor an INT8 layer reads or writes "
                       f"(e.g. '{unknown[0]}'): ignored")
    if ALL in given:
        default = _amax(ALL, given[ALL])
        ranges.update({n: default for n in names if n not in ranges})
    return ranges


PRECISIONS = ("fp32", "fp16", "bf16", "int8")


def layer_constraints(config: Any) -> tuple[set[str], set[str]]:
    """(layers kept out of INT8, layers kept in float32) from fp32_layers and layer_precisions."""
    fp32 = set(config.fp32_layers)
    not_int8 = set(fp32)
    for name, prec in (config.layer_precisions or {}).items():
        if prec not in PRECISIONS:
            raise BuildError(f"layer precision of '{name}' must be one of {', '.join(PRECISIONS)}, got {prec!r}")
        if prec != "int8":
            not_int8.add(name)
        if prec == "fp32":
            fp32.add(name)
    return not_int8, fp32


def _data(config: Any, g: Graph) -> list[Any] | None:
    """The calibration batches, read once (a folder or any iterable of input dicts)."""
    from kiln.quant.calibrate import CalibrationFolder
    data = config.calibration_data
    if data is None:
        return None
    if isinstance(data, CalibrationFolder):
        data = data.reader(list(g.inputs))
    out = []
    for i, feed in enumerate(data):
        if config.calibration_batches is not None and i >= config.calibration_batches:
            break
        out.append(feed)
    return out


def resolve_ranges(g: Graph, config: Any, ctx: PassContext, data: list[Any] | None,
                   exclude: set[str]) -> tuple[dict[str, float], str]:
    """(ranges, where they came from) for the implicit road: dynamic ranges, else the cache, else calibration."""
    from kiln.quant.calibrate import calibrate, graph_digest
    from kiln.quant.calibrators import make_calibrator
    if config.dynamic_ranges:
        return explicit_ranges(g, config.dynamic_ranges, exclude, ctx.logger), "dynamic ranges"
    digest = graph_digest(g)
    cache = config.calibration_cache
    if cache and os.path.exists(cache) and data is None:
        ranges, name = read_cache(cache, digest)
        return ranges, f"calibration cache {cache} ({name})"
    if data is None:
        raise BuildError(f"{'FP8' if config.fp8 else 'INT8'} needs ranges: calibration data (--calib DIR), a "
                         "calibration cache, dynamic ranges (--dynamic-ranges FILE) or a model with Q/DQ nodes")
    cal = make_calibrator(config.calibrator, percentile=config.percentile)
    ranges = calibrate(g, data, cal, ctx.logger, exclude)
    if cache:
        write_cache(cache, ranges, cal.name, digest)
        ctx.logger.info(f"Wrote calibration cache {cache} ({len(ranges)} ranges)")
    return ranges, f"{cal.name} calibration"


def _lower(g: Graph, ranges: dict[str, float] | None, exclude: set[str], ctx: PassContext, fp8: bool = False) -> None:
    """Q/DQ pairs from ranges (None: the model's own; `fp8`: float8 pairs), then integer / FP8 layers and int8 or
    float8 flow between them."""
    if ranges is not None:
        PassManager([InsertQuantization(ranges, exclude, fp8)]).run(g, ctx)
    fuse = FuseQuantizedLayers(exclude)
    PassManager([fuse, FuseQuantizedResidual(), Fixpoint("Q/DQ", [PropagateQuantization(),
                                                                  DeadCodeElimination()])]).run(g, ctx)
    if fuse.declined:
        ctx.logger.warning(f"{NO_VNNI_INT8}, so {len(fuse.declined)} conv/gemm layer(s) of the model run in "
                           f"float between their Q/DQ nodes (e.g. '{fuse.declined[0]}'); onnxruntime's quantize_static "
                           "with reduce_range=True and uint8 activations writes layers that fit")
    if ranges is not None and fp8:
        left = _unquantize_float_layers(g)
        DeadCodeElimination().run(g, ctx)
        if left:
            ctx.logger.warning(f"FP8: {len(left)} gemm/1x1 conv layer(s) got no FP8 kernel on {ctx.device} and stay "
                               f"float (e.g. '{left[0]}')")
    # pairs left around float layers: one float pass each, fused with the elementwise ops around them
    PassManager([FloatQuantizeDequantize(), DeadCodeElimination(), FusePointwise(), DeadCodeElimination()]).run(g, ctx)


def _unquantize_float_layers(g: Graph) -> list[str]:
    """Implicit FP8: a layer that got no FP8 kernel reads its input unquantized (its inserted float8 Q/DQ pair
    would round its input and cost two passes for no FP8 arithmetic). Every Q/DQ here is one the builder put.
    Returns the names of the conv/gemm layers that read such a pair."""
    left: list[str] = []
    for dq in [n for n in g.nodes if is_op(n, "DequantizeLinear")]:
        q = dq.inputs[0].producer
        if is_op(q, "QuantizeLinear"):
            left += [r.name for r in g.nodes if r.op_type in ("FusedConv", "FusedGemm") and r.domain == "kiln"
                     and r.inputs[0] is dq.outputs[0] and r.name not in left]
            g.replace_uses(dq.outputs[0], q.inputs[0])  # type: ignore[union-attr]
    return left


@dataclass
class Int8Lowering:
    """What the implicit road lowered from, kept to lower the same float graph again with more layers kept float
    (kiln.quant.speed): the float graph before quantization, its ranges, and the layers the user's constraints
    (and an accuracy budget) keep float. quantize_graph fills it."""

    pre: Graph | None = None
    ranges: dict[str, float] = field(default_factory=dict)
    exclude: set[str] = field(default_factory=set)

    def lower(self, exclude: set[str], ctx: PassContext) -> Graph:
        """A fresh copy of the float graph lowered to integer layers, the layers in `exclude` (and the kept ones)
        staying float."""
        if self.pre is None:
            raise BuildError("internal error: no float graph kept to lower again")
        g = clone_graph(self.pre)
        _lower(g, self.ranges, self.exclude | exclude, ctx)
        return g


def _count(g: Graph, *ops: str) -> int:
    return sum(1 for n in g.nodes if n.op_type in ops and n.domain in ("", "ai.onnx", "kiln"))


def quantize_graph(g: Graph, config: Any, ctx: PassContext,
                   keep: Int8Lowering | None = None) -> dict[str, dict[str, Any]] | None:
    """INT8 where asked (config.int8) or where the model says (Q/DQ nodes); nothing otherwise. Returns the
    accuracy report (`int8_report` / `accuracy_budget`) as entries of the plan's build record, else None.
    `keep` (implicit road only; a Q/DQ model leaves it empty) gets what the lowering started from."""
    explicit = has_qdq(g)
    fp8 = bool(config.fp8) and not explicit
    if not (config.int8 or fp8 or explicit):
        return None
    log = ctx.logger
    exclude, _ = layer_constraints(config)
    want_report = bool(config.int8_report) or config.accuracy_budget is not None
    if fp8 and (config.int8 or want_report):
        raise BuildError("FP8 is its own precision: not with INT8, and the accuracy report and budget measure INT8 "
                         "layers only")
    report = None
    if explicit:
        if config.calibration_data is not None or config.dynamic_ranges:
            log.warning("the model is quantized (it holds Q/DQ nodes): its own scales are used, the calibration "
                        "data / dynamic ranges are not")
        if want_report:
            log.warning("the INT8 accuracy report and budget compare against calibration data of a float model: "
                        "not available for a Q/DQ model")
        source = "the model's Q/DQ nodes"
        _lower(g, None, exclude, ctx)
    else:
        data = _data(config, g)
        held: list[Any] = []
        if want_report:
            if not data:
                raise BuildError("--int8-report and --accuracy-budget measure on held-out calibration data: give "
                                 "--calib (or calibration_data)")
            if len(data) >= 2:
                k = max(1, len(data) // 5)
                data, held = data[:-k], data[-k:]
            else:
                held = data
                log.warning("one calibration batch: the accuracy report measures on the data it calibrated on")
        ranges, source = resolve_ranges(g, config, ctx, data, exclude)
        reference = clone_graph(g) if want_report or keep is not None else None
        _lower(g, ranges, exclude, ctx, fp8)
        kept: list[str] = []
        if want_report:
            report, kept = _measure(g, reference, ranges, exclude, held, config, ctx)  # type: ignore[arg-type]
        if keep is not None:
            keep.pre, keep.ranges, keep.exclude = reference, ranges, exclude | set(kept)
    fp8s = sum(1 for n in g.nodes if fp8_layer(n))
    ints, floats = _count(g, "QConv", "QGemm") - fp8s, _count(g, "FusedConv", "FusedGemm")
    qdq = _count(g, "QuantizeLinear", "DequantizeLinear")
    some_fp8, what = (f", {fp8s} FP8 ones" if fp8s else ""), ("FP8" if fp8 else "INT8")
    log.info(f"{what} from {source}: {ints} integer conv/gemm layers{some_fp8}, {floats} stay float, {qdq} "
             f"quantize/dequantize layers at float boundaries")
    _say_fp8(g, fp8s, ctx)
    if ints + fp8s == 0 and floats:  # (a model of Q/DQ nodes alone has no layer to make integer)
        log.warning(f"{what}: no conv/gemm layer got an integer or FP8 kernel on {ctx.device} (ranges missing or "
                    f"no such tactic): the plan computes in float")
    return report


def _say_fp8(g: Graph, fp8s: int, ctx: PassContext) -> None:
    """Warn where FP8 layers do not get FP8 arithmetic: conv/gemm layers left float between float8 Q/DQ nodes
    (no FP8 kernel for them on the target), and FP8 layers computed in float32 on the CPU."""
    def float8_dq(n: Node | None) -> bool:
        return is_op(n, "DequantizeLinear") and n.inputs[0].type.dtype == DType.FLOAT8E4M3FN  # type: ignore[union-attr]
    left = [n.name for n in g.nodes
            if n.domain == "kiln" and n.op_type in ("FusedConv", "FusedGemm") and float8_dq(n.inputs[0].producer)]
    if left:
        ctx.logger.warning(f"FP8: {len(left)} conv/gemm layer(s) stay float between their float8 Q/DQ nodes, no FP8 "
                           f"kernel on {ctx.device} takes them (e.g. '{left[0]}')")
    if fp8s and ctx.device == "cpu":
        ctx.logger.warning(f"FP8: {fp8s} layer(s) run on the CPU as float32 products of their float8 values "
                           f"(cpu.fp8_gemm): the FP8 model's results, no FP8 arithmetic or speed-up on this target")


def _measure(g: Graph, reference: Graph, ranges: dict[str, float], exclude: set[str], held: list[Any],
             config: Any, ctx: PassContext) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The accuracy report and the layers kept float; under a budget, layers go back to float (the one adding
    most error first) until the outputs' error meets it. g ends as the last graph measured."""
    ref = ReferenceRun(reference, as_batches(reference, held))
    report = compare(ref, g)
    budget = config.accuracy_budget
    kept: list[str] = []
    while budget is not None and report.output_rel > budget and report.layers:
        worst = report.layers[0]
        kept.append(worst.name)
        exclude = exclude | {worst.name}
        ctx.logger.info(f"INT8 outputs' error {report.output_rel:.3e} is over the budget {budget:g}: keeping "
                        f"{worst.name} in float (it adds {worst.added:.3e})")
        trial = clone_graph(reference)
        _lower(trial, ranges, exclude, ctx)
        g.__dict__.update(trial.__dict__)
        report = compare(ref, g)
    for line in report.lines():
        ctx.logger.info(line)
    if budget is not None:
        met = "meets" if report.output_rel <= budget else "does not meet"
        ctx.logger.info(f"INT8 accuracy budget {budget:g}: {met} it with {len(kept)} layer(s) kept in float"
                        + (f" ({', '.join(kept)})" if kept else ""))
    return report.summary(budget, kept), kept
