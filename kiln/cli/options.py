"""Build options shared by `kiln build`, `kiln bench` and `kiln compare`: the flags and the BuilderConfig
they make."""
from __future__ import annotations

import argparse
import math
from typing import Any

from kiln.errors import KilnError


def add_build_options(p: argparse.ArgumentParser) -> None:
    """The build flags (target, shapes, precisions, tuning, INT8) on a subcommand's parser."""
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="target (default: cuda when a GPU is present)")
    p.add_argument("--shapes", help="fixed input shapes: name:1x3x224x224[,name2:...]")
    p.add_argument("--min-shapes")
    p.add_argument("--opt-shapes")
    p.add_argument("--max-shapes")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--tf32", dest="tf32", action="store_true", default=True)
    p.add_argument("--no-tf32", dest="tf32", action="store_false")
    p.add_argument("--no-flush-denormals", dest="flush_denormals", action="store_false",
                   help="CPU: keep IEEE denormals (by default the plan runs with them flushed to zero, FTZ/DAZ)")
    p.add_argument("--workspace", type=int, help="workspace limit in MiB")
    p.add_argument("--timing-cache", help="JSON timing cache: read before tuning, merged back after")
    p.add_argument("--opt-level", type=int, default=3, help="0: heuristic tactics, no timing; 3+: time every candidate")
    p.add_argument("--int8", action="store_true", help="conv/gemm layers on integer kernels (ranges: --calib, "
                   "--calib-cache or --dynamic-ranges; a Q/DQ model needs none)")
    p.add_argument("--fp8", action="store_true", help="gemm and 1x1 conv layers in float8 e4m3 on FP8 tensor cores "
                   "(compute capability 8.9+; on the CPU in float32), ranges as for --int8")
    p.add_argument("--calib", metavar="DIR", help="calibration data: a folder of .npz (one array per input) or .npy files")
    p.add_argument("--calib-preprocess", metavar="SPEC", help="for a --calib folder of images: e.g. "
                   "'resize=256;crop=224;scale=0.00392157;mean=0.485,0.456,0.406;std=0.229,0.224,0.225;order=rgb'")
    p.add_argument("--calibrator", choices=["entropy", "minmax", "percentile", "mse"], default="entropy")
    p.add_argument("--percentile", type=float, default=99.99, help="the percentile calibrator's percentile")
    p.add_argument("--calib-batches", type=int, help="use at most N calibration batches")
    p.add_argument("--calib-cache", metavar="FILE", help="calibration cache (JSON): read when present and no --calib "
                   "is given, written after calibrating")
    p.add_argument("--dynamic-ranges", metavar="FILE", help='JSON {"tensor": amax or [lo, hi], "*": default}')
    p.add_argument("--layer-precisions", metavar="SPEC", help="per-layer precision: name:fp32|fp16|bf16|int8[,...]")
    p.add_argument("--int8-report", action="store_true", help="per-layer INT8 error against float on held-out "
                   "calibration batches")
    p.add_argument("--accuracy-budget", type=float, metavar="X", help="largest relative output error of the INT8 "
                   "plan: the layers adding most error go back to float until it holds")
    p.add_argument("--int8-layers", choices=["speed", "all"], help="speed (default): a layer runs INT8 only where "
                   "measured faster counting the reformats around it; all: every layer with an integer kernel")


DETECT_DEFAULTS = {"conf": 0.25, "iou": 0.45, "max_det": 100}


def add_detect_options(p: argparse.ArgumentParser) -> None:
    """`--detect` and its thresholds (Darknet .cfg models: kiln.frontend.detect)."""
    g = p.add_argument_group("detection (Darknet .cfg models)")
    g.add_argument("--detect", action="store_true", help="append YOLO decode + NMS to the plan: outputs num_detections "
                   "[N,1], det_boxes [N,K,4], det_scores [N,K], det_classes [N,K]; a second input 'letterbox' [N,4] = "
                   "scale_x, scale_y, pad_x, pad_y maps the boxes back to the original image")
    g.add_argument("--conf", type=float, help=f"--detect's score threshold (default {DETECT_DEFAULTS['conf']})")
    g.add_argument("--iou", type=float, help=f"--detect's NMS IoU threshold (default {DETECT_DEFAULTS['iou']})")
    g.add_argument("--max-det", type=int,
                   help=f"--detect's detections per image, K (default {DETECT_DEFAULTS['max_det']})")


