"""swm_fused.integrations.lightning beside Lightning's own callbacks, in real Trainer runs on CPU.

Every comparison runs Lightning's callback and ours on identical copies of a tiny LightningModule
with fresh random data (the seed is printed). The module records its weights after every optimizer
step and at every validation, so each run is also checked against an EMA/SWA computed here in
float64 from those records. Covered: EMAWeightAveraging, WeightAveraging (default SWA, a stock
torch function, a custom function, an overridden should_update) and StochasticWeightAveraging side
by side with Lightning's; swap and restore around validation; checkpoint, resume, and checkpoint
interchange in both directions; warmup; NaN/Inf skip; an fp32 average of a bf16 model; bad input;
the optional-dependency rules; the example. One spawn of two gloo ranks runs DDP and FSDP2
(ModelParallelStrategy) fits, including a distributed checkpoint and resume.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch import callbacks as lightning_callbacks  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch.optim.swa_utils import get_ema_avg_fn  # noqa: E402

from swm_fused import EMAWarmup  # noqa: E402
from swm_fused.integrations import lightning as ours  # noqa: E402

from _helpers import assert_close  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*"),
    pytest.mark.filterwarnings("ignore:.*The number of training batches.*"),
    pytest.mark.filterwarnings("ignore:.*Checkpoint directory.*exists and is not empty.*"),
    pytest.mark.filterwarnings("ignore:.*The dirpath has changed from.*"),
    pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint need to be provided.*"),
]

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # "GPU available: False" and the like
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)

FP32 = dict(atol=2e-6, rtol=2e-5)  # two fp32 averages of the same weights, different formulas (a few ulps)


# ----------------------------------------------------------------------------------------- model
class Net(pl.LightningModule):
    """A small regression model that records its weights after every optimizer step and at validation."""

    def __init__(self, batch_norm: bool = True, lr: float = 0.05, width: int = 16):
        super().__init__()
        layers: List[nn.Module] = [nn.Linear(6, width)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(width))
        layers += [nn.Tanh(), nn.Linear(width, 1)]
        self.net = nn.Sequential(*layers)
        self.lr = lr
        self.records: List[Tuple[str, int, Dict[str, Tensor]]] = []  # ("step" | "epoch", global_step, state)
        self.val_states: List[Dict[str, Tensor]] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.val_states.append(snapshot(self))
        x, y = batch
        return F.mse_loss(self(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.records.append(("step", self.trainer.global_step, snapshot(self)))

    def on_train_epoch_end(self):
        self.records.append(("epoch", self.trainer.current_epoch, snapshot(self)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def snapshot(module: nn.Module) -> Dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def loader(n: int = 48, batch_size: int = 8, dtype: torch.dtype = torch.float32):
    x = torch.randn(n, 6).to(dtype)
    y = (x.float() @ torch.randn(6, 1) + 0.1 * torch.randn(n, 1)).to(dtype)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def fit(module: Net, callbacks: List[Any], epochs: int, root: Path, data, ckpt_path: Optional[str] = None,
        checkpoint_dir: Optional[Path] = None, **kwargs: Any) -> "pl.Trainer":
    callbacks = list(callbacks)
    if checkpoint_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, filename="{epoch}", save_top_k=-1))
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=checkpoint_dir is not None,
                         default_root_dir=root, accelerator="cpu", devices=1, **kwargs)
    trainer.fit(module, data, data, ckpt_path=ckpt_path)
    return trainer


def floating(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    return {k: v for k, v in state.items() if v.is_floating_point()}


def assert_states_close(actual: Dict[str, Tensor], expected: Dict[str, Tensor], what: str, atol: float,
                        rtol: float) -> None:
    assert set(floating(actual)) == set(floating(expected)), what
    for k, v in floating(expected).items():
        assert_close(actual[k], v, atol, rtol, f"{what}: {k}")


def assert_states_equal(actual: Dict[str, Tensor], expected: Dict[str, Tensor], what: str) -> None:
    assert set(actual) == set(expected), what
    for k in expected:
        assert torch.equal(actual[k], expected[k]), f"{what}: {k} differs"


def ema_oracle(records, decay_at: Callable[[int], float],
               update_at: Callable[[str, int], bool]) -> Tuple[Dict[str, Tensor], int]:
    """float64 EMA of the recorded weights at the updates Lightning's rule picks; the first update copies.
    ``decay_at`` gets the optimizer step count at the update."""
    avg: Optional[Dict[str, Tensor]] = None
    n = 0
    step = 0
    for kind, index, state in records:
        if kind == "step":
            step = index
        if not update_at(kind, index):
            continue
        state64 = {k: v.double() for k, v in floating(state).items()}
        if avg is None:
            avg = state64
        else:
            d = decay_at(step)
            avg = {k: d * avg[k] + (1 - d) * state64[k] for k in avg}
        n += 1
    assert avg is not None
    return avg, n


def lightning_ema_rule(every: int, start_step: Optional[int], start_epoch: Optional[int]):
    def update_at(kind: str, index: int) -> bool:
        if kind == "step":
            step_idx = index - 1
            return (start_step is None or step_idx >= start_step) and every > 0 and step_idx % every == 0
        return start_epoch is not None and index >= start_epoch
    return update_at


# ------------------------------------------------------------------------- optional dependency
def test_missing_lightning_gives_an_actionable_import_error(monkeypatch):
    for name in [m for m in sys.modules if m == "lightning" or m.startswith("lightning.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes the import fail
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.delitem(sys.modules, "swm_fused.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install 'swm_fused\[lightning\]'") as info:
        importlib.import_module("swm_fused.integrations.lightning")
    assert "lightning.pytorch" in str(info.value)


# -------------------------------------------------------------------------------- EMA side by side
@pytest.mark.parametrize("use_buffers", [True, False])
def test_ema_matches_lightning_and_swaps_for_validation(tmp_path, use_buffers):
    decay = 0.5 + 0.4 * torch.rand(()).item()
    rule = dict(update_every_n_steps=2, update_starting_at_step=1, update_starting_at_epoch=1,
                use_buffers=use_buffers)
    data = loader()
    base = Net()
    theirs_module, ours_module = copy.deepcopy(base), copy.deepcopy(base)
    theirs = lightning_callbacks.EMAWeightAveraging(decay=decay, **rule)
    mine = ours.EMAWeightAveraging(decay=decay, **rule)
    fit(theirs_module, [theirs], 3, tmp_path / "theirs", data)
    fit(ours_module, [mine], 3, tmp_path / "ours", data)

    # the same training: our swap restored the training weights after every validation
    assert len(ours_module.records) == len(theirs_module.records) == 3 * 6 + 3
    for (_, _, a), (_, _, b) in zip(ours_module.records, theirs_module.records):
        assert_states_close(a, b, "training weights", **FP32)
    expected, n = ema_oracle(ours_module.records, lambda s: decay,
                             lightning_ema_rule(2, 1, 1))
    assert mine.n_averaged == n and mine.skipped == 0
    if not use_buffers:  # BatchNorm statistics are not averaged: the model keeps its own
        expected = {k: v for k, v in expected.items() if "running" not in k}
    # after fit both models hold their averages
    final_ours, final_theirs = snapshot(ours_module), snapshot(theirs_module)
    final_ours = {k: v for k, v in final_ours.items() if k in expected or not v.is_floating_point()}
    final_theirs = {k: v for k, v in final_theirs.items() if k in expected or not v.is_floating_point()}
    assert_states_close(final_ours, expected, "ours vs float64 EMA", **FP32)
    assert_states_close(final_theirs, expected, "Lightning's vs float64 EMA", **FP32)
    assert_states_close(snapshot(ours_module), snapshot(theirs_module), "ours vs Lightning's", **FP32)
    # integer buffers keep their latest value (Lightning passes them through the EMA formula)
    assert int(final_ours["net.1.num_batches_tracked"]) == 18
    # validation saw the average: sanity check (initial weights) plus one per epoch
    assert len(ours_module.val_states) == len(theirs_module.val_states) == 4
    for a, b in zip(ours_module.val_states, theirs_module.val_states):
        if not use_buffers:  # ours keeps the model's own statistics; Lightning's, a copy from the last update
            a, b = ({k: v for k, v in state.items() if "running" not in k} for state in (a, b))
        assert_states_close(a, b, "weights seen by validation", **FP32)
    if not use_buffers:
        epoch_ends = [state for kind, _, state in ours_module.records if kind == "epoch"]
        for val_state, live in zip(ours_module.val_states[1:], epoch_ends):
            assert all(torch.equal(val_state[k], live[k]) for k in live if "running" in k)
    last_train = ours_module.records[-1][2]
    assert any(not torch.equal(ours_module.val_states[-1][k], last_train[k]) for k in floating(last_train))


class Probe(pl.Callback):
    """Placed before and after the averaging callback: records the weights around its validation hooks."""

    def __init__(self):
        self.before: List[Dict[str, Tensor]] = []
        self.after: List[Dict[str, Tensor]] = []

    def on_validation_epoch_start(self, trainer, pl_module):
        self.before.append(snapshot(pl_module))

    def on_validation_epoch_end(self, trainer, pl_module):
        self.after.append(snapshot(pl_module))


def test_validation_swap_is_exact_and_restores_bit_for_bit(tmp_path):
    first, last = Probe(), Probe()
    mine = ours.EMAWeightAveraging(decay=0.8)
    module = Net()
    seen: List[Dict[str, Tensor]] = []

    class Check(pl.Callback):  # after ours: the average is swapped in; a checkpoint saved now is still right
        def on_validation_epoch_start(self, trainer, pl_module):
            seen.append({k: v.detach().clone() for k, v in mine.average_state_dict().items()})
            if trainer.current_epoch == 1 and not trainer.sanity_checking:
                trainer.save_checkpoint(tmp_path / "during_validation.ckpt")

    fit(module, [first, mine, Check(), last], 2, tmp_path, loader())
    assert len(first.before) == 3
    for before, restored in zip(first.before, last.after):
        assert_states_equal(restored, before, "weights after validation vs before")
    for average, val_state in zip(seen, module.val_states):
        for name, value in average.items():
            assert torch.equal(val_state[name], value.to(val_state[name].dtype)), name
    saved = torch.load(tmp_path / "during_validation.ckpt", weights_only=False)
    assert_states_equal(saved["current_model_state"], first.before[2], "saved while swapped: training weights")
    assert_states_equal(saved["state_dict"], seen[2], "saved while swapped: average")


# ------------------------------------------------------------------ WeightAveraging side by side
class EveryOtherStep:
    """An overridden should_update, mixed into Lightning's class and ours alike."""

    def should_update(self, step_idx=None, epoch_idx=None):
        return (step_idx is not None and step_idx % 2 == 1) or epoch_idx == 1


