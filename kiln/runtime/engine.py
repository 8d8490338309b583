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
from kiln.ops.attrs import check_arity, validate_node
from kiln.ops.registry import lookup
from kiln.ir.dtype import DType, array_to_torch
from kiln.ir.graph import Graph, Node
from kiln.logger import Logger
from kiln.plan.format import Plan, load_plan
from kiln.plan.schema import check_weights, validate_header, verify_graph
from kiln.plan.serialize import GraphReader
from kiln.plugins.registry import check_graph_records
from kiln.runtime.cuda_graph import CapturedGraph, capturable
from kiln.runtime.flags import cpu_flags, cuda_flags
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
        try:
            why = t.why_not(node, tctx) if tctx.device.type in t.devices else None
        except Exception:  # noqa: BLE001 - only a hint: the refusal stands either way
            why = None
        raise PlanFormatError(f"{at}: tactic '{tid}' does not support this layer on {tctx.device.type}"
                              + (f" ({why}; rebuild the plan on this machine)" if why else ""))
    if not ok_cfg:
        raise PlanFormatError(f"{at}: tactic '{tid}' has no config {cfg!r} for this layer")
    try:
        return t.make(node, cfg, tctx.device)
    except KilnError as e:
        raise PlanFormatError(f"{at}: {e}") from None
    except Exception as e:
        raise PlanFormatError(f"{at}: tactic '{tid}' cannot build the layer ({type(e).__name__}: {_line(e)})") from None


def check_plan(plan: Plan, where: str) -> tuple[Graph, dict[int, tuple[str, dict[str, Any]]], set[str]]:
    """Everything a load checks short of building kernels: header schema, weights, graph references,
    declared attributes, types proven by inference, sizes bounded, no tactic writing into memory laid
    out from an unproven type. Returns (graph, tactic choice per node, names of unproven values).
    The builder runs it on every plan it makes, so it never writes a plan its own loader refuses."""
    header = {"target": plan.target, "inputs": plan.inputs, "outputs": plan.outputs, "profiles": plan.profiles,
              "graph": plan.graph, "memory": plan.memory, "build": plan.build, "kiln_version": plan.kiln_version,
              "format_version": plan.format_version}
    validate_header(header, where)
    check_weights(plan.weights, where)
    reader = GraphReader(plan.weights, where)
    graph = reader.graph(plan.graph)
    check_graph_records(reader.plugins, graph, where)  # the plugins it needs, registered at their versions
    _validate_nodes(graph, where)
    # types proven against the inputs before any tactic looks at them; sizes bounded before allocating
    unproven = verify_graph(header, graph, reader.tactics, where)
    if unproven:
        for node in (n for sub in graph.all_graphs() for n in sub.nodes):  # subgraph steps as top-level ones
            t = get_tactic(reader.tactics.get(id(node), ("ref", {}))[0])
            outs = [v for v in node.outputs if v.name in unproven]
            if outs and t is not None and (t.writes_out or t.elides or t.elides_partly):
                raise PlanFormatError(f"{where}: layer '{node.name}' ({node.op_type}): its output '{outs[0].name}' "
                                      f"has type {outs[0].type} in the plan, which Kiln's inference cannot confirm, "
                                      "and its kernel writes into memory laid out from it; rebuild the plan")
    return graph, reader.tactics, unproven



def _validate_nodes(graph: Graph, where: str) -> None:
    """Every node of the plan (subgraphs included) against its op's declared attributes and checks, as the
    importer does for a model: an op unknown to this Kiln, an undeclared attribute or a value out of its
    declared range fails the load with one line naming the layer."""
    for node in graph.nodes:
        try:
            validate_node(node)
            check_arity(node)
            lookup(node.op_type, node.domain, node.opset, where=node.name).check(node)
        except KilnError as e:
            raise PlanFormatError(f"{where}: {e}") from None
        for sub in node.subgraphs():
            _validate_nodes(sub, where)


