"""``cpu.fp8_gemm``: FP8 layers (QGemm, 1x1 QConv on float8_e4m3fn; kiln.backends.fp8) on a CPU without FP8
arithmetic: the float8 weights are converted to float32 once (exactly), each call converts X's float8 rows to
float32 (exactly) and runs one float32 matrix product, then the shared torch epilogue (float8 output quantized
as ONNX does). The result is the FP8 model's arithmetic, with no FP8 speed-up: the builder says so.

torch's CPU ``torch._scaled_mm`` takes float8 operands too, but cuda.fp8_gemm's kernel built on it is 2-3x slower
than this one (2-core VM, medians: 0.32 vs 0.10 ms at M,K,N = 8,256,256; 3.9 vs 1.9 ms at 128,768,768; 17.7 vs
9.4 ms at 128,768,3072; a float32 linear + ReLU of the same shapes: 0.04, 1.3, 7.8 ms).
"""
from __future__ import annotations

from typing import Any

import torch

from kiln.backends.cpu.common import CpuTactic
from kiln.backends.fp8 import fp8_gemm_ok, fp8_kernel, prepare
from kiln.backends.tactic import Built, register_tactic
from kiln.ir.graph import Node

Tensor = torch.Tensor


class CpuFp8Gemm(CpuTactic):
    """FP8 QGemm / 1x1 QConv as float32 products of the exactly converted float8 operands (module doc)."""

    id = "cpu.fp8_gemm"
    priority = 12
    ops = (("kiln", "QGemm"), ("kiln", "QConv"))

    def accepts(self, node: Node) -> bool:
        return fp8_gemm_ok(node)

    def build(self, node: Node, config: dict[str, Any], device: torch.device) -> Built:
        w = node.inputs[1].const
        assert w is not None  # fp8_gemm_ok checked it
        wt = w.reshape(w.shape[0], -1).to(device=device, dtype=torch.float32).t().contiguous()  # [K, N]
        epi, _ = prepare(node, device, per_tensor_in_product=False)

        def product(rows: Tensor) -> Tensor:
            return torch.mm(rows.float(), wt)
        return fp8_kernel(node, product, epi)


register_tactic(CpuFp8Gemm())
