"""Triton flash attention for the 4-D ONNX ``Attention`` op (forward only, no KV cache).

``Y = softmax(Q K^T * scale + bias) V`` for Q [B, H, Sq, D], K [B, Hkv, Skv, D], V [B, Hkv, Skv, Dv],
computed one BLOCK_M x Skv row block per program (grid ``(cdiv(Sq, BLOCK_M), B*H)``) without ever
holding the Sq x Skv scores: the keys are swept in BLOCK_N blocks with an online softmax (running row
maximum and sum in float32, the logits scaled by log2(e) for ``exp2``), P V accumulated in float32 and
rounded once to the output type. Float32 inputs multiply in IEEE float32 (no TF32), half types on the
tensor cores with float32 accumulation.

The bias is the op's: an optional mask, additive (any float type) or boolean (True = attend), of rank
<= 4 broadcast to [B, H, Sq, Skv] by zero strides; as in the reference, a mask whose last dim is shorter
than Skv leaves the keys past it masked. ``is_causal`` is top-left aligned (query i sees keys j <= i:
there is no past); key blocks wholly past a row block's causal frontier are never visited, and the blocks
wholly inside it (and inside Skv) run without per-element bound checks. A row whose keys are all masked
(-inf everywhere) produces zeros, not NaN: the running maximum is replaced by 0 while it is -inf and the
final 1/l is guarded. GQA: query head h reads key/value head h // (H // Hkv).

Every tensor (Q, K, V, mask, Y) is addressed through its own four strides, so transposed or sliced
views are read in place and ``out=`` may be any strided view. Head dims up to 256 (BLOCK_D, the next power
of two >= 16, masked); any Sq and Skv (masked tails). Offsets inside one head are 32-bit (inputs whose
head slices span more are declined); batches whose B*H exceeds the grid's second dim (65535) are split
over several launches. No host sync, and no allocation when ``out=`` is given: CUDA-graph capturable.
Under the Triton interpreter (TRITON_INTERPRET=1, the CPU tests) bfloat16 products are formed from
float32 operands (P still rounded to bfloat16), as the interpreter multiplies bfloat16 as raw bits.

Declined (the tactic's ``supports``): the 3-D form, past_key / past_value / nonpad_kv_seqlen, the
present/qk outputs, qk_matmul_output_mode, softcap, sliding windows, a softmax_precision other than
float32. Inputs the kernel cannot take at run time (another dtype, device or rank, a mask that does not
broadcast) run the op's reference through the kernel's ``fallback``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

from kiln.backends.attention import merged_output, spec as attention_spec, views
from kiln.backends.cpu.fallback import ReferenceFallback
from kiln.backends.cuda.common import check_out
from kiln.backends.cuda.triton_launch import launch
from kiln.backends.tactic import Built, Kernel, Tactic, TacticContext, register_tactic
from kiln.ir.dtype import DType
from kiln.ir.graph import Node

Tensor = torch.Tensor

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
_MAX_GRID_Y = 65535
_INT32_MAX = 2**31 - 1
_MAX_BLOCK = 128
_IO_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MASK_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool)


@triton.jit
def _attn_block(acc, l_i, m_i, q, k_base, v_base, m_base, rows, n0, kv_end, qk_scale, skn, skd, svn, svd,
                smm, smn, SQ, D: tl.constexpr, DV: tl.constexpr, HAS_MASK: tl.constexpr,
                MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr, CHECK: tl.constexpr, PREC: tl.constexpr,
                DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One key block [n0, n0 + BLOCK_N) folded into the running (acc, l, m). CHECK: the block crosses
    the end of the keys or the causal frontier (per-element bounds and frontier masking); without it the
    loads are unmasked but for the head dim's padding."""
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    c_ok = cols < kv_end
    k_ptrs = k_base + offs_d[:, None] * skd + cols[None, :] * skn
    v_ptrs = v_base + cols[:, None] * svn + offs_dv[None, :] * svd
    if CHECK:
        k = tl.load(k_ptrs, mask=(offs_d[:, None] < D) & c_ok[None, :], other=0.0)
    elif D == BLOCK_D:
        k = tl.load(k_ptrs)
    else:
        k = tl.load(k_ptrs, mask=offs_d[:, None] < D, other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
    s = tl.dot(q, k, input_precision=PREC) * qk_scale
    if HAS_MASK:
        m_ptrs = m_base + rows[:, None] * smm + cols[None, :] * smn
        if CHECK:
            mv = tl.load(m_ptrs, mask=(rows[:, None] < SQ) & c_ok[None, :], other=0)
        else:
            mv = tl.load(m_ptrs, mask=rows[:, None] < SQ, other=0)
        if MASK_BOOL:
            s = tl.where(mv != 0, s, float("-inf"))
        else:
            s = s + mv.to(tl.float32) * 1.4426950408889634
    if CHECK:
        keep = c_ok[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None])
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays finite
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if CHECK:
        v = tl.load(v_ptrs, mask=c_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    elif DV == BLOCK_DV:
        v = tl.load(v_ptrs)
    else:
        v = tl.load(v_ptrs, mask=offs_dv[None, :] < DV, other=0.0)
    p_lo = p.to(v.dtype)  # P V on the tensor cores in the inputs' type, accumulated in float32
    if DOT_F32:
        p_lo = p_lo.to(tl.float32)
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p_lo, v, input_precision=PREC)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["SQ", "SKV", "MASK_N"])
def _flash_attn_fwd(
    q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, H, GROUP, SQ, SKV, MASK_N, qk_scale,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smh, smm, smn, sob, soh, som, sod,
    D: tl.constexpr, DV: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr,
    PREC: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    # per (batch, head) bases in 64 bits; offsets inside one head fit 32 bits (the launcher checks)
    q_base = q_ptr + b * sqb + h * sqh
    k_base = k_ptr + b * skb + hk * skh
    v_base = v_ptr + b * svb + hk * svh
    m_base = m_ptr + b * smb + h * smh
    o_base = o_ptr + b * sob + h * soh

    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    r_ok = rows < SQ
    q = tl.load(q_base + rows[:, None] * sqm + offs_d[None, :] * sqd,
                mask=r_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    # keys past the mask's last dim are masked (the reference pads it with -inf): never visited
    kv_end = SKV
    if HAS_MASK:
        kv_end = tl.minimum(SKV, MASK_N)
    hi = kv_end
    full_end = (kv_end // BLOCK_N) * BLOCK_N  # blocks below it need no bound checks ...
    if CAUSAL:  # ... nor frontier masking below this one; blocks past the frontier are skipped
        hi = tl.minimum(hi, start_m + BLOCK_M)
        full_end = tl.minimum(full_end, ((start_m + 1) // BLOCK_N) * BLOCK_N)
    for n0 in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, k_base, v_base, m_base, rows, n0, kv_end, qk_scale,
                                    skn, skd, svn, svd, smm, smn, SQ, D, DV, HAS_MASK, MASK_BOOL, CAUSAL,
                                    False, PREC, DOT_F32, BLOCK_N, BLOCK_D, BLOCK_DV)
    for n0 in range(full_end, hi, BLOCK_N):
        acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, k_base, v_base, m_base, rows, n0, kv_end, qk_scale,
                                    skn, skd, svn, svd, smm, smn, SQ, D, DV, HAS_MASK, MASK_BOOL, CAUSAL,
                                    True, PREC, DOT_F32, BLOCK_N, BLOCK_D, BLOCK_DV)

    inv = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)  # fully masked rows: acc is 0, so 0
    y = acc * inv[:, None]
    tl.store(o_base + rows[:, None] * som + offs_dv[None, :] * sod, y.to(o_ptr.dtype.element_ty),
             mask=r_ok[:, None] & (offs_dv[None, :] < DV))


# ---- host side ----------------------------------------------------------------------------------

def block_d(d: int) -> int:
    """The tile width of a head dim: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, 1 << max(0, (int(d) - 1).bit_length()))


def _mask_view(mask: Tensor, b: int, h: int, sq: int, skv: int) -> tuple[Tensor, tuple[int, int, int, int], int]:
    """(mask as the kernel loads it, its four strides over [B, H, Sq, mask keys], its key length). Missing
    or size-1 leading dims broadcast with stride 0; the last dim may be shorter than Skv (the keys past it
    are masked, as the reference pads it with -inf), but not longer."""
    if mask.dim() > 4:
        raise ValueError(f"a mask of rank {mask.dim()}")
    shape = [1] * (4 - mask.dim()) + list(mask.shape)
    strides = [0] * (4 - mask.dim()) + list(mask.stride())
    out: list[int] = []
    for n, st, want in zip(shape[:3], strides[:3], (b, h, sq)):
        if n != 1 and n != want:
            raise ValueError(f"a mask of shape {list(mask.shape)}, which does not broadcast to [{b}, {h}, {sq}, {skv}]")
        out.append(st if n != 1 else 0)
    n_keys = shape[3]
    if n_keys > skv:
        raise ValueError(f"a mask of {n_keys} keys, more than the {skv} of K")
    out.append(strides[3] if n_keys > 1 else 0)
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # same strides, loaded as bytes
    return mask, (out[0], out[1], out[2], out[3]), n_keys


def _reach(t: Tensor, strides: tuple[int, ...] | None = None, keys: int | None = None) -> int:
    """Largest element offset the kernel forms inside one head's [S, D] slice of a 4-D tensor, including
    a block's worth of padding rows and columns past the end (masked loads, but their offsets are formed)."""
    st = strides if strides is not None else t.stride()
    rows, cols = t.shape[2], keys if keys is not None else t.shape[3]
    return (rows - 1 + _MAX_BLOCK) * st[2] + (cols - 1 + _MAX_BLOCK) * st[3]


_MaskView = tuple[Tensor, tuple[int, int, int, int], int]


def unsupported(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, out: Tensor | None = None) -> str | None:
    """Why `flash_attention` cannot take these inputs (None: it can)."""
    return _check(q, k, v, mask, out)[0]


def _check(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
           out: Tensor | None) -> tuple[str | None, _MaskView | None]:
    """(why the kernel cannot take these inputs or None, the mask's broadcast view when there is a mask)."""
    ts = [q, k, v]
    if any(t.dim() != 4 for t in ts):
        return "Q, K and V are not all 4-D", None
    if q.dtype not in _IO_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype} (one of float16/bfloat16/float32 for all three)", None
    if mask is not None:
        ts.append(mask)
        if mask.dtype not in _MASK_DTYPES:
            return f"a mask of dtype {mask.dtype}", None
    if any(t.device != q.device for t in ts):
        return "inputs on different devices", None
    b, h, sq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b or k.shape[3] != d or k.shape[1:3] != v.shape[1:3]:
        return f"shapes Q {list(q.shape)}, K {list(k.shape)}, V {list(v.shape)} that do not agree", None
    hkv, skv, dv = k.shape[1], k.shape[2], v.shape[3]
    if hkv == 0 or h % hkv:
        return f"{h} query heads, not a multiple of {hkv} key/value heads", None
    if max(d, dv) > MAX_HEAD_DIM:
        return f"head dims {d}, {dv} (at most {MAX_HEAD_DIM})", None
    if out is not None and (tuple(out.shape) != (b, h, sq, dv) or out.device != q.device
                            or out.dtype not in _IO_DTYPES):
        return f"a destination {list(out.shape)} {out.dtype} on {out.device}, not {[b, h, sq, dv]} on {q.device}", None
    reach = max(_reach(q), _reach(k), _reach(v), _reach(out) if out is not None else 0)
    mview = None
    if mask is not None:
        try:
            mview = _mask_view(mask, b, h, sq, skv)
        except ValueError as e:
            return str(e), None
        reach = max(reach, _reach(q, mview[1], mview[2]))
    if reach > _INT32_MAX:
        return "one head's elements spanning more than 2**31 offsets", None
    return None, mview


def flash_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None, causal: bool,
                    out: Tensor | None = None, *, BLOCK_M: int = 64, BLOCK_N: int = 64, num_warps: int = 4,
                    num_stages: int = 2) -> Tensor:
    """softmax(q k^T * scale + bias) v for q [B, H, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv]; mask
    (additive float or bool, True = attend) broadcast to [B, H, Sq, Skv] by strides; causal top-left
    aligned; scale None = 1/sqrt(D). Writes into `out` ([B, H, Sq, Dv], any strides, any of the three float
    types) when given, else into a new contiguous tensor of q's dtype; returns it. Raises ValueError for
    the inputs `unsupported` names. No host sync, no allocation when `out` is given."""
    if not (16 <= BLOCK_M <= _MAX_BLOCK and 16 <= BLOCK_N <= _MAX_BLOCK):
        raise ValueError(f"blocks of {BLOCK_M} x {BLOCK_N} (16 to {_MAX_BLOCK})")
    why, mview = _check(q, k, v, mask, out)
    if why is not None:
        raise ValueError(f"flash_attention cannot take {why}")
    if out is None:
        out = torch.empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]), dtype=q.dtype, device=q.device)
    _launch(q, k, v, mask, mview, scale, causal, out, BLOCK_M, BLOCK_N, num_warps, num_stages)
    return out


