"""A labelled multilingual test set for language id, built from the translated manual pages
that Debian packages ship (`apt-get download`, `dpkg -x`), cut into long and short texts."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import subprocess
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

CACHE = Path("build/bench/langid")
DATA_VERSION = 1  # bump when the extraction or sampling below changes

# label -> the Debian package with that language's pages. English comes from the original
# man-pages project (`manpages`, `manpages-dev`), which is also the reference used to spot
# untranslated paragraphs in the other packages. Serbian (manpages-sr) is left out on
# purpose: langdetect has no Serbian profile, so it could never be right and the comparison
# would measure coverage rather than accuracy.
PACKAGES: dict[str, list[str]] = {
    "en": ["manpages", "manpages-dev"],
    "cs": ["manpages-cs"],
    "da": ["manpages-da"],
    "de": ["manpages-de"],
    "el": ["manpages-el"],
    "es": ["manpages-es"],
    "fi": ["manpages-fi"],
    "fr": ["manpages-fr"],
    "hu": ["manpages-hu"],
    "id": ["manpages-id"],
    "it": ["manpages-it"],
    "ja": ["manpages-ja"],
    "mk": ["manpages-mk"],
    "nl": ["manpages-nl"],
    "no": ["manpages-nb"],  # Norwegian Bokmål; every backend answers "no" (see langid.py)
    "pl": ["manpages-pl"],
    "pt": ["manpages-pt-br"],
    "ro": ["manpages-ro"],
    "ru": ["manpages-ru"],
    "sv": ["manpages-sv"],
    "tr": ["manpages-tr"],
    "uk": ["manpages-uk"],
    "vi": ["manpages-vi"],
    "zh": ["manpages-zh"],
}

# Long texts: consecutive paragraphs of one page, 300+ characters, cut to the prefix as today.
LONG_MIN, PREFIX_CHARS = 300, 1000
SHORT_MIN, SHORT_MAX = 40, 120  # short texts: whole sentences of this many characters
# A word the English pages use at least this often is "English vocabulary"; a translated text
# with at least this share of its letters in such words is taken for untranslated English.
VOCAB_MIN_COUNT, ENGLISH_SHARE = 5, 0.6

# English function words that are rare as words in the other languages here ("in", "is",
# "of", "to", "or", "die" are not: Dutch, German, Polish and French use them). A translated
# paragraph where they are common was left in English by the translators.
_ENGLISH_WORDS = frozenset(
    "the and which with this that are when from should been has will these those would there"
    " for not can may must you your its their only also other such than".split()
)
_WORD = re.compile(r"[^\W\d_]+")
_CODE_TOKEN = re.compile(r"[/_=<>{}\[\]();$|\\@#*%]|^-|::|\.\w+\(")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])")


# --------------------------------------------------------------------------------------------
# Fetching.


def fetch(cache: Path = CACHE) -> dict[str, list[Path]]:
    """Download (once) and unpack every package; label -> the folders with its pages."""
    debs, roots = cache / "debs", cache / "root"
    debs.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[Path]] = defaultdict(list)
    for lang, packages in PACKAGES.items():
        for pkg in packages:
            found = sorted(debs.glob(f"{pkg}_*.deb"))
            if not found:
                done = subprocess.run(
                    ["apt-get", "download", pkg], cwd=debs, capture_output=True, text=True
                )
                found = sorted(debs.glob(f"{pkg}_*.deb"))
                if done.returncode or not found:
                    raise SystemExit(
                        f"apt-get download {pkg} failed ({done.stderr.strip()[-300:]}); "
                        "run `apt-get update` first (Debian or Ubuntu with apt needed)"
                    )
            root = roots / pkg
            if not (root / ".unpacked").exists():
                root.mkdir(parents=True, exist_ok=True)
                subprocess.run(["dpkg", "-x", str(found[-1]), str(root)], check=True)
                (root / ".unpacked").touch()
            out[lang].append(root / "usr/share/man")
    return dict(out)


def man_pages(man_dir: Path, english: bool) -> list[Path]:
    """The page files of one package: man*/ for English, <locale>/man*/ for the others."""
    pattern = "man*/*" if english else "*/man*/*"
    return sorted(p for p in man_dir.glob(pattern) if p.is_file() and not p.is_symlink())


# --------------------------------------------------------------------------------------------
# roff to prose.

_ESCAPES = {
    "-": "-", "e": "\\", "&": "", "~": " ", " ": " ", "0": " ", "|": "", "^": "", "c": "",
    ":": "", "/": "", ",": "", "%": "", "'": "'", "`": "`", ".": ".",
}
_NAMED = {
    "em": "—", "en": "–", "aq": "'", "dq": '"', "lq": "“", "rq": "”", "oq": "‘", "cq": "’",
    "bu": "•", "co": "©", "rg": "®", "tm": "™", "mu": "×", "de": "°", "hy": "-", "ga": "`",
    "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›", "R": "®", "ti": "~", "ha": "^", "rs": "\\",
}
_ESCAPE = re.compile(
    r"\\(?:f(?:\[[^\]]*\]|\(..|.)|s[-+]?\d|\*(?:\[([^\]]*)\]|\((..)|(.))|\((..)|\[([^\]]*)\]"
    r"|[hvwNxkoZ]'[^']*'|\"|(.))"
)
_SKIP_BLOCKS = {"EX": "EE", "nf": "fi", "TS": "TE", "EQ": "EN", "de": "..", "ig": ".."}
_BREAKS = {"PP", "LP", "P", "TP", "TQ", "IP", "HP", "sp", "br", "RS", "RE", "in", "SH", "SS"}
_FONT_MACROS = {"B", "I", "SM", "SB", "BR", "RB", "BI", "IB", "IR", "RI"}


def _unescape(line: str) -> str:
    def sub(m: re.Match[str]) -> str:
        named = m.group(1) or m.group(2) or m.group(3) or m.group(4) or m.group(5)
        if named is not None:
            if named.startswith("u") and len(named) > 1:  # \[u00E9]: a code point
                try:
                    return chr(int(named[1:5], 16))
                except ValueError:
                    return ""
            return _NAMED.get(named, "")
        single = m.group(6)
        return _ESCAPES.get(single, "") if single is not None else ""

    return _ESCAPE.sub(sub, line)


def _macro_args(rest: str) -> list[str]:
    return [a[1:-1] if a.startswith('"') else a for a in re.findall(r'"[^"]*"?|\S+', rest)]


def roff_paragraphs(source: str) -> list[str]:
    """The paragraphs of one page without markup, comments, examples, tables, option tags or
    the NAME line (synopses and other code are left to `is_prose`)."""
    paragraphs: list[str] = []
    current: list[str] = []
    end_block: str | None = None
    sections = 0
    skip_next = False  # the tag line after .TP is a term (an option, a constant), not prose

    def flush() -> None:
        if current:
            paragraphs.append(" ".join(" ".join(current).split()))
            current.clear()

    for raw in source.splitlines():
        raw = raw.split('\\"', 1)[0]  # an inline comment runs to the end of the line
        if end_block is not None:
            if raw.strip().startswith("." + end_block) or (end_block == ".." and raw == ".."):
                end_block = None
            continue
        if raw.startswith((".", "'")):
            name, _, rest = raw[1:].strip().partition(" ")
            if name in _SKIP_BLOCKS:
                flush()
                end_block = _SKIP_BLOCKS[name]
            elif name in _BREAKS:
                flush()
                if name == "SH":
                    sections += 1
                skip_next = name == "TP"
            elif name in _FONT_MACROS and skip_next:
                skip_next = False
            elif name in _FONT_MACROS and sections > 1:
                args = _macro_args(_unescape(rest))
                # Alternating-font macros join their arguments without spaces.
                current.append(("" if len(name) == 2 else " ").join(args))
            continue
        if skip_next:
            skip_next = False
            continue
        if sections > 1 and raw.strip():  # the NAME section is a title line, not prose
            current.append(_unescape(raw))
    flush()
    return paragraphs


# --------------------------------------------------------------------------------------------
# Filtering and sampling.


def _norm(text: str) -> str:
    return " ".join(text.casefold().split())


def is_prose(text: str) -> bool:
    """Mostly letters and few code-like tokens (paths, options, calls, variables)."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return False
    letters = sum(1 for c in chars if unicodedata.category(c)[0] == "L")
    code = sum(len(t) for t in text.split() if _CODE_TOKEN.search(t))
    return letters / len(chars) >= 0.75 and code / len(chars) <= 0.15


