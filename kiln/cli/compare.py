"""`kiln compare`: run one ONNX model through Kiln and onnxruntime on the same inputs and compare the outputs
(Polygraphy-style): per output max/mean absolute and relative error against a tolerance, a table, exit 0 when
every output matches and 1 on a mismatch (2 for bad input). `--mark-all` also compares every intermediate value
that survives Kiln's optimization and names the first layer that diverges; `--save-outputs DIR` keeps the
inputs and both sides' outputs as .npy files."""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.cli.options import add_build_options, builder_config, parse_shapes
from kiln.errors import KilnError

# Default tolerances per precision, loosest asked wins: (rtol, atol).
DEFAULT_TOLERANCES = {"fp32": (1e-3, 1e-4), "fp16": (1e-2, 1e-2), "bf16": (5e-2, 5e-2), "int8": (1e-1, 1e-1)}
_PRECISION_ORDER = ("fp32", "fp16", "bf16", "int8")
REL_EPS = 1e-12  # relative error = |kiln - ort| / max(|ort|, REL_EPS)
INT_RANGE = (0, 4)  # random integer inputs: small non-negative values in [0, 4)
_REF = "onnxruntime"


@dataclass(frozen=True)
class Tolerance:
    """np.allclose-style: |kiln - ref| <= atol + rtol * |ref| elementwise."""

    rtol: float
    atol: float


@dataclass
class Diff:
    """One value compared: Kiln's array against the reference's.

    problem: why the value fails without elementwise errors (shape or dtype differ, missing on one side).
    bad: elements outside the tolerance; worst: index of the element furthest outside it.
    """

    name: str
    dtype: str
    shape: list[int]
    tol: Tolerance
    exact: bool = False
    max_abs: float = math.nan
    mean_abs: float = math.nan
    max_rel: float = math.nan
    mean_rel: float = math.nan
    size: int = 0
    bad: int = 0
    worst: tuple[int, ...] | None = None
    got_worst: float = math.nan
    ref_worst: float = math.nan
    problem: str | None = None
    note: str | None = None  # why the value was not compared (not a failure)

    @property
    def passed(self) -> bool:
        return self.problem is None and self.bad == 0

    def verdict(self) -> str:
        if self.note is not None:
            return f"not compared ({self.note})"
        if self.problem is not None:
            return f"FAIL ({self.problem})"
        return "PASS" if self.bad == 0 else f"FAIL ({self.bad}/{self.size} elements)"


def add_compare_parser(sub: Any) -> argparse.ArgumentParser:
    """The `kiln compare` subcommand on the top-level parser's subparsers."""
    p = sub.add_parser("compare", help="compare Kiln's outputs (and intermediates) with onnxruntime's")
    p.add_argument("model", help="the ONNX model")
    p.add_argument("--weights", metavar="FILE",
                   help="Darknet .weights: a .cfg model is refused in one line (the reference, onnxruntime, needs ONNX)")
    add_build_options(p)
    p.add_argument("--input", action="append", metavar="NAME=FILE",
                   help="an input from a .npy or .pb file (default: seeded random data)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--rtol", type=float, help="relative tolerance of every value without a --tol (default by precision)")
    p.add_argument("--atol", type=float, help="absolute tolerance of every value without a --tol (default by precision)")
    p.add_argument("--tol", action="append", metavar="NAME:RTOL:ATOL", help="tolerance of one value")
    p.add_argument("--mark-all", action="store_true",
                   help="also compare every intermediate value that survives optimization, and name the first "
                   "layer that diverges")
    p.add_argument("--save-outputs", metavar="DIR", help="write the inputs and both sides' outputs as .npy files")
    p.set_defaults(func=cmd_compare)
    return p


# ---------------------------------------------------------------------------------------------- arguments


def _nonneg(x: float, flag: str) -> float:
    if not (math.isfinite(x) and x >= 0):
        raise KilnError(f"{flag} must be a finite number >= 0, got {x}")
    return x


def parse_tols(items: list[str] | None) -> dict[str, Tolerance]:
    """--tol NAME:RTOL:ATOL items (a name may hold ':'; the last two fields are the numbers)."""
    out: dict[str, Tolerance] = {}
    for item in items or []:
        parts = item.rsplit(":", 2)
        if len(parts) != 3 or not parts[0]:
            raise KilnError(f"--tol: expected NAME:RTOL:ATOL, got '{item}'")
        try:
            rtol, atol = float(parts[1]), float(parts[2])
        except ValueError:
            raise KilnError(f"--tol {item}: RTOL and ATOL must be numbers") from None
        out[parts[0]] = Tolerance(_nonneg(rtol, f"--tol {item}: RTOL"), _nonneg(atol, f"--tol {item}: ATOL"))
    return out


