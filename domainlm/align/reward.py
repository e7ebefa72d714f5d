"""The reward model: the instruction-tuned decoder with a scalar head that scores a whole
sequence at its last token, saved as a transformers LlamaForSequenceClassification folder."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from domainlm.align.sequences import last_positions
from domainlm.errors import UserError
from domainlm.files import atomic_dir, read_json, write_json
from domainlm.model.llama import Llama
from domainlm.model.peft.lora import lora_layers, merged
from domainlm.recipe.model import LlamaConfig
from domainlm.tokenizer import special
from domainlm.tokenizer.hf_files import write_tokenizer_files

ARCHITECTURE = "LlamaForSequenceClassification"


class RewardModel(nn.Module):
    """A decoder without its output projection, and `score`, a linear map of the final
    hidden state to one number. The sequence's reward is read at its last real token (right
    padding with PAD), which is where transformers' sequence classifier reads it too."""

    def __init__(self, backbone: Llama) -> None:
        super().__init__()
        backbone.lm_head = nn.Identity()  # forward(idx)[0] is now the final norm's output
        self.backbone = backbone
        self.config = backbone.config
        self.score = nn.Linear(backbone.config.d_model, 1, bias=False)
        nn.init.normal_(self.score.weight, std=backbone.config.init_std)

    @classmethod
    def from_decoder(cls, decoder: Llama) -> RewardModel:
        """A reward model started from a copy of `decoder` (left untouched)."""
        return cls(copy.deepcopy(decoder).requires_grad_(True))

    def forward(self, ids: Tensor) -> Tensor:
        """Rewards (B,) of the sequences ids (B, T), right-padded with PAD."""
        hidden = self.backbone(ids)[0]
        scores = self.score(hidden).squeeze(-1)
        return scores.gather(1, last_positions(ids)[:, None]).squeeze(1).float()


@torch.no_grad()
def score_sequences(model: RewardModel, sequences: list[list[int]], batch: int = 16) -> Tensor:
    """Rewards of token sequences (prompt + completion), batched with right padding."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for a in range(0, len(sequences), batch):
        chunk = sequences[a : a + batch]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), special.PAD_ID, dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        out.append(model(ids.to(device)).cpu())
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0)


def save_reward_model(model: RewardModel, tokenizer_model: Path, out: Path,
                      chat_template: str | None = None) -> Path:
    """A folder that `transformers.AutoModelForSequenceClassification` loads (num_labels 1):
    config.json, model.safetensors (LoRA merged into the weights) and the tokenizer files."""
    backbone = model.backbone
    if lora_layers(backbone):
        backbone = merged(backbone, "default")
    cfg = backbone.config
    config = cfg.to_hf_dict(special.DOCUMENT_START_ID, special.EOS_ID, special.PAD_ID)
    config |= {
        "architectures": [ARCHITECTURE],
        "num_labels": 1,
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
        "problem_type": "regression",
        "tie_word_embeddings": False,  # no output projection to tie
    }
    tensors = {k: v for k, v in backbone.state_dict().items() if not k.startswith("lm_head")}
    tensors["score.weight"] = model.score.weight
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    with atomic_dir(Path(out)) as tmp:
        write_json(tmp / "config.json", config)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_tokenizer_files(Path(tokenizer_model), tmp, chat_template,
                              model_max_length=cfg.max_seq_len)
    return Path(out)


def load_reward_model(path: Path) -> RewardModel:
    """The reward model save_reward_model wrote (or any LlamaForSequenceClassification folder
    with num_labels 1), in eval mode. Not domainlm.model.load.load_model's business: that
    loader returns decoders with the forward(idx) -> (logits, loss) contract, and a reward
    model is not one."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UserError(f"{config_path} is missing: {path} is not a reward model folder; run "
                        "`make align` to train one")
    hf = read_json(config_path)
    if ARCHITECTURE not in hf.get("architectures", []) or hf.get("num_labels", 1) != 1:
        raise UserError(f"{config_path} is not a {ARCHITECTURE} with num_labels 1: point to "
                        "build/<run>/align/reward/model")
    model = RewardModel(Llama(LlamaConfig.from_hf_dict(hf)))
    state = {"backbone." + k if not k.startswith("score.") else k: v
             for k, v in load_file(str(path / "model.safetensors")).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{path / 'model.safetensors'} does not fit {config_path}: missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}; train the reward model again")
    return model.eval()
