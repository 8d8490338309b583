"""Triton device helpers shared by the generated/fused kernels: activations and the GEMM epilogue.

Importing this module needs triton (kiln.backends.cuda only imports it when triton is importable).
Activation codes are the `code`s of kiln.ops.activations.TABLE (kiln.backends.cuda.common.ACT_CODES).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tanh_f32(x):
    """tanh through the sigmoid (tl has no portable tanh across Triton versions)."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def softplus_f32(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def mish_f32(x):
    """x * tanh(softplus(x)) as x * n / (n + 2) with n = e^x (e^x + 2) (tanh(log(1 + e^x)) written out): one
    exp and one division where the composition takes two exps, a log and a reciprocal; x past 20 is its own
    Mish in float32 (n / (n + 2) rounds to 1 there, and e^x squared would overflow further out)."""
    e = tl.exp(tl.minimum(x, 20.0))
    n = e * (e + 2.0)
    return tl.where(x > 20.0, x, x * n / (n + 2.0))


@triton.jit
def pow_f32(a, b):
    """a ** b for float32 blocks (negative bases with integral exponents keep their sign)."""
    b = b + tl.zeros_like(a)
    mag = tl.exp2(b * tl.log2(tl.abs(a)))
    odd = (tl.floor(b) == b) & (tl.floor(b * 0.5) * 2.0 != b)
    neg_bad = (a < 0.0) & (tl.floor(b) != b)
    r = tl.where((a < 0.0) & odd, -mag, mag)
    r = tl.where(neg_bad, float("nan"), r)
    return tl.where(b == 0.0, 1.0, r)


@triton.jit
def apply_act(x, act, alpha, beta):
    """Activation by code on a float32 block (see ACT_CODES). `act` may be a run-time value: the fused
    GEMM/conv kernels take it (and their other epilogue switches) at run time, so that one compiled
    kernel serves every epilogue and a cold build compiles few variants."""
    if act == 1:
        x = tl.maximum(x, 0.0)
    elif act == 2:
        x = tl.where(x >= 0.0, x, x * alpha)
    elif act == 3:
        x = tl.minimum(tl.maximum(x, alpha), beta)
    elif act == 4:
        x = tl.sigmoid(x)
    elif act == 5:
        x = tanh_f32(x)
    elif act == 6:
        x = x * tl.sigmoid(x)
    elif act == 7:
        x = x * tl.minimum(tl.maximum(x * (1.0 / 6.0) + 0.5, 0.0), 1.0)
    elif act == 8:
        x = tl.minimum(tl.maximum(alpha * x + beta, 0.0), 1.0)
    elif act == 9:
        x = mish_f32(x)
    elif act == 10:
        x = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif act == 11:
        x = 0.5 * x * (1.0 + tanh_f32(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    return x


@triton.jit
def finish(acc, bias_ptr, offs_n, n_mask, z, has_bias, act, act_before_add, alpha, beta):
    """GEMM epilogue on the float32 accumulator: + bias[n], then act / residual z (zeros when absent)
    in the fused order. All switches are run-time values."""
    if has_bias != 0:
        acc = acc + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if act_before_add != 0:
        acc = apply_act(acc, act, alpha, beta) + z
    else:
        acc = apply_act(acc + z, act, alpha, beta)
    return acc


@triton.jit
def conv_pixels(offs_m, OH, OW, SH, SW, PH, PW):
    """Output pixel indices (flattened N*OH*OW) -> (image, out row, out col, first input row, first input col)."""
    ohw = OH * OW
    nb = offs_m // ohw
    r = offs_m - nb * ohw
    oh = r // OW
    ow = r - oh * OW
    return nb, oh, ow, oh * SH - PH, ow * SW - PW


@triton.jit
def tile_schedule(M, N, total_its, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                  SPLIT_K: tl.constexpr):
    """This program's output tile (grouped ordering for L2 reuse) and its split-K range of reduction steps."""
    pid = tl.program_id(0)
    tile = pid // SPLIT_K
    k_split = pid % SPLIT_K
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % gsize
    pid_n = (tile % per_group) // gsize
    chunk = tl.cdiv(total_its, SPLIT_K)
    it_lo = k_split * chunk
    it_hi = tl.minimum(total_its, it_lo + chunk)
    return tile, pid_m, pid_n, it_lo, it_hi


@triton.jit
def tile_offsets(pid_m, pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A tile's row and column indices, the reduction lanes, and which rows / columns fall inside M x N."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, tl.arange(0, BLOCK_K), offs_m < M, offs_n < N


@triton.jit
def split_k_gather(acc, ws_ptr, cnt_ptr, tile, offs_m, offs_n, y_mask, N, SPLIT_K: tl.constexpr):
    """Split-K reduction in one launch: each of a tile's SPLIT_K programs adds its partial sum into a
    zeroed float32 workspace [M, N] and bumps the tile's counter; the program that arrives last reads
    the total back. Returns (total, output mask restricted to that last program)."""
    wp = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.atomic_add(wp, acc, mask=y_mask)
    tl.debug_barrier()  # every thread's partial sum is in before the counter moves
    count = tl.atomic_add(cnt_ptr + tile, 1)
    count_blk = offs_m[:, None] * 0 + offs_n[None, :] * 0 + count  # the scalar as a block, for masking
    mask = y_mask & (count_blk == SPLIT_K - 1)
    total = tl.load(wp, mask=mask, other=0.0, cache_modifier=".cg")
    return total, mask
