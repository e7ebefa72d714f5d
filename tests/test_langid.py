"""Language id backends: the right language on real sentences, the same answer on every call
and in another process, the recipe field, and the quality filter using the chosen backend."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from conftest import write_jsonl

from domainlm.corpus import filters as filters_module
from domainlm.corpus import langid
from domainlm.corpus.filters import QualityFilter
from domainlm.corpus.langid import (
    BACKENDS,
    CASCADE_MIN_CHARS,
    DEFAULT_BACKEND,
    MIN_SCORE,
    canonical_code,
    detect_language,
)
from domainlm.corpus.pipeline import build_corpus
from domainlm.recipe import QualityFilters, RecipeError, load_recipe

# One short sentence per language (under CASCADE_MIN_CHARS: the cascade asks py3langid).
SHORT = {
    "en": "The museum opens at nine in the morning, and early visitors can walk through the "
    "gardens before the crowds arrive.",
    "de": "Das Museum öffnet um neun Uhr morgens, und wer früh kommt, kann vor dem großen "
    "Andrang noch in Ruhe durch die Gärten spazieren.",
    "fr": "Le musée ouvre à neuf heures du matin, et les visiteurs matinaux peuvent se promener "
    "dans les jardins avant l'arrivée de la foule.",
    "es": "El museo abre a las nueve de la mañana, y quienes llegan temprano pueden pasear por "
    "los jardines antes de que lleguen las multitudes.",
    "it": "Il museo apre alle nove del mattino e chi arriva presto può passeggiare nei giardini "
    "prima che arrivi la folla.",
    "pl": "Muzeum otwiera się o dziewiątej rano, a goście, którzy przyjdą wcześnie, mogą "
    "spokojnie przejść się po ogrodach, zanim pojawią się tłumy.",
    "ru": "Музей открывается в девять часов утра, и посетители, которые приходят рано, могут "
    "погулять по саду, пока не собралась толпа.",
    "ja": "博物館は午前九時に開館します。早く来た人は、混雑する前に庭園をゆっくり散歩することが"
    "できます。",
}

# Longer paragraphs (over CASCADE_MIN_CHARS: the cascade lets CLD2 answer when it is sure).
LONG = {
    "en": SHORT["en"] + " The café on the ground floor serves soup and bread until three, and "
    "the library upstairs keeps old maps of the valley that anyone may look at on request. "
    "Guided tours leave from the main hall every hour.",
    "de": SHORT["de"] + " Das Café im Erdgeschoss bietet bis fünfzehn Uhr Suppe und Brot an, "
    "und die Bibliothek im ersten Stock bewahrt alte Karten des Tals auf, die jeder auf "
    "Nachfrage ansehen darf. Führungen beginnen jede Stunde in der Eingangshalle.",
    "fr": SHORT["fr"] + " Le café du rez-de-chaussée sert de la soupe et du pain jusqu'à quinze "
    "heures, et la bibliothèque de l'étage conserve de vieilles cartes de la vallée que chacun "
    "peut consulter sur demande. Les visites guidées partent du hall toutes les heures.",
    "es": SHORT["es"] + " La cafetería de la planta baja sirve sopa y pan hasta las tres, y la "
    "biblioteca del piso de arriba guarda mapas antiguos del valle que cualquiera puede "
    "consultar si lo pide. Las visitas guiadas salen del vestíbulo cada hora.",
    "ru": SHORT["ru"] + " Кафе на первом этаже подаёт суп и хлеб до трёх часов, а в библиотеке "
    "наверху хранятся старые карты долины, которые любой может посмотреть по просьбе. "
    "Экскурсии начинаются в главном зале каждый час.",
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lang", sorted(SHORT))
def test_each_backend_names_the_language_of_a_sentence(backend: str, lang: str) -> None:
    got, score = detect_language(SHORT[lang], backend=backend)
    assert got == lang
    assert MIN_SCORE[backend] <= score <= 1.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lang", sorted(LONG))
def test_each_backend_names_the_language_of_a_paragraph(backend: str, lang: str) -> None:
    assert len(LONG[lang]) >= CASCADE_MIN_CHARS
    got, score = detect_language(LONG[lang], backend=backend)
    assert got == lang
    assert 0.5 < score <= 1.0


def test_the_cascade_asks_cld2_on_long_text_and_py3langid_on_short() -> None:
    for text in LONG.values():
        assert detect_language(text, backend="cascade") == detect_language(text, backend="pycld2")
    for lang, text in SHORT.items():
        assert detect_language(text, backend="cascade") == detect_language(
            text, backend="py3langid"
        ), lang


def test_codes_are_iso_639_1_whatever_the_backend_spells() -> None:
    assert canonical_code("zh-cn") == canonical_code("zh-TW") == canonical_code("zh-Hant") == "zh"
    assert canonical_code("nb") == "no" and canonical_code("iw") == "he"
    assert canonical_code("un") == canonical_code("xx-Latn") == canonical_code("zxx") == "unknown"
    chinese = "这个程序从标准输入读取数据，把每一行按字母顺序排列以后写到标准输出。"
    for backend in BACKENDS:
        got, _ = detect_language(chinese * 3, backend=backend)
        assert got == "zh", backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_text_without_letters_is_unknown(backend: str) -> None:
    assert detect_language("12345 678 --- !!! 3.14", backend=backend) == ("unknown", 0.0)
    assert detect_language("", backend=backend) == ("unknown", 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_control_characters_and_surrogates_do_not_break_a_backend(backend: str) -> None:
    # CLD2 rejects these as invalid UTF-8; the normalizer removes them, but the filter must
    # not depend on that.
    dirty = LONG["fr"].replace(" ", " \x00\x85\ud800 ", 3)
    assert detect_language(dirty, backend=backend)[0] == "fr"


def test_an_unknown_backend_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown language id backend 'fasttext'"):
        detect_language(SHORT["en"], backend="fasttext")


def _answers() -> list:
    texts = [*SHORT.values(), *LONG.values(), "ok ja oui si", "Hello Welt, bonjour"]
    return [[b, *detect_language(t, backend=b)] for b in BACKENDS for t in texts]


def test_same_answer_on_every_call_and_in_another_process() -> None:
    here = _answers()
    assert _answers() == here
    script = "import json, test_langid; print(json.dumps(test_langid._answers()))"
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        check=True,
    )
    # JSON keeps every digit of a float, so this compares the scores exactly.
    assert json.loads(done.stdout) == json.loads(json.dumps(here))


# --- the recipe field and the filter -------------------------------------------------------------


def test_recipe_choices_are_the_backends_and_the_default_is_the_measured_one() -> None:
    hints = typing.get_type_hints(QualityFilters)
    assert set(typing.get_args(hints["language_id"])) == set(BACKENDS)
    assert QualityFilters().language_id == DEFAULT_BACKEND == "cascade"
    assert QualityFilters().min_language_score is None


RECIPE = """\
corpus:
  filters:
    language_id: {backend}
  sources:
    - name: docs
      kind: python-docs
