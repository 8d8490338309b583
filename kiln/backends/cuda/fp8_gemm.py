"""``cuda.fp8_gemm``: FP8 layers (QGemm, 1x1 QConv on float8_e4m3fn; kiln.backends.fp8) on FP8 tensor cores
through ``torch._scaled_mm`` (cuBLASLt): float8 X rows x float8 weight (column-major, as cuBLASLt wants it) ->
float32 accumulator, the per-tensor multiplier x_scale * w_scale as scale_a; per-channel multipliers, bias,
residual, activation and the float8 output quantize follow as torch ops (not yet fused into the GEMM: cuBLASLt
fuses a bias only into 16-bit outputs, whose rounding the float8 requantize would see twice).

Declines where there are no FP8 tensor cores (compute capability below 8.9), on the CPU (cpu.fp8_gemm), and
where cuBLASLt cannot take the shape: K must be a multiple of 16 (X's rows are not padded per call); N need
not be (the weight is padded to a multiple of 16 once, the padding columns dropped). Configs: fast accumulation
off / on (on Hopper, on skips the periodic promotion of partial sums to float32: faster, less exact; the
autotuner's reference check guards it).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kiln.backends.fp8 import fp8_gemm_ok, fp8_kernel, prepare
from kiln.backends.tactic import Built, Tactic, TacticContext, register_tactic
from kiln.ir.graph import Node

Tensor = torch.Tensor
MIN_CAPABILITY = (8, 9)


def has_fp8_tensor_cores(device: torch.device) -> bool:
    """Whether `device` is a CUDA GPU with FP8 tensor cores (Ada, Hopper and later) and torch has _scaled_mm."""
    if device.type != "cuda" or not torch.cuda.is_available() or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


def scaled_mm_product(w: Tensor, scale: Tensor, fast_accum: bool) -> Any:
    """rows [M, K] float8 -> float32 [M, N] = scale * (rows @ w^T) through torch._scaled_mm, for a float8 weight
    w [N, K] and a scalar float32 `scale` on w's device (padding w's rows to a multiple of 16 and dropping them)."""
    n_out = int(w.shape[0])
    pad = -n_out % 16
    wt = (F.pad(w.float(), (0, 0, 0, pad)).to(w.dtype) if pad else w).t()  # [K, N16], column-major
    one = torch.ones((), dtype=torch.float32, device=w.device)

    def product(rows: Tensor) -> Tensor:
        acc = torch._scaled_mm(rows.contiguous(), wt, scale_a=scale, scale_b=one, out_dtype=torch.float32,
                               use_fast_accum=fast_accum)
        return acc[:, :n_out] if pad else acc
    return product


class CudaFp8Gemm(Tactic):
    """FP8 QGemm / 1x1 QConv on torch._scaled_mm with a torch epilogue (module doc)."""

    id = "cuda.fp8_gemm"
    devices = ("cuda",)
    priority = 35

    def supports(self, node: Node, ctx: TacticContext) -> bool:
        if node.domain != "kiln" or node.op_type not in ("QGemm", "QConv") or not fp8_gemm_ok(node):
            return False
        w = node.inputs[1].const
        return int(w.shape[1]) % 16 == 0 and has_fp8_tensor_cores(ctx.device)  # type: ignore[union-attr]

    def configs(self, node: Node, ctx: TacticContext) -> list[dict[str, Any]]:
        return [{"fast_accum": False}, {"fast_accum": True}]

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        w = node.inputs[1].const
        w2 = w.reshape(w.shape[0], -1).to(device).contiguous()  # type: ignore[union-attr]  # [N, K]
        epi, scale = prepare(node, device, per_tensor_in_product=True)
        s = scale if scale.dim() == 0 else torch.ones((), dtype=torch.float32, device=device)
        return fp8_kernel(node, scaled_mm_product(w2, s, bool(config.get("fast_accum", False))), epi)


register_tactic(CudaFp8Gemm())
