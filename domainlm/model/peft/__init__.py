"""Parameter-efficient fine-tuning of our decoder: LoRA, bottleneck adapters, prompt tuning,
selective and full fine-tuning, behind one prepare/save/load interface (methods.py)."""

from domainlm.model.peft.adapter import Bottleneck, add_adapters, load_adapters, save_adapters
from domainlm.model.peft.lora import (
    LoRALinear,
    add_lora,
    load_lora,
    merged,
    save_lora,
    set_adapter,
)
from domainlm.model.peft.methods import (
    METHODS,
    MethodInfo,
    count_parameters,
    load,
    prepare,
    save,
)
from domainlm.model.peft.prompt import PromptTuned, load_prompt, save_prompt
from domainlm.model.peft.selective import select

__all__ = [
    "METHODS",
    "Bottleneck",
    "LoRALinear",
    "MethodInfo",
    "PromptTuned",
    "add_adapters",
    "add_lora",
    "count_parameters",
    "load",
    "load_adapters",
    "load_lora",
    "load_prompt",
    "merged",
    "prepare",
    "save",
    "save_adapters",
    "save_lora",
    "save_prompt",
    "select",
    "set_adapter",
]
