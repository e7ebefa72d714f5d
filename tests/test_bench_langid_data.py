"""The language-id test set's extraction: roff to prose, and what counts as code or as
English left untranslated (bench/langid_data.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` sits beside `tests`

from bench.langid_data import (  # noqa: E402
    cut_prefix,
    is_prose,
    looks_english,
    roff_paragraphs,
)

PAGE = r""".\" Copyright line that is not prose
.TH GROUP 5 2022-10-30
.SH NOM
group \- fichier des groupes
.SH DESCRIPTION
Le fichier \fI/etc/group\fP est un fichier texte qui définit les groupes
du système.  \" a comment at the end of a line
.PP
.in +4n
.EX
group_name:password:GID:user_list
.EE
.in
.TP
\fB\-\-force\fP
Ne demande \fBjamais\fR de confirmation\ :
.BR chgrp (1)
reste possible.
"""


def test_roff_paragraphs_keep_prose_and_drop_markup_name_examples_and_tags() -> None:
    paragraphs = roff_paragraphs(PAGE)
    assert paragraphs[0] == (
        "Le fichier /etc/group est un fichier texte qui définit les groupes du système."
    )
    assert "comment" not in paragraphs[0] and "\\" not in paragraphs[0]
    assert paragraphs[1] == "Ne demande jamais de confirmation : chgrp(1) reste possible."
    text = " ".join(paragraphs)
    for absent in ("group_name", "--force", "fichier des groupes", "Copyright", "GROUP 5"):
        assert absent not in text, absent


def test_code_is_not_prose() -> None:
    assert is_prose("Ce champ indique le nombre de blocs alloués au fichier.")
    assert not is_prose("ls -l /usr/bin | grep -v '^d' > out.txt; echo $?")
    assert not is_prose("12 34 56 78 90 -- 3.14 2.71")


def test_untranslated_english_is_recognised_and_french_is_not() -> None:
    vocabulary = frozenset("print nothing only return an exit status file names".split())
    assert looks_english("The value of this field is used when the file is opened.", vocabulary)
    assert looks_english("print nothing, only return an exit status", vocabulary)
    assert not looks_english("Ce champ indique le nombre de blocs alloués au fichier.", vocabulary)


def test_prefix_cut_matches_the_filter() -> None:
    assert cut_prefix("alpha beta gamma", 8) == "alpha"
