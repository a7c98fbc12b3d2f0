"""LoRA for minicurie: low-rank adapters on a frozen decoder, as in Curie-7B's language-adaptive pre-training.

    layers.py   LoRALinear: base(x) + scale * dropout(x) @ A.T @ B.T, merge / unmerge
    inject.py   LoRAConfig (the paper's recipe: LoRAConfig.curie()), inject_lora, merge_lora, remove_lora, counts
    adapter.py  save_adapter / load_adapter: only the LoRA tensors, our names
    export.py   save_peft_adapter (peft's layout) and export_merged_hf (a merged Hugging Face checkpoint)
"""
from lora.adapter import load_adapter, save_adapter  # noqa: F401
from lora.export import export_merged_hf, save_peft_adapter  # noqa: F401
from lora.inject import (LoRAConfig, count_parameters, inject_lora, lora_modules,  # noqa: F401
                         mark_only_lora_trainable, merge_lora, parameter_summary, remove_lora, unmerge_lora)
from lora.layers import LoRALinear  # noqa: F401
