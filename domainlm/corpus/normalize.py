"""Text normalization: NFC, plain newlines and spaces, no control characters, tidy blank lines."""

from __future__ import annotations

import re
import unicodedata

# C0/C1 control characters except \t and \n (\r is turned into \n before this runs), and the
# zero-width characters that are invisible but split words for every later stage.
_INVISIBLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
_INVISIBLE_ASCII = re.compile("[\x00-\x08\x0b-\x1f\x7f]")

_EXOTIC_SPACES = {cp: " " for cp in [0x00A0, *range(0x2000, 0x200B), 0x202F, 0x205F, 0x3000]}

_TRAILING_SPACE = re.compile(r"[ \t]+(?=\n|\Z)")
_MANY_BLANK_LINES = re.compile(r"\n{4,}")


def normalize(text: str) -> str:
    """Return `text` normalized; leading indentation and inner runs of spaces are kept.

    normalize(normalize(x)) == normalize(x) for every string x.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.isascii():
        # Pure ASCII (most code and much prose) is already NFC and has no exotic spaces.
        text = _INVISIBLE_ASCII.sub("", text)
    else:
        # Invisible characters go before NFC: removing one between a letter and a combining
        # mark would otherwise leave a pair that only a second call would compose.
        text = _INVISIBLE.sub("", text)
        text = unicodedata.normalize("NFC", text)
        # After NFC, because NFC maps U+2000/U+2001 to U+2002/U+2003.
        text = text.translate(_EXOTIC_SPACES)
    text = _TRAILING_SPACE.sub("", text)
    text = _MANY_BLANK_LINES.sub("\n\n\n", text)
    # Only newlines: the first line's indentation is content (code).
    return text.strip("\n")
