"""megalith: Megatron-style 3D-parallel training of transformers, proven exact on a CPU."""

__version__ = "0.1.0"
