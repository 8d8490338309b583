"""The fused activations and the epilogue of Kiln's fused layers (FusedConv, FusedGemm), in one table.

Each `Activation` says everything Kiln knows about one activation a fused layer can apply: its name (the
``activation`` attribute), the reference torch function, the in-place torch function the CPU and CUDA
epilogues use, the oneDNN post-op that computes it inside a convolution / linear layer (torch's
``torch.ops.mkldnn`` kernels), the code the Triton kernels switch on (kiln.backends.cuda.triton_act
``apply_act``) and the ONNX op it is absorbed from by the graph optimizer (kiln.passes.epilogue).

`Epilogue` is what follows a fused layer's product: the activation with its parameters, the order of the
residual add and the activation, and the stored element type; `EPILOGUE` declares those attributes.

Parameters: LeakyRelu's slope is ``alpha``; Clip clamps to [alpha, beta]; HardSigmoid is ONNX's
``clamp(alpha * x + beta, 0, 1)``. float16/bfloat16 are evaluated in float32 and rounded back (`activate`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from kiln.errors import UnsupportedOpError
from kiln.ir.graph import Node
from kiln.ops.attrs import Attr, read

Tensor = torch.Tensor
Fn = Callable[[Tensor, float, float], Tensor]
"""fn(x, alpha, beta)."""

FLT_MAX = 3.4028234663852886e38
"""The bound of a Clip that has none."""

_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class OneDnnPostOp:
    """A oneDNN unary post-op of torch's mkldnn kernels: (attr, scalars, algorithm) of the call."""

    attr: str
    scalars: Callable[[float, float], list[Any]] = lambda a, b: []
    algorithm: str = ""
    applies: Callable[[float, float], bool] | None = None
    """None: for every alpha/beta; else only where applies(alpha, beta) (HardSigmoid: oneDNN's fixed one)."""

    def args(self, alpha: float, beta: float) -> tuple[str, list[Any], str] | None:
        if self.applies is not None and not self.applies(alpha, beta):
            return None
        return self.attr, self.scalars(alpha, beta), self.algorithm


@dataclass(frozen=True)
class Activation:
    """One fused activation (see the module doc)."""

    name: str
    code: int
    """The code of the Triton kernels' `apply_act` (kiln.backends.cuda.triton_act): never renumber."""
    fn: Fn
    """The reference: out of place, in the input's type (`activate` adds the float32 compute of half types)."""
    inplace: Fn | None
    """fn(y, alpha, beta) modifying y in place and returning it; None where torch has no in-place form."""
    onednn: OneDnnPostOp | None
    """The oneDNN post-op computing it; None where oneDNN has none (the activation then runs in place after)."""
    onnx: str | None = None
    """The ONNX op (ai.onnx domain) whose node computes it, read by `from_onnx`."""
    onnx_params: Callable[[Node], tuple[float, float] | None] | None = None
    """(alpha, beta) of such a node; None when this node computes something else (Gelu approximate=tanh...)."""


def _clip_bounds(n: Node) -> tuple[float, float] | None:
    """A Clip's [min, max] (absent: the float32 range); None when a bound is not a one-value constant."""
    if n.opset < 11:
        lo, hi = n.attr("min"), n.attr("max")
    else:
        lo = hi = None
        for i in (1, 2):
            v = n.input(i)
            if v is None:
                continue
            if not v.is_const or v.const.numel() != 1:  # type: ignore[union-attr]
                return None
            b = float(v.const.reshape(()).item())  # type: ignore[union-attr]
            lo, hi = (b, hi) if i == 1 else (lo, b)
    return (-FLT_MAX if lo is None else float(lo)), (FLT_MAX if hi is None else float(hi))


def _none(n: Node) -> tuple[float, float]:
    return 0.0, 0.0


def _hardsigmoid_in_onednn(alpha: float, beta: float) -> bool:
    return abs(alpha - 1.0 / 6.0) < 1e-7 and beta == 0.5


_TABLE = (
    Activation("", 0, lambda x, a, b: x, lambda y, a, b: y, OneDnnPostOp("none")),
    Activation("Relu", 1, lambda x, a, b: torch.relu(x), lambda y, a, b: torch.relu_(y), OneDnnPostOp("relu"),
               "Relu", _none),
    Activation("LeakyRelu", 2, lambda x, a, b: F.leaky_relu(x, a), lambda y, a, b: F.leaky_relu_(y, a),
               OneDnnPostOp("leaky_relu", lambda a, b: [a]), "LeakyRelu",
               lambda n: (float(n.attr("alpha", 0.01)), 0.0)),
    Activation("Clip", 3, lambda x, a, b: torch.clamp(x, a, b), lambda y, a, b: y.clamp_(a, b),
               OneDnnPostOp("hardtanh", lambda a, b: [a, b]), "Clip", _clip_bounds),
    Activation("Sigmoid", 4, lambda x, a, b: torch.sigmoid(x), lambda y, a, b: torch.sigmoid_(y),
               OneDnnPostOp("sigmoid"), "Sigmoid", _none),
    Activation("Tanh", 5, lambda x, a, b: torch.tanh(x), lambda y, a, b: torch.tanh_(y), OneDnnPostOp("tanh"),
               "Tanh", _none),
    Activation("SiLU", 6, lambda x, a, b: F.silu(x), lambda y, a, b: F.silu(y, inplace=True),
               OneDnnPostOp("swish"), "Swish", lambda n: (0.0, 0.0) if float(n.attr("alpha", 1.0)) == 1.0 else None),
    Activation("HardSwish", 7, lambda x, a, b: F.hardswish(x), lambda y, a, b: F.hardswish(y, inplace=True),
               OneDnnPostOp("hardswish"), "HardSwish", _none),
    Activation("HardSigmoid", 8, lambda x, a, b: torch.clamp(a * x + b, 0.0, 1.0),
               lambda y, a, b: y.mul_(a).add_(b).clamp_(0.0, 1.0),
               OneDnnPostOp("hardsigmoid", applies=_hardsigmoid_in_onednn), "HardSigmoid",
               lambda n: (float(n.attr("alpha", 0.2)), float(n.attr("beta", 0.5)))),
    Activation("Mish", 9, lambda x, a, b: F.mish(x), lambda y, a, b: F.mish(y, inplace=True), None, "Mish", _none),
    Activation("Gelu", 10, lambda x, a, b: F.gelu(x), None, OneDnnPostOp("gelu", algorithm="none"), "Gelu",
               lambda n: (0.0, 0.0) if n.attr("approximate", "none") == "none" else None),
    Activation("GeluTanh", 11, lambda x, a, b: F.gelu(x, approximate="tanh"), None,
               OneDnnPostOp("gelu", algorithm="tanh"), "Gelu",
               lambda n: (0.0, 0.0) if n.attr("approximate", "none") == "tanh" else None),
)

