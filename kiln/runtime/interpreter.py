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
        slot: dict[int, int] = {}
        template: list[Any] = []

        def slot_of(v: Value) -> int:
            k = id(v)
            if k not in slot:
                slot[k] = len(template)
                template.append(v.const.to(self.device) if v.const is not None else None)
            return slot[k]

        self.input_slots = [slot_of(v) for v in graph.inputs]
        self.capture_names = [v.name for v in graph.captures]
        self.capture_slots = [slot_of(v) for v in graph.captures]
        last_use: dict[int, int] = {}
        for i, n in enumerate(graph.nodes):
            for v in n.all_inputs:
                if v is not None:
                    last_use[slot_of(v)] = i
            for v in n.outputs:
                slot_of(v)
        self.output_slots = [slot_of(v) for v in graph.outputs]
        keep = set(self.output_slots) | {slot[id(v)] for v in graph.values() if v.is_const}
        self.steps: list[_Step] = []
        for i, n in enumerate(graph.nodes):
            rn = self._runtime_node(n)
            ins = [-1 if v is None else slot[id(v)] for v in n.all_inputs]
            outs = [slot[id(v)] for v in n.outputs]
            frees = sorted({s for s in ins if s >= 0 and last_use.get(s) == i and s not in keep}
                           | {s for s in outs if s not in last_use and s not in keep})
            self.steps.append(_Step(rn, factory(rn), ins, outs, frees))
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

    def __call__(self, inputs: Sequence[Any], outer: dict[str, Any] | None = None) -> list[Any]:
        env = list(self.template)
        if len(inputs) != len(self.input_slots):
            raise KilnError(f"graph '{self.graph.name}' takes {len(self.input_slots)} inputs, got {len(inputs)}")
        for s, x in zip(self.input_slots, inputs):
            env[s] = x
        if self.capture_slots:
            outer = outer or {}
            for s, name in zip(self.capture_slots, self.capture_names):
                env[s] = outer[name]
        hook = self.hook
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
