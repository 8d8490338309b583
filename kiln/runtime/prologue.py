"""The shape prologue: layers whose results follow from the input shapes alone, run on the host once per shape.

A dynamic-shape export computes sizes at run time: `Shape(x) -> Gather -> Unsqueeze -> Concat -> Reshape`,
`Range(0, seq)` for position ids, `Sqrt(Cast(Shape(q)[-1]))` for an attention scale. Kiln folds every such
value it can prove constant (kiln.ops.shape_values); what depends on a dynamic dim is left. Those layers
read no tensor data, only shapes: Shape / Size of a tensor whose dims the call's inputs bind (a graph input
or capture, or a value whose proven type names only their symbols and sizes), and every deterministic layer
whose inputs are such results or constants.

They run here, on the CPU with the reference kernels, once per distinct input shape, and their results are
cached: the device steps read them as host values (a Reshape's target never syncs the GPU), results that a
device kernel reads as data are uploaded once per shape, and a CUDA graph captured for that shape replays
with them in place (the cache keeps those device copies alive as long as the function).
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import torch

from kiln.ir.dims import dim_resolvable
from kiln.ir.graph import Graph

SHAPE_OPS = frozenset({"Shape", "Size"})


def shape_prologue(graph: Graph, symbols: set[str], skip: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """Indices (in graph.nodes) of the layers computing from input shapes alone (see the module doc).
    `symbols`: the dims a call binds (its inputs' and captures' symbolic dims); `skip`: indices to leave out."""
    from kiln.ops.registry import lookup
    only: set[int] = set()  # ids of values that follow from the shapes
    picked: list[int] = []
    for i, n in enumerate(graph.nodes):
        if i in skip or n.subgraphs() or n.domain not in ("", "ai.onnx"):
            continue
        try:
            opdef = lookup(n.op_type, n.domain)
        except Exception:
            continue
        if not getattr(opdef, "deterministic", True):
            continue
        if n.op_type in SHAPE_OPS:
            x = n.input(0)
            t = x.type if x is not None else None
            take = (t is not None and t.shape is not None
                    and all(dim_resolvable(d, symbols) for d in t.shape))
        else:
            ins = [v for v in n.inputs if v is not None]
            take = bool(ins) and all(v.is_const or id(v) in only for v in ins) and any(id(v) in only for v in ins)
        if take:
            picked.append(i)
            only.update(id(o) for o in n.outputs)
    return picked


def stand_in(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of this shape holding no data (zero strides): what Shape and Size need to read."""
    return torch.zeros((), dtype=dtype).expand(*shape)


class PrologueCache:
    """Prologue results per input-shape key; one computation wins per key (a CUDA graph captured with one
    result set must find the same device tensors for as long as it lives)."""

    def __init__(self) -> None:
        self._entries: dict[Any, list[tuple[int, Any]]] = {}
        self._lock = threading.Lock()

    def get(self, key: Any, compute: Callable[[], list[tuple[int, Any]]]) -> list[tuple[int, Any]]:
        entry = self._entries.get(key)
        if entry is None:
            fresh = compute()
            with self._lock:
                entry = self._entries.setdefault(key, fresh)
        return entry
