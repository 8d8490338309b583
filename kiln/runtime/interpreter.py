"""GraphFunction: executes a Graph's nodes in order over a slot table (also used for subgraphs)."""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch

from kiln.errors import KilnError
from kiln.ir.graph import Graph, Node, Value

KernelFactory = Callable[[Node], Callable[..., Any]]
StepHook = Callable[[Node, float], None]


class _Step:
    __slots__ = ("node", "kernel", "ins", "outs", "frees", "single")

    def __init__(self, node: Node, kernel: Callable[..., Any], ins: list[int], outs: list[int],
                 frees: list[int]) -> None:
        self.node, self.kernel, self.ins, self.outs, self.frees = node, kernel, ins, outs, frees
        self.single = len(outs) == 1


def _host_inputs(node: Node) -> set[int]:
    """Input positions the op reads as host values (OpDef.value_inputs)."""
    from kiln.ops.registry import lookup
    try:
        return set(lookup(node.op_type, node.domain).value_inputs)
    except Exception:
        return set()


def _reference_factory(node: Node) -> Callable[..., Any]:
    from kiln.ops.registry import lookup
    compute = lookup(node.op_type, node.domain).compute
    return lambda *xs: compute(node, *xs)


class GraphFunction:
    """A callable compiled from a Graph: fn(inputs, outer) -> outputs.

    `outer` maps names of captured outer-scope values to their runtime values. Subgraph
    attributes of nodes are themselves compiled into GraphFunctions (reference kernels),
    which control-flow ops find in node.attrs at run time.
    """

    def __init__(self, graph: Graph, device: torch.device | str = "cpu",
                 kernel_factory: KernelFactory | None = None) -> None:
        self.graph = graph
        self.device = torch.device(device)
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
        last_use: dict[int, int] = {}
        for i, n in enumerate(graph.nodes):
            host = _host_inputs(n)
            ins = [-1 if v is None else slot_of(v, j in host) for j, v in enumerate(n.all_inputs)]
            step_ins.append(ins)
            for s_ in ins:
                if s_ >= 0:
                    last_use[s_] = i
            for v in n.outputs:
                slot_of(v)
        self.output_slots = [slot_of(v) for v in graph.outputs]
        keep = set(self.output_slots) | set(consts)
        self.steps: list[_Step] = []
        needed: set[int] = set(self.output_slots) & set(consts)
        for i, n in enumerate(graph.nodes):
            rn = self._runtime_node(n)
            ins = step_ins[i]
            outs = [slot[(id(v), False)] for v in n.outputs]
            frees = sorted({s_ for s_ in ins if s_ >= 0 and last_use.get(s_) == i and s_ not in keep}
                           | {s_ for s_ in outs if s_ not in last_use and s_ not in keep})
            kernel = factory(rn)
            own = getattr(kernel, "prepacked", frozenset())  # inputs the kernel holds its own copy of
            needed |= {s_ for j, s_ in enumerate(ins) if s_ in consts and j not in own}
            self.steps.append(_Step(rn, kernel, ins, outs, frees))
        # constants go to the device once, and only where some kernel reads them as given;
        # host values (shapes, axes, scales) stay on the CPU so reading them never syncs the device
        template: list[Any] = [None] * n_slots
        for s_ in needed:
            v, host = consts[s_]
            template[s_] = v.const if host else v.const.to(self.device)  # type: ignore[union-attr]
        self.template = template
        self.hook: StepHook | None = None

    def _runtime_node(self, n: Node) -> Node:
        subs = {k: v for k, v in n.attrs.items()
                if isinstance(v, Graph) or (isinstance(v, list) and v and isinstance(v[0], Graph))}
        if not subs:
            return n
        rn = Node(n.op_type, n.inputs, [], dict(n.attrs), name=n.name, domain=n.domain, opset=n.opset)
        rn.outputs = n.outputs  # not re-parented: the runtime node is a view of n
        rn.captures = n.captures
        for k, v in subs.items():
            rn.attrs[k] = ([GraphFunction(g, self.device) for g in v] if isinstance(v, list)
                           else GraphFunction(v, self.device))
        return rn

    @property
    def weight_bytes(self) -> int:
        """Bytes of constants this function holds on its device (prepacked copies live in the kernels)."""
        return sum(t.numel() * t.element_size() for t in self.template
                   if isinstance(t, torch.Tensor) and t.device == self.device)

    def __call__(self, inputs: Sequence[Any], outer: dict[str, Any] | None = None,
                 hook: StepHook | None = None) -> list[Any]:
        env = list(self.template)
        if len(inputs) != len(self.input_slots):
            raise KilnError(f"graph '{self.graph.name}' takes {len(self.input_slots)} inputs, got {len(inputs)}")
        for s, x in zip(self.input_slots, inputs):
            env[s] = x
        if self.capture_slots:
            outer = outer or {}
            for s, name in zip(self.capture_slots, self.capture_names):
                env[s] = outer[name]
        hook = hook or self.hook
        for st in self.steps:
            args = [env[i] if i >= 0 else None for i in st.ins]
            try:
                if hook is None:
                    r = st.kernel(*args)
                else:
                    t0 = time.perf_counter()
                    r = st.kernel(*args)
                    hook(st.node, time.perf_counter() - t0)
            except KilnError as e:
                raise type(e)(f"node '{st.node.name}' ({st.node.op_type}): {e}".replace("\n", " ")) from None
            except Exception as e:  # a failing kernel is reported as one line naming the node
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise KilnError(f"node '{st.node.name}' ({st.node.op_type}) failed: {msg}") from e
            if st.single:
                env[st.outs[0]] = r[0] if isinstance(r, tuple) else r
            else:
                if not isinstance(r, (tuple, list)):
                    r = (r,)
                for s, v in zip(st.outs, r):
                    env[s] = v
            for s in st.frees:
                env[s] = None
        return [env[s] for s in self.output_slots]
