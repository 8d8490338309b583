"""LSTM on the CPU as one call of torch's fused LSTM (``torch._VF.lstm``: the whole sequence in ATen's C++
loop, oneDNN's RNN primitive where torch has it) or of Kiln's own C loop (``cpu.lstm_c``, native/lstm.c: no torch
dispatch, for one-step streaming calls) instead of the reference's Python loop over time steps.

The common case only: float32, direction forward, reverse (the sequence flipped around the call) or
bidirectional, the default activations (Sigmoid, Tanh, Tanh), no clip, no peepholes, no coupled
input-forget gate, layout 0, constant W / R / B, and `sequence_lens` absent or a constant that keeps every
sequence at full length. ONNX's gate blocks (i, o, f, c) are reordered once at build time into torch's
(i, f, g, o) and the biases split into the input and recurrent halves; anything else is declined in
`supports`, so those layers keep the reference tactic.
"""
from __future__ import annotations

from typing import Any

import torch

from kiln.backends.cpu.common import CpuTactic, const_f32, is_f32
from kiln.backends.tactic import Built, Kernel, register_tactic
from kiln.errors import KilnError
from kiln.ir.graph import Node
from kiln.ops.registry import lookup

Tensor = torch.Tensor
_DEFAULT_ACTS = ["Sigmoid", "Tanh", "Tanh"]
_TORCH_GATES = [0, 2, 3, 1]  # torch's i, f, g, o as ONNX gate blocks (i, o, f, c)


def _directions(node: Node) -> int | None:
    return {"forward": 1, "reverse": 1, "bidirectional": 2}.get(node.attr("direction", "forward") or "forward")


def _default_activations(node: Node, dirs: int) -> bool:
    names = [str(a).lower() for a in (node.attr("activations") or [])]
    return (not names or names == [a.lower() for a in _DEFAULT_ACTS] * dirs
            or (dirs == 2 and names == [a.lower() for a in _DEFAULT_ACTS]))


def _full_lengths(node: Node) -> bool:
    """No sequence_lens, or a constant one holding the (static) sequence length for every batch row."""
    lens = node.input(4)
    if lens is None:
        return True
    x_shape = node.inputs[0].type.shape  # type: ignore[union-attr]
    steps = x_shape[0] if x_shape is not None else None
    return (lens.const is not None and isinstance(steps, int) and lens.const.dim() == 1
            and bool((lens.const == steps).all()))


def _reorder(t: Tensor, hidden: int) -> Tensor:
    """[4H, ...] gate blocks in ONNX's order (i, o, f, c) -> torch's (i, f, g, o), contiguous."""
    return torch.cat([t[g * hidden:(g + 1) * hidden] for g in _TORCH_GATES]).contiguous()


