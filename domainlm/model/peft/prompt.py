"""Prompt tuning (Lester et al. 2021): trainable embeddings prepended to every input of a frozen
decoder, saved in PEFT's PROMPT_TUNING format."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from domainlm.errors import UserError
from domainlm.files import atomic_dir, write_json
from domainlm.model.llama import IGNORE_INDEX, KVCache, Llama
from domainlm.model.peft.files import base_reference, read_adapter_folder, save_tensors
from domainlm.recipe.model import LlamaConfig

KIND = "PROMPT_TUNING"
KEY = "prompt_embeddings"  # PEFT's key in adapter_model.safetensors


class PromptTuned(nn.Module):
    """A frozen Llama whose every input is prefixed with n_virtual trainable embeddings.

    forward and generate keep Llama's contract: logits and loss cover the real tokens only, and
    the virtual tokens are invisible to the caller except that they take up n_virtual of the
    model's max_seq_len positions.
    """

    def __init__(self, base: Llama, n_virtual: int, seed: int = 0) -> None:
        super().__init__()
        if isinstance(n_virtual, bool) or not isinstance(n_virtual, int) or n_virtual <= 0:
            raise UserError(
                f"finetune.prompt.virtual_tokens must be a positive integer, got {n_virtual!r}"
            )
        if n_virtual >= base.config.max_seq_len:
            raise UserError(
                f"finetune.prompt.virtual_tokens ({n_virtual}) leaves no room in the model's "
                f"max_seq_len ({base.config.max_seq_len}); use fewer virtual tokens"
            )
        self.base = base.requires_grad_(False)
        self.n_virtual = n_virtual
        # Lester et al.: starting from the embeddings of real tokens trains faster and more
        # stably than a random init; the seed makes the choice of tokens reproducible.
        embed = base.model.embed_tokens.weight
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(base.config.vocab_size, (n_virtual,), generator=g).to(embed.device)
        self.prompt_embeddings = nn.Parameter(embed.detach()[ids].clone())
        self.train(base.training)

    @property
    def config(self) -> LlamaConfig:
        return self.base.config

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, *, cache: KVCache | None = None,
        **batched: Tensor,
    ) -> tuple[Tensor, Tensor | None]:
        """(logits (B, T, vocab) of the real positions, loss over the real targets or None).

        With a non-empty cache the virtual tokens are already in it, so idx goes straight on
        (with a batch's per-row positions and key mask, `batched`, which count them).
        """
        if cache:
            return self.base(idx, targets, cache=cache, **batched)
        B, n = idx.size(0), self.n_virtual
        prompt = self.prompt_embeddings.to(self.base.model.embed_tokens.weight.dtype)
        x = torch.cat((prompt.expand(B, -1, -1), self.base.model.embed_tokens(idx)), dim=1)
        if targets is not None:
            # Virtual positions predict nothing: their targets are ignored by the loss.
            ignore = targets.new_full((B, n), IGNORE_INDEX)
            targets = torch.cat((ignore, targets), dim=1)
        logits, loss = self.base(inputs_embeds=x, targets=targets, cache=cache)
        return logits[:, n:], loss


def save_prompt(module: PromptTuned, out_dir: Path, base_model: str | None) -> Path:
    """Write PEFT's PROMPT_TUNING folder: adapter_config.json + adapter_model.safetensors."""
    config = module.config
    adapter_config = {
        "peft_type": KIND,
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": module.n_virtual,
        "token_dim": config.d_model,
        "num_transformer_submodules": 1,
        "num_attention_heads": config.n_heads,
        "num_layers": config.n_layers,
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "base_model_name_or_path": base_reference(base_model),
        "inference_mode": True,
        "modules_to_save": None,
        "revision": None,
    }
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "adapter_config.json", adapter_config)
        save_tensors({KEY: module.prompt_embeddings}, tmp / "adapter_model.safetensors")
    return out_dir


def load_prompt(base: Llama, path: Path) -> PromptTuned:
    """A PromptTuned around `base` (frozen, prompt included) from a PROMPT_TUNING folder."""
    path = Path(path)
    config, tensors = read_adapter_folder(path, KIND)
    prompt = tensors.get(KEY)
    d, n = base.config.d_model, config.get("num_virtual_tokens")
    if prompt is None or prompt.dim() != 2 or prompt.shape[1] != d or prompt.shape[0] != n:
        shape = None if prompt is None else tuple(prompt.shape)
        raise UserError(
            f"{path / 'adapter_model.safetensors'}: {KEY} has shape {shape}, expected "
            f"({n}, {d}) from {path / 'adapter_config.json'} and the model's d_model: load it "
            "on the base model it was trained with, or save it again"
        )
    if config.get("num_transformer_submodules", 1) != 1:
        raise UserError(
            f"{path / 'adapter_config.json'}: num_transformer_submodules must be 1 for a "
            "decoder-only model; save the prompt with task_type CAUSAL_LM"
        )
    module = PromptTuned(base, int(n))
    with torch.no_grad():
        module.prompt_embeddings.copy_(prompt)
    return module.requires_grad_(False)
