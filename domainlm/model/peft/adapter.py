"""Bottleneck adapters (Houlsby et al. 2019): small trainable MLPs after a block's sub-layers.

For each block and each chosen sub-layer (attention, MLP), the sub-layer's output h becomes
h + up(act(down(h))) before it is added to the residual stream. `up` starts at zero, so a model
with fresh adapters computes exactly what the base model does.

PEFT has no bottleneck-adapter type (peft 0.21's PeftType lists LoRA and its relatives, IA3,
prompt learning and more, but no Houlsby adapter), so these are saved in our own small format:
adapter_config.json with "domainlm_type": "bottleneck" and adapter_model.safetensors with our
parameter names ("model.layers.{i}.attn_adapter.down.weight", ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from domainlm.errors import UserError
from domainlm.files import atomic_dir, write_json
from domainlm.model.llama import Llama
from domainlm.model.peft.files import read_adapter_folder, save_tensors
from domainlm.recipe.finetune import AdapterConfig

# The sub-layer each `where` entry follows, and the attribute the adapter gets on the block.
WHERE = {"attention": ("self_attn", "attn_adapter"), "mlp": ("mlp", "mlp_adapter")}
KIND = "bottleneck"


class Bottleneck(nn.Module):
    """down (d → b) → GELU → up (b → d), added to its input; up is zero-initialised."""

    def __init__(self, d_model: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(d_model, bottleneck)
        self.up = nn.Linear(bottleneck, d_model)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up(F.gelu(self.down(h)))

    def hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        """A forward hook for the sub-layer: its output, adapted.

        A hook rather than a wrapper module keeps every base parameter's name (and so the HF
        layout) unchanged and needs no change to Block.forward. Attention returns
        (output, kv-cache entry); only the output is adapted. Being a bound method, the hook
        follows the module through copy.deepcopy.
        """
        if isinstance(output, tuple):
            return (self(output[0]), *output[1:])
        return self(output)


def adapter_modules(model: nn.Module) -> dict[str, Bottleneck]:
    """Every Bottleneck by module name ("model.layers.0.attn_adapter")."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Bottleneck)}


def _check(cfg: AdapterConfig) -> None:
    b = cfg.bottleneck
    if isinstance(b, bool) or not isinstance(b, int) or b <= 0:
        raise UserError(f"finetune.adapter.bottleneck must be a positive integer, got {b!r}")
    unknown = [w for w in cfg.where if w not in WHERE]
    if unknown or not cfg.where:
        what = f"has unknown {unknown[0]!r}" if unknown else "is empty"
        raise UserError(f"finetune.adapter.where {what}; use a list of {', '.join(WHERE)}")


def add_adapters(model: Llama, cfg: AdapterConfig) -> list[str]:
    """Attach a Bottleneck after each chosen sub-layer of every block; returns their names.

    The adapters are created on the model's device and dtype and train; nothing else changes
    requires_grad (methods.prepare freezes the base).
    """
    _check(cfg)
    if adapter_modules(model):
        raise ValueError("the model already has bottleneck adapters")
    w = model.model.embed_tokens.weight
    names = []
    for i, block in enumerate(model.model.layers):
        for where in dict.fromkeys(cfg.where):  # each place once, in the recipe's order
            sublayer, attr = WHERE[where]
            adapter = Bottleneck(model.config.d_model, cfg.bottleneck).to(w.device, w.dtype)
            adapter.train(block.training)
            setattr(block, attr, adapter)
            getattr(block, sublayer).register_forward_hook(adapter.hook)
            names.append(f"model.layers.{i}.{attr}")
    return names


def save_adapters(model: nn.Module, out_dir: Path, cfg: AdapterConfig) -> Path:
    """Write the model's adapters: adapter_config.json + adapter_model.safetensors."""
    modules = adapter_modules(model)
    if not modules:
        raise ValueError("the model has no bottleneck adapters")
    tensors = {
        f"{name}.{key}": t for name, m in modules.items() for key, t in m.state_dict().items()
    }
    where = [w for w, (_, attr) in WHERE.items() if any(n.endswith(attr) for n in modules)]
    config = {
        "domainlm_type": KIND,
        "bottleneck": cfg.bottleneck,
        "where": where,
        "activation": "gelu",
        "d_model": next(iter(modules.values())).down.in_features,
        "num_layers": len({n.split(".")[2] for n in modules}),
    }
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "adapter_config.json", config)
        save_tensors(tensors, tmp / "adapter_model.safetensors")
    return out_dir


def load_adapters(model: Llama, path: Path) -> AdapterConfig:
    """Attach the adapters saved in folder `path` to `model` (frozen, for inference)."""
    path = Path(path)
    config, tensors = read_adapter_folder(path, KIND)
    try:
        cfg = AdapterConfig(bottleneck=int(config["bottleneck"]), where=list(config["where"]))
        _check(cfg)
    except (KeyError, TypeError, ValueError, UserError) as e:
        raise UserError(
            f"{path / 'adapter_config.json'} has no valid bottleneck/where ({e}); save the "
            "adapters again"
        ) from None
    if config.get("d_model", model.config.d_model) != model.config.d_model:
        raise UserError(
            f"{path} holds adapters for d_model {config['d_model']}, the model has "
            f"{model.config.d_model}: load them on the base model they were trained with"
        )
    d, b = model.config.d_model, cfg.bottleneck
    shapes = {"down.weight": (b, d), "down.bias": (b,), "up.weight": (d, b), "up.bias": (d,)}
    expected = {
        f"model.layers.{i}.{WHERE[w][1]}.{k}": shape
        for i in range(model.config.n_layers)
        for w in cfg.where
        for k, shape in shapes.items()
    }
    # Checked before the model is touched, so a wrong folder leaves the model as it was.
    odd = sorted(
        k
        for k in set(tensors) | set(expected)
        if k not in expected or k not in tensors or tuple(tensors[k].shape) != expected[k]
    )
    if odd:
        raise UserError(
            f"{path / 'adapter_model.safetensors'} does not fit {path / 'adapter_config.json'} "
            f"and this model (e.g. {odd[:3]}): load the adapters on the base model they were "
            "trained with, or save them again"
        )
    add_adapters(model, cfg)
    for name, m in adapter_modules(model).items():
        with torch.no_grad():
            m.load_state_dict({k: tensors[f"{name}.{k}"] for k in shapes}, strict=True)
        m.requires_grad_(False)
    return cfg