def builder_config(args: argparse.Namespace) -> Any:
    """The BuilderConfig the build flags in `args` ask for (checked: a bad value is one KilnError line)."""
    from kiln.builder import BuilderConfig
    if args.workspace is not None and args.workspace < 0:
        raise KilnError(f"--workspace must be >= 0 MiB, got {args.workspace}")
    if args.opt_level < 0:
        raise KilnError(f"--opt-level must be >= 0, got {args.opt_level}")
    return BuilderConfig(device=args.device or "auto", profiles=_profiles(args), fp16=args.fp16, bf16=args.bf16,
                         tf32=args.tf32, flush_denormals=args.flush_denormals,
                         workspace_bytes=args.workspace and args.workspace << 20, timing_cache=args.timing_cache,
                         optimization_level=args.opt_level, **_int8_options(args))


def parse_shapes(spec: str | None, flag: str) -> dict[str, tuple[int, ...]]:
    """'x:1x3x224x224,y:4' -> {'x': (1,3,224,224), 'y': (4,)}."""
    out: dict[str, tuple[int, ...]] = {}
    if not spec:
        return out
    for item in spec.split(","):
        name, sep, dims = item.strip().rpartition(":")
        if not sep or not name:
            raise KilnError(f"{flag}: expected name:DxDxD, got '{item}'")
        try:
            out[name] = tuple(int(d) for d in dims.lower().split("x")) if dims else ()
        except ValueError:
            raise KilnError(f"{flag}: bad dimensions '{dims}' for input '{name}' (expected e.g. 1x3x224x224)") from None
    return out


def _profiles(args: argparse.Namespace) -> list[Any]:
    from kiln.builder import OptimizationProfile
    fixed = parse_shapes(args.shapes, "--shapes")
    mins = parse_shapes(args.min_shapes, "--min-shapes")
    opts = parse_shapes(args.opt_shapes, "--opt-shapes")
    maxs = parse_shapes(args.max_shapes, "--max-shapes")
    if not (fixed or mins or opts or maxs):
        return []
    p = OptimizationProfile()
    for name, s in fixed.items():
        p.set_shape(name, s, s, s)
    for name in set(mins) | set(opts) | set(maxs):
        if name in fixed:
            raise KilnError(f"input '{name}' is given both --shapes and min/opt/max shapes")
        have = [d.get(name) for d in (mins, opts, maxs)]
        if any(h is None for h in have):
            missing = [f for f, h in zip(("--min-shapes", "--opt-shapes", "--max-shapes"), have) if h is None]
            if have[1] is None or len(missing) > 1:
                raise KilnError(f"input '{name}': give --min-shapes, --opt-shapes and --max-shapes "
                                f"(missing {', '.join(missing)})")
        mn, op, mx = (h if h is not None else have[1] for h in have)
        p.set_shape(name, mn, op, mx)  # type: ignore[arg-type]
    return [p]


