"""Tactic: one implementation of a (fused) node on one backend, competing under the autotuner."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from kiln.backends.kernel import Kernel
from kiln.ir.graph import Node

Built = Kernel | Callable[..., Any]


@dataclass
class TacticContext:
    """What a tactic may look at when deciding support: target device and precision flags."""

    device: torch.device
    fp16: bool = False
    bf16: bool = False
    tf32: bool = True
    flush_denormals: bool = False
    workspace_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Tactic:
    """Base class of tactics. Subclasses register with `register_tactic`.

    id:        stable name stored in plans ("ref", "cpu.conv_mkldnn", "cuda.triton_conv", ...)
    devices:   device types it runs on
    priority:  heuristic rank used when not timing (higher first)
    writes_out: how many destinations its kernels can write into: they take ``out=`` (a tensor of the
               output's shape and dtype, possibly a strided view such as a slice of a Concat's output; or
               a tuple of such tensors, up to writes_out of them), write the result there instead of
               allocating, and return the first
    strided_out: its `out=` may be any strided view (a channel slice of a Concat's output); False: only a
               dense tensor of the output's own layout (an arena slot), so no Concat is elided into it
    is_view:   its kernels return a view of their input: nothing is launched, nothing is timed
    elides:    the runtime removes the layer (its producers write its output; see kiln.backends.views)
    elides_partly: a Concat laid out in place whose step copies only the inputs not stored there
               (kiln.plan.elision); it still launches
    torch_dispatch: its kernels call torch ops (the dispatcher), not native code directly: on the CPU the
               autotuner asks such a candidate to beat the native ones by a margin (kiln.tune.autotuner)
    """

    id: str = ""
    devices: tuple[str, ...] = ("cpu", "cuda")
    priority: int = 0
    writes_out: int = 0
    strided_out: bool = True
    is_view: bool = False
    elides: bool = False
    elides_partly: bool = False
    torch_dispatch: bool = False

    @property
    def launches(self) -> bool:
        """Whether the layer costs a kernel at run time (counted in the plan's layers)."""
        return not (self.is_view or self.elides)

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        raise NotImplementedError

    def why_not(self, node: Node, ctx: TacticContext) -> str | None:
        """Where `supports` declines a layer for a reason of this machine (not of the layer), that reason: a plan
        loader says it beside the refusal (a plan built elsewhere)."""
        return None

    def configs(self, node: Node, ctx: TacticContext) -> list[dict[str, Any]]:
        return [{}]

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        """The layer's implementation: a Kernel with its properties, or a bare callable that has none."""
        raise NotImplementedError

    def make(self, node: Node, config: dict[str, Any], device: torch.device) -> Kernel:
        """`build` as a Kernel carrying this tactic's destination-passing properties."""
        k = self.build(node, config, device)
        if not isinstance(k, Kernel):
            k = Kernel(k)
        k.writes_out, k.strided_out = self.writes_out, self.strided_out
        return k

    def workspace_bytes(self, node: Node, config: dict[str, Any], out_shape: tuple[int, ...] | None = None) -> int:
        """Scratch memory the kernel needs beside its output at this output shape (the autotuner skips a
        candidate over BuilderConfig.workspace_bytes)."""
        return 0


_TACTICS: dict[str, Tactic] = {}


def register_tactic(t: Tactic) -> Tactic:
    if t.id in _TACTICS:
        raise RuntimeError(f"tactic {t.id} registered twice")
    _TACTICS[t.id] = t
    return t


def unregister_tactic(tid: str) -> None:
    """Remove a tactic (a plugin's, when the plugin is unregistered: kiln.plugins.registry)."""
    _TACTICS.pop(tid, None)


def get_tactic(tid: str) -> Tactic | None:
    _ensure_loaded()
    return _TACTICS.get(tid)


def is_layer(tid: str) -> bool:
    """Whether a node running tactic `tid` launches work (views and elided layers do not)."""
    t = get_tactic(tid)
    return t is None or t.launches


def candidate_tactics(node: Node, ctx: TacticContext) -> list[Tactic]:
    """Tactics that support `node` on ctx.device, best heuristic first."""
    _ensure_loaded()
    out = [t for t in _TACTICS.values() if ctx.device.type in t.devices and t.supports(node, ctx)]
    return sorted(out, key=lambda t: -t.priority)


_loaded = False


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        import kiln.backends.reference  # noqa: F401
        import kiln.backends.views  # noqa: F401
        import kiln.backends.attention  # noqa: F401
        import kiln.backends.cpu  # noqa: F401
        import kiln.backends.cuda  # noqa: F401
