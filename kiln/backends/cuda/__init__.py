"""CUDA tactics: cuDNN/cuBLAS through torch, and Triton kernels (registered only when triton imports).

| tactic id                 | layers                                   | what                                      |
|---------------------------|------------------------------------------|-------------------------------------------|
| cuda.cudnn_conv           | Conv, FusedConv (2-D)                    | cuDNN conv; torch or one-pass Triton epi. |
| cuda.cudnn_fused_conv     | FusedConv with Relu (optional residual)  | cuDNN conv+bias(+add)+ReLU in one call    |
| cuda.conv1x1_gemm         | 1x1 stride-1 and patch (kernel = stride) | cuBLASLt GEMM over NHWC rows / patches    |
| cuda.cublas_gemm          | FusedGemm, MatMul by a constant          | cuBLASLt with bias (+ReLU/GELU) epilogue  |
| cuda.triton_conv          | Conv, FusedConv (2-D, ungrouped)         | implicit-GEMM conv, fused epilogue        |
| cuda.triton_dwconv        | Conv, FusedConv (2-D, depthwise),        | NHWC direct conv per tap (pixel runs or   |
|                           | FusedConvNorm                            | row-reuse tiles), fused epilogue (+ channel|
|                           |                                          | LayerNorm: 1 launch, or 2 with Triton or  |
|                           |                                          | cuDNN conv first)                         |
| cuda.triton_gemm          | FusedGemm, MatMul by a constant, 1x1 conv| Triton GEMM, fused epilogue               |
| cuda.triton_pointwise     | Pointwise                                | generated one-pass kernel                 |
| cuda.triton_maxpool/resize| MaxPool, nearest Resize/Upsample (2-D)   | NHWC tiles, any strides, writes into out= |
| cuda.triton_layernorm     | LayerNormalization (Y only)              | row tiles, fp32 statistics, strided rows; |
|                           |                                          | column tiles for channels-first rows      |
| cuda.triton_global_avgpool| GlobalAveragePool, ReduceMean over H, W  | NHWC tiles, any strides, split over pixels|
| cuda.triton_se_gate       | SEGate (squeeze-excite gate)             | pool + two matvecs, one or two phases     |
| cuda.triton_attention     | Attention (4-D, no KV cache)             | flash attention, masks, causal, GQA       |
| cuda.triton_qconv         | QConv (2-D, ungrouped)                   | int8 implicit-GEMM conv, requantizing epi.|
| cuda.triton_qgemm         | QGemm                                    | int8 GEMM (or torch._int_mm), same epil.  |
| cuda.triton_qdq           | QuantizeLinear, DequantizeLinear (8-bit) | one strided pass, NCHW float -> NHWC int8 |
| cuda.fp8_gemm             | FP8 QGemm, 1x1 QConv (float8 e4m3, 8.9+) | torch._scaled_mm, torch epilogue          |
| cuda.triton_gather        | Gather (any element type)                | one launch, negative indices in-kernel    |
| cuda.channel_shuffle      | ChannelShuffle                           | one torch copy into the NHWC destination  |
| cuda.triton_yolo_decode   | YoloDecode (kiln.plugins)                | one launch per head, any input strides    |
| cuda.triton_batched_nms   | BatchedNMS (kiln.plugins)                | greedy NMS kernel, no host round trip     |
| cuda.triton_nms           | NonMaxSuppression                        | the same greedy kernel per (batch, class) |
| view.slice / view.gather  | constant Slice, Gather of a constant run | a view, no kernel (kiln.backends.views)   |
| ref                       | everything else (pool, resize, concat..) | the op's torch reference on the GPU       |
"""
from __future__ import annotations

from kiln.backends.cuda import cublas_gemm, cudnn_conv, fp8_gemm, shuffle  # noqa: F401


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


HAVE_TRITON = _triton_available()

if HAVE_TRITON:
    from kiln.backends.cuda import (  # noqa: F401
        triton_attention, triton_conv, triton_dwconv, triton_gather, triton_gemm, triton_norm, triton_pointwise,
        triton_pool, triton_qdq, triton_qlayers, triton_reduce, triton_se)
    from kiln.backends.cuda import triton_detect  # noqa: F401  (YoloDecode, BatchedNMS, NonMaxSuppression)
