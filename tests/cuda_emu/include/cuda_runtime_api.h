// Shim for <cuda_runtime_api.h>: the CUDA emulation of tests/cuda_emu (see cuda_emu.h).
#pragma once
#include "cuda_emu.h"
