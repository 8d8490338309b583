"""How fast can an int8 1x1 conv be on this GPU? Kiln's int8 conv tactic against a minimal int8 GEMM written
for exactly that case (contiguous NHWC rows, constexpr epilogue: per-channel scale, bias, ReLU, requantize),
cuDNN's FP16 1x1 conv and torch._int_mm, on ResNet-50's 1x1 shapes at batch 256.

    python benchmarks/int8_ceiling.py [--shapes l1.1x1up,l2.1x1up] [--batch 256] [--iters 20]

Timing: CUDA events around `--iters` back-to-back calls (a steady stream, as inside a plan), median of 5.
The minimal kernel's output is checked equal to Kiln's (power-of-two scales: exact). A diagnostic, not a
product path: its numbers say how much of the int8 gap is the kernel and how much is the problem.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _gemm_i8(a_ptr, w_ptr, m_ptr, b_ptr, y_ptr, M, inv_y,
             N: tl.constexpr, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n: tl.constexpr = N // BLOCK_N
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    gsize = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % gsize)
    pid_n = (pid % (GROUP_M * num_n)) // gsize
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in tl.static_range(0, K, BLOCK_K):
        a = tl.load(a_ptr + offs_m[:, None] * K + (k0 + offs_k)[None, :], mask=m_ok[:, None], other=0)
        b = tl.load(w_ptr + offs_n[None, :] * K + (k0 + offs_k)[:, None])
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    v = acc.to(tl.float32) * tl.load(m_ptr + offs_n)[None, :] + tl.load(b_ptr + offs_n)[None, :]
    v = tl.maximum(v, 0.0)
    q = tl.minimum(tl.maximum(v * inv_y, -4194304.0), 4194304.0)
    q = (q + 12582912.0) - 12582912.0
    q = tl.minimum(tl.maximum(q, -128.0), 127.0)
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], q.to(tl.int8), mask=m_ok[:, None])


@triton.jit
def _gemm_i8_tma(a_ptr, w_ptr, m_ptr, b_ptr, y_ptr, M, inv_y,
                 N: tl.constexpr, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, WS: tl.constexpr):
    """Persistent: each program walks tiles NUM_SMS apart; operands and result move by TMA (tensor descriptors), the
    weight K-major (wgmma's int8 layout); the tile loop flattened with the K loop so the pipeliner overlaps the next
    tile's loads with this tile's epilogue."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    y_desc = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    num_m = tl.cdiv(M, BLOCK_M)
    num_n: tl.constexpr = N // BLOCK_N
    tiles = num_m * num_n
    K_TILES: tl.constexpr = K // BLOCK_K
    in_group = GROUP_M * num_n
    for tile in tl.range(tl.program_id(0), tiles, NUM_SMS, flatten=True, warp_specialize=WS):
        group = tile // in_group
        first_m = group * GROUP_M
        gsize = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % gsize)
        pid_n = (tile % in_group) // gsize
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for kt in range(K_TILES):
            a = a_desc.load([pid_m * BLOCK_M, kt * BLOCK_K])
            b = w_desc.load([pid_n * BLOCK_N, kt * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        v = acc.to(tl.float32) * tl.load(m_ptr + offs_n)[None, :] + tl.load(b_ptr + offs_n)[None, :]
        v = tl.maximum(v, 0.0)
        q = tl.minimum(tl.maximum(v * inv_y, -4194304.0), 4194304.0)
        q = (q + 12582912.0) - 12582912.0
        q = tl.minimum(tl.maximum(q, -128.0), 127.0)
        y_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], q.to(tl.int8))


