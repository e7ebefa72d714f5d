"""A Hugging Face model folder (config, safetensors weights, tokenizer) from our decoder, and back.

The folder is what `transformers.AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load offline, what llama.cpp's converter reads and what vLLM
serves: our parameter names already are LlamaForCausalLM's, so the weights are saved as they are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from domainlm.errors import UserError
from domainlm.files import atomic_dir, read_json, write_json
from domainlm.model.llama import Llama
from domainlm.recipe.model import LlamaConfig
from domainlm.tokenizer import special
from domainlm.tokenizer.hf_files import read_model_proto, write_tokenizer_files
from domainlm.tokenizer.special import SpecialTokens
from domainlm.tokenizer.templates import CHAT

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # sharded checkpoints (transformers' layout)
TIED_KEY = "lm_head.weight"
EMBED_KEY = "model.embed_tokens.weight"


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"export dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _weights(model: Llama, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict on the CPU in dtype, contiguous, with the tied output projection dropped.

    safetensors refuses tensors that share storage, and transformers re-ties lm_head to the
    embedding when config.json says tie_word_embeddings, so the tied copy is left out (as
    transformers' own save_pretrained does).
    """
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop(TIED_KEY, None)
    return {k: v.detach().to(device="cpu", dtype=dtype).contiguous() for k, v in state.items()}


def save_hf_folder(
    model: Llama,
    tokenizer_model: Path,
    out: Path,
    *,
    dtype: str = "float32",
    generation: dict[str, Any] | None = None,
    chat_template: str | None = None,
) -> Path:
    """Write config.json, model.safetensors, generation_config.json and the tokenizer files.

    The folder is built beside `out` and renamed into place, replacing any folder there, so a
    killed export never leaves a half-written model. `generation` entries (temperature,
    eos_token_id lists, ...) are added to generation_config.json; without `chat_template` the
    folder carries the built-in chat template (write_metadata). Returns `out`.
    """
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model saves its original
    torch_dtype = _dtype(dtype)
    tokenizer_model, out = Path(tokenizer_model), Path(out)
    proto = read_model_proto(tokenizer_model)  # a missing or broken file fails before any work
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    SpecialTokens.from_model(sp)  # the reserved pieces sit at the ids the configs name
    config = model.config
    if config.vocab_size < sp.get_piece_size():
        raise UserError(
            f"{tokenizer_model} has {sp.get_piece_size()} pieces but the model's vocab_size is "
            f"{config.vocab_size}: export with the tokenizer the model was trained with"
        )

    with atomic_dir(out) as tmp:
        save_file(_weights(model, torch_dtype), str(tmp / WEIGHTS), metadata={"format": "pt"})
        write_metadata(tmp, config, tokenizer_model, dtype, chat_template, generation)
    return out


def write_metadata(
    folder: Path,
    config: LlamaConfig,
    tokenizer_model: Path,
    dtype: str,
    chat_template: str | None = None,
    generation: dict[str, Any] | None = None,
    quantization: dict[str, Any] | None = None,
) -> None:
    """config.json, generation_config.json and the tokenizer files of every model folder (float
    or quantized): the one place their ids, chat template and generation defaults are set.

    bos is the token that precedes a document in training (special.DOCUMENT_START_ID, eos), so
    tools that start a text with bos score it as we do. The chat template is the built-in one
    unless given. generation_config.json sets no length: transformers' generate warns when a
    caller's max_new_tokens meets a max_length there, and a max_new_tokens there overrides (with
    a warning) a caller's max_length; the caller chooses, as transformers recommends.
    """
    hf = config.to_hf_dict(special.DOCUMENT_START_ID, special.EOS_ID, special.PAD_ID, dtype)
    if quantization is not None:
        hf["quantization_config"] = quantization
    write_json(folder / "config.json", hf)
    write_json(
        folder / "generation_config.json",
        {
            "bos_token_id": special.DOCUMENT_START_ID,
            "eos_token_id": special.EOS_ID,
            "pad_token_id": special.PAD_ID,
            **(generation or {}),
        },
    )
    write_tokenizer_files(
        tokenizer_model,
        folder,
        CHAT if chat_template is None else chat_template,
        model_max_length=config.max_seq_len,
    )


# ------------------------------------------------------------------------------------ loading


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors, or of the shards a sharded index lists."""
    single, index = path / WEIGHTS, path / WEIGHTS_INDEX
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = read_json(index)["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(
                f"{index} is not a safetensors index ({e}); export the folder again"
            ) from None
        files = [path / name for name in sorted(set(weight_map.values()))]
    else:
        pickled = [n for n in ("pytorch_model.bin", "model.pt") if (path / n).exists()]
        hint = (
            f" ({pickled[0]} is there, but domainlm never unpickles weights: re-save them with "
            "safetensors, e.g. save_pretrained(..., safe_serialization=True))"
            if pickled
            else ""
        )
        raise UserError(
            f"{single} is missing{hint}: export the model again with `save_hf_folder`, or "
            "point to a folder that holds model.safetensors"
        )
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise UserError(f"{f} is missing (listed in {index}): copy or export the folder again")
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise UserError(
                f"{f} is not a readable safetensors file ({e}); export it again"
            ) from None
    return state


def load_hf_folder(path: Path, dtype: torch.dtype = torch.float32) -> Llama:
    """Our decoder from a Hugging Face Llama folder (ours or any compatible one), in eval mode.

    Reads config.json and safetensors weights only (never pickles); a tied output projection
    missing from the file is the embedding, as transformers reads it.
    """
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UserError(
            f"{config_path} is missing: {path} is not a Hugging Face model folder; export one "
            "with `save_hf_folder` or point to the folder that holds config.json"
        )
    try:
        hf_config = read_json(config_path)
    except (ValueError, json.JSONDecodeError) as e:
        raise UserError(f"{config_path} is not valid JSON ({e}); export the folder again") from None
    config = LlamaConfig.from_hf_dict(hf_config)
    state = _read_state(path)

    # Built on the meta device and then allocated: no time spent on a random initialisation
    # that the weights overwrite. to_empty rebuilds the RoPE tables (Llama's _apply hook) but
    # gives each module its own new Parameter, so the tied projection is tied again.
    with torch.device("meta"):
        model = Llama(config)
    model = model.to_empty(device="cpu")
    if config.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model = model.to(dtype)

    expected = model.state_dict()
    if config.tie_embeddings:
        state.setdefault(TIED_KEY, state.get(EMBED_KEY, torch.empty(0)))
    # Older transformers saved the RoPE frequencies; they are derived from the config here.
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    where = path / WEIGHTS if (path / WEIGHTS).is_file() else path / WEIGHTS_INDEX
    if missing or unexpected:
        names = (missing or unexpected)[:3]
        raise UserError(
            f"{where} {'lacks' if missing else 'has unexpected'} tensors {names} "
            f"({len(missing)} missing, {len(unexpected)} unexpected) for the Llama shape in "
            f"{config_path}: the weights and config.json disagree; export the folder again"
        )
    for k, want in expected.items():
        if state[k].shape != want.shape:
            raise UserError(
                f"{where}: tensor {k} has shape {tuple(state[k].shape)}, but {config_path} "
                f"implies {tuple(want.shape)}; the weights and config.json disagree, export the "
                "folder again"
            )
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    return model.eval()
