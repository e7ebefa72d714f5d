"""`domainlm eval perplexity|generate|fewshot`: score any model file or folder on a recipe's
validation split, on a JSONL of prompts and references, or on labelled texts."""

from __future__ import annotations

from pathlib import Path

from domainlm.errors import UserError
from domainlm.recipe import Recipe

MAX_RECORD_BYTES = 8 * 1024 * 1024


def read_records(path: Path, fields: tuple[str, ...]) -> list[dict]:
    """The JSONL records of `path` that have every field as a string; bad lines are counted
    and reported in one error only when none is usable."""
    from domainlm.corpus.jsonlines import json_objects

    if not Path(path).is_file():
        raise UserError(f"{path}: no such file (a JSONL file with {', '.join(fields)})")
    good, bad = [], 0
    for item in json_objects(Path(path), str(path), MAX_RECORD_BYTES):
        if not isinstance(item, tuple):
            bad += 1
            continue
        obj = item[-1]
        if isinstance(obj, dict) and all(isinstance(obj.get(f), str) for f in fields):
            good.append(obj)
        else:
            bad += 1
    if not good:
        raise UserError(
            f"{path}: no usable record ({bad} unusable lines): each line must be a JSON object "
            f"with string fields {', '.join(fields)}"
        )
    return good


def tokenizer_for(model_path: Path, recipe: Recipe | None):
    """(SentencePiece processor, its model file): the model's own (load_tokenizer), else the
    recipe's trained tokenizer."""
    import sentencepiece as spm

    from domainlm.model.load import load_tokenizer

    try:
        sp, folder = load_tokenizer(model_path)
        return sp, folder / "tokenizer.model"
    except UserError:
        if recipe is None or not recipe.layout.tokenizer_model.is_file():
            raise UserError(
                f"no tokenizer.model beside {model_path}: pass --recipe of its run"
            ) from None
        tok = recipe.layout.tokenizer_model
        return spm.SentencePieceProcessor(model_file=str(tok)), tok


def perplexity(model_path: Path, recipe: Recipe, max_tokens: int | None) -> dict:
    """Perplexity and bits per byte per source, domain vs general, of any model file/folder."""
    import torch

    from domainlm.eval.perplexity import perplexity_by_source
    from domainlm.eval.stage import groups
    from domainlm.model.decode import context_length
    from domainlm.model.load import load_model

    model = load_model(model_path)
    _, tok = tokenizer_for(model_path, recipe)
    seq_len = context_length(model)
    with torch.no_grad():
        result = perplexity_by_source(model, tok, recipe.layout.corpus, seq_len, max_tokens)
    result["groups"] = groups(result["sources"], recipe.eval.general_sources)
    return result


def generation(model_path: Path, data: Path, recipe: Recipe | None, max_new_tokens: int,
               chat: bool) -> dict:
    """Greedy answers to each record's `prompt`, scored against its `reference` (BLEU, ROUGE,
    exact match); with chat, the prompt is one user turn in the model's chat template."""
    from domainlm.metrics import all_metrics
    from domainlm.model.decode import SamplingParams, complete
    from domainlm.model.load import load_model
    from domainlm.tokenizer.templates import chat_template

    records = read_records(data, ("prompt", "reference"))
    model = load_model(model_path)
    sp, tok = tokenizer_for(model_path, recipe)
    template = chat_template(tok.parent) if chat else None
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                            stop=[template.stop] if template and template.stop else [])
    predictions = []
    for r in records:
        text = r["prompt"]
        if template is not None:
            text = template.render([{"role": "user", "content": text}], add_generation_prompt=True)
        predictions.append(complete(model, sp, sp.encode(text), params).text.strip())
    references = [r["reference"] for r in records]
    return {"n": len(records), **all_metrics(references, predictions),
            "samples": [{"prompt": r["prompt"], "reference": r["reference"], "prediction": p}
                        for r, p in list(zip(records, predictions, strict=True))[:5]]}


def fewshot(model_path: Path, shots: Path, data: Path, labels: list[str], k: int, seed: int,
            recipe: Recipe | None) -> dict:
    """k-shot classification of `data` (text, label) with examples drawn from `shots`."""
    from domainlm.eval.fewshot import classify
    from domainlm.model.load import load_model

    if not labels:
        raise UserError("--labels: give the label words, e.g. --labels positive,negative")
    pool = [(r["text"], r["label"]) for r in read_records(shots, ("text", "label"))]
    test = [(r["text"], r["label"]) for r in read_records(data, ("text", "label"))]
    unknown = sorted({y for _, y in pool + test} - set(labels))
    if unknown:
        raise UserError(f"labels {unknown} are not among --labels {labels}")
    if k > len(pool):
        raise UserError(f"--k {k} is more than the {len(pool)} examples in {shots}")
    model = load_model(model_path)
    sp, _ = tokenizer_for(model_path, recipe)
    return classify(model, sp, pool, test, labels, k, seed)