@pytest.mark.parametrize("fn", ["swa", "torch_ema", "custom", "custom_multi"])
def test_weight_averaging_matches_lightning(tmp_path, fn):
    decay = 0.5 + 0.4 * torch.rand(()).item()
    kwargs: Dict[str, Any] = {}
    if fn == "torch_ema":
        kwargs = dict(avg_fn=get_ema_avg_fn(decay))  # the docs' example: runs fused here
    elif fn == "custom":
        kwargs = dict(avg_fn=lambda avg, cur, n: avg + (cur - avg) * (0.3 if n < 3 else 0.1))
    elif fn == "custom_multi":
        kwargs = dict(multi_avg_fn=lambda avgs, curs, n: torch._foreach_lerp_(avgs, curs, 0.25))

    class Theirs(EveryOtherStep, lightning_callbacks.WeightAveraging):
        pass

    class Ours(EveryOtherStep, ours.WeightAveraging):
        pass

    data = loader()
    base = Net(batch_norm=False)
    theirs_module, ours_module = copy.deepcopy(base), copy.deepcopy(base)
    fit(theirs_module, [Theirs(**kwargs)], 2, tmp_path / "theirs", data)
    mine = Ours(**kwargs)
    fit(ours_module, [mine], 2, tmp_path / "ours", data)
    assert mine.n_averaged == 3 + 3 + 1  # steps 1, 3, 5 of each epoch, and the end of epoch 1
    assert_states_close(snapshot(ours_module), snapshot(theirs_module), f"{fn}: ours vs Lightning's", **FP32)
    for a, b in zip(ours_module.val_states, theirs_module.val_states):
        assert_states_close(a, b, f"{fn}: validation weights", **FP32)