def _line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _guard_unproven(node: Node, kernel: Kernel, unproven: set[str], where: str) -> None:
    """A backend kernel was chosen by its tactic for the node's types; where some of them are the header's
    word only (inference could not confirm them, see kiln.plan.schema.prove_types), the kernel must not
    take that word on trust: its unproven inputs are checked at every call (dtype, rank, static dims), and
    a kernel writing into memory laid out from an unproven output type is refused."""
    outs = [v for v in node.outputs if v.name in unproven]
    if outs and (kernel.writes_out or kernel.elide_axis is not None):
        raise PlanFormatError(f"{where}: layer '{node.name}' ({node.op_type}): its output '{outs[0].name}' has type "
                              f"{outs[0].type} in the plan, which Kiln's inference cannot confirm, and its kernel "
                              f"writes into memory laid out from it; rebuild the plan")
    checks = [(j, v.name, v.type) for j, v in enumerate(node.all_inputs)
              if v is not None and v.name in unproven and v.kind == "tensor" and not v.is_const]
    if not checks:
        return
    fn = kernel.fn

    def guarded(*xs: Any, **kw: Any) -> Any:
        for j, name, t in checks:
            x = xs[j] if j < len(xs) else None
            if isinstance(x, torch.Tensor) and not _fits(x, t):
                raise KilnError(f"value '{name}' is {str(x.dtype).replace('torch.', '')}{list(x.shape)} at run time, "
                                f"but the plan built this layer's kernel for {t}")
        return fn(*xs, **kw)
    kernel.fn = guarded


def _fits(x: torch.Tensor, t: Any) -> bool:
    if t.dtype is not None and x.dtype != t.dtype.torch:
        return False
    if t.shape is None:
        return True
    return x.dim() == len(t.shape) and all(not isinstance(d, int) or d == s for d, s in zip(t.shape, x.shape))


def _check_target(plan: Plan, where: str) -> torch.device:
    dev = plan.target.get("device")
    if dev == "cpu":
        _warn_other_cpu(plan, where)
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


def _warn_other_cpu(plan: Plan, where: str) -> None:
    """A CPU plan runs on any x86 (or Arm) CPU: oneDNN picks its kernels at run time and the C kernels compile
    here. Its tactics were timed on the CPU it names, though: on another model or vector ISA, say so once."""
    from kiln.backends.cpu.features import cpu_model, vector_isa
    name, isa = plan.target.get("name"), plan.target.get("isa")
    if name is None and isa is None:
        return  # a plan from before CPU targets were recorded
    here = (cpu_model(), vector_isa())
    if (name, isa) == here or (where, name, isa) in _WARNED_CPU:
        return
    _WARNED_CPU.add((where, name, isa))
    lost = sorted(set((isa or "").split()) - set(here[1].split()))
    Logger().warning(f"{where}: plan was tuned on {name} ({isa or 'no vector ISA recorded'}); this CPU is {here[0]} "
                     f"({here[1] or 'no vector ISA recorded'})"
                     + (f", without {' '.join(lost)}" if lost else "")
                     + ": its tactic choices were timed there; rebuild the plan here for the fastest ones")


_WARNED_CPU: set[tuple[Any, ...]] = set()


