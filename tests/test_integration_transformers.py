"""The Hugging Face Trainer callback, run in a real Trainer on CPU with a tiny GPT-2 built from a config.

One uninterrupted run (module fixture, 24 optimizer steps of 3 micro-batches, an EMA with warmup and a
gated SWA side by side, evaluations at steps 10, 20 and 24, checkpoints at 12 and 24) is checked
against averages computed here in float64 from the weights recorded after every optimizer step (an
optimizer step hook, independent of the callback's timing). A second Trainer, from another random
init, resumes from checkpoint-12 and must end with the same averages and weights bit for bit. Then
2 gloo ranks under accelerate's DDP (with a resume), the constructor's checks, the resume errors and
the ImportError when transformers is missing. Nothing is downloaded (HF_HUB_OFFLINE=1).
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing may be downloaded

import glob
import importlib
import importlib.util
import random
import shutil
import sys
from typing import Any, Dict, List

import pytest
import torch
from torch import Tensor

from swm_fused import EMAWarmup

from _helpers import assert_close
from _multiprocess import run_ranks

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from swm_fused.integrations.transformers import WeightAveragingCallback  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, SEQ = 64, 16
STEPS, ACCUM, BATCH = 24, 3, 4
N_TRAIN = 96  # 24 micro-batches of 4 per epoch: 8 optimizer steps per epoch, 3 epochs
EVAL_STEPS, SAVE_STEPS = 10, 12
EMA_DECAY, EMA_WARMUP = 0.9, EMAWarmup(warmup_power=0.75)
SWA_START, SWA_EVERY = 5, 3


@pytest.fixture(autouse=True, scope="module")
def _quiet_single_thread():
    """One thread (2 shared cores: oversubscription makes a tiny model 10x slower) and quiet transformers."""
    threads = torch.get_num_threads()
    verbosity = hf_logging.get_verbosity()
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    yield
    torch.set_num_threads(threads)
    hf_logging.set_verbosity(verbosity)


# --------------------------------------------------------------------------------- building blocks
def tiny_model(seed: int) -> GPT2LMHeadModel:
    """2-layer GPT-2 from a config, random init, no dropout; lm_head is tied to the token embedding."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=SEQ, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Dict[str, Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Recorder(TrainerCallback):
    """Records the weights after every optimizer step (a step hook on the optimizer), what the model holds
    during and after each evaluation, and how many micro-batches ran. Put it after the averaging callbacks."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module):
        self.model = model
        self.after_step: List[Dict[str, Tensor]] = []
        self.in_eval: List[Dict[str, Tensor]] = []
        self.after_eval: List[Dict[str, Tensor]] = []
        self.eval_steps: List[int] = []
        self.micro_batches = 0
        self._seen_eval_batch = False
        optimizer.register_step_post_hook(lambda *_: self.after_step.append(self._snapshot()))

    def _snapshot(self) -> Dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def on_substep_end(self, args, state, control, **kwargs):
        self.micro_batches += 1

    def on_step_end(self, args, state, control, **kwargs):
        self.micro_batches += 1

    def on_prediction_step(self, args, state, control, **kwargs):
        if not self._seen_eval_batch:
            self._seen_eval_batch = True
            self.in_eval.append(self._snapshot())

    def on_evaluate(self, args, state, control, **kwargs):
        self._seen_eval_batch = False
        self.eval_steps.append(state.global_step)
        self.after_eval.append(self._snapshot())


def training_args(output_dir: str, seed: int, **overrides: Any) -> TrainingArguments:
    values = dict(output_dir=output_dir, per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH,
                  gradient_accumulation_steps=ACCUM, max_steps=STEPS, learning_rate=3e-3, lr_scheduler_type="linear",
                  eval_strategy="steps", eval_steps=EVAL_STEPS, save_strategy="steps", save_steps=SAVE_STEPS,
                  logging_steps=5, report_to=[], use_cpu=True, disable_tqdm=True, seed=seed,
                  dataloader_num_workers=0)
    values.update(overrides)
    return TrainingArguments(**values)


def make_callbacks() -> List[WeightAveragingCallback]:
    ema = WeightAveragingCallback("ema", decay=EMA_DECAY, warmup=EMA_WARMUP)
    swa = WeightAveragingCallback("swa", start_step=SWA_START, every=SWA_EVERY, eval_with_average=False,
                                  copy_to_model_at_end=False)
    return [ema, swa]


def run_trainer(output_dir: str, seed: int, model_seed: int, resume: Any = None, **overrides: Any) -> Dict[str, Any]:
    model = tiny_model(model_seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    ema, swa = make_callbacks()
    recorder = Recorder(optimizer, model)
    trainer = Trainer(model=model, args=training_args(output_dir, seed, **overrides),
                      train_dataset=TokenData(N_TRAIN, seed),
                      eval_dataset={"a": TokenData(4, seed + 1), "b": TokenData(8, seed + 2)},
                      optimizers=(optimizer, None), callbacks=[ema, swa, recorder])
    trainer.train(resume_from_checkpoint=resume)
    return {"model": model, "ema": ema, "swa": swa, "recorder": recorder, "trainer": trainer}


# ------------------------------------------------------------------------------ the hand oracle
def warmup_decay(n: int) -> float:
    """timm ModelEmaV3 warmup, written out here (not EMAWarmup.decay_at): update n, 1-based."""
    k = max(0, n - EMA_WARMUP.update_after_step - 1)
    if k <= 0:
        return 0.0
    return max(min(1 - (1 + k / EMA_WARMUP.warmup_gamma) ** -EMA_WARMUP.warmup_power, EMA_DECAY),
               EMA_WARMUP.min_decay)


def hand_ema(weights: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
    ema = {n: t.double() for n, t in weights[0].items()}  # update 1 copies
    for n_step, theta in enumerate(weights[1:], start=2):
        d = warmup_decay(n_step)
        ema = {n: d * ema[n] + (1 - d) * theta[n].double() for n in ema}
    return ema


def hand_swa(weights: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
    chosen = [w for n, w in enumerate(weights, start=1) if n > SWA_START and (n - SWA_START) % SWA_EVERY == 0]
    assert len(chosen) >= 2
    return {n: sum(w[n].double() for w in chosen) / len(chosen) for n in chosen[0]}


def assert_average(actual: Dict[str, Tensor], expected: Dict[str, Tensor], what: str) -> None:
    assert sorted(actual) == sorted(expected), what
    for name in expected:
        assert actual[name].dtype == torch.float32
        assert_close(actual[name], expected[name], atol=1e-6, rtol=1e-5, what=f"{what} {name}")


def assert_same_bits(a: Dict[str, Tensor], b: Dict[str, Tensor], what: str) -> None:
    assert sorted(a) == sorted(b), what  # safetensors files list their tensors sorted by name
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), f"{what}: {name} differs"


def clone(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    return {n: t.detach().clone() for n, t in state.items()}


# ------------------------------------------------------------------------- one uninterrupted run
@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    seed = random.randrange(2**31)
    print(f"full_run seed={seed}")
    out = str(tmp_path_factory.mktemp("hf_full"))
    run = run_trainer(out, seed, model_seed=seed)
    run.update(seed=seed, out=out,
               ema_avg=clone(run["ema"].averager.average_state_dict()),
               swa_avg=clone(run["swa"].averager.average_state_dict()))
    return run


def test_ema_and_swa_match_averages_computed_by_hand_from_each_optimizer_step(full_run):
    recorder = full_run["recorder"]
    assert len(recorder.after_step) == STEPS
    assert_average(full_run["ema_avg"], hand_ema(recorder.after_step), "EMA with warmup")
    # step 20 is an SWA step and an EMA evaluation step: the SWA callback, after the EMA one, must still
    # read the training weights there
    assert_average(full_run["swa_avg"], hand_swa(recorder.after_step), "SWA from step 5, every 3")
    # the average moved: the warmup reached its target decay and the last weights are not the average
    assert warmup_decay(STEPS) == EMA_DECAY
    last = recorder.after_step[-1]
    assert any((full_run["ema_avg"][n] - last[n]).abs().max() > 1e-4 for n in last)


def test_updates_once_per_optimizer_step_not_per_micro_batch(full_run):
    assert full_run["recorder"].micro_batches == STEPS * ACCUM
    for callback in (full_run["ema"], full_run["swa"]):
        assert callback.averager.step == STEPS
    assert full_run["ema"].averager.n_averaged == STEPS
    assert full_run["swa"].averager.n_averaged == (STEPS - SWA_START) // SWA_EVERY


def test_evaluations_see_the_average_and_training_resumes_on_its_own_weights(full_run):
    recorder = full_run["recorder"]
    # two eval datasets: two evaluations (two on_evaluate calls) per evaluation step
    assert recorder.eval_steps == [10, 10, 20, 20, 24, 24]
    # what the model held during each evaluation, both datasets: the EMA at that step, computed by hand
    for step, seen in zip(recorder.eval_steps, recorder.in_eval):
        assert_average(seen, hand_ema(recorder.after_step[:step]), f"weights evaluated at step {step}")
    # right after each evaluation the training weights are back, bit for bit
    for step, after in zip(recorder.eval_steps, recorder.after_eval):
        assert_same_bits(after, recorder.after_step[step - 1], f"weights after the evaluation at step {step}")


def test_copy_to_model_at_end_leaves_the_average_in_the_model(full_run):
    model_weights = {n: p.detach() for n, p in full_run["model"].named_parameters()}
    assert_same_bits(model_weights, full_run["ema_avg"], "model after training vs the EMA")
    # the SWA callback (copy_to_model_at_end=False) did not write afterwards
    assert any(not torch.equal(model_weights[n], full_run["swa_avg"][n]) for n in model_weights)


def test_every_checkpoint_folder_holds_each_average_written_atomically(full_run):
    for step in (SAVE_STEPS, STEPS):
        folder = os.path.join(full_run["out"], f"checkpoint-{step}")
        for callback in (full_run["ema"], full_run["swa"]):
            path = os.path.join(folder, callback.file_name)
            meta = WeightAveragingCallback.read_metadata(path)
            assert meta["global_step"] == step and meta["step"] == step and meta["mode"] == callback.mode
        assert not glob.glob(os.path.join(folder, ".*tmp*")), "a temporary file was left behind"
    from safetensors.torch import load_file
    saved = load_file(os.path.join(full_run["out"], f"checkpoint-{STEPS}", "swm_fused_ema.safetensors"))
    assert_same_bits(saved, full_run["ema_avg"], "checkpoint-24 EMA file")
    # the average at step 12 is the hand EMA of the first 12 steps
    at_12 = load_file(os.path.join(full_run["out"], f"checkpoint-{SAVE_STEPS}", "swm_fused_ema.safetensors"))
    assert_average(at_12, hand_ema(full_run["recorder"].after_step[:SAVE_STEPS]), "checkpoint-12 EMA file")


def test_resume_from_checkpoint_continues_bit_for_bit(full_run, tmp_path):
    # a fresh output_dir holding only checkpoint-12; resume_from_checkpoint=True finds it
    shutil.copytree(os.path.join(full_run["out"], f"checkpoint-{SAVE_STEPS}"),
                    os.path.join(tmp_path, f"checkpoint-{SAVE_STEPS}"))
    resumed = run_trainer(str(tmp_path), full_run["seed"], model_seed=full_run["seed"] + 1, resume=True)
    assert resumed["ema"].averager.step == STEPS
    assert_same_bits(resumed["recorder"].after_step[-1], full_run["recorder"].after_step[-1], "training weights")
    assert_same_bits(resumed["ema"].averager.average_state_dict(), full_run["ema_avg"], "resumed EMA")
    assert_same_bits(resumed["swa"].averager.average_state_dict(), full_run["swa_avg"], "resumed SWA")
    assert resumed["swa"].averager.n_averaged == full_run["swa"].averager.n_averaged


def test_resume_from_a_folder_outside_output_dir_needs_args_resume_from_checkpoint(full_run, tmp_path):
    folder = os.path.join(full_run["out"], f"checkpoint-{SAVE_STEPS}")
    with pytest.raises(FileNotFoundError, match="resume_from_checkpoint"):
        run_trainer(str(tmp_path / "a"), full_run["seed"], model_seed=0, resume=folder, max_steps=SAVE_STEPS + 1)
    # with it set, the callback finds the folder (one more step: the EMA is the hand EMA of 13 steps)
    run = run_trainer(str(tmp_path / "b"), full_run["seed"], model_seed=0, resume=folder, max_steps=SAVE_STEPS + 1,
                      resume_from_checkpoint=folder, eval_strategy="no", save_strategy="no")
    steps = full_run["recorder"].after_step[:SAVE_STEPS] + run["recorder"].after_step
    assert run["ema"].averager.step == SAVE_STEPS + 1
    assert_average(run["ema"].averager.average_state_dict(), hand_ema(steps), "EMA resumed from elsewhere")


def test_resume_from_a_checkpoint_saved_without_the_callback_raises(full_run, tmp_path):
    target = os.path.join(tmp_path, f"checkpoint-{SAVE_STEPS}")
    shutil.copytree(os.path.join(full_run["out"], f"checkpoint-{SAVE_STEPS}"), target)
    os.remove(os.path.join(target, "swm_fused_swa.safetensors"))
    with pytest.raises(FileNotFoundError, match="swm_fused_swa.safetensors"):
        run_trainer(str(tmp_path), full_run["seed"], model_seed=0, resume=True)


def test_a_saved_average_from_another_mode_or_step_is_refused(full_run, tmp_path):
    callback = WeightAveragingCallback("ema", name="swa")  # reads swm_fused_swa.safetensors, an SWA
    callback.on_train_begin(None, transformers.TrainerState(), None, model=tiny_model(0))
    before = clone(callback.averager.average_state_dict())
    folder = os.path.join(full_run["out"], f"checkpoint-{SAVE_STEPS}")
    with pytest.raises(ValueError, match="mode"):
        callback.load(folder)
    with pytest.raises(ValueError, match="saved at step 12"):
        WeightAveragingCallback("swa").load(folder, global_step=7)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / callback.file_name).write_bytes(b"not a safetensors file")
    with pytest.raises(OSError, match="cannot read"):
        callback.load(str(damaged))
    with pytest.raises(FileNotFoundError):
        callback.load(str(tmp_path))
    assert_same_bits(callback.averager.average_state_dict(), before, "average after refused loads")


def test_load_best_model_at_end_takes_the_average_of_the_best_checkpoint(tmp_path, fresh_seed):
    scores = iter([1.0, 3.0, 2.0])  # evaluations at steps 4, 8, 12: the middle one is the best
    model = tiny_model(fresh_seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ema = WeightAveragingCallback("ema", decay=EMA_DECAY, warmup=EMA_WARMUP)
    recorder = Recorder(optimizer, model)
    args = training_args(str(tmp_path), fresh_seed, max_steps=12, eval_steps=4, save_steps=4,
                         load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=True)
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(N_TRAIN, fresh_seed),
                      eval_dataset=TokenData(4, fresh_seed + 1), optimizers=(optimizer, None),
                      compute_metrics=lambda _: {"score": next(scores)}, callbacks=[ema, recorder])
    trainer.train()
    assert os.path.basename(trainer.state.best_model_checkpoint) == "checkpoint-8"
    from safetensors.torch import load_file
    best = load_file(os.path.join(trainer.state.best_model_checkpoint, ema.file_name))
    assert ema.averager.step == 8
    assert_same_bits({n: p.detach() for n, p in model.named_parameters()}, best, "model at the end")
    assert_average(best, hand_ema(recorder.after_step[:8]), "the best checkpoint's EMA")


# ---------------------------------------------------------------------- 2 gloo ranks: DDP and FSDP2
# One spawn (each rank pays the torch and transformers imports once) runs both parts.
DDP_STEPS, DDP_SAVE = 6, 3
FSDP_STEPS, FSDP_SAVE, FSDP_DECAY = 4, 2, 0.6


def _ranks_worker(rank: int, world: int, seed: int, out: str) -> Dict[str, Any]:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", OMP_NUM_THREADS="1")
    hf_logging.set_verbosity_error()
    return {"ddp": _ddp_part(rank, world, seed, os.path.join(out, "ddp")),
            "fsdp": _fsdp_part(rank, world, seed, os.path.join(out, "fsdp"))}


def _ddp_part(rank: int, world: int, seed: int, out: str) -> Dict[str, Any]:
    """The real Trainer under accelerate's MULTI_CPU DDP: a run, then a resume from its checkpoint."""
    results: Dict[str, Any] = {}
    for phase, resume in (("full", None), ("resumed", os.path.join(out, f"checkpoint-{DDP_SAVE}"))):
        model = tiny_model(seed + rank)  # different inits: DDP broadcasts rank 0's weights
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        ema = WeightAveragingCallback("ema", decay=0.7, copy_to_model_at_end=False)
        recorder = Recorder(optimizer, model)
        args = training_args(os.path.join(out, phase) if resume else out, seed, max_steps=DDP_STEPS,
                             gradient_accumulation_steps=2, save_steps=DDP_SAVE, eval_steps=DDP_STEPS,
                             logging_steps=DDP_STEPS, resume_from_checkpoint=resume)
        trainer = Trainer(model=model, args=args, train_dataset=TokenData(64, seed), optimizers=(optimizer, None),
                          eval_dataset=TokenData(4, seed + 1), callbacks=[ema, recorder])
        assert trainer.args.parallel_mode.name == "DISTRIBUTED" and trainer.args.world_size == world
        assert type(trainer.accelerator.prepare_model(model)).__name__ == "DistributedDataParallel"
        trainer.train(resume_from_checkpoint=resume)
        results[phase] = {"average": clone(ema.averager.average_state_dict()), "steps": recorder.after_step,
                          "averager_step": ema.averager.step, "in_eval": recorder.in_eval,
                          "after_eval": recorder.after_eval}
    return results


