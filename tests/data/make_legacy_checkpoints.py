"""Writes tests/data/v0_1_0_<front-end>.pt: state dicts saved by swm_fused 0.1.0 (commit 8a53340, before the
averaging engine of issue 10), and what 0.1.0 computed after resuming from them.

Run once with that release installed; tests/test_legacy_checkpoints.py loads the file with the current code
and checks that every front-end resumes and ends bit for bit where 0.1.0 ended. Kept tiny (a 23-parameter
model, 6 steps) on purpose.
"""
from __future__ import annotations

import io
import pathlib

import torch
from torch import nn

CHECKPOINT_STEP, STEPS = 3, 6


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1, bias=False))


def trajectory():
    gen = torch.Generator().manual_seed(1)
    model = make_model()
    out = []
    for _ in range(STEPS):
        out.append({k: (v + torch.randn(v.shape, generator=gen) if v.is_floating_point() else v + 1)
                    for k, v in model.state_dict().items()})
    return out


def set_step(model: nn.Module, traj, n: int) -> None:
    model.load_state_dict(traj[n - 1])


def groups(model: nn.Module):
    return [{"params": [model[0].weight, model[2].weight], "lr": 0.0},
            {"params": [model[0].bias, model[1].weight, model[1].bias], "lr": 0.0}]


def builders():
    from swm_fused import SWAG, WeightAverager
    from swm_fused.optim import EMA, SWA
    from swm_fused.swa_utils import AveragedModel, get_ema_multi_avg_fn
    return {
        "averager_ema": lambda m: WeightAverager(m, mode="ema", decay=0.8, include_buffers=True),
        "averager_swa": lambda m: WeightAverager(m, mode="swa", start=1),
        "optim_ema": lambda m: EMA(torch.optim.SGD(groups(m), lr=0.0), decay=0.7, every=1),
        "optim_swa": lambda m: SWA(torch.optim.SGD(groups(m), lr=0.0), swa_start=1, swa_freq=1),
        "averaged_swa": lambda m: AveragedModel(m),
        "averaged_ema": lambda m: AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(0.75), use_buffers=True),
        "swag": lambda m: SWAG(m, max_rank=2),
    }


def tick(name: str, obj, model: nn.Module) -> None:
    """One step of a front-end: the model already holds that step's weights."""
    if name.startswith("averager"):
        obj.update()
    elif name.startswith("optim"):
        obj.step()
    elif name.startswith("averaged"):
        obj.update_parameters(model)
    else:
        obj.collect()


def result(name: str, obj):
    if name.startswith("averager") or name.startswith("optim"):
        return {k: v.clone() for k, v in obj.average_state_dict().items()}
    if name.startswith("averaged"):
        return {k: v.clone() for k, v in obj.state_dict().items()}
    state = obj.state_dict()
    return {**{f"mean.{k}": v for k, v in state["mean"].items()},
            **{f"sq_mean.{k}": v for k, v in state["sq_mean"].items()}, "deviations": state["deviations"]}


def main() -> None:
    import swm_fused

    traj = trajectory()
    for name, build in builders().items():
        model = make_model()
        obj = build(model)
        here = pathlib.Path(__file__).parent
        state = None
        for n in range(1, STEPS + 1):
            set_step(model, traj, n)
            tick(name, obj, model)
            if n == CHECKPOINT_STEP:
                blob = io.BytesIO()
                torch.save(obj.state_dict(), blob)  # a copy, as a file would hold it
                state = torch.load(io.BytesIO(blob.getvalue()), weights_only=False)
        final = result(name, obj)
        # the expected end values packed in one tensor (one storage keeps the file small)
        packed = {"names": list(final), "shapes": [tuple(v.shape) for v in final.values()],
                  "dtypes": [str(v.dtype) for v in final.values()],
                  "values": torch.cat([v.detach().double().flatten() for v in final.values()])}
        path = here / f"v0_1_0_{name}.pt"
        torch.save({"version": swm_fused.__version__, "commit": "8a53340", "checkpoint_step": CHECKPOINT_STEP,
                    "steps": STEPS, "state": state, "final": packed}, path)
        print(path.name, path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
