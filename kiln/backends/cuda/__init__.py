"""CUDA tactics (cuDNN/cuBLAS through torch, Triton kernels)."""
