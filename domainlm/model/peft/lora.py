"""LoRA (Hu et al. 2021): trainable low-rank updates beside frozen Linear layers, in PEFT's format.

A targeted projection W becomes W·x + s·B·A·x with A (r × in), B (out × r) and s = alpha / r
(alpha / sqrt(r) with rsLoRA, Kalajdzievski 2023). The layout mirrors PEFT's LoraLayer (the
frozen layer is `base_layer`, adapters live in `lora_A[name]` / `lora_B[name]`) so that the
saved folder is exactly what `peft.PeftModel.from_pretrained` and vLLM's multi-LoRA serving load.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from domainlm.errors import UserError
from domainlm.files import atomic_dir, write_json
from domainlm.model.llama import Llama
from domainlm.model.peft.files import base_reference, read_adapter_folder, save_tensors
from domainlm.model.quantized import QuantLinear
from domainlm.recipe.finetune import LoRAConfig

ADAPTER_NAME = "default"  # PEFT's name for a model's only adapter
# Every Linear of a block, by leaf name, and the sub-module that holds it.
TARGETS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
# PeftModel wraps LoraModel wraps LlamaForCausalLM: hence two "base_model.model." levels and no
# adapter name (PEFT strips it when saving, and vLLM expects it stripped).
_PREFIX = "base_model.model."
_KEY = re.compile(
    r"base_model\.model\.(model\.layers\.\d+\.(?:self_attn|mlp)\.(\w+))\.lora_([AB])\.weight"
)
# PEFT features this module does not implement; a folder that uses them is refused, not misread.
_UNSUPPORTED = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "lora_bias": False,
    "modules_to_save": None,
    "alpha_pattern": {},
}


class LoRALinear(nn.Module):
    """A frozen nn.Linear (or QuantLinear: QLoRA) plus named low-rank adapters, at most one
    of them active."""

    def __init__(self, base_layer: nn.Linear | QuantLinear) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.r: dict[str, int] = {}
        self.active: str | None = None
        # Per-row adapters of a batch (set_row_adapters): (adapter, row indices) pairs; when
        # set, they replace `active`.
        self.rows: list[tuple[str, Tensor]] | None = None
        self.train(base_layer.training)

    @property
    def weight(self) -> Tensor:
        # As PEFT's tuner layers do: code that reads `proj.weight` (dtype, device) keeps working.
        return self.base_layer.weight

    def add(self, name: str, r: int, alpha: float, dropout: float, rslora: bool) -> None:
        base = self.base_layer  # the adapter takes its weight's device and dtype: for a
        w = base.scales if isinstance(base, QuantLinear) else base.weight  # QuantLinear, fp32
        a = nn.Linear(self.base_layer.in_features, r, bias=False)
        b = nn.Linear(r, self.base_layer.out_features, bias=False)
        # PEFT's default init: A kaiming-uniform, B zero, so the update starts at exactly 0.
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        self.lora_A[name] = a.to(device=w.device, dtype=w.dtype)
        self.lora_B[name] = b.to(device=w.device, dtype=w.dtype)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # New modules start in training mode; follow the model's, so an adapter added to a
        # model in eval mode does not apply dropout at inference.
        self.lora_dropout[name].train(self.base_layer.training)
        self.scaling[name] = alpha / (math.sqrt(r) if rslora else r)
        self.r[name] = r

    def delta_weight(self, name: str) -> Tensor:
        """s·B·A, the (out × in) update this adapter adds to the frozen weight, in fp32."""
        b, a = self.lora_B[name].weight.float(), self.lora_A[name].weight.float()
        return self.scaling[name] * (b @ a)

    def _delta(self, name: str, x: Tensor) -> Tensor:
        a = self.lora_A[name]
        return self.lora_B[name](a(self.lora_dropout[name](x.to(a.weight.dtype)))) * (
            self.scaling[name])

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        if self.rows is not None:
            # Several adapters in one batch (S-LoRA's idea, Sheng et al. 2023): the frozen
            # layer runs once for every row, each adapter's low-rank update on its own rows.
            for name, index in self.rows:
                if name in self.lora_A:
                    # index_copy, not index_add: torch's CPU index_add takes ~0.1 s on these
                    # small tensors (measured, torch 2.13); a group's rows are distinct anyway.
                    h = self._delta(name, x.index_select(0, index))
                    rows = result.index_select(0, index) + h.to(result.dtype)
                    result = result.index_copy(0, index, rows)
            return result
        name = self.active
        if name is None or name not in self.lora_A:
            return result
        return (result + self._delta(name, x)).to(result.dtype)

    def remove(self, name: str) -> None:
        """Forget adapter `name` (its weights are freed); the others are untouched."""
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            if name in table:
                del table[name]
        self.scaling.pop(name, None)
        self.r.pop(name, None)
        if self.active == name:
            self.active = None


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear by module name ("model.layers.0.self_attn.q_proj")."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _check(cfg: LoRAConfig) -> None:
    if isinstance(cfg.r, bool) or not isinstance(cfg.r, int) or cfg.r <= 0:
        raise UserError(f"finetune.lora.r must be a positive integer, got {cfg.r!r}")
    if not cfg.alpha > 0:
        raise UserError(f"finetune.lora.alpha must be positive, got {cfg.alpha!r}")
    if not 0 <= cfg.dropout < 1:
        raise UserError(f"finetune.lora.dropout must be in [0, 1), got {cfg.dropout!r}")
    unknown = [t for t in cfg.target_modules if t not in TARGETS]
    if unknown or not cfg.target_modules:
        what = f"{unknown[0]!r} matches no layer" if unknown else "is empty"
        raise UserError(f"finetune.lora.target_modules {what}; choose from {', '.join(TARGETS)}")


def add_lora(model: Llama, cfg: LoRAConfig, name: str = "default") -> list[str]:
    """Add adapter `name` to every targeted Linear of every block and make it the active one.

    Layers wrapped by an earlier adapter get the new one beside it. The wrapped base weights are
    frozen; nothing else changes requires_grad (methods.prepare freezes the rest). Returns the
    names of the targeted modules.
    """
    _check(cfg)
    if any(name in m.lora_A for m in lora_layers(model).values()):
        raise ValueError(f"the model already has a LoRA adapter named {name!r}")
    names = []
    for i, block in enumerate(model.model.layers):
        for target in dict.fromkeys(cfg.target_modules):
            parent = getattr(block, TARGETS[target])
            layer = getattr(parent, target)
            if not isinstance(layer, LoRALinear):
                layer = LoRALinear(layer)
                setattr(parent, target, layer)
            layer.add(name, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora)
            names.append(f"model.layers.{i}.{TARGETS[target]}.{target}")
    set_adapter(model, name)
    return names


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make `name` the active adapter of every LoRALinear (None: the base model alone).

    Only the selection changes: base weights and the other adapters' weights are untouched.
    """
    layers = lora_layers(model)
    if name is not None and not any(name in m.lora_A for m in layers.values()):
        known = sorted({n for m in layers.values() for n in m.lora_A})
        raise ValueError(f"no LoRA adapter named {name!r}; the model has {known}")
    for m in layers.values():
        m.active = name
        m.rows = None


