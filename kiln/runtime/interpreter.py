"""GraphFunction: executes a Graph's nodes in order over a slot table (also used for subgraphs)."""
from __future__ import annotations

import threading
import time
import warnings
from typing import Any, Callable, Sequence

import torch

from kiln.backends.kernel import Kernel
from kiln.backends.strides import channels_innermost
from kiln.errors import InputError, KilnError
from kiln.ir.dims import dim_size
from kiln.ir.graph import Graph, Node, Value
from kiln.plan.elision import Caps, place_all
from kiln.runtime.arena import KEPT_PER_THREAD, ActivationArena, resolvable
from kiln.runtime.prologue import SHAPE_OPS, PrologueCache, shape_prologue, stand_in

KernelFactory = Callable[[Node], Kernel]
StepHook = Callable[[Node, float, Any], None]
"""Called after each step with its node, host seconds spent launching it and its result (a tensor or tuple)."""
TypedKernel = Callable[[Node], bool]


class _Alloc:
    """The output buffer of a Concat laid out in place, made before the first write into it: a new tensor, or
    for a Concat nested in another (kiln.plan.elision) a slice (parent slot, axis, start, length) of that one's."""

    __slots__ = ("slot", "shape", "dtype", "channels_last", "parent")

    def __init__(self, slot: int, shape: tuple[int | str, ...], dtype: torch.dtype, channels_last: bool,
                 parent: tuple[int, int, int, int] | None = None) -> None:
        self.slot, self.shape, self.dtype, self.channels_last = slot, shape, dtype, channels_last
        self.parent = parent

    def make(self, dims: dict[str, int], device: torch.device, env: list[Any] | None = None) -> torch.Tensor:
        if self.parent is not None and env is not None:
            buf, axis, start, length = self.parent
            return env[buf].narrow(axis, start, length)
        shape = [dim_size(d, dims) for d in self.shape]
        fmt = torch.channels_last if self.channels_last and len(shape) == 4 else torch.contiguous_format
        return torch.empty(shape, dtype=self.dtype, device=device, memory_format=fmt)


class _Step:
    __slots__ = ("node", "kernel", "fn", "ins", "outs", "frees", "single", "out", "allocs", "place", "follow")

    def __init__(self, node: Node, kernel: Kernel, ins: list[int], outs: list[int], frees: list[int]) -> None:
        self.node, self.kernel, self.ins, self.outs, self.frees = node, kernel, ins, outs, frees
        self.fn = kernel.fn
        self.single = len(outs) == 1
        self.out: list[tuple[int, int, int, int]] = []  # (buffer slot, axis, start, length) to write into
        self.allocs: list[_Alloc] = []
        self.place = -1  # the output's slot when the arena holds it (passed to the kernel as out=)
        self.follow = -1  # like_input kernels: the argument whose layout (contiguous or not) the output takes


def _host_inputs(node: Node) -> set[int]:
    """Input positions the op reads as host values (OpDef.value_inputs)."""
    from kiln.ops.registry import lookup
    try:
        return set(lookup(node.op_type, node.domain).value_inputs)
    except Exception:
        return set()


def _symbols_of(graph: Graph) -> set[str]:
    """Symbolic dims bound at each call: those of the graph's inputs and of the outer values it captures."""
    syms = graph.input_symbols()
    for v in graph.captures:
        if v.kind == "tensor" and not v.is_const:
            syms.update(d for d in (v.type.shape or ()) if isinstance(d, str))
    return syms


def _relies_on_types(graph: Graph, typed: TypedKernel) -> bool:
    """Whether a kernel of this graph or of a subgraph inside it relies on the types it was built for."""
    return any(typed(n) or any(_relies_on_types(sg, typed) for sg in n.subgraphs()) for n in graph.nodes)


