"""3x3 stride-1 convolutions by Winograd's minimal filtering F(4x4, 3x3) or F(2x2, 3x3) on the CPU.

Per 4x4 output tile the convolution takes 36 multiplies per input/output channel pair instead of 144
(F(2x2, 3x3): 16 instead of 36 per 2x2 tile, with exact +-1 transforms and 16/9 rather than 4x the
weights; the autotuner times both as configs ``{"tile": 4}`` and ``{"tile": 2}``):
the input transform (C, ``native/winograd.c``) turns each 6x6 input tile into 36 values per channel, one
batched GEMM per layer (a oneDNN matmul over the 36 positions, weights transformed and reordered once
at build) multiplies them with the transformed weights, and the output transform (C) folds the 36
products back into the 4x4 tile, adding bias and residual and applying the activation as it stores.
Both transforms address tensors by strides with channels contiguous, so the layer reads channel-slice
views without a copy and writes into a channel slice of a Concat's output (``strided_out``): on the
CPU it is the tactic through which a Concat fed by 3x3 convolutions is elided.

Arithmetic error grows with the transform: F(4x4) at the points 0, 1, -1, 1/2, -2 (about 2.5x more
accurate in float32 than the usual 0, +-1, +-2) is within about 2e-6 of the output's scale on random
layers, F(2x2) within a few 1e-7; tested against the reference. Layers whose transformed weights (4x a direct convolution's) exceed
``MAX_WEIGHT_BYTES`` decline: a network's large layers stream their weights from memory on every
inference, which the autotuner's isolated timing (weights warm in cache) does not show. With 16 MiB,
ResNet-50's 512-channel layers (38 MiB) decline and YOLOv4-tiny's 384->256 neck conv (14 MiB, 2.3x faster
than direct in the network) is taken. Declines everything without the oneDNN library or a C compiler.
"""
from __future__ import annotations

import ctypes as C
import threading
import weakref
from typing import Any

import torch

from kiln.backends.cpu.common import CpuTactic, act_attrs, float_conv_weight
from kiln.backends.cpu.conv import conv_geometry
from kiln.backends.cpu.dnnl import FLOAT32, library, released, require_library
from kiln.backends.cpu.dnnl_float import MatMul
from kiln.backends.cpu.dnnl_primitive import ChannelsLast
from kiln.backends.cpu.fallback import ReferenceFallback
from kiln.backends.cpu import native
from kiln.backends.tactic import Built, Kernel, register_tactic
from kiln.errors import KilnError, PlanFormatError
from kiln.ir.graph import Node

Tensor = torch.Tensor
MAX_WEIGHT_BYTES = 16 << 20
_ACTS = {"": 0, "Relu": 1, "LeakyRelu": 2, "Clip": 3, "Sigmoid": 4, "SiLU": 5, "HardSwish": 6}
# G of F(4x4, 3x3) at the points 0, 1, -1, 1/2, -2, infinity (B^T and A^T live in native/winograd.c)
_G = {4: torch.tensor([[1, 0, 0], [1 / 3, 1 / 3, 1 / 3], [-1 / 3, 1 / 3, -1 / 3], [-16 / 15, -8 / 15, -4 / 15],
                       [1 / 15, -2 / 15, 4 / 15], [0, 0, 1]], dtype=torch.float64),
      2: torch.tensor([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]], dtype=torch.float64)}
_P, _I, _L, _F = C.c_void_p, C.c_int, C.c_long, C.c_float


def _kernels() -> Any:
    lib = native.load("winograd")
    if lib is not None and not hasattr(lib, "_kiln_typed"):
        for prefix in ("wino", "wino2"):
            getattr(lib, f"{prefix}_input").argtypes = [_P, _P] + [_I] * 4 + [_L] * 3 + [_I] * 4
            getattr(lib, f"{prefix}_output").argtypes = [_P, _P, _P, _P] + [_I] * 4 + [_L] * 6 + [_I] * 2 + [_I, _F, _F, _I]
        lib._kiln_typed = True
    return lib


MAX_WEIGHT = 1e15
"""Largest weight magnitude Winograd takes: its transforms add and scale weights and activations before
the product, so float32 keeps fewer significant bits of huge or non-finite weights than a direct
convolution does; such layers run as direct convolutions."""

_LOCAL = threading.local()
MAX_VIEWS = 64