def _tma_scratch(size: int, alignment: int, stream: object) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def steady_ms(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / iters)
    return statistics.median(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="l1.1x1up,l1.1x1down,l2.1x1up,l2.1x1down,l3.1x1up,l3.1x1down,l4.1x1up")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--kiln-configs", type=int, default=8)
    a = ap.parse_args()
    from benchmarks.qconv_sweep import Sweep, parse_args, select_shapes
    sw = Sweep(parse_args(["--batch", str(a.batch), "--level", "4"]), torch.device("cuda"))
    F = torch.nn.functional
    mine = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 64, 64, 4, 4),
            (64, 256, 64, 4, 3), (256, 256, 64, 8, 3), (128, 128, 128, 8, 3), (128, 256, 128, 8, 3)]
    print("| shape | M x N x K | MB moved (int8) | Kiln general kernel ms | Kiln best ms | Kiln cfg | minimal best ms | minimal cfg | "
          "minimal GB/s | cuDNN FP16 ms | torch._int_mm ms | minimal == Kiln |")
    print("|---|---|---:|---:|---:|---|---:|---|---:|---:|---:|---|")
    for _, s in select_shapes(a.shapes):
        p = sw.problem(s)
        node, x = p["node"], p["x"]
        m, n, k = p["m"], s.k, s.c
        mb = (m * k + m * n) / 1e6
        best_k, cfg_k, y_k = float("inf"), "-", None
        best_general = float("inf")
        for cfg in sw.tactic.configs(node, sw.ctx)[: a.kiln_configs]:
            try:
                kern = sw.tactic.make(node, cfg, sw.device)
                t = steady_ms(lambda: kern(x, None, None, None), a.iters)
            except Exception as e:  # noqa: BLE001
                print(f"  kiln {cfg}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
                continue
            if not cfg.get("LINEAR"):
                best_general = min(best_general, t)
            if t < best_k:
                best_k, cfg_k, y_k = t, f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}w{cfg.get('num_warps')}" \
                    + (" LINEAR" if cfg.get("LINEAR") else ""), kern(x, None, None, None)
        a2 = x.permute(0, 2, 3, 1).reshape(m, k)  # channels_last storage: rows of C bytes
        w2 = p["w"].reshape(n, k).to(sw.device).contiguous()
        attrs = node.attrs
        mult = torch.tensor([float(attrs["x_scale"]) * ws for ws in attrs["w_scales"]], dtype=torch.float32,
                            device=sw.device)
        bias = p["bias"].to(sw.device)
        y = torch.empty((m, n), dtype=torch.int8, device=sw.device)
        inv_y = 1.0 / float(attrs["y_scale"])
        best_m, cfg_m = float("inf"), "-"
        ok = "-"
        for bm, bn, bk, warps, stages in mine:
            if bn > n or bk > k:
                continue
            grid = (triton.cdiv(m, bm) * (n // bn),)

            def run(bm=bm, bn=bn, bk=bk, warps=warps, stages=stages, grid=grid):
                _gemm_i8[grid](a2, w2, mult, bias, y, m, inv_y, N=n, K=k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                               GROUP_M=8, num_warps=warps, num_stages=stages)
            try:
                t = steady_ms(run, a.iters)
            except Exception as e:  # noqa: BLE001
                print(f"  minimal {bm}x{bn}x{bk}: {type(e).__name__}: {str(e)[:160]}", file=sys.stderr)
                continue
            if t < best_m:
                best_m, cfg_m = t, f"{bm}x{bn}x{bk}w{warps}s{stages}"
                if y_k is not None:
                    ok = str(bool(torch.equal(y.view(x.shape[0], s.out_hw, s.out_hw, n),
                                              y_k.permute(0, 2, 3, 1))))
        best_t, cfg_t, ok_t = float("inf"), "-", "-"
        triton.set_allocator(_tma_scratch)
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        for bm, bn, bk, warps, stages in mine:
            for ws in (False, True):
                if bn > n or bk > k:
                    continue
                grid = (min(sms, triton.cdiv(m, bm) * (n // bn)),)

                def run_t(bm=bm, bn=bn, bk=bk, warps=warps, stages=stages, grid=grid, ws=ws):
                    _gemm_i8_tma[grid](a2, w2, mult, bias, y, m, inv_y, N=n, K=k, BLOCK_M=bm, BLOCK_N=bn,
                                       BLOCK_K=bk, GROUP_M=8, NUM_SMS=grid[0], WS=ws, num_warps=warps,
                                       num_stages=stages)
                try:
                    y.zero_()
                    t = steady_ms(run_t, a.iters)
                except Exception as e:  # noqa: BLE001
                    print(f"  tma {bm}x{bn}x{bk} ws={ws}: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
                    continue
                if t < best_t:
                    best_t, cfg_t = t, f"{bm}x{bn}x{bk}w{warps}s{stages}" + (" WS" if ws else "")
                    if y_k is not None:
                        ok_t = str(bool(torch.equal(y.view(x.shape[0], s.out_hw, s.out_hw, n),
                                                    y_k.permute(0, 2, 3, 1))))
        print(f"  TMA persistent: {best_t:.3f} ms ({cfg_t}, {mb / 1e3 / (best_t / 1e3):.0f} GB/s, equal {ok_t})",
              flush=True)
        x16, w16, b16 = p["x16"], p["w16"], p["b16"]
        t_cudnn = steady_ms(lambda: F.conv2d(x16, w16, b16), a.iters)
        try:
            t_int = steady_ms(lambda: torch._int_mm(a2, w2.t()), a.iters)
        except Exception:  # noqa: BLE001
            t_int = float("nan")
        gbs = mb / 1e3 / (best_m / 1e3) if best_m < float("inf") else 0
        print(f"| {s.name} | {m} x {n} x {k} | {mb:.0f} | {best_general:.3f} | {best_k:.3f} | {cfg_k} | {best_m:.3f} | {cfg_m} | "
              f"{gbs:.0f} | {t_cudnn:.3f} | {t_int:.3f} | {ok} |", flush=True)
        del p, x, y, a2
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
