"""CPU tactics (oneDNN through torch): fused convolutions and linear layers with prepacked weights,
channels-last pooling and resizing, concat, generated pointwise programs; `runtime` holds the CPU runtime
settings (threads, heap retention)."""
from kiln.backends.cpu import concat, conv, conv_dnnl, conv_matmul, conv_winograd, dnnl_layers, gemm, norm, pointwise, pool, resize  # noqa: F401
from kiln.backends.cpu import pointwise_c  # noqa: F401  (cpu.pointwise_c: Pointwise programs as compiled C)
from kiln.backends.cpu import nms  # noqa: F401  (cpu.nms: NonMaxSuppression selection in C)
from kiln.backends.cpu import batched_nms  # noqa: F401  (cpu.batched_nms: BatchedNMS plugin, greedy loop in C)
from kiln.backends.cpu import topk  # noqa: F401  (cpu.topk: TopK by selection in C)
from kiln.backends.cpu import se  # noqa: F401  (cpu.se_gate: squeeze-excite gates in C)
from kiln.backends.cpu import dwconv  # noqa: F401  (cpu.dwconv_c: depthwise convolutions on channels-last views in C)
from kiln.backends.cpu import pad  # noqa: F401  (cpu.pad: Pad with constant amounts, gather indices cached per shape)
from kiln.backends.cpu import reduce  # noqa: F401  (cpu.reduce_short: reductions over one short axis, slice by slice)
from kiln.backends.cpu import signal  # noqa: F401  (cpu.stft: STFT of a real signal as a float32 real FFT)
from kiln.backends.cpu import shuffle  # noqa: F401  (cpu.channel_shuffle: channel shuffles in C)
from kiln.backends.cpu import conv1d  # noqa: F401  (cpu.conv1d_dnnl: 1-D convolutions on oneDNN)
from kiln.backends.cpu import recurrent  # noqa: F401  (cpu.lstm: LSTM as torch's fused LSTM)
from kiln.backends.cpu import qlayers_dnnl  # noqa: F401  (cpu.qconv_dnnl / cpu.qgemm_dnnl: int8 layers on oneDNN)
from kiln.backends.cpu import qdq  # noqa: F401  (cpu.qdq_c: QuantizeLinear / DequantizeLinear in C, NHWC out)
from kiln.backends.cpu import fp8_gemm  # noqa: F401  (cpu.fp8_gemm: FP8 layers as float32 products, no FP8 speed-up)
from kiln.backends.cpu import attention_dnnl  # noqa: F401  (cpu.attention_dnnl: oneDNN matmuls around a C softmax)
