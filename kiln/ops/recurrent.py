"""Recurrent layers: RNN, LSTM, GRU.

All three share one driver: the input projection X·Wᵀ + Wb is computed for every time step at
once, then a per-op cell function advances the hidden state step by step. Directions, layouts,
`sequence_lens` (per-batch valid lengths: padded steps output zero and freeze the state), clip
and the configurable activation functions (with ONNX's alpha/beta consumption rules) are
handled in the shared code. Half-precision inputs are computed in float32 and cast back.
"""
from __future__ import annotations

from typing import Callable, ClassVar, Sequence

import torch

from kiln.errors import UnsupportedDTypeError, UnsupportedOpError
from kiln.ir.graph import Node
from kiln.ir.types import Dim, TensorType
from kiln.ops.registry import OpDef, register

Tensor = torch.Tensor
Act = Callable[[Tensor], Tensor]
State = tuple[Tensor, ...]
Cell = Callable[[Tensor, State], State]

# name -> (function of (x, alpha, beta), default alpha or None if unused, default beta or None)
_ACTIVATIONS: dict[str, tuple[Callable[[Tensor, float, float], Tensor], float | None, float | None]] = {
    "relu": (lambda x, a, b: torch.relu(x), None, None),
    "tanh": (lambda x, a, b: torch.tanh(x), None, None),
    "sigmoid": (lambda x, a, b: torch.sigmoid(x), None, None),
    "affine": (lambda x, a, b: x * a + b, 1.0, 0.0),
    "leakyrelu": (lambda x, a, b: torch.where(x >= 0, x, x * a), 0.01, None),
    "thresholdedrelu": (lambda x, a, b: torch.where(x > a, x, torch.zeros_like(x)), 1.0, None),
    "scaledtanh": (lambda x, a, b: a * torch.tanh(b * x), 1.0, 1.0),
    "hardsigmoid": (lambda x, a, b: torch.clamp(x * a + b, 0.0, 1.0), 0.2, 0.5),
    "elu": (lambda x, a, b: torch.where(x >= 0, x, a * torch.expm1(x)), 1.0, None),
    "softsign": (lambda x, a, b: x / (1 + x.abs()), None, None),
    "softplus": (lambda x, a, b: torch.nn.functional.softplus(x), None, None),
}

_FLOAT_TYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _num_directions(node: Node) -> int:
    direction = node.attr("direction", "forward")
    if direction not in ("forward", "reverse", "bidirectional"):
        raise UnsupportedOpError(f"node '{node.name}': unknown direction '{direction}'")
    return 2 if direction == "bidirectional" else 1


def _activations(node: Node, defaults: Sequence[str]) -> list[list[Act]]:
    """Per-direction activation functions; alpha/beta lists are consumed by the functions using them."""
    dirs = _num_directions(node)
    names = list(node.attr("activations") or [])
    if not names:
        names = list(defaults) * dirs
    elif len(names) == len(defaults) and dirs == 2:
        names = names * 2
    if len(names) != len(defaults) * dirs:
        raise UnsupportedOpError(f"node '{node.name}': expected {len(defaults) * dirs} activations, "
                                 f"got {len(names)}")
    alphas = list(node.attr("activation_alpha") or [])
    betas = list(node.attr("activation_beta") or [])
    fns: list[Act] = []
    for name in names:
        spec = _ACTIVATIONS.get(name.lower())
        if spec is None:
            raise UnsupportedOpError(f"node '{node.name}': unsupported activation '{name}'")
        fn, da, db = spec
        a = (alphas.pop(0) if alphas else da) if da is not None else 0.0
        b = (betas.pop(0) if betas else db) if db is not None else 0.0
        fns.append(lambda x, fn=fn, a=float(a), b=float(b): fn(x, a, b))
    k = len(defaults)
    return [fns[d * k:(d + 1) * k] for d in range(dirs)]


def _clipper(node: Node) -> Callable[[Tensor], Tensor]:
    clip = node.attr("clip")
    if clip is None:
        return lambda x: x
    c = float(clip)
    return lambda x: torch.clamp(x, -c, c)


def _reverse_index(lens: Tensor | None, steps: int, batch: int, device: torch.device) -> Tensor:
    """[T, B] time index that reverses each sequence's valid prefix (padding stays in place)."""
    t = torch.arange(steps, device=device).unsqueeze(1).expand(steps, batch)
    if lens is None:
        return steps - 1 - t
    lens = lens.to(device=device, dtype=torch.int64).unsqueeze(0)
    return torch.where(t < lens, lens - 1 - t, t)


