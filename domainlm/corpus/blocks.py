"""Pipeline blocks: each step of the per-shard work is a small class built from the recipe that
takes a batch of documents and returns the kept ones and the rejected ones with their reasons.

The runner (shardwork.py) counts, times and writes the rejections of every block alike, so a
domain team adds a filter as one class (a `Filter` with a `check` method) and one recipe entry
(`corpus.blocks` or `corpus.sources[].blocks`); docs/corpus.md has a worked example.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from domainlm.corpus.decontaminate import Decontaminator
from domainlm.corpus.dedup import MinHasher, exact_key, shingle_hashes
from domainlm.corpus.filters import GROUPS, QualityFilter, TextView
from domainlm.corpus.normalize import normalize
from domainlm.corpus.pii import redact
from domainlm.corpus.records import FILTER, Doc, Rejected, clip
from domainlm.errors import UserError
from domainlm.recipe import PIIConfig, QualityFilters


@dataclass
class BlockStats:
    """What blocks count besides kept and rejected: languages found, PII replaced."""

    languages: Counter = field(default_factory=Counter)
    pii: Counter = field(default_factory=Counter)


class Block:
    """One step of the per-shard work. Subclasses set `name` (the timing key, and for filters
    the rule in the reason `filter:<name>`) and implement `process`."""

    name: ClassVar[str] = ""
    # Bump when the block's output changes for the same input: cached shards are redone.
    version: ClassVar[int] = 1

    def process(self, docs: list[Doc], stats: BlockStats) -> tuple[list[Doc], list[Rejected]]:
        raise NotImplementedError


class Filter(Block):
    """A block that keeps or drops each document on its own: implement `check`.

    `check(doc)` returns None to keep the document, or a detail for a person (the measured
    value and the threshold) to drop it with the reason `filter:<name>`. The constructor
    takes the recipe entry's other keys as keyword arguments.
    """

    def check(self, doc: Doc) -> str | None:
        raise NotImplementedError

    def process(self, docs: list[Doc], stats: BlockStats) -> tuple[list[Doc], list[Rejected]]:
        kept, rejected = [], []
        reason = f"{FILTER}:{self.name}"
        for doc in docs:
            detail = self.check(doc)
            if detail is None:
                kept.append(doc)
            else:
                rejected.append(
                    Rejected(doc.origin, doc.source, reason, detail, clip(doc.text), doc.id)
                )
        return kept, rejected


# --------------------------------------------------------------------------------------------
# The built-in blocks, in the order the runner applies them.


class Normalize(Block):
    name = "normalize"

    def process(self, docs, stats):
        for doc in docs:
            doc.text = normalize(doc.text)
        return docs, []


class QualityRules(Block):
    """One group of the Gopher/C4 rules (corpus/filters.py); the reason names the rule."""

    def __init__(self, rules: QualityFilter, group: str):
        self.rules = rules
        self.group = getattr(rules, group)
        self.name = group  # type: ignore[misc]  (per instance: one class, five groups)

    def process(self, docs, stats):
        kept, rejected = [], []
        group = self.group
        for doc in docs:
            view = doc.view
            if view is None:
                view = doc.view = TextView(doc.text)
            verdict = group(view)
            if self.name == "language" and self.rules.last_language is not None:
                stats.languages[self.rules.last_language] += 1
            if verdict is None:
                kept.append(doc)
            else:
                rule, detail = verdict
                rejected.append(
                    Rejected(doc.origin, doc.source, f"{FILTER}:{rule}", detail, clip(doc.text),
                             doc.id)
                )
        return kept, rejected


class RedactPII(Block):
    name = "pii"

    def __init__(self, cfg: PIIConfig):
        self.cfg = cfg

    def process(self, docs, stats):
        for doc in docs:
            doc.text, counts = redact(doc.text, self.cfg)
            doc.view = None  # the text changed: the rules' splits no longer apply
            stats.pii.update(counts)
        return docs, []


class ExactKey(Block):
    name = "exact_key"

    def process(self, docs, stats):
        for doc in docs:
            doc.key = exact_key(doc.text)
        return docs, []


class MinHashSignature(Block):
    """Shingle sets and MinHash signatures; the runner writes sets and LSH band hashes."""

    name = "minhash"

    def __init__(self, shingle: int, num_perm: int, seed: int):
        self.shingle = shingle
        self.hasher = MinHasher(num_perm, seed)

    def process(self, docs, stats):
        sets = shingle_hashes([doc.text for doc in docs], self.shingle)
        sigs = self.hasher.sign(sets)
        for doc, s, sig in zip(docs, sets, sigs, strict=True):
            doc.shingles, doc.sig = s, sig
        return docs, []


class Decontaminate(Block):
    """Flags documents that share n-grams with an eval set; the corpus-wide pass drops them
    after dedup (so a duplicate is counted as a duplicate first)."""

    name = "decontaminate"

    def __init__(self, decon: Decontaminator):
        self.decon = decon

    def process(self, docs, stats):
        for doc in docs:
            hit = self.decon.check(doc.text)
            doc.contaminated = None if hit is None else f"{hit[0]}: {hit[1]}"
        return docs, []


# --------------------------------------------------------------------------------------------
# Building the blocks of a shard from its settings.

_DECONTAMINATORS: dict[tuple, Decontaminator] = {}


def _decontaminator(files: tuple[str, ...], ngram: int, max_overlap: float) -> Decontaminator:
    # One per process: loading the eval n-grams is the costly part.
    key = (files, ngram, max_overlap)
    if key not in _DECONTAMINATORS:
        _DECONTAMINATORS.clear()
        _DECONTAMINATORS[key] = Decontaminator(list(files), ngram, max_overlap)
    return _DECONTAMINATORS[key]


def build_blocks(settings: dict[str, Any]) -> list[Block]:
    """The blocks of one shard, in order, from its settings (see pipeline._settings)."""
    rules = QualityFilter(QualityFilters(**settings["filters"]))
    blocks: list[Block] = [Normalize()]
    blocks += [QualityRules(rules, g) for g in GROUPS
               if g != "language" or rules.languages is not None]
    for entry in settings.get("blocks", []):
        blocks.append(custom_block(entry))
    blocks += [RedactPII(PIIConfig(**settings["pii"])), ExactKey()]
    d = settings["dedup"]
    if d["near"]:
        blocks.append(MinHashSignature(d["shingle"], d["num_perm"], settings["seed"]))
    dc = settings["decontaminate"]
    if dc["files"]:
        blocks.append(Decontaminate(_decontaminator(tuple(dc["files"]), dc["ngram"],
                                                    dc["max_overlap"])))
    return blocks


def load_block_class(spec: str) -> type[Block]:
    """The class a recipe entry names: "package.module:Class" or "path/to/file.py:Class"."""
    where, _, cls_name = spec.rpartition(":")
    if not where or not cls_name:
        raise UserError(
            f"block {spec!r}: name the class as 'package.module:ClassName' or "
            "'path/to/file.py:ClassName'"
        )
    try:
        if where.endswith(".py"):
            path = Path(where).resolve()
            # Named by path and content: an edited file is loaded again, not the old module.
            key = str(path).encode() + (path.read_bytes() if path.is_file() else b"")
            mod_name = "domainlm_block_" + hashlib.blake2b(key, digest_size=8).hexdigest()
            module = sys.modules.get(mod_name)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(mod_name, path)
                if loader_spec is None or loader_spec.loader is None or not path.is_file():
                    raise FileNotFoundError(str(path))
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[mod_name] = module
                loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
        cls = getattr(module, cls_name)
    except (ImportError, FileNotFoundError, AttributeError, SyntaxError) as e:
        raise UserError(f"block {spec!r} cannot be loaded ({type(e).__name__}: {e})") from None
    if not (isinstance(cls, type) and issubclass(cls, Block)) or not cls.name:
        raise UserError(
            f"block {spec!r} must be a subclass of domainlm.corpus.blocks.Filter (or Block) "
            "with a `name`"
        )
    return cls


def custom_block(entry: dict[str, Any]) -> Block:
    params = {k: v for k, v in entry.items() if k not in ("use", "code")}
    cls = load_block_class(entry["use"])
    try:
        return cls(**params)
    except TypeError as e:
        raise UserError(f"block {entry['use']!r}: {e}") from None


def block_fingerprint(spec: str) -> str:
    """A hash of the block's source file and version: editing the filter redoes the shards."""
    cls = load_block_class(spec)
    try:
        source = Path(inspect.getsourcefile(cls) or "").read_bytes()
    except (OSError, TypeError):
        source = b""
    return hashlib.blake2b(source + str(cls.version).encode(), digest_size=16).hexdigest()