def looks_english(text: str, vocabulary: frozenset[str]) -> bool:
    """True for text left in English by the translators: English function words are common
    in it, or most of its letters are in words that the English pages use often."""
    words = [w.lower() for w in _WORD.findall(text)]
    if not words:
        return False
    hits = sum(1 for w in words if w in _ENGLISH_WORDS)
    if hits >= 2 and hits / len(words) >= 0.08:
        return True
    # Weighted by length, so that one long CJK run counts for its characters.
    english = sum(len(w) for w in words if w in vocabulary)
    return english / sum(map(len, words)) >= ENGLISH_SHARE


def cut_prefix(text: str, chars: int) -> str:
    """The first `chars` characters, cut back to whitespace (as corpus.langid does)."""
    from domainlm.corpus.langid import _prefix

    return _prefix(text, chars)


def _sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip()]


def _rank(lang: str, kind: str, text: str) -> str:
    return hashlib.sha256(f"{lang}\0{kind}\0{text}".encode()).hexdigest()


def extract(
    folders: dict[str, list[Path]],
) -> tuple[dict[str, list[list[str]]], dict[str, Counter], frozenset[str]]:
    """label -> runs of consecutive prose paragraphs (a dropped paragraph ends a run), each
    paragraph once; per label the count of each reason for a drop; the English vocabulary."""
    english_ref: set[str] = set()
    vocabulary: frozenset[str] = frozenset()
    runs: dict[str, list[list[str]]] = {}
    dropped: dict[str, Counter] = {}
    for lang in ["en"] + [k for k in folders if k != "en"]:
        seen: set[str] = set()
        found: list[list[str]] = []
        why: Counter[str] = Counter()
        for man_dir in folders[lang]:
            for page in man_pages(man_dir, english=lang == "en"):
                raw = page.read_bytes()
                if page.suffix == ".gz":
                    raw = gzip.decompress(raw)
                source = raw.decode("utf-8", errors="replace")
                if source.lstrip().startswith(".so "):
                    continue  # a redirect to another page
                run: list[str] = []
                for p in roff_paragraphs(source):
                    key = _norm(p)
                    reason = None
                    if key in seen:
                        reason = "repeated"
                    elif "\ufffd" in p:
                        reason = "not UTF-8"
                    elif not is_prose(p):
                        reason = "code or symbols"
                    elif lang != "en" and key in english_ref:
                        reason = "same as an English page"
                    elif lang != "en" and looks_english(p, vocabulary):
                        reason = "looks English"
                    seen.add(key)
                    if reason is None:
                        run.append(p)
                        continue
                    why[reason] += 1
                    if run:
                        found.append(run)
                    run = []
                if run:
                    found.append(run)
        if lang == "en":
            english_ref = seen
            counts = Counter(w.lower() for run in found for p in run for w in _WORD.findall(p))
            vocabulary = frozenset(w for w, n in counts.items() if n >= VOCAB_MIN_COUNT)
        runs[lang] = found
        dropped[lang] = why
    return runs, dropped, vocabulary


