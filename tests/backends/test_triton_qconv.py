"""INT8 Triton tactics (cuda.triton_qconv, cuda.triton_qgemm) against an int64/float64 oracle written here.

With power-of-two scales, integer-valued biases/residuals on a power-of-two grid and accumulators below
2**23, every step of the QConv/QGemm epilogue is exact in float32 as in float64, so the kernels must match
the oracle bit for bit (rounding ties included: the scales make many). General scales are checked within
one quantization step against the op's own reference (kiln.ops.qlayers). Without a GPU the kernels run
under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors); with one, compiled on CUDA.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton.jit

pytest.importorskip("triton", reason="triton is not installed (pip install triton; the test extra has it): Triton tactics untested")

from kiln.backends.tactic import TacticContext, get_tactic  # noqa: E402
from kiln.errors import KilnError  # noqa: E402
from kiln.ir.dtype import DType  # noqa: E402
from kiln.ir.graph import Node, Value  # noqa: E402
from kiln.ir.types import TensorType  # noqa: E402
from kiln.ops.registry import lookup  # noqa: E402
from kiln.ops.conv import ConvGeometry  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CODES = {torch.int8: 3, torch.uint8: 2, torch.float32: 1, torch.float16: 10}
RANGES = {torch.int8: (-128, 127), torch.uint8: (0, 255)}
NP = {torch.int8: np.int8, torch.uint8: np.uint8, torch.float32: np.float32, torch.float16: np.float16}


def _ctx(level: int = 3) -> TacticContext:
    return TacticContext(DEV, extra={"opt_level": level})


def _val(name: str, t: torch.Tensor | None = None, shape: tuple[int, ...] | None = None,
         dtype: torch.dtype = torch.float32) -> Value:
    if t is not None:
        return Value(name, const=t)
    return Value(name, TensorType(DType.from_torch(dtype), shape))


def _rand_int(g: np.random.Generator, shape, dtype: torch.dtype) -> np.ndarray:
    lo, hi = RANGES[dtype]
    return g.integers(lo, hi + 1, size=shape).astype(NP[dtype])


# ---- the oracle --------------------------------------------------------------------------------------

def oracle_conv_acc(x: np.ndarray, w: np.ndarray, x_zp: int, strides, pads, dil) -> np.ndarray:
    """Exact int64 sum over (c, kh, kw) of (X - x_zp) * W, X padded with x_zp (NCHW)."""
    xi = np.pad(x.astype(np.int64) - x_zp, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    _, _, hp, wp = xi.shape
    k, _, kh, kw = w.shape
    oh = (hp - dil[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (wp - dil[1] * (kw - 1) - 1) // strides[1] + 1
    acc = np.zeros((x.shape[0], k, oh, ow), np.int64)
    for i in range(kh):
        for j in range(kw):
            h0, w0 = i * dil[0], j * dil[1]
            patch = xi[:, :, h0:h0 + strides[0] * (oh - 1) + 1:strides[0], w0:w0 + strides[1] * (ow - 1) + 1:strides[1]]
            acc += np.einsum("nchw,kc->nkhw", patch, w[:, :, i, j].astype(np.int64))
    return acc


def oracle_epilogue(acc: np.ndarray, axis: int, p: dict, b: np.ndarray | None, z: np.ndarray | None) -> np.ndarray:
    """The float64 value v of the spec before the store (exact for the power-of-two test data)."""
    shape = [1] * acc.ndim
    shape[axis] = acc.shape[axis]
    ws = np.asarray(p["w_scales"], np.float64)
    m = (ws if ws.size > 1 else np.full(acc.shape[axis], ws[0])) * p["x_scale"]
    v = acc.astype(np.float64) * m.reshape(shape)
    if b is not None:
        v = v + b.astype(np.float64).reshape(shape)
    r = None
    if z is not None:
        r = (z.astype(np.float64) - p.get("z_zero_point", 0)) * p.get("z_scale", 1.0) if z.dtype.kind in "iu" \
            else z.astype(np.float64)
    before = p.get("act_before_add", 0)
    if before:
        v = _oracle_act(v, p)
    if p.get("a_scale", 0.0) > 0:  # the layer's own result requantized to a_dtype and dequantized
        lo, hi = A_RANGES[p["a_dtype"]]
        zp = p["a_zero_point"]
        v = (np.clip(np.rint(v / p["a_scale"]) + zp, lo, hi) - zp) * p["a_scale"]
    if r is not None:
        v = v + r
    return v if before else _oracle_act(v, p)


A_RANGES = {3: (-128, 127), 2: (0, 255)}  # a_dtype code (INT8 / UINT8) -> range


def _oracle_act(v: np.ndarray, p: dict) -> np.ndarray:
    act = p.get("activation", "")
    if act == "Relu":
        return np.maximum(v, 0.0)
    if act == "LeakyRelu":
        return np.where(v >= 0, v, v * p["alpha"])
    if act == "Clip":
        return np.clip(v, p["alpha"], p["beta"])
    return v


def _a_params(g: np.random.Generator, v: np.ndarray, a_dtype: torch.dtype) -> dict:
    """A power-of-two a_scale twice as coarse as the output's (so the step shows) and a zero point off 0."""
    zp = int(g.integers(-20, 21)) if a_dtype == torch.int8 else int(g.integers(100, 157))
    return {"a_scale": 2.0 * _pow2_y(v), "a_zero_point": zp, "a_dtype": CODES[a_dtype]}


