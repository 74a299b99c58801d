import os
import random

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when there is no GPU.
# It must be set before triton.jit decorates anything, i.e. before swm_fused.triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Fresh random data in every run; the seed is printed so a failure can be replayed."""
    seed = int(os.environ.get("SWM_FUSED_TEST_SEED", random.randrange(2**31)))
    torch.manual_seed(seed)
    random.seed(seed)
    print(f"seed={seed} (replay with SWM_FUSED_TEST_SEED={seed})")
    yield seed