TABLE: dict[str, Activation] = {a.name: a for a in _TABLE}
"""Every fused activation by name ("": none). The one list: everything else derives from it."""

_FROM_ONNX: dict[str, tuple[Activation, ...]] = {}
for _a in _TABLE:
    if _a.onnx is not None:
        _FROM_ONNX[_a.onnx] = (*_FROM_ONNX.get(_a.onnx, ()), _a)


def get(name: str) -> Activation:
    """The activation by name; UnsupportedOpError for a name outside the table."""
    a = TABLE.get(name)
    if a is None:
        raise UnsupportedOpError(f"unknown fused activation {name!r}")
    return a


def activate(x: Tensor, name: str, alpha: float = 0.0, beta: float = 0.0) -> Tensor:
    """Apply a fused activation by name (half types computed in float32)."""
    a = get(name)
    if not name:
        return x
    if x.dtype in _HALF:
        return a.fn(x.float(), alpha, beta).to(x.dtype)
    return a.fn(x, alpha, beta)


def from_onnx(n: Node) -> tuple[str, float, float] | None:
    """(activation, alpha, beta) of the fused activation a single-output ONNX node computes, if one does.
    A Clip to [0, +inf) is Relu."""
    if len(n.outputs) != 1 or n.domain not in ("", "ai.onnx"):
        return None
    for a in _FROM_ONNX.get(n.op_type, ()):
        p = a.onnx_params(n) if a.onnx_params is not None else None
        if p is None:
            continue
        if a.name == "Clip" and p[0] == 0.0 and p[1] >= FLT_MAX:
            return "Relu", 0.0, 0.0
        return a.name, p[0], p[1]
    return None


# ---- the epilogue of a fused layer ----------------------------------------------------------------

FUSED_OPS = ("FusedConv", "FusedConvTranspose", "FusedGemm", "QConv", "QGemm")

EPILOGUE: dict[str, Attr] = {
    "activation": Attr("str", "", choices=tuple(TABLE)),
    "alpha": Attr("float", 0.0),
    "beta": Attr("float", 0.0),
    "act_before_add": Attr("int", 0, choices=(0, 1)),
    "out_dtype": Attr("int", None, choices=(1, 10, 16)),  # float32 / float16 / bfloat16 (a folded Cast)
}
"""The epilogue attributes every fused layer declares (kiln.ops.fused): activation by name (TABLE) with its
parameters, the order of residual add and activation, and the stored element type."""


@dataclass(frozen=True)
class Epilogue:
    """What follows a fused layer's matrix product and bias: the activation (with alpha/beta), the residual
    add's order (act_before_add: ``act(y) + Z``, else ``act(y + Z)``) and the stored type (ONNX element
    type; None: the weight's). The residual Z itself is the layer's input 3."""

    activation: str = ""
    alpha: float = 0.0
    beta: float = 0.0
    act_before_add: bool = False
    out_dtype: int | None = None

    @classmethod
    def of(cls, node: Node) -> "Epilogue":
        """The declared epilogue of a FusedConv / FusedConvTranspose / FusedGemm / QConv / QGemm / FusedConvNorm;
        none for any other node."""
        if node.domain == "kiln" and node.op_type == "FusedConvNorm":  # an activation only: no residual, no cast
            return cls(str(read(node, "activation") or ""), float(read(node, "alpha") or 0.0),
                       float(read(node, "beta") or 0.0))
        if node.domain != "kiln" or node.op_type not in FUSED_OPS:
            return cls()
        out = read(node, "out_dtype")
        return cls(str(read(node, "activation") or ""), float(read(node, "alpha") or 0.0),
                   float(read(node, "beta") or 0.0), bool(int(read(node, "act_before_add") or 0)),
                   None if out is None else int(out))

    def attrs(self) -> dict[str, Any]:
        """The node attributes declaring this epilogue (out_dtype only where set)."""
        out: dict[str, Any] = {"activation": self.activation, "alpha": self.alpha, "beta": self.beta,
                               "act_before_add": int(self.act_before_add)}
        if self.out_dtype is not None:
            out["out_dtype"] = self.out_dtype
        return out

    @property
    def act(self) -> Activation:
        return get(self.activation)

    @property
    def code(self) -> int:
        """The activation's code for the Triton kernels."""
        return self.act.code
