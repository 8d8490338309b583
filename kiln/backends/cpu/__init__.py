"""CPU tactics (oneDNN through torch): fused convolutions and linear layers with prepacked weights,
channels-last pooling and resizing, constant slices as views, generated pointwise programs; `runtime` holds the CPU runtime
settings (threads, heap retention)."""
from kiln.backends.cpu import conv, gemm, pointwise, pool, resize, slicing  # noqa: F401