# --------------------------------------------------------------------------- checkpoints
def run_with_checkpoints(kind: str, root: Path, base: Net, data, decay: float, epochs: int = 2,
                         resume: Optional[Path] = None) -> Tuple[Net, Any]:
    module = copy.deepcopy(base)
    callback = (ours.EMAWeightAveraging(decay=decay, update_every_n_steps=2) if kind == "ours"
                else lightning_callbacks.EMAWeightAveraging(decay=decay, update_every_n_steps=2))
    fit(module, [callback], epochs, root, data, ckpt_path=None if resume is None else str(resume),
        checkpoint_dir=root / "ckpt")
    return module, callback


def test_checkpoint_resume_and_interchange_with_lightning(tmp_path):
    decay = 0.5 + 0.4 * torch.rand(()).item()
    data = loader()
    base = Net()
    ours_full, _ = run_with_checkpoints("ours", tmp_path / "ours_full", base, data, decay, epochs=4)
    run_with_checkpoints("ours", tmp_path / "ours_half", base, data, decay)
    run_with_checkpoints("theirs", tmp_path / "theirs_half", base, data, decay)
    ours_ckpt = tmp_path / "ours_half" / "ckpt" / "epoch=1.ckpt"
    theirs_ckpt = tmp_path / "theirs_half" / "ckpt" / "epoch=1.ckpt"

    # the same keys as Lightning's checkpoint
    mine, lightnings = (torch.load(p, weights_only=False) for p in (ours_ckpt, theirs_ckpt))
    assert set(mine["averaging_state"]) == set(lightnings["averaging_state"]) == {"n_averaged"}
    assert int(mine["averaging_state"]["n_averaged"]) == int(lightnings["averaging_state"]["n_averaged"]) == 6
    for key in ("state_dict", "current_model_state"):
        assert set(mine[key]) == set(lightnings[key])
        assert_states_close(mine[key], lightnings[key], key, **FP32)
    # updates after steps 1, 3, ..., 11 (step_idx 0, 2, ..., 10)
    assert mine["callbacks"]["EMAWeightAveraging"]["latest_update_step"] == 11
    assert lightnings["callbacks"]["EMAWeightAveraging"]["latest_update_step"] == 11

    # ours resumed from ours: bit for bit the uninterrupted run
    ours_ours, cb = run_with_checkpoints("ours", tmp_path / "oo", base, data, decay, 4, resume=ours_ckpt)
    assert_states_equal(snapshot(ours_ours), snapshot(ours_full), "resumed vs uninterrupted (average)")
    assert_states_equal(ours_ours.records[-1][2], ours_full.records[-1][2], "resumed vs uninterrupted (weights)")
    assert cb.n_averaged == 12

    # Lightning's checkpoint into ours, ours into Lightning's: the same runs within rounding
    theirs_ours, _ = run_with_checkpoints("ours", tmp_path / "to", base, data, decay, 4, resume=theirs_ckpt)
    theirs_theirs, _ = run_with_checkpoints("theirs", tmp_path / "tt", base, data, decay, 4, resume=theirs_ckpt)
    ours_theirs, _ = run_with_checkpoints("theirs", tmp_path / "ot", base, data, decay, 4, resume=ours_ckpt)
    for module, what in ((theirs_ours, "Lightning's checkpoint resumed by ours"),
                         (theirs_theirs, "Lightning's checkpoint resumed by Lightning's"),
                         (ours_theirs, "our checkpoint resumed by Lightning's")):
        assert_states_close(snapshot(module), snapshot(ours_full), what, **FP32)
        assert_states_close(module.records[-1][2], ours_full.records[-1][2], what + " (training weights)", **FP32)


