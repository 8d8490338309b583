"""Engine (a loaded plan with materialized kernels) and ExecutionContext (per-caller state).

On CUDA an Engine holds the weights on the device once (prepacked inside the kernels that want
another layout); each ExecutionContext captures the whole step list as a CUDA graph per input shape
(its own static buffers and memory pool) and replays it on the caller's stream, so several contexts
run concurrently on their own streams.
"""
from __future__ import annotations

import os
import time
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from kiln.backends.kernel import Kernel
from kiln.backends.tactic import TacticContext, get_tactic
from kiln.errors import InputError, KilnError, PlanFormatError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node
from kiln.plan.format import Plan, load_plan
from kiln.plan.serialize import GraphReader
from kiln.runtime.cuda_graph import CapturedGraph, capturable
from kiln.runtime.flags import cuda_flags
from kiln.runtime.interpreter import GraphFunction


def _load_kernel(node: Node, tid: str, cfg: dict[str, Any], tctx: TacticContext, where: str) -> Kernel:
    """The plan's kernel for one node, after checking, as the builder did, that its tactic takes the node
    on this target with this config: a plan is untrusted input, and a tactic's kernel is only safe on the
    nodes its `supports` accepts."""
    at = f"{where}: layer '{node.name}' ({node.op_type})"
    t = get_tactic(tid)
    if t is None:
        raise PlanFormatError(f"{at}: plan names tactic '{tid}' unknown to this Kiln version")
    try:
        ok = tctx.device.type in t.devices and t.supports(node, tctx)
        ok_cfg = ok and (tid == "ref" or cfg in t.configs(node, tctx))
    except KilnError as e:
        raise PlanFormatError(f"{at}: {e}") from None
    except Exception as e:
        raise PlanFormatError(f"{at}: tactic '{tid}' cannot check the layer ({type(e).__name__}: {_line(e)})") from None
    if not ok:
        raise PlanFormatError(f"{at}: tactic '{tid}' does not support this layer on {tctx.device.type}")
    if not ok_cfg:
        raise PlanFormatError(f"{at}: tactic '{tid}' has no config {cfg!r} for this layer")
    try:
        return t.make(node, cfg, tctx.device)
    except KilnError as e:
        raise PlanFormatError(f"{at}: {e}") from None
    except Exception as e:
        raise PlanFormatError(f"{at}: tactic '{tid}' cannot build the layer ({type(e).__name__}: {_line(e)})") from None


def _line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _check_target(plan: Plan, where: str) -> torch.device:
    dev = plan.target.get("device")
    if dev == "cpu":
        return torch.device("cpu")
    if dev == "cuda":
        if not torch.cuda.is_available():
            raise PlanFormatError(f"{where}: plan was built for CUDA (compute capability "
                                  f"{plan.target.get('capability')}) but no CUDA GPU is available")
        cc = torch.cuda.get_device_capability()
        have = f"{cc[0]}.{cc[1]}"
        if have != plan.target.get("capability"):
            raise PlanFormatError(f"{where}: plan was built for compute capability {plan.target.get('capability')}, "
                                  f"this GPU is {have}; rebuild the plan on this GPU")
        return torch.device("cuda")
    raise PlanFormatError(f"{where}: plan has an unknown target {plan.target!r}")


class Engine:
    """A plan ready to run: weights on the target device, kernels built once, shared by contexts."""

    def __init__(self, plan: Plan, where: str = "plan") -> None:
        self.plan = plan
        self.device = _check_target(plan, where)
        reader = GraphReader(plan.weights)
        self.graph = reader.graph(plan.graph)
        tactics = reader.tactics

        tctx = TacticContext(self.device, fp16=plan.build.get("fp16") is True, bf16=plan.build.get("bf16") is True,
                             tf32=plan.build.get("tf32", True) is not False,
                             extra={"opt_level": 3})
        self.kernels: list[Kernel] = []

        def factory(node: Node) -> Kernel:
            tid, cfg = tactics.get(id(node), ("ref", {}))
            kernel = _load_kernel(node, tid, cfg, tctx, where)
            self.kernels.append(kernel)
            return kernel

        t0 = time.perf_counter()
        self.function = GraphFunction(self.graph, self.device, factory)
        self.load_seconds = time.perf_counter() - t0
        self.input_specs = {d["name"]: d for d in plan.inputs}
        self._checks = {name: _InputCheck(name, d, self.shape_range(name)) for name, d in self.input_specs.items()}
        self.output_names = [d["name"] for d in plan.outputs]
        self.tf32 = bool(plan.build.get("tf32", True))
        self.graph_capturable, self.graph_reason = capturable(self.graph) if self.device.type == "cuda" else (False, "")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Engine":
        return cls(load_plan(path), os.fspath(path))

    @property
    def input_names(self) -> list[str]:
        return list(self.input_specs)

    def create_execution_context(self, cuda_graph: bool | None = None) -> "ExecutionContext":
        """A new context; on CUDA it replays CUDA graphs unless cuda_graph=False (or the plan cannot be captured)."""
        return ExecutionContext(self, cuda_graph)

    def shape_range(self, name: str) -> list[tuple[list[int], list[int]]]:
        """(min, max) per profile for an input; empty when no profile names it."""
        return [(p[name]["min"], p[name]["max"]) for p in self.plan.profiles if name in p]