def _long_texts(runs: list[list[str]]) -> set[str]:
    """Consecutive paragraphs joined until a text reaches the prefix length, as a document's
    head would; texts under LONG_MIN characters at the end of a run are not used."""
    out: set[str] = set()
    for run in runs:
        chunk: list[str] = []
        for p in run:
            chunk.append(p)
            if sum(map(len, chunk)) >= PREFIX_CHARS:
                out.add("\n\n".join(chunk))
                chunk = []
        if sum(map(len, chunk)) >= LONG_MIN:
            out.add("\n\n".join(chunk))
    return {cut_prefix(t, PREFIX_CHARS) for t in out}


def sample(
    runs: dict[str, list[list[str]]], per_lang: int, vocabulary: frozenset[str]
) -> list[dict]:
    """Per label, `per_lang` long and `per_lang` short texts, chosen by a hash of the text."""
    rows: list[dict] = []
    for lang in sorted(runs):
        shorts = {
            s
            for run in runs[lang]
            for p in run
            for s in _sentences(p)
            if SHORT_MIN <= len(s) <= SHORT_MAX and is_prose(s)
            and (lang == "en" or not looks_english(s, vocabulary))
        }
        for kind, pool in (("long", _long_texts(runs[lang])), ("short", shorts)):
            chosen = sorted(pool, key=lambda t, k=kind: _rank(lang, k, t))[:per_lang]
            rows += [{"lang": lang, "kind": kind, "text": t} for t in sorted(chosen)]
    return rows


def build(per_lang: int = 200, cache: Path = CACHE) -> tuple[list[dict], dict]:
    """The test set (cached as JSONL) and a summary of how it was made."""
    out = cache / f"set-v{DATA_VERSION}-{per_lang}.jsonl"
    info_path = out.with_suffix(".info.json")
    if out.exists() and info_path.exists():
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        return rows, json.loads(info_path.read_text(encoding="utf-8"))
    folders = fetch(cache)
    runs, dropped, vocabulary = extract(folders)
    rows = sample(runs, per_lang, vocabulary)
    versions = sorted(p.name for p in (cache / "debs").glob("*.deb"))
    counts = Counter((r["lang"], r["kind"]) for r in rows)
    info = {
        "packages": versions,
        "paragraphs": {k: sum(map(len, v)) for k, v in runs.items()},
        "dropped": {k: dict(v) for k, v in dropped.items()},
        "texts": {f"{lang}/{kind}": n for (lang, kind), n in sorted(counts.items())},
    }
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    info_path.write_text(json.dumps(info, indent=1, ensure_ascii=False), encoding="utf-8")
    return rows, info


if __name__ == "__main__":
    got, summary = build()
    print(json.dumps({k: v for k, v in summary.items() if k != "packages"}, indent=1))
