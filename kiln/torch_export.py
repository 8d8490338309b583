"""The way in from PyTorch: `from_torch(module, example_inputs)` exports a module to ONNX, builds it and
returns an Engine.

The export is torch's own ONNX exporter (`torch.onnx.export(..., dynamo=True)`, built on torch.export and
onnxscript, both installed with Kiln); the TorchScript exporter it replaces is deprecated in torch 2.9+
and is not used. The ONNX model lives in a temporary folder (external data for models above 2 GB)
that is gone when the call returns: the Engine holds everything it needs.

Dynamic dims are given as torch.export takes them (`dynamic_shapes`): per input (by forward argument
name, or positionally), a dict {dim index: torch.export.Dim | Dim.AUTO | Dim.DYNAMIC | "name"}. Without
a profile in `config`, each dynamic dim gets one: opt = the example input's size, min and max from the
Dim's bounds; a dim without an upper bound gets max = max(UNBOUNDED_FACTOR x the example's size,
UNBOUNDED_MIN_MAX) and a warning naming the range (the plan refuses inputs outside its profile, and the
builder sizes memory for the max).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import logging
import os
import re
import tempfile
import warnings
from typing import Any, Iterator, Mapping, Sequence

import torch

from kiln.builder import Builder, BuilderConfig, OptimizationProfile
from kiln.errors import KilnError
from kiln.logger import Logger
from kiln.runtime.engine import Engine

__all__ = ["from_torch"]

UNBOUNDED_FACTOR = 4     # a dynamic dim without an upper bound: max = this x the example's size ...
UNBOUNDED_MIN_MAX = 16   # ... and at least this

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def from_torch(module: Any, example_inputs: Any, dynamic_shapes: Mapping[str, Any] | Sequence[Any] | None = None,
               config: BuilderConfig | None = None, input_names: Sequence[str] | None = None,
               output_names: Sequence[str] | None = None, *, logger: Logger | None = None) -> Engine:
    """Export `module` (a torch.nn.Module, in the mode it is in: call .eval() first) to ONNX, build it with
    `config` (default: BuilderConfig(), the CPU) and return the Engine.

    example_inputs: a tensor or a tuple/list of tensors, the module's positional arguments; they fix the
    static dims and the opt point of the dynamic ones. dynamic_shapes: as torch.export takes it (see the
    module docstring); ignored for the profile when `config` has profiles of its own. input_names /
    output_names: the plan's I/O names (default: the forward's argument names, the exporter's output names).
    Every failure (export, an op without an ONNX translation, an op Kiln cannot build) is a KilnError of one
    line naming its cause."""
    logger = logger or Logger()
    if not isinstance(module, torch.nn.Module):
        raise KilnError(f"from_torch: expected a torch.nn.Module, got {type(module).__name__}")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(args, (tuple, list)) or not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise KilnError("from_torch: example_inputs must be a tensor or a non-empty tuple/list of tensors, got "
                        + (type(example_inputs).__name__ if not isinstance(args, (tuple, list)) else
                           "[" + ", ".join(type(a).__name__ for a in args) + "]"))
    args = tuple(args)
    name = type(module).__name__
    modal = (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._BatchNorm)
    training = sorted({type(m).__name__ for m in module.modules() if m.training and isinstance(m, modal)})
    if training:
        logger.warning(f"from_torch: {name} has {', '.join(training)} in training mode (exported as such: "
                       "dropout on, batch statistics); call .eval() first for inference")
    per_input = _dims_per_input(module, args, dynamic_shapes)
    with tempfile.TemporaryDirectory(prefix="kiln-from-torch-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        _export(module, args, path, dynamic_shapes, input_names, output_names, logger)
        import onnx
        model = onnx.load(path, load_external_data=False)
        cfg = config or BuilderConfig()
        if not cfg.profiles:
            profile = _profile(model, args, per_input, logger)
            if profile is not None:
                cfg = dataclasses.replace(cfg, profiles=[profile])
        try:
            plan = Builder(logger).build(path, cfg)
        except KilnError as e:
            raise type(e)(f"from_torch: {name} exported to ONNX but does not build: {e}") from None
    return Engine(plan, where=f"from_torch({name})")


@contextlib.contextmanager
def _quiet_export(logger: Logger) -> Iterator[None]:
    """The exporter's progress lines, graph dumps, warnings and log records held back (passed to the
    logger at VERBOSE): a failure is reported as one KilnError line."""
    out, err = io.StringIO(), io.StringIO()
    disabled = logging.root.manager.disable
    logging.disable(logging.CRITICAL)  # torch logs its export failures at ERROR too; ours is the one line
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)
        for text in (out.getvalue(), err.getvalue()):
            for line in text.splitlines():
                if line.strip():
                    logger.verbose(f"torch.onnx: {_ANSI.sub('', line)}")


def _export(module: Any, args: tuple[Any, ...], path: str, dynamic_shapes: Any, input_names: Sequence[str] | None,
            output_names: Sequence[str] | None, logger: Logger) -> None:
    name = type(module).__name__
    try:
        with _quiet_export(logger):
            program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False,
                                        input_names=list(input_names) if input_names else None,
                                        output_names=list(output_names) if output_names else None)
            program.save(path)
    except ImportError as e:
        raise KilnError(f"from_torch: torch's ONNX exporter needs a missing package ({_line(e)}); "
                        "reinstall Kiln (pip install -e .) to get onnxscript") from None
    except Exception as e:
        raise KilnError(f"from_torch: cannot export {name} to ONNX{_stage(e)}: {_cause(e)}") from None


def _stage(e: BaseException) -> str:
    """Which of the exporter's steps failed, from its error type."""
    kind = type(e).__name__
    return {"TorchExportError": " (torch.export could not capture the graph)",
            "ConversionError": " (no ONNX translation)"}.get(kind, "")