class ExecutionContext:
    """Owns its input shapes and activation memory; many contexts may share one Engine."""

    def __init__(self, engine: Engine, cuda_graph: bool | None = None) -> None:
        self.engine = engine
        self.input_shapes: dict[str, tuple[int, ...]] = {}
        self.profiler: Any = None
        on_cuda = engine.device.type == "cuda"
        self.use_cuda_graph = on_cuda and engine.graph_capturable and cuda_graph is not False
        self._graphs: dict[tuple[Any, ...], CapturedGraph] = {}
        self._checked: set[tuple[Any, ...]] = set()
        self.last_graph: CapturedGraph | None = None

    def set_input_shape(self, name: str, shape: Sequence[int]) -> None:
        self._check_shape(name, tuple(int(d) for d in shape))
        self.input_shapes[name] = tuple(int(d) for d in shape)

    def _check(self, name: str) -> "_InputCheck":
        check = self.engine._checks.get(name)
        if check is None:
            raise InputError(f"unknown input '{name}'; inputs are: {', '.join(self.engine.input_specs)}")
        return check

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        self._check(name).shape(shape)

    def _to_tensor(self, name: str, x: Any) -> Any:
        check = self._check(name)
        if not check.is_tensor:
            return _tree_to_torch(x, self.engine.device)
        if isinstance(x, torch.Tensor):
            t = x
        else:
            from kiln.frontend.onnx import array_to_torch
            t = array_to_torch(x if isinstance(x, np.ndarray) else np.asarray(x), check.dtype)
        if check.scalar and t.dim() == 1 and t.numel() == 1:
            t = t.reshape(())  # a one-element vector fed to a scalar input
        if check.torch_dtype is not None and t.dtype != check.torch_dtype:
            got = DType.from_torch(t.dtype).value if t.dtype in _TORCH_NAMES else str(t.dtype)
            raise InputError(f"input '{name}' has dtype {got}, expected {check.dtype.value}")  # type: ignore[union-attr]
        check.shape(tuple(t.shape))
        if t.device != self.engine.device:
            t = t.to(self.engine.device, non_blocking=True)
        return t

    def execute(self, inputs: Mapping[str, Any] | Sequence[Any]) -> dict[str, Any]:
        """Run the plan. numpy in -> numpy out; torch in -> torch out (on the engine's device)."""
        args = self.execute_inputs(inputs)
        values = inputs.values() if isinstance(inputs, Mapping) else inputs
        numpy_io = not any(isinstance(x, torch.Tensor) for x in values)
        if self.engine.device.type == "cuda":
            outs = self._run_cuda(args, None)
            if self.last_graph is not None and not numpy_io:  # static buffers: hand out copies
                outs = [o.clone() if isinstance(o, torch.Tensor) else o for o in outs]
        else:
            outs = self.engine.function(args, hook=self.profiler)
        return {n: _to_numpy(o) if numpy_io else o for n, o in zip(self.engine.output_names, outs)}

    def execute_async(self, inputs: Mapping[str, Any] | Sequence[Any],
                      stream: torch.cuda.Stream | None = None) -> dict[str, Any]:
        """Enqueue a run on `stream` (default: the current stream) and return without waiting.

        Inputs are torch tensors (CUDA tensors are read in place); outputs are CUDA tensors. With CUDA
        graphs (the default on CUDA) the outputs are this context's static buffers: valid until the
        next call on this context, on this stream. Writing into `input_buffers()` skips the input copy.
        """
        if self.engine.device.type != "cuda":
            return self.execute(inputs)
        names = self.engine.input_names
        args = [inputs[n] for n in names] if isinstance(inputs, Mapping) else list(inputs)
        key = tuple((tuple(a.shape), a.dtype, a.device.type) if isinstance(a, torch.Tensor) else id(a) for a in args)
        if key not in self._checked or (isinstance(inputs, Mapping) and len(inputs) != len(names)):
            checked = self.execute_inputs(inputs)
            if all(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
                self._checked.add(key)
            args = checked
        else:
            args = list(args)
        outs = self._run_cuda(args, stream)
        return dict(zip(self.engine.output_names, outs))

    def execute_inputs(self, inputs: Mapping[str, Any] | Sequence[Any]) -> list[Any]:
        """Validated device tensors for a call (names, dtypes, shapes against the profiles)."""
        names = self.engine.input_names
        if not isinstance(inputs, Mapping):
            inputs = dict(zip(names, inputs))
        missing = [n for n in names if n not in inputs]
        if missing:
            raise InputError(f"missing input '{missing[0]}'; inputs are: {', '.join(names)}")
        extra = [n for n in inputs if n not in self.engine.input_specs]
        if extra:
            raise InputError(f"unknown input '{extra[0]}'; inputs are: {', '.join(names)}")
        return [self._to_tensor(n, inputs[n]) for n in names]

    def input_buffers(self) -> dict[str, Any]:
        """The static input tensors of the most recently used CUDA graph (write into them to skip copies)."""
        if self.last_graph is None:
            return {}
        return dict(zip(self.engine.input_names, self.last_graph.static_in))

    @property
    def graph_pool_bytes(self) -> int:
        """Device memory reserved by this context's captured graphs (activations and outputs)."""
        return sum(g.pool_bytes for g in self._graphs.values())

    def _run_cuda(self, args: list[Any], stream: torch.cuda.Stream | None) -> list[Any]:
        eng = self.engine
        stream = stream or torch.cuda.current_stream(eng.device)
        with torch.cuda.stream(stream):
            if self.use_cuda_graph and self.profiler is None:
                key = tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else None for a in args)
                cg = self._graphs.get(key)
                if cg is None:
                    cg = self._capture(args, key)
                if cg is not None:
                    self.last_graph = cg
                    return cg.run(args)
            self.last_graph = None
            with cuda_flags(eng.tf32):
                return eng.function(args, hook=self.profiler)

    def _capture(self, args: list[Any], key: tuple[Any, ...]) -> CapturedGraph | None:
        with cuda_flags(self.engine.tf32):
            try:
                cg = CapturedGraph(self.engine.function, args)
            except KilnError:
                raise
            except Exception as e:  # capture refused (host sync inside a kernel, ...): run eagerly from now on
                try:
                    torch.cuda.synchronize()
                except Exception:
                    pass
                msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
                warnings.warn(f"kiln: CUDA graph capture failed ({type(e).__name__}: {msg}); running eagerly")
                self.use_cuda_graph = False
                return None
        self._graphs[key] = cg
        return cg


