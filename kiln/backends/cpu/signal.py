"""STFT of a real float32 signal on the CPU: frames as a strided view, the window, one real FFT in float32.

The op's reference (kiln.ops.signal) makes the signal complex and runs a full complex FFT in float64 (exact near
zero, as the ONNX reference evaluator is), then keeps the one-sided half: 6 ms of Whisper's 30-second log-mel front
end (3000 frames of 400 samples). A real signal needs only the real FFT, and a float32 model's spectrum only
float32: here the frames are `unfold`'s view of the signal, multiplied by the window into one buffer, and
`torch.fft.rfft` (pocketfft) gives the one-sided half directly (the two-sided spectrum is rebuilt from it by
conjugate symmetry). Constant frame_step, window and frame_length; a [batch, length] or [batch, length, 1] signal.
"""
from __future__ import annotations

from typing import Any

import torch

from kiln.backends.cpu.common import CpuTactic, is_f32
from kiln.backends.tactic import Built, register_tactic
from kiln.errors import KilnError
from kiln.ir.graph import Node
from kiln.ops.registry import ints

Tensor = torch.Tensor


def _geometry(node: Node) -> tuple[int, int, Tensor | None] | None:
    """(frame_step, frame_length, window as float32 or None) of an STFT this tactic takes, else None."""
    x = node.input(0)
    if not is_f32(x) or x.type.rank not in (2, 3) or len(node.outputs) != 1:  # type: ignore[union-attr]
        return None
    if x.type.rank == 3 and x.type.shape[-1] != 1:  # type: ignore[union-attr,index]
        return None  # a complex signal: the reference's complex FFT
    step_v, win_v, len_v = node.input(1), node.input(2), node.input(3)
    if step_v is None or step_v.const is None or any(v is not None and v.const is None for v in (win_v, len_v)):
        return None
    try:
        step = ints(step_v.const)[0]
        win = None if win_v is None else win_v.const.float().reshape(-1)  # type: ignore[union-attr]
        flen = ints(len_v.const)[0] if len_v is not None else (int(win.numel()) if win is not None else None)
    except Exception:
        return None
    if flen is None or step <= 0 or flen <= 0 or (win is not None and int(win.numel()) != flen):
        return None
    return step, flen, win


class CpuStftTactic(CpuTactic):
    """STFT of a real float32 signal as framed views, the window and a float32 real FFT (see module doc)."""

    id = "cpu.stft"
    priority = 10
    ops = (("", "STFT"),)

    def accepts(self, node: Node) -> bool:
        return _geometry(node) is not None

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        got = _geometry(node)
        assert got is not None, f"{self.id} does not support node {node.name}"
        step, flen, win = got
        onesided = bool(int(node.attr("onesided", 1)))

        def k_stft(x: Tensor, *_: Any) -> Tensor:
            sig = x.reshape(x.shape[0], x.shape[1]) if x.dim() == 3 else x
            if not 0 < flen <= sig.shape[1]:
                raise KilnError(f"'{node.name}': frame_length {flen} does not fit a signal of {sig.shape[1]} samples")
            frames = sig.unfold(1, flen, step)  # [batch, n_frames, flen], a view
            if win is not None:
                frames = frames * win
            y = torch.fft.rfft(frames, n=flen, dim=-1)
            if not onesided:  # the other half by conjugate symmetry: X[k] = conj(X[n - k])
                rest = y[..., 1:(flen + 1) // 2].flip(-1).conj()
                y = torch.cat([y, rest], dim=-1)
            return torch.view_as_real(y)
        return k_stft


register_tactic(CpuStftTactic())
