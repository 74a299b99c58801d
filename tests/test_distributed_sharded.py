"""Sharded (FSDP2 / DTensor) averaging on 2 gloo ranks against the same averaging done unsharded.

One spawn of two ranks (every spawn costs a torch import per rank) runs all the
distributed work and returns full (gathered) tensors; the tests below check them
against single-process reruns here. Covered: WeightAverager (EMA, SWA) and
AveragedModel(dtype=float32) on a bf16 FSDP2 model, no collectives inside an
update, swapped()/copy_to on the shards (past FSDP2's unsharded-root trap), DCP
save/resume on 2 ranks and DCP load on 1 rank, and DTensor models built with
distribute_tensor (tensor-parallel style, the deep-copy path of AveragedModel).
Last, the torchrun example runs on 2 CPU ranks.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from swm_fused.averager import WeightAverager
from swm_fused.swa_utils import AveragedModel, get_ema_multi_avg_fn

from _helpers import assert_close, bits
from _multiprocess import run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

MODEL_DTYPE = torch.bfloat16
STEPS = 6
CHECKPOINT_STEP = 3
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all",
               "all_to_all_single", "barrier", "broadcast", "broadcast_object_list", "gather", "gather_object",
               "reduce", "reduce_scatter", "reduce_scatter_tensor", "scatter", "scatter_object_list", "send",
               "recv", "isend", "irecv", "batch_isend_irecv", "monitored_barrier")


def make_model(seed: int) -> nn.Module:
    """13 rows split 7/6 over two ranks; the 1-row layer leaves rank 1 an empty shard."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 1)).to(MODEL_DTYPE)


def batch(seed: int, step: int, rank: int):
    gen = torch.Generator().manual_seed(seed * 1000 + step * 10 + rank)
    return torch.randn(8, 7, generator=gen).to(MODEL_DTYPE), torch.randn(8, 1, generator=gen)


def eval_input(seed: int) -> Tensor:
    return torch.randn(5, 7, generator=torch.Generator().manual_seed(seed + 7)).to(MODEL_DTYPE)


def decay_of(seed: int) -> float:
    return 0.5 + random.Random(seed).random() * 0.4


def tp_weights(seed: int, step: int) -> Dict[str, Tensor]:
    """The full weights of the tensor-parallel-style model at `step` (the same on every rank)."""
    gen = torch.Generator().manual_seed(seed * 77 + step)
    return {"weight": torch.randn(9, 6, generator=gen).to(MODEL_DTYPE),
            "bias": torch.randn(9, generator=gen).to(MODEL_DTYPE)}


class CollectiveCounter(contextlib.AbstractContextManager):
    """Counts torch.distributed calls (Python API, patched) and dispatched c10d/funcol ops (CommDebugMode)."""

    def __enter__(self):
        from torch.distributed.tensor.debug import CommDebugMode
        self.python_calls: List[str] = []
        self._patches = []
        for module in (dist, dist.distributed_c10d):
            for name in COLLECTIVES:
                original = getattr(module, name, None)
                if original is None:
                    continue

                def counting(*args, _name=name, _original=original, **kwargs):
                    self.python_calls.append(_name)
                    return _original(*args, **kwargs)

                self._patches.append((module, name, original))
                setattr(module, name, counting)
        self._mode = CommDebugMode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for module, name, original in self._patches:
            setattr(module, name, original)
        self.total = len(self.python_calls) + self._mode.get_total_counts()
        return False


def _gather(named) -> Dict[str, Tensor]:
    """Full tensors (a collective for DTensors)."""
    return {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone() for n, t in named}