"""


def test_recipe_accepts_each_backend(tmp_path: Path) -> None:
    for backend in BACKENDS:
        path = tmp_path / "r.yaml"
        path.write_text(RECIPE.format(backend=backend), encoding="utf-8")
        assert load_recipe(path).corpus.filters.language_id == backend


def test_an_unknown_backend_in_the_recipe_names_the_field_and_the_choices(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(backend="fasttext"), encoding="utf-8")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert "r.yaml:3: corpus.filters.language_id: must be one of " in message
    assert all(repr(b) in message for b in BACKENDS) and "got 'fasttext'" in message
    # Per-source overrides are checked the same way.
    text = RECIPE.format(backend="cascade") + "      filters: {language_id: pycdl2}\n"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RecipeError, match=r"sources\[0\]\.filters\.language_id: .*'pycld2'"):
        load_recipe(path)


# Every rule but language id off, so that the language rule is what a document meets.
ONLY_LANGUAGE = QualityFilters(
    **{
        f.name: None
        for f in dataclasses.fields(QualityFilters)
        if f.name not in ("languages", "language_id", "language_prefix_chars")
    }
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_filter_drops_french_for_english_with_the_chosen_backend(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = []

    def spy(text: str, prefix_chars: int, backend: str) -> tuple[str, float]:
        asked.append(backend)
        return langid.detect_language(text, prefix_chars, backend)

    monkeypatch.setattr(filters_module, "detect_language", spy)
    qf = QualityFilter(dataclasses.replace(ONLY_LANGUAGE, languages=["en"], language_id=backend))
    assert qf.min_language_score == MIN_SCORE[backend]
    rule, detail = qf.check(LONG["fr"])
    assert rule == "language" and detail.startswith("language 'fr' (")
    assert qf.check(LONG["en"]) is None and qf.last_language == "en"
    assert asked == [backend, backend]


def test_recipe_language_codes_are_read_like_the_answers() -> None:
    chinese = "这个程序从标准输入读取数据，把每一行按字母顺序排列以后写到标准输出。"
    qf = QualityFilter(dataclasses.replace(ONLY_LANGUAGE, languages=["zh-cn"]))
    assert qf.check(chinese) is None and qf.last_language == "zh"


def test_an_explicit_score_threshold_overrides_the_backend_default() -> None:
    cfg = dataclasses.replace(ONLY_LANGUAGE, languages=["en"], min_language_score=1.01)
    rule, detail = QualityFilter(cfg).check(LONG["en"])
    assert rule == "language" and detail.endswith("< 1.01")


def test_corpus_build_uses_each_source_backend(tmp_path: Path, make_recipe) -> None:
    records = [{"text": LONG["en"]}, {"text": LONG["fr"]}, {"text": SHORT["de"]}]
    write_jsonl(tmp_path / "s" / "a" / "a.jsonl", records)
    write_jsonl(tmp_path / "s" / "b" / "b.jsonl", records)
    prose_rules_off = {"min_words": 1, "min_stop_words": None}
    recipe = make_recipe(
        {
            "corpus": {
                "filters": prose_rules_off,
                "sources": [
                    {"name": "a", "path": str(tmp_path / "s" / "a")},
                    {"name": "b", "path": str(tmp_path / "s" / "b"),
                     "filters": {"language_id": "langdetect"}},
                ],
                "dedup": {"exact": False, "near": False},
                "val_fraction": 0.0,
                "workers": 1,
            }
        }
    )
    m = build_corpus(recipe, progress=False)
    for source in ("a", "b"):
        counts = m["counts"]["sources"][source]
        assert counts["kept"] == 1 and counts["filtered"] == {"language": 2}
    out = recipe.layout.corpus / "rejected" / "filter.jsonl"
    rejected = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert {(r["origin"], r["reason"]) for r in rejected} == {
        (f"{s}/{s}.jsonl:{i}", "filter:language") for s in ("a", "b") for i in (2, 3)
    }
    assert all(r["detail"].startswith(("language 'fr'", "language 'de'")) for r in rejected)
