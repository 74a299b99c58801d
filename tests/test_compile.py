"""The public ops under torch.compile(fullgraph=True) give the same results as eager."""
import pytest
import torch

import swm_fused
from swm_fused import dispatch
from _helpers import bits, random_tensor

pytestmark = pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile is unavailable")


def all_ops(avg, sq, src, found_inf):
    swm_fused.ema_(avg, src, 0.9, found_inf=found_inf)
    swm_fused.swa_(avg, src, 3)
    swm_fused.swag_(avg, sq, src, 2, found_inf=found_inf)
    swm_fused.merge_(sq, [avg, src, sq], [0.5, -0.25, 0.75])
    swm_fused.ema_multi_([avg, sq], src, [0.25, 0.125], found_inf=found_inf)
    return swm_fused.any_nonfinite(avg + sq)


@pytest.mark.parametrize("skip_step", [False, True])
@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
def test_public_ops_compile_with_fullgraph_and_match_eager(monkeypatch, backend, skip_step):
    if backend != "auto" and dispatch.backend_status()[backend]:
        pytest.skip(f"{backend}: {dispatch.backend_status()[backend]}")
    if backend != "auto":
        monkeypatch.setenv("SWM_FUSED_BACKEND", backend)  # under compile only the environment variable counts
    torch._dynamo.reset()
    shapes = [(17,), (3, 5)]
    avg = [random_tensor(s, torch.float32) for s in shapes]
    sq = [random_tensor(s, torch.float32).abs() for s in shapes]
    src = [random_tensor(s, torch.bfloat16) for s in shapes]
    found_inf = torch.tensor(float(skip_step))
    eager = ([t.clone() for t in avg], [t.clone() for t in sq])
    compiled = ([t.clone() for t in avg], [t.clone() for t in sq])
    flag_eager = all_ops(*eager, src, found_inf)
    flag_compiled = torch.compile(all_ops, fullgraph=True, backend="aot_eager")(*compiled, src, found_inf)
    assert flag_eager.item() == flag_compiled.item()
    for e, c in zip(eager[0] + eager[1], compiled[0] + compiled[1]):
        assert torch.equal(bits(e), bits(c))