def test_plain_checkpoint_starts_the_average_from_its_weights(tmp_path):
    data = loader()
    module = Net()
    fit(module, [], 1, tmp_path / "plain", data, checkpoint_dir=tmp_path / "plain" / "ckpt")
    plain = torch.load(tmp_path / "plain" / "ckpt" / "epoch=0.ckpt", weights_only=False)["state_dict"]
    mine = ours.EMAWeightAveraging(decay=0.9)
    seen = []

    class First(pl.Callback):  # after ours: sees the average as loaded, before any update
        def on_train_start(self, trainer, pl_module):
            seen.append({k: v.clone() for k, v in mine.average_state_dict().items()})

    with pytest.warns(UserWarning, match="not written by a weight-averaging callback"):
        fit(Net(), [mine, First()], 2, tmp_path / "resume", data,
            ckpt_path=str(tmp_path / "plain" / "ckpt" / "epoch=0.ckpt"))
    assert_states_equal({k: v for k, v in seen[0].items()}, {k: plain[k] for k in seen[0]}, "average at resume")


# ------------------------------------------------------------------------------ beyond Lightning
def test_warmup_and_nonfinite_skip(tmp_path):
    decay = 0.9 + 0.09 * torch.rand(()).item()
    warmup = dict(warmup_gamma=1.0, warmup_power=0.75, update_after_step=2)
    poisoned_step = 5
    mine = ours.EMAWeightAveraging(decay=decay, warmup=warmup)

    class Poison(pl.Callback):  # NaN in one weight around our update at one step, then the weight back
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == poisoned_step:
                self.saved = pl_module.net[0].weight.detach().clone()
                pl_module.net[0].weight.data[0, 0] = math.nan

    class Unpoison(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == poisoned_step:
                pl_module.net[0].weight.data.copy_(poison.saved)

    poison = Poison()
    module = Net()
    fit(module, [poison, mine, Unpoison()], 2, tmp_path, loader())
    assert mine.skipped == 1 and mine.n_averaged == 11
    ramp = EMAWarmup(**warmup)
    # the oracle without the poisoned step: the records hold the weights after Unpoison
    records = [r for r in module.records if not (r[0] == "step" and r[1] == poisoned_step)]
    expected, n = ema_oracle(records, lambda s: ramp.decay_at(s, decay), lightning_ema_rule(1, None, None))
    assert n == 11
    assert_states_close(snapshot(module), expected, "warmup EMA with a skipped step", **FP32)
    assert all(torch.isfinite(v).all() for v in floating(snapshot(module)).values())


def test_fp32_average_of_a_bf16_model(tmp_path):
    decay = 0.5 + 0.4 * torch.rand(()).item()
    data = loader(dtype=torch.bfloat16)
    base = Net(batch_norm=False)
    ours_module, theirs_module = copy.deepcopy(base), copy.deepcopy(base)
    mine = ours.EMAWeightAveraging(decay=decay)
    fit(ours_module, [mine], 2, tmp_path / "ours", data, precision="bf16-true",
        checkpoint_dir=tmp_path / "ours" / "ckpt")
    fit(theirs_module, [lightning_callbacks.EMAWeightAveraging(decay=decay)], 2, tmp_path / "theirs", data,
        precision="bf16-true")
    assert all(v.dtype == torch.bfloat16 for v in floating(ours_module.records[-1][2]).values())
    average = mine.average_state_dict()
    assert all(v.dtype == torch.float32 for v in average.values())
    expected, _ = ema_oracle(ours_module.records, lambda s: decay, lightning_ema_rule(1, None, None))
    assert_states_close(average, expected, "fp32 average of bf16 weights vs float64 EMA", **FP32)
    # Lightning's keeps a bf16 average: it agrees with ours to bf16 rounding only
    assert_states_close(snapshot(theirs_module), {k: v.float() for k, v in average.items()},
                        "Lightning's bf16 average", atol=2e-2, rtol=2e-2)
    saved = torch.load(tmp_path / "ours" / "ckpt" / "epoch=1.ckpt", weights_only=False)
    assert all(v.dtype == torch.float32 for v in saved["state_dict"].values())  # the checkpoint keeps fp32
    assert all(v.dtype == torch.bfloat16 for v in saved["current_model_state"].values())


# -------------------------------------------------------------------------------------- SWA
def swa_pair(**kwargs):
    return lightning_callbacks.StochasticWeightAveraging(**kwargs), ours.StochasticWeightAveraging(**kwargs)


def test_stochastic_weight_averaging_matches_lightning_and_interchanges(tmp_path):
    kwargs = dict(swa_lrs=0.02, swa_epoch_start=2, annealing_epochs=1)
    data = loader()
    base = Net()  # with BatchNorm: Lightning's extra epoch recomputes its statistics
    modules = {}
    for name, callback in zip(("theirs", "ours"), swa_pair(**kwargs)):
        modules[name] = copy.deepcopy(base)
        fit(modules[name], [callback], 4, tmp_path / name, data, checkpoint_dir=tmp_path / name / "ckpt")
        if name == "ours":
            assert callback.n_averaged.item() == 3 and callback.skipped == 0
    assert_states_close(snapshot(modules["ours"]), snapshot(modules["theirs"]), "SWA: ours vs Lightning's", **FP32)
    # the float64 SWA of the weights at the start of epochs 1, 2, 3 (= the end of epochs 0, 1, 2)
    ends = [state for kind, _, state in modules["ours"].records if kind == "epoch"][:3]
    params = dict(base.named_parameters())  # BatchNorm statistics are recomputed, not averaged
    expected = {k: sum(s[k].double() for s in ends) / 3 for k in ends[0] if k in params}
    assert_states_close({k: v for k, v in snapshot(modules["ours"]).items() if k in expected}, expected,
                        "SWA vs float64 mean", **FP32)

    # a checkpoint in the middle of averaging, resumed by the other callback
    for writer, reader in (("theirs", "ours"), ("ours", "theirs")):
        module = copy.deepcopy(base)
        callback = swa_pair(**kwargs)[0 if reader == "theirs" else 1]
        fit(module, [callback], 4, tmp_path / f"{writer}-{reader}", data,
            ckpt_path=str(tmp_path / writer / "ckpt" / "epoch=2.ckpt"))
        assert_states_close(snapshot(module), snapshot(modules[reader]), f"SWA {writer} -> {reader}", **FP32)


def test_stochastic_weight_averaging_with_a_custom_avg_fn_matches_lightning(tmp_path):
    kwargs = dict(swa_lrs=0.02, swa_epoch_start=2, annealing_epochs=1,
                  avg_fn=lambda avg, cur, n: avg + (cur - avg) * 0.25)
    data = loader()
    base = Net(batch_norm=False)
    modules = {}
    for name, callback in zip(("theirs", "ours"), swa_pair(**kwargs)):
        modules[name] = copy.deepcopy(base)
        fit(modules[name], [callback], 4, tmp_path / name, data)
    assert_states_close(snapshot(modules["ours"]), snapshot(modules["theirs"]), "SWA avg_fn: ours vs Lightning's",
                        **FP32)


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("make, error", [
    (lambda: ours.EMAWeightAveraging(decay=1.5), ValueError),
    (lambda: ours.EMAWeightAveraging(decay="0.9"), TypeError),
    (lambda: ours.EMAWeightAveraging(update_every_n_steps=-1), ValueError),
    (lambda: ours.EMAWeightAveraging(update_starting_at_step=1.5), TypeError),
    (lambda: ours.EMAWeightAveraging(warmup="yes"), TypeError),
    (lambda: ours.EMAWeightAveraging(warmup=dict(warmup_power=0)), ValueError),
    (lambda: ours.EMAWeightAveraging(multi_avg_fn=None), TypeError),
    (lambda: ours.WeightAveraging(device=3.0), TypeError),
    (lambda: ours.WeightAveraging(device="nowhere"), ValueError),
    (lambda: ours.WeightAveraging(use_buffers="yes"), TypeError),
    (lambda: ours.WeightAveraging(avg_fn=get_ema_avg_fn(0.9), multi_avg_fn=lambda a, b, n: None), ValueError),
    (lambda: ours.WeightAveraging(avg_fn=3), TypeError),
    (lambda: ours.WeightAveraging(dtype=torch.int32), TypeError),
    (lambda: ours.WeightAveraging(skip_nonfinite=1), TypeError),
    (lambda: ours.StochasticWeightAveraging(swa_lrs=0.1, dtype="float32"), TypeError),
])
def test_bad_arguments_raise(make, error):
    with pytest.raises(error):
        make()


def test_the_average_before_fitting_is_a_runtime_error():
    callback = ours.EMAWeightAveraging()
    with pytest.raises(RuntimeError, match="when fitting starts"):
        callback.average_state_dict()
    with pytest.raises(RuntimeError, match="when fitting starts"):
        callback.n_averaged


# --------------------------------------------------------------------------------------- example
def test_example_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("lightning_ema_example", ROOT / "examples" / "lightning_ema.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--epochs", "3", "--train-size", "256", "--root", str(tmp_path)])
    assert result["n_averaged"] > 0 and math.isfinite(result["val_loss_average"])
    assert "EMA" in capsys.readouterr().out