class CpuLstmTactic(CpuTactic):
    """ONNX LSTM (the common case, see module doc) as one call of torch's fused LSTM with prepacked weights."""

    id = "cpu.lstm"

    torch_dispatch = True
    priority = 10
    ops = (("", "LSTM"), ("ai.onnx", "LSTM"))

    def accepts(self, node: Node) -> bool:
        dirs = _directions(node)
        x, w, r = node.input(0), const_f32(node.input(1)), const_f32(node.input(2))
        if dirs is None or not is_f32(x) or x.type.rank != 3 or w is None or r is None:  # type: ignore[union-attr]
            return False
        if w.dim() != 3 or r.dim() != 3 or int(w.shape[0]) != dirs or int(r.shape[0]) != dirs:
            return False
        hidden = int(r.shape[2])
        if hidden < 1 or int(w.shape[1]) != 4 * hidden or int(r.shape[1]) != 4 * hidden or int(w.shape[2]) < 1:
            return False
        size = node.inputs[0].type.shape[2]  # type: ignore[union-attr,index]
        if isinstance(size, int) and size != int(w.shape[2]):
            return False
        hs = node.attr("hidden_size")
        if hs is not None and int(hs) != hidden:
            return False
        b = node.input(3)
        if b is not None and (const_f32(b) is None or tuple(b.const.shape) != (dirs, 8 * hidden)):  # type: ignore[union-attr]
            return False
        for i in (5, 6):  # initial_h, initial_c: float32 [D, B, H] activations or constants
            s = node.input(i)
            if s is not None and (not is_f32(s) or s.type.rank != 3):
                return False
        if node.input(7) is not None or not _full_lengths(node):  # peepholes; partial sequences
            return False
        if node.attr("clip") is not None or int(node.attr("input_forget", 0) or 0) or int(node.attr("layout", 0) or 0):
            return False
        if node.attr("activation_alpha") or node.attr("activation_beta") or not _default_activations(node, dirs):
            return False
        return 1 <= len(node.outputs) <= 3 and all(is_f32(o) for o in node.outputs)

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        dirs = _directions(node)
        w, r = node.inputs[1].const, node.inputs[2].const  # type: ignore[union-attr]
        b_v = node.input(3)
        if dirs is None or w is None or r is None:
            raise KilnError(f"'{node.name}': {self.id} needs constant W and R and a known direction")
        hidden, size = int(r.shape[2]), int(w.shape[2])
        b = (b_v.const if b_v is not None and b_v.const is not None
             else torch.zeros(dirs, 8 * hidden, dtype=torch.float32))
        params: list[Tensor] = []
        for d in range(dirs):
            params += [_reorder(w[d].float(), hidden), _reorder(r[d].float(), hidden),
                       _reorder(b[d, :4 * hidden].float(), hidden), _reorder(b[d, 4 * hidden:].float(), hidden)]
        reverse = (node.attr("direction", "forward") or "forward") == "reverse"
        n_out = len(node.outputs)
        lstm = torch._VF.lstm  # type: ignore[attr-defined]

        def k_lstm(x: Tensor, _w: Any = None, _r: Any = None, _b: Any = None, lens: Tensor | None = None,
                   h0: Tensor | None = None, c0: Tensor | None = None, *rest: Any) -> Any:
            entry = _entry(node, x, size, dirs, hidden, lens, h0, c0)
            if entry is None:
                return _reference_call(node, x, lens, h0, c0)
            steps, batch, states = entry
            state = [x.new_zeros(dirs, batch, hidden) if st is None else st for st in states]
            xs = x.flip(0) if reverse else x
            y, h, c = lstm(xs, state, params, True, 1, 0.0, False, dirs == 2, False)
            if reverse:
                y = y.flip(0)
            outs = (y.view(steps, batch, dirs, hidden).transpose(1, 2).contiguous(), h, c)
            return outs[0] if n_out == 1 else outs[:n_out]
        present = frozenset(i for i in (1, 2, 3) if node.input(i) is not None)
        return Kernel(k_lstm, prepacked=present, out_format="contiguous")  # W, R, B live in the kernel (reordered)


def _entry(node: Node, x: Tensor, size: int, dirs: int, hidden: int, lens: Tensor | None, h0: Tensor | None,
           c0: Tensor | None) -> tuple[int, int, list[Tensor | None]] | None:
    """What both LSTM kernels check on entry: (steps, batch, [h0, c0] made contiguous, None where absent), or None
    when sequence_lens shortens a sequence (the caller runs the reference); KilnError for a wrong input or state."""
    if x.dim() != 3 or x.dtype is not torch.float32 or int(x.shape[2]) != size:
        raise KilnError(f"'{node.name}' takes a float32 input [T, B, {size}], got {list(x.shape)} {x.dtype}")
    steps, batch = int(x.shape[0]), int(x.shape[1])
    lens_v = node.input(4)
    if lens_v is not None:
        lens_t = lens if lens is not None else lens_v.const
        if lens_t is None or not bool((lens_t == steps).all()):
            return None
    states: list[Tensor | None] = []
    for st in (h0, c0):
        if st is not None and (tuple(st.shape) != (dirs, batch, hidden) or st.dtype is not torch.float32):
            raise KilnError(f"'{node.name}': an initial state must be float32 {[dirs, batch, hidden]}, got "
                            f"{list(st.shape)} {st.dtype}")
        states.append(None if st is None else st.contiguous())
    return steps, batch, states