def _launch(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, mview: _MaskView | None, scale: float | None,
            causal: bool, out: Tensor, BLOCK_M: int, BLOCK_N: int, num_warps: int, num_stages: int) -> None:
    """The kernel's launches for inputs `_check` accepted (`mview`: its view of the mask)."""
    b, h, sq, d = q.shape
    hkv, skv, dv = k.shape[1], k.shape[2], v.shape[3]
    if b * h == 0 or sq == 0 or dv == 0:
        return
    if scale is None:
        scale = 1.0 / math.sqrt(d) if d else 1.0
    if mview is not None:
        mv, mstrides, mask_n = mview
    else:
        mv, mstrides, mask_n = q, (0, 0, 0, 0), skv
    # the interpreter multiplies bfloat16 operands as their raw bits: it gets float32 ones (P still rounded)
    dot_f32 = q.dtype == torch.bfloat16 and _interpreted()
    consts = dict(D=d, DV=dv, HAS_MASK=mask is not None, MASK_BOOL=mask is not None and mask.dtype == torch.bool,
                  CAUSAL=bool(causal), PREC="ieee" if q.dtype == torch.float32 or dot_f32 else "tf32", DOT_F32=dot_f32,
                  BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d(d), BLOCK_DV=block_d(dv),
                  num_warps=num_warps, num_stages=num_stages)
    per_launch = max(1, _MAX_GRID_Y // h)  # batches per launch (the grid's second dim holds B*H)
    for b0 in range(0, b, per_launch):
        b1 = min(b, b0 + per_launch)
        mb = mv if mstrides[0] == 0 else mv[b0:b1]
        launch(_flash_attn_fwd, (triton.cdiv(sq, BLOCK_M), (b1 - b0) * h),
               [q[b0:b1], k[b0:b1], v[b0:b1], mb, out[b0:b1], h, h // hkv, sq, skv, mask_n, float(scale) * LOG2E,
                *q.stride(), *k.stride(), *v.stride(), *mstrides, *out.stride()], consts)


# ---- tactic -------------------------------------------------------------------------------------

_MASK_TYPES = (DType.FLOAT16, DType.BFLOAT16, DType.FLOAT32, DType.FLOAT64, DType.BOOL)


def _head_dims(node: Node) -> tuple[int | None, int | None]:
    """(D, Dv) when the types know them (the 3-D form: the hidden widths over the head counts)."""
    s = attention_spec(node)
    q, v = node.inputs[0].type.shape, node.inputs[2].type.shape  # type: ignore[union-attr]
    if q is None or v is None or s is None:
        return None, None
    d, dv = q[-1], v[-1]
    if s.rank3:
        d = d // s.q_heads if isinstance(d, int) else None
        dv = dv // s.kv_heads if isinstance(dv, int) else None
    return (d if isinstance(d, int) else None), (dv if isinstance(dv, int) else None)


def _supported(node: Node) -> bool:
    """The forms kiln.backends.attention.spec admits (4-D, and 3-D read through head views), head dims to 256."""
    s = attention_spec(node)
    if s is None:
        return False
    mask = node.input(3)
    if mask is not None and mask.type.dtype not in _MASK_TYPES:
        return False
    d, dv = _head_dims(node)
    return all(x is None or x <= MAX_HEAD_DIM for x in (d, dv))


_Tile = tuple[int, int, int, int]  # BLOCK_M, BLOCK_N, num_warps, num_stages
_TILES_64: list[_Tile] = [(64, 64, 4, 3), (128, 64, 4, 3), (128, 32, 4, 2), (64, 32, 4, 2), (128, 64, 8, 3)]
_TILES_128: list[_Tile] = [(64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 8, 2), (64, 32, 4, 2), (64, 64, 4, 2)]
_TILES_256: list[_Tile] = [(64, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2)]
_TILES_SMALL: list[_Tile] = [(64, 32, 4, 1), (32, 32, 4, 1)]  # when nothing above fits the shared memory
_SMEM_BUDGET = 160 * 1024


class TritonAttention(Tactic):
    """ONNX Attention in its 4-D form (Q [B, H, Sq, D], K/V [B, Hkv, Skv, D/Dv], optional float or bool mask,
    is_causal, scale, GQA) as one Triton flash-attention kernel writing into any strided ``out=``. Declines
    the KV cache, nonpad_kv_seqlen, the extra outputs, softcap, windows and non-float32 softmax precision;
    head dims above 256; inputs it cannot address at run time go to the op's reference."""

    id = "cuda.triton_attention"
    devices = ("cuda",)
    priority = 30
    writes_out = 1

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        return _supported(node)

    def configs(self, node: Node, ctx: TacticContext) -> list[dict[str, Any]]:
        """Row blocks of 64 / 128 queries (and 32 for a short static Sq), key blocks of 32 / 64, 2 or 3 stages,
        pruned by head dim so the accumulator and score tile stay in registers (a 128-row block takes 8 warps
        from D = 128 up; D = 256 takes no 128 x 64 blocks) and by an estimate of the pipelined tiles' shared
        memory (Q's block plus K's and V's per stage, at most _SMEM_BUDGET: float32 at D = 128 / 256 keeps
        the smaller tiles and single-stage ones). The first is the heuristic choice without timing."""
        assert _supported(node), f"{self.id} does not support node {node.name}"
        d, dv = _head_dims(node)
        bd, bdv = block_d(d or 64), block_d(dv or 64)
        widest = max(bd, bdv)
        elt = 4 if node.inputs[0].type.dtype == DType.FLOAT32 else 2  # type: ignore[union-attr]
        s = attention_spec(node)
        sq = node.inputs[0].type.shape[1 if s is not None and s.rank3 else 2]  # type: ignore[index,union-attr]
        table = _TILES_64 if widest <= 64 else _TILES_128 if widest <= 128 else _TILES_256
        if isinstance(sq, int) and sq <= 32:  # decode-like: a 128-row block would be mostly padding
            table = [(32, 64, 4, 2)] + [t for t in table if t[0] == 64]
        fits = [t for t in (*table, *_TILES_SMALL)
                if elt * (t[0] * bd + t[3] * t[1] * (bd + bdv)) <= _SMEM_BUDGET]
        keep = [t for t in fits if t in table] or fits[:2]
        return [{"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st} for bm, bn, w, st in keep]

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        assert _supported(node), f"{self.id} does not support node {node.name}"
        scale = node.attr("scale")
        causal = bool(int(node.attr("is_causal", 0) or 0))
        tiles = {k: int(config[k]) for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}
        fb = ReferenceFallback(node)
        n_in = len(node.inputs)

        spec = attention_spec(node)
        assert spec is not None

        interpreted = _interpreted()  # kernels may take CPU tensors (the tests without a GPU)

        def k_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, *rest: Any,
                        out: Tensor | None = None) -> Tensor:
            vs = views(spec, q, k, v)
            why, mview = "shapes that do not fit the layer's form", None
            if vs is not None:
                q4, k4, v4 = vs
                b, h, sq, dv = q4.shape[0], q4.shape[1], q4.shape[2], v4.shape[-1]
                if out is not None:
                    check_out(out, (b, sq, h * dv) if spec.rank3 else (b, h, sq, dv), node)
                if out is None or (spec.rank3 and not out.is_contiguous()):
                    y, o4 = merged_output(spec, q4, v4)  # heads by strides: a [B, H, Sq, Dv] view of [B, Sq, H*Dv]
                else:
                    y, o4 = out, (out.view(b, sq, h, dv).transpose(1, 2) if spec.rank3 else out)
                why, mview = _check(q4, k4, v4, attn_mask, o4)
                if why is None and q.device.type != "cuda" and not interpreted:
                    why = f"inputs on {q.device}"
            if why is not None:
                key = (tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, q.device.type,
                       None if attn_mask is None else (tuple(attn_mask.shape), attn_mask.dtype))
                fb.declined.setdefault(key, f"the Triton attention kernel cannot take these inputs: {why}")
                return fb(key, [q, k, v, attn_mask, *rest][:n_in], out)
            _launch(q4, k4, v4, attn_mask, mview, scale, causal, o4, **tiles)
            if out is not None and y is not out:
                out.copy_(y)
                return out
            return y
        return Kernel(k_attention, fallback=fb, out_format="contiguous")


def _interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, the tests without a GPU)."""
    from kiln.settings import settings
    return settings().triton_interpret


register_tactic(TritonAttention())
