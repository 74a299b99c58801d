"""Backends behind swm_fused.ops; swm_fused.dispatch picks one per call. The Triton one lives in swm_fused.triton."""
