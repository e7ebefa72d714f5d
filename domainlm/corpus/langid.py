"""Language identification behind one interface (a CLD2/py3langid cascade, py3langid,
pycld2, langdetect), each backend deterministic across calls and processes."""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable
from pathlib import Path

UNKNOWN = "unknown"

# Every backend answers with ISO 639-1 codes; these are the spellings some of them use
# instead (langdetect: zh-cn/zh-tw; CLD2: zh-Hant, iw, jw, sr-ME; Bokmål as nb). Recipe
# `languages` go through the same map, so `languages: [zh-cn]` keeps working.
_ALIASES = {
    "zh-cn": "zh", "zh-tw": "zh", "zh-hant": "zh", "nb": "no", "iw": "he", "jw": "jv",
    "sr-me": "sr", "in": "id", "ji": "yi",
}
# Answers that name no language: CLD2's "un", its script-only "xx-Latn" codes, py3langid's
# "zxx" (no linguistic content).
_NOT_A_LANGUAGE = re.compile(r"^(un|und|zxx|xxx|xx-.*|zz.)$")
_LETTER = re.compile(r"[^\W\d_]")


def canonical_code(code: str) -> str:
    """The one code this module uses for a language, whatever spelling a backend (or a
    recipe) gives it; `UNKNOWN` for codes that name no language."""
    low = code.lower()
    if _NOT_A_LANGUAGE.match(low):
        return UNKNOWN
    return _ALIASES.get(low, low)


def _prefix(text: str, prefix_chars: int) -> str:
    """The first `prefix_chars` characters, cut back to the last whitespace so no word is split."""
    if len(text) <= prefix_chars:
        return text
    head = text[:prefix_chars]
    if text[prefix_chars].isspace():
        return head
    parts = head.rsplit(None, 1)
    return parts[0] if len(parts) == 2 else head


# --------------------------------------------------------------------------------------------
# langdetect: naive Bayes over character n-grams, 55 languages. Score: its probability of
# the language it names (an average over seeded random trials of n-gram samples).


@functools.lru_cache(maxsize=1)
def _langdetect_factory():
    """The profiles, loaded once per process on first use (loading takes about a second)."""
    from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory

    # langdetect samples n-grams at random; a fixed seed makes a text's answer the same on
    # every call and in every process. The class attribute also covers langdetect.detect().
    DetectorFactory.seed = 0
    factory = DetectorFactory()
    factory.set_seed(0)
    # langdetect itself loads profiles in os.listdir order, which differs between file
    # systems; sorted order keeps the language indices (and so the float sums) identical.
    files = sorted(p for p in Path(PROFILES_DIRECTORY).iterdir() if p.is_file())
    factory.load_json_profile(
        [p.read_text(encoding="utf-8") for p in files if not p.name.startswith(".")]
    )
    return factory


def _langdetect(text: str) -> tuple[str, float]:
    from langdetect.lang_detect_exception import LangDetectException

    detector = _langdetect_factory().create()
    detector.append(text)
    try:
        probabilities = detector.get_probabilities()
    except LangDetectException:
        return UNKNOWN, 0.0
    if not probabilities:
        return UNKNOWN, 0.0
    best = probabilities[0]
    return canonical_code(best.lang), float(best.prob)


# --------------------------------------------------------------------------------------------
# py3langid: langid.py's naive Bayes over byte n-grams, 140 language labels, no randomness.
# Score: the softmax of its log-scores, which py3langid tempers by the square root of the
# text's length in bytes so that it does not saturate at 1.0 on long text.


@functools.lru_cache(maxsize=1)
def _py3langid_model():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def _py3langid(text: str) -> tuple[str, float]:
    lang, prob = _py3langid_model().classify(text)
    code = canonical_code(lang)
    return code, (0.0 if code == UNKNOWN else float(prob))


