"""The stage's data: every preference source read (the demo's labeled by its program first),
pairs split by prompt into train and held out, encoded, and the held-out prompts with their
best-known reply for the win rates."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from domainlm.align.records import Preferences, prompt_key, read_preferences
from domainlm.align.sequences import EncodedPair, encode_pair
from domainlm.corpus.mix import unit_hash
from domainlm.errors import UserError
from domainlm.files import hash_json, read_json, write_json, write_text
from domainlm.recipe import Recipe
from domainlm.tokenizer.templates import Template


@dataclass
class AlignData:
    train: list[EncodedPair]
    heldout: list[EncodedPair]
    eval_prompts: list[tuple[list[dict], str]]  # held-out prompt messages, best-known reply
    counts: dict
    quarantined: list[dict] = field(default_factory=list)


def source_name(i: int, src) -> str:
    return src.name or (Path(src.path).stem if src.path else src.kind)


def demo_files(recipe: Recipe, sft: nn.Module, sp, template: Template, sft_hash: str,
               say) -> tuple[Path, Path]:
    """The demo's labeled train and held-out files under align/data/, written by the
    programmatic labeler unless the ones there were made from the same model and settings."""
    from domainlm.align.demo import choose, demo_examples, write_labeled

    a = recipe.align
    out = recipe.layout.align_data
    train_file, held_file = out / "python-docs.jsonl", out / "python-docs-heldout.jsonl"
    key = hash_json([sft_hash, recipe.seed, recipe.finetune.heldout_fraction, a.samples,
                     a.label_prompts, a.eval_prompts, a.temperature, a.top_p, a.max_new_tokens,
                     recipe.finetune.template, a.rank_reference, a.other_answers])
    meta = out / "python-docs.meta.json"
    if meta.is_file() and read_json(meta).get("key") == key and held_file.is_file():
        return train_file, held_file
    train, held = demo_examples(recipe.seed, recipe.finetune.heldout_fraction)
    train = choose(train, a.label_prompts, recipe.seed, "align-label")
    held = choose(held, a.eval_prompts, recipe.seed, "align-eval")
    say(f"align: labeling {a.samples} samples of {len(train)} + {len(held)} held-out prompts "
        "by ROUGE-L against the reference answer (a program standing in for people)")
    out.mkdir(parents=True, exist_ok=True)
    n_train = write_labeled(sp=sp, model=sft, template=template, examples=train, cfg=a,
                            seed=recipe.seed, out=train_file)
    n_held = write_labeled(sp=sp, model=sft, template=template, examples=held, cfg=a,
                           seed=recipe.seed + 1, out=held_file)
    write_json(meta, {"key": key, "train": n_train, "heldout": n_held})
    return train_file, held_file


def load_data(recipe: Recipe, sft: nn.Module, sp, template: Template, sft_hash: str,
              say) -> AlignData:
    a = recipe.align
    if not a.data:
        raise UserError("align.data is empty: list at least one preference file")
    train, held = Preferences(), Preferences()
    for i, src in enumerate(a.data):
        name = source_name(i, src)
        if src.kind == "python-docs":
            train_file, held_file = demo_files(recipe, sft, sp, template, sft_hash, say)
            read_preferences(train_file, name, train, key=f"align.data[{i}]")
            read_preferences(held_file, f"{name} (held out)", held, key=f"align.data[{i}]")
            continue
        if not src.path:
            raise UserError(f"align.data[{i}]: a jsonl source needs `path`")
        both = Preferences()
        read_preferences(Path(src.path), name, both, key=f"align.data[{i}].path")
        for pair in both.pairs:  # by prompt: every pair of a prompt lands on one side
            side = held if unit_hash("align-heldout", prompt_key(pair.prompt)) < \
                a.heldout_fraction else train
            side.pairs.append(pair)
            side.best.setdefault(pair.prompt, both.best.get(pair.prompt, pair.chosen))
        train.counts[name] = both.counts[name]
        train.quarantined += both.quarantined
    quarantined = train.quarantined + held.quarantined
    encoded = {}
    for side, prefs in (("train", train), ("heldout", held)):
        encoded[side] = [e for p in prefs.pairs
                         if (e := encode_pair(sp, template, p, a.max_seq_len, quarantined))]
    eval_prompts = [([{"role": r, "content": c} for r, c in prompt], best)
                    for prompt, best in held.best.items()][: a.eval_prompts]
    counts = {"sources": {**train.counts, **held.counts},
              "pairs": {"train": len(encoded["train"]), "heldout": len(encoded["heldout"])},
              "quarantined": len(quarantined), "eval_prompts": len(eval_prompts)}
    out = recipe.layout.align_data
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "rejected.jsonl",
               "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in quarantined))
    if not encoded["train"]:
        raise UserError("align: no usable preference pairs; see build/<run>/align/data/"
                        "rejected.jsonl for every quarantined line and why")
    return AlignData(encoded["train"], encoded["heldout"], eval_prompts, counts, quarantined)