def _reference_call(node: Node, x: Tensor, lens: Tensor | None, h0: Tensor | None, c0: Tensor | None) -> Any:
    """The LSTM's reference on the kernel's inputs (its constants from the node): for shortened sequences."""
    b_v, lens_v = node.input(3), node.input(4)
    lens_t = lens if lens is not None else (None if lens_v is None else lens_v.const)
    return lookup(node.op_type, node.domain).compute(node, x, node.inputs[1].const, node.inputs[2].const,
                                                     None if b_v is None else b_v.const, lens_t, h0, c0)


def _lstm_library() -> Any:
    """native/lstm.c (kiln_lstm), typed, or None where no C compiler works."""
    import ctypes as C

    from kiln.backends.cpu import native
    lib = native.load("lstm")
    if lib is not None and not hasattr(lib, "_kiln_typed"):
        P, L = C.c_void_p, C.c_long
        lib.kiln_lstm.argtypes = [P, L, L, L, L, P, P, P, P, P, P, L, P, P, C.c_int]
        lib.kiln_lstm.restype = C.c_int
        lib._kiln_typed = True
    return lib


class CLstmTactic(CpuLstmTactic):
    """The same LSTM layers as `cpu.lstm` (module doc), as one C call per direction (native/lstm.c: gate
    products as axpys over prepacked W^T / R^T, then the cell update), without torch dispatch: for streaming
    models that run one step per call, where dispatch is most of the time. Competes with `cpu.lstm` and the
    reference by timing."""

    id = "cpu.lstm_c"
    torch_dispatch = False
    priority = 9

    def accepts(self, node: Node) -> bool:
        return super().accepts(node) and _lstm_library() is not None

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        lib = _lstm_library()
        dirs = _directions(node)
        w, r = node.inputs[1].const, node.inputs[2].const  # type: ignore[union-attr]
        b_v = node.input(3)
        if lib is None or dirs is None or w is None or r is None:
            raise KilnError(f"'{node.name}': {self.id} needs constant W and R, a known direction and a C compiler")
        hidden, size = int(r.shape[2]), int(w.shape[2])
        wt = [w[d].float().t().contiguous() for d in range(dirs)]  # [I, 4H], ONNX gate order kept
        rt = [r[d].float().t().contiguous() for d in range(dirs)]  # [H, 4H]
        bias = ([(b_v.const[d, :4 * hidden] + b_v.const[d, 4 * hidden:]).float().contiguous() for d in range(dirs)]
                if b_v is not None and b_v.const is not None else [None] * dirs)
        reverse = (node.attr("direction", "forward") or "forward") == "reverse"
        n_out = len(node.outputs)
        keep = (wt, rt, bias)

        def k_lstm(x: Tensor, _w: Any = None, _r: Any = None, _b: Any = None, lens: Tensor | None = None,
                   h0: Tensor | None = None, c0: Tensor | None = None, *rest: Any) -> Any:
            entry = _entry(node, x, size, dirs, hidden, lens, h0, c0)
            if entry is None:
                return _reference_call(node, x, lens, h0, c0)
            steps, batch, states = entry
            xc = x.contiguous()
            y = torch.empty(steps, dirs, batch, hidden)
            hn, cn = torch.empty(dirs, batch, hidden), torch.empty(dirs, batch, hidden)
            for d in range(dirs):
                h_in, c_in = (None if s is None else s[d] for s in states)
                rc = lib.kiln_lstm(xc.data_ptr(), steps, batch, size, hidden, wt[d].data_ptr(), rt[d].data_ptr(),
                                   None if bias[d] is None else bias[d].data_ptr(),
                                   None if h_in is None else h_in.data_ptr(), None if c_in is None else c_in.data_ptr(),
                                   y[0, d].data_ptr() if y is not None and steps else None, dirs * batch * hidden,
                                   hn[d].data_ptr(), cn[d].data_ptr(), int(reverse or d == 1))
                if rc != 0:
                    raise KilnError(f"'{node.name}': the LSTM kernel failed ({rc})")
            outs = (y, hn, cn)
            return outs[0] if n_out == 1 else outs[:n_out]
        k_lstm.keep = keep  # type: ignore[attr-defined]
        present = frozenset(i for i in (1, 2, 3) if node.input(i) is not None)
        return Kernel(k_lstm, prepacked=present, out_format="contiguous")


register_tactic(CpuLstmTactic())
register_tactic(CLstmTactic())
