"""diffusers' EMAModel, fused: the one import that changes, in a small training loop (CPU, a few seconds).

    python examples/diffusers_ema.py

Trains a tiny diffusers ``ModelMixin`` (built from its config: nothing is downloaded) to predict the
noise added to 2-D points, the way diffusers' training scripts use ``EMAModel``:
``ema.step(model.parameters())`` after each optimizer step, ``store`` / ``copy_to`` / ``restore``
around an evaluation, and ``save_pretrained`` / ``from_pretrained`` for the EMA weights.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from diffusers import ConfigMixin, ModelMixin  # noqa: E402
from diffusers.configuration_utils import register_to_config  # noqa: E402

# was: from diffusers.training_utils import EMAModel
from swm_fused.integrations.diffusers import EMAModel  # noqa: E402


class TinyDenoiser(ModelMixin, ConfigMixin):
    """Predicts the noise in a noised 2-D point, given the noise level."""

    @register_to_config
    def __init__(self, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2))

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.net(torch.cat([x, sigma[:, None]], dim=1))


def batch(n: int, generator: torch.Generator):
    angle = torch.rand(n, generator=generator) * 6.283
    clean = torch.stack([angle.cos(), angle.sin()], dim=1)  # points on a circle
    sigma = torch.rand(n, generator=generator)
    noise = torch.randn(n, 2, generator=generator)
    return clean + sigma[:, None] * noise, sigma, noise


@torch.no_grad()
def loss_of(model: nn.Module, generator: torch.Generator) -> float:
    noisy, sigma, noise = batch(8192, generator)
    return nn.functional.mse_loss(model(noisy, sigma), noise).item()


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = TinyDenoiser()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMAModel(model.parameters(), decay=0.999, use_ema_warmup=True, power=3 / 4,
                   model_cls=TinyDenoiser, model_config=model.config)

    start = time.perf_counter()
    for _ in range(args.steps):
        noisy, sigma, noise = batch(256, generator)
        loss = nn.functional.mse_loss(model(noisy, sigma), noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.step(model.parameters())  # one fused pass, no temporary copy of the model
    seconds = time.perf_counter() - start

    result = {"model": loss_of(model, torch.Generator().manual_seed(1))}
    ema.store(model.parameters())       # keep the training weights
    ema.copy_to(model.parameters())     # evaluate with the EMA weights
    result["ema"] = loss_of(model, torch.Generator().manual_seed(1))
    ema.restore(model.parameters())     # back to the training weights, bit for bit
    print(f"{args.steps} steps in {seconds:.2f} s; last decay {ema.cur_decay_value:.5f}")
    for name, value in result.items():
        print(f"  test loss, {name:>5}: {value:.4f}")

    with tempfile.TemporaryDirectory() as folder:
        ema.save_pretrained(os.path.join(folder, "unet_ema"))  # the same files diffusers' EMAModel writes
        loaded = EMAModel.from_pretrained(os.path.join(folder, "unet_ema"), model_cls=TinyDenoiser)
        assert loaded.optimization_step == ema.optimization_step
        assert all(torch.equal(a, b) for a, b in zip(loaded.shadow_params, ema.shadow_params))
        print(f"  save_pretrained / from_pretrained: step {loaded.optimization_step}, same weights")
    return result


if __name__ == "__main__":
    main()
