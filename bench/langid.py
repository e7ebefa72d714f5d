"""Language id benchmark: time per document and accuracy of every backend, on long and short
texts of the Debian manual-page set (bench/langid_data.py), and the keep/drop decision for
English at each backend's default threshold."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable

from bench import langid_data
from bench.common import commit, load_note, machine, table, write_section
from domainlm.corpus.langid import (
    BACKENDS,
    DEFAULT_BACKEND,
    MIN_SCORE,
    UNKNOWN,
    canonical_code,
    detect_language,
    warm_up,
)
from domainlm.corpus.pipeline import build_corpus
from domainlm.recipe import load_recipe

TARGET = "en"
PREFIX = langid_data.PREFIX_CHARS
CASCADE_SURE = 0.9  # the measured cascade takes CLD2's answer from this score on
CLD2_LANGDETECT = "pycld2→langdetect (not shipped)"


def _cld2_langdetect(text: str) -> tuple[str, float]:
    """The cascade the issue suggested: CLD2 decides where it is sure, langdetect where it is
    not. Measured to show why the shipped cascade falls back to py3langid instead."""
    lang, score = detect_language(text, PREFIX, "pycld2")
    if lang != UNKNOWN and score >= CASCADE_SURE:
        return lang, score
    return detect_language(text, PREFIX, "langdetect")


def _detectors() -> dict[str, Callable[[str], tuple[str, float]]]:
    out: dict[str, Callable[[str], tuple[str, float]]] = {
        b: (lambda t, b=b: detect_language(t, PREFIX, b)) for b in BACKENDS
    }
    out[CLD2_LANGDETECT] = _cld2_langdetect
    return out


def _threshold(name: str) -> float:
    return MIN_SCORE.get(name, MIN_SCORE["langdetect"])


def _scores(rows: list[dict], answers: list[tuple[str, float]], threshold: float) -> dict:
    right = [canonical_code(a[0]) == r["lang"] for r, a in zip(rows, answers, strict=True)]
    keep = [canonical_code(a[0]) == TARGET and a[1] >= threshold for a in answers]
    target = [r["lang"] == TARGET for r in rows]
    n_t = sum(target)
    kept_t = sum(k for k, t in zip(keep, target, strict=True) if t)
    kept_o = sum(k for k, t in zip(keep, target, strict=True) if not t)
    # Correct answers whose score clears the threshold: what the threshold costs.
    right_scores = [a[1] for a, ok in zip(answers, right, strict=True) if ok]
    return {
        "accuracy": sum(right) / len(rows),
        "target_kept": kept_t / n_t,
        "others_kept": kept_o / (len(rows) - n_t),
        "keep_drop": (kept_t / n_t + 1 - kept_o / (len(rows) - n_t)) / 2,
        "right_pass": sum(s >= threshold for s in right_scores) / max(1, len(right_scores)),
        "per_lang": {
            lang: sum(ok for r, ok in zip(rows, right, strict=True) if r["lang"] == lang) / n
            for lang, n in Counter(r["lang"] for r in rows).items()
        },
    }


def run(quick: bool = False) -> tuple[str, dict]:
    per_lang, runs = (50, 1) if quick else (200, 5)
    rows, info = langid_data.build(per_lang)
    kinds = {k: [r for r in rows if r["kind"] == k] for k in ("long", "short")}
    detectors = _detectors()
    for b in BACKENDS:
        warm_up(b)

    results: dict[str, dict[str, dict]] = {name: {} for name in detectors}
    times: dict[tuple[str, str], list[float]] = {}
    for kind, subset in kinds.items():
        texts = [r["text"] for r in subset]
        for name, detect in detectors.items():
            answers = [detect(t) for t in texts]  # also the warm-up for this kind
            results[name][kind] = _scores(subset, answers, _threshold(name))
            if [detect(t) for t in texts[:200]] != answers[:200]:
                raise RuntimeError(f"{name} answered differently on a second call")
        # Interleaved runs: a burst of load from other jobs hits every backend alike.
        for _ in range(runs):
            for name, detect in detectors.items():
                t0 = time.perf_counter()
                for t in texts:
                    detect(t)
                times.setdefault((name, kind), []).append(
                    (time.perf_counter() - t0) / len(texts)
                )
    ms = {key: statistics.median(v) * 1e3 for key, v in times.items()}
    return _report(rows, info, kinds, results, ms, runs), {"results": results, "ms": ms}


def _report(rows, info, kinds, results, ms, runs) -> str:
    names = list(results)
    out = []
    head = ["backend"]
    body = []
    for kind in kinds:
        head += [f"ms/doc {kind}", f"× vs langdetect {kind}"]
    head += ["threshold"]
    for kind in kinds:
        head += [f"accuracy {kind}", f"keep/drop {kind}"]
    for name in names:
        row: list[object] = [f"**{name}**" if name == DEFAULT_BACKEND else name]
        for kind in kinds:
            t = ms[(name, kind)]
            row += [f"{t:.3f}", f"{ms[('langdetect', kind)] / t:.1f}"]
        row += [f"{_threshold(name):g}"]
        for kind in kinds:
            r = results[name][kind]
            row += [f"{r['accuracy']:.3f}", f"{r['keep_drop']:.4f}"]
        body.append(row)
    out.append(table(head, body))
    out.append(
        "\nKeep/drop is the filter's decision for `languages: [en]` at the backend's default "
        "`min_language_score` (the threshold column): the mean of the share of English texts "
        "kept and the share of other texts dropped (balanced, because English is 1 of "
        f"{len(Counter(r['lang'] for r in rows))} labels). Its parts:\n"
    )
    body = []
    for name in names:
        row = [name]
        for kind in kinds:
            r = results[name][kind]
            row += [f"{r['target_kept']:.3f}", f"{r['others_kept']:.4f}", f"{r['right_pass']:.3f}"]
        body.append(row)
    sub = []
    for kind in kinds:
        sub += [f"English kept {kind}", f"others kept {kind}", f"right answers ≥ threshold {kind}"]
    out.append(table(["backend", *sub], body))

    out.append("\nAccuracy per language (share of texts whose language is named correctly):\n")
    counts = Counter((r["lang"], r["kind"]) for r in rows)
    langs = sorted({r["lang"] for r in rows})
    head = ["language", "long texts", "short texts"]
    head += [f"{n} {k}" for n in BACKENDS for k in kinds]
    body = []
    for lang in langs:
        row = [lang, counts[(lang, "long")], counts[(lang, "short")]]
        for n in BACKENDS:
            for kind in kinds:
                acc = results[n][kind]["per_lang"].get(lang)
                row.append("-" if acc is None else f"{acc:.2f}")
        body.append(row)
    out.append(table(head, body))
    # The overall figures without the one language where langdetect fails most, for a
    # comparison with measurements on sets that have no Chinese.
    parts = []
    for n in names:
        accs = []
        for kind in kinds:
            subset = [r for r in kinds[kind] if r["lang"] != "zh"]
            per = results[n][kind]["per_lang"]
            hits = sum(per[r["lang"]] for r in subset)  # per-language means, summed per text
            accs.append(f"{hits / len(subset):.3f}")
        parts.append(f"{n} {' / '.join(accs)}")
    out.append(f"\nAccuracy long / short without Chinese: {'; '.join(parts)}.\n")

    passing = [
        n
        for n in names
        if n != "langdetect"
        and all(
            ms[("langdetect", k)] / ms[(n, k)] >= 10
            and results[n][k]["keep_drop"] >= results["langdetect"][k]["keep_drop"]
            for k in kinds
        )
    ]
    out.insert(
        1,
        "\nAt least 10× faster than langdetect with an equal or better keep/drop on long and "
        f"on short texts (the rule for the default): {', '.join(passing) or 'none'}. "
        f"The default is **{DEFAULT_BACKEND}**.\n",
    )

    dropped: Counter[str] = Counter()
    for why in info["dropped"].values():
        dropped.update(why)
    n_long, n_short = len(kinds["long"]), len(kinds["short"])
    header = (
        "## Language identification (`corpus.filters.language_id`)\n\n"
        f"Machine: {machine()}. Commit {commit()}. Command: `python -m bench langid` "
        f"(part of `make bench`), {time.strftime('%Y-%m-%d')}; ms/doc is the median of {runs} "
        "interleaved run(s) over the whole set after a warm-up, one process, one core. At the "
        f"end, {load_note()} (the ratios are measured side by side).\n\n"
        f"Test set: {n_long} long texts (consecutive prose paragraphs of one manual page, "
        f"{langid_data.LONG_MIN}+ characters, cut to the first {PREFIX} as the filter does) and "
        f"{n_short} short ones (single sentences of {langid_data.SHORT_MIN}-"
        f"{langid_data.SHORT_MAX} characters) in {len(langs)} languages, from the translated "
        f"manual pages of Debian ({', '.join(_package_names(info['packages']))}); the label is "
        "the package's "
        "language. Paragraphs dropped before sampling: "
        + ", ".join(f"{k} {v:,}" for k, v in dropped.most_common())
        + " (bench/langid_data.py says how each is found).\n"
    )
    return header + "\n" + "\n".join(out)


def demo_counts(backends: tuple[str, ...] = ("langdetect", DEFAULT_BACKEND)) -> str:
    """Build the demo corpus (recipes/demo.yaml) once per backend and compare the counts."""
    rows, dropped = [], {}
    for backend in backends:
        recipe = load_recipe("recipes/demo.yaml")
        recipe.name = f"demo-{backend}"
        recipe.build_dir = str(langid_data.CACHE / "demo")
        recipe.corpus.filters = dataclasses.replace(recipe.corpus.filters, language_id=backend)
        t0 = time.perf_counter()
        m = build_corpus(recipe, force=True, progress=False)
        wall = time.perf_counter() - t0
        out = recipe.layout.corpus
        filter_s = sum(
            json.loads(p.read_text())["stage_seconds"]["filter"]
            for p in (out / ".cache" / "shards").glob("*/stats.json")
        )
        rejected = [
            json.loads(line)
            for line in (out / "rejected" / "filter.jsonl").read_text("utf-8").splitlines()
        ]
        dropped[backend] = {
            r["origin"]: r["detail"] for r in rejected if r["reason"] == "filter:language"
        }
        total = m["counts"]["total"]
        rows.append(
            [backend, total["in"], total["kept"], total["filtered"].get("language", 0),
             sum(total["filtered"].values()), f"{filter_s:.1f}", f"{wall:.1f}"]
        )
    text = table(
        ["language_id", "documents in", "kept", "filtered: language", "filtered: all rules",
         "filter core-seconds", "build wall s"],
        rows,
    )
    first, second = backends
    for a, b in ((first, second), (second, first)):
        only = sorted(set(dropped[a]) - set(dropped[b]))
        shown = "; ".join(f"`{o}` ({dropped[a][o]})" for o in only[:8])
        more = f" and {len(only) - 8} more" if len(only) > 8 else ""
        text += f"\n\nDropped for language by {a} only: {len(only)}" + (
            f": {shown}{more}." if only else "."
        )
    return text + "\n"


def _package_names(debs: list[str]) -> list[str]:
    """'manpages-hu_1%3a4.18.1-1_all.deb' -> 'manpages-hu 1:4.18.1-1'."""
    out = []
    for deb in debs:
        name, version, _ = deb.split("_", 2)
        out.append(f"{name} {version.replace('%3a', ':')}")
    return out


def main(quick: bool = False) -> None:
    body, _ = run(quick)
    body += (
        "\n\n### The demo corpus with each backend\n\n`recipes/demo.yaml` built from scratch "
        f"(one build each, {os.cpu_count()} workers), `corpus.filters.language_id` set to "
        "each backend:\n\n" + demo_counts()
    )
    write_section("langid", body)
    print(body)