def _shard(model: nn.Module, mesh) -> nn.Module:
    """fully_shard the first Linear and the root; the last Linear stays in the root's group, whose
    parameters FSDP2 keeps unsharded after a forward without backward."""
    from torch.distributed.fsdp import fully_shard
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _averagers(seed: int, mesh, init_seed: int):
    """An FSDP2 model and its averagers (the AveragedModels built before sharding, then sharded alike)."""
    model = make_model(init_seed)
    averaged = AveragedModel(model, dtype=torch.float32)
    averaged_ema = AveragedModel(model, dtype=torch.float32, multi_avg_fn=get_ema_multi_avg_fn(decay_of(seed)))
    _shard(model, mesh)
    _shard(averaged.module, mesh)
    _shard(averaged_ema.module, mesh)
    ema = WeightAverager(model, mode="ema", decay=decay_of(seed))
    swa = WeightAverager(model, mode="swa", start=1)
    return model, {"ema": ema, "swa": swa}, {"averaged": averaged, "averaged_ema": averaged_ema}


def _train(model, averagers, averaged_models, seed, rank, steps, update_counts):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    history = []
    for step in steps:
        x, y = batch(seed, step, rank)
        nn.functional.mse_loss(model(x).float(), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        with CollectiveCounter() as counter:
            for averager in averagers.values():
                averager.update()
            for averaged in averaged_models.values():
                averaged.update_parameters(model)
        update_counts.append(counter.total)
        history.append(_gather(model.named_parameters()))
    return history


def _checkpoint_state(model, averagers, averaged_models):
    state = {"model": model.state_dict()}
    state.update({name: a.state_dict() for name, a in averagers.items()})
    state.update({name: a.state_dict() for name, a in averaged_models.items()})
    return state


def _results(averagers, averaged_models) -> Dict[str, Dict[str, Tensor]]:
    out = {name: _gather(a.average_state_dict().items()) for name, a in averagers.items()}
    out.update({name: _gather(a.module.named_parameters()) for name, a in averaged_models.items()})
    return out


def _fsdp_part(rank, world, seed, checkpoint_dir) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    out: dict = {"update_collectives": []}
    model, averagers, averaged_models = _averagers(seed, mesh, init_seed=seed)
    try:
        AveragedModel(model)
    except TypeError as exc:
        out["averaged_model_of_fsdp"] = str(exc)
    out["dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    out["placements"] = sorted({str(p.placements) for p in model.parameters()})
    history = _train(model, averagers, averaged_models, seed, rank, range(1, CHECKPOINT_STEP + 1),
                     out["update_collectives"])
    dcp.save(_checkpoint_state(model, averagers, averaged_models), checkpoint_id=checkpoint_dir)
    history += _train(model, averagers, averaged_models, seed, rank, range(CHECKPOINT_STEP + 1, STEPS + 1),
                      out["update_collectives"])
    out["history"] = history
    out["final"] = _results(averagers, averaged_models)
    out["n_averaged"] = {name: a.n_averaged for name, a in averagers.items()}

    # Controls: the counter does see collectives, so zero above means none ran.
    with CollectiveCounter() as counter:
        next(model.parameters()).full_tensor()
    out["control_dtensor_gather"] = counter.total
    with CollectiveCounter() as counter:
        dist.all_reduce(torch.ones(1))
    out["control_all_reduce"] = counter.total

    # swapped(): an eval forward first leaves the root's parameters unsharded (FSDP2 reuses them).
    # The weights move far from the average first, so a forward on the wrong weights shows.
    ema, x = averagers["ema"], eval_input(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().add_(1.0)
        model(x)
        out["y_before"] = model(x)
        out["before"] = _gather(model.named_parameters())
        with ema.swapped():
            out["inside"] = _gather(model.named_parameters())
            out["y_inside"] = model(x)
        out["after"] = _gather(model.named_parameters())
        out["y_after"] = model(x)

    # copy_to: into another sharded model (shard to shard) and into a plain one (gathers).
    other = _shard(make_model(seed + 1), mesh)
    ema.copy_to(other)
    out["copy_to_sharded"] = _gather(other.named_parameters())
    plain = make_model(seed + 2)
    ema.copy_to(plain)
    out["copy_to_plain"] = _gather(plain.named_parameters())

    # Resume from the checkpoint in fresh objects (a different init) and replay the last steps.
    model, averagers, averaged_models = _averagers(seed, mesh, init_seed=seed + 3)
    state = _checkpoint_state(model, averagers, averaged_models)
    dcp.load(state, checkpoint_id=checkpoint_dir)
    model.load_state_dict(state["model"])
    for name, averager in {**averagers, **averaged_models}.items():
        averager.load_state_dict(state[name])
    with torch.no_grad():  # leaves the averaged root unsharded; the updates below must still be seen
        out["averaged_y_loaded"] = averaged_models["averaged"](x.float())
    _train(model, averagers, averaged_models, seed, rank, range(CHECKPOINT_STEP + 1, STEPS + 1), [])
    with torch.no_grad():
        out["averaged_y_final"] = averaged_models["averaged"](x.float())
    out["resumed"] = _results(averagers, averaged_models)
    out["resumed_counters"] = {name: (a.step, a.n_averaged) for name, a in averagers.items()}
    return out


def _dtensor_part(rank, world, seed) -> dict:
    """A model whose parameters are DTensors from distribute_tensor: weight Shard(1), bias Replicate."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    placements = {"weight": [Shard(1)], "bias": [Replicate()]}
    model = nn.Linear(6, 9).to(MODEL_DTYPE)
    for name, full in tp_weights(seed, 0).items():
        setattr(model, name, nn.Parameter(distribute_tensor(full, mesh, placements[name], src_data_rank=None)))
    averaged = AveragedModel(model, dtype=torch.float32)  # deep-copies the DTensors
    swa = WeightAverager(model, mode="swa")
    out: dict = {"update_collectives": []}
    for step in range(1, 4):
        with torch.no_grad():
            for name, full in tp_weights(seed, step).items():
                local = distribute_tensor(full, mesh, placements[name], src_data_rank=None).to_local()
                getattr(model, name).to_local().copy_(local)
        with CollectiveCounter() as counter:
            swa.update()
            averaged.update_parameters(model)
        out["update_collectives"].append(counter.total)
    out["averaged_is_sharded"] = all(hasattr(p, "to_local") for p in averaged.module.parameters())
    out["swa"] = _gather(swa.average_state_dict().items())
    out["averaged"] = _gather(averaged.module.named_parameters())

    # copy_to a differently sharded model (redistributes) and load full tensors (sliced locally).
    target = nn.Linear(6, 9).to(MODEL_DTYPE)
    target.weight = nn.Parameter(distribute_tensor(target.weight.detach(), mesh, [Shard(0)], src_data_rank=None))
    target.bias = nn.Parameter(distribute_tensor(target.bias.detach(), mesh, [Shard(0)], src_data_rank=None))
    swa.copy_to(target)
    out["copy_to_resharded"] = _gather(target.named_parameters())
    try:
        averaged.update_parameters(target)
    except ValueError as exc:
        out["differently_sharded_error"] = str(exc)
    out["averaged_after_error"] = _gather(averaged.module.named_parameters())
    state = swa.state_dict()
    state["average"] = {name: full.float() for name, full in tp_weights(seed, 99).items()}
    swa.load_state_dict(state)
    out["loaded_full"] = _gather(swa.average_state_dict().items())
    return out


def _replicated_part(rank, world, seed) -> dict:
    """A DDP model: each rank averages its full replica, as without torch.distributed."""
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(make_model(seed).float())
    ema = WeightAverager(model, mode="ema", decay=decay_of(seed))
    averaged = AveragedModel(model.module, dtype=torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out: dict = {"update_collectives": [], "history": []}
    for step in range(1, 4):
        x, y = batch(seed, step, rank)
        nn.functional.mse_loss(model(x.float()), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        with CollectiveCounter() as counter:
            ema.update()
            averaged.update_parameters(model)
        out["update_collectives"].append(counter.total)
        out["history"].append(_gather(model.module.named_parameters()))
    out["ema"] = _gather(ema.average_state_dict().items())
    out["averaged"] = _gather(averaged.module.named_parameters())
    return out


def _worker(rank, world, seed, checkpoint_dir):
    torch.manual_seed(seed)
    return {"fsdp": _fsdp_part(rank, world, seed, checkpoint_dir), "dtensor": _dtensor_part(rank, world, seed),
            "replicated": _replicated_part(rank, world, seed)}


# ------------------------------------------------------------------------------------ the run
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    seed = int(os.environ.get("SWM_FUSED_TEST_SEED", random.randrange(2**31)))
    print(f"seed={seed} (replay with SWM_FUSED_TEST_SEED={seed})")
    checkpoint_dir = str(tmp_path_factory.mktemp("dcp"))
    results = run_ranks(_worker, 2, tmp_path_factory.mktemp("ranks"), seed, checkpoint_dir)
    for rank, result in enumerate(results):
        assert "ok" in result, f"rank {rank}: {result.get('traceback')}"
    return {"seed": seed, "checkpoint_dir": checkpoint_dir, "ranks": [r["ok"] for r in results]}


def _set_weights(model: nn.Module, weights: Dict[str, Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name])


def _snapshot(state):
    """A deep copy of a state dict's tensors (they are live views)."""
    if isinstance(state, dict):
        return {k: _snapshot(v) for k, v in state.items()}
    return state.detach().clone() if isinstance(state, Tensor) else state


def _unsharded_reference(seed: int, history: List[Dict[str, Tensor]]):
    """The same averagers, unsharded in this process, fed the gathered weights of every step.
    Returns (final results, state dicts at the checkpoint step)."""
    model = make_model(seed)
    averagers = {"ema": WeightAverager(model, mode="ema", decay=decay_of(seed)),
                 "swa": WeightAverager(model, mode="swa", start=1)}
    averaged_models = {"averaged": AveragedModel(model, dtype=torch.float32),
                       "averaged_ema": AveragedModel(model, dtype=torch.float32,
                                                     multi_avg_fn=get_ema_multi_avg_fn(decay_of(seed)))}
    at_checkpoint = None
    for step, weights in enumerate(history, start=1):
        _set_weights(model, weights)
        for averager in averagers.values():
            averager.update()
        for averaged in averaged_models.values():
            averaged.update_parameters(model)
        if step == CHECKPOINT_STEP:
            at_checkpoint = {name: _snapshot(a.state_dict()) for name, a in {**averagers, **averaged_models}.items()}
    final = {name: {k: v.clone() for k, v in a.average_state_dict().items()} for name, a in averagers.items()}
    final.update({name: {k: v.detach().clone() for k, v in a.module.named_parameters()}
                  for name, a in averaged_models.items()})
    return final, at_checkpoint


def _assert_bitwise(got: Dict[str, Tensor], expected: Dict[str, Tensor], what: str) -> None:
    assert got.keys() == expected.keys(), what
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, f"{what} {name}: {got[name].dtype} != {tensor.dtype}"
        assert torch.equal(bits(got[name]), bits(tensor)), f"{what} {name}: not bit-identical"


# ----------------------------------------------------------------------------------- the tests
def test_fsdp2_model_is_sharded_bf16_and_averaged_model_says_how_to_average_it(run):
    fsdp = run["ranks"][0]["fsdp"]
    assert fsdp["dtypes"] == [str(MODEL_DTYPE)]
    assert fsdp["placements"] == ["(Shard(dim=0),)"]
    assert "fully_shard(averaged.module)" in fsdp.get("averaged_model_of_fsdp", ""), fsdp.get("averaged_model_of_fsdp")


def test_sharded_averages_match_unsharded_averaging_bit_for_bit(run):
    ranks = [r["fsdp"] for r in run["ranks"]]
    expected, _ = _unsharded_reference(run["seed"], ranks[0]["history"])
    for rank, result in enumerate(ranks):
        for name in expected:
            _assert_bitwise(result["final"][name], expected[name], f"rank {rank} {name}")
        assert result["n_averaged"] == {"ema": STEPS, "swa": STEPS - 1}
    # the averages moved away from the last weights, so the comparison has teeth
    last = ranks[0]["history"][-1]
    assert any(not torch.equal(expected["ema"][n], last[n].float()) for n in last)


def test_update_runs_no_collectives(run):
    for result in run["ranks"]:
        for part in ("fsdp", "dtensor", "replicated"):
            assert result[part]["update_collectives"] and set(result[part]["update_collectives"]) == {0}, part
        assert result["fsdp"]["control_dtensor_gather"] > 0, "the counter missed a DTensor all-gather"
        assert result["fsdp"]["control_all_reduce"] > 0, "the counter missed dist.all_reduce"


def test_swapped_and_copy_to_work_on_shards(run):
    ranks = [r["fsdp"] for r in run["ranks"]]
    expected, _ = _unsharded_reference(run["seed"], ranks[0]["history"])
    average_in_model_dtype = {n: t.to(MODEL_DTYPE) for n, t in expected["ema"].items()}
    plain = make_model(run["seed"])
    x = eval_input(run["seed"])
    for rank, result in enumerate(ranks):
        _assert_bitwise(result["inside"], average_in_model_dtype, f"rank {rank} inside swapped()")
        _assert_bitwise(result["after"], result["before"], f"rank {rank} after swapped()")
        moved = {n: t + 1.0 for n, t in ranks[0]["history"][-1].items()}
        _assert_bitwise(result["before"], moved, f"rank {rank} before swapped()")
        _assert_bitwise(result["copy_to_sharded"], average_in_model_dtype, f"rank {rank} copy_to sharded")
        _assert_bitwise(result["copy_to_plain"], average_in_model_dtype, f"rank {rank} copy_to plain")
        # the forwards saw what was in the shards (FSDP2 would reuse stale unsharded root weights)
        for weights, y in ((average_in_model_dtype, result["y_inside"]), (result["before"], result["y_after"])):
            _set_weights(plain, weights)
            with torch.no_grad():
                assert_close(y, plain(x), 2e-2, 2e-2, what=f"rank {rank} forward")
        assert not torch.allclose(result["y_inside"].float(), result["y_after"].float(), atol=0.5)


def test_dcp_resume_on_the_same_world_size_continues_bit_for_bit(run):
    plain = make_model(run["seed"]).float()
    x = eval_input(run["seed"]).float()
    for rank, result in enumerate(r["fsdp"] for r in run["ranks"]):
        for name, final in result["final"].items():
            _assert_bitwise(result["resumed"][name], final, f"rank {rank} resumed {name}")
        assert result["resumed_counters"] == {"ema": (STEPS, STEPS), "swa": (STEPS, STEPS - 1)}
        # the sharded AveragedModel runs, and its forward sees the updates made after an earlier forward
        _set_weights(plain, result["final"]["averaged"])
        with torch.no_grad():
            assert_close(result["averaged_y_final"], plain(x), 1e-5, 1e-4, what=f"rank {rank} AveragedModel forward")
        assert not torch.equal(result["averaged_y_final"], result["averaged_y_loaded"])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_checkpoint_of_2_ranks_loads_into_an_unsharded_model(run):
    import torch.distributed.checkpoint as dcp

    seed = run["seed"]
    _, at_checkpoint = _unsharded_reference(seed, run["ranks"][0]["fsdp"]["history"])
    model = make_model(seed + 5)
    averagers = {"ema": WeightAverager(model, mode="ema", decay=decay_of(seed)),
                 "swa": WeightAverager(model, mode="swa", start=1)}
    averaged_models = {"averaged": AveragedModel(model, dtype=torch.float32),
                       "averaged_ema": AveragedModel(model, dtype=torch.float32,
                                                     multi_avg_fn=get_ema_multi_avg_fn(decay_of(seed)))}
    state = {name: a.state_dict() for name, a in {**averagers, **averaged_models}.items()}
    for entry in state.values():
        for tensor in list(entry.get("average", {}).values()) + [v for v in entry.values() if isinstance(v, Tensor)]:
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))
    dcp.load(state, checkpoint_id=run["checkpoint_dir"])  # no process group: one process
    for name, averager in {**averagers, **averaged_models}.items():
        averager.load_state_dict(state[name])
    for name, averager in averagers.items():
        expected = at_checkpoint[name]
        _assert_bitwise(averager.average_state_dict(), expected["average"], f"{name} average")
        assert (averager.step, averager.n_averaged) == (expected["step"], int(expected["n_averaged"])), name
    for name, averaged in averaged_models.items():
        _assert_bitwise(averaged.state_dict(), at_checkpoint[name], name)


def test_dtensor_models_average_their_shards(run):
    seed = run["seed"]
    model = nn.Linear(6, 9).to(MODEL_DTYPE)
    _set_weights(model, tp_weights(seed, 0))
    swa, averaged = WeightAverager(model, mode="swa"), AveragedModel(model, dtype=torch.float32)
    for step in range(1, 4):
        _set_weights(model, tp_weights(seed, step))
        swa.update()
        averaged.update_parameters(model)
    expected_swa = {n: t.clone() for n, t in swa.average_state_dict().items()}
    expected_averaged = {n: p.detach().clone() for n, p in averaged.module.named_parameters()}
    for rank, result in enumerate(r["dtensor"] for r in run["ranks"]):
        assert result["averaged_is_sharded"]
        _assert_bitwise(result["swa"], expected_swa, f"rank {rank} WeightAverager")
        _assert_bitwise(result["averaged"], expected_averaged, f"rank {rank} AveragedModel")
        assert "'weight' is sharded differently" in result.get("differently_sharded_error", ""), result
        _assert_bitwise(result["averaged_after_error"], expected_averaged, f"rank {rank} AveragedModel after error")
        _assert_bitwise(result["copy_to_resharded"], {n: t.to(MODEL_DTYPE) for n, t in expected_swa.items()},
                        f"rank {rank} copy_to another layout")
        _assert_bitwise(result["loaded_full"], {n: t.float() for n, t in tp_weights(seed, 99).items()},
                        f"rank {rank} load_state_dict of full tensors")


def test_torchrun_example_trains_and_merges(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    epochs, swa_start = 6, 2
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(repo / "examples" / "torchrun_swm.py"), "--epochs", str(epochs), "--swa-start", str(swa_start)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
        proc.communicate()
        raise
    assert proc.returncode == 0, output
    ranks = re.findall(r"^rank (\d): final ([\d.]+)  SWA ([\d.]+)  \((\d+) epochs averaged\)$", output, re.M)
    assert [int(r[0]) for r in ranks] == [0, 1], output
    assert all(int(r[3]) == epochs - swa_start for r in ranks), output
    merged = re.findall(r"^merged \(SWM of 2 SWA averages\): ([\d.]+)$", output, re.M)
    assert len(merged) == 1, output
    accuracies = [float(v) for r in ranks for v in r[1:3]] + [float(merged[0])]
    assert all(0.0 <= a <= 1.0 for a in accuracies), output
    assert float(merged[0]) > 0.1, f"the merged model is no better than chance (10 classes):\n{output}"


def test_replicated_ddp_models_average_their_replica(run):
    seed = run["seed"]
    ranks = [r["replicated"] for r in run["ranks"]]
    _assert_bitwise(ranks[1]["history"][-1], ranks[0]["history"][-1], "DDP replicas")
    model = make_model(seed).float()
    ema = WeightAverager(model, mode="ema", decay=decay_of(seed))
    averaged = AveragedModel(model, dtype=torch.float64)
    for weights in ranks[0]["history"]:
        _set_weights(model, weights)
        ema.update()
        averaged.update_parameters(model)
    for rank, result in enumerate(ranks):
        _assert_bitwise(result["ema"], {f"module.{n}": t for n, t in ema.average_state_dict().items()},
                        f"rank {rank} WeightAverager(DDP)")
        _assert_bitwise(result["averaged"], dict(averaged.module.named_parameters()), f"rank {rank} AveragedModel")
