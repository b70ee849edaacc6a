"""Placeholder until the Triton kernel lands (issue 19)."""

from megalith_kernels.dispatch import KernelUnavailable


def bias_gelu(*args, **kwargs):
    raise KernelUnavailable("the Triton bias_gelu kernel is not written yet")


def swiglu(*args, **kwargs):
    raise KernelUnavailable("the Triton swiglu kernel is not written yet")
