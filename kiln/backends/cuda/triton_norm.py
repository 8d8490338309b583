"""Triton LayerNormalization (first output only), any float type, rows addressed by strides.

A LayerNormalization over axes [axis, rank) normalizes M = prod(shape[:axis]) rows of D =
prod(shape[axis:]) elements. The kernel takes a tile of BLOCK_R rows x BLOCK_D columns per program
(several rows per program when they are short):

* one pass (D <= BLOCK_D): the rows are loaded once and kept in registers; the mean (corrected by the
  mean of the residuals, a second reduction from registers), then the variance of the centred values
  (as the reference computes them), then ``(x - mean) * rstd * scale + bias``.
* chunked (longer rows): the statistics come from one sweep over the row in BLOCK_D chunks, each
  chunk's mean and sum of squared deviations merged into the running ones (Chan et al.'s pairwise
  update), all of the row shifted by its first element, so a mean far above the spread costs no
  precision (sum / sum of squares would lose it); a second sweep normalizes and stores. Rows longer
  than MAX_ONE_PASS (hidden sizes above 8192) always go this way (two reads of the row); for rows
  above 1024 it is one of the configurations the autotuner times.

A channels-first tensor normalized over C (timm's LayerNorm2d, exported as Transpose -> LayerNormalization ->
Transpose over NCHW) has its rows adjacent in memory and each row's elements H*W apart: the column form
(_layernorm_cols_kernel, one pass) lays the tile out with rows along the fast axis so that loads and stores
coalesce; the row form reads such a tensor an element per thread per cache line. (Where the producer writes
channels-last, as Kiln's convs do, the same Transpose gives dense rows and the row form wins.)

Statistics are float32 whatever the input type (fp32 / fp16 / bf16); scale and bias are converted to
float32 on load and the result rounded once to the output type. Scale and bias are flattened to D
values: constants are prepacked at build in X's type (the reference rounds them to it), broadcast over
the normalized dims; run-time ones must already have the normalized dims' shape.

Addressing: the normalized dims must collapse into one run with a single element stride (contiguous
rows, or rows strided by any constant, e.g. the last dim of a 4-D tensor held channels-last), and the
outer dims into at most three (size, stride) runs shared by input, output and residual, so slices and
permuted views of the batch dims are read in place, and a residual that broadcasts over outer dims (ViT's
position embedding [1, S, D] added to every image) is read with stride 0 there. Strides are checked per call
on the host; any other input layout (the normalized dims permuted among themselves, more outer runs) runs
the op's reference through the kernel's ``fallback``. The output is the given ``out=`` (one that the kernel
cannot address gets the result through a temporary and a copy) or allocated like the input (``empty_like``).
No host sync, no other allocation: CUDA-graph capturable.

Declined: the Mean / InvStdDev outputs, a stash_type other than float32, scale or bias that broadcast
over the outer dims, run-time scale or bias of another type or shape than the normalized dims'.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import triton
import triton.language as tl

from kiln.backends.cpu.fallback import ReferenceFallback
from kiln.backends.cuda.common import FLOAT_DTYPES, check_out
from kiln.backends.cuda.triton_launch import launch
from kiln.backends.tactic import Built, Kernel, Tactic, TacticContext, register_tactic
from kiln.ir.graph import Node, Value

Tensor = torch.Tensor

MAX_ONE_PASS = 8192
"""Longest row normalized in one pass from registers; longer rows are swept in chunks."""
_CHUNK = 2048
"""Largest chunk of the chunked configurations (twice that for rows above MAX_ONE_PASS)."""
_MAX_COLS = 1024
"""Longest row the column form (_layernorm_cols_kernel) is offered for."""


@triton.jit
def _row_offsets(rows, R1, R2, s0, s1, s2):
    """Memory offsets of flat row indices over three outer (size, stride) runs (sizes R0 x R1 x R2)."""
    i2 = rows % R2
    t = rows // R2
    return (t // R1) * s0 + (t % R1) * s1 + i2 * s2


@triton.jit
def _centred(x, mask, n):
    """Per-row mean of a (rows x columns) float32 tile holding n valid columns, and the centred tile
    (0 outside the mask). The mean is corrected by the mean of the first residuals, so that a row whose
    mean is large against its spread keeps its variance to float32 rounding of the values."""
    mean = tl.sum(x, axis=1) / n
    d = tl.where(mask, x - mean[:, None], 0.0)
    corr = tl.sum(d, axis=1) / n
    return mean + corr, tl.where(mask, d - corr[:, None], 0.0)


@triton.jit
def _load_row(x_ptr, r_ptr, offs, r_offs, mask, HAS_RES: tl.constexpr):
    """x at offs (+ r at r_offs, rounded to X's type as the Add it replaces), as float32."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(r_ptr + r_offs, mask=mask, other=0.0).to(tl.float32)).to(x_ptr.dtype.element_ty)
    return x.to(tl.float32)


@triton.jit
def _load_sum(x_ptr, r_ptr, s_ptr, x_offs, r_offs, s_offs, mask, HAS_RES: tl.constexpr, STORE_SUM: tl.constexpr):
    """`_load_row`, the sum also stored at s_offs when the layer outputs it (first sweep over a row only)."""
    x = _load_row(x_ptr, r_ptr, x_offs, r_offs, mask, HAS_RES)
    if STORE_SUM:
        tl.store(s_ptr + s_offs, x.to(s_ptr.dtype.element_ty), mask=mask)
    return x


@triton.jit(do_not_specialize=["M"])
def _layernorm_kernel(
    x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, s_ptr, M, D, R1, R2,
    sx0, sx1, sx2, sxd, sy0, sy1, sy2, syd, sr0, sr1, sr2, srd, eps,
    HAS_BIAS: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    RMS: tl.constexpr = False, HAS_RES: tl.constexpr = False, STORE_SUM: tl.constexpr = False,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rows < M
    x_row = _row_offsets(rows, R1, R2, sx0, sx1, sx2)[:, None]
    y_row = _row_offsets(rows, R1, R2, sy0, sy1, sy2)[:, None]
    r_row = _row_offsets(rows, R1, R2, sr0, sr1, sr2)[:, None]
    cols = tl.arange(0, BLOCK_D)
    if ONE_PASS:
        c_mask = cols < D
        mask = r_mask[:, None] & c_mask[None, :]
        c64 = cols.to(tl.int64)[None, :]
        x = _load_sum(x_ptr, r_ptr, s_ptr, x_row + c64 * sxd, r_row + c64 * srd, y_row + c64 * syd, mask,
                      HAS_RES, STORE_SUM)
        if RMS:  # RMSNormalization: no centring, x / sqrt(mean(x^2) + eps)
            d = x
        else:
            mean, d = _centred(x, mask, D)
        rstd = tl.rsqrt(tl.sum(d * d, axis=1) / D + eps)
        w = tl.load(w_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)
        y = d * rstd[:, None] * w[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + y_row + c64 * syd, y.to(y_ptr.dtype.element_ty), mask=mask)
    elif RMS:
        ss = tl.zeros([BLOCK_R], tl.float32)
        for k in range(0, D, BLOCK_D):
            c = k + cols
            mask = r_mask[:, None] & (c < D)[None, :]
            c64 = c.to(tl.int64)[None, :]
            x = _load_sum(x_ptr, r_ptr, s_ptr, x_row + c64 * sxd, r_row + c64 * srd, y_row + c64 * syd, mask,
                          HAS_RES, STORE_SUM)
            ss += tl.sum(x * x, axis=1)
        rstd = tl.rsqrt(ss / D + eps)
        for k in range(0, D, BLOCK_D):
            c = k + cols
            c_mask = c < D
            mask = r_mask[:, None] & c_mask[None, :]
            c64 = c.to(tl.int64)[None, :]
            x = _load_row(x_ptr, r_ptr, x_row + c64 * sxd, r_row + c64 * srd, mask, HAS_RES)
            w = tl.load(w_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + y_row + c64 * syd, (x * rstd[:, None] * w[None, :]).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        count = tl.zeros([BLOCK_R], tl.float32)
        mean = tl.zeros([BLOCK_R], tl.float32)
        m2 = tl.zeros([BLOCK_R], tl.float32)
        # statistics of x - (the row's first element): the mean then stays near the spread, so rounding
        # it to float32 costs nothing against the spread (a mean of 300 alone is only good to 2e-5)
        shift = _load_row(x_ptr, r_ptr, x_row, r_row, r_mask[:, None], HAS_RES)
        for k in range(0, D, BLOCK_D):
            c = k + cols
            mask = r_mask[:, None] & (c < D)[None, :]
            c64 = c.to(tl.int64)[None, :]
            x = _load_sum(x_ptr, r_ptr, s_ptr, x_row + c64 * sxd, r_row + c64 * srd, y_row + c64 * syd, mask,
                          HAS_RES, STORE_SUM)
            x = tl.where(mask, x - shift, 0.0)
            n_b = tl.minimum(D - k, BLOCK_D).to(tl.float32)
            mean_b, d = _centred(x, mask, n_b)
            total = count + n_b
            delta = mean_b - mean
            mean += delta * (n_b / total)
            m2 += tl.sum(d * d, axis=1) + delta * delta * (count * n_b / total)
            count = total
        rstd = tl.rsqrt(m2 / D + eps)
        for k in range(0, D, BLOCK_D):
            c = k + cols
            c_mask = c < D
            mask = r_mask[:, None] & c_mask[None, :]
            c64 = c.to(tl.int64)[None, :]
            x = _load_row(x_ptr, r_ptr, x_row + c64 * sxd, r_row + c64 * srd, mask, HAS_RES)
            w = tl.load(w_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
            y = ((x - shift) - mean[:, None]) * rstd[:, None] * w[None, :]
            if HAS_BIAS:
                y += tl.load(b_ptr + c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + y_row + c64 * syd, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])
def _layernorm_cols_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, D, R1, R2, sx0, sx1, sx2, sxd, sy0, sy1, sy2, syd, eps,
    HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, RMS: tl.constexpr = False,
):
    """One pass over rows held as columns: the tile is (BLOCK_D normalized elements) x (BLOCK_R rows), rows along
    the fast axis, so that rows adjacent in memory (a channels-first tensor normalized over C, as timm's
    LayerNorm2d / ConvNeXt's stem and downsample norms are exported: a Transpose view of NCHW) are read and
    written by adjacent threads. Same statistics as _layernorm_kernel's one pass."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rows < M
    x_row = _row_offsets(rows, R1, R2, sx0, sx1, sx2)[None, :]
    y_row = _row_offsets(rows, R1, R2, sy0, sy1, sy2)[None, :]
    cols = tl.arange(0, BLOCK_D)
    c_mask = cols < D
    mask = c_mask[:, None] & r_mask[None, :]
    c64 = cols.to(tl.int64)[:, None]
    x = tl.load(x_ptr + x_row + c64 * sxd, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        d = x
    else:
        mean = tl.sum(x, axis=0) / D
        d = tl.where(mask, x - mean[None, :], 0.0)
        d = tl.where(mask, d - (tl.sum(d, axis=0) / D)[None, :], 0.0)  # the mean's correction, as _centred
    rstd = tl.rsqrt(tl.sum(d * d, axis=0) / D + eps)
    w = tl.load(w_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)
    y = d * rstd[None, :] * w[:, None]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + y_row + c64 * syd, y.to(y_ptr.dtype.element_ty), mask=mask)


# ---- host side ----------------------------------------------------------------------------------

def layernorm_rows(x: Tensor, w: Tensor, b: Tensor | None, y: Tensor, eps: float, block_r: int, block_d: int,
                   num_warps: int, add: Tensor | None = None) -> None:
    """y[i] = LayerNorm(x[i] (+ add, a [D] vector, the sum rounded to x's type)) * w + b over the rows of 2-D x and y
    (element stride 1 in a row): the kernel for other layers that end in a row norm (cuda.triton_dwconv's
    FusedConvNorm in two launches; `add` the conv bias that cuDNN's form leaves out)."""
    m, d = int(x.shape[0]), int(x.shape[1])
    if not m or not d:
        return
    launch(_layernorm_kernel, (triton.cdiv(m, block_r),),
           [x, x if add is None else add, w, w if b is None else b, y, y, m, d, 1, 1, x.stride(0), 0, 0, 1,
            y.stride(0), 0, 0, 1, 0, 0, 0, 1, eps],
           dict(HAS_BIAS=b is not None, ONE_PASS=d <= block_d, BLOCK_R=block_r, BLOCK_D=block_d,
                num_warps=num_warps, HAS_RES=add is not None))



def _p2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def runs(shape: Sequence[int], *strides: Sequence[int]) -> list[tuple[int, ...]]:
    """The dims as maximal runs that address like one dim in every given tensor, outermost first:
    (size, stride in the first tensor, stride in the second, ...). Size-1 dims, whose strides are never
    used, are dropped: a contiguous block is one run, a channel slice of one two."""
    out: list[tuple[int, ...]] = []
    for k, n in enumerate(shape):
        if n == 1:
            continue
        st = [s[k] for s in strides]
        if out and all(prev == n * s for prev, s in zip(out[-1][1:], st)):
            out[-1] = (out[-1][0] * n, *st)
        else:
            out.append((n, *st))
    return out


def _row_layout(x: Tensor, y: Tensor, axis: int, r: Tensor | None = None) -> list[int] | None:
    """Kernel arguments R1, R2, then the three outer strides and the element stride of x, of y and of the
    residual r (x's own where there is none; r has x's shape, a broadcast one stride 0 in its broadcast dims);
    None when the normalized dims of a tensor are not one run, or the outer dims need more than three runs
    common to all."""
    ts = (x, y, x if r is None else r)
    inner = [runs(t.shape[axis:], t.stride()[axis:]) for t in ts]
    outer = runs(x.shape[:axis], *(t.stride()[:axis] for t in ts))
    if any(len(i) > 1 for i in inner) or len(outer) > 3:
        return None
    o = [(1, 0, 0, 0)] * (3 - len(outer)) + outer
    args = [o[1][0], o[2][0]]
    for k, i in enumerate(inner):
        args += [o[0][k + 1], o[1][k + 1], o[2][k + 1], i[0][1] if i else 1]
    return args


def _broadcast(r: Tensor, x: Tensor) -> Tensor | None:
    """The residual as a view of x's shape (stride 0 where it broadcasts), or None when it does not have x's rank
    and, in each dim, x's size or 1."""
    if r.dim() != x.dim() or any(b not in (a, 1) for a, b in zip(x.shape, r.shape)):
        return None
    return r if r.shape == x.shape else r.expand(x.shape)


def _strip(shape: Any) -> list[Any]:
    """A shape without its leading 1s (what broadcasting against more dims ignores)."""
    s = list(shape)
    while s and s[0] == 1:
        s.pop(0)
    return s


def _param_ok(p: Value | None, x: Value, inner: list[Any]) -> bool:
    """Scale / bias: absent; a float constant broadcasting over the (static) normalized dims only; or a
    run-time tensor of X's type with exactly the normalized dims' static shape."""
    if p is None:
        return True
    if p.type.dtype not in FLOAT_DTYPES or not all(isinstance(d, int) for d in inner):
        return False
    if p.const is not None:
        shape = _strip(p.const.shape)
        if len(shape) > len(inner):
            return False
        try:
            return list(torch.broadcast_shapes(tuple(shape), tuple(inner))) == inner
        except RuntimeError:
            return False
    return p.type.dtype == x.type.dtype and p.type.shape is not None and _strip(p.type.shape) == _strip(inner)


@dataclass(frozen=True)
class _Spec:
    """What the kernel needs of a normalization node: the normalized axis and dims, where Scale and B sit among
    the inputs, whether a residual R is added first (AddLayerNormalization) and its sum stored as a second
    output, and whether it is the RMS form."""

    axis: int
    inner: list[Any]
    params: tuple[int, int]
    residual: bool
    store_sum: bool
    rms: bool


def _spec(node: Node) -> _Spec | None:
    """The _Spec of a LayerNormalization, RMSNormalization or kiln AddLayerNormalization this tactic runs, else None."""
    onnx = node.domain in ("", "ai.onnx")
    fused = node.domain == "kiln" and node.op_type == "AddLayerNormalization"
    if not (fused or onnx and (node.op_type == "LayerNormalization" and node.opset >= 17
                               or node.op_type == "RMSNormalization" and node.opset >= 23)):
        return None
    k = 1 if fused else 0  # inputs before Scale: X (and R)
    x, scale = node.input(0), node.input(k + 1)
    wide = fused and node.attr("out_dtype") is not None  # Y in its own float type (a folded Cast), the sum in X's
    if (len(node.outputs) > (2 if fused else 1) or x is None or scale is None or len(node.inputs) > k + 3
            or any(o.type.dtype != x.type.dtype for o in node.outputs[1 if wide else 0:])
            or node.outputs[0].type.dtype not in FLOAT_DTYPES):
        return None
    rank, dt = x.type.rank, x.type.dtype
    if rank is None or rank < 1 or dt not in FLOAT_DTYPES:
        return None
    if fused:
        r = node.input(1)
        if r is None or r.type.dtype != dt or r.type.shape is None or len(r.type.shape) != rank:
            return None
        if any(b != 1 and b != a for a, b in zip(x.type.shape, r.type.shape)):  # type: ignore[arg-type]
            return None
    axis = int(node.attr("axis", -1))
    if not -rank <= axis < rank or int(node.attr("stash_type", 1)) != 1:
        return None
    axis %= rank
    inner = list(x.type.shape[axis:])  # type: ignore[index]
    if not (_param_ok(scale, x, inner) and _param_ok(node.input(k + 2), x, inner)):
        return None
    rms = node.op_type == "RMSNormalization" or fused and int(node.attr("rms", 0)) == 1
    return _Spec(axis, inner, (k + 1, k + 2), fused, len(node.outputs) == 2, rms)


class TritonLayerNorm(Tactic):
    """LayerNormalization (Y only), RMSNormalization, or either after a residual add (kiln AddLayerNormalization,
    Y and the sum), over trailing axes whose elements form one strided run."""

    id = "cuda.triton_layernorm"
    devices = ("cuda",)
    priority = 20
    writes_out = 1

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        return _spec(node) is not None

    def configs(self, node: Node, ctx: TacticContext) -> list[dict[str, Any]]:
        """One pass over the whole row where it fits MAX_ONE_PASS: a tile of 2048 elements (several short rows per
        program), and for rows of 256 and more also one row per program (more programs where there are few rows)
        and a 4096-element tile of rows (fewer, fuller programs where there are many); for rows up to _MAX_COLS
        without a residual, two tiles of the column form (rows along the fast axis: the layout a channels-first
        tensor normalized over C needs); chunked sweeps for rows above 1024 (the normalized dims are static:
        `_param_ok` requires it)."""
        spec = _spec(node)
        assert spec is not None, f"{self.id} does not support node {node.name}"
        d = math.prod(spec.inner)
        bd = _p2(max(d, 1))
        out: list[dict[str, Any]] = []
        if bd <= MAX_ONE_PASS:
            tiles = {max(1, 2048 // bd): 16}
            if bd >= 256:
                tiles.setdefault(1, 16)
                tiles.setdefault(max(1, 4096 // bd), 8)
            for br, most_warps in tiles.items():
                out.append({"BLOCK_R": br, "BLOCK_D": bd, "num_warps": min(most_warps, max(1, br * bd // 256))})
        if bd <= _MAX_COLS and not spec.residual:
            for br in sorted({max(8, 4096 // bd), min(256, max(16, 16384 // bd))}):
                out.append({"COLS": 1, "BLOCK_R": br, "BLOCK_D": bd, "num_warps": 4 if br * bd <= 4096 else 8})
        if bd > 1024:
            out.append({"BLOCK_R": 1, "BLOCK_D": min(bd // 2, _CHUNK), "num_warps": 4})
        if bd > MAX_ONE_PASS:
            out.append({"BLOCK_R": 1, "BLOCK_D": 2 * _CHUNK, "num_warps": 8})
        return out

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        spec = _spec(node)
        assert spec is not None, f"{self.id} does not support node {node.name}"
        axis, inner, (si, bi) = spec.axis, spec.inner, spec.params
        x_dt = node.inputs[0].type.dtype.torch  # type: ignore[union-attr]
        y_dt = node.outputs[0].type.dtype.torch  # type: ignore[union-attr]
        params: list[Tensor | None] = []
        for i in (si, bi):
            v = node.input(i)
            if v is None or v.const is None:
                params.append(None)
            else:  # rounded to X's type first, as the reference does
                params.append(v.const.to(x_dt).reshape(_strip(v.const.shape)).expand(inner)
                              .contiguous().reshape(-1).to(device))
        has_bias = node.input(bi) is not None
        eps = float(node.attr("epsilon", 1e-5))
        cfg = dict(config)
        br, bd, warps = int(cfg["BLOCK_R"]), int(cfg["BLOCK_D"]), int(cfg.get("num_warps", 4))
        cols = bool(cfg.get("COLS")) and not spec.residual
        fb = ReferenceFallback(node)

        def k_layernorm(x: Tensor, *rest: Tensor | None, out: Tensor | None = None) -> Any:
            r = rest[0] if spec.residual else None
            scale = rest[si - 1] if len(rest) >= si else None
            bias = rest[bi - 1] if len(rest) >= bi else None
            if out is not None:
                check_out(out, tuple(x.shape), node)
            w = params[0] if params[0] is not None else scale
            b = (params[1] if params[1] is not None else bias) if has_bias else None
            rows = math.prod(x.shape[:axis])
            d = math.prod(x.shape[axis:])
            key = (tuple(x.shape), x.stride(), None if r is None else (tuple(r.shape), r.stride()))
            rv = _broadcast(r, x) if r is not None else None
            args = _row_layout(x, x, axis, rv) if r is None or rv is not None else None
            if args is None or w is None or w.numel() != d or (b is not None and b.numel() != d):
                fb.declined.setdefault(key, "an input layout or size the Triton LayerNorm does not address")
                return fb(key, [x, *rest][:len(node.inputs)], out)
            y = out
            if y is not None:
                args = _row_layout(x, y, axis, rv)
            if args is None or y is None:  # no destination, or one addressed otherwise: a tensor like x
                y = torch.empty_like(x, dtype=y_dt)
                args = _row_layout(x, y, axis, rv)
                if args is None:  # empty_like kept a layout of x that does not match it row by row
                    y = torch.empty(x.shape, dtype=y_dt, device=x.device)
                    args = _row_layout(x, y, axis, rv)
                    assert args is not None
            s = torch.empty_like(y, dtype=x.dtype) if spec.store_sum else None
            if s is not None and s.stride() != y.stride():  # the sum takes y's strides: y a view of a larger buffer
                y = torch.empty(x.shape, dtype=y_dt, device=x.device)
                s = torch.empty_like(y, dtype=x.dtype)
                args = _row_layout(x, y, axis, rv)
                assert args is not None
            if rows and d:
                w = w.reshape(-1) if w.is_contiguous() else w.contiguous().reshape(-1)
                if b is not None:
                    b = b.reshape(-1) if b.is_contiguous() else b.contiguous().reshape(-1)
            if rows and d and cols and d <= bd:
                launch(_layernorm_cols_kernel, (triton.cdiv(rows, br),),
                       [x, w, w if b is None else b, y, rows, d, *args[:10], eps],
                       dict(HAS_BIAS=b is not None, BLOCK_R=br, BLOCK_D=bd, num_warps=warps, RMS=spec.rms))
            elif rows and d:
                launch(_layernorm_kernel, (triton.cdiv(rows, br),),
                       [x, x if rv is None else rv, w, w if b is None else b, y, y if s is None else s, rows, d,
                        *args, eps],
                       dict(HAS_BIAS=b is not None, ONE_PASS=d <= bd, BLOCK_R=br, BLOCK_D=bd, num_warps=warps,
                            RMS=spec.rms, HAS_RES=r is not None, STORE_SUM=s is not None))
            if out is not None and y is not out:
                out.copy_(y)
                y = out
            return y if s is None else (y, s)
        return Kernel(k_layernorm, prepacked=frozenset(i for i, p in zip((si, bi), params) if p is not None),
                      fallback=fb, out_format="like_input")


register_tactic(TritonLayerNorm())
