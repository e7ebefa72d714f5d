"""Check a run's exported files in the tools they are made for, fed as their users feed them.

* Every GGUF (export/<model>/model-*.gguf) in llama.cpp (llama-cpp-python), with text: its ids
  equal SentencePiece's on every validation document; bits per byte of the validation documents
  in llama.cpp vs our decoder on the same file (and on the model it was exported from); for F16,
  llama.cpp's greedy continuation of text prompts equals ours; a chat through the template
  embedded in the file (create_chat_completion) renders our prompt and, for F16, gives our reply.
* Every Hugging Face folder (the run's models, export/<model>/hf-*, int8, int4) in transformers'
  AutoModelForCausalLM: logits equal ours within the format's tolerance (a folder transformers
  misreads gives other logits), the tokenizer's ids and chat template equal ours, greedy
  generation equals ours for unquantized folders.
* Every PEFT adapter (LoRA, prompt tuning) in peft's AutoPeftModelForCausalLM, loaded from
  another working directory: logits equal ours.
* scripts/check_server.py: the openai client and lm-eval's local-completions against
  `domainlm serve`.

Prints each comparison, writes the figures to build/<run>/interop.json, exits 1 on any failure,
naming it.

    python scripts/check_interop.py [--recipe recipes/demo.yaml] [--skip-server]
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from domainlm.errors import UserError
from domainlm.files import read_json, write_json
from domainlm.model.decode import SamplingParams, complete, stream
from domainlm.model.load import load_model, load_tokenizer
from domainlm.recipe import load_recipe
from domainlm.tokenizer.special import EOS_ID
from domainlm.tokenizer.templates import BUILTIN, Template, chat_template, load_template

PROMPTS = ["The function returns", "Return the"]
MESSAGES = [{"role": "user", "content": "What does the function return?"}]
# max |logits(tool) - logits(ours)| / max |logits(ours)| on the same folder: both compute in
# float32 from the same stored weights, so only the order of additions differs; a quantized
# folder is dequantized by each side in its own way.
HF_TOLERANCE = {"int8": 2e-2, "int4": 5e-2}
HF_DEFAULT_TOLERANCE = 1e-3
# |bits per byte in llama.cpp / ours on the same file - 1|: llama.cpp also rounds activations
# (to 8 bits for the quantized matrix products), our decoder does not.
BPB_TOLERANCE = {"F16": 2e-3, "BF16": 5e-3, "Q8_0": 1e-2, "Q4_0": 3e-2}
GREEDY_TOKENS = 24
# A greedy token of llama.cpp that is not our argmax is accepted only where our two best logits
# are this close (relative to the largest |logit| there): a tie that the file's float16
# rounding may break either way (seen: 6.7757 against 6.7747 on a demo model).
GREEDY_TIE = 2e-3
THREADS = max(1, min(4, os.cpu_count() or 1))


class Report:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.sections: dict[str, list[dict]] = {"gguf": [], "hf": [], "peft": []}

    def check(self, ok: bool, what: str) -> bool:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            self.failures.append(what)
        return ok


def validation_documents(layout) -> list[str]:
    files = sorted(layout.corpus.glob("val-*.parquet"))
    if not files:
        raise UserError(f"no validation split under {layout.corpus}: run `make corpus` first")
    return [t for f in files for t in pq.read_table(f, columns=["text"])["text"].to_pylist()]


def scored_windows(sp, docs: list[str], n_ctx: int) -> list[tuple[list[int], int]]:
    """Each document as (</s> + its ids + </s>, cut to n_ctx tokens; bytes of the text its
    targets stand for): a document scored after the token pretraining put before it."""
    out = []
    for doc in docs:
        ids = [EOS_ID, *sp.encode(doc), EOS_ID][:n_ctx]
        text = sp.decode([i for i in ids[1:] if i != EOS_ID])
        out.append((ids, len(text.encode("utf-8"))))
    return out


def nats(logits: np.ndarray, ids: list[int]) -> float:
    logp = F.log_softmax(torch.from_numpy(np.asarray(logits, np.float32)), dim=-1)
    return -float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())


def bpb_ours(model, windows) -> float:
    with torch.no_grad():
        total = sum(nats(model(torch.tensor([ids]))[0][0, :-1].numpy(), ids) for ids, _ in windows)
    return total / math.log(2) / sum(b for _, b in windows)


def bpb_llama_cpp(llm, windows) -> float:
    total = 0.0
    for ids, _ in windows:
        llm.reset()
        llm.eval(ids)
        total += nats(llm.scores[: len(ids) - 1], ids)
    return total / math.log(2) / sum(b for _, b in windows)


def template_of(source: str) -> Template:
    builtin = next((name for name, text in BUILTIN.items() if text == source), None)
    return load_template(builtin) if builtin else Template("embedded", source)


# ------------------------------------------------------------------------------------- GGUF


def check_gguf(report: Report, path: Path, source: Path, docs: list[str],
               trained_template: str) -> None:
    import llama_cpp

    qtype = path.stem.split("-", 1)[1]
    print(f"gguf {path} ({qtype}, from {source})")
    ours_file = load_model(path)
    ours_model = load_model(source)
    sp, _ = load_tokenizer(source)
    n_ctx = ours_file.config.max_seq_len
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                          verbose=False, n_threads=THREADS)
    row: dict = {"file": str(path), "qtype": qtype, "source": str(source)}

    # Text -> ids as llama-cpp-python tokenizes every prompt (special tokens parsed, a BOS if
    # the file asks for one), on every validation document.
    wrong = [d for d in docs if llm.tokenize(d.encode(), add_bos=True, special=True)
             != sp.encode(d)]
    row["tokenization"] = {"docs": len(docs), "mismatches": len(wrong)}
    report.check(not wrong, f"{path.name}: llama.cpp's ids equal SentencePiece's on "
                 f"{len(docs) - len(wrong)}/{len(docs)} validation documents")

    windows = scored_windows(sp, docs, n_ctx)
    theirs, ours = bpb_llama_cpp(llm, windows), bpb_ours(ours_file, windows)
    src = bpb_ours(ours_model, windows)
    row["bits_per_byte"] = {"llama_cpp": round(theirs, 4), "ours_file": round(ours, 4),
                            "ours_model_fp32": round(src, 4),
                            "tokens": sum(len(w) - 1 for w, _ in windows)}
    report.check(abs(theirs / ours - 1) <= BPB_TOLERANCE[qtype],
                 f"{path.name}: bits/byte llama.cpp {theirs:.4f} vs ours on the file "
                 f"{ours:.4f} (the fp32 model {src:.4f})")

    # llama.cpp ends every generation at its end-of-generation tokens: eos, and "<|end|>",
    # which it recognizes by its spelling; ours ends there when told to (a stop string).
    vocab = llm._model.vocab
    eog = [i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)]
    row["end_of_generation"] = [sp.id_to_piece(i) for i in eog]
    stops = [sp.id_to_piece(i) for i in eog if i != EOS_ID]
    if qtype == "F16":
        prompts = PROMPTS + [d[:60] for d in docs[:4]]
        same = 0
        for p in prompts:
            # Compared as ids: a continuation that stops inside a UTF-8 character made of
            # byte pieces is text that each side shows its own way ("\ufffd" or nothing).
            ours_stream = stream(ours_model, sp, sp.encode(p),
                                 SamplingParams(GREEDY_TOKENS, stop=stops))
            "".join(ours_stream)
            want = ours_stream.token_ids
            got: list[int] = []
            for t in llm.generate(sp.encode(p), top_k=1, temp=0.0, repeat_penalty=1.0):
                got.append(int(t))
                if t in eog or len(got) == GREEDY_TOKENS:
                    break
            ties = [] if got == want else greedy_ties(ours_model, sp.encode(p), got)
            same += report.check(ties is not None, f"{path.name}: greedy continuation of {p!r}: "
                                 f"llama.cpp {sp.decode(got)!r}, ours {sp.decode(want)!r}"
                                 + (f" (equal up to near-ties at tokens {ties})" if ties else ""))
        row["greedy"] = {"prompts": len(prompts), "equal": same}

    source_template = llm.metadata.get("tokenizer.chat_template")
    report.check(source_template == trained_template,
                 f"{path.name}: carries the chat template fine-tuning used")
    if source_template:
        template = template_of(source_template)
        prompt = template.render(MESSAGES, add_generation_prompt=True)
        chat = llm.create_chat_completion(MESSAGES, max_tokens=GREEDY_TOKENS, temperature=0.0,
                                          repeat_penalty=1.0)
        reply = chat["choices"][0]["message"]["content"]
        report.check(chat["usage"]["prompt_tokens"] == len(sp.encode(prompt)),
                     f"{path.name}: chat prompt rendered by llama-cpp-python = ours "
                     f"({chat['usage']['prompt_tokens']} tokens)")
        row["chat"] = {"reply": reply}
        if qtype == "F16":
            want = complete(ours_model, sp, sp.encode(prompt),
                            SamplingParams(GREEDY_TOKENS,
                                           stop=[t for t in [template.stop, *stops] if t])).text
            # Bytes that do not form UTF-8 (a reply cut inside a character made of byte
            # pieces): SentencePiece shows U+FFFD, llama-cpp-python drops them.
            report.check(reply == want.replace("\ufffd", ""),
                         f"{path.name}: chat reply llama.cpp {reply!r}, ours {want!r}")
    llm.close()
    report.sections["gguf"].append(row)


def greedy_ties(model, prompt: list[int], got: list[int]) -> list[int] | None:
    """Where llama.cpp's greedy tokens `got` after `prompt` are not our argmax on the same
    prefix: the positions, if each is within GREEDY_TIE of our best logit there (a near-tie);
    None if any is not (a different model)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + got]))[0][0, len(prompt) - 1 : -1].float()
    best = logits.max(-1).values
    chosen = logits.gather(1, torch.tensor(got)[:, None]).squeeze(1)
    scale = logits.abs().max(-1).values.clamp(min=1e-6)
    gap = (best - chosen) / scale
    if bool((gap > GREEDY_TIE).any()):
        return None
    return [int(i) for i in (gap > 0).nonzero().flatten()]


