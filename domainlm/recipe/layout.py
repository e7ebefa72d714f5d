"""The run layout: every path a stage writes under build/<run>/, named once (recipe.layout)."""

from __future__ import annotations

from pathlib import Path

from domainlm.errors import UserError

# Whole models a run can hold, by the name that export.models, `make eval` and the serving
# commands use: the pretrained base, each fine-tuned model that is a complete folder, and each
# aligned policy (its whole folder: the merged one when the policy is a LoRA adapter).
ALIGN_METHODS = ("dpo", "ipo", "ppo", "grpo")
MODEL_NAMES = ("base", "full", "selective", "lora-merged", *ALIGN_METHODS)


class RunLayout:
    """Paths of one run. Each stage owns one folder (plan: one file) and writes its
    manifest.json there; `hashes` caches content hashes of input files across stages."""

    def __init__(self, build_dir: str | Path, name: str) -> None:
        self.root = Path(build_dir) / name

    # Stage folders, in pipeline order.
    @property
    def corpus(self) -> Path:
        return self.root / "corpus"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def tokens(self) -> Path:
        return self.root / "tokens"

    @property
    def plan(self) -> Path:
        """plan.json: the plan is one file, and its manifest fields live in it."""
        return self.root / "plan.json"

    @property
    def pretrain(self) -> Path:
        return self.root / "pretrain"

    @property
    def sft(self) -> Path:
        return self.root / "sft"

    @property
    def align(self) -> Path:
        return self.root / "align"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def sweep(self) -> Path:
        """sweep/: `domainlm sweep`'s table, best recipe, and trials/ (one run folder each)."""
        return self.root / "sweep"

    @property
    def hashes(self) -> Path:
        return self.root / ".hashes.json"

    # Files and folders inside them.
    @property
    def tokenizer_model(self) -> Path:
        return self.tokenizer / "tokenizer.model"

    @property
    def pretrain_model(self) -> Path:
        return self.pretrain / "model"

    def sft_method(self, method: str) -> Path:
        """sft/<method>/: checkpoints, logs and model/ of one fine-tuning method."""
        return self.sft / method

    def sft_model(self, method: str) -> Path:
        """The model folder (or adapter folder) a fine-tuning method saved."""
        return self.sft_method(method) / "model"

    @property
    def lora_merged(self) -> Path:
        return self.sft / "lora-merged"

    def align_method(self, method: str) -> Path:
        """align/<method>/: checkpoints, logs and the outputs of one alignment method (or of
        the reward model: align/reward/)."""
        return self.align / method

    def align_model(self, method: str) -> Path:
        """What a method saved: a PEFT LoRA adapter over the instruction-tuned model, or a whole
        Hugging Face folder (full tuning; the reward model's LlamaForSequenceClassification)."""
        return self.align_method(method) / "model"

    def align_merged(self, method: str) -> Path:
        """A LoRA policy merged into its base: the whole folder export and eval read."""
        return self.align_method(method) / "merged"

    def align_whole(self, method: str) -> Path:
        """The aligned policy as a whole folder: model/ when it is one (full tuning), else
        merged/."""
        model = self.align_model(method)
        return model if (model / "config.json").is_file() else self.align_merged(method)

    @property
    def align_data(self) -> Path:
        """align/data/: the demo's labeled preferences, the pairs and what was quarantined."""
        return self.align / "data"

    @property
    def reward_model(self) -> Path:
        return self.align_model("reward")

    def export_target(self, model: str, fmt: str, gguf_type: str | None = None) -> Path:
        """export/<model>/<format>/ (a folder), or export/<model>/model-<TYPE>.gguf."""
        name = f"model-{gguf_type}.gguf" if gguf_type else fmt
        return self.export / model / name

    @property
    def interop_report(self) -> Path:
        """interop.json: scripts/check_interop.py's comparisons with llama.cpp, transformers,
        peft and the server's clients."""
        return self.root / "interop.json"

    def manifest(self, stage: str) -> Path:
        """The manifest a stage writes last (the plan's is plan.json itself)."""
        if stage == "plan":
            return self.plan
        folder = {"finetune": self.sft, "quantize": self.export}.get(stage, self.root / stage)
        return folder / "manifest.json"

    def model(self, name: str) -> Path:
        """The folder of a whole model by name (see MODEL_NAMES)."""
        folders = self.models(existing=False)
        if name not in folders:
            raise UserError(
                f"unknown model {name!r}; use one of {', '.join(MODEL_NAMES)} (adapters are "
                "served on their base: `domainlm serve --adapter NAME=PATH`)"
            )
        return folders[name]

    def models(self, existing: bool = True) -> dict[str, Path]:
        """Every whole model by name, in MODEL_NAMES order; with `existing`, only those built."""
        folders = {
            "base": self.pretrain_model,
            "full": self.sft_model("full"),
            "selective": self.sft_model("selective"),
            "lora-merged": self.lora_merged,
            **{m: self.align_whole(m) for m in ALIGN_METHODS},
        }
        if existing:
            folders = {k: p for k, p in folders.items() if (p / "config.json").is_file()}
        return folders