def _onnx_only(args: argparse.Namespace) -> None:
    """The reference runs the model in onnxruntime: a Darknet .cfg (or --weights) is refused in one line."""
    if args.model.lower().endswith(".cfg"):
        raise KilnError(f"kiln compare needs an ONNX model (onnxruntime is the reference), and {args.model} is a "
                        f"Darknet .cfg: compare the network's ONNX export, or time this one with "
                        f"`kiln bench {args.model} --weights W`")
    if args.weights:
        raise KilnError("--weights goes with a Darknet .cfg model, which kiln compare cannot take (it needs ONNX); "
                        "an ONNX model holds its own weights")


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise KilnError("kiln compare needs onnxruntime, which is not installed: pip install onnxruntime "
                        "(or pip install -e '.[test]')") from None
    return onnxruntime


def _check_folder(path: str) -> None:
    """--save-outputs: refuse, before any work, a folder that could not be made or written."""
    full = os.path.abspath(path)
    if os.path.exists(full) and not os.path.isdir(full):
        raise KilnError(f"--save-outputs {path}: not a folder")
    up = full
    while not os.path.exists(up) and os.path.dirname(up) != up:
        up = os.path.dirname(up)
    if not os.path.isdir(up):
        raise KilnError(f"--save-outputs {path}: {up} is not a folder")
    if not os.access(up, os.W_OK | os.X_OK):
        raise KilnError(f"--save-outputs {path}: folder {up} is not writable")


def _load_model(path: str) -> Any:
    """The ModelProto without its external data (names and types only; onnxruntime reads the file itself)."""
    import onnx
    if not os.path.isfile(path):
        raise KilnError(f"model file not found: {path}")
    try:
        return onnx.load(path, load_external_data=False)
    except Exception as e:
        raise KilnError(f"cannot read ONNX model {path} ({type(e).__name__})") from None