def oracle_store(v: np.ndarray, p: dict, out_dtype: torch.dtype) -> np.ndarray:
    if out_dtype in RANGES:
        lo, hi = RANGES[out_dtype]
        return np.clip(np.rint(v / p["y_scale"]) + p["y_zero_point"], lo, hi).astype(NP[out_dtype])
    return v.astype(np.float32).astype(NP[out_dtype])


def _pow2_y(v: np.ndarray) -> float:
    """A power-of-two output scale putting most values inside the 8-bit range and some outside (saturation)."""
    return float(2.0 ** np.round(np.log2(max(np.std(v), 1e-3) / 40.0)))


def _quant_params(g: np.random.Generator, k: int, x_dtype: torch.dtype, per_channel: bool = True) -> dict:
    lo, hi = RANGES[x_dtype]
    ws = [float(2.0 ** -int(e)) for e in g.integers(6, 10, size=k if per_channel else 1)]
    return {"x_scale": 2.0 ** -4, "x_zero_point": int(g.integers(lo, hi + 1)), "w_scales": ws}


# ---- QConv --------------------------------------------------------------------------------------------

def qconv_node(x_shape, x_dtype, w, b, z_shape, z_dtype, out_shape, out_dtype, attrs: dict) -> Node:
    ins = [_val("x", shape=x_shape, dtype=x_dtype), _val("w", w), None if b is None else _val("b", b),
           None if z_shape is None else _val("z", shape=z_shape, dtype=z_dtype)]
    while ins and ins[-1] is None:
        ins.pop()
    return Node("QConv", ins, [_val("y", shape=out_shape, dtype=out_dtype)], {**attrs, "out_dtype": CODES[out_dtype]},
                name="qconv", domain="kiln")


CONV_CASES = [
    # (N, C, H, W, K, (kh, kw), strides, pads, dilations, x, out, bias, z, act, act_before_add)
    (1, 3, 9, 7, 5, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), torch.uint8, torch.uint8, True, None, "Relu", 0),
    (2, 17, 7, 8, 5, (3, 3), (2, 2), (0, 1, 1, 0), (1, 1), torch.int8, torch.int8, True, torch.int8, "Relu", 0),
    (1, 17, 6, 9, 12, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), torch.uint8, torch.float16, True, torch.float32, "Relu", 1),
    (2, 8, 9, 9, 16, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), torch.int8, torch.float32, True, torch.float32,
     "LeakyRelu", 0),
    (1, 40, 5, 5, 12, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), torch.uint8, torch.int8, False, torch.uint8, "", 1),
    (1, 9, 8, 7, 7, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), torch.int8, torch.uint8, True, torch.int8, "Relu", 1),
    (2, 5, 7, 9, 6, (1, 3), (2, 1), (0, 2, 1, 0), (1, 2), torch.uint8, torch.int8, True, None, "Clip", 0),
]


def _conv_case(case, seed: int, x_zp: int | None = None, a_dtype: torch.dtype | None = None):
    n, c, h, w, k, ks, st, pads, dil, x_dt, out_dt, has_b, z_dt, act, order = case
    g = np.random.default_rng(seed)
    x = _rand_int(g, (n, c, h, w), x_dt)
    wt = _rand_int(g, (k, c, *ks), torch.int8)
    p = _quant_params(g, k, x_dt, per_channel=seed % 2 == 0)
    if x_zp is not None:
        p["x_zero_point"] = x_zp
    p.update(strides=list(st), pads=list(pads), dilations=list(dil), group=1, kernel_shape=list(ks),
             activation=act, act_before_add=order, alpha=0.25 if act == "LeakyRelu" else -1.5,
             beta=0.0 if act == "LeakyRelu" else 6.25)
    b = (g.integers(-64, 65, size=k) * 2.0 ** -3).astype(np.float32) if has_b else None
    acc = oracle_conv_acc(x, wt, p["x_zero_point"], st, pads, dil)
    z = None
    if z_dt is not None:
        if z_dt in RANGES:
            z = _rand_int(g, acc.shape, z_dt)
            p.update(z_scale=2.0 ** -3, z_zero_point=int(g.integers(*RANGES[z_dt])))
        else:
            z = (g.integers(-512, 513, size=acc.shape) * 2.0 ** -5).astype(NP[z_dt])
    v0 = oracle_epilogue(acc, 1, p, b, None)
    if a_dtype is not None:
        p.update(_a_params(g, v0, a_dtype))
    p.update(y_scale=_pow2_y(v0), y_zero_point=int(g.integers(*RANGES[out_dt])) if out_dt in RANGES else 0)
    want = oracle_store(oracle_epilogue(acc, 1, p, b, z), p, out_dt)
    node = qconv_node(x.shape, x_dt, torch.from_numpy(wt), None if b is None else torch.from_numpy(b),
                      None if z is None else acc.shape, z_dt, acc.shape, out_dt, p)
    xt = torch.from_numpy(x).to(DEV).contiguous(memory_format=torch.channels_last)
    zt = None if z is None else torch.from_numpy(z).to(DEV)
    return node, xt, zt, want


def _run(tactic_id: str, node: Node, args: list, cfg: dict, out=None) -> torch.Tensor:
    t = get_tactic(tactic_id)
    assert t is not None and t.supports(node, _ctx()), f"{tactic_id} should support this {node.op_type}"
    kern = t.make(node, cfg, DEV)
    return kern(*args) if out is None else kern(*args, out=out)


