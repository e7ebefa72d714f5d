"""PII redaction: emails, phone numbers, IP addresses and card numbers become placeholders."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

from domainlm.recipe import PIIConfig

EMAIL, PHONE, IP, CARD = "<EMAIL>", "<PHONE>", "<IP>", "<CARD>"

# Speed: Python's re engine skips ahead quickly only to a pattern's first character (a literal
# or a class); a leading lookbehind makes it try the whole pattern at every position, four
# times slower on prose. So each pattern consumes its first character, then looks behind it
# with a fixed-width `(?<![...].)` to check that the match starts a token.

# Emails are found from their '@' (rare in text), and the local part is taken from the
# characters just before it (see _emails).
_EMAIL_DOMAIN = re.compile(
    r"@(?<=[A-Za-z0-9._%+-]@)[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b(?!@)"
)
_EMAIL_LOCAL = re.compile(r"[A-Za-z0-9._%+-]{1,64}\Z")

# 13-19 digits: one unbroken run, or groups of 2-6 digits after a first group of 4, joined
# by one kind of separator (4-4-4-4, 4-6-5, 4 4 4 4 3, ...). Arbitrary single-digit grouping
# is left out: a list of small numbers would then pass the Luhn check one time in ten.
_CARD = re.compile(
    r"\d(?<![\w.+-].)(?:\d{12,18}|\d{3}(?P<sep>[ -])\d{2,6}(?:(?P=sep)\d{2,6}){1,4})"
    r"(?![\w]|[.-]\d)"
)

# International: +CC (no country code starts with 0), an optional "(0)"-style group, then
# digit groups with one separator between them (mandatory, so a long digit run has one
# reading and no backtracking blow-up).
_PHONE_INTL = re.compile(
    r"\+(?<![\w+].)[1-9]\d{0,2}(?:[ .-]?\(\d{1,4}\))?[ .-]?\d{1,12}(?:[ .-]\d{1,12}){0,6}"
    r"(?!\d|[.-]\d)"
)
# North American: 1-800-555-1234, 1 (555) 123-4567, (555) 123-4567, 555-123-4567,
# 555.123.4567: the same separator twice, so dates (2024-01-15) and versions (3.11.7) do not
# match, and a bare digit run never does. The branches continue after the first character,
# which the lookbehinds name: a "1" country prefix, "(", or the area code's first digit.
_PHONE_NA = re.compile(
    r"[\d(](?<![\w.+-].)(?:"
    r"(?<=1)[ .-](?:\(\d{3}\) ?\d{3}[-.]|\d{3}(?P<s>[-.])\d{3}(?P=s))\d{4}"
    r"|(?<=\()\d{3}\) ?\d{3}[-.]\d{4}"
    r"|(?<=\d)\d\d(?P<t>[-.])\d{3}(?P=t)\d{4}"
    r")(?![\w]|[.-]\d)"
)

# Candidates with four dotted parts exactly ("1.2.3.4.5" is a version number, not an
# address); _ipv4 checks the octets.
_IPV4 = re.compile(r"\d(?<![\w.].)\d{0,2}(?:\.\d{1,3}){3}(?![\w]|\.\d)")
# Candidates only; ipaddress decides. The colon lookarounds keep C++/Rust paths whole.
_IPV6 = re.compile(
    r"[0-9A-Fa-f:](?<![\w:.].)(?:(?<=:)|[0-9A-Fa-f]{0,3}:)(?:[0-9A-Fa-f]{0,4}:){1,6}"
    r"(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?(?![\w:]|\.\d)"
)


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(m: re.Match[str]) -> str | None:
    digits = m.group().replace(" ", "").replace("-", "")
    # Issuers' numbers start with 2-6 (Mastercard 2-series, Amex/Diners/JCB 3, Visa 4,
    # Mastercard 5, Discover/UnionPay 6); this keeps 13-digit millisecond timestamps and other
    # ids that start with 1 out even when they happen to pass the Luhn check.
    if not 13 <= len(digits) <= 19 or digits[0] not in "23456" or not _luhn(digits):
        return None
    return CARD


def _phone_intl(m: re.Match[str]) -> str | None:
    n = sum(ch.isdigit() for ch in m.group())
    return PHONE if 8 <= n <= 15 else None  # E.164 numbers have at most 15 digits


def _ipv4(m: re.Match[str]) -> str | None:
    for part in m.group().split("."):
        if int(part) > 255 or (part[0] == "0" and len(part) > 1):
            return None
    return IP


def _ipv6(m: re.Match[str]) -> str | None:
    s = m.group()
    groups = [g for g in s.split(":") if g]
    # Python slices (a[1::2]) and words made of hex letters (dead::beef) are valid addresses
    # syntactically; real ones in text have a digit and more than a token or two of hex.
    if not any(ch.isdigit() for ch in s) or sum(map(len, groups)) < 5:
        return None
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return None
    return IP


def _sub(
    pattern: re.Pattern[str],
    decide: Callable[[re.Match[str]], str | None] | None,
    placeholder: str,
    text: str,
) -> tuple[str, int]:
    if decide is None:
        return pattern.subn(placeholder, text)
    count = 0

    def replace(m: re.Match[str]) -> str:
        nonlocal count
        out = decide(m)
        if out is None:
            return m.group()
        count += 1
        return out

    return pattern.sub(replace, text), count


def _emails(text: str) -> tuple[str, int]:
    """Replace local@domain; the domain pattern finds each '@', the local part is read back."""
    pieces: list[str] = []
    done = 0  # text[:done] is already in pieces
    for m in _EMAIL_DOMAIN.finditer(text):
        at = m.start()
        local = _EMAIL_LOCAL.search(text, max(done, at - 64), at)
        if local is None:
            continue
        start = local.start()
        before = text[start - 1] if start > 0 else " "
        # A longer local part than RFC 5321 allows, or one glued to a non-ASCII letter, is
        # some other token.
        if before.isalnum() or before in "._%+-@":
            continue
        pieces += (text[done:start], EMAIL)
        done = m.end()
    if not pieces:
        return text, 0
    pieces.append(text[done:])
    return "".join(pieces), len(pieces) // 2


def redact(text: str, cfg: PIIConfig) -> tuple[str, dict[str, int]]:
    """Replace the PII kinds enabled in `cfg`; returns the new text and a count per kind."""
    counts: dict[str, int] = {}
    # Emails first: their local parts may hold digits that look like phones. Cards before
    # phones so a grouped card number is not taken for a phone number.
    if cfg.emails:
        n = 0
        if "@" in text:
            text, n = _emails(text)
        counts["email"] = n
    has_digits = (cfg.cards or cfg.phones or cfg.ips) and any(d in text for d in "0123456789")
    if cfg.cards:
        n = 0
        if has_digits:
            text, n = _sub(_CARD, _card, CARD, text)
        counts["card"] = n
    if cfg.phones:
        n = 0
        if has_digits:
            if "+" in text:
                text, n = _sub(_PHONE_INTL, _phone_intl, PHONE, text)
            text, n_na = _sub(_PHONE_NA, None, PHONE, text)
            n += n_na
        counts["phone"] = n
    if cfg.ips:
        n = 0
        # IPv6 first: "::ffff:192.0.2.1" is one address, not an IPv4 one with a prefix. An
        # IPv6 address has "::" or at least six colons (the form with IPv4 at its end).
        if has_digits and ("::" in text or text.count(":") >= 6):
            text, n = _sub(_IPV6, _ipv6, IP, text)
        if has_digits and "." in text:
            text, n4 = _sub(_IPV4, _ipv4, IP, text)
            n += n4
        counts["ip"] = n
    return text, counts