class Engine:
    """A plan ready to run: weights on the target device, kernels built once, shared by contexts.

    Loading treats the plan as untrusted input (kiln.plan.schema): the header's schema, the graph's
    structure (GraphReader), types proven by Kiln's own inference, allocation bounds, then each step's
    tactic (`_load_kernel`). Only KilnError leaves the constructor."""

    def __init__(self, plan: Plan, where: str = "plan") -> None:
        try:
            self._load(plan, where)
        except KilnError:
            raise
        except RecursionError:
            raise PlanFormatError(f"{where}: cannot load plan: nested too deeply") from None
        except Exception as e:  # last resort: a check that missed something still gives one line
            raise PlanFormatError(f"{where}: cannot load plan: {type(e).__name__}: {_line(e)}") from None

    def _load(self, plan: Plan, where: str) -> None:
        if not isinstance(plan, Plan):
            raise PlanFormatError(f"{where}: expected a Plan, got {type(plan).__name__}")
        self.graph, tactics, self.unproven = check_plan(plan, where)
        self.plan = plan
        self.device = _check_target(plan, where)

        tctx = TacticContext(self.device, fp16=plan.build.get("fp16") is True, bf16=plan.build.get("bf16") is True,
                             tf32=plan.build.get("tf32", True) is not False,
                             extra={"opt_level": 3})
        self.kernels: list[Kernel] = []
        # subgraph steps are loaded like top-level ones (GraphFunction compiles bodies with this factory)
        inside = {id(n): f"{where}: subgraph '{sub.name}'" for sub in self.graph.all_graphs()[1:] for n in sub.nodes}

        kernels, unproven = self.kernels, self.unproven  # not self: the function keeps the factory, and
        # an Engine it referred back to would wait for the cycle collector (with its kernels and arenas)

        def factory(node: Node) -> Kernel:
            tid, cfg = tactics.get(id(node), ("ref", {}))
            at = inside.get(id(node), where)
            kernel = _load_kernel(node, tid, cfg, tctx, at)
            kernels.append(kernel)
            if tid != "ref" and unproven:
                _guard_unproven(node, kernel, unproven, at)
            return kernel

        def typed(node: Node) -> bool:  # a backend tactic's kernel: built for the node's types
            return tactics.get(id(node), ("ref", {}))[0] != "ref"

        t0 = time.perf_counter()
        self.function = GraphFunction(self.graph, self.device, factory, typed)
        self.load_seconds = time.perf_counter() - t0
        self.input_specs = {d["name"]: d for d in plan.inputs}
        self._checks = {name: _InputCheck(name, d, self.shape_range(name)) for name, d in self.input_specs.items()}
        self._symbolic = [(name, [(k, d) for k, d in enumerate(c.decl or ()) if isinstance(d, str)])
                          for name, c in self._checks.items() if c.is_tensor and c.decl]
        self._symbolic = [(name, dims) for name, dims in self._symbolic if dims]
        self.output_names = [d["name"] for d in plan.outputs]
        self.tf32 = plan.build.get("tf32", True) is not False
        self.flush_denormals = plan.build.get("flush_denormals") is True and self.device.type == "cpu"
        self.graph_capturable, self.graph_reason = capturable(self.graph, self.function.prologue_nodes) \
            if self.device.type == "cuda" else (False, "")

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

    def close(self) -> None:
        """Free every kernel's native resources (oneDNN primitives, memory objects, scratchpads) now; dropping
        the engine does the same. The engine must not run afterwards (its native kernels refuse to), and must
        not be closed while a context executes it.
        Threads: an engine is shared by any number of threads, each with its own ExecutionContext (a context
        serves one thread at a time, like TensorRT's IExecutionContext)."""
        kernels, self.kernels = getattr(self, "kernels", []), []
        for k in kernels:
            k.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to free
            pass


