"""Signal processing: DFT, STFT, the Hann/Hamming/Blackman windows and MelWeightMatrix.

ONNX represents complex values as a trailing dimension of 2 (real, imaginary); a trailing
dimension of 1 is a real signal. Transforms run in float64 through torch.fft (so that outputs
near zero are as exact as the reference's) and are cast back to the input dtype.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from kiln.errors import UnsupportedDTypeError, UnsupportedOpError
from kiln.ir.dtype import DType
from kiln.ir.graph import Node
from kiln.ir.types import TensorType
from kiln.ops.creation import cast_tensor, onnx_dtype
from kiln.ops.registry import OpDef, ints, register

Tensor = torch.Tensor


def _to_complex(node: Node, x: Tensor) -> Tensor:
    """[..., 1] real or [..., 2] (real, imag) tensor -> complex tensor without the last dim."""
    if not x.is_floating_point():
        raise UnsupportedDTypeError(f"node '{node.name}': {node.op_type} needs a float input, got {x.dtype}")
    work = x.to(torch.float64)
    if x.shape[-1] == 1:
        return torch.complex(work[..., 0], torch.zeros_like(work[..., 0]))
    if x.shape[-1] == 2:
        return torch.complex(work[..., 0], work[..., 1])
    raise UnsupportedOpError(f"node '{node.name}': last dim must be 1 (real) or 2 (complex), got {x.shape[-1]}")


def _from_complex(y: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.view_as_real(y.contiguous()).to(dtype)


@register
class DFT(OpDef):
    op_type = "DFT"
    opsets = (17, 28)
    value_inputs = (1, 2)

    def compute(self, node: Node, x: Tensor, dft_length: Tensor | None = None,
                axis_in: Tensor | None = None) -> Tensor:
        rank = x.dim()
        if node.opset >= 20:
            axis = ints(axis_in)[0] if axis_in is not None else -2
        else:
            axis = int(node.attr("axis", 1))
        if not -rank <= axis < rank - 1 or axis == -1:
            raise UnsupportedOpError(f"node '{node.name}': DFT axis {axis} is invalid for rank {rank}")
        axis %= rank
        inverse, onesided = bool(node.attr("inverse", 0)), bool(node.attr("onesided", 0))
        if dft_length is not None:
            n = ints(dft_length)[0]
        else:
            n = 2 * (x.shape[axis] - 1) if inverse and onesided else x.shape[axis]
        sig = _to_complex(node, x)
        if inverse and onesided:
            return torch.fft.irfft(sig, n=n, dim=axis).unsqueeze(-1).to(x.dtype)
        y = torch.fft.ifft(sig, n=n, dim=axis) if inverse else torch.fft.fft(sig, n=n, dim=axis)
        if onesided:
            y = y.narrow(axis, 0, n // 2 + 1)
        return _from_complex(y, x.dtype)


@register
class STFT(OpDef):
    op_type = "STFT"
    opsets = (17, 28)
    value_inputs = (1, 3)

    def compute(self, node: Node, signal: Tensor, frame_step: Tensor, window: Tensor | None = None,
                frame_length: Tensor | None = None) -> Tensor:
        if signal.dim() == 2:  # [batch, length]: a real signal, as onnxruntime reads it (exporters write it so)
            signal = signal.unsqueeze(-1)
        if signal.dim() != 3:
            raise UnsupportedOpError(f"node '{node.name}': STFT needs a [batch, length] or [batch, length, 1|2] "
                                     "signal")
        step = ints(frame_step)[0]
        if frame_length is not None:
            flen = ints(frame_length)[0]
        else:
            flen = window.shape[0] if window is not None else signal.shape[1]
        if window is not None and window.shape[0] != flen:
            raise UnsupportedOpError(f"node '{node.name}': window length {window.shape[0]} != frame_length {flen}")
        if step <= 0 or not 0 < flen <= signal.shape[1]:
            raise UnsupportedOpError(f"node '{node.name}': invalid frame_step {step} or frame_length {flen}")
        sig = _to_complex(node, signal)
        frames = sig.unfold(1, flen, step)  # [batch, n_frames, flen]
        if window is not None:
            frames = frames * window.to(frames.real.dtype)
        y = torch.fft.fft(frames, n=flen, dim=-1)
        if int(node.attr("onesided", 1)):
            y = y[..., : flen // 2 + 1]
        return _from_complex(y, signal.dtype)


def _window_positions(node: Node, size_in: Tensor) -> tuple[Tensor, int, torch.dtype]:
    size = ints(size_in)[0]
    if size < 0:
        raise UnsupportedOpError(f"node '{node.name}': window size {size} is negative")
    dtype = onnx_dtype(node.attr("output_datatype", 1), node, "output_datatype")
    denom = size if int(node.attr("periodic", 1)) else size - 1
    n = torch.arange(size, dtype=torch.float64, device=size_in.device)
    return n, denom, dtype


_WINDOWS = {
    "HannWindow": lambda t: 0.5 - 0.5 * torch.cos(t),
    "HammingWindow": lambda t: 25.0 / 46.0 - (21.0 / 46.0) * torch.cos(t),
    "BlackmanWindow": lambda t: 0.42 - 0.5 * torch.cos(t) + 0.08 * torch.cos(2 * t),
}


@register
class Window(OpDef):
    op_type = ("HannWindow", "HammingWindow", "BlackmanWindow")
    opsets = (17, 28)
    value_inputs = (0,)

    def infer(self, node: Node, types: Sequence[TensorType | None],
              consts: Sequence[Tensor | None]) -> list[TensorType]:
        if consts[0] is not None:
            return super().infer(node, types, consts)
        return [TensorType(DType.from_torch(onnx_dtype(node.attr("output_datatype", 1), node, "output_datatype")),
                           (None,))]

    def compute(self, node: Node, size: Tensor) -> Tensor:
        n, denom, dtype = _window_positions(node, size)
        t = n * (2 * math.pi / denom) if denom else torch.zeros_like(n)
        w = _WINDOWS[node.op_type](t)
        return cast_tensor(w, dtype)


@register
class MelWeightMatrix(OpDef):
    op_type = "MelWeightMatrix"
    opsets = (17, 28)
    value_inputs = (0, 1, 2, 3, 4)

    def compute(self, node: Node, num_mel_bins: Tensor, dft_length: Tensor, sample_rate: Tensor,
                lower_hz: Tensor, upper_hz: Tensor) -> Tensor:
        dev = num_mel_bins.device
        mels, n_fft, rate = ints(num_mel_bins)[0], ints(dft_length)[0], ints(sample_rate)[0]
        if mels <= 0 or n_fft <= 0 or rate <= 0:
            raise UnsupportedOpError(f"node '{node.name}': MelWeightMatrix needs positive bins, length and rate")
        dtype = onnx_dtype(node.attr("output_datatype", 1), node, "output_datatype")
        hz_dtype = lower_hz.dtype if lower_hz.is_floating_point() else torch.float32

        def to_mel(hz: Tensor) -> Tensor:
            h = hz.to(hz_dtype).reshape(())
            return (2595 * torch.log1p(h / 700)).to(torch.float64) / math.log(10)

        lo_mel, hi_mel = to_mel(lower_hz.to(dev)), to_mel(upper_hz.to(dev))
        step = (hi_mel - lo_mel) / (mels + 2)
        mel_points = torch.arange(mels + 2, dtype=torch.float64, device=dev) * step + lo_mel
        hz = 700 * torch.expm1(mel_points / 2595 * math.log(10))
        bins = torch.floor((n_fft + 1) * hz / rate).to(torch.int64)
        left, center, right = bins[:-2], bins[1:-1], bins[2:]
        j = torch.arange(n_fft // 2 + 1, device=dev).unsqueeze(1)
        rise = (j - left).double() / (center - left).clamp(min=1).double()
        fall = (right - j).double() / (right - center).clamp(min=1).double()
        out = torch.zeros(j.shape[0], mels, dtype=torch.float64, device=dev)
        out = torch.where((j >= left) & (j <= center) & (center > left), rise, out)
        out = torch.where((j >= center) & (j < right), fall, out)
        out = torch.where((j == center) & (center == left), torch.ones_like(out), out)
        return cast_tensor(out, dtype)