_TORCH_NAMES = {d.torch for d in DType}


class _InputCheck:
    """An input's dtype, declared shape and profile ranges, decoded once per engine."""

    def __init__(self, name: str, spec: dict[str, Any], ranges: list[tuple[list[int], list[int]]]) -> None:
        self.name = name
        self.is_tensor = spec.get("kind", "tensor") == "tensor"
        self.dtype = DType(spec["dtype"]) if spec.get("dtype") else None
        self.torch_dtype = self.dtype.torch if self.dtype else None
        self.decl = spec.get("shape")
        self.scalar = self.decl == []
        self.ranges = ranges

    def shape(self, shape: tuple[int, ...]) -> None:
        decl = self.decl
        if decl is not None and (len(decl) != len(shape)
                                 or any(isinstance(d, int) and d != s for d, s in zip(decl, shape))):
            want = "[" + ",".join(str(d) if isinstance(d, int) else "?" for d in decl) + "]"
            raise InputError(f"input '{self.name}' has shape {list(shape)}, expected {want}")
        if self.ranges and not any(all(a <= s <= b for a, s, b in zip(mn, shape, mx)) for mn, mx in self.ranges):
            allowed = " or ".join(f"{mn}..{mx}" for mn, mx in self.ranges)
            raise InputError(f"input '{self.name}' has shape {list(shape)}, outside the profile range {allowed}")


def _tree_to_torch(x: Any, device: torch.device) -> Any:
    """Sequence/optional inputs: nested lists of arrays -> tensors on `device`."""
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        return [_tree_to_torch(v, device) for v in x]
    if isinstance(x, torch.Tensor):
        return x.to(device)
    from kiln.frontend.onnx import array_to_torch
    return array_to_torch(np.asarray(x)).to(device)


def _to_numpy(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dtype == torch.bfloat16:
            import ml_dtypes
            return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz):
            import ml_dtypes
            name = {torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2",
                    torch.float8_e4m3fnuz: "float8_e4m3fnuz", torch.float8_e5m2fnuz: "float8_e5m2fnuz"}[t.dtype]
            return t.view(torch.uint8).numpy().view(getattr(ml_dtypes, name))
        return t.numpy()
    if isinstance(x, list):
        return [_to_numpy(v) for v in x]
    return x
