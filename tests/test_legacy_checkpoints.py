"""State dicts saved by swm_fused 0.1.0 (before the averaging engine) load into today's front-ends, and the
resumed runs end bit for bit where 0.1.0 ended. tests/data/make_legacy_checkpoints.py wrote the files."""
from __future__ import annotations

import pathlib

import pytest
import torch

from data.make_legacy_checkpoints import builders, make_model, result, set_step, tick, trajectory

DATA = pathlib.Path(__file__).parent / "data"
NAMES = ["averager_ema", "averager_swa", "optim_ema", "optim_swa", "averaged_swa", "averaged_ema", "swag"]


@pytest.mark.parametrize("name", NAMES)
def test_v0_1_0_checkpoint_loads_and_resumes_bit_for_bit(name):
    saved = torch.load(DATA / f"v0_1_0_{name}.pt", weights_only=False)
    assert saved["version"] == "0.1.0"
    traj = trajectory()
    model = make_model()
    obj = builders()[name](model)
    set_step(model, traj, saved["checkpoint_step"])
    obj.load_state_dict(saved["state"])
    for n in range(saved["checkpoint_step"] + 1, saved["steps"] + 1):
        set_step(model, traj, n)
        tick(name, obj, model)
    got = result(name, obj)
    final = saved["final"]
    assert list(got) == final["names"]
    values = torch.cat([v.detach().double().flatten() for v in got.values()])
    assert [tuple(v.shape) for v in got.values()] == [tuple(s) for s in final["shapes"]]
    assert [str(v.dtype) for v in got.values()] == final["dtypes"]
    if name == "averaged_swa":
        # 0.1.0 lerped; the default SWA now runs torch's own formula: it continues exactly as torch's
        # AveragedModel does from the same checkpoint, within a few float32 roundings of 0.1.0's result.
        from torch.optim.swa_utils import AveragedModel as TorchAveragedModel
        model_t = make_model()
        twin = TorchAveragedModel(model_t)
        set_step(model_t, traj, saved["checkpoint_step"])
        twin.load_state_dict(saved["state"])
        for n in range(saved["checkpoint_step"] + 1, saved["steps"] + 1):
            set_step(model_t, traj, n)
            twin.update_parameters(model_t)
        for key, value in twin.state_dict().items():
            assert torch.equal(got[key], value), key
        assert torch.allclose(values, final["values"], rtol=1e-6, atol=1e-6)
        return
    assert torch.equal(values, final["values"]), name