class _EntryCheck:
    """A subgraph's inputs against their declared types at each call (see GraphFunction)."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.inputs: list[tuple[int, str, torch.dtype | None, int | None, list[tuple[int, int]],
                                list[tuple[int, str]]]] = []
        syms: set[str] = set()
        for i, v in enumerate(graph.inputs):
            t = v.type
            if v.kind != "tensor" or (t.dtype is None and t.shape is None):
                continue
            shape = t.shape
            fixed = [(k, d) for k, d in enumerate(shape or ()) if isinstance(d, int)]
            named = [(k, d) for k, d in enumerate(shape or ()) if isinstance(d, str)]
            syms.update(d for _, d in named)
            self.inputs.append((i, v.name, t.dtype.torch if t.dtype is not None else None,
                                None if shape is None else len(shape), fixed, named))
        # captures naming one of the inputs' symbols: the same symbol must have the same size there
        self.captures = [(v.name, [(k, d) for k, d in enumerate(v.type.shape or ()) if d in syms])
                         for v in graph.captures if v.kind == "tensor" and not v.is_const]
        self.captures = [(name, dims) for name, dims in self.captures if dims]

    def mismatch(self, inputs: Sequence[Any], outer: dict[str, Any]) -> str | None:
        """None when the inputs fit; else what does not."""
        bound: dict[str, int] = {}
        for i, name, dtype, rank, fixed, named in self.inputs:
            x = inputs[i]
            if not isinstance(x, torch.Tensor):
                return f"input '{name}' is {type(x).__name__} at run time, not a tensor"
            if (dtype is not None and x.dtype != dtype) or (rank is not None and x.dim() != rank) \
                    or any(x.shape[k] != d for k, d in fixed):
                return (f"input '{name}' is {str(x.dtype).replace('torch.', '')}{list(x.shape)} at run time, "
                        f"but declared {self.graph.inputs[i].type}")
            for k, d in named:
                if bound.setdefault(d, int(x.shape[k])) != x.shape[k]:
                    return f"input '{name}' has {d}={int(x.shape[k])}, another value has {d}={bound[d]}"
        for name, dims in self.captures:
            x = outer.get(name)
            if not isinstance(x, torch.Tensor) or x.dim() <= max(k for k, _ in dims):
                continue
            for k, d in dims:
                if d in bound and bound[d] != x.shape[k]:
                    return f"captured '{name}' has {d}={int(x.shape[k])}, an input has {d}={bound[d]}"
        return None


def _step_error(node: Node, e: BaseException) -> KilnError:
    """A failing step's error as one line naming its node (a KilnError keeps its type)."""
    if isinstance(e, KilnError):
        return type(e)(f"node '{node.name}' ({node.op_type}): {e}".replace("\n", " "))
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return KilnError(f"node '{node.name}' ({node.op_type}) failed: {msg}")


def _bind_step(st: _Step, args: list[Any], dest: Any, r: Any, record: list[Any], k: int, stable: set[int]) -> Any:
    """Record step k's bound call (GraphFunction._bound_calls) after its first run on stable tensors; returns the
    result later steps read, which the bound call returns at every call (so it is stable too)."""
    if dest is None:  # no destination: a view of its input, the same view object from now on
        b = st.kernel.bind(args, None)
        if b is None:
            return r
        r = b()
    else:
        if r is not (dest[0] if isinstance(dest, tuple) else dest):  # it did not store into its destination
            return r
        b = st.kernel.bind(args, dest)
        if b is None:
            return r
    record[k] = b
    stable.add(id(r))
    return r


def _reference_factory(node: Node) -> Kernel:
    from kiln.ops.registry import lookup
    return Kernel(lookup(node.op_type, node.domain).bind(node))


