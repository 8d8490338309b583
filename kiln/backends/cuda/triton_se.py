"""Triton SEGate: a squeeze-and-excite gate (mean over H, W, two small matrix-vector products with their
activations) in one or two launches instead of three to five (kiln.ops.squeeze_excite).

The gate kernel runs one program per image (or per image x block of output channels, each recomputing
the hidden vector): it sums the pixels of a block of channels at a time (a tile of pixels x channels,
float32, addressed by X's four strides, so NHWC, NCHW and channel slices are read in place), scales the
block to its mean and adds W1[:, block] @ mean into the float32 hidden vector; then applies B1 and the
reduce activation, and for each block of output channels stores act2(W2[block, :] @ h + B2), rounded once
to the output's type, through the output's N and C strides (any ``out=``).

One image's pixels in one program is slow for large maps (EfficientNet's first SE block pools a 112x112x32
map), so the "split" configurations first run kiln.backends.cuda.triton_reduce's partial-sum kernel over
(image x channel block, pixel chunk) programs into a float32 workspace of N x split x C, and the gate
kernel then sums those `split` rows per channel, in order (deterministic, no atomics). The "two_phase"
configurations spread the products as well: one program per (image x channel block, pixel chunk) sums its
pixels and multiplies its channels' slice of W1 by their partial mean, storing a partial hidden vector
(float32, N x rows x R); then one program per (image, block of output channels) adds the rows in order,
applies B1 and the reduce activation, and computes its gate block. Each program's loops are a few tiles
long, where the one-program gate walks all of C serially (latency-bound: ~10 us for EfficientNet's
1152-channel gate at batch 1, against ~3 us in two phases). The autotuner times all of them. Weights and
biases are prepacked on the device in their own type and converted to float32 on
load. Nothing is synced; the workspace is the only allocation besides the output: CUDA-graph capturable.
Hidden sizes above MAX_R (no SE block has them) are declined; past 2**31 pixels the reference runs.
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from kiln.backends.cuda.common import ACT_CODES, FLOAT_DTYPES, check_out
from kiln.backends.cuda.triton_act import apply_act
from kiln.backends.cuda.triton_launch import launch
from kiln.backends.cuda.triton_pool import _p2, _strides
from kiln.backends.cuda.triton_reduce import TARGET_PROGRAMS, _spatial_sum_kernel, _tile, pixel_chunks, pixel_sum
from kiln.backends.tactic import Built, Kernel, Tactic, TacticContext, register_tactic
from kiln.ir.graph import Node
from kiln.ops.attrs import read
from kiln.ops.registry import lookup

Tensor = torch.Tensor
_I32 = 2**31 - 1

MAX_R = 1024
"""Largest hidden size (conv_reduce's output channels): the hidden vector lives in one program's registers."""
TILE = 4096
"""Elements of a W1 tile (hidden x channel block) and of a pixel tile (pixels x channel block)."""
BLOCK_O = 64
"""Most output channels per step of the second product (fewer where R is large: the W2 tile is BLOCK_O x R)."""


@triton.jit
def _hidden_act(hidden, b1_ptr, rs, r_mask, act1, alpha1, beta1):
    """act1(h + B1) over the R hidden units (zero past R)."""
    hidden += tl.load(b1_ptr + rs, mask=r_mask, other=0.0).to(tl.float32)
    return tl.where(r_mask, apply_act(hidden, act1, alpha1, beta1), 0.0)


@triton.jit
def _store_gate(hidden, rs, r_mask, offs_o, o_mask, w2_ptr, b2_ptr, y_ptr, n, R, syn, syc, act2, alpha2, beta2):
    """G[n, offs_o] = act2(W2[offs_o] @ h + B2[offs_o]), rounded once to the output's type."""
    w2 = tl.load(w2_ptr + offs_o[:, None] * R + rs[None, :], mask=o_mask[:, None] & r_mask[None, :], other=0.0)
    g = tl.sum(w2.to(tl.float32) * hidden[None, :], axis=1)
    g += tl.load(b2_ptr + offs_o, mask=o_mask, other=0.0).to(tl.float32)
    g = apply_act(g, act2, alpha2, beta2)
    tl.store(y_ptr + n * syn + offs_o.to(tl.int64) * syc, g.to(y_ptr.dtype.element_ty), mask=o_mask)


@triton.jit(do_not_specialize=["Q", "W", "OCHUNK"])
def _se_gate_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, y_ptr,
    C, Q, W, R, O, P, OCHUNK,
    sxn, sxc, sxh, sxw, syn, syc,
    act1, alpha1, beta1, act2, alpha2, beta2,
    FLAT: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    """Program (image, output chunk): the mean of X[n] over its Q rows (pixels, or a workspace's partial
    sums) divided by P, h = act1(W1 @ mean + B1), and act2(W2 @ h + B2) for output channels
    [chunk * OCHUNK, + OCHUNK)."""
    n = tl.program_id(0).to(tl.int64)
    o_lo = tl.program_id(1) * OCHUNK
    rs = tl.arange(0, BLOCK_R)
    r_mask = rs < R
    x_base = x_ptr + n * sxn
    hidden = tl.zeros((BLOCK_R,), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_mask = cs < C
        mean = pixel_sum(x_base + cs.to(tl.int64)[None, :] * sxc, 0, Q, W, sxh, sxw, c_mask, FLAT, BLOCK_Q,
                         BLOCK_C) / P
        w1 = tl.load(w1_ptr + rs[:, None] * C + cs[None, :], mask=r_mask[:, None] & c_mask[None, :], other=0.0)
        hidden += tl.sum(w1.to(tl.float32) * mean[None, :], axis=1)
    hidden = _hidden_act(hidden, b1_ptr, rs, r_mask, act1, alpha1, beta1)
    o_hi = tl.minimum(O, o_lo + OCHUNK)
    for o0 in range(o_lo, o_hi, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        _store_gate(hidden, rs, r_mask, offs_o, offs_o < o_hi, w2_ptr, b2_ptr, y_ptr, n, R, syn, syc,
                    act2, alpha2, beta2)


@triton.jit(do_not_specialize=["P", "W", "PCHUNK", "SPLIT"])
def _se_hidden_kernel(
    x_ptr, w1_ptr, ws_ptr, C, P, W, R, CB, PCHUNK, SPLIT, inv_p,
    sxn, sxc, sxh, sxw,
    FLAT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Program (image x channel block, pixel chunk): the partial mean of its channels over pixels
    [chunk * PCHUNK, + PCHUNK) times W1[:, block], a float32 partial hidden vector in workspace row
    (image * CB + block) * SPLIT + chunk."""
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    nb = (pid // CB).to(tl.int64)
    cb = pid % CB
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cs < C
    x_base = x_ptr + nb * sxn + cs.to(tl.int64)[None, :] * sxc
    part = pixel_sum(x_base, chunk * PCHUNK, tl.minimum(P, chunk * PCHUNK + PCHUNK), W, sxh, sxw, c_mask,
                     FLAT, BLOCK_P, BLOCK_C) * inv_p
    row = ws_ptr + ((nb * CB + cb) * SPLIT + chunk) * R
    for r0 in range(0, R, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        r_mask = rs < R
        w1 = tl.load(w1_ptr + rs[:, None] * C + cs[None, :], mask=r_mask[:, None] & c_mask[None, :], other=0.0)
        tl.store(row + rs, tl.sum(w1.to(tl.float32) * part[None, :], axis=1), mask=r_mask)


@triton.jit(do_not_specialize=["ROWS"])
def _se_excite_kernel(
    ws_ptr, b1_ptr, w2_ptr, b2_ptr, y_ptr, R, O, ROWS, syn, syc,
    act1, alpha1, beta1, act2, alpha2, beta2,
    BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """Program (image, output block): h = act1(sum of the image's ROWS partial hidden vectors, in order,
    + B1), then act2(W2[block] @ h + B2)."""
    n = tl.program_id(0).to(tl.int64)
    rs = tl.arange(0, BLOCK_R)
    r_mask = rs < R
    base = ws_ptr + n * ROWS * R
    acc = tl.zeros((BLOCK_J, BLOCK_R), tl.float32)
    for j0 in range(0, ROWS, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        acc += tl.load(base + js.to(tl.int64)[:, None] * R + rs[None, :],
                       mask=(js < ROWS)[:, None] & r_mask[None, :], other=0.0)
    hidden = _hidden_act(tl.sum(acc, axis=0), b1_ptr, rs, r_mask, act1, alpha1, beta1)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    _store_gate(hidden, rs, r_mask, offs_o, offs_o < O, w2_ptr, b2_ptr, y_ptr, n, R, syn, syc, act2, alpha2, beta2)


# ---- host side ----------------------------------------------------------------------------------

def _spec(node: Node) -> tuple[int, int, int] | None:
    """(C, R, O) of an SEGate this tactic runs: rank-4 float X of the output's and the weights' type,
    constant weights and biases, R <= MAX_R."""
    if node.domain != "kiln" or node.op_type != "SEGate" or len(node.inputs) != 5 or len(node.outputs) != 1:
        return None
    x = node.inputs[0]
    if x is None or x.type.rank != 4 or x.type.dtype not in FLOAT_DTYPES or node.outputs[0].type.dtype != x.type.dtype:
        return None
    ws = [v.const if v is not None else None for v in node.inputs[1:]]
    if any(w is None or w.dtype != x.type.dtype.torch for w in ws):
        return None
    w1, b1, w2, b2 = ws  # type: ignore[misc]
    if w1.dim() != 2 or w2.dim() != 2 or b1.shape != (w1.shape[0],) or w2.shape[1] != w1.shape[0] \
            or b2.shape != (w2.shape[0],):
        return None
    c, r, o = int(w1.shape[1]), int(w1.shape[0]), int(w2.shape[0])
    if not (0 < r <= MAX_R and c > 0 and o > 0):
        return None
    return c, r, o


def _pooled(node: Node) -> bool:
    """X is statically [N, C, 1, 1]: there are no pixels to split."""
    s = node.inputs[0].type.shape  # type: ignore[union-attr]
    return s is not None and s[2] == 1 and s[3] == 1


def _blocks(c: int, r: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, BLOCK_O): all of R, and channel blocks keeping the W1 and W2 tiles at TILE elements."""
    br = _p2(r)
    return br, max(1, min(_p2(c), 128, TILE // br)), max(1, min(BLOCK_O, TILE // br))


class TritonSEGate(Tactic):
    """SEGate: one gate kernel per image (optionally per output-channel chunk), after a split pixel sum or not;
    or partial hidden vectors over (image x channel block, pixel chunk), then the gate per output block."""

    id = "cuda.triton_se_gate"
    devices = ("cuda",)
    priority = 20
    writes_out = 1

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        return _spec(node) is not None

    def configs(self, node: Node, ctx: TacticContext) -> list[dict[str, Any]]:
        """split 1: the partial-sum kernel first (where pixels are worth splitting); ochunk: output channels
        per gate program (0: all of them); two_phase T: the partial-hidden and excite kernels, pixel tiles of
        T elements."""
        spec = _spec(node)
        assert spec is not None, f"{self.id} does not support node {node.name}"
        out = [{"split": 0, "ochunk": 0, "num_warps": 4}]
        out += [{"split": 0, "ochunk": 0, "two_phase": tile, "num_warps": 4} for tile in (1024, 4096)]
        if spec[2] > 2 * BLOCK_O:
            out.append({"split": 0, "ochunk": 2 * BLOCK_O, "num_warps": 4})
        if not _pooled(node):
            out.append({"split": 1, "ochunk": 0, "num_warps": 4})
            if spec[2] > 2 * BLOCK_O:
                out.append({"split": 1, "ochunk": 2 * BLOCK_O, "num_warps": 4})
        return out

    def workspace_bytes(self, node: Node, config: dict[str, Any], out_shape: tuple[int, ...] | None = None) -> int:
        """Float32 scratch: the split configurations' partial sums (at most N x 64 x C, triton_reduce.MAX_SPLIT),
        the two-phase ones' partial hidden vectors."""
        spec = _spec(node)
        if spec is None or not out_shape:
            return 0
        if config.get("two_phase"):  # rows per image: channel blocks x chunks <= C + TARGET_PROGRAMS (split_of)
            return 4 * int(out_shape[0]) * (spec[0] + TARGET_PROGRAMS) * spec[1]
        return 4 * int(out_shape[0]) * 64 * spec[0] if config.get("split") else 0

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        spec = _spec(node)
        assert spec is not None, f"{self.id} does not support node {node.name}"
        c_w, r, o = spec
        w1, b1, w2, b2 = (v.const.contiguous().to(device) for v in node.inputs[1:])  # type: ignore[union-attr]
        acts = (ACT_CODES[str(read(node, "reduce_activation"))], float(read(node, "reduce_alpha")),
                float(read(node, "reduce_beta")), ACT_CODES[str(read(node, "gate_activation"))],
                float(read(node, "gate_alpha")), float(read(node, "gate_beta")))
        split_ok, ochunk, warps = bool(config.get("split")), int(config.get("ochunk", 0)), int(config["num_warps"])
        two_phase = int(config.get("two_phase", 0))
        br, bc, bo = _blocks(c_w, r)
        reference = lookup(node.op_type, node.domain).compute

        def k_se_gate(x: Tensor, *_: Any, out: Tensor | None = None) -> Tensor:
            n, c, h, w = (int(d) for d in x.shape)
            if out is not None:
                check_out(out, (n, o, 1, 1), node)
            p = h * w
            if c != c_w or p + TILE > _I32:  # the reference's checks and messages; int32 pixel indices
                ref = reference(node, x, w1, b1, w2, b2)
                return ref if out is None else out.copy_(ref)
            y = out if out is not None else torch.empty((n, o, 1, 1), dtype=x.dtype, device=x.device)
            if not n:
                return y
            flat = h == 1 or x.stride(2) == w * x.stride(3)
            if two_phase and p:  # (no pixels: the one-program gate's mean of nothing)
                bp, bcs = _tile(x, two_phase)
                split, chunk = pixel_chunks(n, c, p, bp, bcs)
                cb = triton.cdiv(c, bcs)
                ws = torch.empty((n, cb * split, r), dtype=torch.float32, device=x.device)
                launch(_se_hidden_kernel, (n * cb, split),
                       [x, w1, ws, c, p, w, r, cb, chunk, split, 1.0 / p, *_strides(x)],
                       dict(FLAT=flat, BLOCK_P=bp, BLOCK_C=bcs, BLOCK_R=max(1, min(br, TILE // bcs)), num_warps=warps))
                launch(_se_excite_kernel, (n, triton.cdiv(o, bo)),
                       [ws, b1, w2, b2, y, r, o, cb * split, y.stride(0), y.stride(1), *acts],
                       dict(BLOCK_J=max(1, min(_p2(cb * split), TILE // br)), BLOCK_R=br, BLOCK_O=bo, num_warps=warps))
                return y
            oc = ochunk if ochunk else o
            grid = (n, triton.cdiv(o, oc))
            src, q, strides = x, p, _strides(x)
            if split_ok and p > 1:
                bp, bcs = _tile(x, 2048)
                split, chunk = pixel_chunks(n, c, p, bp, bcs)
                ws = torch.empty((n, split, c), dtype=torch.float32, device=x.device)
                cb = triton.cdiv(c, bcs)
                launch(_spatial_sum_kernel, (n * cb, split),
                       [x, ws, c, p, w, cb, chunk, *strides, split * c, c, 1],
                       dict(FINAL=False, FLAT=flat, BLOCK_P=bp, BLOCK_C=bcs, num_warps=4))
                src, q, flat, strides = ws, split, True, [split * c, 1, 0, c]
            bq = max(1, min(TILE // bc, _p2(q)))
            launch(_se_gate_kernel, grid,
                   [src, w1, b1, w2, b2, y, c, q, w, r, o, float(p), oc, *strides, y.stride(0), y.stride(1), *acts],
                   dict(FLAT=flat, BLOCK_Q=bq, BLOCK_C=bc, BLOCK_R=br, BLOCK_O=bo, num_warps=warps))
            return y
        return Kernel(k_se_gate, prepacked=frozenset({1, 2, 3, 4}))


register_tactic(TritonSEGate())
