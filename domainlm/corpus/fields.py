"""Check one shard record's fields (text, id, license, created, meta) and make it a Doc."""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

from domainlm.corpus.jsonlines import INVALID_UTF8, json_type
from domainlm.corpus.records import QUARANTINE, Doc

# Record-level reasons; the line-level ones (invalid_utf8, invalid_json, ...) are jsonlines'.
MISSING_TEXT = f"{QUARANTINE}:missing_text"
TEXT_NOT_STRING = f"{QUARANTINE}:text_not_string"
EMPTY_TEXT = f"{QUARANTINE}:empty_text"
BAD_FIELD = f"{QUARANTINE}:bad_field"


def not_object_detail(obj: Any) -> str:
    """The detail of a JSONL line that holds no object, with the fix for an array of them."""
    detail = f'each line must be one JSON object like {{"text": "..."}}, got {json_type(obj)}'
    if isinstance(obj, list) and obj and isinstance(obj[0], dict):
        detail += "; write one object per line instead of an array (e.g. `jq -c '.[]'`)"
    return detail


# Fields other exporters use for the document; naming them turns "missing text" into a fix.
_TEXT_LIKE = ("content", "contents", "body", "document", "raw_content", "article", "passage")
_TEXT_LIKE += ("paragraph", "markdown", "html", "message", "sentence", "Text", "TEXT")

_ISO_DATE = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})"
    r"(?:[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:Z|[+-]\d{2}(?::?\d{2})?)?)?)?)?"
)

Problem = tuple[str, str, "str | None"]  # (reason, detail, the record's id if known)


def to_doc(rec: dict, origin: str, source: str) -> Doc | Problem:
    """Check one record's fields; a Doc, or (reason, detail, id) saying what is wrong."""
    text = rec.get("text")
    if type(text) is not str:
        return _text_problem(rec)
    rid = rec.get("id")
    if rid is None:
        doc_id = origin
    elif type(rid) is str and rid.strip():
        doc_id = rid
    elif type(rid) is int:
        doc_id = str(rid)
    else:
        return _bad_field("id", "a non-empty string or an integer", rid, None)
    if not text or text.isspace():
        detail = "`text` is empty or only whitespace; leave such records out"
        return EMPTY_TEXT, detail, doc_id
    license_ = rec.get("license")
    if license_ is not None and type(license_) is not str:
        return _bad_field("license", 'a string (e.g. "CC-BY-4.0")', license_, doc_id)
    created = rec.get("created")
    if created is not None and (type(created) is not str or not _is_iso_date(created)):
        expected = 'an ISO date string (e.g. "2024-03-31" or "2024-03-31T09:30:00Z")'
        return _bad_field("created", expected, created, doc_id)
    meta = rec.get("meta")
    meta_text = None
    if meta is not None:
        if type(meta) is not dict:
            return _bad_field("meta", 'a JSON object (e.g. {"url": "..."})', meta, doc_id)
        # default=str: Parquet struct values can be dates or bytes, which JSON has no type for.
        meta_text = json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str)
    return Doc(
        id=doc_id,
        text=text,
        source=source,
        origin=origin,
        license=license_,
        created=created,
        meta=meta_text,
    )


def _text_problem(rec: dict) -> Problem:
    rid = rec.get("id")
    rid = str(rid) if type(rid) in (str, int) else None
    if "text" not in rec:
        fields = ", ".join(repr(k) for k in list(rec)[:12]) or "none"
        detail = f"the record has no `text` field (its fields: {fields})"
        alt = next((k for k in _TEXT_LIKE if k in rec), None)
        if alt is not None:
            detail += f"; if {alt!r} holds the document, rename it to 'text'"
        return MISSING_TEXT, detail, rid
    text = rec["text"]
    if text is None:
        return MISSING_TEXT, "`text` is null; leave such records out", rid
    detail = f"`text` must be a string, got {json_type(text)}"
    if isinstance(text, list) and all(isinstance(t, str) for t in text):
        detail += "; join the pieces into one string"
    return TEXT_NOT_STRING, detail, rid


def _bad_field(name: str, expected: str, value: Any, rid: str | None) -> Problem:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return BAD_FIELD, f"`{name}` must be {expected}, got {json_type(value)} {shown}", rid


def _is_iso_date(value: str) -> bool:
    m = _ISO_DATE.fullmatch(value)
    if m is None:
        return False
    year, month, day = m.group(1), m.group(2), m.group(3)
    try:
        dt.date(int(year), int(month or 1), int(day or 1))
    except ValueError:
        return False
    return True


def check_surrogates(doc: Doc) -> Doc | Problem:
    # A "\udXXX" escape without its pair parses to a string UTF-8 cannot hold; writing it
    # later would crash the corpus writer, so the record is quarantined here.
    for name in ("text", "id", "license", "created", "meta"):
        value = getattr(doc, name)
        if value is None:
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            detail = (
                f"`{name}` contains an unpaired surrogate escape (\\u{ord(value[e.start]):04x}), "
                "which is not valid Unicode; fix the exporter (it split an emoji or similar)"
            )
            return INVALID_UTF8, detail, doc.id
    return doc
