"""Hugging Face Trainer: EMA or SWA of the model's weights, added as one ``TrainerCallback``.

Neither ``transformers`` nor ``accelerate`` ships an EMA (accelerate issue 3634). This callback keeps one, in
flat fused buffers (a :class:`~swm_fused.WeightAverager`), through the Trainer's own events::

    from swm_fused.integrations.transformers import WeightAveragingCallback

    trainer = Trainer(model=model, args=args, train_dataset=train,
                      callbacks=[WeightAveragingCallback(decay=0.999, warmup=True)])
    trainer.train()                  # the model ends up holding the average (copy_to_model_at_end=True)

What it does, event by event:

- ``on_train_begin``: builds the averager over ``model.named_parameters()`` (after ``accelerate`` has prepared
  the model, so FSDP2 shards are what it pairs with); on a resumed run (``global_step > 0``) it loads the
  average saved in the checkpoint the Trainer resumed from.
- ``on_step_end``: one update per optimizer step, i.e. after gradient accumulation (the Trainer calls
  ``on_substep_end``, not ``on_step_end``, for the other micro-batches).
- evaluation during training (``eval_with_average=True``): when the Trainer's flow asks for an evaluation,
  the average is swapped into the model at the evaluation's first forward (a forward pre-hook, armed until
  the next step) and swapped out, bit for bit, in ``on_evaluate``, before any checkpoint is written; a dict
  of eval datasets gets the average for each of them.
- ``on_save``: the average and its counters go into the checkpoint folder, one safetensors file written
  atomically; a resume from that folder continues bit for bit.
- ``on_train_end``: with ``load_best_model_at_end`` the average saved in the best checkpoint is loaded (the
  Trainer has just loaded that checkpoint's model); with ``copy_to_model_at_end=True`` the average is
  written into the model.

Under DDP each rank averages its own replica (identical on every rank); under FSDP2 each rank averages its
own shards and a checkpoint gathers them into full tensors (every rank takes part, one writes).
"""
from __future__ import annotations

import json
import numbers
import os
import re
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Union

import torch
from torch import Tensor

from ..averager import EMAWarmup, WeightAverager
from ..distributed import is_dtensor
from . import require

_transformers = require("transformers", "transformers")
_safetensors = require("safetensors.torch", "transformers")  # a dependency of transformers
_SafetensorError = require("safetensors", "transformers").SafetensorError

if TYPE_CHECKING:  # pragma: no cover
    from transformers import TrainerControl, TrainerState, TrainingArguments

__all__ = ["WeightAveragingCallback", "CHECKPOINT_FORMAT"]

logger = _transformers.utils.logging.get_logger(__name__)

