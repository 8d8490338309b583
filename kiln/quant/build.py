"""The builder's INT8 step: ranges (explicit, cached or calibrated) -> Q/DQ pairs -> integer layers.

Runs after the optimization pipeline, before reduced precision: layers that get no integer kernel stay float
and may still run in FP16/BF16.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from kiln.errors import BuildError
from kiln.ir.graph import Graph
from kiln.passes.base import Fixpoint, PassContext, PassManager
from kiln.passes.dce import DeadCodeElimination
from kiln.passes.quantize import (FuseQuantizedLayers, FuseQuantizedResidual, InsertQuantization,
                                  PropagateQuantization, calibration_targets, has_qdq)
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
        raise BuildError("INT8 needs ranges: calibration data (--calib DIR), a calibration cache, dynamic ranges "
                         "(--dynamic-ranges FILE) or a model with Q/DQ nodes")
    cal = make_calibrator(config.calibrator, percentile=config.percentile)
    ranges = calibrate(g, data, cal, ctx.logger, exclude)
    if cache:
        write_cache(cache, ranges, cal.name, digest)
        ctx.logger.info(f"Wrote calibration cache {cache} ({len(ranges)} ranges)")
    return ranges, f"{cal.name} calibration"


def _lower(g: Graph, ranges: dict[str, float] | None, exclude: set[str], ctx: PassContext) -> None:
    """Q/DQ pairs from ranges (None: the model's own), then integer layers and int8 flow."""
    if ranges is not None:
        PassManager([InsertQuantization(ranges, exclude)]).run(g, ctx)
    PassManager([FuseQuantizedLayers(exclude), FuseQuantizedResidual(), Fixpoint("Q/DQ", [PropagateQuantization(),
                                                                  DeadCodeElimination()])]).run(g, ctx)


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
    if not (config.int8 or explicit):
        return None
    log = ctx.logger
    exclude, _ = layer_constraints(config)
    want_report = bool(config.int8_report) or config.accuracy_budget is not None
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
        _lower(g, ranges, exclude, ctx)
        kept: list[str] = []
        if want_report:
            report, kept = _measure(g, reference, ranges, exclude, held, config, ctx)  # type: ignore[arg-type]
        if keep is not None:
            keep.pre, keep.ranges, keep.exclude = reference, ranges, exclude | set(kept)
    ints, floats = _count(g, "QConv", "QGemm"), _count(g, "FusedConv", "FusedGemm")
    qdq = _count(g, "QuantizeLinear", "DequantizeLinear")
    log.info(f"INT8 from {source}: {ints} integer conv/gemm layers, {floats} stay float, {qdq} quantize/dequantize "
             f"layers at float boundaries")
    if ints == 0:
        log.warning(f"INT8: no conv/gemm layer got an integer kernel on {ctx.device} (ranges missing or no "
                    f"integer tactic): the plan computes in float")
    return report


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