def _run(node: Node, X: Tensor, W: Tensor, R: Tensor, B: Tensor | None, lens: Tensor | None,
         init: list[Tensor | None], gates: int, make_cell: Callable[[int, Tensor, Tensor], Cell]) -> list[Tensor]:
    """Shared driver. Returns [Y, Y_h, (Y_c)] in the node's layout and dtype.

    make_cell(direction, R_d, Rb_d) builds the step function for one direction; it receives the
    precomputed input projection of one step and the state tuple, and returns the new state
    tuple whose first element is the hidden output.
    """
    if X.dtype not in _FLOAT_TYPES:
        raise UnsupportedDTypeError(f"node '{node.name}': {node.op_type} does not support dtype {X.dtype}")
    if node.attr("layout", 0) not in (0, 1):
        raise UnsupportedOpError(f"node '{node.name}': layout must be 0 or 1")
    out_dtype = X.dtype
    cdt = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
    layout = node.attr("layout", 0)
    dirs = _num_directions(node)
    if W.shape[0] != dirs:
        raise UnsupportedOpError(f"node '{node.name}': W has {W.shape[0]} directions, "
                                 f"direction attribute requires {dirs}")
    X, W, R = X.to(cdt), W.to(cdt), R.to(cdt)
    if layout == 1:
        X = X.transpose(0, 1)
        init = [None if s is None else s.transpose(0, 1) for s in init]
    steps, batch = X.shape[0], X.shape[1]
    hidden = R.shape[-1]
    if B is None:
        B = torch.zeros(dirs, 2 * gates * hidden, dtype=cdt, device=X.device)
    B = B.to(cdt)
    states0 = [torch.zeros(dirs, batch, hidden, dtype=cdt, device=X.device) if s is None else s.to(cdt)
               for s in init]
    mask = None
    if lens is not None:
        t = torch.arange(steps, device=X.device).unsqueeze(1)
        mask = (t < lens.to(device=X.device, dtype=torch.int64).unsqueeze(0)).unsqueeze(-1)  # [T, B, 1]
    reverse = node.attr("direction", "forward") == "reverse"
    ys, finals = [], []
    for d in range(dirs):
        backward = reverse or d == 1
        xd = X
        if backward:
            idx = _reverse_index(lens, steps, batch, X.device)
            xd = torch.gather(X, 0, idx.unsqueeze(-1).expand_as(X))
        proj = torch.matmul(xd, W[d].transpose(0, 1)) + B[d, :gates * hidden]
        cell = make_cell(d, R[d], B[d, gates * hidden:])
        state: State = tuple(s[d] for s in states0)
        outs = []
        for step in range(steps):
            new = cell(proj[step], state)
            if mask is not None:
                m = mask[step]
                new = tuple(torch.where(m, n, s) for n, s in zip(new, state))
                outs.append(torch.where(m, new[0], torch.zeros_like(new[0])))
            else:
                outs.append(new[0])
            state = new
        y = torch.stack(outs, 0) if outs else torch.zeros(0, batch, hidden, dtype=cdt, device=X.device)
        if backward and steps:
            y = torch.gather(y, 0, idx.unsqueeze(-1).expand_as(y))
        ys.append(y)
        finals.append(state)
    Y = torch.stack(ys, 1)  # [T, D, B, H]
    results = [Y] + [torch.stack([f[i] for f in finals], 0) for i in range(len(states0))]
    if layout == 1:
        results = [results[0].permute(2, 0, 1, 3)] + [r.transpose(0, 1) for r in results[1:]]
    return [r.to(out_dtype) for r in results]


def _infer(node: Node, types: Sequence[TensorType | None]) -> list[TensorType]:
    """Output types without stepping through time: Y [T, D, B, H] (layout 1: [B, T, D, H]), states [D, B, H]."""
    x, r = types[0], types[2] if len(types) > 2 else None
    dtype = x.dtype if x is not None else None
    hidden: Dim = node.attr("hidden_size")
    if hidden is None and r is not None and r.shape is not None:
        hidden = r.shape[-1]
    dirs = _num_directions(node)
    if x is None or x.shape is None or len(x.shape) != 3:
        return [TensorType(dtype, None) for _ in node.outputs]
    if node.attr("layout", 0) == 1:
        batch, steps = x.shape[0], x.shape[1]
        y, state = (batch, steps, dirs, hidden), (batch, dirs, hidden)
    else:
        steps, batch = x.shape[0], x.shape[1]
        y, state = (steps, dirs, batch, hidden), (dirs, batch, hidden)
    return [TensorType(dtype, y)] + [TensorType(dtype, state) for _ in node.outputs[1:]]


