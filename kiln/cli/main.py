"""`kiln` command line: build | run | inspect | conformance. Bad input: one line on stderr, non-zero exit."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from kiln.cli.bench import add_bench_parser
from kiln.cli.options import add_build_options, add_detect_options, build_model, builder_config
from kiln.errors import KilnError
from kiln.serve.cli import add_serve_parser

from kiln.settings import set_openmp_spin_default
set_openmp_spin_default()  # bounded OpenMP spin-waiting: before anything imports torch
from kiln.logger import Logger


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_outputs(args: argparse.Namespace, out: str) -> None:
    """Refuse, before any build work, outputs that cannot be written or that would overwrite the model."""
    from kiln.fileio import check_writable
    if _same_file(out, args.model):
        raise KilnError(f"output {out} is the input model {args.model}; choose another -o")
    check_writable(out, "plan")
    if getattr(args, "weights", None) and _same_file(out, args.weights):
        raise KilnError(f"output {out} is the --weights file {args.weights}; choose another -o")
    if args.timing_cache:
        if _same_file(args.timing_cache, args.model) or _same_file(args.timing_cache, out):
            raise KilnError(f"--timing-cache {args.timing_cache} is the model or the output plan; choose another file")
        check_writable(args.timing_cache, "timing cache")


def cmd_build(args: argparse.Namespace) -> int:
    from kiln.builder import Builder
    from kiln.plan.format import save_plan
    out = args.output or os.path.splitext(args.model)[0] + ".kiln"
    _check_outputs(args, out)
    logger = Logger.from_flags(args.quiet, args.verbose)  # -q: errors only; default: warnings, progress, summary
    cfg = builder_config(args)
    plan = Builder(logger).build(build_model(args, logger), cfg)
    save_plan(plan, out)
    if not args.quiet:
        print(f"wrote {out} ({os.path.getsize(out)} bytes, {plan.build['layers']} layers, "
              f"built in {plan.build['build_seconds']:.2f} s)")
        _print_int8_report(plan.build)
    return 0


def _print_int8_report(build: dict[str, Any], top: int = 10) -> None:
    """The INT8 accuracy report kept in the plan (--int8-report / --accuracy-budget), worst layers first."""
    rep, layers = build.get("int8_report"), build.get("int8_layer_error") or {}
    if not rep:
        return
    print(f"INT8 accuracy on {rep['batches']} held-out batch(es): outputs' relative error {rep['output_rel']:.3e}"
          + (f" (budget {rep['budget']:g})" if "budget" in rep else ""))
    for name, err in sorted(layers.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {err:9.3e}  {name}")
    if rep.get("kept_float"):
        print(f"kept in float for the budget: {rep['kept_float'].replace(',', ', ')}")


def _read_tensor(path: str, what: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise KilnError(f"{what}: file not found: {path}")
    try:
        if path.endswith(".npy"):
            return np.load(path, allow_pickle=False)
        import onnx
        from onnx import numpy_helper
        t = onnx.TensorProto()
        with open(path, "rb") as f:
            t.ParseFromString(f.read())
        return numpy_helper.to_array(t)
    except Exception as e:
        raise KilnError(f"{what}: cannot read tensor from {path} ({type(e).__name__})") from None


def _dim(d: Any) -> int | None:
    return int(d) if isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 else None


def dummy_input(spec: dict[str, Any], profiles: list[dict[str, Any]]) -> np.ndarray:
    """The ONNX backend suite's deterministic input: arange(n)/n, dynamic dims at the profile's opt (or 1).

    Odd specs (unknown or string element type, sequence inputs, huge shapes) are a KilnError, one line.
    """
    from kiln.ir.dtype import DType
    from kiln.settings import settings
    name = str(spec.get("name", "?"))
    hint = f"give --input {name}=FILE"
    if spec.get("kind", "tensor") != "tensor":
        raise KilnError(f"input '{name}' is a {spec.get('kind')}: no dummy data for it; {hint}")
    raw = spec.get("dtype")
    try:
        dtype = DType(raw) if raw else DType.FLOAT32  # unknown element type: float32
    except (ValueError, TypeError):
        raise KilnError(f"input '{name}': no dummy data for element type {raw!r}; {hint}") from None
    shape = spec.get("shape")
    if shape is None:
        shape = []
    if not isinstance(shape, (list, tuple)):
        raise KilnError(f"input '{name}': malformed shape {shape!r} in the plan")
    opt: list[Any] = []
    for p in profiles or []:
        entry = p.get(name) if isinstance(p, dict) else None
        if isinstance(entry, dict) and isinstance(entry.get("opt"), (list, tuple)):
            opt = list(entry["opt"])
            break
    dims = []
    for i, d in enumerate(shape):
        fixed = _dim(d)
        dims.append(fixed if fixed is not None else (_dim(opt[i]) if i < len(opt) and _dim(opt[i]) is not None else 1))
    n = 1
    for d in dims:
        n *= d
    nbytes, limit = n * dtype.itemsize, settings().max_activation_bytes
    if nbytes > limit:
        raise KilnError(f"input '{name}': dummy data of shape {dims} needs {nbytes} bytes, over the "
                        f"{limit}-byte limit (KILN_MAX_ACTIVATION_BYTES); {hint}")
    import torch
    if dtype.is_float or dtype.torch.is_complex:
        t = torch.from_numpy((np.arange(n, dtype=np.float64) / max(n, 1)).astype(np.float32))
    else:
        t = torch.from_numpy(np.arange(n, dtype=np.int64) % 7)
    t = t.reshape(dims).to(dtype.torch)
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2,
                   torch.float8_e5m2fnuz):
        import ml_dtypes  # numpy has no such types: the ml_dtypes ones, as the engine returns them
        bits = t.view(torch.uint16 if t.dtype == torch.bfloat16 else torch.uint8).numpy()
        return bits.view(getattr(ml_dtypes, dtype.value))
    return t.numpy()


def cmd_run(args: argparse.Namespace) -> int:
    from kiln.runtime.engine import Engine
    t0 = time.perf_counter()
    engine = Engine.load(args.plan)
    load_s = time.perf_counter() - t0
    feeds: dict[str, Any] = {}
    for item in args.input or []:
        name, sep, path = item.partition("=")
        if not sep:
            if len(engine.input_names) != 1:
                raise KilnError(f"--input {item}: name the input (name=file); inputs are {', '.join(engine.input_names)}")
            name, path = engine.input_names[0], item
        if name not in engine.input_specs:
            raise KilnError(f"--input: unknown input '{name}'; inputs are: {', '.join(engine.input_names)}")
        feeds[name] = _read_tensor(path, f"input '{name}'")
    for spec in engine.plan.inputs:
        if spec["name"] not in feeds:
            feeds[spec["name"]] = dummy_input(spec, engine.plan.profiles)
            print(f"input '{spec['name']}': no file given, using the ONNX backend suite's dummy data "
                  f"(arange(n)/n) of shape {list(feeds[spec['name']].shape)}")
    ctx = engine.create_execution_context()
    outs = ctx.execute(feeds)
    times = []
    for _ in range(max(args.iterations, 1)):
        t = time.perf_counter()
        ctx.execute(feeds)
        times.append(time.perf_counter() - t)
    print(f"plan {args.plan}: target {engine.plan.target['device']}, loaded in {load_s * 1e3:.1f} ms")
    for name, o in outs.items():
        a = np.asarray(o)
        stats = (f" min {a.min():.6g} max {a.max():.6g} mean {a.astype(np.float64).mean():.6g}"
                 if a.size and a.dtype.kind in "fiub" else "")
        print(f"output '{name}': {a.dtype} {list(a.shape)}{stats}")
    print(f"latency: median {np.median(times) * 1e3:.3f} ms, min {min(times) * 1e3:.3f} ms "
          f"over {len(times)} iterations")
    ok = True
    for item in args.check or []:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = engine.output_names[0], item
        if name not in outs:
            raise KilnError(f"--check: unknown output '{name}'; outputs are: {', '.join(outs)}")
        want = _read_tensor(path, f"expected output '{name}'")
        got = np.asarray(outs[name])
        if got.shape != want.shape:
            print(f"check '{name}': FAILED, shape {list(got.shape)} != expected {list(want.shape)}")
            ok = False
            continue
        err = np.abs(got.astype(np.float64) - want.astype(np.float64))
        rel = float((err / np.maximum(np.abs(want.astype(np.float64)), 1e-12)).max()) if err.size else 0.0
        close = np.allclose(got.astype(np.float64), want.astype(np.float64), rtol=args.rtol, atol=args.atol)
        print(f"check '{name}': {'PASSED' if close else 'FAILED'} (max abs err {float(err.max()) if err.size else 0:.3g}, "
              f"max rel err {rel:.3g}; rtol {args.rtol}, atol {args.atol})")
        ok &= bool(close)
    return 0 if ok else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    from kiln.plan.inspect import run_inspect  # reads the plan's header only: no torch import
    return run_inspect(args)


def cmd_conformance(args: argparse.Namespace) -> int:
    from kiln.conformance.runner import run
    return run(args)


class _Parser(argparse.ArgumentParser):
    """argparse with Kiln's error format: one line `kiln: error: ...`, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"kiln: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from kiln import __version__
    ap = _Parser(prog="kiln", description="Kiln: deep-learning inference optimizer and runtime")
    ap.add_argument("--version", action="version", version=f"kiln {__version__}")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    b = sub.add_parser("build", help="optimize an ONNX model (or a Darknet .cfg with --weights) into a .kiln plan")
    b.add_argument("model")
    b.add_argument("-o", "--output")
    b.add_argument("--weights", metavar="FILE", help="the Darknet .weights of a .cfg model")
    add_build_options(b)
    add_detect_options(b)
    level = b.add_mutually_exclusive_group()
    level.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    level.add_argument("-v", "--verbose", action="store_true", help="also every pass, fusion and tactic timing")
    b.set_defaults(func=cmd_build)
    r = sub.add_parser("run", help="run a plan and report outputs and latency")
    r.add_argument("plan")
    r.add_argument("--input", action="append", help="name=file.npy|file.pb (default: ONNX-suite dummy data)")
    r.add_argument("--check", action="append", help="[name=]expected.npy|.pb")
    r.add_argument("--iterations", type=int, default=10)
    r.add_argument("--rtol", type=float, default=1e-3)
    r.add_argument("--atol", type=float, default=1e-5)
    r.set_defaults(func=cmd_run)
    i = sub.add_parser("inspect", help="show a plan's layers, fused nodes, tactics, precision and memory; "
                                       "an HTML engine report")
    from kiln.plan.inspect import add_arguments as add_inspect_arguments
    add_inspect_arguments(i)
    i.set_defaults(func=cmd_inspect)
    add_bench_parser(sub)
    add_serve_parser(sub)
    from kiln.cli.compare import add_compare_parser
    add_compare_parser(sub)
    from kiln.conformance.runner import add_arguments
    c = sub.add_parser("conformance", help="run the ONNX backend test suite against Kiln")
    add_arguments(c)
    c.set_defaults(func=cmd_conformance)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from kiln.settings import settings
        settings()  # a malformed KILN_* variable is reported here, before any work
        return int(args.func(args) or 0)
    except KilnError as e:
        print(f"kiln: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`kiln inspect x.kiln | head`): not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's own flush at exit would fail on the closed pipe again
        return 0
    except MemoryError:  # the model or its inputs do not fit: the user's to change
        print("kiln: error: out of memory", file=sys.stderr)
        return 2
    except Exception as e:  # an unexpected failure is still one line unless --debug
        if args.debug:
            raise
        if isinstance(e, OSError) and e.filename:  # a file the user named cannot be read or written
            print(f"kiln: error: {e.filename}: {e.strerror or type(e).__name__}", file=sys.stderr)
            return 2
        msg = (str(e).strip().splitlines() or [""])[0]
        print(f"kiln: internal error: {type(e).__name__}: {msg} (rerun with --debug for details)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
