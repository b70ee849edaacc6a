"""Plain-PyTorch definitions of every op: what the Triton kernels must equal."""

from megalith_kernels.reference.activations import bias_gelu, swiglu
from megalith_kernels.reference.attention import flash_attention
from megalith_kernels.reference.losses import cross_entropy
from megalith_kernels.reference.norms import layer_norm, rms_norm
from megalith_kernels.reference.rotary import rope

__all__ = ["bias_gelu", "cross_entropy", "flash_attention", "layer_norm", "rms_norm", "rope", "swiglu"]
