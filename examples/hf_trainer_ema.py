"""EMA of a Hugging Face Trainer run with one callback: evaluation on the average, checkpoints, resume.

A 2-layer GPT-2 built from a config (random init, nothing downloaded) learns a toy language of
noisy counting sequences on CPU in a few seconds. ``WeightAveragingCallback`` keeps an EMA with
timm's warmup, updated once per optimizer step (after gradient accumulation); the Trainer's
evaluations during training run on the average; every checkpoint folder gets the average; a second
Trainer resumes from the mid-run checkpoint and ends with the same average, bit for bit.

    python examples/hf_trainer_ema.py
    python examples/hf_trainer_ema.py --steps 400 --output-dir /tmp/hf_ema
"""
from __future__ import annotations

import argparse
import os
import tempfile
from typing import Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is built from a config: nothing to download

import torch
from torch import Tensor
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from swm_fused.integrations.transformers import WeightAveragingCallback

VOCAB, SEQ = 32, 24


class CountingSequences(torch.utils.data.Dataset):
    """Sequences that count up from a random start (mod VOCAB), with 10% of tokens replaced by noise."""

    def __init__(self, n: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=gen)
        ids = (start + torch.arange(SEQ)) % VOCAB
        noise = torch.rand(n, SEQ, generator=gen) < 0.1
        self.ids = torch.where(noise, torch.randint(0, VOCAB, (n, SEQ), generator=gen), ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Dict[str, Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=SEQ,
                                      bos_token_id=0, eos_token_id=0))


def make_trainer(output_dir: str, steps: int, seed: int, model_seed: int, callback: WeightAveragingCallback) -> Trainer:
    args = TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=8, gradient_accumulation_steps=2,
        learning_rate=3e-2, lr_scheduler_type="constant",  # a high constant rate: noisy weights, where EMA helps
        eval_strategy="steps", eval_steps=steps // 2, save_strategy="steps", save_steps=steps // 2,
        logging_steps=steps // 4, report_to=[], use_cpu=True, disable_tqdm=True, seed=seed)
    return Trainer(model=tiny_gpt2(model_seed), args=args, train_dataset=CountingSequences(512, seed),
                   eval_dataset=CountingSequences(64, seed + 1), callbacks=[callback])


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps (a multiple of 4)")
    parser.add_argument("--output-dir", default=None, help="where checkpoints go (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args(argv)
    if opts.steps < 4 or opts.steps % 4:
        parser.error("--steps must be a multiple of 4")
    torch.set_num_threads(1)  # a tiny model: more threads only add overhead
    hf_logging.set_verbosity_error()
    output_dir = opts.output_dir or tempfile.mkdtemp(prefix="hf_trainer_ema_")

    # The one line that changes: add the callback. EMA decay 0.95 reached through timm's warmup; the
    # Trainer's evaluations see the average; at the end the model is left holding it.
    ema = WeightAveragingCallback("ema", decay=0.95, warmup={"warmup_power": 0.75}, copy_to_model_at_end=False)
    trainer = make_trainer(output_dir, opts.steps, opts.seed, opts.seed, ema)
    trainer.train()
    raw = trainer.evaluate()["eval_loss"]                 # the training weights
    with ema.averager.swapped():                          # the average, swapped in and back out bit for bit
        averaged = trainer.evaluate()["eval_loss"]
    print(f"eval loss after {opts.steps} steps: training weights {raw:.4f}, EMA {averaged:.4f}")

    # Resume from the mid-run checkpoint, which holds swm_fused_ema.safetensors next to the model
    middle = os.path.join(output_dir, f"checkpoint-{opts.steps // 2}")
    print(f"{middle}: {sorted(f for f in os.listdir(middle) if f.startswith('swm_fused'))}")
    resumed = WeightAveragingCallback("ema", decay=0.95, warmup={"warmup_power": 0.75}, copy_to_model_at_end=False)
    trainer = make_trainer(output_dir, opts.steps, opts.seed, opts.seed + 1, resumed)  # another init: loaded over
    trainer.train(resume_from_checkpoint=middle)
    first, second = ema.averager.average_state_dict(), resumed.averager.average_state_dict()
    same = all(torch.equal(first[name], second[name]) for name in first)
    print(f"resumed from {os.path.basename(middle)}: the EMA at step {opts.steps} is "
          f"{'bit for bit the same' if same else 'DIFFERENT'}")
    return {"raw_loss": raw, "ema_loss": averaged, "resumed_bit_for_bit": float(same)}


if __name__ == "__main__":
    main()
