"""The two things that flow through the corpus pipeline: documents and rejected records."""

from __future__ import annotations

from dataclasses import asdict, dataclass

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

    def to_dict(self) -> dict:
        return asdict(self)


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
