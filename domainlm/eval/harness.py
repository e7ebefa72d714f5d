"""Our exported models in EleutherAI's lm-evaluation-harness: `--model domainlm`.

lm-eval finds models only in its own registry (it scans no entry points), so this module must
be imported before its CLI runs; the `domainlm-lm-eval` console script does that and then runs
lm-eval's CLI with the same arguments:

    domainlm-lm-eval --model domainlm \\
        --model_args pretrained=build/demo/export/base/hf-bf16 --tasks ...

From Python, `import domainlm.eval.harness` and call `lm_eval.simple_evaluate(model="domainlm",
model_args="pretrained=...")`, or pass a `DomainLM(...)` instance as the model.

Scoring follows our training: a context and its continuation are tokenized separately and
concatenated (as fine-tuning does), an empty context is the end-of-document token, and a
whole text (`loglikelihood_rolling`) starts right after an eos, as documents do in pretraining.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lm_eval.models  # noqa: F401  (lm-eval's own names stay resolvable once ours is added)
import sentencepiece as spm
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from domainlm.errors import UserError
from domainlm.model.decode import SamplingParams, complete
from domainlm.model.load import load_model
from domainlm.tokenizer.special import EOS_ID, PAD_ID

DEFAULT_GEN_TOKS = 256
log = logging.getLogger(__name__)


@register_model("domainlm")
class DomainLM(LM):
    """An exported domainlm folder (config.json, model.safetensors, tokenizer.model) for lm-eval.

    model_args: pretrained (the folder), batch_size (sequences per forward pass), max_length
    (tokens per forward pass, at most the model's max_seq_len), device, and rolling_stride
    (see `loglikelihood_rolling`; default max_length).
    """

    def __init__(self, pretrained: str, batch_size: int | str = 1, max_length: int | None = None,
                 device: str | None = "cpu", rolling_stride: int | None = None,
                 max_batch_size: int | None = None) -> None:
        super().__init__()
        folder = Path(pretrained)
        tok = folder / "tokenizer.model"
        if not tok.is_file():
            raise UserError(f"{tok} is missing: {folder} is not an exported domainlm folder")
        self._device = torch.device(device or "cpu")
        if self._device.type == "cuda" and not torch.cuda.is_available():
            # lm-eval's CLI asks for cuda unless told otherwise; a CPU machine still runs.
            log.warning("device %s is not available; evaluating on the CPU", device)
            self._device = torch.device("cpu")
        self.model = load_model(folder).to(self._device)  # float or int8/int4 folder
        self.sp = spm.SentencePieceProcessor(model_file=str(tok))
        limit = self.model.config.max_seq_len
        self.max_length = min(int(max_length), limit) if max_length else limit
        # "auto" (lm-eval's batch-size search) is not supported: it means one at a time here.
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 1
        self.rolling_stride = int(rolling_stride) if rolling_stride else self.max_length
        if not 1 <= self.rolling_stride <= self.max_length:
            raise UserError(f"rolling_stride must be in 1..{self.max_length}, "
                            f"got {self.rolling_stride}")

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, text: str) -> list[int]:
        return self.sp.encode(text) if text else []

    @torch.no_grad()
    def _score(self, items: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """(sum of log-probs, all greedy) of the last n tokens of each token list, every list
        at most max_length + 1 tokens: inputs are tokens[:-1], targets tokens[1:]. Lists are
        right-padded in batches; causal attention keeps padding out of the real positions."""
        out: list[tuple[float, bool]] = []
        for b in range(0, len(items), self.batch_size):
            batch = items[b : b + self.batch_size]
            width = max(len(t) - 1 for t, _ in batch)
            x = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
            for i, (t, _) in enumerate(batch):
                x[i, : len(t) - 1] = torch.tensor(t[:-1])
            logp = self.model(x.to(self._device))[0].float().log_softmax(-1).cpu()
            for i, (t, n) in enumerate(batch):
                if n == 0:
                    out.append((0.0, True))
                    continue
                end = len(t) - 1
                rows = logp[i, end - n : end]
                target = torch.tensor(t[-n:])
                total = float(rows.gather(-1, target[:, None]).sum())
                out.append((total, bool((rows.argmax(-1) == target).all())))
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding yields the continuation).

        Context and continuation are encoded separately and concatenated; tokens beyond
        max_length + 1 are dropped from the left (the context's start)."""
        items = []
        for req in requests:
            context, continuation = req.args[0], req.args[1]
            ctx = self.tok_encode(context) or [EOS_ID]
            cont = self.tok_encode(continuation)[-self.max_length :]
            items.append(((ctx + cont)[-(self.max_length + 1) :], len(cont)))
        return self._score(items)

    def windows(self, text: str) -> list[tuple[list[int], int]]:
        """The (tokens, n scored) windows that score every token of text exactly once.

        The text follows an eos. Window k covers [k*s, k*s + L] of eos + tokens (L =
        max_length, s = rolling_stride) and scores its last s tokens (the first window: all of
        them), so each token is predicted from at least L - s preceding tokens. The default
        s = L gives disjoint windows, exactly our pretraining's validation windows;
        s = 1 gives every token a full L-token context at one forward pass per token."""
        ids = [EOS_ID, *self.tok_encode(text)]
        L, s = self.max_length, self.rolling_stride
        out = [(ids[: L + 1], min(L, len(ids) - 1))]
        end = L + 1
        while end < len(ids):
            new = min(s, len(ids) - end)
            end += new
            out.append((ids[max(0, end - L - 1) : end], new))
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        """The total log-likelihood of each whole text (see `windows`)."""
        spans, items = [], []
        for req in requests:
            w = self.windows(req.args[0])
            spans.append((len(items), len(items) + len(w)))
            items.extend(w)
        scores = self._score(items)
        return [sum(s for s, _ in scores[a:b]) for a, b in spans]

    def generate_until(self, requests) -> list[str]:
        """Greedy continuations that end at eos, at any `until` string (not included) or after
        max_gen_toks tokens; a long context loses tokens from the left."""
        out = []
        for req in requests:
            context, kwargs = req.args[0], dict(req.args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else [u for u in until if u]
            budget = int(kwargs.get("max_gen_toks") or DEFAULT_GEN_TOKS)
            params = SamplingParams(max_new_tokens=min(budget, self.max_length - 1),
                                    temperature=0.0, stop=until)
            out.append(complete(self.model, self.sp, self.tok_encode(context), params).text)
        return out


def main() -> None:
    """`domainlm-lm-eval`: lm-eval's CLI with `--model domainlm` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
