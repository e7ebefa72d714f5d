"""Selective fine-tuning: train only the last few blocks and/or every RMSNorm gain.

The cheapest method that needs no new modules: the result is a plain Llama, saved and served
like the base model (Lee et al. 2019 found the top layers do most of the adaptation; norm gains
are BitFit-like, Zaken et al. 2021, for a bias-free model).
"""

from __future__ import annotations

from domainlm.errors import UserError
from domainlm.model.llama import Llama, RMSNorm
from domainlm.recipe.finetune import SelectiveConfig


def select(model: Llama, cfg: SelectiveConfig) -> list[str]:
    """Freeze everything but the last cfg.top_blocks blocks and (cfg.norms) every RMSNorm gain.

    Returns the names of the parameters left trainable.
    """
    n_layers = model.config.n_layers
    k = cfg.top_blocks
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n_layers:
        raise UserError(
            f"finetune.selective.top_blocks must be an integer from 0 to the model's {n_layers} "
            f"layers, got {k!r}"
        )
    if k == 0 and not cfg.norms:
        raise UserError(
            "finetune.selective trains nothing with top_blocks 0 and norms false: raise "
            "top_blocks or set norms: true"
        )
    model.requires_grad_(False)
    for block in list(model.model.layers)[n_layers - k :]:
        block.requires_grad_(True)
    if cfg.norms:
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.requires_grad_(True)
    return [name for name, p in model.named_parameters() if p.requires_grad]