#: the ``format`` field of the metadata of a saved average; bumped if the layout ever changes
CHECKPOINT_FORMAT = "swm_fused.WeightAveragingCallback/1"
_METADATA_KEY = "swm_fused"
_TRAINER_STATE_NAME = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME (kept here: no heavy import)
_CHECKPOINT_PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class WeightAveragingCallback(_transformers.TrainerCallback):
    """A ``transformers.TrainerCallback`` that keeps an EMA or SWA of the model's parameters.

    Args:
        mode: ``"ema"`` (exponential moving average) or ``"swa"`` (equal-weight running mean).
        decay: EMA decay in [0, 1]; with ``warmup``, the decay the warmup climbs to.
        warmup: ``True`` (an :class:`~swm_fused.EMAWarmup` with its defaults), an :class:`~swm_fused.EMAWarmup`, or a
            dict of its fields: the decay of update ``n`` follows timm's ``ModelEmaV3`` warmup. EMA only.
        start_step: optimizer steps ``1..start_step`` are not averaged; the first averaged step copies the
            weights (in both modes).
        every: after ``start_step``, average every ``every``-th optimizer step.
        dtype: the average's dtype (float32 by default, also for bf16/fp16 models).
        device: where the average lives (``None``: next to each parameter; ``"cpu"`` offloads it).
        eval_with_average: evaluations run by the Trainer during training see the averaged weights.
        copy_to_model_at_end: at the end of training the model is left holding the average.
        name: names the checkpoint file ``swm_fused_<name>.safetensors`` (default: ``mode``); give two
            callbacks in one Trainer different names.

    The averager (:attr:`averager`) is built in ``on_train_begin`` from the ``model`` the Trainer passes to
    its callbacks. A resumed run (``trainer.train(resume_from_checkpoint=...)``) loads the average saved in
    that checkpoint: the folder is ``args.resume_from_checkpoint`` when that names a folder, else
    ``<output_dir>/checkpoint-<global_step>`` (what ``resume_from_checkpoint=True`` and a path inside
    ``output_dir`` resolve to); the folder's ``trainer_state.json`` must match the resumed state.
    """

    def __init__(self, mode: str = "ema", decay: float = 0.9999, *,
                 warmup: Optional[Union[bool, EMAWarmup, Mapping[str, Any]]] = None,
                 start_step: int = 0, every: int = 1, dtype: torch.dtype = torch.float32,
                 device: Optional[Union[str, torch.device]] = None, eval_with_average: bool = True,
                 copy_to_model_at_end: bool = True, name: Optional[str] = None):
        what = "WeightAveragingCallback"
        if not isinstance(mode, str):
            raise TypeError(f"{what}: mode must be a str, got {type(mode).__name__}")
        if mode not in ("ema", "swa"):
            raise ValueError(f"{what}: mode must be 'ema' or 'swa', got {mode!r}")
        if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
            raise TypeError(f"{what}: decay must be a number, got {type(decay).__name__}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"{what}: decay must be a number in [0, 1], got {decay!r}")
        warmup = EMAWarmup.coerce(warmup, what)
        if warmup is not None and mode != "ema":
            raise ValueError(f"{what}: warmup only applies to mode='ema'")
        for key, value, low in (("start_step", start_step, 0), ("every", every, 1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{what}: {key} must be an int, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"{what}: {key} must be an int >= {low}, got {value}")
        if dtype not in _DTYPES:  # a TypeError, as WeightAverager and the engine raise for a dtype
            raise TypeError(f"{what}: dtype must be torch.float32, float64, bfloat16 or float16, got {dtype!r}")
        if device is not None and not isinstance(device, (str, torch.device)):
            raise TypeError(f"{what}: device must be a str, a torch.device or None, got {type(device).__name__}")
        for key, value in (("eval_with_average", eval_with_average), ("copy_to_model_at_end", copy_to_model_at_end)):
            if not isinstance(value, bool):
                raise TypeError(f"{what}: {key} must be a bool, got {type(value).__name__}")
        if name is None:
            name = mode
        if not isinstance(name, str):
            raise TypeError(f"{what}: name must be a str or None, got {type(name).__name__}")
        if not _NAME_RE.match(name):
            raise ValueError(f"{what}: name must be letters, digits, '_', '.' or '-' (it names a file), got {name!r}")
        self.mode = mode
        self.decay = float(decay)
        self.warmup: Optional[EMAWarmup] = warmup
        self.start_step = int(start_step)
        self.every = int(every)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self.eval_with_average = eval_with_average
        self.copy_to_model_at_end = copy_to_model_at_end
        self.name = name
        self._averager: Optional[WeightAverager] = None
        self._model: Optional[torch.nn.Module] = None
        self._hook: Optional[Any] = None  # the forward pre-hook that swaps the average in for an evaluation
        self._swapped_for_eval = False
        self._global_step = 0  # the Trainer's step, recorded in saved files

    # ------------------------------------------------------------------ public helpers
    @property
    def file_name(self) -> str:
        """The file this callback writes into each checkpoint folder."""
        return f"swm_fused_{self.name}.safetensors"

    @property
    def averager(self) -> WeightAverager:
        """The :class:`~swm_fused.WeightAverager` holding the average (built when training begins)."""
        if self._averager is None:
            raise RuntimeError("WeightAveragingCallback: the averager is built in on_train_begin; "
                               "call trainer.train() first")
        return self._averager

    @property
    def n_applied(self) -> int:
        """Optimizer steps averaged in so far (host arithmetic over ``start_step``/``every``; no device sync).
        Steps skipped for NaN/Inf count here; see ``averager.skipped``."""
        if self._averager is None:
            return 0
        return max(0, (self._averager.step - self.start_step) // self.every)

    def save(self, folder: str, *, write: bool = True) -> Optional[str]:
        """Write the average and its counters to ``folder/<file_name>``, atomically (a temporary file renamed).

        Sharded (FSDP2) averages are gathered into full tensors first: every rank must call this; only the
        ranks with ``write=True`` write. Returns the path written, or None.
        """
        state = self.averager.state_dict()
        average = state.pop("average")
        tensors: Dict[str, Tensor] = {}
        for key, value in average.items():  # the same order on every rank: the gathers pair up
            if is_dtensor(value):
                value = value.full_tensor()  # a collective
            if write:
                # own, contiguous CPU copies: safetensors refuses views that share a storage
                tensors[key] = value.detach().to(device="cpu", copy=True).contiguous()
        if not write:
            return None
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"WeightAveragingCallback: checkpoint folder {folder!r} does not exist")
        meta = {"format": CHECKPOINT_FORMAT, "mode": state["mode"], "step": int(state["step"]),
                "n_updates": int(state["n_updates"]), "n_averaged": int(state["n_averaged"]),
                "skipped": int(state["skipped"]), "global_step": self._global_step,
                "decay": self.decay, "start_step": self.start_step, "every": self.every, "dtype": str(self.dtype)}
        path = os.path.join(folder, self.file_name)
        tmp = os.path.join(folder, f".{self.file_name}.tmp.{os.getpid()}")
        try:
            _safetensors.save_file(tensors, tmp, metadata={_METADATA_KEY: json.dumps(meta)})
            with open(tmp, "rb+") as handle:  # on disk before the rename makes it visible
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    def load(self, folder: str, *, global_step: Optional[int] = None) -> None:
        """Load the average saved by :meth:`save` in ``folder`` (checked first: on error nothing changes).

        ``global_step``, when given, must equal the Trainer step the file was saved at.
        """
        path = os.path.join(folder, self.file_name)
        meta = self.read_metadata(path)
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"WeightAveragingCallback: {path} has format {meta.get('format')!r}, "
                             f"expected {CHECKPOINT_FORMAT!r}")
        if global_step is not None and meta.get("global_step") != global_step:
            raise ValueError(f"WeightAveragingCallback: {path} was saved at step {meta.get('global_step')}, "
                             f"the Trainer resumed at step {global_step}")
        try:
            average = _safetensors.load_file(path, device="cpu")
        except _SafetensorError as error:
            raise OSError(f"WeightAveragingCallback: cannot read {path}: {error}") from error
        state = {"mode": meta.get("mode"), "step": meta.get("step"), "n_updates": meta.get("n_updates"),
                 "n_averaged": meta.get("n_averaged"), "skipped": meta.get("skipped"), "average": average}
        self.averager.load_state_dict(state)  # validates mode, names and shapes before it writes anything

    @staticmethod
    def read_metadata(path: str) -> Dict[str, Any]:
        """The counters and settings stored with a saved average (OSError if it cannot be read)."""
        try:
            with _safetensors.safe_open(path, framework="pt") as handle:
                raw = (handle.metadata() or {}).get(_METADATA_KEY)
        except _SafetensorError as error:  # a damaged file: an OSError, as the package raises for unreadable files
            raise OSError(f"WeightAveragingCallback: cannot read {path}: {error}") from error
        if raw is None:
            raise ValueError(f"WeightAveragingCallback: {path} holds no swm_fused metadata")
        return json.loads(raw)

    # ------------------------------------------------------------------ trainer events
    def on_train_begin(self, args: "TrainingArguments", state: "TrainerState", control: "TrainerControl",
                       model: Optional[torch.nn.Module] = None, **kwargs: Any) -> None:
        if model is None:
            raise RuntimeError("WeightAveragingCallback: the Trainer passed no model to on_train_begin")
        if self._averager is not None and self._averager.is_swapped:
            # a previous train() ended inside an evaluation (an exception): the model may hold the average
            logger.warning("WeightAveragingCallback: the previous average was still swapped into the model; "
                           "it is dropped and a new one is built from the model as it is now")
        if self._hook is not None:  # not _disarm(): swapping out now would overwrite weights a resume loaded
            self._hook.remove()
            self._hook = None
        self._swapped_for_eval = False
        self._global_step = int(state.global_step)
        # Built here, not in __init__: accelerate has prepared the model (FSDP2 shards it in place) and a
        # resumed Trainer has loaded the checkpoint's weights.
        self._model = model
        self._averager = WeightAverager(model, mode=self.mode, decay=self.decay, dtype=self.dtype,
                                        device=self.device, start=self.start_step, every=self.every,
                                        warmup=self.warmup)
        if state.global_step > 0:
            folder = self._resume_folder(args, state)
            self.load(folder, global_step=int(state.global_step))
            logger.info(f"WeightAveragingCallback: resumed the {self.mode} average from {folder} "
                        f"(step {self._averager.step})")

    def on_step_begin(self, args: "TrainingArguments", state: "TrainerState", control: "TrainerControl",
                      **kwargs: Any) -> None:
        self._disarm()  # training never runs on the average

    def on_epoch_begin(self, args: "TrainingArguments", state: "TrainerState", control: "TrainerControl",
                       **kwargs: Any) -> None:
        self._disarm()

    def on_step_end(self, args: "TrainingArguments", state: "TrainerState", control: "TrainerControl",
                    **kwargs: Any) -> None:
        # on_step_end runs once per optimizer step, after gradient accumulation (other micro-batches end in
        # on_substep_end), after optimizer.step(), the scheduler step and zero_grad
        self._global_step = int(state.global_step)
        self._disarm()
        self.averager.update()
        self._arm(control)

    def on_epoch_end(self, args: "TrainingArguments", state: "TrainerState", control: "TrainerControl",
                     **kwargs: Any) -> None:
        self._arm(control)  # epoch-based evaluation is decided here

    def on_evaluate(self, args: "TrainingArguments", state: "TrainerState", control: "TrainerControl",
                    **kwargs: Any) -> None:
        # the Trainer may save a checkpoint right after the evaluation: the training weights must be back.
        # The hook stays armed: with a dict of eval datasets the next one's first forward swaps in again.
        self._swap_out_if_ours()

    def on_save(self, args: "TrainingArguments", state: "TrainerState", control: "TrainerControl",
                **kwargs: Any) -> None:
        self._disarm()
        self._global_step = int(state.global_step)
        # the folder Trainer._save_checkpoint has just written (hyperparameter-search runs use other folders)
        folder = os.path.join(args.output_dir, f"{_CHECKPOINT_PREFIX}-{state.global_step}")
        self.save(folder, write=bool(args.should_save))

    def on_train_end(self, args: "TrainingArguments", state: "TrainerState", control: "TrainerControl",
                     model: Optional[torch.nn.Module] = None, **kwargs: Any) -> None:
        self._disarm()
        if self._averager is None:
            return
        best = state.best_model_checkpoint if getattr(args, "load_best_model_at_end", False) else None
        if best and os.path.isfile(os.path.join(best, self.file_name)):
            # the Trainer has just loaded the best checkpoint's model: take that checkpoint's average too
            self.load(best)
            logger.info(f"WeightAveragingCallback: load_best_model_at_end: loaded the average of {best}")
        if not self.copy_to_model_at_end:
            return
        if self.n_applied == 0:
            logger.warning(f"WeightAveragingCallback: no step was averaged (start_step={self.start_step}, "
                           f"every={self.every}, {self._averager.step} steps); the model keeps its weights")
            return
        self._averager.copy_to(model if model is not None else self._model)

    # ------------------------------------------------------------------ internals
    def _arm(self, control: "TrainerControl") -> None:
        """When the Trainer's flow asks for an evaluation, swap the average in at the evaluation's first forward.

        Not right away: callbacks after this one (another averager, a weight logger) still read the training
        weights in this event. Before the first averaged step the average is only the weights seen at build
        time, so the model is evaluated as it is."""
        if not (self.eval_with_average and control.should_evaluate and self.n_applied) or self._hook is not None:
            return
        # prepend: under FSDP2 the swap must write the shards before FSDP's own pre-forward hook gathers them
        self._hook = self._model.register_forward_pre_hook(self._pre_forward, prepend=True)

    def _pre_forward(self, module: torch.nn.Module, inputs: Any) -> None:
        # evaluation_loop puts the model in eval mode; a forward in train mode is not an evaluation
        if not module.training and not self._swapped_for_eval:
            self.averager.swap_in()
            self._swapped_for_eval = True

    def _swap_out_if_ours(self) -> None:
        if self._swapped_for_eval:
            self._swapped_for_eval = False
            self.averager.swap_out()

    def _disarm(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._swap_out_if_ours()

    def _resume_folder(self, args: "TrainingArguments", state: "TrainerState") -> str:
        """The checkpoint folder the Trainer resumed from (callbacks are not told it: see the class docs)."""
        candidates: List[str] = []
        explicit = getattr(args, "resume_from_checkpoint", None)
        if isinstance(explicit, str) and os.path.isdir(explicit):
            candidates.append(explicit)
        candidates.append(os.path.join(args.output_dir, f"{_CHECKPOINT_PREFIX}-{state.global_step}"))
        for folder in candidates:
            if _same_trainer_state(folder, state):
                if not os.path.isfile(os.path.join(folder, self.file_name)):
                    raise FileNotFoundError(
                        f"WeightAveragingCallback: the Trainer resumed from {folder}, which holds no "
                        f"{self.file_name}: it was saved without this callback (or with another name=)")
                return folder
        raise FileNotFoundError(
            f"WeightAveragingCallback: cannot find the checkpoint the Trainer resumed from at step "
            f"{state.global_step} (looked in {candidates}); when it is outside output_dir, set "
            "TrainingArguments(resume_from_checkpoint=<folder>) as well")


def _same_trainer_state(folder: str, state: "TrainerState") -> bool:
    """Whether ``folder`` holds the trainer_state.json the Trainer resumed from (step and log history)."""
    try:
        with open(os.path.join(folder, _TRAINER_STATE_NAME)) as handle:
            saved = json.load(handle)
    except (OSError, ValueError):
        return False
    # compared as JSON text: a NaN loss in the history compares unequal to itself as a float
    return saved.get("global_step") == state.global_step and \
        json.dumps(saved.get("log_history"), sort_keys=True) == json.dumps(state.log_history, sort_keys=True)
