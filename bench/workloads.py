"""Parameter lists shaped like real models, built from their architectures (no downloads).

Each workload is a list of ``(name, shape)`` pairs, in the order the model's
``parameters()`` would yield them. Only trainable parameters are listed (no
BatchNorm running statistics), as ``AveragedModel`` averages by default.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Tuple

Shape = Tuple[int, ...]
ParamList = List[Tuple[str, Shape]]


def gpt_shapes(d_model: int, n_layer: int, vocab: int = 50257, n_ctx: int = 1024) -> ParamList:
    """A GPT-2-style decoder (tied LM head), with Hugging Face's parameter names and Conv1D layouts."""
    shapes: ParamList = [("wte.weight", (vocab, d_model)), ("wpe.weight", (n_ctx, d_model))]
    for i in range(n_layer):
        p = f"h.{i}."
        shapes += [
            (p + "ln_1.weight", (d_model,)), (p + "ln_1.bias", (d_model,)),
            (p + "attn.c_attn.weight", (d_model, 3 * d_model)), (p + "attn.c_attn.bias", (3 * d_model,)),
            (p + "attn.c_proj.weight", (d_model, d_model)), (p + "attn.c_proj.bias", (d_model,)),
            (p + "ln_2.weight", (d_model,)), (p + "ln_2.bias", (d_model,)),
            (p + "mlp.c_fc.weight", (d_model, 4 * d_model)), (p + "mlp.c_fc.bias", (4 * d_model,)),
            (p + "mlp.c_proj.weight", (4 * d_model, d_model)), (p + "mlp.c_proj.bias", (d_model,)),
        ]
    shapes += [("ln_f.weight", (d_model,)), ("ln_f.bias", (d_model,))]
    return shapes


def gpt2_small() -> ParamList:
    """GPT-2 small: 124,439,808 parameters in 148 tensors."""
    return gpt_shapes(d_model=768, n_layer=12)


def gpt_1_3b() -> ParamList:
    """A GPT-3-XL-like 1.3B model (d_model 2048, 24 layers, context 2048): 1,315,723,264 parameters."""
    return gpt_shapes(d_model=2048, n_layer=24, n_ctx=2048)


def resnet50() -> ParamList:
    """torchvision's ResNet-50 (bottleneck blocks [3, 4, 6, 3]): 25,557,032 parameters in 161 tensors."""
    shapes: ParamList = [("conv1.weight", (64, 3, 7, 7)), ("bn1.weight", (64,)), ("bn1.bias", (64,))]
    in_ch = 64
    for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        out_ch = width * 4
        for b in range(blocks):
            p = f"layer{stage}.{b}."
            shapes += [
                (p + "conv1.weight", (width, in_ch, 1, 1)), (p + "bn1.weight", (width,)), (p + "bn1.bias", (width,)),
                (p + "conv2.weight", (width, width, 3, 3)), (p + "bn2.weight", (width,)), (p + "bn2.bias", (width,)),
                (p + "conv3.weight", (out_ch, width, 1, 1)), (p + "bn3.weight", (out_ch,)),
                (p + "bn3.bias", (out_ch,)),
            ]
            if b == 0:
                shapes += [(p + "downsample.0.weight", (out_ch, in_ch, 1, 1)),
                           (p + "downsample.1.weight", (out_ch,)), (p + "downsample.1.bias", (out_ch,))]
            in_ch = out_ch
    shapes += [("fc.weight", (1000, 2048)), ("fc.bias", (1000,))]
    return shapes


def small_tensors(count: int = 20_000, numel: int = 1_000) -> ParamList:
    """``count`` tensors of ``numel`` elements: where per-tensor overhead dominates."""
    return [(f"t{i}", (numel,)) for i in range(count)]


WORKLOADS: Dict[str, Callable[[], ParamList]] = {
    "gpt2": gpt2_small,
    "resnet50": resnet50,
    "small20k": small_tensors,
    "gpt1.3b": gpt_1_3b,
}


def numel(shapes: ParamList) -> int:
    """Total number of elements in a parameter list."""
    return sum(math.prod(shape) for _, shape in shapes)


def shrink(shapes: ParamList, max_numel: int) -> ParamList:
    """The tensors of ``shapes``, in order, that fit in a budget of ``max_numel`` elements.

    Used to cut a workload down for quick dry runs while keeping real tensor shapes.
    """
    kept: ParamList = []
    total = 0
    for name, shape in shapes:
        size = math.prod(shape)
        if total + size <= max_numel:
            kept.append((name, shape))
            total += size
    return kept
