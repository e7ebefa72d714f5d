"""QLoRA (Dettmers et al. 2023): LoRA adapters trained over a frozen base whose block projections
are quantized to 4 bits, so the base costs about 0.56 byte per weight instead of 2 or 4.

Two departures from the paper: the base is int4 in symmetric groups (model/quantized.py), not
NF4 with double-quantized scales, and there is no paged optimizer. The adapter saved is a plain
PEFT LoRA folder: it was fitted to a base that differs from the float one only by quantization
error, so it also loads (load_lora) and works on the bf16/fp32 base, in peft and vLLM as well.
"""

from __future__ import annotations

from torch import nn

from domainlm.model.llama import Llama
from domainlm.model.peft.lora import ADAPTER_NAME, add_lora
from domainlm.model.quantized import QuantLinear, quantize_model
from domainlm.recipe.finetune import FinetuneConfig

GROUP_SIZE_FIELD = "finetune.qlora.group_size"


def add_qlora(base: Llama, ft: FinetuneConfig) -> Llama:
    """A copy of `base` with int4 block projections (ft.qlora.group_size), all of it frozen, and
    LoRA adapters (ft.lora) over the quantized projections."""
    model = quantize_model(base, 4, ft.qlora.group_size, field=GROUP_SIZE_FIELD)
    model.requires_grad_(False)
    add_lora(model, ft.lora, ADAPTER_NAME)
    return model


def base_memory_bytes(module: nn.Module) -> int:
    """Bytes of the quantized base's storage: codes and scales of every QuantLinear."""
    return sum(m.weight_bytes() for m in quantized_layers(module))


def quantized_layers(module: nn.Module) -> list[QuantLinear]:
    return [m for m in module.modules() if isinstance(m, QuantLinear)]
