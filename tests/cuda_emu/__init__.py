"""Host emulation of swm_fused's CUDA kernels: csrc/cuda compiled for the CPU (see docs/cuda_emulation.md)."""