def _int8_options(args: argparse.Namespace) -> dict[str, Any]:
    """BuilderConfig's INT8 fields from the build flags (calibration data read lazily, batch by batch)."""
    from kiln.quant.calibrate import CalibrationFolder, read_ranges_file
    if args.calib_preprocess and not args.calib:
        raise KilnError("--calib-preprocess describes the images of a --calib folder")
    if args.int8 and args.fp8:
        raise KilnError("--int8 and --fp8 are two precisions: choose one")
    if (args.calib or args.calib_cache or args.dynamic_ranges) and not (args.int8 or args.fp8):
        raise KilnError("--calib, --calib-cache and --dynamic-ranges go with --int8 or --fp8")
    if (args.int8_report or args.accuracy_budget is not None) and not args.int8:
        raise KilnError("--int8-report and --accuracy-budget go with --int8")
    if args.int8_layers and not args.int8:
        raise KilnError("--int8-layers goes with --int8")
    if args.accuracy_budget is not None and not (args.accuracy_budget > 0 and math.isfinite(args.accuracy_budget)):
        raise KilnError(f"--accuracy-budget must be a positive number, got {args.accuracy_budget}")
    if args.calib_batches is not None and args.calib_batches < 1:
        raise KilnError(f"--calib-batches must be >= 1, got {args.calib_batches}")
    if not 0 < args.percentile <= 100:
        raise KilnError(f"--percentile must be in (0, 100], got {args.percentile}")
    out: dict[str, Any] = {"int8": args.int8, "fp8": args.fp8, "calibrator": args.calibrator,
                           "percentile": args.percentile,
                           "calibration_cache": args.calib_cache, "calibration_batches": args.calib_batches,
                           "int8_report": args.int8_report, "accuracy_budget": args.accuracy_budget,
                           "layer_precisions": _layer_precisions(args.layer_precisions),
                           "int8_by_speed": {None: None, "speed": True, "all": False}[args.int8_layers]}
    if args.calib:
        out["calibration_data"] = CalibrationFolder(args.calib, args.calib_preprocess)
    if args.dynamic_ranges:
        out["dynamic_ranges"] = read_ranges_file(args.dynamic_ranges)
    return out


def _layer_precisions(spec: str | None) -> dict[str, str]:
    """--layer-precisions name:fp16,name2:fp32 (a name may hold ':'; the precision follows the last one)."""
    out: dict[str, str] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        name, sep, prec = part.strip().rpartition(":")
        if not sep or not name or prec not in ("fp32", "fp16", "bf16", "int8"):
            raise KilnError(f"--layer-precisions: '{part}' must be name:fp32|fp16|bf16|int8")
        out[name] = prec
    return out


def build_model(args: argparse.Namespace, logger: Any) -> Any:
    """What `kiln build` builds: the ONNX model path as given, or a Darknet .cfg imported with its --weights
    into a Graph (its input's batch is dynamic, "N", when shape flags are given; else 1), with decode + NMS
    appended under --detect."""
    weights = getattr(args, "weights", None)
    detect = _detect_options(args)
    if not args.model.lower().endswith(".cfg"):
        if weights:
            raise KilnError("--weights goes with a Darknet .cfg model; an ONNX model holds its own weights")
        if detect is not None:
            raise KilnError("--detect goes with a Darknet .cfg model (its [yolo] layers give the anchors); "
                            "an ONNX model keeps its own outputs")
        return args.model
    if not weights:
        raise KilnError(f"{args.model} is a Darknet .cfg: give its weights with --weights FILE.weights")
    from kiln.frontend.darknet import load_darknet, parse_darknet_cfg
    dynamic = any((args.shapes, args.min_shapes, args.opt_shapes, args.max_shapes))
    graph = load_darknet(args.model, weights, logger, batch="N" if dynamic else 1)
    if detect is not None:
        from kiln.frontend.detect import append_detection
        from kiln.logger import Logger, Severity
        heads = parse_darknet_cfg(args.model, Logger(Severity.ERROR)).heads  # read again: no repeated warnings
        append_detection(graph, heads, **detect)
    return graph


def _detect_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """--detect's checked thresholds (None without --detect; a threshold flag without it is an error)."""
    given = {k: getattr(args, k, None) for k in DETECT_DEFAULTS}
    if not getattr(args, "detect", False):
        if any(v is not None for v in given.values()):
            raise KilnError("--conf, --iou and --max-det go with --detect")
        return None
    from kiln.frontend.detect import check_detect_options
    opts = {k: DETECT_DEFAULTS[k] if v is None else v for k, v in given.items()}
    check_detect_options(**opts)
    return opts