def _assert_exact(got: torch.Tensor, want: np.ndarray, what: str) -> None:
    assert tuple(got.shape) == want.shape and NP[got.dtype] == want.dtype.type, what
    g = got.cpu().numpy()
    bad = np.argwhere(g != want)
    assert bad.size == 0, f"{what}: {len(bad)} of {want.size} differ, first at {bad[0].tolist()}: " \
                          f"{g[tuple(bad[0])]} != {want[tuple(bad[0])]}"


@pytest.mark.parametrize("idx", range(len(CONV_CASES)))
def test_qconv_bit_exact(idx: int) -> None:
    node, x, z, want = _conv_case(CONV_CASES[idx], idx)
    cfgs = get_tactic("cuda.triton_qconv").configs(node, _ctx())
    assert cfgs
    for cfg in cfgs[:2]:
        got = _run("cuda.triton_qconv", node, [x, None, None, z], cfg)
        assert got.is_contiguous(memory_format=torch.channels_last)
        _assert_exact(got, want, f"case {idx} {cfg}")


def test_qconv_matches_the_op_reference() -> None:
    """The oracle here and kiln.ops.qlayers' QConv agree on the exact data (the spec is one)."""
    for idx in (1, 2, 4):
        node, x, z, want = _conv_case(CONV_CASES[idx], idx)
        ref = lookup("QConv", "kiln").compute(node, x.cpu(), node.inputs[1].const,
                                              None if node.input(2) is None else node.inputs[2].const,
                                              None if z is None else z.cpu())
        _assert_exact(ref, want, f"reference, case {idx}")


@pytest.mark.parametrize("split", [2, 3])
def test_qconv_split_k_and_nchw_input(split: int) -> None:
    node, x, z, want = _conv_case(CONV_CASES[4], 4)
    cfg = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8, "SPLIT_K": split, "num_warps": 4,
           "num_stages": 3}
    got = _run("cuda.triton_qconv", node, [x.contiguous(), None, None, z], cfg)  # NCHW x: made NHWC first
    _assert_exact(got, want, f"split {split}")


def test_qconv_flat_and_tile_configs() -> None:
    node, x, z, want = _conv_case(CONV_CASES[1], 1)  # C=17: flat and per-tap walks both cover the padding
    for cfg in ({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "FLAT": True},
                {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}):
        got = _run("cuda.triton_qconv", node, [x, None, None, z], {"GROUP_M": 4, **cfg})
        _assert_exact(got, want, str(cfg))


def test_qconv_writes_into_channel_slices() -> None:
    node, x, z, want = _conv_case(CONV_CASES[1], 1)
    n, k, oh, ow = want.shape
    big = torch.zeros((n, k + 6, oh, ow), dtype=torch.int8, device=DEV).contiguous(memory_format=torch.channels_last)
    big2 = torch.zeros_like(big)
    cfg = get_tactic("cuda.triton_qconv").configs(node, _ctx())[0]
    got = _run("cuda.triton_qconv", node, [x, None, None, z], cfg, out=(big[:, 2:2 + k], big2[:, 4:4 + k]))
    assert got.data_ptr() == big[:, 2:2 + k].data_ptr()
    _assert_exact(big[:, 2:2 + k], want, "first destination")
    _assert_exact(big2[:, 4:4 + k], want, "second destination")
    assert not big[:, :2].any() and not big[:, 2 + k:].any(), "wrote outside its channel slice"
    nchw = torch.empty(want.shape, dtype=torch.int8, device=DEV)  # not NHWC: written through a copy
    _run("cuda.triton_qconv", node, [x, None, None, z], cfg, out=nchw)
    _assert_exact(nchw, want, "NCHW destination")


def test_qconv_general_scales_within_one_step() -> None:
    g = np.random.default_rng(11)
    n, c, h, w, k = 2, 19, 6, 7, 10
    x = _rand_int(g, (n, c, h, w), torch.uint8)
    wt = _rand_int(g, (k, c, 3, 3), torch.int8)
    zq = _rand_int(g, (n, k, h, w), torch.int8)
    p = {"x_scale": 0.0173, "x_zero_point": 131, "w_scales": list(g.uniform(0.001, 0.004, size=k)),
         "strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1], "group": 1, "kernel_shape": [3, 3],
         "activation": "SiLU", "act_before_add": 1, "z_scale": 0.031, "z_zero_point": -7, "y_scale": 0.37,
         "y_zero_point": 3}
    b = g.normal(size=k).astype(np.float32)
    node = qconv_node(x.shape, torch.uint8, torch.from_numpy(wt), torch.from_numpy(b), zq.shape, torch.int8,
                      zq.shape, torch.int8, p)
    args = [torch.from_numpy(x), None, None, torch.from_numpy(zq)]
    want = lookup("QConv", "kiln").compute(node, args[0], node.inputs[1].const, node.inputs[2].const, args[3])
    got = _run("cuda.triton_qconv", node, [a if a is None else a.to(DEV) for a in args],
               get_tactic("cuda.triton_qconv").configs(node, _ctx())[0])
    diff = (got.cpu().to(torch.int32) - want.to(torch.int32)).abs()
    assert diff.max() <= 1, f"max difference {int(diff.max())} steps"
    assert (diff == 0).float().mean() > 0.95, "most values should agree exactly"
    assert want.float().std() > 5, "the test data should spread over the range"


def test_qconv_declines_grouped_and_rejects_other_input_type() -> None:
    t = get_tactic("cuda.triton_qconv")
    node, x, z, _ = _conv_case(CONV_CASES[1], 1)
    node.attrs["group"] = 17
    assert not t.supports(node, _ctx()), "grouped (depthwise) convolutions stay on another path"
    node2, x2, z2, _ = _conv_case(CONV_CASES[1], 1)
    kern = t.make(node2, t.configs(node2, _ctx())[0], DEV)
    with pytest.raises(KilnError, match="int8"):
        kern(x2.to(torch.uint8), None, None, z2)