# --------------------------------------------------------------------------------------------
# pycld2: Chromium's Compact Language Detector 2 (quadgram tables in C++, 80+ languages),
# no randomness. Score: the share of the text's letters that CLD2 assigns to the language it
# names (its `percent` / 100), so 0.65 means "65% of the text is in that language".


def _without_controls(text: str) -> str:
    # CLD2 refuses control characters, surrogates and non-characters as invalid UTF-8.
    # Only the rare failing text pays for this scan.
    return "".join(
        " " if unicodedata.category(c) in ("Cc", "Cs", "Cn") and c not in "\t\n\r" else c
        for c in text
    )


def _pycld2(text: str) -> tuple[str, float]:
    import pycld2

    try:
        _, _, details = pycld2.detect(text, bestEffort=True)
    except (pycld2.error, UnicodeError):
        try:
            _, _, details = pycld2.detect(_without_controls(text), bestEffort=True)
        except (pycld2.error, UnicodeError):
            return UNKNOWN, 0.0
    _, code, percent, _ = details[0]
    code = canonical_code(code)
    return code, (0.0 if code == UNKNOWN else percent / 100.0)


# --------------------------------------------------------------------------------------------
# The cascade (the default). CLD2 is by far the fastest and as accurate as py3langid on texts
# of a few hundred characters, but on single sentences it is often sure and wrong (a Spanish
# sentence with a few technical words comes out as English). So CLD2 answers only texts of
# CASCADE_MIN_CHARS or more, and only when it puts CASCADE_SURE of the text in one language;
# py3langid answers everything else. Score: that of the backend that answered (CLD2's is
# then >= CASCADE_SURE, so a threshold below it acts on py3langid's answers only).

CASCADE_MIN_CHARS = 300  # the shortest "long" text of the benchmark that chose these values
CASCADE_SURE = 0.9


def _cascade(text: str) -> tuple[str, float]:
    if len(text) >= CASCADE_MIN_CHARS:
        code, score = _pycld2(text)
        if code != UNKNOWN and score >= CASCADE_SURE:
            return code, score
    return _py3langid(text)


_BACKENDS: dict[str, Callable[[str], tuple[str, float]]] = {
    "cascade": _cascade,
    "py3langid": _py3langid,
    "pycld2": _pycld2,
    "langdetect": _langdetect,
}
BACKENDS = tuple(_BACKENDS)
# Chosen by `python -m bench langid` (docs/corpus.md, "Language identification"): more than
# ten times faster than langdetect on long and on short texts, and as good or better at
# keeping English and dropping the rest on both.
DEFAULT_BACKEND = "cascade"

# The `min_language_score` each backend uses when the recipe leaves it null. The scores are
# on different scales, so one number cannot mean the same for all of them. py3langid tempers
# its probabilities by text length, so on a single sentence a correct answer can score well
# under 0.65, and langdetect's threshold would drop short English texts it identified
# correctly. At 0.3 it lets about as large a share of its correct answers on short texts
# through as langdetect does at 0.65 (`python -m bench langid` prints both shares).
MIN_SCORE = {"cascade": 0.3, "py3langid": 0.3, "pycld2": 0.65, "langdetect": 0.65}


def detect_language(
    text: str, prefix_chars: int = 2000, backend: str = DEFAULT_BACKEND
) -> tuple[str, float]:
    """The most probable language of `text`'s first `prefix_chars` characters, as an ISO
    639-1 code ('en', 'zh', see `canonical_code`) and the backend's score in [0, 1].

    Returns ("unknown", 0.0) when the text has no letter or the backend finds no language.
    """
    head = _prefix(text, prefix_chars)
    if not _LETTER.search(head):
        return UNKNOWN, 0.0
    try:
        detect = _BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown language id backend {backend!r}; one of {BACKENDS}") from None
    return detect(head)


def warm_up(backend: str) -> None:
    """Load the backend's model now (benchmarks time detection, not loading)."""
    detect_language("warm up the model", backend=backend)
