"""EMA of a Lightning model with swm_fused: the one import that changes, and what it adds.

    python examples/lightning_ema.py            # CPU, a few seconds

The only change from Lightning's own callback is the import:

    # from lightning.pytorch.callbacks import EMAWeightAveraging
    from swm_fused.integrations.lightning import EMAWeightAveraging

The keyword-only extras used here are a timm-style decay warmup and the NaN/Inf skip (on by
default); ``dtype`` (float32 by default) keeps an fp32 average of a bf16 model. Validation runs on the
averaged weights, training resumes on the live ones, and after ``fit`` the model holds the average.
Trains a small regression network on synthetic data and prints the validation loss of the live
weights and of the average.
"""
from __future__ import annotations

import argparse
import copy
import logging
import warnings
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import lightning.pytorch as pl

from swm_fused.integrations.lightning import EMAWeightAveraging


class Regressor(pl.LightningModule):
    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 1))
        self.lr = lr
        self.val_losses: List[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.val_losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class KeepLastWeights(pl.Callback):
    """Listed before the EMA callback: keeps the last training weights before it copies the average in."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.state = copy.deepcopy(pl_module.state_dict())


def make_data(n: int, seed: int) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    y = torch.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3] + 0.3 * torch.randn(n, 1, generator=gen)  # noisy labels
    return torch.utils.data.TensorDataset(x, y)


def evaluate(model: nn.Module, data: torch.utils.data.TensorDataset) -> float:
    model.eval()
    with torch.no_grad():
        x, y = data.tensors
        return F.mse_loss(model(x), y).item()


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--decay", type=float, default=0.99)
    parser.add_argument("--train-size", type=int, default=1024)
    parser.add_argument("--root", default=None, help="Lightning's default_root_dir (default: the working directory)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning 2.6 on torch 2.13

    torch.manual_seed(args.seed)
    train, val = make_data(args.train_size, args.seed), make_data(512, args.seed + 1)
    train_loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True)
    val_loader = torch.utils.data.DataLoader(val, batch_size=512)

    ema = EMAWeightAveraging(decay=args.decay,                                  # Lightning's arguments
                             warmup=dict(warmup_power=3 / 4))                   # ours: timm-style warmup
    last = KeepLastWeights()
    model = Regressor()
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[last, ema], accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=args.root)
    trainer.fit(model, train_loader, val_loader)

    val_loss_average = evaluate(model, val)        # after fit the model holds the average
    live = copy.deepcopy(model)
    live.load_state_dict(last.state)
    val_loss_live = evaluate(live, val)
    result = {"n_averaged": float(ema.n_averaged), "skipped": float(ema.skipped),
              "val_loss_live": val_loss_live, "val_loss_average": val_loss_average}
    print(f"EMA over {ema.n_averaged} steps ({ema.skipped} skipped for NaN/Inf): validation loss "
          f"{val_loss_live:.4f} with the last training weights, {val_loss_average:.4f} with the average")
    return result


if __name__ == "__main__":
    main()
