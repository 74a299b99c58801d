"""Run a function on N gloo ranks in fresh processes, with a hard time limit so nothing hangs."""
from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from typing import Any, Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIME_LIMIT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=30))
    try:
        result = {"ok": fn(rank, world_size, *args)}
    except Exception as exc:  # the parent inspects each rank's error
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, tmp_path, *args: Any) -> List[dict]:
    """Run ``fn(rank, world_size, *args)`` on each rank; return each rank's {"ok": value} or {"error": msg}."""
    out_dir = str(tmp_path)
    context = mp.start_processes(_entry, args=(fn, world_size, _free_port(), out_dir, args), nprocs=world_size,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + TIME_LIMIT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            raise TimeoutError(f"ranks did not finish within {TIME_LIMIT_S} s")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
