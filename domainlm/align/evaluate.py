"""How an aligned policy compares with the instruction-tuned model on held-out prompts: greedy
answers of both, judged by the reward model and by the programmatic judge (ROUGE-L against the
prompt's best-known reply, ties broken by chrF), and the forgetting (pretraining-validation
perplexity)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from domainlm.align.demo import judge
from domainlm.align.reward import RewardModel, score_sequences
from domainlm.align.sequences import Encoded, EncodedPair
from domainlm.finetune.evaluate import answers, perplexity
from domainlm.finetune.records import Example
from domainlm.finetune.sft_data import encode_example
from domainlm.tokenizer.templates import Template


@dataclass
class Verdicts:
    """Per held-out prompt, whether the policy's answer beat the instruction-tuned model's."""

    wins: int = 0
    ties: int = 0
    losses: int = 0

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def win_rate(self) -> float:
        """Wins over prompts (ties count as not won)."""
        return self.wins / self.n if self.n else float("nan")

    @property
    def win_rate_ties_half(self) -> float:
        """Wins plus half the ties, over prompts (AlpacaEval's convention)."""
        return (self.wins + 0.5 * self.ties) / self.n if self.n else float("nan")

    def add(self, a, b, tol: float = 1e-9) -> None:
        """One verdict on two scores, or two tuples of scores compared in order (the first
        that differs by more than tol decides)."""
        for x, y in zip(*(v if isinstance(v, tuple) else (v,) for v in (a, b)), strict=True):
            if x > y + tol:
                self.wins += 1
                return
            if y > x + tol:
                self.losses += 1
                return
        self.ties += 1

    def to_dict(self) -> dict:
        return {"wins": self.wins, "ties": self.ties, "losses": self.losses,
                "win_rate": self.win_rate, "win_rate_ties_half": self.win_rate_ties_half}


@dataclass
class Answers:
    texts: list[str]
    judged: list[tuple[float, float]]  # (ROUGE-L, chrF) against the prompt's best-known reply
    rewards: list[float]  # the reward model's score of prompt + answer
    ppl: float | None = None
    samples: list[dict] = field(default_factory=list)

    def means(self) -> dict:
        n = max(len(self.judged), 1)
        return {"rougeL": sum(j[0] for j in self.judged) / n,
                "chrF": sum(j[1] for j in self.judged) / n,
                "reward": sum(self.rewards) / n, "pretrain_ppl": self.ppl}


def encode_answer(sp, template: Template, messages: list[dict], answer: str,
                  max_seq_len: int) -> Encoded:
    example = Example("judge", [*messages, {"role": "assistant", "content": answer or " "}], "")
    enc = encode_example(sp, template, example, max_seq_len, [])
    return enc if enc is not None else ([], [])


def answer_prompts(model: nn.Module, sp, template: Template, prompts: list[list[dict]],
                   references: list[str], rm: RewardModel, *, max_new_tokens: int,
                   max_seq_len: int, windows=None) -> Answers:
    """Greedy answers (the serving path's decoding) and what the judges think of them."""
    texts = [template.render(m, add_generation_prompt=True) for m in prompts]
    got = answers(model, sp, texts, max_new_tokens, template.stop or "")
    scores = [judge(r, a) for r, a in zip(references, got, strict=True)]
    seqs = [encode_answer(sp, template, m, a, max_seq_len)[0] for m, a in
            zip(prompts, got, strict=True)]
    rewards = score_sequences(rm, seqs).tolist() if seqs else []
    ppl = perplexity(model, windows) if windows is not None and len(windows) else None
    samples = [{"prompt": m[-1]["content"], "reference": r, "answer": a}
               for m, r, a in list(zip(prompts, references, got, strict=True))[:3]]
    return Answers(got, scores, rewards, ppl, samples)


def compare(policy: Answers, sft: Answers) -> dict:
    """Verdicts of both judges, policy against the instruction-tuned model, prompt by prompt."""
    by_judge, by_rouge, by_reward = Verdicts(), Verdicts(), Verdicts()
    for a, b in zip(policy.judged, sft.judged, strict=True):
        by_judge.add(a, b)
        by_rouge.add(a[0], b[0])
    for a, b in zip(policy.rewards, sft.rewards, strict=True):
        by_reward.add(a, b, tol=1e-6)
    return {
        "judge": by_judge.to_dict(),
        "judge_rouge_only": by_rouge.to_dict(),
        "judge_reward": by_reward.to_dict(),
        **policy.means(),
    }


@torch.no_grad()
def pair_accuracy(rm: RewardModel, pairs: list[EncodedPair]) -> float | None:
    """Share of pairs whose chosen reply the reward model scores higher."""
    if not pairs:
        return None
    chosen = score_sequences(rm, [p.chosen[0] for p in pairs])
    rejected = score_sequences(rm, [p.rejected[0] for p in pairs])
    return float((chosen > rejected).float().mean())