def _cause(e: BaseException) -> str:
    """The innermost cause of an exporter error, as one line: the outer ones say which step failed and
    point at a report; the inner one says what in the module it could not take."""
    seen: list[BaseException] = []
    c: BaseException | None = e
    while c is not None and c not in seen and len(seen) < 16:
        seen.append(c)
        c = c.__cause__ or (c.__context__ if not c.__suppress_context__ else None)
    root = seen[-1]
    return f"{type(root).__name__}: {_line(root)}"


def _line(e: BaseException) -> str:
    text = _ANSI.sub("", str(e)).strip()
    line = next((s.strip() for s in text.splitlines() if s.strip()), type(e).__name__)
    return line if len(line) <= 300 else line[:297] + "..."


def _dims_per_input(module: Any, args: tuple[Any, ...], dynamic_shapes: Any) -> list[dict[int, Any]]:
    """torch.export's dynamic_shapes as {dim index: spec} per positional input (forward argument names
    mapped to positions)."""
    n = len(args)
    if dynamic_shapes is None:
        return [{} for _ in range(n)]
    if isinstance(dynamic_shapes, Mapping):
        try:
            params = [p for p in inspect.signature(module.forward).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            params = []
        names = [p.name for p in params][:n]
        unknown = [k for k in dynamic_shapes if k not in names]
        if unknown:
            raise KilnError(f"from_torch: dynamic_shapes names '{unknown[0]}', which is not one of the forward's "
                            f"arguments given in example_inputs ({', '.join(names) or 'none'})")
        specs = [dynamic_shapes.get(k) for k in names] + [None] * (n - len(names))
    elif isinstance(dynamic_shapes, (tuple, list)):
        if len(dynamic_shapes) != n:
            raise KilnError(f"from_torch: dynamic_shapes has {len(dynamic_shapes)} entries for {n} example inputs")
        specs = list(dynamic_shapes)
    else:
        raise KilnError(f"from_torch: dynamic_shapes must be a dict {{argument: {{dim: Dim}}}} or a tuple per "
                        f"input, got {type(dynamic_shapes).__name__}")
    out: list[dict[int, Any]] = []
    for a, spec in zip(args, specs):
        if spec is None:
            out.append({})
        elif isinstance(spec, Mapping):
            out.append({int(k) % max(a.dim(), 1): v for k, v in spec.items() if v is not None})
        elif isinstance(spec, (tuple, list)):
            out.append({k: v for k, v in enumerate(spec) if v is not None})
        else:
            raise KilnError(f"from_torch: a dynamic_shapes entry must be a dict {{dim: Dim}} or a list per dim, "
                            f"got {type(spec).__name__}")
    return out


def _bounds(spec: Any) -> tuple[int | None, int | None]:
    """(min, max) a torch.export.Dim declares; None where it does not (a name, Dim.AUTO, no max)."""
    lo, hi = getattr(spec, "min", None), getattr(spec, "max", None)
    lo = int(lo) if isinstance(lo, int) else None
    hi = int(hi) if isinstance(hi, int) and not isinstance(hi, bool) and hi < (1 << 62) else None
    return lo, hi


def _profile(model: Any, args: tuple[Any, ...], per_input: list[dict[int, Any]],
             logger: Logger) -> OptimizationProfile | None:
    """One profile for the exported model's dynamic dims: opt at the example, min/max from the Dims."""
    inputs = list(model.graph.input)
    if len(inputs) != len(args):
        raise KilnError(f"from_torch: the exported model has {len(inputs)} inputs for {len(args)} example inputs")
    prof = OptimizationProfile()
    guessed: list[str] = []
    for v, a, dims in zip(inputs, args, per_input):
        decl = v.type.tensor_type.shape.dim
        dynamic = [k for k, d in enumerate(decl) if not d.HasField("dim_value")]
        if not dynamic:
            continue
        opt = tuple(int(s) for s in a.shape)
        mn, mx = list(opt), list(opt)
        for k in dynamic:
            lo, hi = _bounds(dims.get(k))
            mn[k] = min(max(lo if lo is not None else 1, 1), opt[k])
            if hi is None:
                hi = max(UNBOUNDED_FACTOR * opt[k], UNBOUNDED_MIN_MAX)
                guessed.append(f"{v.name}[{k}] {mn[k]}..{hi}")
            mx[k] = max(hi, opt[k])
        prof.set_shape(v.name, tuple(mn), opt, tuple(mx))
    if guessed:
        logger.warning("from_torch: dynamic dims without an upper bound get the profile range "
                       + ", ".join(guessed) + " (opt at the example inputs); give torch.export.Dim(name, max=N), "
                       "or a BuilderConfig with profiles, for another range")
    return prof if prof.shapes else None