# ------------------------------------------------------------------------ DDP and FSDP2, two ranks
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "reduce_scatter_tensor", "barrier", "send", "recv", "isend", "irecv")


@contextlib.contextmanager
def counting_collectives(counts: List[str]):
    """Count torch.distributed calls (Python API) and dispatched collectives (DTensor's CommDebugMode)."""
    import torch.distributed as dist
    from torch.distributed.tensor.debug import CommDebugMode
    saved = []
    for module in (dist, dist.distributed_c10d):
        for name in COLLECTIVES:
            original = getattr(module, name, None)
            if original is None:
                continue

            def wrapper(*args, __name=name, __original=original, **kwargs):
                counts.append(__name)
                return __original(*args, **kwargs)
            saved.append((module, name, original))
            setattr(module, name, wrapper)
    mode = CommDebugMode()
    try:
        with mode:
            yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)
        counts.extend(str(op) for op in mode.get_comm_counts())


def counting(cls):
    """``cls`` with its update and swap hooks run under counting_collectives."""

    class Counting(cls):
        collectives: List[str] = []

        def on_train_batch_end(self, *args, **kwargs):
            with counting_collectives(self.collectives):
                super().on_train_batch_end(*args, **kwargs)

        def on_train_epoch_end(self, *args, **kwargs):
            with counting_collectives(self.collectives):
                super().on_train_epoch_end(*args, **kwargs)

        def on_train_epoch_start(self, *args, **kwargs):
            with counting_collectives(self.collectives):
                super().on_train_epoch_start(*args, **kwargs)

        def on_validation_epoch_start(self, *args, **kwargs):
            with counting_collectives(self.collectives):
                super().on_validation_epoch_start(*args, **kwargs)

        def on_validation_epoch_end(self, *args, **kwargs):
            with counting_collectives(self.collectives):
                super().on_validation_epoch_end(*args, **kwargs)

    Counting.__qualname__ = cls.__qualname__  # the same callback state key
    Counting.collectives = []
    return Counting


