"""The one way to get a model from a path: a Hugging Face folder, a quantized folder, a GGUF
file, or an adapter folder (PEFT LoRA / prompt tuning, our bottleneck) on its base; and the
SentencePiece tokenizer that goes with it."""

from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm
from torch import nn

from domainlm.errors import UserError
from domainlm.files import read_json
from domainlm.model.compressed import load_quantized
from domainlm.model.gguf import read_gguf_model
from domainlm.model.hf import load_hf_folder
from domainlm.model.llama import Llama
from domainlm.model.peft.methods import load

EXPECTED = (
    "a Hugging Face model folder (config.json + model.safetensors), an int8/int4 folder "
    "(compressed-tensors W8A16/W4A16, as `make quantize` writes), a .gguf file, or an adapter "
    "folder (adapter_config.json + adapter_model.safetensors)"
)

# adapter_config.json type (peft_type, or our domainlm_type) -> domainlm.model.peft method
ADAPTER_METHODS = {"LORA": "lora", "PROMPT_TUNING": "prompt", "bottleneck": "adapter"}


def _config(path: Path) -> dict:
    try:
        config = read_json(path)
    except (ValueError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); expected {EXPECTED}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object; expected {EXPECTED}")
    return config


def _base_path(adapter_dir: Path, config: dict, base: Path | nn.Module | None):
    """The base given explicitly, else base_model_name_or_path (relative to the adapter folder
    when it is not a path from the working directory)."""
    if base is not None:
        return base
    name = config.get("base_model_name_or_path")
    if not name:
        raise UserError(
            f"{adapter_dir / 'adapter_config.json'} names no base_model_name_or_path: pass the "
            "base model explicitly (load_model(path, base=...))"
        )
    candidate = Path(name)
    if not candidate.exists() and (adapter_dir / candidate).exists():
        candidate = adapter_dir / candidate
    if not candidate.exists():
        raise UserError(
            f"{adapter_dir}: its base model {name!r} is not a local path (hub ids are not "
            "downloaded): pass the base model explicitly (load_model(path, base=...))"
        )
    return candidate


def load_model(path: Path, base: Path | nn.Module | None = None) -> nn.Module:
    """The model at `path` in eval mode (float32 unless quantized).

    - a folder with adapter_config.json: the adapter on its base, which is `base` (a path
      load_model reads, or a loaded Llama, left untouched) or else the folder's
      base_model_name_or_path; LORA -> lora, PROMPT_TUNING -> prompt, bottleneck -> adapter;
    - a folder whose config.json has a quantization_config: load_quantized (compressed-tensors
      int8/int4);
    - a folder with config.json: load_hf_folder;
    - a file ending in .gguf: read_gguf_model (dequantized to float32).
    Anything else is a UserError naming the path and what was expected.
    """
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return read_gguf_model(path).eval()
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is a file but not a .gguf"
        raise UserError(f"{path} {what}: expected {EXPECTED}")
    if (path / "adapter_config.json").is_file():
        config = _config(path / "adapter_config.json")
        kind = config.get("peft_type") or config.get("domainlm_type")
        if kind not in ADAPTER_METHODS:
            raise UserError(
                f"{path / 'adapter_config.json'} describes a {kind or 'untyped'} adapter; "
                f"domainlm loads {', '.join(ADAPTER_METHODS)} adapters"
            )
        where = _base_path(path, config, base)
        base_model = where if isinstance(where, nn.Module) else load_model(where)
        if not isinstance(base_model, Llama):
            raise UserError(
                f"the base of {path} must be a whole model (HF folder, quantized folder or "
                f".gguf), not another adapter ({where})"
            )
        return load(base_model, ADAPTER_METHODS[kind], path).eval()
    if (path / "config.json").is_file():
        if "quantization_config" in _config(path / "config.json"):
            return load_quantized(path).eval()
        return load_hf_folder(path).eval()
    raise UserError(f"{path} has neither config.json nor adapter_config.json: expected {EXPECTED}")


def load_tokenizer(path: Path) -> tuple[spm.SentencePieceProcessor, Path]:
    """The SentencePiece tokenizer of the model at `path` and the folder it was found in (which
    also holds tokenizer_config.json and its chat template): the folder itself, an adapter's
    base when the adapter folder has none, or the folder of a .gguf file."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    candidates = [folder]
    if (folder / "adapter_config.json").is_file() and not (folder / "tokenizer.model").is_file():
        candidates.append(_base_path(folder, _config(folder / "adapter_config.json"), None))
    for candidate in candidates:
        if (Path(candidate) / "tokenizer.model").is_file():
            model_file = Path(candidate) / "tokenizer.model"
            return spm.SentencePieceProcessor(model_file=str(model_file)), Path(candidate)
    raise UserError(
        f"no tokenizer.model beside {path}: export the model folder with its tokenizer, or put "
        "the run's build/<run>/tokenizer/tokenizer.model next to the file"
    )
