"""Gopher/C4-style document quality rules: the first rule a document breaks, with the numbers."""

from __future__ import annotations

import operator
import re
import unicodedata
from collections import Counter
from itertools import compress

from domainlm.corpus.langid import MIN_SCORE, canonical_code, detect_language
from domainlm.recipe import QualityFilters

BULLETS = ("•", "-", "*", "‣", "⁃", "◦")
ELLIPSES = ("...", "…")
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})

_LETTER = re.compile(r"[^\W\d_]")  # \w without digits and underscore: letters
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")


def _punctuation_table() -> dict[int, None]:
    # The Unicode blocks where punctuation lives in practice; scanning all 1.1M code points
    # would cost a third of a second in every worker at import.
    blocks = [range(0x80), range(0xA0, 0x100), range(0x2010, 0x2070), range(0x3000, 0x3040)]
    blocks.append(range(0xFE30, 0xFF70))
    return {cp: None for block in blocks for cp in block if unicodedata.category(chr(cp))[0] == "P"}


_PUNCTUATION = _punctuation_table()


def _fmt(value: float, threshold: float) -> str:
    """`value` with enough decimals that it does not print equal to the threshold it broke."""
    for digits in (2, 3, 4, 6):
        text = f"{value:.{digits}f}"
        if float(text) != threshold:
            return text
    return repr(value)


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    # Slices of decreasing length: zip stops at the shortest, which is the point.
    return list(zip(*(words[i:] for i in range(n)), strict=False))


def _duplicates(items: list[str]) -> tuple[int, int, int, int]:
    """(items, items that repeat an earlier one, characters, characters in the repeats).

    As in Gopher, only the copies count as repeats, not the first occurrence.
    """
    counts = Counter(items)
    chars = sum(map(len, items))
    if len(counts) == len(items):
        return len(items), 0, chars, 0
    dup_chars = sum(len(s) * (c - 1) for s, c in counts.items() if c > 1)
    return len(items), len(items) - len(counts), chars, dup_chars


class TextView:
    """A text and the splits the rules share (words, lines, normalized words), made once."""

    __slots__ = ("text", "_words", "_lines", "_norm")

    def __init__(self, text: str):
        self.text = text
        self._words: list[str] | None = None
        self._lines: list[str] | None = None
        self._norm: list[str] | None = None

    @property
    def words(self) -> list[str]:
        if self._words is None:
            self._words = self.text.split()
        return self._words

    @property
    def lines(self) -> list[str]:
        if self._lines is None:
            self._lines = [s for s in (ln.strip() for ln in self.text.split("\n")) if s]
        return self._lines

    @property
    def norm(self) -> list[str]:
        """Lowercased words without punctuation, for stop words and the n-gram rules."""
        if self._norm is None:
            self._norm = self.text.lower().translate(_PUNCTUATION).split()
        return self._norm


# The rule groups of QualityFilter, in order: each is a method and one pipeline block.
GROUPS = ("length", "symbols", "words", "repetition", "language")


