"""Data: tokenizers, Megatron-compatible indexed `.bin`/`.idx` datasets, GPT/BERT/T5 samples, blending."""
