"""The fine-tuning methods behind one interface: prepare a base model for a method, save, load.

Every prepared module keeps Llama's contract (`forward(idx, targets) -> (logits, loss)` and
`generate(...)`), so the training stage and evaluation never branch on the method.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from domainlm.errors import UserError
from domainlm.model.hf import load_hf_folder, save_hf_folder
from domainlm.model.llama import Llama
from domainlm.model.peft.adapter import add_adapters, load_adapters, save_adapters
from domainlm.model.peft.lora import ADAPTER_NAME, add_lora, load_lora, save_lora
from domainlm.model.peft.prompt import PromptTuned, load_prompt, save_prompt
from domainlm.model.peft.qlora import add_qlora, quantized_layers
from domainlm.model.peft.selective import select
from domainlm.recipe.finetune import FinetuneConfig

METHODS = ("full", "lora", "qlora", "adapter", "prompt", "selective")


@dataclass(frozen=True)
class MethodInfo:
    """What a method trains: distinct parameters (a tied embedding once) and its learning rate."""

    method: str
    trainable: int
    total: int
    lr: float

    def __str__(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        return (
            f"{self.method}: {self.trainable:,} of {self.total:,} parameters train "
            f"({share:.3g}%), lr {self.lr:g}"
        )


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise UserError(
            f"finetune.methods: unknown method {method!r}; choose from {', '.join(METHODS)}"
        )


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) over distinct parameters: parameters() yields a tied one once. A
    quantized (QLoRA) base's weights count as parameters, one per weight, as on the float base,
    so LoRA and QLoRA report the same totals."""
    params = list(module.parameters())
    quantized = sum(m.in_features * m.out_features for m in quantized_layers(module))
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, sum(p.numel() for p in params) + quantized


def prepare(base: Llama, method: str, ft: FinetuneConfig) -> tuple[nn.Module, MethodInfo]:
    """The module to train for `method` and what it trains.

    `base` itself is left untouched (the module holds a deep copy), so one loaded base can
    be prepared for several methods in turn. The module is returned in training mode.
    Parameters that must not train have requires_grad False; an optimizer should take only
    those that have it True.
    """
    _check_method(method)
    module: nn.Module
    if method == "qlora":
        module = add_qlora(base, ft)  # quantizes a copy: `base` stays as it was
        trainable, total = count_parameters(module)
        return module.train(), MethodInfo(method, trainable, total, float(ft.qlora.lr))
    model = copy.deepcopy(base)
    module = model
    if method == "full":
        model.requires_grad_(True)
    elif method == "selective":
        select(model, ft.selective)
    elif method == "lora":
        model.requires_grad_(False)
        add_lora(model, ft.lora, ADAPTER_NAME)
    elif method == "adapter":
        model.requires_grad_(False)
        add_adapters(model, ft.adapter)
    else:
        module = PromptTuned(model, ft.prompt.virtual_tokens)
    lr = getattr(ft, method).lr
    trainable, total = count_parameters(module)
    # In training mode (a loaded base is in eval mode): LoRA's dropout, and any dropout, applies.
    return module.train(), MethodInfo(method, trainable, total, float(lr))


def save(
    module: nn.Module,
    method: str,
    out_dir: Path,
    ft: FinetuneConfig,
    base_model: str | None,
    tokenizer_model: Path,
    chat_template: str | None = None,
) -> Path:
    """Save what `method` trained into out_dir (replaced whole).

    full, selective: a complete Hugging Face folder; lora and qlora: a PEFT LoRA folder (qlora's
    holds the adapter alone, which works on the float base too); prompt: a PEFT PROMPT_TUNING
    folder; adapter: our bottleneck folder. base_model (the base's HF folder or hub id) is
    recorded in the adapter configs as base_model_name_or_path (absolute when it is a local
    folder); a whole folder carries `chat_template` (the built-in one when None).
    """
    _check_method(method)
    if method in ("full", "selective"):
        return save_hf_folder(module, Path(tokenizer_model), Path(out_dir),  # type: ignore[arg-type]
                              chat_template=chat_template)
    if method in ("lora", "qlora"):
        return save_lora(module, ADAPTER_NAME, Path(out_dir), ft.lora, base_model)
    if method == "adapter":
        return save_adapters(module, Path(out_dir), ft.adapter)
    if not isinstance(module, PromptTuned):
        raise TypeError(f"method 'prompt' saves a PromptTuned module, got {type(module).__name__}")
    return save_prompt(module, Path(out_dir), base_model)


def load(base: Llama, method: str, path: Path) -> nn.Module:
    """The module `save` wrote for `method`, on `base` (left untouched), in eval mode.

    full and selective folders are whole models: `base` is not used. qlora's adapter is loaded
    on the float `base`, which it fits within int4 error (for the exact training-time logits,
    load_lora it onto quantize_model(base, 4, group_size) instead).
    """
    _check_method(method)
    path = Path(path)
    if method in ("full", "selective"):
        return load_hf_folder(path)
    model = copy.deepcopy(base)
    if method in ("lora", "qlora"):
        load_lora(model, path, ADAPTER_NAME)
        return model.eval()
    if method == "adapter":
        load_adapters(model, path)
        return model.eval()
    return load_prompt(model, path).eval()