def _fsdp_part(rank: int, world: int, seed: int, out: str) -> Dict[str, Any]:
    """FSDP2 (fully_shard) on CPU: accelerate runs FSDP only on accelerators (on CPU it silently falls back to
    DDP), so the Trainer's events are driven here by a plain loop over a sharded model, with the Trainer's own
    state objects. Returns full (gathered) tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor
    from transformers import TrainerControl, TrainerState

    mesh = init_device_mesh("cpu", (world,))
    args = TrainingArguments(output_dir=out, use_cpu=True, report_to=[])
    data = TokenData(FSDP_STEPS * world * 2, seed).ids.view(FSDP_STEPS, world, 2, SEQ)
    eval_ids = TokenData(2, seed + 5).ids

    def sharded(model_seed: int, weights: Dict[str, Tensor] = None):
        model = tiny_model(model_seed)
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if weights is not None:  # each rank copies its own slice, no communication
            with torch.no_grad():
                for name, p in model.named_parameters():
                    part = distribute_tensor(weights[name], mesh, p.placements, src_data_rank=None)
                    p.to_local().copy_(part.to_local())
        return model

    def full(model) -> Dict[str, Tensor]:
        return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}

    def train(model, callback, state, control, steps, record):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.2)  # no optimizer state: a resume needs none
        for step in steps:
            loss = model(input_ids=data[step, rank], labels=data[step, rank]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            state.global_step += 1
            record.append(full(model))
            control.should_evaluate = step + 1 == FSDP_STEPS
            callback.on_step_end(args, state, control, model=model)
            if state.global_step == FSDP_SAVE:
                folder = os.path.join(out, f"checkpoint-{FSDP_SAVE}")
                if rank == 0:
                    os.makedirs(folder, exist_ok=True)
                    state.save_to_json(os.path.join(folder, "trainer_state.json"))
                torch.distributed.barrier()
                callback.on_save(args, state, control, model=model)  # every rank gathers, rank 0 writes
                torch.distributed.barrier()

    results: Dict[str, Any] = {}
    model = sharded(seed)
    assert isinstance(next(model.parameters()), DTensor)
    callback, state, control = WeightAveragingCallback("ema", decay=FSDP_DECAY), TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control, model=model)
    record: List[Dict[str, Tensor]] = []
    train(model, callback, state, control, range(FSDP_STEPS), record)
    average = {n: t.full_tensor() for n, t in callback.averager.average_state_dict().items()}
    # the Trainer's flow asked for an evaluation at the last step: its forward runs on the average
    model.eval()
    with torch.no_grad():
        results["eval_logits"] = model(input_ids=eval_ids).logits
    callback.on_evaluate(args, state, control, model=model)
    model.train()
    results["after_eval"] = full(model)
    callback.on_train_end(args, state, control, model=model)
    results.update(steps=record, average=average, at_end=full(model))

    # resume from checkpoint-2 in a fresh callback and a sharded model of another init
    resumed_model = sharded(seed + 1, record[FSDP_SAVE - 1])
    callback = WeightAveragingCallback("ema", decay=FSDP_DECAY, copy_to_model_at_end=False)
    state = TrainerState.load_from_json(os.path.join(out, f"checkpoint-{FSDP_SAVE}", "trainer_state.json"))
    callback.on_train_begin(args, state, control, model=resumed_model)
    train(resumed_model, callback, state, TrainerControl(), range(FSDP_SAVE, FSDP_STEPS), [])
    results["resumed"] = {n: t.full_tensor() for n, t in callback.averager.average_state_dict().items()}
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    seed = random.randrange(2**31)
    print(f"two_ranks seed={seed}")
    tmp = tmp_path_factory.mktemp("hf_ranks")
    results = run_ranks(_ranks_worker, 2, tmp, seed, str(tmp / "out"))
    errors = [r["traceback"] for r in results if "error" in r]
    assert not errors, errors[0]
    return {"ranks": [r["ok"] for r in results], "out": str(tmp / "out"), "seed": seed}


def hand_ema_fixed(weights: List[Dict[str, Tensor]], decay: float) -> Dict[str, Tensor]:
    expected = {n: t.double() for n, t in weights[0].items()}
    for theta in weights[1:]:
        expected = {n: decay * expected[n] + (1 - decay) * theta[n].double() for n in expected}
    return expected


def test_ddp_under_accelerate_two_gloo_ranks(two_ranks):
    ranks = [r["ddp"] for r in two_ranks["ranks"]]
    # replicas stay identical, so the averages of both ranks are equal bit for bit
    assert_same_bits(ranks[0]["full"]["average"], ranks[1]["full"]["average"], "rank 0 vs rank 1")
    steps = ranks[0]["full"]["steps"]
    assert len(steps) == DDP_STEPS and ranks[0]["full"]["averager_step"] == DDP_STEPS
    assert_average(ranks[0]["full"]["average"], hand_ema_fixed(steps, 0.7), "DDP EMA")
    # the evaluation at the last step ran on the average on both ranks, then the training weights came back
    for rank in ranks:
        assert len(rank["full"]["in_eval"]) == 1
        assert_same_bits(rank["full"]["in_eval"][0], ranks[0]["full"]["average"], "weights evaluated under DDP")
        assert_same_bits(rank["full"]["after_eval"][0], steps[-1], "weights after the evaluation under DDP")
    # one file (rank 0 writes); both ranks resume from it and continue bit for bit
    assert os.path.isfile(os.path.join(two_ranks["out"], "ddp", f"checkpoint-{DDP_SAVE}", "swm_fused_ema.safetensors"))
    for rank in ranks:
        assert rank["resumed"]["averager_step"] == DDP_STEPS
        assert_same_bits(rank["resumed"]["average"], ranks[0]["full"]["average"], "resumed DDP EMA")


def test_fsdp2_shards_average_save_gathered_resume_and_evaluate_on_the_average(two_ranks):
    ranks = [r["fsdp"] for r in two_ranks["ranks"]]
    steps = ranks[0]["steps"]
    expected = hand_ema_fixed(steps, FSDP_DECAY)
    for rank in ranks:
        assert_average(rank["average"], expected, "FSDP2 EMA (gathered)")
        assert_same_bits(rank["resumed"], rank["average"], "FSDP2 EMA resumed from checkpoint-2")
        assert_same_bits(rank["after_eval"], steps[-1], "training weights after the evaluation")
        assert_same_bits(rank["at_end"], rank["average"], "model after copy_to_model_at_end")
    from safetensors.torch import load_file
    saved = load_file(os.path.join(two_ranks["out"], "fsdp", f"checkpoint-{FSDP_SAVE}", "swm_fused_ema.safetensors"))
    assert_average(saved, hand_ema_fixed(steps[:FSDP_SAVE], FSDP_DECAY), "checkpoint-2 file (full tensors)")
    # the evaluation's forward ran on the average: the same logits as an unsharded model holding it
    reference = tiny_model(0)
    reference.load_state_dict(ranks[0]["average"], strict=False)
    with torch.no_grad():
        logits = reference(input_ids=TokenData(2, two_ranks["seed"] + 5).ids).logits
    for rank in ranks:
        assert_close(rank["eval_logits"], logits, atol=1e-5, rtol=1e-5, what="logits evaluated on the average")


# ---------------------------------------------------------------------------- arguments, imports
@pytest.mark.parametrize("kwargs, error", [
    (dict(mode="ewma"), ValueError), (dict(mode=1), TypeError), (dict(decay=1.5), ValueError),
    (dict(decay="0.9"), TypeError), (dict(mode="swa", warmup=True), ValueError), (dict(warmup=3), TypeError),
    (dict(warmup={"warmup_power": -1.0}), ValueError), (dict(start_step=-1), ValueError),
    (dict(every=0), ValueError), (dict(every=2.0), TypeError), (dict(dtype=torch.int32), TypeError),
    (dict(dtype="float32"), TypeError), (dict(eval_with_average=1), TypeError), (dict(name="a/b"), ValueError),
    (dict(name=3), TypeError), (dict(device=0), TypeError),
])
def test_bad_arguments_raise_the_package_exception_types(kwargs, error):
    with pytest.raises(error):
        WeightAveragingCallback(**kwargs)


def test_the_averager_before_training_is_a_runtime_error():
    with pytest.raises(RuntimeError, match="trainer.train"):
        WeightAveragingCallback().averager


def test_missing_transformers_raises_an_import_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # "import transformers" now fails
    monkeypatch.delitem(sys.modules, "swm_fused.integrations.transformers")
    with pytest.raises(ImportError, match=r"pip install 'swm_fused\[transformers\]'"):
        importlib.import_module("swm_fused.integrations.transformers")


def test_the_example_trains_evaluates_and_resumes_bit_for_bit(tmp_path):
    spec = importlib.util.spec_from_file_location("hf_trainer_ema", os.path.join(ROOT, "examples", "hf_trainer_ema.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--steps", "8", "--output-dir", str(tmp_path)])
    assert result["resumed_bit_for_bit"] == 1.0
    assert torch.isfinite(torch.tensor([result["raw_loss"], result["ema_loss"]])).all()
    assert result["raw_loss"] != result["ema_loss"]  # the second evaluation really ran on the average