# ---- specializations: EVEN_K (C % BLOCK_K == 0), PAD_ZERO (zero fill), ROWS (stem window rows) -----------

EVEN_CASES = [
    # 64 channels: EVEN_K for BLOCK_K 32 and 64; (x zero point, whether the padded value may be a zero fill)
    ((2, 64, 6, 7, 48, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), torch.int8, torch.int8, True, torch.int8, "Relu", 0),
     0, True),
    ((2, 64, 7, 6, 40, (3, 3), (2, 2), (1, 0, 1, 1), (1, 1), torch.int8, torch.int8, True, None, "Relu", 0),
     -37, False),
    ((1, 64, 6, 6, 24, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), torch.uint8, torch.float16, False, torch.float32,
      "LeakyRelu", 1), 141, False),
    ((2, 128, 5, 6, 72, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), torch.int8, torch.uint8, True, torch.int8, "Relu", 1),
     23, True),
    ((2, 64, 7, 7, 40, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), torch.uint8, torch.int8, True, None, "", 0), 200, True),
]


@pytest.mark.parametrize("idx", range(len(EVEN_CASES)))
def test_qconv_even_k_and_zero_fill_bit_exact(idx: int) -> None:
    from kiln.backends.cuda.triton_qconv import _qconv_mode
    from kiln.backends.cuda.triton_qlayers import quant_epilogue
    from kiln.ops.conv import ConvGeometry
    case, x_zp, zero_fill = EVEN_CASES[idx]
    node, x, z, want = _conv_case(case, 50 + idx, x_zp=x_zp)
    geo = ConvGeometry.of(node)
    qe = quant_epilogue(node, torch.zeros((case[4], 1), dtype=torch.int8, device=DEV), DEV)
    cfgs = [{"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64},
            {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "SPLIT_K": 2},
            {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 128}]  # 128 > C=64: the masked channel tail
    for cfg in cfgs:
        mode = _qconv_mode(x, geo, qe, cfg)  # the specializations this launch compiles
        assert mode["EVEN_K"] == (case[1] % cfg["BLOCK_K"] == 0) and mode["PAD_ZERO"] == zero_fill, mode
        got = _run("cuda.triton_qconv", node, [x, None, None, z], {"GROUP_M": 4, **cfg})
        _assert_exact(got, want, f"case {idx} {cfg}")


def test_qconv_level3_configs_lead_with_wide_tiles() -> None:
    """A ResNet-sized layer gets the 128-deep tiles of two warpgroups first; every tile fits shared memory."""
    from kiln.backends.cuda.triton_qconv import QTILES, qtile_configs
    cfgs = qtile_configs(256 * 28 * 28, 512, 128, 3, 128)
    assert (cfgs[0]["BLOCK_M"], cfgs[0]["BLOCK_N"], cfgs[0]["BLOCK_K"], cfgs[0]["num_warps"]) == (128, 128, 128, 8)
    assert any(c["BLOCK_N"] == 256 for c in cfgs) and len(cfgs) == 5
    narrow = qtile_configs(256 * 56 * 56, 64, 64, 2, 576)  # 64 channels in and out: BLOCK_K 64, BLOCK_N 64
    assert narrow and all(c["BLOCK_K"] == 64 and c["BLOCK_N"] == 64 for c in narrow)
    assert narrow[0]["BLOCK_M"] >= 128
    for bm, bn, bk, warps, stages in QTILES:
        assert (bm + bn) * bk * stages <= 200 * 1024, (bm, bn, bk, stages)
        assert bm < 64 or warps % 4 == 0, "wgmma needs whole warpgroups"


def test_pack_qconv_weight_rows_layout() -> None:
    from kiln.backends.cuda.triton_qconv import pack_qconv_weight
    g = np.random.default_rng(3)
    w = _rand_int(g, (5, 3, 7, 7), torch.int8)
    got = pack_qconv_weight(torch.from_numpy(w), {"ROWS": True, "BLOCK_K": 32}).numpy()
    want = np.zeros((5, 7, 32), np.int8)
    want[:, :, :21] = w.transpose(0, 2, 3, 1).reshape(5, 7, 21)
    assert np.array_equal(got, want.reshape(5, 7 * 32))
    plain = pack_qconv_weight(torch.from_numpy(w), {"BLOCK_K": 32}).numpy()
    assert np.array_equal(plain, w.transpose(0, 2, 3, 1).reshape(5, 147))


STEM_CASES = [
    # the ResNet stem's window (7x7, stride 2, pad 3) on 3 channels; a 3x3 on 4; one dilated in H only
    ((2, 3, 13, 11, 16, (7, 7), (2, 2), (3, 3, 3, 3), (1, 1), torch.int8, torch.int8, True, None, "Relu", 0), 0),
    ((2, 3, 13, 11, 16, (7, 7), (2, 2), (3, 3, 2, 3), (1, 1), torch.int8, torch.int8, True, torch.int8, "Relu", 0),
     -9),
    ((1, 4, 9, 10, 40, (3, 3), (1, 1), (1, 1, 1, 1), (2, 1), torch.uint8, torch.uint8, True, None, "Relu", 0), 117),
]


@pytest.mark.parametrize("idx", range(len(STEM_CASES)))
def test_qconv_rows_stem_bit_exact(idx: int) -> None:
    case, x_zp = STEM_CASES[idx]
    node, x, z, want = _conv_case(case, 70 + idx, x_zp=x_zp)
    cfgs = get_tactic("cuda.triton_qconv").configs(node, _ctx(2))
    rows = [c for c in cfgs if c.get("ROWS")]
    strided = case[6] != (1, 1)
    assert rows and cfgs[0].get("S2D" if strided else "ROWS"), "stems try space-to-depth (strided), then window rows"
    for cfg in rows[:2] + [{**rows[0], "BLOCK_M": 32, "SPLIT_K": 3}]:
        _assert_exact(_run("cuda.triton_qconv", node, [x, None, None, z], cfg), want, f"case {idx} {cfg}")
    c = case[1]
    wide = torch.zeros((x.shape[0], c + 5, x.shape[2], x.shape[3]), dtype=x.dtype,
                       device=DEV).contiguous(memory_format=torch.channels_last)
    wide[:, 2:2 + c] = x
    _assert_exact(_run("cuda.triton_qconv", node, [wide[:, 2:2 + c], None, None, z], rows[0]), want,
                  "ROWS on a channel slice (read through a dense copy)")


S2D_CASES = [
    # the ResNet stem (7x7 / 2, pad 3) zero point 0 and -9 with asymmetric pads and an int8 residual (STEM_CASES),
    # YOLO's 3x3 / 2 stem on uint8 with odd sizes, a 5x5 / 3 over 3 channels (27 -> 32: no channel tail) into
    # float16 with a float residual, an 8x8 / 4 over one channel, and a 2x2 / 2 without padding
    (STEM_CASES[0][0], 0),
    (STEM_CASES[1][0], -9),
    ((2, 3, 13, 10, 24, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), torch.uint8, torch.uint8, True, None, "Relu", 0), 117),
    ((1, 3, 17, 14, 12, (5, 5), (3, 3), (2, 1, 0, 2), (1, 1), torch.int8, torch.float16, True, torch.float32, "Clip",
      1), 5),
    ((1, 1, 19, 21, 8, (8, 8), (4, 4), (3, 2, 3, 2), (1, 1), torch.uint8, torch.int8, False, None, "", 0), 200),
    ((2, 4, 8, 6, 16, (2, 2), (2, 2), (0, 0, 0, 0), (1, 1), torch.int8, torch.int8, True, torch.uint8, "Relu", 0),
     None),
]


