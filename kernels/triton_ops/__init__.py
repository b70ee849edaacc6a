"""Triton kernels, one module per op family, each a torch.autograd.Function behind the reference's signature.

Importing this package imports triton; `megalith_kernels.dispatch` does so only when asked to.
"""

from megalith_kernels.triton_ops.activations import bias_gelu, swiglu
from megalith_kernels.triton_ops.attention import flash_attention
from megalith_kernels.triton_ops.losses import cross_entropy
from megalith_kernels.triton_ops.norms import layer_norm, rms_norm
from megalith_kernels.triton_ops.rotary import rope

__all__ = ["bias_gelu", "cross_entropy", "flash_attention", "layer_norm", "rms_norm", "rope", "swiglu"]
