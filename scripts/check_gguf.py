"""Check our GGUF export in llama.cpp itself: the same greedy continuation, token for token.

Writes a model folder (save_hf_folder's layout) as a GGUF file with domainlm's write_gguf,
loads it with llama-cpp-python, feeds llama.cpp and our decoder (fp32) the same SentencePiece
token ids, and compares their greedy continuations; the ids go in directly, so the check is
about the weights and the architecture, not about llama.cpp's tokenizer (whose "llama"
segmentation differs from a SentencePiece unigram model's Viterbi). Exits 1 on a mismatch.

    python scripts/check_gguf.py [--model build/demo/pretrain/model] [--tokens 24]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from domainlm.errors import UserError
from domainlm.model.gguf import QTYPES, write_gguf
from domainlm.model.hf import load_hf_folder

DEFAULT_PROMPT = "The function returns"


def llama_cpp_greedy(
    path: Path, prompt: list[int], n: int, n_ctx: int
) -> tuple[list[int], np.ndarray]:
    """llama.cpp's greedy continuation of prompt (argmax of its logits; no sampler involved)
    and its logits for the token after the prompt."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        logits_all=False,
        verbose=False,
        n_threads=min(4, os.cpu_count() or 1),
    )

    def last_logits() -> np.ndarray:
        # With logits_all=False, Llama.scores is not filled; llama.cpp's own buffer holds the
        # logits of the last token of the last batch.
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float32)

    llm.eval(prompt)
    first = last_logits()
    out: list[int] = []
    for i in range(n):
        nxt = int(np.argmax(first if i == 0 else last_logits()))
        out.append(nxt)
        if i + 1 < n:
            llm.eval([nxt])
    llm.close()
    return out, first


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("build/demo/pretrain/model"))
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--tokens", type=int, default=24, help="greedy tokens to compare")
    parser.add_argument(
        "--qtype",
        default="F16",
        choices=list(QTYPES),
        help="F16 must match our fp32 model; a quantized file may rightly diverge after a while",
    )
    parser.add_argument("--out", type=Path, help="keep the GGUF file here (default: temporary)")
    args = parser.parse_args(argv)

    try:
        import llama_cpp
    except ImportError:
        print(
            "llama-cpp-python is not installed: run `make check-gguf` (it installs it) or "
            "`.venv/bin/pip install llama-cpp-python`",
            file=sys.stderr,
        )
        return 2

    try:
        model = load_hf_folder(args.model)
        tokenizer = args.model / "tokenizer.model"
        if not tokenizer.is_file():
            raise UserError(f"{tokenizer} is missing: the model folder needs its tokenizer")
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
        prompt = sp.encode(args.prompt)
        n_ctx = model.config.max_seq_len
        if not prompt or args.tokens < 1 or len(prompt) + args.tokens > n_ctx:
            raise UserError(
                f"the prompt ({len(prompt)} tokens) + --tokens {args.tokens} must fit the "
                f"model's context of {n_ctx}, and neither may be empty"
            )
        ids = torch.tensor([prompt])
        ours = model.generate(ids, args.tokens)[0, len(prompt) :].tolist()
        with torch.no_grad():
            our_first = model(ids)[0][0, -1].float().numpy()

        with tempfile.TemporaryDirectory() as tmp:
            path = args.out or Path(tmp) / f"model-{args.qtype}.gguf"
            write_gguf(model, tokenizer, path, args.qtype)
            print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {args.qtype})")
            theirs, their_first = llama_cpp_greedy(path, prompt, args.tokens, n_ctx)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    diff = float(np.abs(their_first - our_first).max() / np.abs(our_first).max())
    print(f"llama-cpp-python {llama_cpp.__version__}; model {args.model}")
    print(f"prompt   {args.prompt!r} -> {prompt}")
    print(f"domainlm {ours}\n         {sp.decode(ours)!r}")
    print(f"llama.cpp {theirs}\n         {sp.decode(theirs)!r}")
    print(f"next-token logits after the prompt: max |llama.cpp - ours| / max |ours| = {diff:.2e}")
    if theirs != ours:
        at = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b)
        print(
            f"MISMATCH: llama.cpp's greedy continuation differs from domainlm's at token {at} "
            f"({theirs[at]} vs {ours[at]})",
            file=sys.stderr,
        )
        return 1
    print(f"OK: llama.cpp continues the prompt with the same {len(ours)} tokens as domainlm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
