"""Placeholder until the Triton kernel lands (issue 19)."""

from megalith_kernels.dispatch import KernelUnavailable


def rope(*args, **kwargs):
    raise KernelUnavailable("the Triton rope kernel is not written yet")
