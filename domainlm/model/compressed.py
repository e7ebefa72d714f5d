"""The int8 / int4 model folder in compressed-tensors' pack-quantized format (W8A16: int8 per
output channel; W4A16: int4 in groups along each row; both symmetric), which transformers loads
(with the compressed-tensors package) and vLLM serves, and reading it back into our decoder.

Why this format: a quantization_config that transformers does not know is skipped without an
error, leaving random linear layers where the quantized ones were; compressed-tensors is the
standard whose weight-only math is exactly ours (model/quantized.py), so the folder holds our
codes and scales as they are. Each block projection is stored as
`<name>.weight_packed` (int32: the code + 2^(bits-1) at bit i·bits of its row, 32/bits codes a
word), `<name>.weight_scale` (out × 1, or out × groups, in the model's float dtype) and
`<name>.weight_shape` ([out, in]); embeddings, norms and the head are plain float tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from domainlm.errors import UserError
from domainlm.files import atomic_dir, read_json
from domainlm.model.hf import write_metadata
from domainlm.model.llama import Llama, RotaryEmbedding
from domainlm.model.quantized import QuantLinear, _block_linears, _check, quantize_model
from domainlm.recipe.model import LlamaConfig
from domainlm.tokenizer.hf_files import read_model_proto

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
WEIGHTS = "model.safetensors"
SUFFIXES = ("weight_packed", "weight_scale", "weight_shape")


def quantization_config(bits: int, group_size: int) -> dict[str, Any]:
    """config.json's quantization_config: one scheme for every Linear but the output head."""
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": True,
        "strategy": "channel" if bits == 8 else "group",
        "group_size": None if bits == 8 else group_size,
        "dynamic": False,
    }
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": FORMAT,
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def pack(codes: Tensor, bits: int) -> Tensor:
    """Signed codes (out, in) as compressed-tensors packs them: int32 (out, ceil(in·bits/32))."""
    per = 32 // bits
    u = codes.to(torch.int64) + (1 << (bits - 1))
    u = F.pad(u, (0, -u.size(1) % per)).view(u.size(0), -1, per)
    words = (u << (torch.arange(per, dtype=torch.int64) * bits)).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack(packed: Tensor, bits: int, columns: int) -> Tensor:
    """The signed codes (out, columns), int32, of what `pack` wrote."""
    per = 32 // bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    u = (words[..., None] >> (torch.arange(per, dtype=torch.int64) * bits)) & ((1 << bits) - 1)
    return (u.view(packed.size(0), -1)[:, :columns] - (1 << (bits - 1))).to(torch.int32)


def _signed_codes(layer: QuantLinear) -> Tensor:
    if layer.bits == 8:
        return layer.qweight.to(torch.int32)
    return layer._codes(torch.int32) - 8


def _layer_state(codes: Tensor, scales: Tensor, bits: int) -> dict[str, Tensor]:
    """QuantLinear's buffers from signed codes and scales."""
    if bits == 8:
        return {"qweight": codes.to(torch.int8), "scales": scales.float().reshape(-1)}
    u = (codes + 8).to(torch.uint8).view(codes.size(0), -1, 2)
    return {"qweight": u[..., 0] | (u[..., 1] << 4), "scales": scales.float()}


def save_quantized(
    model: Llama,
    out_dir: Path,
    tokenizer_model: Path,
    bits: int,
    group_size: int = 64,
    *,
    chat_template: str | None = None,
) -> Path:
    """Write the compressed-tensors folder: config.json (with its quantization_config),
    model.safetensors, generation_config.json and the tokenizer files (hf.write_metadata).

    `model` is a float model (quantized here) or one quantize_model made with these settings.
    The folder is built beside out_dir and renamed into place.
    """
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        model = quantize_model(model, bits, group_size)
    elif any(m.bits != bits or (bits == 4 and m.group_size != group_size) for m in layers):
        raise ValueError(f"the model is not quantized with bits={bits}, group_size={group_size}")
    read_model_proto(Path(tokenizer_model))  # a missing or broken file fails first
    config = model.config
    dtype = model.lm_head.weight.dtype
    state = {k: v for k, v in model.state_dict().items() if ".qweight" not in k and
             not k.endswith(".scales")}
    if config.tie_embeddings:
        state.pop("lm_head.weight")  # the embedding, re-tied on load (as transformers does)
    for name, parent, leaf in _block_linears(model):
        layer = getattr(parent, leaf)
        state[f"{name}.weight_packed"] = pack(_signed_codes(layer), bits)
        scales = layer.scales.to(dtype)
        state[f"{name}.weight_scale"] = scales[:, None] if bits == 8 else scales
        state[f"{name}.weight_shape"] = torch.tensor([layer.out_features, layer.in_features])
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with atomic_dir(Path(out_dir)) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        write_metadata(tmp, config, Path(tokenizer_model), str(dtype).removeprefix("torch."),
                       chat_template, quantization=quantization_config(bits, group_size))
    return Path(out_dir)