class _Recurrent(OpDef):
    """Shared inference and attribute checks of the recurrent layers."""

    activations: ClassVar[list[str]] = []

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        return _infer(node, types)

    def check(self, node: Node) -> None:
        _activations(node, self.activations)
        if node.attr("layout", 0) not in (0, 1):
            raise UnsupportedOpError(f"node '{node.name}': layout must be 0 or 1")


def _select(node: Node, results: list[Tensor]) -> Tensor | tuple[Tensor, ...]:
    n = len(node.outputs)
    return results[0] if n == 1 else tuple(results[:n])


@register
class RNN(_Recurrent):
    """Simple recurrent layer: Hₜ = f(Xₜ·Wᵀ + Hₜ₋₁·Rᵀ + Wb + Rb)."""

    op_type = "RNN"
    activations = ["Tanh"]

    def compute(self, node: Node, X: Tensor, W: Tensor, R: Tensor, B: Tensor | None = None,
                sequence_lens: Tensor | None = None, initial_h: Tensor | None = None) -> object:
        acts = _activations(node, self.activations)
        clip = _clipper(node)

        def make_cell(d: int, Rd: Tensor, Rb: Tensor) -> Cell:
            f = acts[d][0]
            Rt = Rd.transpose(0, 1)
            return lambda xp, s: (f(clip(xp + s[0] @ Rt + Rb)),)

        return _select(node, _run(node, X, W, R, B, sequence_lens, [initial_h], 1, make_cell))


@register
class LSTM(_Recurrent):
    """Long short-term memory layer (gate order i, o, f, c; optional peepholes and coupled input-forget)."""

    op_type = "LSTM"
    activations = ["Sigmoid", "Tanh", "Tanh"]

    def compute(self, node: Node, X: Tensor, W: Tensor, R: Tensor, B: Tensor | None = None,
                sequence_lens: Tensor | None = None, initial_h: Tensor | None = None,
                initial_c: Tensor | None = None, P: Tensor | None = None) -> object:
        acts = _activations(node, self.activations)
        clip = _clipper(node)
        input_forget = bool(node.attr("input_forget", 0))
        cdt = torch.float32 if X.dtype in (torch.float16, torch.bfloat16) else X.dtype
        hidden = R.shape[-1]

        def make_cell(d: int, Rd: Tensor, Rb: Tensor) -> Cell:
            f, g, h = acts[d]
            Rt = Rd.transpose(0, 1)
            if P is not None:
                p_i, p_o, p_f = P[d].to(cdt).split(hidden)
            else:
                p_i = p_o = p_f = None

            def cell(xp: Tensor, s: State) -> State:
                H, C = s
                gi, go, gf, gc = (xp + H @ Rt + Rb).split(hidden, -1)
                i = f(clip(gi if p_i is None else gi + p_i * C))
                if input_forget:
                    fg = 1 - i
                else:
                    fg = f(clip(gf if p_f is None else gf + p_f * C))
                C2 = fg * C + i * g(clip(gc))
                o = f(clip(go if p_o is None else go + p_o * C2))
                return o * h(C2), C2

            return cell

        results = _run(node, X, W, R, B, sequence_lens, [initial_h, initial_c], 4, make_cell)
        return _select(node, results)


@register
class GRU(_Recurrent):
    """Gated recurrent unit layer (gate order z, r, h; linear_before_reset variant)."""

    op_type = "GRU"
    activations = ["Sigmoid", "Tanh"]

    def compute(self, node: Node, X: Tensor, W: Tensor, R: Tensor, B: Tensor | None = None,
                sequence_lens: Tensor | None = None, initial_h: Tensor | None = None) -> object:
        acts = _activations(node, self.activations)
        clip = _clipper(node)
        linear_before_reset = bool(node.attr("linear_before_reset", 0))
        hidden = R.shape[-1]

        def make_cell(d: int, Rd: Tensor, Rb: Tensor) -> Cell:
            f, g = acts[d]
            Rzr = Rd[:2 * hidden].transpose(0, 1)
            Rh = Rd[2 * hidden:].transpose(0, 1)
            Rb_zr, Rb_h = Rb[:2 * hidden], Rb[2 * hidden:]

            def cell(xp: Tensor, s: State) -> State:
                H = s[0]
                x_zr, x_h = xp[..., :2 * hidden], xp[..., 2 * hidden:]
                z, r = f(clip(x_zr + H @ Rzr + Rb_zr)).split(hidden, -1)
                if linear_before_reset:
                    hh = g(clip(x_h + r * (H @ Rh + Rb_h)))
                else:
                    hh = g(clip(x_h + (r * H) @ Rh + Rb_h))
                return ((1 - z) * hh + z * H,)

            return cell

        return _select(node, _run(node, X, W, R, B, sequence_lens, [initial_h], 3, make_cell))
