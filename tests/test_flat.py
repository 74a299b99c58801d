"""FlatBuffer: layout, copies, and ops on flat storages."""
import pytest
import torch

import swm_fused
from swm_fused import FlatBuffer
from swm_fused.flat import ALIGN_ELEMENTS
from _helpers import assert_close, bits, random_tensor

SHAPES = [(3, 5), (1,), (4097,), (0,), (2, 3, 4)]


def test_from_tensors_copies_values_into_aligned_views_of_one_storage():
    tensors = [random_tensor(s, torch.bfloat16) for s in SHAPES]
    buf = FlatBuffer.from_tensors(tensors, dtype=torch.float32)
    assert len(buf.storages) == 1 and buf.storages[0].dim() == 1 and buf.storages[0].dtype == torch.float32
    base = buf.storages[0].data_ptr()
    for t, v, off in zip(tensors, buf.views, buf.offsets):
        assert v.shape == t.shape and v.dtype == torch.float32
        assert torch.equal(v, t.float())
        assert off % ALIGN_ELEMENTS == 0 and (v.numel() == 0 or v.data_ptr() == base + off * 4)
    tensors[0].add_(1)  # a copy, not an alias
    assert not torch.equal(buf.views[0], tensors[0].float())
    assert buf.numel() == sum(t.numel() for t in tensors)


def test_one_storage_per_dtype_and_views_in_original_order():
    tensors = [random_tensor((4,), torch.float32), random_tensor((3,), torch.float16), random_tensor((2,), torch.float32)]
    buf = FlatBuffer.from_tensors(tensors)
    assert [s.dtype for s in buf.storages] == [torch.float32, torch.float16]
    assert buf.group_of == [0, 1, 0]
    for t, v in zip(tensors, buf):
        assert torch.equal(bits(t), bits(v))


def test_zeros_like_shares_the_layout_across_dtypes():
    tensors = [random_tensor(s, torch.float32) for s in SHAPES]
    a = FlatBuffer.from_tensors(tensors)
    b = FlatBuffer.zeros_like(a, dtype=torch.bfloat16)
    assert a.layout_key() == b.layout_key()
    assert all(s.dtype == torch.bfloat16 and not s.any() for s in b.storages)


def test_copy_rejects_wrong_count_or_shape_and_writes_nothing():
    buf = FlatBuffer.from_tensors([random_tensor((3,), torch.float32), random_tensor((2,), torch.float32)])
    before = buf.storages[0].clone()
    with pytest.raises(ValueError, match="got 1 tensors for 2 views"):
        buf.copy_([torch.ones(3)])
    with pytest.raises(ValueError, match="tensor 1 has shape"):
        buf.copy_([torch.ones(3), torch.ones(3)])
    assert torch.equal(buf.storages[0], before)


def test_padding_stays_zero_through_ops():
    tensors = [random_tensor(s, torch.float32) for s in SHAPES]
    avg = FlatBuffer.from_tensors(tensors)
    src = FlatBuffer.from_tensors([random_tensor(s, torch.float32) for s in SHAPES], dtype=torch.bfloat16)
    swm_fused.ema_(avg, src, 0.9)
    swm_fused.swa_(avg, src, 3)
    mask = torch.ones_like(avg.storages[0], dtype=torch.bool)
    for v, off in zip(avg.views, avg.offsets):
        mask[off:off + v.numel()] = False
    assert not avg.storages[0][mask].any()
    assert swm_fused.any_nonfinite(avg).item() == 0.0


def test_flat_and_list_inputs_mix():
    """A FlatBuffer average with a plain list of sources runs over the views and matches the list path."""
    params = [random_tensor(s, torch.bfloat16) for s in SHAPES]
    avg_list = [random_tensor(s, torch.float32) for s in SHAPES]
    avg_flat = FlatBuffer.from_tensors(avg_list)
    swm_fused.ema_(avg_list, params, 0.8)
    swm_fused.ema_(avg_flat, params, 0.8)
    for a, b in zip(avg_list, avg_flat):
        assert_close(b, a, 0, 0, "flat vs list")
