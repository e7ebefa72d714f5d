"""Tiny English-like documents for tests: real words, real stop words, seeded."""

from __future__ import annotations

import random

WORDS = (
    "market price bond equity yield rate bank loan credit risk trader fund asset share stock "
    "report quarter growth revenue profit loss margin debt capital interest inflation policy "
    "central currency exchange dollar euro investor portfolio hedge option future contract "
    "company board director earnings forecast analyst rating outlook sector energy oil gas "
    "technology software service customer product sales volume demand supply chain cost "
    "government budget deficit tax reform election vote law court ruling regulator agency "
    "season weather river mountain garden city village school student teacher library "
    "morning evening summer winter family friend house street window kitchen table story "
    "music film artist painting museum travel train station airport holiday beach forest"
).split()
STOP = "the be to of and that have with a in is it for on as was".split()
VERBS = "rose fell said expected reported increased decreased remained showed announced".split()


def sentence(rng: random.Random) -> str:
    n = rng.randint(8, 16)
    words = []
    for k in range(n):
        if k % 3 == 0:
            words.append(rng.choice(STOP))
        elif k % 5 == 2:
            words.append(rng.choice(VERBS))
        else:
            words.append(rng.choice(WORDS))
    s = " ".join(words)
    return s[0].upper() + s[1:] + "."


def document(rng: random.Random, n_words: int = 120) -> str:
    out: list[str] = []
    count = 0
    while count < n_words:
        s = sentence(rng)
        out.append(s)
        count += len(s.split())
    paras = [" ".join(out[i : i + 4]) for i in range(0, len(out), 4)]
    return "\n\n".join(paras)