def _model_inputs(model: Any) -> dict[str, list[str | None]]:
    """The model's inputs (not initializers), each with its dims: None where static, else the symbol ('?' if
    unnamed)."""
    inits = {i.name for i in model.graph.initializer}
    out: dict[str, list[str | None]] = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        t = i.type.tensor_type if i.type.HasField("tensor_type") else None
        dims = t.shape.dim if t is not None and t.HasField("shape") else []
        out[i.name] = [None if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?") for d in dims]
    return out


def _read_inputs(items: list[str] | None, names: list[str]) -> dict[str, tuple[np.ndarray, str]]:
    """--input NAME=FILE items -> {name: (array, file)}; a bare FILE names the only input."""
    from kiln.cli.main import _read_tensor
    out: dict[str, tuple[np.ndarray, str]] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep:
            if len(names) != 1:
                raise KilnError(f"--input {item}: name the input (name=file); inputs are {', '.join(names)}")
            name, path = names[0], item
        if name not in names:
            raise KilnError(f"--input: unknown input '{name}'; inputs are: {', '.join(names)}")
        out[name] = (_read_tensor(path, f"input '{name}'"), path)
    return out


# ------------------------------------------------------------------------------------------------- inputs


def _numpy_dtype(name: str) -> np.dtype:
    if name in ("bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz"):
        import ml_dtypes
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def random_input(rng: np.random.Generator, dtype: np.dtype, shape: list[int]) -> np.ndarray:
    """Random data: floats standard normal, integers in INT_RANGE, bools fair coin flips."""
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        return rng.integers(INT_RANGE[0], INT_RANGE[1], size=shape).astype(dtype)
    if dtype.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    return rng.standard_normal(shape).astype(np.float32).astype(dtype)


def make_inputs(plan: Any, given: dict[str, tuple[np.ndarray, str]], seed: int, fixed: set[str],
                symbols: dict[str, list[str | None]]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Feeds for every plan input (the files given, else seeded random data) and one line on each.

    symbols: the model's dynamic dims per input (see _model_inputs); they take --shapes (`fixed`: the builder
    pins them in the plan), else the build profile's opt, else 1."""
    from kiln.settings import settings
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    lines: list[str] = []
    limit = settings().max_activation_bytes
    for spec in plan.inputs:
        name = spec["name"]
        if name in given:
            arr, path = given[name]
            feeds[name] = arr
            lines.append(f"input '{name}': {arr.dtype} {list(arr.shape)} from {path}")
            continue
        if spec.get("kind", "tensor") != "tensor":
            raise KilnError(f"input '{name}' is a {spec.get('kind')}: no random data for it; give --input {name}=FILE")
        try:
            dtype = _numpy_dtype(spec.get("dtype") or "float32")
        except (TypeError, AttributeError):
            raise KilnError(f"input '{name}': no random data for element type {spec.get('dtype')!r}; "
                            f"give --input {name}=FILE") from None
        declared = spec.get("shape")
        if not isinstance(declared, list):
            raise KilnError(f"input '{name}' has no known rank: no random data for it; give --input {name}=FILE")
        opt = next((p[name]["opt"] for p in plan.profiles if isinstance(p, dict) and name in p), None)
        shape = [d if isinstance(d, int) else (int(opt[i]) if opt is not None else 1) for i, d in enumerate(declared)]
        sym = symbols.get(name) or []
        dynamic = [i for i, d in enumerate(declared) if not isinstance(d, int) or (i < len(sym) and sym[i])]
        if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > limit:
            raise KilnError(f"input '{name}': random data of shape {shape} is over the {limit}-byte limit "
                            f"(KILN_MAX_ACTIVATION_BYTES); give --input {name}=FILE")
        feeds[name] = random_input(rng, dtype, shape)
        kind = ("standard normal" if dtype.kind in "fcV" else "fair bools" if dtype == np.bool_
                else f"integers in [{INT_RANGE[0]}, {INT_RANGE[1]})")
        line = f"input '{name}': {dtype} {shape}, random {kind} (seed {seed})"
        if dynamic:
            dims = ", ".join(f"{sym[i] if i < len(sym) and sym[i] else declared[i]}={shape[i]}" for i in dynamic)
            src = ("--shapes" if name in fixed else "the build profile's opt" if opt is not None
                   else "no profile: set to 1, give --shapes to choose")
            line += f"; dynamic dims {dims} ({src})"
        lines.append(line)
    return feeds, lines


# ------------------------------------------------------------------------------------------------ compare


def compare_arrays(name: str, got: Any, ref: Any, tol: Tolerance, check_dtype: bool = True) -> Diff:
    """Kiln's value against the reference's, in float64. Integer and bool values compare exactly unless a
    tolerance is given for them by name (the caller passes it); NaN matches NaN, inf matches the same inf."""
    if not isinstance(got, np.ndarray) or not isinstance(ref, np.ndarray):
        return Diff(name, type(got).__name__, [], tol, note="not a tensor")
    d = Diff(name, str(got.dtype), list(got.shape), tol, size=int(got.size))
    if got.shape != ref.shape:
        d.problem = f"shape {list(got.shape)} vs {_REF} {list(ref.shape)}"
        return d
    if check_dtype and got.dtype != ref.dtype:
        d.problem = f"dtype {got.dtype} vs {_REF} {ref.dtype}"
    a, b = got.astype(np.float64), ref.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        diff = np.where(same, 0.0, np.abs(a - b))
        diff = np.where(np.isnan(diff) & ~same, np.inf, diff)  # inf vs -inf, or a NaN on one side only
        rel = diff / np.maximum(np.abs(b), REL_EPS)
        allowed = tol.atol + tol.rtol * np.abs(b)
        over = ~(diff <= allowed)
    if a.size:
        d.max_abs, d.mean_abs = float(diff.max()), float(diff.mean())
        d.max_rel, d.mean_rel = float(np.nanmax(rel)), float(np.nanmean(rel))
        d.bad = int(over.sum())
        if d.bad:
            with np.errstate(invalid="ignore"):
                excess = np.where(over, np.nan_to_num(diff - allowed, nan=np.inf), -np.inf)
            idx = np.unravel_index(int(np.argmax(excess)), a.shape)
            d.worst, d.got_worst, d.ref_worst = tuple(int(i) for i in idx), float(a[idx]), float(b[idx])
    else:
        d.max_abs = d.mean_abs = d.max_rel = d.mean_rel = 0.0
    return d


def _is_exact(arr: Any) -> bool:
    return isinstance(arr, np.ndarray) and arr.dtype.kind in "biu"


def default_tolerance(args: argparse.Namespace, cfg: Any, plan: Any) -> tuple[Tolerance, str]:
    """The tolerance of every value without its own --tol, and where it comes from (for the output)."""
    asked = {"fp32"} | {p for p, flag in (("fp16", args.fp16), ("bf16", args.bf16), ("int8", args.int8)) if flag}
    asked |= set(cfg.layer_precisions.values())
    qdq = any(s.get("op") in ("QConv", "QGemm") for s in plan.graph.get("steps", []))
    if qdq:
        asked.add("int8")
    loosest = max(asked, key=_PRECISION_ORDER.index)
    rtol, atol = DEFAULT_TOLERANCES[loosest]
    why = {"fp32": "defaults for FP32", "fp16": "defaults for FP16", "bf16": "defaults for BF16",
           "int8": "defaults for INT8"}[loosest]
    if loosest == "int8" and qdq and not args.int8:
        why += ": the plan has integer layers"
    if args.rtol is not None or args.atol is not None:
        why = "--rtol/--atol" if args.rtol is not None and args.atol is not None else why + ", with " + (
            "--rtol" if args.rtol is not None else "--atol")
        rtol = args.rtol if args.rtol is not None else rtol
        atol = args.atol if args.atol is not None else atol
    return Tolerance(rtol, atol), why


def _tolerance_of(name: str, arr: Any, tols: dict[str, Tolerance], default: Tolerance) -> tuple[Tolerance, bool]:
    """(tolerance, exact): --tol by name, else exact for integer and bool values, else the default."""
    if name in tols:
        return tols[name], False
    return (Tolerance(0.0, 0.0), True) if _is_exact(arr) else (default, False)


# ------------------------------------------------------------------------------------------------ running


def _run_kiln(plan: Any, feeds: dict[str, np.ndarray], mark_all: bool) -> tuple[dict[str, Any], Any]:
    from kiln.runtime.capture import StepCapture
    from kiln.runtime.engine import Engine
    engine = Engine(plan)
    ctx = engine.create_execution_context(cuda_graph=False if mark_all else None)
    capture = StepCapture() if mark_all else None
    ctx.profiler = capture
    outs = ctx.execute(feeds)
    return outs, capture


def _has_external_data(model: Any) -> bool:
    from onnx import TensorProto
    return any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)


