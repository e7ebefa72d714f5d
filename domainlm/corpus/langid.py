"""Language identification with langdetect, deterministic across calls and processes."""

from __future__ import annotations

import functools
from pathlib import Path

from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory
from langdetect.lang_detect_exception import LangDetectException

UNKNOWN = "unknown"


@functools.lru_cache(maxsize=1)
def _factory() -> DetectorFactory:
    """The profiles, loaded once per process on first use (loading takes about a second)."""
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


def _prefix(text: str, prefix_chars: int) -> str:
    """The first `prefix_chars` characters, cut back to the last whitespace so no word is split."""
    if len(text) <= prefix_chars:
        return text
    head = text[:prefix_chars]
    if text[prefix_chars].isspace():
        return head
    parts = head.rsplit(None, 1)
    return parts[0] if len(parts) == 2 else head


def detect_language(text: str, prefix_chars: int = 2000) -> tuple[str, float]:
    """The most probable language code (ISO 639-1, e.g. 'en', 'zh-cn') and its probability.

    Returns ("unknown", 0.0) when the text has nothing langdetect can use (digits, symbols).
    """
    detector = _factory().create()
    detector.append(_prefix(text, prefix_chars))
    try:
        probabilities = detector.get_probabilities()
    except LangDetectException:
        return UNKNOWN, 0.0
    if not probabilities:
        return UNKNOWN, 0.0
    best = probabilities[0]
    return best.lang, float(best.prob)