class QualityFilter:
    """Applies the rules of one `QualityFilters` section; `check` names the first one broken."""

    def __init__(self, cfg: QualityFilters):
        self.cfg = cfg
        self.top_ngrams = sorted((cfg.max_top_ngram_char_fraction or {}).items())
        self.dup_ngrams = sorted((cfg.max_dup_ngram_char_fraction or {}).items())
        self.languages = None if cfg.languages is None else list(cfg.languages)
        # Recipe codes in the spelling the backends answer in ('zh-cn' and 'zh' are one).
        self._language_set = frozenset(canonical_code(c) for c in self.languages or ())
        self.language_id = cfg.language_id
        score = cfg.min_language_score
        self.min_language_score = MIN_SCORE[cfg.language_id] if score is None else score
        # The language found for the last checked document (None: language id did not run).
        self.last_language: str | None = None

    def check(self, text: str) -> tuple[str, str] | None:
        """None if `text` passes every rule, else (rule, detail) for the first failing rule.

        `rule` is the QualityFilters field name ("language" for the language rules); `detail`
        gives the measured value and the threshold.
        """
        self.last_language = None
        view = TextView(text)
        for group in GROUPS:
            verdict = getattr(self, group)(view)
            if verdict is not None:
                return verdict
        return None

    # The rule groups, in the order `check` applies them; each is one pipeline block
    # (corpus/blocks.py), and within a group the rules run in the QualityFilters field order.

    def length(self, v: TextView) -> tuple[str, str] | None:
        cfg = self.cfg
        n_chars = len(v.text)
        if cfg.min_chars is not None and n_chars < cfg.min_chars:
            return "min_chars", f"{n_chars} characters < {cfg.min_chars}"
        if cfg.max_chars is not None and n_chars > cfg.max_chars:
            return "max_chars", f"{n_chars} characters > {cfg.max_chars}"

        words = v.words
        n_words = len(words)
        if cfg.min_words is not None and n_words < cfg.min_words:
            return "min_words", f"{n_words} words < {cfg.min_words}"
        if cfg.max_words is not None and n_words > cfg.max_words:
            return "max_words", f"{n_words} words > {cfg.max_words}"

        if cfg.min_mean_word_length is not None or cfg.max_mean_word_length is not None:
            mean = sum(map(len, words)) / n_words if n_words else 0.0
            lo, hi = cfg.min_mean_word_length, cfg.max_mean_word_length
            if lo is not None and mean < lo:
                return "min_mean_word_length", f"mean word length {_fmt(mean, lo)} < {lo:g}"
            if hi is not None and mean > hi:
                return "max_mean_word_length", f"mean word length {_fmt(mean, hi)} > {hi:g}"
        return None

    def symbols(self, v: TextView) -> tuple[str, str] | None:
        cfg = self.cfg
        text = v.text
        n_words = len(v.words)
        limit = cfg.max_symbol_word_ratio
        if limit is not None:
            symbols = text.count("#") + text.count("...") + text.count("…")
            ratio = symbols / n_words if n_words else (float("inf") if symbols else 0.0)
            if ratio > limit:
                return (
                    "max_symbol_word_ratio",
                    f"symbol/word ratio {_fmt(ratio, limit)} ({symbols} '#' or '...'"
                    f" in {n_words} words) > {limit:g}",
                )

        if cfg.max_bullet_lines is not None or cfg.max_ellipsis_lines is not None:
            lines = v.lines
            n_lines = len(lines) or 1
            limit = cfg.max_bullet_lines
            if limit is not None:
                frac = sum(1 for line in lines if line.startswith(BULLETS)) / n_lines
                if frac > limit:
                    detail = f"{_fmt(frac, limit)} of lines start with a bullet > {limit:g}"
                    return "max_bullet_lines", detail
            limit = cfg.max_ellipsis_lines
            if limit is not None:
                frac = sum(1 for line in lines if line.endswith(ELLIPSES)) / n_lines
                if frac > limit:
                    detail = f"{_fmt(frac, limit)} of lines end with an ellipsis > {limit:g}"
                    return "max_ellipsis_lines", detail
        return None

    def words(self, v: TextView) -> tuple[str, str] | None:
        cfg = self.cfg
        words = v.words
        n_words = len(words)
        limit = cfg.min_alpha_words
        if limit is not None:
            # isalpha() answers most words in C; the regex only sees the other words.
            search = _LETTER.search
            alpha = list(map(str.isalpha, words))
            with_letter = sum(alpha) + sum(
                1 for w in compress(words, map(operator.not_, alpha)) if search(w)
            )
            frac = with_letter / n_words if n_words else 0.0
            if frac < limit:
                detail = f"{_fmt(frac, limit)} of words have a letter < {limit:g}"
                return "min_alpha_words", detail

        need = cfg.min_stop_words
        if need is not None:
            found = 0
            for w in v.norm:
                if w in STOP_WORDS:
                    found += 1
                    if found >= need:
                        break
            if found < need:
                return "min_stop_words", f"{found} stop words < {need}"
        return None

    def repetition(self, v: TextView) -> tuple[str, str] | None:
        return self._repetition(v)

    def language(self, v: TextView) -> tuple[str, str] | None:
        self.last_language = None
        if self.languages is None:
            return None
        cfg = self.cfg
        lang, score = detect_language(v.text, cfg.language_prefix_chars, self.language_id)
        self.last_language = lang
        if lang not in self._language_set:
            return "language", f"language {lang!r} ({score:.2f}) not in {self.languages}"
        limit = self.min_language_score
        if score < limit:
            return "language", f"language score {_fmt(score, limit)} < {limit:g}"
        return None

    def _repetition(self, v: TextView) -> tuple[str, str] | None:
        cfg = self.cfg
        text = v.text
        # In the order of the QualityFilters fields: by count (lines, paragraphs), then by
        # characters (lines, paragraphs).
        line_rules = (cfg.max_dup_line_fraction, cfg.max_dup_line_char_fraction)
        para_rules = (cfg.max_dup_para_fraction, cfg.max_dup_para_char_fraction)
        found: dict[str, tuple[int, int, int, int]] = {}
        if line_rules != (None, None):
            found["line"] = _duplicates(v.lines)
        if para_rules != (None, None):
            paragraphs = [s for s in (p.strip() for p in _PARAGRAPH_BREAK.split(text)) if s]
            found["para"] = _duplicates(paragraphs)
        names = {"line": "lines", "para": "paragraphs"}
        for kind, limit in (("line", line_rules[0]), ("para", para_rules[0])):
            if limit is None:
                continue
            n_items, n_dup, _, _ = found[kind]
            frac = n_dup / (n_items or 1)
            if frac > limit:
                return (
                    f"max_dup_{kind}_fraction",
                    f"{n_dup} of {n_items} {names[kind]} are repeats = {_fmt(frac, limit)}"
                    f" > {limit:g}",
                )
        for kind, limit in (("line", line_rules[1]), ("para", para_rules[1])):
            if limit is None:
                continue
            _, _, chars, dup_chars = found[kind]
            frac = dup_chars / (chars or 1)
            if frac > limit:
                return (
                    f"max_dup_{kind}_char_fraction",
                    f"repeated {names[kind]} hold {_fmt(frac, limit)} of characters > {limit:g}",
                )

        if not self.top_ngrams and not self.dup_ngrams:
            return None
        norm = v.norm
        lengths = list(map(len, norm))
        total = sum(lengths)
        if total == 0:
            return None

        for n, limit in self.top_ngrams:
            if len(norm) < n:
                continue
            counts = Counter(_ngrams(norm, n))
            count = max(counts.values())
            # An n-gram that occurs once is not repetition (and in a short document it would
            # cover a large share by itself).
            if count < 2:
                continue
            # Among equally frequent n-grams the longest: the answer must not depend on which
            # of them happens to come first.
            # compress() picks them in C: a generator over every n-gram was a third of the
            # time of the repetition rules.
            top = compress(counts, map(count.__eq__, counts.values()))
            chars, gram = max((sum(map(len, g)), g) for g in top)
            frac = chars * count / total
            if frac > limit:
                shown = " ".join(gram)
                shown = shown if len(shown) <= 60 else shown[:57] + "..."
                return (
                    "max_top_ngram_char_fraction",
                    f"top {n}-gram {shown!r} (x{count}) covers {_fmt(frac, limit)}"
                    f" of characters > {limit:g}",
                )

        for n, limit in self.dup_ngrams:
            if len(norm) < n:
                continue
            grams = _ngrams(norm, n)
            counts = Counter(grams)
            if len(counts) == len(grams):
                # No repeated n-gram means no repeated longer n-gram either.
                break
            covered = bytearray(len(norm))
            ones = b"\x01" * n
            for i, g in enumerate(grams):
                if counts[g] > 1:
                    covered[i : i + n] = ones
            frac = sum(compress(lengths, covered)) / total
            if frac > limit:
                return (
                    "max_dup_ngram_char_fraction",
                    f"repeated {n}-grams cover {_fmt(frac, limit)} of characters > {limit:g}",
                )
        return None
