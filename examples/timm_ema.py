"""timm's ModelEmaV3, fused: the one import that changes, in a small training loop (CPU, a few seconds).

    python examples/timm_ema.py

Trains a small MLP on a synthetic 10-class problem with noisy SGD and keeps two EMAs with
warmup, as timm's train.py does (``model_ema.update(model, step=num_updates)``):

- the model's own dtype (float32 here), as timm;
- a float32 EMA of a bfloat16 copy of the model (``dtype=torch.float32``): one fused pass that
  reads the bfloat16 weights directly, no cast copy of the model.

Then it evaluates both EMAs through ``.module`` and saves / reloads a checkpoint with timm's keys.
timm itself is not needed.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from swm_fused.integrations.timm import ModelEmaV3  # was: from timm.utils import ModelEmaV3


def make_data(n: int, centers: Tensor, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    labels = torch.randint(0, 10, (n,), generator=generator)
    return centers[labels] + torch.randn(n, 32, generator=generator), labels


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    dtype = next(model.parameters()).dtype
    return (model(x.to(dtype)).argmax(1) == y).float().mean().item()


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    centers = torch.randn(10, 32, generator=generator) * 0.4  # overlapping classes: a noisy problem
    x_train, y_train = make_data(4096, centers, generator)
    x_test, y_test = make_data(2048, centers, generator)
    model = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)  # a high rate: noisy weights that an EMA smooths

    model_ema = ModelEmaV3(model, decay=0.998, use_warmup=True, warmup_power=3 / 4)
    bf16_model = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 10)).to(torch.bfloat16)
    bf16_model.load_state_dict(model.state_dict())
    bf16_ema = ModelEmaV3(bf16_model, decay=0.998, use_warmup=True, warmup_power=3 / 4, dtype=torch.float32)

    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        index = torch.randint(0, len(x_train), (32,), generator=generator)
        loss = nn.functional.cross_entropy(model(x_train[index]), y_train[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model_ema.update(model, step=step)
        with torch.no_grad():
            bf16_model.load_state_dict(model.state_dict())  # stands in for a bf16 training step
        bf16_ema.update(bf16_model, step=step)
    seconds = time.perf_counter() - start

    result = {"model": accuracy(model, x_test, y_test), "ema": accuracy(model_ema.module, x_test, y_test),
              "fp32 ema of bf16": accuracy(bf16_ema.module, x_test, y_test)}
    print(f"{args.steps} steps in {seconds:.2f} s; decay at the last step {model_ema.get_decay(args.steps):.5f}")
    for name, value in result.items():
        print(f"  test accuracy, {name:>16}: {value:.3f}")

    # checkpoints: timm's keys ("module.<name>"), so a timm ModelEmaV3 loads this file and vice versa
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "ema.pt")
        torch.save(model_ema.state_dict(), path)
        restored = ModelEmaV3(model)
        restored.load_state_dict(torch.load(path, weights_only=True))
        assert accuracy(restored, x_test, y_test) == result["ema"]
        print(f"  checkpoint keys: {list(model_ema.state_dict())[:2]} ... reloaded, same accuracy")
    return result


if __name__ == "__main__":
    main()
