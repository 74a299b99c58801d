// Shim for <cuda_fp16.h>: the CUDA emulation of tests/cuda_emu (see cuda_emu.h).
#pragma once
#include "cuda_emu.h"
