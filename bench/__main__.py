"""`python -m bench [--quick] [SECTION ...]`: run the benchmarks, update docs/benchmarks.md."""

from __future__ import annotations

import sys

from bench import align, corpus, efficiency, generate, gpu, langid, pretrain, serve, tokens

SECTIONS = {
    "corpus": corpus.main,
    "langid": langid.main,
    "tokens": tokens.main,
    "pretrain": pretrain.main,
    "pretrain-muon": pretrain.main_muon,
    "efficiency": efficiency.main,
    "generate": generate.main,
    "serve": serve.main,
    "align": align.main,
    "gpu": gpu.main,
}


def main(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip())
        print("\nsections (all when none is named): " + ", ".join(SECTIONS))
        print("--quick: smaller inputs and fewer runs (a smoke run; it still rewrites its "
              "sections)")
        return
    quick = "--quick" in argv
    names = [a for a in argv if not a.startswith("-")] or list(SECTIONS)
    for name in names:
        if name not in SECTIONS:
            sys.exit(f"unknown benchmark {name!r}; choose from {', '.join(SECTIONS)}")
        SECTIONS[name](quick=quick)


main(sys.argv[1:])
