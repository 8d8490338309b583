"""CUDA graph capture of a whole step list, one graph per input shape, owned by an ExecutionContext.

A captured graph has static input buffers (NHWC for 4-D float inputs, the layout the conv tactics
want) and static outputs living in the graph's private memory pool, where the caching allocator
already reuses the memory of dead activations during capture. Replay copies the caller's inputs in
(skipped when the caller wrote into the static buffers) and launches the graph on the current stream.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Collection, Sequence

import torch

from kiln.ir.graph import Graph

Tensor = torch.Tensor

UNCAPTURABLE_OPS = frozenset({"NonZero", "NonMaxSuppression", "Unique", "Compress", "Loop", "If", "Scan",
                              "SequenceInsert", "SequenceErase", "SequenceConstruct", "SequenceAt",
                              "SplitToSequence", "ConcatFromSequence", "Optional", "OptionalGetElement",
                              "OptionalHasElement"})


def capturable(g: Graph, prologue: Collection[int] | None = None) -> tuple[bool, str]:
    """Whether the step list can be captured: no host reads of device data, no data-dependent shapes (the
    shape prologue, kiln.runtime.prologue, runs before the graph: its host values are fixed per input shape).
    `prologue`: the prologue's node indices where a GraphFunction already chose them."""
    from kiln.ops.registry import lookup
    for v in list(g.inputs) + list(g.outputs):
        if v.kind != "tensor":
            return False, f"value '{v.name}' is a {v.kind}"
    from kiln.runtime.prologue import shape_prologue
    pro = set(shape_prologue(g, g.input_symbols()) if prologue is None else prologue)
    host_ready = {id(o) for i in pro for o in g.nodes[i].outputs}  # computed before the graph, per input shape
    for i, n in enumerate(g.nodes):
        if i in pro:
            continue
        if n.op_type in UNCAPTURABLE_OPS or n.subgraphs():
            return False, f"layer '{n.name}' ({n.op_type}) has data-dependent control or shapes"
        try:
            opdef = lookup(n.op_type, n.domain)
        except Exception:
            return False, f"layer '{n.name}' ({n.op_type}) is not a built-in op"
        if not getattr(opdef, "deterministic", True):
            return False, f"layer '{n.name}' ({n.op_type}) draws random numbers"
        for i in opdef.value_inputs:
            v = n.input(i)
            if v is not None and not v.is_const and id(v) not in host_ready:
                return False, f"layer '{n.name}' ({n.op_type}) reads a computed value on the host"
    return True, ""


_CAPTURE_LOCK = threading.Lock()
"""One capture (with its warm-up) at a time per process: a warm-up in one thread (cuDNN's algorithm
search, Triton's first launches) must not run while another thread's stream is capturing."""


def _static_like(x: Any) -> Any:
    if not isinstance(x, torch.Tensor):
        return x
    if x.dim() == 4 and x.is_floating_point():
        return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


class CapturedGraph:
    """One captured run: static inputs, the CUDA graph, static outputs."""

    def __init__(self, fn: Callable[[Sequence[Any]], list[Any]], args: Sequence[Any], warmup: int = 2) -> None:
        self.static_in = [_static_like(a) for a in args]
        for s, a in zip(self.static_in, args):
            if isinstance(s, torch.Tensor):
                s.copy_(a)
        caller = torch.cuda.current_stream()
        with _CAPTURE_LOCK:
            side = torch.cuda.Stream(device=caller.device)
            side.wait_stream(caller)
            with torch.cuda.stream(side):
                for _ in range(warmup):  # compiles Triton kernels, runs cuDNN's algorithm search, sets up cuBLAS
                    fn(self.static_in)
            caller.wait_stream(side)
            side.synchronize()
            base = torch.cuda.memory_allocated(caller.device)
            torch.cuda.reset_peak_memory_stats(caller.device)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.static_out = fn(self.static_in)
            # high-water mark of the activations (and outputs) in the graph's private pool, where memory
            # freed during capture is reused: the pool's counterpart of the planned arena (approximate
            # when other threads allocate meanwhile)
            self.pool_bytes = max(0, torch.cuda.max_memory_allocated(caller.device) - base)

    def run(self, args: Sequence[Any]) -> list[Any]:
        for s, a in zip(self.static_in, args):
            if isinstance(s, torch.Tensor) and a.data_ptr() != s.data_ptr():
                s.copy_(a, non_blocking=True)
        self.graph.replay()
        return self.static_out