# ------------------------------------------------------------------------------ transformers


def logits_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def check_hf(report: Report, folder: Path, fmt: str, docs: list[str]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"transformers {folder}")
    ours = load_model(folder)
    sp, tok_folder = load_tokenizer(folder)
    row: dict = {"folder": str(folder), "format": fmt}
    try:
        hf = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    except Exception as e:  # noqa: BLE001 - any refusal is the finding
        report.check(False, f"{folder}: transformers cannot load it ({type(e).__name__}: {e})")
        report.sections["hf"].append({**row, "error": str(e)})
        return
    n = min(128, ours.config.max_seq_len)
    windows = [[EOS_ID, *sp.encode(d)][:n] for d in docs[:4]]
    with torch.no_grad():
        err = max(logits_error(hf(torch.tensor([w])).logits[0], ours(torch.tensor([w]))[0][0])
                  for w in windows)
    tol = HF_TOLERANCE.get(fmt, HF_DEFAULT_TOLERANCE)
    row["logits_error"] = err
    report.check(err <= tol, f"{folder}: transformers' logits vs ours {err:.2e} (<= {tol})")

    tok = AutoTokenizer.from_pretrained(tok_folder)
    wrong = sum(tok(d)["input_ids"] != sp.encode(d) for d in docs)
    report.check(not wrong, f"{folder}: transformers' tokenizer ids equal SentencePiece's on "
                 f"{len(docs) - wrong}/{len(docs)} validation documents")
    if tok.chat_template:
        got = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
        want = chat_template(tok_folder).render(MESSAGES, add_generation_prompt=True)
        report.check(got == want, f"{folder}: apply_chat_template renders our prompt")
    else:
        report.check(False, f"{folder}: no chat template (transformers' apply_chat_template "
                     "raises)")

    prompt = torch.tensor([sp.encode(PROMPTS[0])])
    with torch.no_grad():
        out = hf.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=EOS_ID,
                          pad_token_id=EOS_ID)
    text = sp.decode(out[0, prompt.size(1):].tolist())
    want = complete(ours, sp, prompt[0].tolist(), SamplingParams(16)).text
    row["generate"] = text
    if fmt in HF_TOLERANCE:  # quantized: the rounding may rightly change a near tie
        print(f"  info transformers generates {text!r} (ours {want!r})")
    else:
        report.check(text == want, f"{folder}: transformers generates {text!r}, ours {want!r}")
    report.sections["hf"].append(row)


