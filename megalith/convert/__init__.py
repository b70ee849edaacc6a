"""`megalith convert`: Hugging Face checkpoints <-> megalith checkpoints.

command: the command's logic (import for any layout, export from any layout, `--check`);
mapping: the family interface (`HFFamily`), `ConvertError` and what every mapping shares;
families: the list of families; files: reading HF directories and atomic output directories;
gpt (GPT-2, Llama), moe (Mixtral, Qwen2-MoE), bert (BERT), t5 (T5 v1.0): one module per family.

This package imports training/ and models/; nothing there imports it.
"""

from megalith.convert.command import add_convert_arguments, hf_to_megalith, megalith_to_hf, run_convert

__all__ = ["add_convert_arguments", "hf_to_megalith", "megalith_to_hf", "run_convert"]
