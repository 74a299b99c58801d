"""WeightAverager.update() of a 1.3B-parameter bf16 model with an fp32 average under CUDA graph capture
(issue 10, section 4): the captured update replays with no host sync and no allocation, and matches the
eager update bit for bit. Prints the update's GPU time against the copy bandwidth and records it for
bench/gpu_check.sh's summary. Skips without CUDA.
"""
from __future__ import annotations

import pytest
import torch

import swm_fused

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# GPT-3-XL-like: d_model 2048, 24 layers, 50257-token vocabulary, 2048 positions: 1,315,723,264 params
D, LAYERS, VOCAB, CTX = 2048, 24, 50257, 2048


def gpt_1_3b_params(device) -> dict:
    shapes = {"wte": (VOCAB, D), "wpe": (CTX, D)}
    for i in range(LAYERS):
        shapes.update({f"h{i}.ln1.w": (D,), f"h{i}.ln1.b": (D,), f"h{i}.attn.w": (D, 3 * D),
                       f"h{i}.attn.b": (3 * D,), f"h{i}.proj.w": (D, D), f"h{i}.proj.b": (D,),
                       f"h{i}.ln2.w": (D,), f"h{i}.ln2.b": (D,), f"h{i}.fc.w": (D, 4 * D), f"h{i}.fc.b": (4 * D,),
                       f"h{i}.out.w": (4 * D, D), f"h{i}.out.b": (D,)})
    shapes.update({"lnf.w": (D,), "lnf.b": (D,)})
    gen = torch.Generator(device=device).manual_seed(0)
    return {name: torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(torch.bfloat16) * 0.02
            for name, shape in shapes.items()}


def _gpu_ms(fn, reps: int = 10) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


@pytest.mark.parametrize("flat", [False, True], ids=["lists", "flat"])
def test_update_of_a_1_3b_bf16_model_replays_in_a_cuda_graph(flat, record_property):
    device = torch.device("cuda")
    params = gpt_1_3b_params(device)
    numel = sum(t.numel() for t in params.values())
    assert numel == 1_315_723_264
    if flat:
        model = torch.nn.Module()
        for i, (name, t) in enumerate(params.items()):
            model.register_parameter(f"p{i}", torch.nn.Parameter(t, requires_grad=False))
        swm_fused.flatten_parameters(model)
        source = model
        tensors = list(model.parameters())
    else:
        source = params
        tensors = list(params.values())
    averager = swm_fused.WeightAverager(source, mode="ema", decay=0.999, dtype=torch.float32)
    twin = swm_fused.WeightAverager(source, mode="ema", decay=0.999, dtype=torch.float32)
    averager.update()  # the copying first update happens eagerly
    twin.update()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up on the capture stream (lazy initialisation, backend choice)
            averager.update()
            twin.update()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        averager.update()

    with torch.no_grad():
        for t in tensors:
            t.add_(0.01)
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        graph.replay()
        twin.update()  # the same update, eagerly (the captured one does not advance host counters)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == allocated, "replay allocated"
    for name, view in averager.average_state_dict().items():
        assert torch.equal(view, twin.average_state_dict()[name]), name

    update_ms = _gpu_ms(graph.replay)
    src = torch.empty(numel * 10 // 4, dtype=torch.float32, device=device)  # the update's bytes: 2 + 4 + 4
    dst = torch.empty_like(src)
    # a copy of B bytes reads B and writes B: half its time is what moving the update's bytes costs
    same_bytes_ms = _gpu_ms(lambda: dst.copy_(src)) / 2
    gbps = numel * 10 / update_ms / 1e6
    figure = (f"1.3B bf16 -> fp32 EMA update ({'flat' if flat else 'lists'}), CUDA graph replay: {update_ms:.3f} ms GPU, "
              f"{gbps:.0f} GB/s; copy bandwidth moves the same bytes in {same_bytes_ms:.3f} ms "
              f"({same_bytes_ms / update_ms:.0%} of copy) on {torch.cuda.get_device_name()}")
    print("\n" + figure)
    record_property("gpu_figure", figure)  # bench/gpu_check.sh puts it in its summary (bench/junit_summary.py)
