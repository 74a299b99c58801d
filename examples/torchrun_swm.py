"""SWM with torchrun: K ranks train K trajectories, each keeps an SWA average, then they merge.

Every rank starts from the same initial weights and sees the training data in its
own order. Each keeps a ``WeightAverager(mode="swa")`` of its trajectory; at the end
``merge_across_ranks_`` averages the K averages (one all-reduce for the whole
model), and rank 0 prints each rank's final and SWA test accuracy next to the
merged model's.

    torchrun --nproc_per_node=2 examples/torchrun_swm.py                  # CPU, gloo
    torchrun --nproc_per_node=8 examples/torchrun_swm.py --device cuda    # GPUs, NCCL

Uses scikit-learn's digits data set (8x8 images, 10 classes) when scikit-learn is
installed, otherwise a synthetic 10-class problem of the same shape.
"""
from __future__ import annotations

import argparse
import os
from typing import Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from swm_fused import WeightAverager
from swm_fused.distributed import merge_across_ranks_


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu uses the gloo backend, cuda one GPU per rank with NCCL")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--swa-start", type=int, default=15, help="epochs before the SWA average starts")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def load_data(seed: int, device: torch.device) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test): the same 80/20 split on every rank."""
    try:
        from sklearn.datasets import load_digits
        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
    except ImportError:
        gen = torch.Generator().manual_seed(seed)
        centers = torch.randn(10, 64, generator=gen)
        y = torch.randint(0, 10, (1797,), generator=gen)
        x = centers[y] + 1.5 * torch.randn(1797, 64, generator=gen)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order].to(device), y[order].to(device)
    n_train = int(0.8 * len(y))
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    result = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train()
    return result


def main() -> None:
    args = parse_args()
    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        x_train, y_train, x_test, y_test = load_data(args.seed, device)
        torch.manual_seed(args.seed)  # the same initial weights on every rank
        model = nn.Sequential(nn.Linear(64, args.hidden), nn.ReLU(), nn.Linear(args.hidden, 10)).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        averager = WeightAverager(model, mode="swa", start=args.swa_start)  # update() once per epoch
        data_order = torch.Generator().manual_seed(args.seed + 1 + rank)  # each rank its own trajectory

        for _ in range(args.epochs):
            for batch in torch.randperm(len(y_train), generator=data_order).split(args.batch_size):
                batch = batch.to(device)
                loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            averager.update()

        final_accuracy = accuracy(model, x_test, y_test)
        with averager.swapped():
            swa_accuracy = accuracy(model, x_test, y_test)

        # SWM: every rank ends up with the equal-weight mean of the K SWA averages.
        merge_across_ranks_(list(averager.average_state_dict().values()), weight=1.0)
        averager.copy_to(model)
        merged_accuracy = accuracy(model, x_test, y_test)

        per_rank = [None] * world
        dist.all_gather_object(per_rank, (final_accuracy, swa_accuracy, averager.n_averaged))
        if rank == 0:
            print(f"SWM over {world} ranks ({dist.get_backend()}, {device.type}), "
                  f"{args.epochs} epochs, SWA from epoch {args.swa_start + 1}")
            for r, (final, swa, n) in enumerate(per_rank):
                print(f"rank {r}: final {final:.4f}  SWA {swa:.4f}  ({n} epochs averaged)")
            print(f"merged (SWM of {world} SWA averages): {merged_accuracy:.4f}")
        dist.barrier()  # gloo can abort a rank that tears down while its peer still finishes a collective
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
