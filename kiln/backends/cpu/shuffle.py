"""ChannelShuffle of float32 tensors on the CPU in C (``native/channel_shuffle.c``): one copy into a channels-last
destination.

The reference (reshape, transpose, reshape) copies into a contiguous NCHW tensor that the next convolution
reorders back to NHWC; torch's strided copy into a channels-last destination (kiln.ops.shuffle.shuffle_into)
is one copy but iterates an inner dim of g elements (77 us for [1, 116, 28, 28], g = 2). Here each pixel's
channel vector is one vectorized interleave (about 10-20 us there, 0.3-0.9 ms for a batch of 32 vs 2.4 ms).
The kernel writes into ``out=`` (the arena's channels-last slot, or any strided view); inputs it was not
made for (another device or element size) take ``shuffle_into``. Declines everything where no C compiler works.
"""
from __future__ import annotations

import ctypes as C
from typing import Any

import torch

from kiln.backends.cpu import native
from kiln.backends.cpu.common import CpuTactic, is_f32
from kiln.backends.tactic import Built, Kernel, register_tactic
from kiln.errors import KilnError
from kiln.ir.graph import Node
from kiln.ops.attrs import read
from kiln.ops.registry import lookup
from kiln.ops.shuffle import shuffle_into

Tensor = torch.Tensor
_P, _L = C.c_void_p, C.c_long
PARALLEL_MIN = 1 << 18
"""Tensors with fewer elements are shuffled on one thread (the OpenMP fork costs more than the second
thread saves below about this size); larger ones on torch's intra-op thread count."""


def _library() -> Any:
    lib = native.load("channel_shuffle")
    if lib is not None and not hasattr(lib, "_kiln_typed"):
        lib.kiln_channel_shuffle_32.argtypes = [_P, _L, _L, _L, _L, _L, _L, _L, _L, _L, _P, _L, _L, _L, _L, C.c_int]
        lib.kiln_channel_shuffle_32.restype = None
        lib.kiln_channel_interleave2_32.argtypes = [_P, _L, _L, _L, _L, _P, _L, _L, _L, _L, _L, _L, _L, _L, _P, _L, _L,
                                                    _L, _L, C.c_int]
        lib.kiln_channel_interleave2_32.restype = None
        lib._kiln_typed = True
    return lib


class CpuChannelShuffleTactic(CpuTactic):
    """ChannelShuffle on float32: one C pass writing the destination's layout (channels-last by default)."""

    id = "cpu.channel_shuffle"
    priority = 10
    writes_out = 1
    ops = (("kiln", "ChannelShuffle"),)

    def accepts(self, node: Node) -> bool:
        return (len(node.inputs) in (1, 2) and all(v is not None and is_f32(v) and v.type.rank == 4
                                                     for v in node.inputs)
                and len(node.outputs) == 1 and is_f32(node.outputs[0]) and _library() is not None)

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        lib = _library()
        if lib is None:
            raise KilnError(f"cpu.channel_shuffle: no C compiler builds its kernel here "
                            f"({native.error('channel_shuffle')})")
        groups = int(read(node, "groups"))
        if len(node.inputs) == 2:
            return _interleave_kernel(node, lib.kiln_channel_interleave2_32)
        shuffle = lib.kiln_channel_shuffle_32

        def k_channel_shuffle(x: Tensor, out: Tensor | None = None) -> Tensor:
            if x.dim() != 4 or x.shape[1] % groups:
                raise KilnError(f"node '{node.name}': ChannelShuffle of a {list(x.shape)} tensor in {groups} groups")
            if out is None:
                out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
            elif out.shape != x.shape:
                raise KilnError(f"node '{node.name}': ChannelShuffle of a {list(x.shape)} tensor into a "
                                f"{list(out.shape)} destination")
            if x.device.type != "cpu" or x.element_size() != 4 or out.dtype != x.dtype or x.numel() == 0:
                return shuffle_into(x, groups, out)
            n, c, h, w = x.shape
            threads = torch.get_num_threads() if x.numel() >= PARALLEL_MIN else 1
            shuffle(x.data_ptr(), n, c, h, w, *x.stride(), groups, out.data_ptr(), *out.stride(), threads)
            return out

        def bind(args: Any, out: Any) -> Any:
            x = args[0]
            if not isinstance(x, Tensor) or not isinstance(out, Tensor) or x.dim() != 4 or x.shape[1] % groups \
                    or out.shape != x.shape or x.device.type != "cpu" or x.element_size() != 4 \
                    or out.dtype != x.dtype or x.numel() == 0:
                return None  # the call raised or ran the reference
            n, c, h, w = x.shape
            fixed = (x.data_ptr(), n, c, h, w, *x.stride(), groups, out.data_ptr(), *out.stride())
            big = x.numel() >= PARALLEL_MIN

            def bound() -> Tensor:
                shuffle(*fixed, torch.get_num_threads() if big else 1)
                return out
            bound.kept = x  # type: ignore[attr-defined]  # the source the pointer points into stays alive
            return bound
        return Kernel(k_channel_shuffle, out_format="channels_last", bind=bind)


def _interleave_kernel(node: Node, interleave: Any) -> Kernel:
    """ChannelShuffle(a, b) (groups 2): y[:, 2i] = a[:, i], y[:, 2i + 1] = b[:, i] in one C pass."""
    reference = lookup("ChannelShuffle", "kiln").compute

    def args_for(a: Tensor, b: Tensor, out: Tensor) -> tuple[Any, ...] | None:
        """The C call's arguments, or None where the reference must run (other shapes, devices, types)."""
        if a.dim() != 4 or a.shape != b.shape or out.dim() != 4 or tuple(out.shape) != (
                a.shape[0], 2 * a.shape[1], a.shape[2], a.shape[3]) or any(
                t.device.type != "cpu" or t.dtype != torch.float32 for t in (a, b, out)) or a.numel() == 0:
            return None
        n, cg, h, w = a.shape
        return (a.data_ptr(), *a.stride(), b.data_ptr(), *b.stride(), n, cg, h, w, out.data_ptr(), *out.stride())

    def k_interleave(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
        if out is None and a.dim() == 4:
            out = torch.empty((a.shape[0], 2 * a.shape[1], *a.shape[2:]), dtype=a.dtype,
                              memory_format=torch.channels_last)
        fixed = None if out is None else args_for(a, b, out)
        if fixed is None:
            y = reference(node, a, b)
            return y if out is None else out.copy_(y)
        interleave(*fixed, torch.get_num_threads() if 2 * a.numel() >= PARALLEL_MIN else 1)
        return out

    def bind(args: Any, out: Any) -> Any:
        if len(args) != 2 or not all(isinstance(t, Tensor) for t in (*args, out)):
            return None
        fixed = args_for(args[0], args[1], out)
        if fixed is None:
            return None
        big = 2 * args[0].numel() >= PARALLEL_MIN

        def bound() -> Tensor:
            interleave(*fixed, torch.get_num_threads() if big else 1)
            return out
        bound.kept = tuple(args)  # type: ignore[attr-defined]  # the sources the pointers point into stay alive
        return bound
    return Kernel(k_interleave, out_format="channels_last", bind=bind)


register_tactic(CpuChannelShuffleTactic())