def _scratch(pos: int, tiles: int, c_in: int, k_out: int) -> tuple[Tensor, Tensor]:
    """V [pos, tiles, c_in] and M [pos, tiles, k_out] in one buffer per thread, shared by every Winograd layer
    (layers of a network run one after another on a thread), grown to the largest layer's need; the views
    are made once per size and buffer, an inference only looks them up. Bounded whatever engines come and
    go: one buffer per thread (freed with the thread, or with the last Winograd kernel: `_Users`), at most
    MAX_VIEWS views of it."""
    local = _LOCAL
    key = (pos, tiles, c_in, k_out)
    views = getattr(local, "views", None)
    hit = views.get(key) if views is not None else None
    if hit is not None:
        return hit
    nv, nm = pos * tiles * c_in, pos * tiles * k_out
    buf = getattr(local, "buf", None)
    if buf is None or buf.numel() < nv + nm:
        buf, views = torch.empty(nv + nm), {}  # views of the old buffer would keep it alive
        local.buf, local.views = buf, views
    elif len(views) >= MAX_VIEWS:  # type: ignore[arg-type]
        views = local.views = {}
    hit = views[key] = (buf[:nv].view(pos, tiles, c_in), buf[nv:nv + nm].view(pos, tiles, k_out))  # type: ignore[index]
    return hit


class _Users:
    """Counts the live Winograd kernels; when the last one is released or collected, every thread's scratch
    buffer goes with it (a call still running keeps its own views of the old buffer alive)."""

    lock = threading.Lock()
    live = 0

    def __init__(self) -> None:
        with _Users.lock:
            _Users.live += 1
        self.done = False

    def close(self) -> None:
        global _LOCAL
        with _Users.lock:
            if self.done:
                return
            self.done = True
            _Users.live -= 1
            if _Users.live == 0:
                _LOCAL = threading.local()


def transform_weights(w: Tensor, tile: int = 4) -> Tensor:
    """[K, C, 3, 3] -> U [(tile+2)^2, C, K] with U[(tile+2)i+j] = (G g G^T)[i, j] (computed in float64)."""
    g = _G[tile]
    u = torch.einsum("ia,kcab,jb->ijck", g, w.double(), g)
    return u.reshape((tile + 2) ** 2, w.shape[1], w.shape[0]).float().contiguous()


def _tiles(node: Node) -> list[int]:
    """The tile sizes whose transformed weights stay within MAX_WEIGHT_BYTES."""
    k, c = node.inputs[1].const.shape[:2]  # type: ignore[union-attr]
    return [t for t in (4, 2) if (t + 2) ** 2 * int(k) * int(c) * 4 <= MAX_WEIGHT_BYTES]