@pytest.mark.parametrize("idx", range(len(S2D_CASES)))
def test_qconv_s2d_bit_exact(idx: int) -> None:
    """Config S2D (a strided conv over few channels as a stride-1 conv over its space-to-depth image, through the
    TAPS kernel): exact against the int64 oracle for every window, zero point, padding and epilogue, from a channel
    slice and into two destinations."""
    from kiln.backends.cuda.triton_qstem import S2DPlan
    case, x_zp = S2D_CASES[idx]
    node, x, z, want = _conv_case(case, 90 + idx, x_zp=x_zp)
    cfgs = get_tactic("cuda.triton_qconv").configs(node, _ctx(2))
    s2d = [c for c in cfgs if c.get("S2D")]
    assert s2d and cfgs[0].get("S2D"), "strided stems try space-to-depth first"
    plan = S2DPlan.of(case[1], ConvGeometry.of(node))
    assert plan is not None and plan.row % 4 == 0
    n, c, h, w = x.shape
    wide = torch.zeros((n, c + 5, h, w), dtype=x.dtype, device=DEV).contiguous(memory_format=torch.channels_last)
    wide[:, 3:3 + c] = x
    for cfg in (s2d[0], {**s2d[0], "BLOCK_M": 32, "BLOCK_N": 16}):
        for what, xin in (("dense", x), ("channel slice", wide[:, 3:3 + c]), ("NCHW", x.contiguous())):
            _assert_exact(_run("cuda.triton_qconv", node, [xin, None, None, z], cfg), want, f"{what} {cfg}")
    _check_two_destinations(node, x, z, want, {**s2d[0], "BLOCK_M": 32, "BLOCK_N": 16})


def test_s2d_plan_geometry_and_refusals() -> None:
    """The plan of ResNet-50's stem (a 4x4 conv over 12 -> 16 channels, begin pad 2) and of YOLO's (2x2, pad 1);
    no plan for stride 1, unequal strides, dilation, groups or too many channels."""
    from kiln.backends.cuda.triton_qstem import S2DPlan

    def geo(k, s, p, d=(1, 1), g=1):
        return ConvGeometry(s, p, d, g, k)
    stem = S2DPlan.of(3, geo((7, 7), (2, 2), (3, 3, 3, 3)))
    assert stem is not None and (stem.kh2, stem.kw2, stem.cp, stem.ph2, stem.pw2, stem.row) == (4, 4, 16, 2, 2, 64)
    yolo = S2DPlan.of(3, geo((3, 3), (2, 2), (1, 1, 1, 1)))
    assert yolo is not None and (yolo.kh2, yolo.kw2, yolo.ph2, yolo.row) == (2, 2, 1, 32)
    assert S2DPlan.of(3, geo((3, 3), (1, 1), (1, 1, 1, 1))) is None
    assert S2DPlan.of(3, geo((3, 3), (2, 1), (1, 1, 1, 1))) is None
    assert S2DPlan.of(3, geo((3, 3), (2, 2), (1, 1, 1, 1), (2, 2))) is None
    assert S2DPlan.of(4, geo((3, 3), (2, 2), (1, 1, 1, 1), g=2)) is None
    assert S2DPlan.of(16, geo((3, 3), (2, 2), (1, 1, 1, 1))) is None
    node, _, _, _ = _conv_case(CONV_CASES[0], 1)  # stride 1: a config S2D is refused at build
    with pytest.raises(KilnError, match="S2D"):
        get_tactic("cuda.triton_qconv").make(node, {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32, "S2D": True}, DEV)