def check_peft(report: Report, adapter: Path, docs: list[str]) -> None:
    from peft import AutoPeftModelForCausalLM

    print(f"peft {adapter}")
    ours = load_model(adapter)
    sp, _ = load_tokenizer(adapter)
    here, where = os.getcwd(), adapter.resolve()
    with tempfile.TemporaryDirectory() as elsewhere:
        os.chdir(elsewhere)  # a relative base path would resolve against the wrong folder
        try:
            model = AutoPeftModelForCausalLM.from_pretrained(where).eval()
        except Exception as e:  # noqa: BLE001 - any refusal is the finding
            report.check(False, f"{adapter}: peft cannot load it from another working "
                         f"directory ({type(e).__name__}: {e})")
            report.sections["peft"].append({"adapter": str(adapter), "error": str(e)})
            return
        finally:
            os.chdir(here)
    windows = [[EOS_ID, *sp.encode(d)][:128] for d in docs[:4]]
    with torch.no_grad():  # the last len(w) positions: prompt tuning prepends virtual tokens
        err = max(logits_error(model(input_ids=torch.tensor([w])).logits[0, -len(w):].float(),
                               ours(torch.tensor([w]))[0][0, -len(w):]) for w in windows)
    report.check(err <= HF_DEFAULT_TOLERANCE,
                 f"{adapter}: peft's logits vs ours {err:.2e} (<= {HF_DEFAULT_TOLERANCE})")
    report.sections["peft"].append({"adapter": str(adapter), "logits_error": err})