def set_row_adapters(model: nn.Module, names: list[str | None]) -> None:
    """Row i of the next batches goes through adapter names[i] (None: the base alone), in
    every LoRALinear; one name for every row is the same as set_adapter(model, name)."""
    layers = lora_layers(model)
    if not layers:
        if any(n is not None for n in names):
            raise ValueError(f"the model has no LoRA adapters, asked for {set(names)}")
        return
    if len(set(names)) <= 1:
        set_adapter(model, names[0] if names else None)
        return
    device = next(iter(layers.values())).weight.device
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        if n is not None:
            groups.setdefault(n, []).append(i)
    rows = [(n, torch.tensor(ix, device=device)) for n, ix in groups.items()]
    for m in layers.values():
        m.rows = rows


def unload_lora(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from every layer; the base and the other adapters stay as they
    were (the empty LoRALinear wrappers compute exactly their frozen layer)."""
    layers = lora_layers(model)
    if not any(name in m.lora_A for m in layers.values()):
        raise ValueError(f"the model has no LoRA adapter named {name!r}")
    for m in layers.values():
        m.remove(name)


def merged(model: Llama, name: str) -> Llama:
    """A plain Llama (a deep copy) whose targeted weights are W + s·B·A: no LoRA modules left."""
    if not any(name in m.lora_A for m in lora_layers(model).values()):
        raise ValueError(f"the model has no LoRA adapter named {name!r}")
    if any(isinstance(m.base_layer, QuantLinear) for m in lora_layers(model).values()):
        raise ValueError("a quantized base cannot merge: load_lora on the float one, merge that")
    out = copy.deepcopy(model)
    for module_name, layer in lora_layers(out).items():
        parent_name, _, leaf = module_name.rpartition(".")
        base = layer.base_layer
        if name in layer.lora_A:
            with torch.no_grad():
                merged_weight = base.weight.float() + layer.delta_weight(name)
                base.weight.copy_(merged_weight.to(base.weight.dtype))
        setattr(out.get_submodule(parent_name), leaf, base)
    # A plain model behaves like one that was built fresh: every parameter trains.
    return out.requires_grad_(True)


# ------------------------------------------------------------------------------------ files


def save_lora(
    model: nn.Module, name: str, out_dir: Path, cfg: LoRAConfig, base_model: str | None
) -> Path:
    """Write adapter `name` as a PEFT LoRA folder: adapter_config.json + adapter_model.safetensors.

    r, target_modules and the scaling come from the layers themselves; alpha, dropout and
    rsLoRA from cfg, which must be the config the adapter was added with.
    """
    tensors: dict[str, Tensor] = {}
    targets: set[str] = set()
    for module_name, layer in lora_layers(model).items():
        if name not in layer.lora_A:
            continue
        if layer.r[name] != cfg.r:
            raise ValueError(f"{module_name} has rank {layer.r[name]}, cfg.r is {cfg.r}")
        targets.add(module_name.rpartition(".")[2])
        for ab in ("A", "B"):
            weight = getattr(layer, f"lora_{ab}")[name].weight
            tensors[f"{_PREFIX}{module_name}.lora_{ab}.weight"] = weight
    if not tensors:
        raise ValueError(f"the model has no LoRA adapter named {name!r}")
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": [t for t in TARGETS if t in targets],  # canonical order
        "use_rslora": cfg.rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "base_model_name_or_path": base_reference(base_model),
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
        "lora_bias": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "adapter_config.json", config)
        save_tensors(tensors, tmp / "adapter_model.safetensors")
    return out_dir


def load_lora(model: Llama, path: Path, name: str = "default") -> LoRAConfig:
    """Add the LoRA adapter in folder `path` (ours or saved by peft) to `model` as `name`.

    The adapter is loaded frozen (for inference, as PEFT loads by default) and made active.
    Returns its settings as a LoRAConfig (lr is the default: a folder does not record it).
    """
    path = Path(path)
    config, tensors = read_adapter_folder(path, "LORA")
    where = path / "adapter_config.json"
    for key, want in _UNSUPPORTED.items():
        value = config.get(key)
        if value and value != want:  # absent, null, false and {} all mean "not used"
            raise UserError(
                f"{where}: {key} = {value!r} is not supported by domainlm's LoRA; "
                f"save the adapter with {key} = {want!r}"
            )
    # Targets and ranks come from the tensors, not from target_modules (which PEFT allows to be
    # a regex): so rank_pattern needs no parsing either, each layer's r is its A's height.
    found: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None or m[2] not in TARGETS:
            raise UserError(
                f"{path / 'adapter_model.safetensors'}: tensor {key!r} is not a LoRA weight of a "
                f"block's {', '.join(TARGETS)}; domainlm loads only those (re-train the adapter "
                "without modules_to_save or embedding targets)"
            )
        found.setdefault(m[1], {})[m[3]] = tensor
    alpha, rslora = float(config.get("lora_alpha", 8)), bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout", 0.0))
    # Every pair is checked before the model is touched, so a wrong folder leaves it as it was.
    checked = []
    for module_name, pair in found.items():
        try:
            linear = model.get_submodule(module_name)
        except AttributeError:
            linear = None
        a, b = pair.get("A"), pair.get("B")
        if linear is None or a is None or b is None:
            problem = "has only half a LoRA pair" if linear is not None else "is not in this model"
            raise UserError(
                f"{path}: {module_name} {problem}; the adapter was trained for a different base "
                "model: load it on that one"
            )
        base = linear.base_layer if isinstance(linear, LoRALinear) else linear
        r = a.shape[0]
        if a.shape != (r, base.in_features) or b.shape != (base.out_features, r):
            raise UserError(
                f"{path}: {module_name} has LoRA shapes {tuple(a.shape)}, {tuple(b.shape)} but the "
                f"layer is {base.out_features} x {base.in_features}; the adapter was trained for a "
                "different base model: load it on that one"
            )
        if isinstance(linear, LoRALinear) and name in linear.lora_A:
            raise ValueError(f"adapter {name!r} already exists on {module_name}")
        checked.append((module_name, linear, a, b))
    for module_name, linear, a, b in checked:
        if not isinstance(linear, LoRALinear):
            linear = LoRALinear(linear)
            parent_name, _, leaf = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name), leaf, linear)
        linear.add(name, a.shape[0], alpha, dropout, rslora)
        with torch.no_grad():
            linear.lora_A[name].weight.copy_(a)
            linear.lora_B[name].weight.copy_(b)
        linear.lora_A[name].requires_grad_(False)
        linear.lora_B[name].requires_grad_(False)
    set_adapter(model, name)
    return LoRAConfig(
        r=int(config.get("r") or next(iter(found.values()))["A"].shape[0]),
        alpha=alpha,
        dropout=dropout,
        target_modules=[t for t in TARGETS if any(n.endswith("." + t) for n in found)],
        rslora=rslora,
    )
