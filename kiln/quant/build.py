"""The builder's INT8 step: ranges (explicit, cached or calibrated) -> Q/DQ pairs -> integer layers.

Runs after the optimization pipeline, before reduced precision: layers that get no integer kernel stay float
and may still run in FP16/BF16.
"""
from __future__ import annotations

import math
import os
from typing import Any

from kiln.errors import BuildError
from kiln.ir.graph import Graph
from kiln.passes.base import Fixpoint, PassContext, PassManager
from kiln.passes.dce import DeadCodeElimination
from kiln.passes.quantize import (FuseQuantizedLayers, InsertQuantization, PropagateQuantization, calibration_targets,
                                  has_qdq)
from kiln.quant.cache import read_cache, write_cache

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


def resolve_ranges(g: Graph, config: Any, ctx: PassContext) -> tuple[dict[str, float], str]:
    """(ranges, where they came from) for the implicit road: dynamic ranges, else the cache, else calibration."""
    from kiln.quant.calibrate import calibrate, graph_digest
    from kiln.quant.calibrators import make_calibrator
    exclude = set(config.fp32_layers)
    if config.dynamic_ranges:
        return explicit_ranges(g, config.dynamic_ranges, exclude, ctx.logger), "dynamic ranges"
    digest = graph_digest(g)
    cache = config.calibration_cache
    if cache and os.path.exists(cache) and config.calibration_data is None:
        ranges, name = read_cache(cache, digest)
        return ranges, f"calibration cache {cache} ({name})"
    if config.calibration_data is None:
        raise BuildError("INT8 needs ranges: calibration data (--calib DIR), a calibration cache, dynamic ranges "
                         "(--dynamic-ranges FILE) or a model with Q/DQ nodes")
    cal = make_calibrator(config.calibrator, percentile=config.percentile)
    ranges = calibrate(g, config.calibration_data, cal, ctx.logger, exclude, config.calibration_batches)
    if cache:
        write_cache(cache, ranges, cal.name, digest)
        ctx.logger.info(f"Wrote calibration cache {cache} ({len(ranges)} ranges)")
    return ranges, f"{cal.name} calibration"


def quantize_graph(g: Graph, config: Any, ctx: PassContext) -> None:
    """INT8 where asked (config.int8) or where the model says (Q/DQ nodes); nothing otherwise."""
    explicit = has_qdq(g)
    if not (config.int8 or explicit):
        return
    log = ctx.logger
    if explicit:
        if config.calibration_data is not None or config.dynamic_ranges:
            log.warning("the model is quantized (it holds Q/DQ nodes): its own scales are used, the calibration "
                        "data / dynamic ranges are not")
        source = "the model's Q/DQ nodes"
    else:
        ranges, source = resolve_ranges(g, config, ctx)
        PassManager([InsertQuantization(ranges, set(config.fp32_layers))]).run(g, ctx)
    PassManager([FuseQuantizedLayers(), Fixpoint("Q/DQ", [PropagateQuantization(), DeadCodeElimination()])]).run(g, ctx)
    ints = sum(1 for n in g.nodes if n.domain == "kiln" and n.op_type in ("QConv", "QGemm"))
    floats = sum(1 for n in g.nodes if n.domain == "kiln" and n.op_type in ("FusedConv", "FusedGemm"))
    qdq = sum(1 for n in g.nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.domain in ("", "ai.onnx"))
    log.info(f"INT8 from {source}: {ints} integer conv/gemm layers, {floats} stay float, {qdq} quantize/dequantize "
             f"layers at float boundaries")
    if ints == 0:
        log.warning(f"INT8: no conv/gemm layer got an integer kernel on {ctx.device} (ranges missing or no "
                    f"integer tactic): the plan computes in float")
