// Force-included into csrc/cuda/bindings.cpp's emulated build (tests/cuda_emu): its
// `TORCH_LIBRARY_IMPL(swm_fused, CUDA, m)` registers the same kernels as CPU kernels of the
// `swm_fused_emu` library instead, so they can run on CPU tensors next to the real swm_fused ops.
// torch/library.h is included first (it has #pragma once), so bindings.cpp's own include of it is a
// no-op and cannot restore the original macro. Only the CUDA key is redirected; any other key fails
// to compile (EMU_KEY_<key> undefined) rather than being registered somewhere unexpected.
#pragma once
#include <torch/library.h>

#undef TORCH_LIBRARY_IMPL
#define EMU_KEY_CUDA CPU
#define EMU_TORCH_LIBRARY_IMPL_(key, m) _TORCH_LIBRARY_IMPL(swm_fused_emu, key, m, C10_UID)
#define TORCH_LIBRARY_IMPL(ns, k, m) EMU_TORCH_LIBRARY_IMPL_(EMU_KEY_##k, m)