class ExecutionContext:
    """Owns its input shapes and activation memory; many contexts may share one Engine.

    Like TensorRT's IExecutionContext, a context serves one thread at a time; an Engine is shared by any
    number of threads, each with its own context (tests/test_engine_resources.py runs 8 threads x 2,000
    executions on one engine and gets bitwise the single-threaded results)."""

    def __init__(self, engine: Engine, cuda_graph: bool | None = None) -> None:
        self.engine = engine
        self.input_shapes: dict[str, tuple[int, ...]] = {}
        self.profiler: Any = None  # a step hook (kiln.runtime.profiler.LayerProfiler); set: no CUDA graphs
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
            return _tree_to_torch(name, x, self.engine.device)
        t = _as_torch(name, x, check.dtype)
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
        """Run the plan. numpy in -> numpy out; torch in -> torch out (on the engine's device).

        `inputs`: a dict {name: array} or a list in input order. A bare array is refused, even by a plan with
        one input, with an InputError naming the forms that work (a call names what it feeds, as with
        several inputs). Every failure is a KilnError (InputError for bad inputs) of one line."""
        try:
            return self._execute(inputs)
        except KilnError:
            raise
        except Exception as e:  # last resort: one line, still a KilnError
            raise KilnError(f"execute: {type(e).__name__}: {_line(e)}") from None

    def _execute(self, inputs: Mapping[str, Any] | Sequence[Any]) -> dict[str, Any]:
        args = self.execute_inputs(inputs)
        values = inputs.values() if isinstance(inputs, Mapping) else inputs
        numpy_io = not any(isinstance(x, torch.Tensor) for x in values)
        if self.engine.device.type == "cuda":
            outs = self._run_cuda(args, None)
            if self.last_graph is not None and not numpy_io:  # static buffers: hand out copies
                outs = [o.clone() if isinstance(o, torch.Tensor) else o for o in outs]
        else:
            _begin(self.profiler)
            with cpu_flags(self.engine.flush_denormals):
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
        if not ((isinstance(inputs, Mapping) and all(n in inputs for n in names))
                or (isinstance(inputs, (list, tuple)) and len(inputs) == len(names))):
            self.execute_inputs(inputs)  # raises the InputError naming what is wrong
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
        """Validated device tensors for a call (names, dtypes, shapes against the profiles, and each
        symbolic dim the same in every input that names it). An unknown name is reported before a
        missing one: a misspelt key is the likelier mistake."""
        names = self.engine.input_names
        if not isinstance(inputs, Mapping):
            if not isinstance(inputs, (list, tuple)):
                hint = ""
                if isinstance(inputs, (np.ndarray, torch.Tensor)):
                    hint = (f" (a bare array: pass {{'{names[0]}': array}} or [array])" if len(names) == 1 else
                            f" (a bare array: pass {{{', '.join(repr(n) + ': ...' for n in names)}}})")
                raise InputError(f"inputs must be a dict {{name: array}} or a list in input order "
                                 f"({', '.join(names)}), got {type(inputs).__name__}{hint}")
            if len(inputs) != len(names):
                raise InputError(f"the plan takes {len(names)} inputs ({', '.join(names)}), "
                                 f"got a list of {len(inputs)}")
            inputs = dict(zip(names, inputs))
        extra = [n for n in inputs if n not in self.engine.input_specs]
        if extra:
            raise InputError(f"unknown input {_show(extra[0])}; inputs are: {', '.join(names)}")
        missing = [n for n in names if n not in inputs]
        if missing:
            raise InputError(f"missing input '{missing[0]}'; inputs are: {', '.join(names)}")
        args = [self._to_tensor(n, inputs[n]) for n in names]
        if self.engine._symbolic:
            self._check_symbols(dict(zip(names, args)))
        return args

    def _check_symbols(self, args: dict[str, Any]) -> None:
        """A symbol (the batch 'N' of two inputs) must have one size in a call: kernels and the arena
        are sized from one binding."""
        bound: dict[str, tuple[int, str]] = {}
        for name, dims in self.engine._symbolic:
            shape = args[name].shape
            for k, sym in dims:
                n = int(shape[k])
                prev = bound.setdefault(sym, (n, name))
                if prev[0] != n:
                    raise InputError(f"input '{name}' has {sym}={n} (dim {k}), "
                                     f"but input '{prev[1]}' has {sym}={prev[0]}")

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
            _begin(self.profiler)
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


def _begin(profiler: Any) -> None:
    """Tell a profiler that has `begin_iteration` (LayerProfiler: its CUDA start event) that a run begins."""
    begin = getattr(profiler, "begin_iteration", None)
    if begin is not None:
        begin()


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


def _show(x: Any) -> str:
    r = repr(x)
    return r if len(r) <= 60 else r[:57] + "..."


def _as_torch(name: str, x: Any, dtype: DType | None) -> torch.Tensor:
    """One input tensor: a torch tensor as is (dense only), anything else through numpy (InputError, one
    line, for what cannot be a tensor: strings, objects, ragged nested lists, unsupported dtypes)."""
    if isinstance(x, torch.Tensor):
        if x.layout != torch.strided or x.is_quantized:
            raise InputError(f"input '{name}' is a {x.layout} tensor; pass a dense tensor")
        return x
    if not isinstance(x, np.ndarray):
        if x is None or isinstance(x, (str, bytes, dict, set)) or not isinstance(
                x, (list, tuple, int, float, bool, complex, np.generic)):
            raise InputError(f"input '{name}' must be an array or a tensor, got {type(x).__name__}")
        try:
            x = np.asarray(x)
        except (ValueError, TypeError, OverflowError, RecursionError) as e:
            raise InputError(f"input '{name}' cannot be read as an array ({_line(e)})") from None
    try:
        return array_to_torch(x, dtype)
    except KilnError as e:
        raise InputError(f"input '{name}': {e}") from None


def _tree_to_torch(name: str, x: Any, device: torch.device, depth: int = 0) -> Any:
    """Sequence/optional inputs: None, a tensor, or a list of them (nested for sequences of sequences)."""
    if x is None:
        return None
    if depth > 16:
        raise InputError(f"input '{name}' is nested too deeply")
    if isinstance(x, (list, tuple)):
        return [_tree_to_torch(name, v, device, depth + 1) for v in x]
    return _as_torch(name, x, None).to(device)


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
