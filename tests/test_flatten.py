"""swm_fused.flatten_parameters: a model's parameters as views of one flat storage per (device, dtype).

Training is bit-identical to the unflattened model (SGD; Adam/AdamW with foreach and fused kernels);
state_dict keys and values, load_state_dict, autograd and torch.compile keep working; model.to(dtype)
leaves the flat layout (detected in O(1), averagers fall back to lists, flatten again to restore);
FSDP2 raises. A WeightAverager of a flattened model runs one kernel over one vector.
"""
from __future__ import annotations

import socket
from copy import deepcopy

import pytest
import torch

import swm_fused
from torch import nn

from swm_fused import WeightAverager, dispatch, flatten_parameters

from _helpers import assert_close, bits


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(7, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 3))


def train(model, optimizer, steps=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(10, 7, generator=gen), torch.randn(10, 3, generator=gen)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "adamw-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    "adam-foreach": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True),
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
}


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_training_is_bit_identical_to_the_unflattened_model(opt):
    plain = make_model()
    flat = deepcopy(plain)
    handle = flatten_parameters(flat)
    assert handle.intact() and len(handle.buffer.storages) == 1
    storage = handle.buffer.storages[0]
    for p in flat.parameters():
        assert p.untyped_storage().data_ptr() == storage.untyped_storage().data_ptr()
    train(plain, OPTIMIZERS[opt](plain.parameters()))
    train(flat, OPTIMIZERS[opt](flat.parameters()))
    for (name, a), b in zip(plain.named_parameters(), flat.parameters()):
        assert torch.equal(bits(a), bits(b)), f"{opt}: {name}"
    assert handle.intact(), "the optimizer moved a parameter out of the flat storage"


def test_state_dict_keys_values_and_loading_keep_working():
    model = make_model()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    handle = flatten_parameters(model)
    state = model.state_dict()
    assert list(state) == list(reference)
    for key, value in reference.items():
        assert torch.equal(state[key], value), key
    del state
    other = make_model()
    model.load_state_dict(other.state_dict())  # in place: stays flat
    assert handle.intact()
    for (key, value), (_, p) in zip(other.state_dict().items(), model.state_dict().items()):
        assert torch.equal(value, p), key


def test_torch_compile_and_autograd():
    model = make_model()
    flatten_parameters(model)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(4, 7)
    compiled(x).sum().backward()
    eager = deepcopy(model)
    for p in eager.parameters():
        p.grad = None
    eager(x).sum().backward()
    for (name, a), b in zip(model.named_parameters(), eager.parameters()):
        assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-6, what=name)


def test_averager_of_a_flat_model_is_one_kernel_over_one_vector(monkeypatch):
    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(40)])
    flatten_parameters(model)
    averager = WeightAverager(model, mode="ema", decay=0.5)
    from swm_fused import _C
    calls = []
    bound = []
    real_bind, real_step = swm_fused.BoundLists.bind_step, _C.bound_step

    def bind_spy(self, *args, **kwargs):  # the lists the update's one C call runs over
        bound.append(tuple(len(x) for x in self._lists))
        return real_bind(self, *args, **kwargs)

    def step_spy(*args):
        calls.append(args[0])
        return real_step(*args)
    monkeypatch.setattr(swm_fused.BoundLists, "bind_step", bind_spy)
    monkeypatch.setattr(_C, "bound_step", step_spy)
    averager.update()
    averager.update()
    assert bound == [(1, 1)] and len(calls) == 2


def test_model_to_leaves_the_flat_layout_and_averaging_stays_correct():
    model = make_model()
    handle = flatten_parameters(model)
    averager = WeightAverager(model, mode="swa")
    snaps = []
    for step in range(4):
        if step == 2:
            model.to(torch.float64)
            assert not handle.intact()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        snaps.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
        averager.update()
    expected = {k: sum(s[k] for s in snaps) / len(snaps) for k in snaps[0]}
    for name, view in averager.average_state_dict().items():
        assert_close(view, expected[name], atol=1e-6, rtol=1e-6, what=name)
    again = flatten_parameters(model)
    assert again.intact() and again.buffer.storages[0].dtype == torch.float64


def test_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        flatten_parameters([torch.zeros(2)])
    with pytest.raises(ValueError, match="no parameters"):
        flatten_parameters(nn.ReLU())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_fsdp2_model_raises():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        model = make_model()
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        with pytest.raises(TypeError, match="FSDP2"):
            flatten_parameters(model)
    finally:
        dist.destroy_process_group()