def _with_outputs(model: Any, names: list[str]) -> Any:
    """A copy of the model returning `names` too. Each added output gets the element type onnx's shape
    inference finds for it (no shape: the model's own value_info may be stale), else no type (onnxruntime
    fills it in)."""
    import onnx
    m = onnx.ModelProto()
    m.CopyFrom(model)
    types: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                types[vi.name] = vi.type.tensor_type.elem_type
    except Exception:  # inference is a help, not a requirement
        pass
    for n in names:
        if n in types:
            m.graph.output.append(onnx.helper.make_tensor_value_info(n, types[n], None))
        else:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
    return m


def _run_ort(ort: Any, path: str, model: Any, feeds: dict[str, np.ndarray], extra: list[str]
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    """onnxruntime on the CPU (default optimizations): (its outputs, the intermediates `extra` named)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    tmp: str | None = None
    try:
        if not extra:
            src: Any = path
        elif not _has_external_data(model):
            src = _with_outputs(model, extra).SerializeToString()
        else:  # external data is found relative to the model file: the copy goes beside it
            import onnx
            fd, tmp = tempfile.mkstemp(prefix=".kiln-compare-", suffix=".onnx",
                                       dir=os.path.dirname(os.path.abspath(path)))
            os.close(fd)
            onnx.save(_with_outputs(model, extra), tmp)
            src = tmp
        try:
            sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
            names = [o.name for o in sess.get_outputs()]
            need = [i.name for i in sess.get_inputs()]
            missing = [n for n in need if n not in feeds]
            if missing:
                raise KilnError(f"{_REF} needs input '{missing[0]}', which the Kiln plan does not take")
            res = sess.run(None, {n: feeds[n] for n in need})
        except KilnError:
            raise
        except Exception as e:
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise KilnError(f"{_REF} cannot run the model: {msg}") from None
    except OSError as e:
        raise KilnError(f"--mark-all: cannot write a temporary copy of the model beside {path} "
                        f"({e.strerror or type(e).__name__})") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    n_out = len(model.graph.output)
    return dict(zip(names[:n_out], res[:n_out])), dict(zip(names[n_out:], res[n_out:]))


# ----------------------------------------------------------------------------------------------- printing


def _num(x: float) -> str:
    return f"{x:.3e}" if math.isfinite(x) else str(x)


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in [header, *rows]]


def _tol_cells(d: Diff) -> list[str]:
    return ["exact", "exact"] if d.exact else [f"{d.tol.rtol:g}", f"{d.tol.atol:g}"]


def _error_cells(d: Diff) -> list[str]:
    if d.note is not None or (d.problem is not None and d.problem.startswith(("shape", "missing"))):
        return ["-"] * 4
    return [_num(d.max_abs), _num(d.mean_abs), _num(d.max_rel), _num(d.mean_rel)]


def _worst(d: Diff) -> str:
    return f"worst at {list(d.worst or ())}: kiln {d.got_worst:.9g} vs {_REF} {d.ref_worst:.9g}"


def _detail(d: Diff, what: str) -> str | None:
    if d.worst is None:
        return None
    return (f"{what} '{d.name}': {d.bad} of {d.size} elements outside rtol {d.tol.rtol:g}, atol {d.tol.atol:g}; "
            f"{_worst(d)}")


def _compare_outputs(kiln: dict[str, Any], ref: dict[str, Any], tols: dict[str, Tolerance], default: Tolerance
                     ) -> list[Diff]:
    diffs = []
    for name in list(ref) + [n for n in kiln if n not in ref]:
        got, want = kiln.get(name), ref.get(name)
        tol, exact = _tolerance_of(name, want if want is not None else got, tols, default)
        if got is None or want is None:
            side = "Kiln" if got is None else _REF
            diffs.append(Diff(name, "-", [], tol, exact, problem=f"missing in {side}"))
            continue
        d = compare_arrays(name, np.asarray(got) if not isinstance(got, list) else got,
                           np.asarray(want) if not isinstance(want, list) else want, tol)
        d.exact = exact
        diffs.append(d)
    return diffs


def _print_outputs(diffs: list[Diff]) -> None:
    rows = [[d.name, d.dtype, str(d.shape), *_error_cells(d), *_tol_cells(d), d.verdict()] for d in diffs]
    for line in _table(["output", "dtype", "shape", "max abs", "mean abs", "max rel", "mean rel", "rtol", "atol",
                        "result"], rows, right={3, 4, 5, 6, 7, 8}):
        print(line)
    for d in diffs:
        line = _detail(d, "output")
        if line:
            print(line)


@dataclass
class _Intermediate:
    layer: str
    op: str
    tactic: str
    name: str
    status: str  # "compared", "no counterpart", "other shape", "quantized", "not float", "not a tensor"
    diff: Diff | None = None
    shape: list[int] | None = None


def _mark_all(capture: Any, plan: Any, ref: dict[str, Any], ref_outs: dict[str, Any],
              tols: dict[str, Tolerance], default: Tolerance) -> list[_Intermediate]:
    import torch
    tactics = {s["name"]: s.get("tactic", "?") for s in plan.graph.get("steps", [])}
    both = {**ref, **ref_outs}
    items = []
    for cv in capture.values:
        tactic = tactics.get(cv.layer, "?")
        if cv.tensor is None:
            items.append(_Intermediate(cv.layer, cv.op, tactic, cv.name, cv.skipped or "not a tensor",
                                       shape=list(cv.shape) if cv.shape is not None else None))
            continue
        t = cv.tensor
        got = (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # integers and bools stay, to compare exactly
        shape = list(got.shape)
        want = both.get(cv.name)
        if not isinstance(want, np.ndarray):
            items.append(_Intermediate(cv.layer, cv.op, tactic, cv.name, "no counterpart", shape=shape))
        elif want.shape != got.shape:
            items.append(_Intermediate(cv.layer, cv.op, tactic, cv.name, "other shape", shape=shape,
                                       diff=Diff(cv.name, str(got.dtype), shape, default,
                                                 problem=f"shape {shape} vs {_REF} {list(want.shape)}")))
        else:
            tol, exact = _tolerance_of(cv.name, want, tols, default)
            d = compare_arrays(cv.name, got, want, tol, check_dtype=False)
            d.exact = exact
            items.append(_Intermediate(cv.layer, cv.op, tactic, cv.name, "compared", d, shape))
    return items


def _print_mark_all(items: list[_Intermediate]) -> _Intermediate | None:
    """The intermediates' table and summary; returns the first divergence (None when there is none)."""
    status = {"no counterpart": "no counterpart", "quantized": "skipped (int8/uint8)",
              "not float": "skipped (not float)", "not a tensor": "skipped (not a tensor)"}
    first = next((it for it in items if it.status == "compared" and it.diff is not None and not it.diff.passed), None)
    rows = []
    for it in items:
        d = it.diff
        errs = _error_cells(d)[:3] if it.status == "compared" and d is not None else ["-"] * 3
        res = (d.verdict() if it.status == "compared" and d is not None else
               f"other shape ({d.problem})" if it.status == "other shape" and d is not None else status[it.status])
        mark = "  <- first divergence" if it is first else ""
        rows.append([it.layer, it.op, it.tactic, it.name, str(it.shape) if it.shape is not None else "-",
                     *errs, res + mark])
    print()
    print("intermediates (--mark-all), in Kiln's step order:")
    for line in _table(["layer", "op", "tactic", "value", "shape", "max abs", "mean abs", "max rel", "result"],
                       rows, right={5, 6, 7}):
        print("  " + line)
    compared = [it for it in items if it.status == "compared"]
    matched = sum(1 for it in compared if it.diff is not None and it.diff.passed)
    count = {k: sum(1 for it in items if it.status == k) for k in status.keys() | {"other shape"}}
    layers = len({it.layer for it in items})
    print(f"{len(items)} values from {layers} layers: {len(compared)} compared ({matched} matched), "
          f"{count['no counterpart']} without a counterpart in the ONNX model, {count['other shape']} with another "
          f"shape; skipped: {count['quantized']} int8/uint8 (quantized), "
          f"{count['not float'] + count['not a tensor']} other non-float")
    if first is not None and first.diff is not None:
        d = first.diff
        print(f"first divergence: layer '{first.layer}' ({first.op}, tactic {first.tactic}), value '{d.name}': "
              f"max abs err {_num(d.max_abs)}, max rel err {_num(d.max_rel)}, {d.bad} of {d.size} elements "
              f"outside rtol {d.tol.rtol:g}, atol {d.tol.atol:g}" + (f"; {_worst(d)}" if d.worst is not None else ""))
    elif compared:
        print("no divergence: every compared intermediate is within tolerance")
    return first


# ------------------------------------------------------------------------------------------------- saving


def _safe(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")[:100]
    return s or "tensor"


def _savable(arr: np.ndarray) -> np.ndarray:
    """numpy cannot reload ml_dtypes' types from a .npy without them: those are saved as float32."""
    return arr.astype(np.float32) if arr.dtype.kind == "V" or type(arr.dtype).__module__.startswith("ml_dtypes") \
        else arr


def save_outputs(folder: str, groups: dict[str, dict[str, Any]], meta: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Write each group's arrays as GROUP_NAME.npy (names made file-safe, collisions numbered) and manifest.json
    mapping tensor names to files. Files are written in a hidden folder inside `folder` and moved in one by
    one when all are written (manifest last): a failure leaves no partial file. Returns the manifest's map."""
    try:
        os.makedirs(folder, exist_ok=True)
        stage = tempfile.mkdtemp(prefix=".kiln-compare-", dir=folder)
    except OSError as e:
        raise KilnError(f"--save-outputs {folder}: {e.strerror or type(e).__name__}") from None
    files: dict[str, dict[str, str]] = {}
    try:
        taken: set[str] = set()
        for group, arrays in groups.items():
            files[group] = {}
            for name, arr in arrays.items():
                if not isinstance(arr, np.ndarray):
                    continue  # sequences and maps: not saved
                base = f"{group}_{_safe(name)}"
                fn, k = f"{base}.npy", 1
                while fn.lower() in taken:
                    k += 1
                    fn = f"{base}_{k}.npy"
                taken.add(fn.lower())
                np.save(os.path.join(stage, fn), _savable(arr), allow_pickle=False)
                files[group][name] = fn
        with open(os.path.join(stage, "manifest.json"), "w") as f:
            json.dump({**meta, "files": files}, f, indent=1)
        for fn in (fn for g in files.values() for fn in g.values()):
            os.replace(os.path.join(stage, fn), os.path.join(folder, fn))
        os.replace(os.path.join(stage, "manifest.json"), os.path.join(folder, "manifest.json"))
    except OSError as e:
        raise KilnError(f"--save-outputs {folder}: cannot write ({e.strerror or type(e).__name__})") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return files


# ----------------------------------------------------------------------------------------------- command


def cmd_compare(args: argparse.Namespace) -> int:
    """`kiln compare`: 0 when every compared value is within tolerance, 1 on a mismatch (bad input: KilnError)."""
    from kiln.builder import Builder
    from kiln.logger import Logger, Severity
    for flag in ("rtol", "atol"):
        if getattr(args, flag) is not None:
            _nonneg(getattr(args, flag), f"--{flag}")
    if args.seed < 0:
        raise KilnError(f"--seed must be >= 0, got {args.seed}")
    tols = parse_tols(args.tol)
    _onnx_only(args)
    ort = _import_ort()
    if args.save_outputs:
        _check_folder(args.save_outputs)
    model = _load_model(args.model)
    inputs = _model_inputs(model)
    known = {o.name for o in model.graph.output}
    if args.mark_all:
        known |= {o for n in model.graph.node for o in n.output if o}
    for name in tols:
        if name not in known:
            where = ("a value of the model" if args.mark_all
                     else "an output of the model (values inside it: with --mark-all)")
            raise KilnError(f"--tol: '{name}' is not {where}; outputs are: "
                            f"{', '.join(o.name for o in model.graph.output)}")
    given = _read_inputs(args.input, list(inputs))
    cfg = builder_config(args)
    plan = Builder(Logger(Severity.WARNING)).build(args.model, cfg)
    feeds, lines = make_inputs(plan, given, args.seed, set(parse_shapes(args.shapes, "--shapes")), inputs)
    default, why = default_tolerance(args, cfg, plan)

    kiln_outs, capture = _run_kiln(plan, feeds, args.mark_all)
    extra: list[str] = []
    if capture is not None:  # the intermediates Kiln kept that the model's own nodes compute
        produced = {o for n in model.graph.node for o in n.output if o} - {o.name for o in model.graph.output}
        extra = list(dict.fromkeys(cv.name for cv in capture.values if cv.tensor is not None and cv.name in produced))
    ref_outs, ref_inter = _run_ort(ort, args.model, model, feeds, extra)

    print(f"kiln compare {args.model}: Kiln ({plan.target.get('device')}, {plan.build.get('layers')} layers) "
          f"vs {_REF} {ort.__version__} (CPUExecutionProvider)")
    for line in lines:
        print(line)
    print(f"tolerance: rtol {default.rtol:g}, atol {default.atol:g} ({why})"
          + (f", --tol for {', '.join(repr(n) for n in tols)}" if tols else "")
          + f"; a value passes when |kiln - {_REF}| <= atol + rtol * |{_REF}| everywhere; integer and bool "
          f"values must match exactly")
    print(f"errors: abs = |kiln - {_REF}|, rel = abs / max(|{_REF}|, {REL_EPS:g})")
    diffs = _compare_outputs(kiln_outs, ref_outs, tols, default)
    _print_outputs(diffs)
    first = None
    items: list[_Intermediate] = []
    if capture is not None:
        items = _mark_all(capture, plan, ref_inter, ref_outs, tols, default)
        first = _print_mark_all(items)
    if args.save_outputs:
        save_outputs(args.save_outputs, {"input": feeds, "kiln": kiln_outs, _REF: ref_outs},
                     {"model": os.path.abspath(args.model), "seed": args.seed})
        print(f"saved inputs and outputs to {args.save_outputs} (manifest.json names the files)")
    failed = [d for d in diffs if not d.passed]
    if failed:
        print(f"FAILED: {len(failed)} of {len(diffs)} outputs differ from {_REF}: "
              f"{', '.join(repr(d.name) for d in failed)}")
    elif first is not None:
        print(f"FAILED: every output matches {_REF}, but intermediates diverge from layer '{first.layer}'")
    else:
        print(f"PASSED: {len(diffs)} of {len(diffs)} outputs match {_REF}"
              + (f", and {sum(1 for it in items if it.status == 'compared')} intermediates" if items else ""))
    return 1 if failed or first is not None else 0