class GraphFunction:
    """A callable compiled from a Graph: fn(inputs, outer) -> outputs.

    `outer` maps names of captured outer-scope values to their runtime values. Subgraph
    attributes of nodes are themselves compiled into GraphFunctions with the same kernel factory
    (an Engine's: each body layer runs the tactic the plan chose for it), each with its own
    activation arena, which control-flow ops find in node.attrs at run time.

    `typed(node)`: whether the kernel the factory makes for a node relies on the node's types (a
    backend tactic; the reference kernels compute from whatever they get). A subgraph holding such
    kernels checks, at every call, the values it receives against the types its inputs declare (a
    body input's type is the model's or plan's word: nothing else proves it): element type, rank,
    static dims, and each symbolic dim the same wherever it appears (inputs and captures). Inputs
    that do not fit run this subgraph on the reference kernels instead, with one warning.
    """

    def __init__(self, graph: Graph, device: torch.device | str = "cpu",
                 kernel_factory: KernelFactory | None = None, typed: TypedKernel | None = None,
                 nested: bool = False) -> None:
        self.graph = graph
        self.device = torch.device(device)
        self.factory = kernel_factory
        # a factory of unknown kernels: every kernel is taken to rely on its node's types
        self.typed = typed if typed is not None or kernel_factory is None else (lambda node: True)
        factory = kernel_factory or _reference_factory
        slot: dict[tuple[int, bool], int] = {}
        consts: dict[int, tuple[Value, bool]] = {}  # slot -> (constant, read as a host value)
        n_slots = 0

        def slot_of(v: Value, host: bool = False) -> int:
            nonlocal n_slots
            k = (id(v), host and v.const is not None)
            if k not in slot:
                slot[k] = n_slots
                if v.const is not None:
                    consts[n_slots] = (v, k[1])
                n_slots += 1
            return slot[k]

        self.input_slots = [slot_of(v) for v in graph.inputs]
        self.capture_names = [v.name for v in graph.captures]
        self.capture_slots = [slot_of(v) for v in graph.captures]
        step_ins: list[list[int]] = []
        for n in graph.nodes:
            host = _host_inputs(n)
            step_ins.append([-1 if v is None else slot_of(v, j in host) for j, v in enumerate(n.all_inputs)])
            for v in n.outputs:
                slot_of(v)
        self.output_slots = [slot_of(v) for v in graph.outputs]
        nodes = [self._runtime_node(n) for n in graph.nodes]
        kernels = [factory(rn) for rn in nodes]
        symbols = _symbols_of(graph)
        host = set(shape_prologue(graph, symbols))  # layers that may run on the host: they write nowhere
        elided, writes, allocs, gathers = self._elisions(graph, kernels, lambda v: slot[(id(v), False)], host)
        pro = set(shape_prologue(graph, symbols, skip=elided | set(gathers)))
        self.prologue_nodes = frozenset(pro)
        n_slots = self._plan_prologue(graph, sorted(pro), step_ins, lambda v: slot[(id(v), False)], n_slots)
        keep = set(self.output_slots) | set(consts)
        last_use: dict[int, int] = {}
        for i, ins in enumerate(step_ins):
            if i not in elided and i not in pro:
                for s_ in ins:
                    if s_ >= 0:
                        last_use[s_] = i
        self.steps: list[_Step] = []
        needed: set[int] = set(self.output_slots) & set(consts)
        for i, (rn, kernel) in enumerate(zip(nodes, kernels)):
            if i in elided or i in pro:
                continue
            ins = step_ins[i]
            outs = [slot[(id(v), False)] for v in rn.outputs]
            frees = sorted({s_ for s_ in ins if s_ >= 0 and last_use.get(s_) == i and s_ not in keep}
                           | {s_ for s_ in outs if s_ not in last_use and s_ not in keep})
            own = kernel.prepacked  # inputs the kernel holds its own copy of
            needed |= {s_ for j, s_ in enumerate(ins) if s_ in consts and j not in own}
            st = _Step(rn, kernel, ins, outs, frees)
            st.out, st.allocs = writes.get(i, []), allocs.get(i, [])
            if i in gathers:  # a Concat partly stored in place: its step copies the rest into its buffer
                st.out = [(outs[0], *gathers[i])]
            self.steps.append(st)
        self.elided = len(elided)
        self.arena: ActivationArena | None = None
        if any(k.writes_out for k in kernels):
            out_types = {slot[(id(v), False)]: v.type for n in nodes for v in n.outputs}
            arena = ActivationArena(self.steps, out_types, self.output_slots, symbols)
            if arena.placed:
                self.arena = arena
                for st in self.steps:
                    if not st.out and len(st.outs) == 1 and st.outs[0] in arena.placed:
                        st.place = st.outs[0]
                        if st.kernel.out_format == "like_input":
                            st.follow = next((j for j, v in enumerate(st.node.inputs) if v is not None
                                              and not v.is_const and v.type.rank == 4), -1)
        # dim equalities the types rest on (a body's types rest on none: kiln.ir.dims.GUARDS_ALLOWED)
        self._guards = [] if nested else [g for n in graph.nodes for g in n.guards]
        self._guards_held: set[tuple[int, ...]] = set()  # the bound dims they were checked at
        bind = bool(allocs or self.arena or self._prologue or self._guards)  # the symbols each call binds are read
        self._symbols = [[(k, d) for k, d in enumerate(v.type.shape or ()) if isinstance(d, str)]
                         for v in graph.inputs] if bind else None
        # symbols of captured values, bound at each call too (an If branch has no inputs: its dims are its captures')
        self._capture_symbols = [(name, [(k, d) for k, d in enumerate(v.type.shape or ()) if isinstance(d, str)])
                                 for name, v in zip(self.capture_names, graph.captures)
                                 if v.kind == "tensor" and not v.is_const] if bind else []
        self._capture_symbols = [(name, dims) for name, dims in self._capture_symbols if dims]
        self._entry = (_EntryCheck(graph) if nested and self.typed is not None
                       and _relies_on_types(graph, self.typed) else None)
        self._reference: GraphFunction | None = None  # this subgraph on the reference kernels (inputs that do not fit)
        # constants go to the device once, and only where some kernel reads them as given;
        # host values (shapes, axes, scales) stay on the CPU so reading them never syncs the device
        template: list[Any] = [None] * n_slots
        for s_ in needed:
            v, host = consts[s_]
            template[s_] = v.const if host else v.const.to(self.device)  # type: ignore[union-attr]
        self.template = template
        self.hook: StepHook | None = None
        self._unbound: list[Any] = [None] * len(self.steps)
        self._bound = threading.local()  # CPU: this thread's bound calls per input dims (_bound_calls)

    @staticmethod
    def _elisions(graph: Graph, kernels: list[Kernel], slot: Callable[[Value], int], host: set[int]
                  ) -> tuple[set[int], dict[int, list[tuple[int, int, int, int]]], dict[int, list[_Alloc]],
                             dict[int, tuple[int, int, int]]]:
        """Concats laid out in place (kiln.plan.elision), from their kernels (`elide_axis`) and their producers'
        (`writes_out`, `strided_out`; none for the layers in `host`, which may run on the host): (the steps
        removed, producer step -> the (buffer slot, axis, start, length) it writes into, step -> the buffers to
        make before it runs, Concat step that copies some inputs -> (axis, 0, length) of its own buffer)."""
        index = {id(n): i for i, n in enumerate(graph.nodes)}
        symbols = _symbols_of(graph)

        def caps(p: Node) -> Caps:
            j = index[id(p)]
            return Caps() if j in host else Caps(kernels[j].writes_out, kernels[j].strided_out)
        placer = place_all(graph, [(n, k.elide_axis) for n, k in zip(graph.nodes, kernels)
                                   if k.elide_axis is not None and len(n.outputs) == 1
                                   and resolvable(n.outputs[0].type, symbols)], caps)
        elided: set[int] = set()
        writes: dict[int, list[tuple[int, int, int, int]]] = {}
        allocs: dict[int, list[_Alloc]] = {}
        gathers: dict[int, tuple[int, int, int]] = {}
        first: dict[int, int] = {}  # root Concat -> the first step writing into its tree
        for m in placer.members.values():
            i, buf, root = index[id(m.node)], slot(m.node.outputs[0]), id(placer.root(m).node)
            for p in m.parts:
                if p.how == "write":
                    j = index[id(p.producer)]
                    writes.setdefault(j, []).append((buf, m.axis, p.start, p.length))
                    first[root] = min(first.get(root, j), j)
            if m.copies:
                gathers[i] = (m.axis, 0, sum(p.length for p in m.parts))
                first[root] = min(first.get(root, i), i)
            else:
                elided.add(i)
        for m in sorted(placer.members.values(), key=placer.depth):  # an outer buffer before those inside it
            t = m.node.outputs[0].type
            parent = None
            if m.parent is not None:
                outer, start, length = m.parent
                parent = (slot(outer.outputs[0]), placer.members[id(outer)].axis, start, length)
            allocs.setdefault(first[id(placer.root(m).node)], []).append(
                _Alloc(slot(m.node.outputs[0]), tuple(t.shape), t.dtype.torch,  # type: ignore[union-attr]
                       kernels[index[id(m.node)]].channels_last, parent))
        return elided, writes, allocs, gathers

    def _plan_prologue(self, graph: Graph, pro: list[int], step_ins: list[list[int]],
                       slot: Callable[[Value], int], n_slots: int) -> int:
        """The shape prologue's layers (kiln.runtime.prologue) as host computations, and a device twin slot for
        each result a device kernel reads as data (or the graph returns). Rewrites those readers' input slots;
        returns the new slot count."""
        self._prologue: list[tuple[Callable[..., Any], list[tuple[str, Any]], list[int]]] = []
        self._twins: list[tuple[int, int]] = []  # (host slot, device slot)
        self._prologue_cache = PrologueCache()
        if not pro:
            return n_slots
        made: set[int] = set()
        bound = {id(v): ("input", i) for i, v in enumerate(graph.inputs)}
        bound.update({id(v): ("capture", v.name) for v in graph.captures})
        for i in pro:
            n = graph.nodes[i]
            srcs: list[tuple[str, Any]] = []
            for v in n.inputs:
                if v is None:
                    srcs.append(("none", None))
                elif n.op_type in SHAPE_OPS:  # reads only the shape: the call's own tensor, or the proven type
                    srcs.append(bound.get(id(v), ("type", (tuple(v.type.shape), v.type.dtype.torch
                                                           if v.type.dtype is not None else torch.float32))))
                elif v.is_const:
                    srcs.append(("const", v.const))
                else:
                    srcs.append(("slot", slot(v)))
            outs = [slot(o) for o in n.outputs]
            made.update(outs)
            self._prologue.append((_reference_factory(n).fn, srcs, outs))
        if self.device.type == "cpu":
            return n_slots
        twin: dict[int, int] = {}

        def twin_of(s_: int) -> int:
            nonlocal n_slots
            if s_ not in twin:
                twin[s_] = n_slots
                self._twins.append((s_, n_slots))
                n_slots += 1
            return twin[s_]
        pro_set = set(pro)
        for i, ins in enumerate(step_ins):
            if i in pro_set:
                continue
            host = _host_inputs(graph.nodes[i])
            for j, s_ in enumerate(ins):
                if s_ in made and j not in host:
                    ins[j] = twin_of(s_)
        self.output_slots = [twin_of(s_) if s_ in made else s_ for s_ in self.output_slots]
        return n_slots

    def _prologue_values(self, inputs: Sequence[Any], outer: dict[str, Any], dims: dict[str, int]
                         ) -> list[tuple[int, Any]]:
        """(slot, value) of every prologue result for these inputs' shapes (`dims`: the symbols they bind):
        computed once per shape."""
        key = (tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in inputs),
               tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else None
                     for x in (outer.get(v.name) for v in self.graph.captures)))

        def compute() -> list[tuple[int, Any]]:
            vals: dict[int, Any] = {}

            def arg(src: tuple[str, Any]) -> Any:
                kind, what = src
                if kind == "slot":
                    return vals[what]
                if kind == "const":
                    return what
                if kind == "none":
                    return None
                if kind == "type":
                    shape, dtype = what
                    return stand_in([dim_size(d, dims) for d in shape], dtype)
                x = inputs[what] if kind == "input" else outer[what]
                return stand_in(x.shape, x.dtype) if isinstance(x, torch.Tensor) else x
            for fn, srcs, outs in self._prologue:
                r = fn(*[arg(a) for a in srcs])
                for s_, v in zip(outs, r if isinstance(r, (tuple, list)) else (r,)):
                    vals[s_] = v
            entry = list(vals.items())
            entry += [(dev, vals[host].to(self.device) if isinstance(vals[host], torch.Tensor) else vals[host])
                      for host, dev in self._twins]
            return entry
        return self._prologue_cache.get(key, compute)

    def _check_guards(self, dims: dict[str, int]) -> None:
        """Every dim equality the plan's types rest on holds at these bound dims (checked once per binding);
        else InputError naming the layer that needs it."""
        key = tuple(dims.values())  # the symbols bind in one order every call
        if key in self._guards_held:
            return
        for g in self._guards:
            if not g.holds(dims):
                raise InputError(f"the input shapes do not fit the model: {g.failure(dims)}")
        if len(self._guards_held) < 256:
            self._guards_held.add(key)

    def _runtime_node(self, n: Node) -> Node:
        subs = {k: v for k, v in n.attrs.items()
                if isinstance(v, Graph) or (isinstance(v, list) and v and isinstance(v[0], Graph))}
        if not subs:
            return n
        rn = Node(n.op_type, n.inputs, [], dict(n.attrs), name=n.name, domain=n.domain, opset=n.opset)
        rn.outputs = n.outputs  # not re-parented: the runtime node is a view of n
        rn.captures = n.captures
        rn.guards = n.guards
        def compile(g: Graph) -> GraphFunction:  # a body runs the same factory's kernels (the plan's tactics)
            return GraphFunction(g, self.device, self.factory, self.typed, nested=True)
        for k, v in subs.items():
            rn.attrs[k] = [compile(g) for g in v] if isinstance(v, list) else compile(v)
        return rn

    def _bound_calls(self, dims: dict[str, int], arena: torch.Tensor | None, placed: dict[int, torch.Tensor],
                     rows: dict[int, torch.Tensor]) -> tuple[list[Any], list[Any] | None, set[int] | None]:
        """(each step's bound call for this thread's arena at these dims, or None; the list to record bound calls
        into during this call, or None; the ids of the tensors that are the same objects at every call).

        On the CPU a thread's arena views for given input dims are the same tensor objects from one call to the
        next (ActivationArena.views), and so are the constants. A step whose inputs and destination are all such
        tensors makes the same call every time: its first run asks the kernel for that call bound
        (Kernel.bind), and later runs on this arena make only the bound call."""
        if arena is None or self.device.type != "cpu":
            return self._unbound, None, None
        key = tuple(sorted(dims.items()))
        mine = getattr(self._bound, "calls", None)
        hit = None if mine is None else mine.get(key)
        if hit is not None and hit[0] is arena:
            return hit[1], None, None
        stable = {id(t) for t in placed.values()} | {id(t) for t in rows.values()}
        stable |= {id(t) for t in self.template if isinstance(t, torch.Tensor)}
        return self._unbound, [None] * len(self.steps), stable

    def _keep_bound(self, dims: dict[str, int], arena: torch.Tensor, calls: list[Any]) -> None:
        """Keep this thread's bound calls for its arena at these dims (as many entries as the arena keeps)."""
        mine = getattr(self._bound, "calls", None)
        if mine is None:
            mine = self._bound.calls = {}
        key = tuple(sorted(dims.items()))
        mine.pop(key, None)
        if len(mine) >= KEPT_PER_THREAD:
            mine.pop(next(iter(mine)))
        mine[key] = (arena, calls)

    def _on_reference(self, why: str) -> "GraphFunction":
        """This subgraph compiled on the reference kernels (once), for inputs its tactics were not chosen for."""
        if self._reference is None:
            warnings.warn(f"kiln: subgraph '{self.graph.name}': {why}; running it on the reference kernels")
            self._reference = GraphFunction(self.graph, self.device, nested=True)
        return self._reference

    @property
    def weight_bytes(self) -> int:
        """Bytes of constants this function holds on its device (prepacked copies live in the kernels)."""
        return sum(t.numel() * t.element_size() for t in self.template
                   if isinstance(t, torch.Tensor) and t.device == self.device)

    def __call__(self, inputs: Sequence[Any], outer: dict[str, Any] | None = None,
                 hook: StepHook | None = None) -> list[Any]:
        if len(inputs) != len(self.input_slots):
            raise KilnError(f"graph '{self.graph.name}' takes {len(self.input_slots)} inputs, got {len(inputs)}")
        if self._entry is not None:
            why = self._entry.mismatch(inputs, outer or {})
            if why is not None:
                return self._on_reference(why)(inputs, outer, hook)
        env = list(self.template)
        for s, x in zip(self.input_slots, inputs):
            env[s] = x
        if self.capture_slots:
            outer = outer or {}
            for s, name in zip(self.capture_slots, self.capture_names):
                env[s] = outer[name]
        hook = hook or self.hook
        dims: dict[str, int] = {}
        if self._symbols:
            for syms, x in zip(self._symbols, inputs):
                for k, d in syms:
                    dims[d] = int(x.shape[k])
        for name, syms in self._capture_symbols:
            x = outer[name]  # type: ignore[index]
            if isinstance(x, torch.Tensor) and x.dim() > syms[-1][0]:
                for k, d in syms:
                    dims.setdefault(d, int(x.shape[k]))
        if self._guards:
            self._check_guards(dims)
        if self._prologue:
            for s_, v in self._prologue_values(inputs, outer or {}, dims):
                env[s_] = v
        placed, rows, arena = self.arena.views(dims, self.device) if self.arena is not None else ({}, {}, None)
        binds, record, stable = self._bound_calls(dims, arena, placed, rows)
        for k, (st, bound) in enumerate(zip(self.steps, binds)):
            if bound is not None:  # this step's call on these arena views, repeated as bound at its first run
                for a in st.allocs:  # in-place Concat buffers it starts: arena views (else it was not bound)
                    env[a.slot] = placed[a.slot]
                try:
                    if hook is None:
                        r = bound()
                    else:
                        t0 = time.perf_counter()
                        r = bound()
                        hook(st.node, time.perf_counter() - t0, r)
                except Exception as e:
                    raise _step_error(st.node, e) from (None if isinstance(e, KilnError) else e)
                env[st.outs[0]] = r
                for s in st.frees:
                    env[s] = None
                continue
            args = [env[i] if i >= 0 else None for i in st.ins]
            try:
                for a in st.allocs:
                    env[a.slot] = placed[a.slot] if a.slot in placed else a.make(dims, self.device, env)
                t0 = time.perf_counter() if hook is not None else 0.0
                if st.place >= 0:
                    o = dest = placed[st.place]
                    if st.follow >= 0 and st.place in rows:
                        a = args[st.follow]
                        if isinstance(a, torch.Tensor) and not channels_innermost(a):
                            o = dest = rows[st.place]
                    r = st.fn(*args, out=o)
                elif not st.out:
                    dest = None
                    r = st.fn(*args)
                else:
                    outs = tuple(env[buf].narrow(axis, start, length) for buf, axis, start, length in st.out)
                    dest = outs[0] if len(outs) == 1 else outs
                    r = st.fn(*args, out=dest)
                if hook is not None:
                    hook(st.node, time.perf_counter() - t0, r)
            except Exception as e:
                raise _step_error(st.node, e) from (None if isinstance(e, KilnError) else e)
            if record is not None and st.kernel.bind is not None and st.single \
                    and all(a.slot in placed for a in st.allocs) \
                    and all(a is None or id(a) in stable for a in args) \
                    and all(id(env[buf]) in stable for buf, *_ in st.out):  # type: ignore[operator]
                r = _bind_step(st, args, dest, r, record, k, stable)  # type: ignore[arg-type]
            if st.single:
                env[st.outs[0]] = r[0] if isinstance(r, tuple) else r
            else:
                if not isinstance(r, (tuple, list)):
                    r = (r,)
                for s, v in zip(st.outs, r):
                    env[s] = v
            for s in st.frees:
                env[s] = None
        if record is not None:
            self._keep_bound(dims, arena, record)
        outs = [env[s] for s in self.output_slots]
        if arena is not None and self.device.type == "cpu":  # the thread's arena is reused by its next call
            base = arena.untyped_storage().data_ptr()
            outs = [o.clone() if isinstance(o, torch.Tensor) and o.device.type == "cpu"
                    and o.untyped_storage().data_ptr() == base else o for o in outs]
        return outs