def test_qconv_rows_refused_where_it_does_not_fit() -> None:
    node, _, _, _ = _conv_case(CONV_CASES[1], 1)  # C=17, 3x3: a row is 51 values
    t = get_tactic("cuda.triton_qconv")
    with pytest.raises(KilnError, match="ROWS"):
        t.make(node, {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "ROWS": True}, DEV)
    dil, _, _, _ = _conv_case(CONV_CASES[3], 3)  # dilated in W: window rows are not contiguous
    assert not any(c.get("ROWS") for c in t.configs(dil, _ctx(4)))


# ---- QGemm --------------------------------------------------------------------------------------------

def qgemm_node(a_shape, a_dtype, w, b, z_dtype, out_shape, out_dtype, attrs: dict) -> Node:
    ins = [_val("a", shape=a_shape, dtype=a_dtype), _val("w", w), None if b is None else _val("b", b),
           None if z_dtype is None else _val("z", shape=out_shape, dtype=z_dtype)]
    while ins and ins[-1] is None:
        ins.pop()
    return Node("QGemm", ins, [_val("y", shape=out_shape, dtype=out_dtype)], {**attrs, "out_dtype": CODES[out_dtype]},
                name="qgemm", domain="kiln")


GEMM_CASES = [
    # (leading shape, K, N, a, out, bias, z, act, act_before_add)
    ((37,), 70, 19, torch.int8, torch.int8, True, torch.int8, "Relu", 0),
    ((2, 5), 33, 24, torch.uint8, torch.uint8, True, None, "Relu", 0),
    ((3, 7), 64, 17, torch.uint8, torch.float16, False, torch.float16, "Relu", 1),
    ((41,), 48, 5, torch.int8, torch.float32, True, torch.uint8, "LeakyRelu", 1),
]


def _gemm_case(case, seed: int, a_dtype: torch.dtype | None = None):
    lead, k, n, a_dt, out_dt, has_b, z_dt, act, order = case
    g = np.random.default_rng(100 + seed)
    a = _rand_int(g, (*lead, k), a_dt)
    wt = _rand_int(g, (n, k), torch.int8)
    p = _quant_params(g, n, a_dt, per_channel=seed % 2 == 0)
    p.update(activation=act, act_before_add=order, alpha=0.25)
    b = (g.integers(-64, 65, size=n) * 2.0 ** -3).astype(np.float32) if has_b else None
    acc = (a.astype(np.int64) - p["x_zero_point"]) @ wt.astype(np.int64).T
    z = None
    if z_dt is not None:
        if z_dt in RANGES:
            z = _rand_int(g, acc.shape, z_dt)
            p.update(z_scale=2.0 ** -2, z_zero_point=int(g.integers(*RANGES[z_dt])))
        else:
            z = (g.integers(-512, 513, size=acc.shape) * 2.0 ** -5).astype(NP[z_dt])
    if a_dtype is not None:
        p.update(_a_params(g, oracle_epilogue(acc, acc.ndim - 1, p, b, None), a_dtype))
    p.update(y_scale=_pow2_y(oracle_epilogue(acc, acc.ndim - 1, p, b, None)),
             y_zero_point=int(g.integers(*RANGES[out_dt])) if out_dt in RANGES else 0)
    want = oracle_store(oracle_epilogue(acc, acc.ndim - 1, p, b, z), p, out_dt)
    node = qgemm_node(a.shape, a_dt, torch.from_numpy(wt), None if b is None else torch.from_numpy(b), z_dt,
                      acc.shape, out_dt, p)
    return node, torch.from_numpy(a).to(DEV), None if z is None else torch.from_numpy(z).to(DEV), want


