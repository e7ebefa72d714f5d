"""What training reads from build/<run>/plan.json, typed: the shape, the tokens, the batch and
the strategy the planner chose."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from domainlm.errors import UserError
from domainlm.files import read_json
from domainlm.recipe.model import LlamaConfig


@dataclass(frozen=True)
class Plan:
    shape: LlamaConfig
    tokens: float  # training tokens
    strategy: str  # the Lightning strategy the plan chose (auto, ddp, fsdp, deepspeed_stage_N)
    micro_batch: int
    grad_accum: int
    seq_len: int
    global_batch_sequences: int
    activation_checkpointing: bool

    @classmethod
    def read(cls, path: Path) -> Plan:
        """plan.json as a Plan; an unreadable file is one clear error that says to re-plan."""
        try:
            plan = read_json(path)
            s = plan["strategy"]
            return cls(
                shape=LlamaConfig.from_dict(plan["shape"]),
                tokens=float(plan["tokens"]),
                strategy=str(s.get("lightning", "auto")),
                micro_batch=int(s["micro_batch"]),
                grad_accum=int(s["grad_accum"]),
                seq_len=int(s["seq_len"]),
                global_batch_sequences=int(s["global_batch_sequences"]),
                activation_checkpointing=bool(s.get("activation_checkpointing", False)),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{path} is unreadable ({e}): run `make plan` again") from None
