"""Completions sampled from the current model through the one decoding engine: token rollouts
for PPO and GRPO, and text completions for the labeling loop (`domainlm align sample`)."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from domainlm.align.sequences import evaluating
from domainlm.corpus.jsonlines import json_objects
from domainlm.corpus.records import QUARANTINE, Rejected, clip
from domainlm.errors import UserError
from domainlm.files import atomic_path
from domainlm.model.decode import context_length, generate
from domainlm.tokenizer import special
from domainlm.tokenizer.templates import Template

PROMPT_TOO_LONG = f"{QUARANTINE}:prompt_too_long"


def rollout_tokens(
    model: nn.Module, prompts: Sequence[list[int]], n: int, *, max_new_tokens: int,
    temperature: float, top_p: float | None, generator: torch.Generator,
) -> list[list[int]]:
    """n sampled continuations of every prompt (prompt-major: prompt i's are at i*n .. i*n+n-1),
    each ending with EOS when the model produced one (nothing after it).

    The engine's batched `generate` continues rows of one length, so prompts are batched by
    length, each with its n copies; the generator makes the whole set a function of its seed.
    """
    device = next(model.parameters()).device
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_length[len(p)].append(i)
    out: list[list[int]] = [[] for _ in range(len(prompts) * n)]
    with evaluating(model):
        for length in sorted(by_length):
            rows = by_length[length]
            idx = torch.tensor([prompts[i] for i in rows for _ in range(n)], device=device)
            seq = generate(model, idx, max_new_tokens, temperature=temperature, top_p=top_p,
                           eos_id=special.EOS_ID, generator=generator)
            for k, row in enumerate(seq[:, length:].tolist()):
                end = row.index(special.EOS_ID) + 1 if special.EOS_ID in row else len(row)
                i, j = divmod(k, n)
                out[rows[i] * n + j] = row[:end]
    return out


def completion_text(sp, tokens: list[int], stop: str) -> str:
    """The reply a completion's tokens spell: up to EOS and the template's end of turn."""
    text = sp.decode([t for t in tokens if t != special.EOS_ID])
    if stop and stop in text:
        text = text[: text.index(stop)]
    return text.strip()


def prompt_ids(sp, template: Template, messages: list[dict]) -> list[int]:
    """A prompt's tokens as inference sees them: the conversation with the generation prompt."""
    return sp.encode(template.render(messages, add_generation_prompt=True))


def fits(model: nn.Module, ids: list[int], max_new_tokens: int) -> bool:
    return len(ids) + max_new_tokens <= context_length(model)


def sample_texts(
    model: nn.Module, sp, template: Template, prompts: Sequence[list[dict]], n: int, *,
    max_new_tokens: int, temperature: float, top_p: float | None, seed: int,
) -> list[list[str]]:
    """n completions (text) of each prompt (chat messages ending with the user's)."""
    ids = [prompt_ids(sp, template, m) for m in prompts]
    gen = torch.Generator().manual_seed(seed)
    tokens = rollout_tokens(model, ids, n, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, generator=gen)
    stop = template.stop or ""
    texts = [completion_text(sp, t, stop) for t in tokens]
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


def read_prompts(path: Path, quarantine: list[dict]) -> list[tuple[str, list[dict]]]:
    """(origin, messages) of a prompts file: JSONL records with `prompt` (text, or chat
    messages ending with the user's); other lines are quarantined with file:line and why."""
    from domainlm.align.records import BadRecord, parse_prompt

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--prompts: {path} does not exist; give a JSONL file of "
                        '{"prompt": "..."} records')
    out = []
    for item in json_objects(path, str(path), 8 << 20, name_byte=False):
        if isinstance(item, Rejected):
            quarantine.append({"origin": item.origin, "reason": item.reason,
                               "detail": item.detail, "text": item.text})
            continue
        origin, text, obj = item
        try:
            messages = [{"role": r, "content": c} for r, c in parse_prompt(obj)]
        except BadRecord as e:
            quarantine.append({"origin": origin, "reason": e.reason, "detail": e.detail,
                               "text": clip(text.rstrip("\r\n"))})
            continue
        out.append((origin, messages))
    return out


def write_samples(
    model: nn.Module, sp, template: Template, prompts_file: Path, out: Path, n: int, *,
    max_new_tokens: int, temperature: float, top_p: float | None, seed: int,
) -> dict:
    """The labeling loop's first half: for every prompt of `prompts_file`, n completions of the
    model, written to `out` as ranked-completion records with `ranking` null, for a labeling
    team to fill in (the rank of each completion, 1 = best; equal ranks for ties)."""
    if n < 2:
        raise UserError(f"-n {n}: a ranking needs at least 2 completions per prompt")
    quarantine: list[dict] = []
    prompts = read_prompts(prompts_file, quarantine)
    read = len(prompts) + len(quarantine)
    usable = []
    for origin, messages in prompts:
        if fits(model, prompt_ids(sp, template, messages), max_new_tokens):
            usable.append((origin, messages))
        else:
            quarantine.append({"origin": origin, "reason": PROMPT_TOO_LONG,
                               "detail": f"the prompt and {max_new_tokens} new tokens exceed the "
                               f"model's context of {context_length(model)}; shorten it",
                               "text": clip(json.dumps(messages))})
    texts = sample_texts(model, sp, template, [m for _, m in usable], n,
                         max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         seed=seed)
    with atomic_path(Path(out)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for (origin, messages), completions in zip(usable, texts, strict=True):
            prompt: str | list = messages
            if len(messages) == 1 and messages[0]["role"] == "user":
                prompt = messages[0]["content"]
            f.write(json.dumps({"prompt": prompt, "completions": completions, "ranking": None,
                                "origin": origin}, ensure_ascii=False) + "\n")
    return {"prompts": read, "written": len(usable), "quarantined": quarantine}