@pytest.mark.parametrize("idx", range(len(GEMM_CASES)))
def test_qgemm_bit_exact(idx: int) -> None:
    node, a, z, want = _gemm_case(GEMM_CASES[idx], idx)
    cfgs = get_tactic("cuda.triton_qgemm").configs(node, _ctx())
    assert cfgs
    extra = [{"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2, "SPLIT_K": 2}]
    for cfg in cfgs[:2] + extra:
        got = _run("cuda.triton_qgemm", node, [a, None, None, z], cfg)
        _assert_exact(got, want, f"case {idx} {cfg}")


def test_qgemm_strided_rows_and_int_mm() -> None:
    node, a, z, want = _gemm_case(GEMM_CASES[0], 0)
    wide = torch.zeros((a.shape[0], a.shape[1] + 9), dtype=a.dtype, device=DEV)
    wide[:, 3:3 + a.shape[1]] = a
    cfg = get_tactic("cuda.triton_qgemm").configs(node, _ctx())[0]
    _assert_exact(_run("cuda.triton_qgemm", node, [wide[:, 3:3 + a.shape[1]], None, None, z], cfg), want,
                  "rows read through a stride")
    # K, N multiples of 8 and M > 16: cuBLASLt's int8 path (torch._int_mm) with the epilogue in torch
    node, a, z, want = _gemm_case(((24,), 64, 24, torch.uint8, torch.int8, True, torch.int8, "Relu", 0), 7)
    _assert_exact(_run("cuda.triton_qgemm", node, [a, None, None, z], {"int_mm": True}), want, "torch._int_mm")


def test_qgemm_general_scales_within_one_step() -> None:
    g = np.random.default_rng(12)
    a = _rand_int(g, (29, 45), torch.int8)
    wt = _rand_int(g, (13, 45), torch.int8)
    p = {"x_scale": 0.021, "x_zero_point": -5, "w_scales": [0.0033], "activation": "GeluTanh", "y_scale": 0.29,
         "y_zero_point": 128}
    b = g.normal(size=13).astype(np.float32)
    node = qgemm_node(a.shape, torch.int8, torch.from_numpy(wt), torch.from_numpy(b), None, (29, 13), torch.uint8, p)
    want = lookup("QGemm", "kiln").compute(node, torch.from_numpy(a), node.inputs[1].const, node.inputs[2].const)
    got = _run("cuda.triton_qgemm", node, [torch.from_numpy(a).to(DEV)],
               get_tactic("cuda.triton_qgemm").configs(node, _ctx())[0])
    diff = (got.cpu().to(torch.int32) - want.to(torch.int32)).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.95
    assert want.float().std() > 5


# ---- a_scale: the layer's own result requantized before the residual add (a fused Q/DQ residual) --------

A_CONV_CASES = [
    # (conv case, a_dtype): int8 residuals, both orders, int8 and uint8 requantization with a zero point
    ((2, 17, 7, 8, 5, (3, 3), (2, 2), (0, 1, 1, 0), (1, 1), torch.int8, torch.int8, True, torch.int8, "Relu", 0),
     torch.int8),
    ((2, 17, 7, 8, 5, (3, 3), (2, 2), (0, 1, 1, 0), (1, 1), torch.int8, torch.int8, True, torch.int8, "Relu", 1),
     torch.uint8),
    ((1, 9, 8, 7, 7, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), torch.uint8, torch.uint8, True, torch.int8, "Relu", 1),
     torch.int8),
    ((2, 8, 9, 9, 16, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), torch.int8, torch.float32, True, torch.int8,
      "LeakyRelu", 0), torch.uint8),
]

A_GEMM_CASES = [
    (((37,), 70, 19, torch.int8, torch.int8, True, torch.int8, "Relu", 0), torch.uint8),
    (((2, 9), 40, 24, torch.uint8, torch.int8, True, torch.int8, "Relu", 1), torch.int8),
    (((41,), 48, 5, torch.int8, torch.float32, True, torch.int8, "LeakyRelu", 1), torch.uint8),
    (((24,), 64, 16, torch.uint8, torch.uint8, False, torch.int8, "", 0), torch.int8),
]


