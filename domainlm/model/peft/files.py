"""Reading and writing adapter folders (adapter_config.json + adapter_model.safetensors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from domainlm.errors import UserError
from domainlm.files import read_json

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def base_reference(base_model: str | Path | None) -> str | None:
    """base_model_name_or_path as adapter_config.json records it: a local folder as an absolute
    path, so that peft's AutoPeftModelForCausalLM finds it from any working directory (a
    relative one would be read from the loader's directory, or taken for a hub id); anything
    else (a hub id) as given."""
    if base_model is None:
        return None
    path = Path(base_model)
    return str(path.resolve()) if path.exists() else str(base_model)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Tensors detached, on the CPU and contiguous, as safetensors needs them."""
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(data, str(path), metadata={"format": "pt"})


def read_adapter_folder(path: Path, kind: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and tensors of an adapter folder whose type is `kind`.

    `kind` is a PEFT peft_type ("LORA", "PROMPT_TUNING") or one of our own "domainlm_type"s
    ("bottleneck"). Anything missing, unreadable or of another type is a UserError that says
    what to do.
    """
    path = Path(path)
    config_path, weights_path = path / CONFIG, path / WEIGHTS
    if not path.is_dir():
        raise UserError(f"{path} is not a folder: point to the adapter folder that holds {CONFIG}")
    if not config_path.is_file():
        raise UserError(
            f"{config_path} is missing: {path} is not an adapter folder; save the adapter again "
            "(domainlm.model.peft.save, or peft's save_pretrained)"
        )
    try:
        config = read_json(config_path)
    except (ValueError, json.JSONDecodeError) as e:
        raise UserError(f"{config_path} is not valid JSON ({e}); save the adapter again") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path} is not a JSON object; save the adapter again")
    got = config.get("peft_type") or config.get("domainlm_type")
    if got != kind:
        raise UserError(
            f"{config_path} describes a {got or 'untyped'} adapter, not {kind}: load it with the "
            "method it was trained with"
        )
    if not weights_path.is_file():
        pickled = (path / "adapter_model.bin").is_file()
        hint = (
            " (adapter_model.bin is there, but domainlm never unpickles weights: re-save it with "
            "save_pretrained(..., safe_serialization=True))"
            if pickled
            else ""
        )
        raise UserError(
            f"{weights_path} is missing{hint}: save the adapter again, or copy the whole folder"
        )
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise UserError(
            f"{weights_path} is not a readable safetensors file ({e}); save the adapter again"
        ) from None
    if not tensors:
        raise UserError(f"{weights_path} holds no tensors; save the adapter again")
    return config, tensors
