"""Kernel sets behind swm_fused.ops: ``reference`` (plain torch) and ``compiled`` (cpp and cuda, through
torch.library). The Triton one lives in swm_fused.triton; swm_fused.dispatch picks one per call."""
