"""llmcq-kernels: weight-only matmul reading the mixpack layout (Triton on CUDA, torch reference elsewhere)."""
