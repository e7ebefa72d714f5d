"""Recipes: one YAML file describes a whole run; its sections are dataclasses (one module per
stage group) and `load_recipe` validates it with messages that name the key."""

from domainlm.recipe.align import (
    AlignConfig,
    AlignLoRAConfig,
    DPOConfig,
    GRPOConfig,
    PPOConfig,
    PreferenceSource,
    RewardConfig,
)
from domainlm.recipe.corpus import (
    CorpusConfig,
    DecontamConfig,
    DedupConfig,
    PIIConfig,
    QualityFilters,
    SourceConfig,
)
from domainlm.recipe.finetune import (
    AdapterConfig,
    FinetuneConfig,
    FullConfig,
    InstructionSource,
    LoRAConfig,
    PromptTuningConfig,
    QLoRAConfig,
    SelectiveConfig,
)
from domainlm.recipe.loader import Recipe, RecipeError, load_recipe, merged, section_dict
from domainlm.recipe.model import LlamaConfig, ModelConfig
from domainlm.recipe.stages import (
    EarlyStoppingConfig,
    EvalConfig,
    ExportConfig,
    PlanConfig,
    TokenizerConfig,
    TrainConfig,
)
from domainlm.recipe.sweep import SweepConfig, SweepParam

__all__ = [
    "AdapterConfig",
    "AlignConfig",
    "AlignLoRAConfig",
    "CorpusConfig",
    "DPOConfig",
    "DecontamConfig",
    "DedupConfig",
    "EarlyStoppingConfig",
    "EvalConfig",
    "ExportConfig",
    "FinetuneConfig",
    "FullConfig",
    "GRPOConfig",
    "InstructionSource",
    "LlamaConfig",
    "LoRAConfig",
    "ModelConfig",
    "PIIConfig",
    "PPOConfig",
    "PlanConfig",
    "PreferenceSource",
    "PromptTuningConfig",
    "QLoRAConfig",
    "QualityFilters",
    "Recipe",
    "RecipeError",
    "RewardConfig",
    "SelectiveConfig",
    "SweepConfig",
    "SweepParam",
    "SourceConfig",
    "TokenizerConfig",
    "TrainConfig",
    "load_recipe",
    "merged",
    "section_dict",
]