class WinogradConvTactic(CpuTactic):
    """Conv / FusedConv, 3x3, stride 1, no dilation or groups, float32, as Winograd F(4x4, 3x3)."""

    id = "cpu.conv_winograd"
    priority = 13  # above the direct oneDNN convolution: faster wherever it is accepted (measured in the network)
    writes_out = 1
    ops = (("", "Conv"), ("ai.onnx", "Conv"), ("kiln", "FusedConv"))

    def accepts(self, node: Node) -> bool:
        wt = float_conv_weight(node, tuple(_ACTS))
        if library() is None or wt is None or tuple(wt.shape[2:]) != (3, 3) or not _tiles(node):
            return False
        if not bool(wt.abs().max() <= MAX_WEIGHT):  # also False for NaN
            return False
        if int(node.attr("group", 1)) != 1 or any(int(s) != 1 for s in node.attr("strides", None) or [1, 1]):
            return False
        if any(int(d) != 1 for d in node.attr("dilations", None) or [1, 1]):
            return False
        return _kernels() is not None  # the geometry (SAME pads too) is resolved per input shape

    def configs(self, node: Node, ctx: Any) -> list[dict[str, Any]]:
        return [{"tile": t} for t in _tiles(node)]

    def workspace_bytes(self, node: Node, config: dict[str, Any], out_shape: tuple[int, ...] | None = None) -> int:
        """The transformed input and output tiles (V and M, float32) this layer needs at an output shape."""
        wt = node.inputs[1].const if node.inputs[1] is not None else None
        if out_shape is None or len(out_shape) != 4 or wt is None:
            return 0
        tile = int(config.get("tile", 4))
        n, k_out, oh, ow = out_shape
        tiles = n * -(-oh // tile) * -(-ow // tile)
        return 4 * (tile + 2) ** 2 * tiles * (int(wt.shape[1]) + k_out)

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        lib = require_library(node, self.id)
        nat = _kernels()
        if nat is None:
            raise PlanFormatError(f"layer '{node.name}' uses tactic {self.id}, which needs a C compiler to build "
                                  f"its kernels here ({native.error('winograd')}); rebuild the plan without it")
        w = node.inputs[1].const.float()  # type: ignore[union-attr]
        k_out, c_in = int(w.shape[0]), int(w.shape[1])
        tile = int(config.get("tile", 4))
        pos = (tile + 2) ** 2
        u = transform_weights(w, tile)
        w_in, w_out = (nat.wino_input, nat.wino_output) if tile == 4 else (nat.wino2_input, nat.wino2_output)
        b_v = node.input(2)
        bias = None if b_v is None else b_v.const.float().contiguous()  # type: ignore[union-attr]
        if tuple(w.shape[2:]) != (3, 3) or (bias is not None and tuple(bias.shape) != (k_out,)):
            raise KilnError(f"'{node.name}' needs 3x3 weights and a bias of {k_out} values, got weights "
                            f"{list(w.shape)} and bias {None if bias is None else list(bias.shape)}")
        fused = node.op_type == "FusedConv"
        act, alpha, beta = act_attrs(node) if fused else ("", 0.0, 0.0)
        code, act_first = _ACTS[act], int(fused and bool(int(node.attr("act_before_add", 0) or 0)))
        plans: dict[tuple[int, ...], tuple[int, int, int, int, int, int, int, MatMul]] = {}
        x_cl, z_cl = ChannelsLast(lib), ChannelsLast(lib)
        b_ptr = None if bias is None else bias.data_ptr()
        fb = ReferenceFallback(node)

        closed: list[bool] = []

        def plan(n: int, c: int, h: int, wd: int) -> tuple[int, int, int, int, int, int, int, MatMul]:
            """(pad top, pad left, out h, out w, tile rows, tile cols, tiles, GEMM) at an input size."""
            if closed:
                raise released(node.name)
            if c != c_in:  # wino_input reads c_in channels of every pixel
                raise KilnError(f"'{node.name}' has weights for {c_in} input channels, got {c}")
            geo = conv_geometry(node, [3, 3], [h, wd])
            (pt, pl), (pb, pr) = geo.begin, geo.end
            oh, ow = h + pt + pb - 2, wd + pl + pr - 2
            if n < 1 or oh < 1 or ow < 1:
                raise ValueError(f"an empty output ({oh}x{ow})")
            th, tw = -(-oh // tile), -(-ow // tile)
            tiles = n * th * tw
            v, m = _scratch(pos, tiles, c_in, k_out)
            return pt, pl, oh, ow, th, tw, tiles, MatMul(lib, v, u, m)

        def k_wino(x: Tensor, _w: Any = None, _b: Any = None, z: Tensor | None = None,
                   out: Tensor | None = None) -> Tensor:
            # the C transforms address x, out and z by raw pointers: float32, channels contiguous, the
            # channels the weights were made for, out and z of the output's shape (checked below)
            if x.stride(1) != 1:
                x = x_cl(x)
            if x.dtype is not FLOAT32:
                raise KilnError(f"'{node.name}' takes a float32 input, got {x.dtype}")
            shape = x.shape
            entry = plans.get(shape)
            n, _, h, wd = shape
            if entry is None:
                entry = fb.attempt(shape, lambda: plan(n, int(shape[1]), h, wd),
                                   f"Winograd GEMM at input shape {list(shape)}")
                if entry is None:
                    return fb(shape, (x, None, None, z), out)
                plans[shape] = entry
            pt, pl, oh, ow, th, tw, tiles, gemm = entry
            if out is None:
                out = torch.empty((n, k_out, oh, ow), memory_format=torch.channels_last)
            elif out.shape != (n, k_out, oh, ow) or out.stride(1) != 1 or out.dtype is not FLOAT32:
                raise KilnError(f"'{node.name}' takes a float32 destination of shape {[n, k_out, oh, ow]} with "
                                f"contiguous channels, got {list(out.shape)} {out.dtype} with strides "
                                f"{list(out.stride())}")
            if z is not None:
                if z.stride(1) != 1:
                    z = z_cl(z)
                if z.shape != out.shape or z.dtype is not FLOAT32:
                    raise KilnError(f"'{node.name}' adds a float32 residual of shape {list(out.shape)}, got "
                                    f"{list(z.shape)} {z.dtype}")
            v, m = _scratch(pos, tiles, c_in, k_out)
            xs, ys = x.stride(), out.stride()
            w_in(x.data_ptr(), v.data_ptr(), n, h, wd, c_in, xs[0], xs[2], xs[3], pt, pl, th, tw)
            gemm.run(v, m)
            zs = z.stride() if z is not None else (0, 0, 0, 0)
            w_out(m.data_ptr(), out.data_ptr(), b_ptr, None if z is None else z.data_ptr(), n, oh, ow,
                  k_out, ys[0], ys[2], ys[3], zs[0], zs[2], zs[3], th, tw, code, alpha, beta, act_first)
            return out

        users = _Users()
        weakref.finalize(k_wino, users.close).atexit = False  # dropped without release: still counted out

        def release() -> None:
            closed.append(True)
            entries = list(plans.values())
            plans.clear()
            for entry in entries:
                entry[-1].close()
            x_cl.close()
            z_cl.close()
            users.close()
        return Kernel(k_wino, prepacked=frozenset({1, 2}), fallback=fb, release=release)  # W, B live in the kernel


register_tactic(WinogradConvTactic())