# ------------------------------------------------------------------------------------ the run


def adapters(layout) -> list[Path]:
    """Every PEFT adapter folder of the run (fine-tuning's and alignment's)."""
    found = []
    for root in (layout.sft, layout.align):
        for config in sorted(root.glob("*/model/adapter_config.json")):
            if read_json(config).get("peft_type") in ("LORA", "PROMPT_TUNING"):
                found.append(config.parent)
    return found


def print_bpb_table(rows: list[dict]) -> None:
    """The GGUF figures as the markdown table docs/quantize.md shows."""
    print("| model | GGUF type | llama.cpp bits/byte | ours, same file | ours, fp32 model |")
    print("|---|---|---|---|---|")
    for r in rows:
        b = r["bits_per_byte"]
        print(f"| {Path(r['file']).parent.name} | {r['qtype']} | {b['llama_cpp']:.4f} | "
              f"{b['ours_file']:.4f} | {b['ours_model_fp32']:.4f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/demo.yaml")
    parser.add_argument("--skip-server", action="store_true",
                        help="leave out scripts/check_server.py")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    report = Report()
    try:
        recipe = load_recipe(args.recipe)
        layout = recipe.layout
        if not (layout.export / "report.md").is_file():
            raise UserError(f"{layout.export} has no export: run `make quantize "
                            f"RECIPE={args.recipe}` first")
        docs = validation_documents(layout)
        models = layout.models()
        ggufs = sorted(layout.export.glob("*/model-*.gguf"))
        if not ggufs:
            raise UserError(f"no GGUF under {layout.export}: add gguf-* to export.formats")
        for path in ggufs:
            if path.parent.name not in models:
                raise UserError(f"{path} was exported from {path.parent.name}, which this run "
                                f"no longer has: run `make quantize RECIPE={args.recipe}` again")
            source = models[path.parent.name]
            config = source / "tokenizer_config.json"
            trained = (read_json(config).get("chat_template") if config.is_file() else None) or \
                load_template(recipe.finetune.template).source
            check_gguf(report, path, source, docs, trained)
        folders = [(p, "model") for p in models.values()]
        folders += [(p, p.name) for p in sorted(layout.export.glob("*/*"))
                    if (p / "config.json").is_file()]
        for folder, fmt in folders:
            check_hf(report, folder, fmt, docs)
        for adapter in adapters(layout):
            check_peft(report, adapter, docs)
        if not args.skip_server:
            print(f"server: scripts/check_server.py --recipe {args.recipe}")
            rc = subprocess.call([sys.executable, str(Path(__file__).with_name(
                "check_server.py")), "--recipe", args.recipe])
            report.check(rc == 0, f"scripts/check_server.py exited {rc}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_bpb_table(report.sections["gguf"])
    out = layout.interop_report
    write_json(out, {**report.sections, "failures": report.failures})
    print(f"check_interop: {len(report.failures)} failure(s); wrote {out}")
    for f in report.failures:
        print(f"FAIL {f}", file=sys.stderr)
    return 1 if report.failures else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
