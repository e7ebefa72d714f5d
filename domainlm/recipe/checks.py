"""Valid ranges of recipe fields: each section lists its rules in a RANGES class attribute, and the
loader checks every section it builds, so a value out of range is one error naming the file, the
line and the field, before any stage touches its outputs."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from domainlm.errors import UserError

# A name that becomes a folder or a file name: letters, digits, '.', '_', '-'; not '.' or '..'.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")


class FieldError(UserError):
    """A value out of its field's range; `field` is the field's name within its section."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Rule:
    """lo < value (or <= when lo_inclusive) and value < hi (or <=); `what` says why."""

    lo: float | None = None
    hi: float | None = None
    lo_inclusive: bool = True
    hi_inclusive: bool = True
    what: str = ""

    def ok(self, v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        if self.lo is not None and (v < self.lo or (v == self.lo and not self.lo_inclusive)):
            return False
        return self.hi is None or v < self.hi or (v == self.hi and self.hi_inclusive)

    def __str__(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'>=' if self.lo_inclusive else '>'} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<=' if self.hi_inclusive else '<'} {self.hi:g}")
        text = " and ".join(parts) if parts else "a finite number"
        return f"{text} ({self.what})" if self.what else text


def positive(what: str = "") -> Rule:
    return Rule(0, None, lo_inclusive=False, what=what)


def at_least(lo: float, what: str = "") -> Rule:
    return Rule(lo, None, what=what)


def fraction(what: str = "", *, closed: bool = True) -> Rule:
    """0 <= value <= 1 (closed) or 0 <= value < 1."""
    return Rule(0, 1, hi_inclusive=closed, what=what)


def check_name(field: str, value: Any) -> None:
    """A name used as a folder or file name: never a path, never empty."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise FieldError(
            field,
            f"must be a plain name (letters, digits, '.', '_', '-'; it becomes a folder name under "
            f"build/), not {value!r}",
        )


def check_section(obj: Any) -> None:
    """Every rule of obj's RANGES (field -> Rule, or "name"); None values are left alone (they
    mean "not set"); a list or mapping has every value checked."""
    for name, rule in getattr(type(obj), "RANGES", {}).items():
        value = getattr(obj, name)
        if value is None or value == "":  # not set: the documented default applies
            continue
        if rule == "name":
            check_name(name, value)
            continue
        values = value.values() if isinstance(value, dict) else value
        for v in values if isinstance(value, (list, tuple, dict)) else [value]:
            if isinstance(v, str):  # a keyword such as "auto", which its type already allowed
                continue
            if not rule.ok(v):
                raise FieldError(name, f"must be {rule}, got {v!r}")
