"""The recipe's `corpus:` section: sources, quality filters, PII, dedup, decontamination."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from domainlm.errors import UserError
from domainlm.recipe.checks import Rule, at_least, fraction, positive

# --------------------------------------------------------------------------------------------
# Corpus section. Every field has a default; the comment after it is its documentation
# (docs/corpus.md is written from the same words).


@dataclass
class QualityFilters:
    """Gopher/C4-style document rules. Set any threshold to null to switch that rule off."""

    min_chars: int | None = 1  # documents shorter than this many characters are dropped
    max_chars: int | None = 1_000_000  # ... and longer than this
    min_words: int | None = 50  # Gopher: at least 50 words
    max_words: int | None = 100_000  # Gopher: at most 100,000 words
    min_mean_word_length: float | None = 3.0  # Gopher: mean word length within [3, 10]
    max_mean_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1  # ('#' + '...') per word
    max_bullet_lines: float | None = 0.9  # fraction of lines that start with a bullet
    max_ellipsis_lines: float | None = 0.3  # fraction of lines that end with an ellipsis
    min_alpha_words: float | None = 0.8  # fraction of words with an alphabetic character
    min_stop_words: int | None = 2  # English stop words (the, be, to, of, and, that, have, with)
    max_dup_line_fraction: float | None = 0.3  # lines that repeat, by count
    max_dup_para_fraction: float | None = 0.3  # paragraphs that repeat, by count
    max_dup_line_char_fraction: float | None = 0.2  # characters in repeated lines
    max_dup_para_char_fraction: float | None = 0.2  # characters in repeated paragraphs
    # Characters covered by the most frequent n-gram, for n = 2, 3, 4.
    max_top_ngram_char_fraction: dict[int, float] | None = field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16}
    )
    # Characters covered by n-grams that occur more than once, for n = 5..10.
    max_dup_ngram_char_fraction: dict[int, float] | None = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )
    languages: list[str] | None = field(default_factory=lambda: ["en"])  # null: no language id
    # Language id backend: cascade (the default: CLD2 where the text has 300+ characters and
    # CLD2 is sure, py3langid elsewhere; >10x faster than langdetect and at least as accurate,
    # measured in docs/corpus.md), py3langid (naive Bayes on byte n-grams), pycld2 (Google's
    # CLD2: fastest, often wrong on single sentences) or langdetect (the former default).
    language_id: Literal["cascade", "py3langid", "pycld2", "langdetect"] = "cascade"
    # Score of the detected language below which a document is dropped; null: the backend's
    # own (py3langid and cascade 0.3, py3langid's length-tempered probability; pycld2 0.65,
    # the share of the text in that language; langdetect 0.65, its probability).
    min_language_score: float | None = None
    language_prefix_chars: int = 1000  # language id reads this many leading characters

    RANGES: ClassVar[dict[str, Rule | str]] = {
        "min_chars": at_least(0, "characters"),
        "max_chars": at_least(1, "characters"),
        "min_words": at_least(0, "words"),
        "max_words": at_least(1, "words"),
        "min_mean_word_length": at_least(0, "characters"),
        "max_mean_word_length": positive("characters"),
        "max_symbol_word_ratio": at_least(0, "symbols per word"),
        "max_bullet_lines": fraction("of the lines"),
        "max_ellipsis_lines": fraction("of the lines"),
        "min_alpha_words": fraction("of the words"),
        "min_stop_words": at_least(0, "words"),
        "max_dup_line_fraction": fraction("of the lines"),
        "max_dup_para_fraction": fraction("of the paragraphs"),
        "max_dup_line_char_fraction": fraction("of the characters"),
        "max_dup_para_char_fraction": fraction("of the characters"),
        "max_top_ngram_char_fraction": fraction("of the characters"),
        "max_dup_ngram_char_fraction": fraction("of the characters"),
        "min_language_score": fraction("a score"),
        "language_prefix_chars": at_least(1, "characters"),
    }


@dataclass
class PIIConfig:
    """Personal data replaced by placeholders (<EMAIL>, <PHONE>, <IP>, <CARD>)."""

    emails: bool = True
    phones: bool = True
    ips: bool = True
    cards: bool = True  # only digit runs that pass the Luhn check


@dataclass
class DedupConfig:
    exact: bool = True  # drop documents whose normalized text is identical
    near: bool = True  # drop near-duplicates found with MinHash LSH
    shingle: int = 5  # word n-gram size of the shingles
    num_perm: int = 128  # MinHash permutations
    threshold: float = 0.8  # Jaccard similarity at and above which documents are duplicates

    RANGES: ClassVar[dict[str, Rule | str]] = {
        "shingle": at_least(1, "words"),
        "num_perm": at_least(16, "permutations"),
        "threshold": Rule(0, 1, lo_inclusive=False, what="a Jaccard similarity"),
    }


@dataclass
class DecontamConfig:
    files: list[str] = field(default_factory=list)  # eval sets (JSONL with `text`, or .txt)
    ngram: int = 13  # word n-gram length, as GPT-3's decontamination
    max_overlap: float = 0.0  # drop a document sharing more than this fraction of its n-grams

    RANGES: ClassVar[dict[str, Rule | str]] = {
        "ngram": at_least(1, "words"),
        "max_overlap": fraction("of the n-grams", closed=False),
    }


@dataclass
class SourceConfig:
    name: str = ""  # the source's name in counts and reports
    kind: Literal["shards", "python-docs"] = "shards"
    path: str | None = None  # for shards: a folder (searched recursively) or a glob
    weight: float | None = None  # target share of training characters after mixing
    filters: dict[str, Any] | None = None  # overrides of corpus.filters for this source
    pii: dict[str, Any] | None = None  # overrides of corpus.pii for this source
    # More pipeline blocks for this source only, after corpus.blocks (same entry form).
    blocks: list[dict[str, Any]] = field(default_factory=list)
    # A folder or glob that holds no shard is an error unless this is true (a folder that
    # teams fill later, as the demo's corpus/shards).
    allow_empty: bool = False

    RANGES: ClassVar[dict[str, Rule | str]] = {"name": "name", "weight": at_least(0, "a share")}

    def __post_init__(self) -> None:
        _check_blocks(self.blocks, "blocks")


@dataclass
class CorpusConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    on_bad_shard: Literal["fail", "skip"] = "fail"  # a shard that cannot be opened at all
    workers: int = 0  # processes for per-shard work; 0 = all cores
    max_record_bytes: int = 8 * 1024 * 1024  # longer lines/records are quarantined
    filters: QualityFilters = field(default_factory=QualityFilters)
    pii: PIIConfig = field(default_factory=PIIConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontaminate: DecontamConfig = field(default_factory=DecontamConfig)
    val_fraction: float = 0.01  # share of documents (by hash) held out for validation
    docs_per_output_shard: int = 50_000  # rows per Parquet file written
    # Where the per-shard work and the dedup partitions run: local (a process pool of
    # `workers`) or ray (Ray tasks; `--ray-address` or RAY_ADDRESS names a cluster, else a
    # local Ray instance is started). The outputs are the same bytes either way.
    executor: Literal["local", "ray"] = "local"
    # Filters of your own, run on every source after the quality and language rules: each
    # entry is {use: "package.module:Class" or "path/file.py:Class", <its settings>: ...}.
    blocks: list[dict[str, Any]] = field(default_factory=list)

    RANGES: ClassVar[dict[str, Rule | str]] = {
        "workers": at_least(0, "processes; 0: every core"),
        # 0 would quarantine every record; the default is 8388608 (8 MiB)
        "max_record_bytes": at_least(1, "bytes"),
        "val_fraction": fraction("of the documents", closed=False),
        "docs_per_output_shard": at_least(1, "rows"),
    }

    def __post_init__(self) -> None:
        _check_blocks(self.blocks, "blocks")


def _check_blocks(blocks: list[dict[str, Any]], key: str) -> None:
    for i, entry in enumerate(blocks):
        if not isinstance(entry.get("use"), str) or ":" not in entry["use"]:
            raise UserError(
                f"{key}[{i}]: each block entry needs `use: package.module:ClassName` (or "
                "path/to/file.py:ClassName), then the block's own settings"
            )