def read_scheme(quant: Any, config_path: Path, fix: str) -> tuple[int, int]:
    """(bits, group_size) of a quantization_config this module reads, else a UserError."""
    if not isinstance(quant, dict):
        raise UserError(f"{config_path}: quantization_config is not an object; {fix}")
    if quant.get("quant_method") == "domainlm":
        raise UserError(
            f"{config_path} is in domainlm's former int8/int4 format, which only domainlm read "
            "(transformers loads it with random layers): run `make quantize` again to write "
            "the compressed-tensors format"
        )
    groups = quant.get("config_groups")
    scheme = next(iter(groups.values())) if isinstance(groups, dict) and len(groups) == 1 else {}
    w = scheme.get("weights") or {}
    bits = w.get("num_bits")
    ok = (
        quant.get("quant_method") == QUANT_METHOD
        and quant.get("format") == FORMAT
        and scheme.get("targets") == ["Linear"]
        and scheme.get("input_activations") is None
        and w.get("type") == "int"
        and w.get("symmetric") is True
        and not w.get("dynamic")
        and (bits, w.get("strategy")) in ((8, "channel"), (4, "group"))
        and "lm_head" in (quant.get("ignore") or [])
    )
    if not ok:
        raise UserError(
            f"{config_path}: domainlm reads compressed-tensors {FORMAT} folders with one "
            "symmetric int8 per-channel (W8A16) or int4 group-wise (W4A16) scheme on every "
            f"Linear but lm_head; this quantization_config is another; {fix}"
        )
    return bits, w.get("group_size") if bits == 4 else 0


def load_quantized(path: Path) -> Llama:
    """The model in a compressed-tensors int8/int4 folder, in eval mode (safetensors only)."""
    path = Path(path)
    config_path, weights = path / "config.json", path / WEIGHTS
    fix = "quantize the model again with `make quantize` (or save_quantized)"
    if not config_path.is_file():
        raise UserError(f"{config_path} is missing: {path} is not a quantized model folder; {fix}")
    try:
        hf = read_json(config_path)
        quant = hf.get("quantization_config")
    except (ValueError, json.JSONDecodeError, AttributeError) as e:
        raise UserError(f"{config_path} is not a JSON config ({e}); {fix}") from None
    if quant is None:
        raise UserError(f"{config_path} has no quantization_config: load a float folder with "
                        f"load_hf_folder, or {fix}")
    bits, group_size = read_scheme(quant, config_path, fix)
    if not weights.is_file():
        raise UserError(f"{weights} is missing; {fix}, or copy the whole folder")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights} is not a readable safetensors file ({e}); {fix}") from None

    config = LlamaConfig.from_hf_dict(hf)
    # Built on the meta device and given the file's tensors as they are (assign): no float copy
    # of the block weights is ever allocated, and the float parts keep the file's dtype.
    with torch.device("meta"):
        model = Llama(config)
        _check(bits, group_size, model, f"{config_path}: quantization_config group_size")
        for _, parent, leaf in _block_linears(model):
            lin = getattr(parent, leaf)
            setattr(parent, leaf, QuantLinear(lin.in_features, lin.out_features, bits,
                                              group_size or 64))
    for name, parent, leaf in _block_linears(model):
        layer = getattr(parent, leaf)
        parts = {s: state.pop(f"{name}.{s}", None) for s in SUFFIXES}
        shape = (layer.out_features, layer.in_features)
        groups = 1 if bits == 8 else layer.in_features // layer.group_size
        packed_cols = -(-layer.in_features * bits // 32)
        if (
            any(t is None for t in parts.values())
            or parts["weight_packed"].dtype != torch.int32
            or tuple(parts["weight_packed"].shape) != (layer.out_features, packed_cols)
            or tuple(parts["weight_scale"].shape) != (layer.out_features, groups)
            or not parts["weight_scale"].is_floating_point()
            or parts["weight_shape"].tolist() != list(shape)
        ):
            raise UserError(
                f"{weights}: the tensors of {name} ({', '.join(SUFFIXES)}) are missing or do "
                f"not fit the {shape[0]}×{shape[1]} layer that {config_path} implies; {fix}"
            )
        codes = unpack(parts["weight_packed"], bits, layer.in_features)
        for k, v in _layer_state(codes, parts["weight_scale"], bits).items():
            state[f"{name}.{k}"] = v
    if config.tie_embeddings and "model.embed_tokens.weight" in state:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    expected = model.state_dict()
    for k in sorted(expected.keys() | state.keys()):
        got, want = state.get(k), expected.get(k)
        if got is None or want is None or got.shape != want.shape:
            what = "missing" if got is None else f"{got.dtype} {tuple(got.shape)}"
            implied = f"{want.dtype} {tuple(want.shape)}" if want is not None else "no such tensor"
            raise UserError(
                f"{weights}: tensor {k} is {what}, but {config_path} implies {implied}; {fix}"
            )
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign made two Parameters
    model.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
    return model.eval()
