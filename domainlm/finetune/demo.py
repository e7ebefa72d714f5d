"""The demo's instruction set: questions about the standard library's API answered from its
docstrings, derived deterministically, split into train and held-out by module."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from domainlm.corpus.mix import unit_hash
from domainlm.corpus.python_docs import ApiEntry, iter_modules
from domainlm.finetune.records import Example

TASKS = ("describe", "signature", "module")
MAX_ANSWER_CHARS = 300  # a describe answer is cut at the last sentence end before this
MIN_ANSWER_CHARS = 20
MIN_ANSWER_WORDS = 3
MAX_SIGNATURE_CHARS = 160  # longer signatures would not fit the demo's short sequences
# Sample caps that keep the demo's fine-tuning to minutes on a laptop CPU.
MAX_TRAIN = 2000
MAX_HELDOUT = 200

_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_NOT_AN_END = ("e.g.", "i.e.", "etc.", "cf.", "vs.", "approx.")


def first_paragraph(doc: str, max_chars: int = MAX_ANSWER_CHARS) -> str | None:
    """The docstring's first paragraph on one line, cut at a sentence end to fit max_chars;
    None when there is no usable one (empty, a doctest, too short, no sentence end in reach)."""
    para = re.split(r"\n[ \t]*\n", doc.strip(), maxsplit=1)[0]
    text = " ".join(para.split())
    if text.startswith(">>>") or len(text.split()) < MIN_ANSWER_WORDS:
        return None
    if len(text) > max_chars:
        ends = [
            m.end()
            # One character past the cap, so "$" matches only at the text's real end.
            for m in _SENTENCE_END.finditer(text[: max_chars + 1])
            if m.end() <= max_chars and not text[: m.end()].endswith(_NOT_AN_END)
        ]
        text = text[: ends[-1]] if ends else ""
    return text if len(text) >= MIN_ANSWER_CHARS else None


def _documented(root: Path | None) -> tuple[list[tuple[ApiEntry, str]], dict[str, set[str]]]:
    """Public functions and classes with a usable first paragraph, and for every public name,
    the modules that define it (a question "which module provides X" needs one answer)."""
    entries: list[tuple[ApiEntry, str]] = []
    defined_in: dict[str, set[str]] = defaultdict(set)
    seen: set[tuple[str, str]] = set()
    for module, _, api in iter_modules(root):
        for e in api:
            if e.kind not in ("function", "class") or e.qualname.startswith("_"):
                continue
            defined_in[e.qualname].add(module)
            if (module, e.qualname) in seen:  # redefined in the same module: the first counts
                continue
            seen.add((module, e.qualname))
            answer = first_paragraph(e.doc)
            if answer is not None:
                entries.append((e, answer))
    return entries, defined_in


def _examples(e: ApiEntry, answer: str, unique: bool, name: str) -> list[Example]:
    full = f"{e.module}.{e.qualname}"
    origin = f"{name}:{full}"
    turns = [(TASKS[0], f"What does `{full}` do?", answer)]
    if e.signature and len(e.signature) <= MAX_SIGNATURE_CHARS:
        turns.append((TASKS[1], f"Give the signature of `{full}`.", f"`{e.qualname}{e.signature}`"))
    if unique:
        question = f"Which standard-library module provides `{e.qualname}`?"
        turns.append((TASKS[2], question, f"`{e.module}`"))
    return [
        Example(
            task=f"{name}/{task}",
            messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            origin=origin,
        )
        for task, q, a in turns
    ]


def heldout_modules(modules: list[str], heldout_fraction: float) -> set[str]:
    """Modules held out, by a hash of the module name alone: the split stays put when the seed
    or the caps change, so held-out scores of different runs compare."""
    if heldout_fraction <= 0 or not modules:
        return set()
    out = {m for m in modules if unit_hash("heldout-module", m) < heldout_fraction}
    # A small standard library may give none; one module is held out then.
    return out or {min(modules, key=lambda m: unit_hash("heldout-module", m))}


def _sample(examples: list[Example], cap: int, seed: int) -> list[Example]:
    """At most `cap` examples chosen by a seeded hash, returned in source order."""
    if len(examples) > cap:
        keep = sorted(examples, key=lambda x: unit_hash("sample", seed, x.task, x.origin))[:cap]
        chosen = {(x.task, x.origin) for x in keep}
        examples = [x for x in examples if (x.task, x.origin) in chosen]
    return examples


def python_docs_examples(
    heldout_fraction: float = 0.1,
    max_train: int = MAX_TRAIN,
    max_heldout: int = MAX_HELDOUT,
    seed: int = 0,
    *,
    name: str = "python-docs",
    root: Path | None = None,
) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples of the tasks describe, signature and module.

    Every example of one module lands in the same split, so held-out questions are about
    modules the model was not fine-tuned on. `root` is the standard library's folder (tests).
    """
    entries, defined_in = _documented(root)
    held = heldout_modules(sorted({e.module for e, _ in entries}), heldout_fraction)
    train: list[Example] = []
    heldout: list[Example] = []
    for e, answer in entries:
        side = heldout if e.module in held else train
        side.extend(_examples(e, answer, len(defined_in[e.qualname]) == 1, name))
    return _sample(train, max_train, seed), _sample(heldout, max_heldout, seed)