def _no_a_want(node: Node, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    """The op's reference output on the same node with a_scale off."""
    a_scale = node.attrs["a_scale"]
    node.attrs["a_scale"] = 0.0
    try:
        return _reference(node, x, z)
    finally:
        node.attrs["a_scale"] = a_scale


def _reference(node: Node, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    return lookup(node.op_type, "kiln").compute(node, x.cpu(), node.inputs[1].const,
                                                None if node.input(2) is None else node.inputs[2].const,
                                                None if z is None else z.cpu())


@pytest.mark.parametrize("idx", range(len(A_CONV_CASES)))
def test_qconv_a_scale_bit_exact(idx: int) -> None:
    case, a_dtype = A_CONV_CASES[idx]
    node, x, z, want = _conv_case(case, 200 + idx, a_dtype=a_dtype)
    assert node.attrs["a_scale"] > 0 and node.attrs["a_zero_point"] != 0
    _assert_exact(_reference(node, x, z), want, f"op reference, case {idx}")
    assert not np.array_equal(_no_a_want(node, x, z).numpy(), want), "a_scale must matter on the test data"
    cfgs = get_tactic("cuda.triton_qconv").configs(node, _ctx())
    split = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8, "SPLIT_K": 2}
    for cfg in cfgs[:2] + [split]:
        _assert_exact(_run("cuda.triton_qconv", node, [x, None, None, z], cfg), want, f"case {idx} {cfg}")


@pytest.mark.parametrize("idx", range(len(A_GEMM_CASES)))
def test_qgemm_a_scale_bit_exact(idx: int) -> None:
    case, a_dtype = A_GEMM_CASES[idx]
    node, a, z, want = _gemm_case(case, 200 + idx, a_dtype=a_dtype)
    assert node.attrs["a_scale"] > 0 and node.attrs["a_zero_point"] != 0
    _assert_exact(_reference(node, a, z), want, f"op reference, case {idx}")
    assert not np.array_equal(_no_a_want(node, a, z).numpy(), want), "a_scale must matter on the test data"
    cfgs = get_tactic("cuda.triton_qgemm").configs(node, _ctx())
    extra = [{"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2, "SPLIT_K": 2}]
    for cfg in cfgs[:2] + extra:
        _assert_exact(_run("cuda.triton_qgemm", node, [a, None, None, z], cfg), want, f"case {idx} {cfg}")
    if case[0][-1] > 16 and case[1] % 8 == 0 and case[2] % 8 == 0 and len(case[0]) == 1:
        _assert_exact(_run("cuda.triton_qgemm", node, [a, None, None, z], {"int_mm": True}), want,
                      f"case {idx} torch._int_mm and the torch epilogue")


LINEAR_CASES = [CONV_CASES[2], EVEN_CASES[3][0],
                (3, 48, 5, 3, 40, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), torch.int8, torch.int8, False, torch.uint8,
                 "Clip", 0),
                CONV_CASES[5],  # stride 2 (a ResNet downsample): input pixels by strides
                (2, 40, 9, 7, 24, (1, 1), (2, 3), (0, 0, 0, 0), (1, 1), torch.uint8, torch.int8, True, torch.float16,
                 "Relu", 0)]


@pytest.mark.parametrize("idx", range(len(LINEAR_CASES)))
def test_qconv_linear_rows_bit_exact(idx: int) -> None:
    """Config LINEAR (an unpadded 1x1 conv, any stride, as a GEMM over pixel rows): exact on dense NHWC input, on a channel slice of a
    wider tensor (row stride > C) and into two channel-sliced destinations; on an input whose pixels are not
    evenly spaced rows (they jump between images) it reads them by pixel strides, still exact. It leads the
    configs of a 1x1 layer."""
    from kiln.backends.cuda.triton_qconv import linear_configs, row_stride
    node, x, z, want = _conv_case(LINEAR_CASES[idx], 80 + idx, x_zp=23 if idx == 1 else None)
    z = None if z is None else z.contiguous(memory_format=torch.channels_last)  # pixel rows, as the runtime's
    n, c, h, w = x.shape
    k = want.shape[1]
    cfgs = get_tactic("cuda.triton_qconv").configs(node, _ctx())
    assert cfgs[0].get("LINEAR") and all(not cf.get("LINEAR") for cf in cfgs[len(linear_configs(k, c)):])
    small = [{"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 4, "LINEAR": True},
             {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2, "LINEAR": True}]
    wide = torch.zeros((n, c + 5, h, w), dtype=x.dtype, device=DEV).contiguous(memory_format=torch.channels_last)
    wide[:, 3:3 + c] = x
    xs = wide[:, 3:3 + c]
    assert row_stride(xs) == c + 5 and row_stride(x) == c
    uneven = torch.zeros((n, c, h + 1, w), dtype=x.dtype, device=DEV).contiguous(memory_format=torch.channels_last)
    uneven[:, :, :h] = x
    xu = uneven[:, :, :h]  # pixel rows jump at each image: not one row stride
    assert n == 1 or row_stride(xu) is None
    assert z is None or row_stride(z) is not None
    for cfg in small:
        for what, xin in (("dense", x), ("channel slice", xs), ("uneven rows", xu)):
            _assert_exact(_run("cuda.triton_qconv", node, [xin, None, None, z], cfg), want, f"{what} {cfg}")
        _check_two_destinations(node, x, z, want, cfg)


def want_dtype(want: np.ndarray) -> torch.dtype:
    return {v: k for k, v in NP.items()}[want.dtype.type]


TAPS_CASES = [(EVEN_CASES[0][0], 0), (EVEN_CASES[1][0], -37), (EVEN_CASES[2][0], 141), (CONV_CASES[4], None),
              (CONV_CASES[6], None), (CONV_CASES[1], None)]


@pytest.mark.parametrize("idx", range(len(TAPS_CASES)))
def test_qconv_taps_bit_exact(idx: int) -> None:
    """Config TAPS (geometry, channels and epilogue compiled in; a pipelined tap loop): exact
    with padding by a zero or a non-zero zero point, strides, dilations, asymmetric pads, a channel tail
    (C not a multiple of the channel block), uint8 input, integer and float residuals, from a channel slice of a
    wider tensor and into two channel-sliced destinations. It leads the configs of a KxK layer of >= 32 channels."""
    from kiln.backends.cuda.triton_qconv import taps_configs
    case, x_zp = TAPS_CASES[idx]
    node, x, z, want = _conv_case(case, 120 + idx, x_zp=x_zp)
    n, c, h, w = x.shape
    k = want.shape[1]
    cfgs = get_tactic("cuda.triton_qconv").configs(node, _ctx())
    n_taps = len(taps_configs(k, c))
    assert all(cf.get("TAPS") for cf in cfgs[:n_taps]) == (c >= 32)
    assert not any(cf.get("TAPS") for cf in cfgs[n_taps if c >= 32 else 0:])
    wide = torch.zeros((n, c + 5, h, w), dtype=x.dtype, device=DEV).contiguous(memory_format=torch.channels_last)
    wide[:, 3:3 + c] = x
    for bk in (32, 64):
        cfg = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": bk, "GROUP_M": 4, "TAPS": True}
        for what, xin in (("dense", x), ("channel slice", wide[:, 3:3 + c])):
            _assert_exact(_run("cuda.triton_qconv", node, [xin, None, None, z], cfg), want, f"{what} {cfg}")
        _check_two_destinations(node, x, z, want, cfg)


def _check_two_destinations(node: Node, x: torch.Tensor, z, want: np.ndarray, cfg: dict) -> None:
    """The conv written into channel slices of two wider tensors: exact in both, nothing outside the slice."""
    n, k = want.shape[:2]
    big = torch.zeros((n, k + 6, *want.shape[2:]), dtype=want_dtype(want), device=DEV).contiguous(
        memory_format=torch.channels_last)
    big2 = torch.zeros_like(big)
    _run("cuda.triton_qconv", node, [x, None, None, z], cfg, out=(big[:, 2:2 + k], big2[:, 4:4 + k]))
    _assert_exact(big[:, 2:2 + k], want, f"first destination {cfg}")
    _assert_exact(big2[:, 4:4 + k], want, f"second destination {cfg}")
    assert not big[:, :2].any() and not big[:, 2 + k:].any(), "wrote outside its channel slice"
