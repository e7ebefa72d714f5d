"""The two things that flow through the corpus pipeline: documents and rejected records."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

# Reasons are "<category>:<name>". The category decides which manifest count a record adds
# to: quarantined (could not be read), filtered, duplicate, decontaminated.
QUARANTINE = "quarantine"
FILTER = "filter"
DUPLICATE = "duplicate"
DECONTAM = "decontaminated"

# Rejected records keep at most this much of their raw content (an enormous line is noted,
# not copied: the original file and line are named in `origin`).
MAX_REJECTED_TEXT = 64 * 1024


@dataclass
class Doc:
    """One document. `origin` ("<relative path>:<line>") is unique and names where it came from."""

    id: str  # the record's own `id`, or its origin when it has none
    text: str
    source: str  # the recipe source it belongs to
    origin: str
    license: str | None = None
    created: str | None = None
    meta: str | None = None  # JSON text (keys sorted) of the record's `meta` object
    # Filled by the pipeline blocks as the document passes them (not written by readers).
    key: str | None = field(default=None, repr=False)  # exact-dedup key of the final text
    contaminated: str | None = field(default=None, repr=False)  # "<eval file>: <detail>"
    shingles: Any = field(default=None, repr=False, compare=False)  # sorted uint32 hash set
    sig: Any = field(default=None, repr=False, compare=False)  # MinHash signature row
    view: Any = field(default=None, repr=False, compare=False)  # the quality rules' splits

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("id", "text", "source", "origin", "license",
                                              "created", "meta")}


@dataclass
class Rejected:
    """A record that did not make it into the corpus, with why."""

    origin: str  # "<relative path>:<line>" (line 0: the file as a whole)
    source: str
    reason: str  # "<category>:<name>", e.g. "quarantine:invalid_json", "filter:min_words"
    detail: str  # for a person: what exactly was wrong, and the fix where there is one
    text: str | None = None  # the raw record (or document text), cut at MAX_REJECTED_TEXT
    id: str | None = None
    duplicate_of: str | None = None  # for duplicates: the origin of the document kept

    @property
    def category(self) -> str:
        return self.reason.split(":", 1)[0]

    def to_dict(self) -> dict:
        return asdict(self)


def clip(text: str | None) -> str | None:
    if text is None or len(text) <= MAX_REJECTED_TEXT:
        return text
    return text[:MAX_REJECTED_TEXT] + f"\n[... cut: {len(text)} characters in all]"


def rejected_line(row: dict[str, Any]) -> str:
    """One line of a rejected/*.jsonl file (keys sorted, UTF-8 text, newline included).

    A value that UTF-8 cannot hold (a lone surrogate from a "\\udc00" escape in a shard) is
    written as its JSON escape instead, so the record is kept as it came, and the line
    reads back to the same value.
    """
    line = json.dumps(row, ensure_ascii=False, sort_keys=True)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(row, ensure_ascii=True, sort_keys=True)
    return line + "\n"