class ShardedNet(Net):
    """Net with FSDP2 applied in configure_model (ModelParallelStrategy's data-parallel mesh)."""

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard
        if getattr(self, "_sharded", False):
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)
        self._sharded = True


def distributed_data(seed: int, batch_size: int, rank: int = 0, world: int = 1):
    """Rank ``rank``'s samples ``rank, rank + world, ...`` in order: the ranks' k-th batches together are the
    k-th batch of ``batch_size * world`` samples of one process."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 6, generator=gen)  # 4 steps an epoch
    y = x @ torch.randn(6, 1, generator=gen) + 0.1 * torch.randn(32, 1, generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[rank::world], y[rank::world]),
                                       batch_size=batch_size)


def _ranks_main(rank: int, world: int, root: str, seed: int, decay: float) -> Dict[str, Any]:
    """One process of the 2-rank run: DDP fits (ours and Lightning's EMA), FSDP2 fits (EMA with a distributed
    checkpoint and resume; SWA). Returns CPU tensors for the parent to check."""
    import warnings
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
    from torch.distributed.tensor import DTensor
    root_path = Path(root)
    out: Dict[str, Any] = {}

    def trainer(strategy, callbacks, epochs, where, checkpoint=False):
        os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world))  # Lightning's teardown drops it
        if checkpoint:
            callbacks = callbacks + [ModelCheckpoint(dirpath=root_path / where / "ckpt", filename="{epoch}",
                                                     save_top_k=-1)]
        return pl.Trainer(max_epochs=epochs, callbacks=callbacks, strategy=strategy, accelerator="cpu",
                          devices=world, logger=False, enable_progress_bar=False, enable_model_summary=False,
                          enable_checkpointing=checkpoint, default_root_dir=root_path / where,
                          num_sanity_val_steps=0, use_distributed_sampler=False)

    def full(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone().float()
                for k, v in state.items()}

    data = distributed_data(seed, batch_size=4, rank=rank, world=world)  # 8 samples a step over both ranks

    torch.manual_seed(seed)
    base = Net(batch_norm=False)
    # DDP: ours (counting collectives in its hooks) and Lightning's, on identical replicas
    ddp_ours = counting(ours.EMAWeightAveraging)(decay=decay)
    module = copy.deepcopy(base)
    trainer(DDPStrategy(process_group_backend="gloo"), [ddp_ours], 2, "ddp_ours").fit(module, data, data)
    out["ddp_ours"] = snapshot(module)
    out["ddp_ours_collectives"] = list(ddp_ours.collectives)
    module = copy.deepcopy(base)
    trainer(DDPStrategy(process_group_backend="gloo"), [lightning_callbacks.EMAWeightAveraging(decay=decay)], 2,
            "ddp_theirs").fit(module, data, data)
    out["ddp_theirs"] = snapshot(module)

    # FSDP2 through ModelParallelStrategy: uninterrupted, then 2 epochs with a checkpoint and a resume
    def fsdp_fit(epochs, where, checkpoint=False, resume=None, distributed_checkpoint=True):
        module = ShardedNet(batch_norm=False)
        module.load_state_dict(base.state_dict())
        callback = counting(ours.EMAWeightAveraging)(decay=decay)
        strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1,
                                         save_distributed_checkpoint=distributed_checkpoint)
        trainer(strategy, [callback], epochs, where, checkpoint).fit(module, data, data, ckpt_path=resume)
        return module, callback

    module, callback = fsdp_fit(4, "fsdp_full")
    out["fsdp_val_states"] = [full(state) for state in module.val_states]  # the weights validation ran on
    probe: List[str] = []  # the counter sees both kinds of collectives
    with counting_collectives(probe):
        torch.distributed.all_reduce(torch.ones(1))
        next(iter(module.parameters())).full_tensor()
    out["counter_probe"] = probe
    out["fsdp_sharded"] = all(isinstance(p, DTensor) for p in module.parameters())
    out["fsdp_local_numel"] = sum(p.to_local().numel() for p in module.parameters())
    out["fsdp_average"] = full(callback.average_state_dict())
    out["fsdp_model_after_fit"] = full(module.state_dict())
    out["fsdp_collectives"] = list(callback.collectives)
    fsdp_fit(2, "fsdp_half", checkpoint=True)
    ckpt = root_path / "fsdp_half" / "ckpt" / "epoch=1.ckpt"
    out["fsdp_checkpoint_is_dir"] = ckpt.is_dir()
    module, callback = fsdp_fit(4, "fsdp_resumed", resume=str(ckpt))
    out["fsdp_resumed_average"] = full(callback.average_state_dict())
    out["fsdp_resumed_n_averaged"] = callback.n_averaged
    # a full-state checkpoint (one file, gathered by rank 0) resumes it too
    fsdp_fit(2, "fsdp_half_full", checkpoint=True, distributed_checkpoint=False)
    ckpt = root_path / "fsdp_half_full" / "ckpt" / "epoch=1.ckpt"
    out["fsdp_full_checkpoint_is_file"] = ckpt.is_file()
    module, callback = fsdp_fit(4, "fsdp_resumed_full", resume=str(ckpt), distributed_checkpoint=False)
    out["fsdp_resumed_full_average"] = full(callback.average_state_dict())
    out["fsdp_resumed_full_n_averaged"] = callback.n_averaged

    # SWA on FSDP2 (Lightning's refuses sharded models): uninterrupted, and resumed from a distributed checkpoint
    def swa_fit(where, checkpoint=False, resume=None):
        module = ShardedNet(batch_norm=False)
        module.load_state_dict(base.state_dict())
        swa = ours.StochasticWeightAveraging(swa_lrs=0.02, swa_epoch_start=2, annealing_epochs=1, device=None)
        strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
        trainer(strategy, [swa], 3, where, checkpoint).fit(module, data, data, ckpt_path=resume)
        return full(module.state_dict())

    out["fsdp_swa"] = swa_fit("fsdp_swa", checkpoint=True)
    out["fsdp_swa_resumed"] = swa_fit("fsdp_swa_resumed", resume=str(root_path / "fsdp_swa" / "ckpt" / "epoch=1.ckpt"))
    return out


def test_ddp_and_fsdp2_on_two_gloo_ranks(tmp_path, fresh_seed):
    from _multiprocess import run_ranks
    decay = 0.5 + 0.4 * torch.rand(()).item()
    results = run_ranks(_ranks_main, 2, tmp_path, str(tmp_path), fresh_seed, decay)
    for rank, result in enumerate(results):
        assert "ok" in result, f"rank {rank}: {result.get('error')}\n{result.get('traceback')}"
    r0, r1 = results[0]["ok"], results[1]["ok"]

    # the same global batches in one process, with Lightning's own callbacks: the reference
    torch.manual_seed(fresh_seed)
    base = Net(batch_norm=False)
    data = distributed_data(fresh_seed, batch_size=8)
    reference, reference_val = {}, {}
    for name, callback, epochs in (("ema2", lightning_callbacks.EMAWeightAveraging(decay=decay), 2),
                                   ("ema4", lightning_callbacks.EMAWeightAveraging(decay=decay), 4),
                                   ("swa", lightning_callbacks.StochasticWeightAveraging(
                                       swa_lrs=0.02, swa_epoch_start=2, annealing_epochs=1), 3)):
        module = copy.deepcopy(base)
        fit(module, [callback], epochs, tmp_path / name, data, num_sanity_val_steps=0)
        reference[name] = snapshot(module)
        reference_val[name] = module.val_states

    # DDP: each rank averages its replica, with no collectives; equal on both ranks and to Lightning's
    assert_states_equal(r0["ddp_ours"], r1["ddp_ours"], "DDP: rank 0 vs rank 1")
    assert r0["ddp_ours_collectives"] == [] and r1["ddp_ours_collectives"] == []
    assert_states_close(r0["ddp_ours"], r0["ddp_theirs"], "DDP: ours vs Lightning's", **FP32)
    assert_states_close(r0["ddp_ours"], reference["ema2"], "DDP vs one process", atol=1e-5, rtol=1e-4)

    # FSDP2: sharded parameters averaged shard by shard, no collectives in the hooks, no gathering
    for r in (r0, r1):
        assert "all_reduce" in r["counter_probe"] and len(r["counter_probe"]) >= 2, r["counter_probe"]
        assert r["fsdp_sharded"] and r["fsdp_collectives"] == []
    assert r0["fsdp_local_numel"] + r1["fsdp_local_numel"] == sum(v.numel() for v in reference["ema4"].values())
    assert_states_close(r0["fsdp_average"], reference["ema4"], "FSDP2 vs one process", atol=1e-5, rtol=1e-4)
    assert_states_equal(r0["fsdp_model_after_fit"], r0["fsdp_average"], "FSDP2: model after fit holds the average")
    # validation ran on the average, shard by shard, as Lightning's one-process run validates on its average
    assert len(r0["fsdp_val_states"]) == len(reference_val["ema4"]) == 4
    for epoch, (a, b) in enumerate(zip(r0["fsdp_val_states"], reference_val["ema4"])):
        assert_states_close(a, b, f"FSDP2: weights seen by validation {epoch}", atol=1e-5, rtol=1e-4)
    # the distributed checkpoint (a folder of shards) resumes the same run
    assert r0["fsdp_checkpoint_is_dir"]
    assert r0["fsdp_resumed_n_averaged"] == 16
    assert_states_close(r0["fsdp_resumed_average"], r0["fsdp_average"], "FSDP2: resumed vs uninterrupted",
                        atol=1e-6, rtol=1e-5)
    # so does a full-state checkpoint, which also has Lightning's keys and the gathered average
    assert r0["fsdp_full_checkpoint_is_file"] and r0["fsdp_resumed_full_n_averaged"] == 16
    assert_states_close(r0["fsdp_resumed_full_average"], r0["fsdp_average"], "FSDP2: resumed from a full checkpoint",
                        atol=1e-6, rtol=1e-5)
    saved = torch.load(tmp_path / "fsdp_half_full" / "ckpt" / "epoch=1.ckpt", weights_only=False)
    assert int(saved["averaging_state"]["n_averaged"]) == 8
    assert_states_close(saved["state_dict"], reference["ema2"], "FSDP2 full checkpoint: state_dict", atol=1e-5,
                        rtol=1e-4)
    assert set(saved["current_model_state"]) == set(saved["state_dict"])
    # SWA on FSDP2 matches Lightning's SWA on one process, also when resumed from a distributed checkpoint
    assert_states_close(r0["fsdp_swa"], reference["swa"], "FSDP2 SWA vs one process", atol=1e-5, rtol=1e-4)
    assert_states_close(r0["fsdp_swa_resumed"], r0["fsdp_swa"], "FSDP2 SWA: resumed vs uninterrupted", atol=1e-6,
                        rtol=1e-5)
