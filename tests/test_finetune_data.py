"""Instruction data for `make finetune`: reading and quarantine, prompt templates (and that
transformers renders them as we do), prompt masking, the demo set, mixing, SFT batches."""

from __future__ import annotations

import gzip
import json
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
import transformers
import zstandard
from builders import sentencepiece_model, small_config
from conftest import write_jsonl

from domainlm.corpus.python_docs import stdlib_dir
from domainlm.errors import UserError
from domainlm.finetune import records as R
from domainlm.finetune.demo import TASKS, first_paragraph, python_docs_examples
from domainlm.finetune.records import Example, count, read_instructions, split_heldout
from domainlm.finetune.sft_data import (
    PROMPT_TOO_LONG,
    PromptTooLong,
    SFTData,
    collate,
    encode_example,
    encode_examples,
    mix,
    steps_for,
)
from domainlm.model.llama import Llama
from domainlm.tokenizer.templates import BUILTIN, Template, load_template

IGNORE = -100
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What does `os.path.join` do?"},
    {"role": "assistant", "content": "Join two or more path components."},
]
MULTI_TURN = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Name a module."},
    {"role": "assistant", "content": "`json`"},
]


def user_assistant(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


@pytest.fixture(scope="module")
def sp(tmp_path_factory) -> spm.SentencePieceProcessor:
    model = sentencepiece_model(tmp_path_factory.mktemp("sp"))
    return spm.SentencePieceProcessor(model_file=str(model))


# ------------------------------------------------------------------------------ reading


def test_every_shape_is_read(tmp_path):
    rows = [
        {"instruction": "Add the numbers.", "input": "2, 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"prompt": "Capital of France?", "completion": " Paris"},
        {"messages": CONVERSATION},
        {"messages": [{"role": "system", "content": ""}, *MULTI_TURN]},
        {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]},
    ]
    want = [
        user_assistant("Add the numbers.\n\n2, 3", "5"),
        user_assistant("Say hi.", "hi"),
        user_assistant("Capital of France?", " Paris"),
        CONVERSATION,
        MULTI_TURN,  # an empty system message is dropped
        user_assistant("Q?", "A."),
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    quarantine: list[dict] = []
    got = read_instructions(path, "qa", quarantine)
    assert quarantine == []
    assert [e.messages for e in got] == want
    assert [e.origin for e in got] == [f"{path}:{i}" for i in range(1, 7)]
    assert {e.task for e in got} == {"qa"}

    gz = tmp_path / "mixed.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert [e.messages for e in read_instructions(gz, "qa", [])] == want
    zst = tmp_path / "mixed.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(path.read_bytes()))
    assert [e.messages for e in read_instructions(zst, "qa", [])] == want


def test_every_bad_line_is_quarantined_with_its_line_and_reason(tmp_path):
    lines = [
        json.dumps({"instruction": "Good one.", "output": "yes"}),  # 1
        '{"instruction": "cut", "output": ',  # 2
        '{"instruction": "caf\xe9", "output": "x"}',  # 3: written as Latin-1 below
        json.dumps({"instruction": "No output here."}),  # 4
        json.dumps({"instruction": "   ", "output": "x"}),  # 5
        json.dumps({"messages": user_assistant("q", "a")[:1]}),  # 6: ends with the user
        json.dumps({"messages": [{"role": "human", "content": "q"}, CONVERSATION[2]]}),  # 7
        json.dumps({"messages": [{"role": "user", "content": 5}, CONVERSATION[2]]}),  # 8
        json.dumps({"text": "a plain document"}),  # 9
        "[1, 2]",  # 10
        "",  # 11: blank lines are not records
        json.dumps({"messages": MULTI_TURN}),  # 12
        json.dumps({"messages": [MULTI_TURN[1], MULTI_TURN[0]]}),  # 13: assistant first
        json.dumps({"prompt": "p", "completion": None}),  # 14
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join(line.encode("latin-1") + b"\n" for line in lines))
    quarantine: list[dict] = []
    got = read_instructions(path, "bad", quarantine)

    assert [e.origin for e in got] == [f"{path}:1", f"{path}:12"]
    assert [(q["origin"], q["reason"]) for q in quarantine] == [
        (f"{path}:2", R.INVALID_JSON),
        (f"{path}:3", R.INVALID_UTF8),
        (f"{path}:4", R.MISSING_FIELD),
        (f"{path}:5", R.EMPTY_FIELD),
        (f"{path}:6", R.BAD_ORDER),
        (f"{path}:7", R.BAD_ROLE),
        (f"{path}:8", R.NOT_STRING),
        (f"{path}:9", R.UNKNOWN_SHAPE),
        (f"{path}:10", R.NOT_AN_OBJECT),
        (f"{path}:13", R.BAD_ORDER),
        (f"{path}:14", R.MISSING_FIELD),
    ]
    details = {q["origin"].rsplit(":", 1)[1]: q["detail"] for q in quarantine}
    assert "`output` is missing" in details["4"]
    assert "`instruction`" in details["5"]
    assert "end with an assistant message" in details["6"]
    assert "'human'" in details["7"] and "'user'" in details["7"]  # names the fix
    assert "`messages[0].content` must be a string" in details["8"]
    assert "'text'" in details["9"]
    assert all(q["task"] == "bad" for q in quarantine)

    c = count(got, quarantine)
    assert c["read"] == 13 == c["kept"] + sum(c["quarantined"].values())
    assert c["kept"] == 2
    assert c["quarantined"][R.BAD_ORDER] == 2 and c["quarantined"][R.MISSING_FIELD] == 2


def test_unusable_files_are_user_errors_naming_the_key(tmp_path):
    key = "finetune.data[2].path"
    with pytest.raises(UserError, match=r"finetune\.data\[2\]\.path: .* does not exist"):
        read_instructions(tmp_path / "nope.jsonl", "t", [], key=key)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match=r"finetune\.data\[2\]\.path: .* is empty"):
        read_instructions(tmp_path / "empty.jsonl", "t", [], key=key)
    (tmp_path / "array.json").write_text("[]")
    with pytest.raises(UserError, match=r"finetune\.data\[2\]\.path: .*jq -c"):
        read_instructions(tmp_path / "array.json", "t", [], key=key)
    (tmp_path / "utf16.jsonl").write_bytes('{"prompt": "p", "completion": "c"}\n'.encode("utf-16"))
    with pytest.raises(UserError, match=r"finetune\.data\[2\]\.path: .*UTF-16.*iconv"):
        read_instructions(tmp_path / "utf16.jsonl", "t", [], key=key)


def test_heldout_split_by_content_is_stable_and_keeps_copies_together():
    examples = [Example("t", user_assistant(f"q{i}", f"a{i}"), f"f:{i}") for i in range(400)]
    examples += [Example("t", e.messages, "other:1") for e in examples[:50]]  # exact copies
    train, held = split_heldout(examples, 0.1)
    assert len(train) + len(held) == len(examples)
    assert 20 < len(held) < 70
    assert split_heldout(list(reversed(examples)), 0.1)[1] == list(reversed(held))
    held_keys = {e.content_key() for e in held}
    assert not any(e.content_key() in held_keys for e in train)


# ------------------------------------------------------------------------------ templates


def test_builtin_templates_render_the_expected_text():
    expected = {
        "chat": "<|system|>\nBe brief.<|end|>\n<|user|>\nWhat does `os.path.join` do?<|end|>\n"
        "<|assistant|>\nJoin two or more path components.<|end|>",
        "alpaca": "Be brief.\n\n### Instruction:\nWhat does `os.path.join` do?\n\n"
        "### Response:\nJoin two or more path components.",
        "plain": "Be brief.\nWhat does `os.path.join` do?\nJoin two or more path components.",
    }
    prompts = {"chat": "<|assistant|>\n", "alpaca": "\n\n### Response:\n", "plain": "\n"}
    for name, text in expected.items():
        t = load_template(name)
        assert t.render(CONVERSATION) == text
        prompt, completion = t.prompt_and_completion(CONVERSATION)
        assert prompt + completion == text
        assert prompt.endswith(prompts[name])
        assert completion.startswith("Join two or more path components.")
        assert prompt == t.render(CONVERSATION[:-1], add_generation_prompt=True)
    chat = load_template("chat")
    assert chat.render(MULTI_TURN[:1], add_generation_prompt=True) == (
        "<|user|>\nHi<|end|>\n<|assistant|>\n"
    )
    assert chat.prompt_and_completion(MULTI_TURN)[1] == "`json`<|end|>"
    assert chat.stop == "<|end|>"


def test_custom_template_file(tmp_path):
    path = tmp_path / "zephyr.jinja"
    path.write_text(
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}\n"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}\n"
    )
    t = load_template(str(path))
    prompt, completion = t.prompt_and_completion(user_assistant("Q", "A"))
    assert prompt == "<|user|>\nQ<|end|>\n<|assistant|>\n"
    assert completion == "A<|end|>\n"
    assert t.source == path.read_text()


def test_a_template_that_cannot_mask_the_prompt_is_refused(tmp_path):
    # The generation prompt says "Answer:", the conversation writes "Response:".
    source = (
        "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
        "{% else %}Response: {{ m['content'] }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Answer: {% endif %}"
    )
    with pytest.raises(UserError, match="template odd: .*does not start with the prompt"):
        Template("odd", source).prompt_and_completion(user_assistant("x", "y"))
    path = tmp_path / "odd.jinja"
    path.write_text(source)
    with pytest.raises(UserError, match=r"odd\.jinja.*cannot mask the prompt"):
        load_template(str(path))


def test_template_name_errors():
    with pytest.raises(UserError, match=r"unknown template 'chatt'; did you mean 'chat'\?"):
        load_template("chatt")
    with pytest.raises(UserError, match="chat, alpaca, plain"):
        load_template("llama3")
    with pytest.raises(UserError, match="is not a file"):
        load_template("templates/missing.jinja")
    with pytest.raises(UserError, match="line 1"):
        Template("broken", "{% for m in messages %}")


def test_transformers_renders_our_templates_exactly(sp, tmp_path):
    from domainlm.tokenizer.hf_files import write_tokenizer_files

    chat = load_template("chat")
    model = Path(tmp_path / "tokenizer.model")
    model.write_bytes(sp.serialized_model_proto())
    write_tokenizer_files(model, tmp_path / "hf", chat_template=chat.source)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    conversations = [CONVERSATION, MULTI_TURN, user_assistant("a\n\nb", "  c  ")]
    for name in BUILTIN:
        ours = load_template(name)
        source = None if name == "chat" else ours.source  # chat: from tokenizer_config.json
        for conv in conversations:
            for msgs, gen in ((conv, False), (conv[:-1], True)):
                theirs = tok.apply_chat_template(
                    msgs, tokenize=False, add_generation_prompt=gen, chat_template=source
                )
                assert theirs == ours.render(msgs, add_generation_prompt=gen), (name, msgs, gen)
    # A prompt formatted by transformers encodes to the ids the model was fine-tuned on.
    prompt, _ = chat.prompt_and_completion(CONVERSATION)
    assert tok(prompt, add_special_tokens=False)["input_ids"] == sp.encode(prompt)


# ------------------------------------------------------------------------------ masking


def test_prompt_tokens_are_masked_and_the_completion_and_eos_are_learnt(sp):
    chat = load_template("chat")
    example = Example("t", CONVERSATION, "hand:1")
    ids, labels = encode_example(sp, chat, example, max_seq_len=200)
    prompt, completion = chat.prompt_and_completion(CONVERSATION)
    p, c = sp.encode(prompt), sp.encode(completion)
    assert ids == p + c + [2]
    assert labels == [IGNORE] * len(p) + c + [2]
    assert sp.decode(ids[:-1]) == chat.render(CONVERSATION)

    x, y = collate([SFTData([(ids, labels)], [], micro_batch=1, grad_accum=1, total_steps=1,
                            seed=0, max_seq_len=200).train_set[0]], pad_id=3)
    assert x[0].tolist() == ids[:-1]
    # After the shift, y[t] is ignored exactly where the next token is a prompt token.
    assert [v == IGNORE for v in y[0].tolist()] == [t + 1 < len(p) for t in range(len(ids) - 1)]
    assert y[0, len(p) - 1 :].tolist() == c + [2]


def test_the_loss_does_not_depend_on_the_prompt_logits(sp):
    chat = load_template("chat")
    ids, labels = encode_example(sp, chat, Example("t", CONVERSATION, "hand:1"), 200)
    n_prompt = labels.count(IGNORE)
    x = torch.tensor([ids[:-1]])
    y = torch.tensor([labels[1:]])
    torch.manual_seed(0)
    model = Llama(small_config(vocab_size=sp.get_piece_size(), max_seq_len=256)).eval()
    with torch.no_grad():
        logits, model_loss = model(x, y)
    vocab = logits.size(-1)

    def loss(lg: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(lg.reshape(-1, vocab), y.reshape(-1), ignore_index=IGNORE)

    base = loss(logits)
    assert torch.allclose(model_loss, base)
    perturbed = logits.clone()
    # Positions 0 .. n_prompt-2 predict prompt tokens: anything there must not count.
    perturbed[0, : n_prompt - 1] = torch.randn(n_prompt - 1, vocab) * 100
    assert torch.equal(loss(perturbed), base)
    # Not vacuous: the position that predicts the first reply token does count.
    perturbed[0, n_prompt - 1] += torch.randn(vocab) * 100
    assert not torch.allclose(loss(perturbed), base)


def test_truncation_cuts_the_completion_and_a_prompt_that_does_not_fit_is_quarantined(sp):
    chat = load_template("chat")
    long = Example("t", user_assistant("Describe.", "word " * 100), "f:1")
    prompt, completion = chat.prompt_and_completion(long.messages)
    p, c = sp.encode(prompt), sp.encode(completion)
    ids, labels = encode_example(sp, chat, long, max_seq_len=len(p) + 9)
    assert ids == p + c[:10] and labels == [IGNORE] * len(p) + c[:10]  # no EOS: it was cut

    ids, labels = encode_example(sp, chat, long, max_seq_len=len(p))  # one reply token fits
    assert ids == p + c[:1] and sum(v != IGNORE for v in labels) == 1

    quarantine: list[dict] = []
    assert encode_example(sp, chat, long, len(p) - 1, quarantine) is None
    assert [(q["origin"], q["reason"]) for q in quarantine] == [("f:1", PROMPT_TOO_LONG)]
    assert "finetune.max_seq_len" in quarantine[0]["detail"]
    with pytest.raises(PromptTooLong) as err:
        encode_example(sp, chat, long, len(p) - 1)
    assert isinstance(err.value, UserError) and err.value.entry["reason"] == PROMPT_TOO_LONG

    short = Example("t", user_assistant("Hi", "Hello."), "f:2")
    batch: list[dict] = []
    got = encode_examples(sp, chat, [short, long, short], len(p) - 1, batch)
    assert got == [encode_example(sp, chat, short, len(p) - 1)] * 2
    assert [q["origin"] for q in batch] == ["f:1"]


# ------------------------------------------------------------------------------ demo set


@pytest.fixture(scope="module")
def demo_set():
    return python_docs_examples(heldout_fraction=0.1, max_train=2000, max_heldout=200, seed=0)


def _module(e: Example) -> str:
    return e.origin.split(":", 1)[1].rsplit(".", 1)[0]  # top-level names hold no dot


@pytest.mark.slow
def test_demo_set_is_deterministic_split_by_module_and_capped(demo_set):
    train, held = demo_set
    assert python_docs_examples(0.1, 2000, 200, 0) == (train, held)
    assert 0 < len(train) <= 2000 and 0 < len(held) <= 200
    assert not {_module(e) for e in train} & {_module(e) for e in held}
    for split in (train, held):
        assert {e.task for e in split} == {f"python-docs/{t}" for t in TASKS}
    for e in train + held:
        (q, a) = (m["content"] for m in e.messages)
        assert [m["role"] for m in e.messages] == ["user", "assistant"]
        assert q.strip() and a.strip() and len(a) <= 300
        name = e.origin.split(":", 1)[1]
        assert f"`{name}`" in q or f"`{name.rsplit('.', 1)[1]}`" in q
        if e.task.endswith("/module"):
            assert a == f"`{_module(e)}`"
    per_task = Counter(e.task for e in train)
    assert min(per_task.values()) > 300  # all three tasks well represented


def test_demo_caps_and_fraction_on_a_small_library(tmp_path):
    root = tmp_path / "lib"
    root.mkdir()
    for name in ("textwrap", "shlex", "fnmatch", "glob", "colorsys", "difflib", "heapq",
                 "bisect", "calendar", "string", "base64", "statistics"):
        shutil.copy(stdlib_dir() / f"{name}.py", root / f"{name}.py")
    train, held = python_docs_examples(0.3, 40, 6, seed=1, root=root)
    assert len(train) == 40 and len(held) == 6
    assert python_docs_examples(0.3, 40, 6, seed=1, root=root) == (train, held)
    assert python_docs_examples(0.3, 40, 6, seed=2, root=root)[0] != train  # the seed samples
    all_train, none_held = python_docs_examples(0.0, 10**6, 10**6, root=root)
    assert none_held == [] and len(all_train) > 100


def test_first_paragraph():
    assert first_paragraph("Return the sum.\n\nMore text.") is None  # under 20 characters
    assert first_paragraph("Return the sum of two numbers.\n\nMore.") == (
        "Return the sum of two numbers."
    )
    assert first_paragraph(">>> f(1)\n2") is None
    assert first_paragraph("") is None
    long = "Split the text, e.g. at commas. " + "This sentence goes on and on. " * 12
    cut = first_paragraph(long)
    assert cut is not None and len(cut) <= 300 and cut.endswith("on and on.")
    assert first_paragraph("x" * 400) is None  # no sentence end to cut at


# ------------------------------------------------------------------------------ mixing


def test_mix_reaches_the_weighted_shares():
    tasks = {"a": [f"a{i}" for i in range(10)], "b": [f"b{i}" for i in range(30)]}
    out = mix(tasks, {"a": 3.0, "b": 1.0}, seed=0)
    n = Counter(x[0] for x in out)
    assert n == {"a": 30, "b": 10}  # of the 40 examples, 3/4 and 1/4
    assert Counter(x for x in out if x[0] == "a") == {x: 3 for x in tasks["a"]}  # up-sampled
    assert len(set(x for x in out if x[0] == "b")) == 10  # down-sampled, no repeats
    assert mix(tasks, {"a": 3.0, "b": 1.0}, seed=0) == out
    assert mix(tasks, {"a": 3.0, "b": 1.0}, seed=1) != out

    uneven = {"a": list("abcdefg"), "b": list("hijkl"), "c": list("mno")}
    counts = Counter()
    for x in mix(uneven, {"a": 1, "b": 2, "c": 1}, seed=0):
        counts["a" if x in "abcdefg" else "b" if x in "hijkl" else "c"] += 1
    assert sum(counts.values()) == 15
    for t, share in (("a", 0.25), ("b", 0.5), ("c", 0.25)):
        assert abs(counts[t] - 15 * share) < 1


def test_mix_without_weights_keeps_every_example_once():
    tasks = {"a": [1, 2, 3], "b": [4, 5]}
    assert mix(tasks, {"a": None, "b": None}, seed=0) == [1, 2, 3, 4, 5]
    assert mix(tasks, {}, seed=0) == [1, 2, 3, 4, 5]
    with pytest.raises(UserError, match="every source or to none"):
        mix(tasks, {"a": 1.0, "b": None}, seed=0)
    with pytest.raises(UserError, match="'b' has weight"):
        mix({"a": [1], "b": []}, {"a": 1.0, "b": 1.0}, seed=0)


# ------------------------------------------------------------------------------ SFTData


def _items(lengths: list[int], prompt: int = 2) -> list[tuple[list[int], list[int]]]:
    out = []
    for k, n in enumerate(lengths):
        ids = [10 + k] * n
        out.append((ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def test_batches_are_shifted_and_padded_to_the_longest():
    items = _items([5, 9, 3])
    data = SFTData(items, [], micro_batch=3, grad_accum=1, total_steps=1, seed=0, max_seq_len=8)
    (x, y), = list(data.train_dataloader())
    order = next(iter(data.train_sampler()))
    assert x.shape == y.shape == (3, 8) and x.dtype == y.dtype == torch.long
    for row, i in enumerate(order):
        ids, labels = items[i]
        n = len(ids) - 1
        assert x[row, :n].tolist() == ids[:-1] and y[row, :n].tolist() == labels[1:]
        assert (x[row, n:] == 3).all() and (y[row, n:] == IGNORE).all()
    assert data.n_train == 3 and not data.has_val
    with pytest.raises(ValueError, match="over max_seq_len"):
        SFTData(items, [], micro_batch=1, grad_accum=1, total_steps=1, seed=0, max_seq_len=7)


def test_packing_respects_the_length_and_keeps_every_label():
    items = _items([5, 9, 3, 7, 4, 6, 2, 8, 5, 3])
    packed = SFTData(items, [], micro_batch=2, grad_accum=1, total_steps=1, seed=0,
                     max_seq_len=16, packing=True)
    seqs = [packed.train_set[i] for i in range(packed.n_train)]
    assert packed.n_train < len(items)
    assert all(len(x) <= 16 for x, _ in seqs)
    targets = Counter(v for _, y in seqs for v in y.tolist() if v != IGNORE)
    # Unpacked, example k trains labels[1:]; its labels[0] is a prompt token in every case.
    assert targets == Counter(v for _, lab in items for v in lab[1:] if v != IGNORE)
    assert sum(len(x) + 1 for x, _ in seqs) == sum(len(ids) for ids, _ in items)


def test_a_resumed_loader_gives_the_tail_of_the_full_order():
    items = _items([3 + i % 5 for i in range(23)])
    data = SFTData(items, _items([4, 6]), micro_batch=2, grad_accum=2, total_steps=6, seed=3,
                   max_seq_len=8)
    data.trainer = SimpleNamespace(global_step=0, world_size=1, global_rank=0)
    full = list(data.train_dataloader())
    assert len(full) == 12
    data.trainer.global_step = 4
    tail = list(data.train_dataloader())
    assert len(tail) == 4
    for (x, y), (x2, y2) in zip(full[8:], tail, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert data.has_val and len(list(data.val_dataloader())) == 1


def test_steps_for():
    assert steps_for(2000, 2.0, 16, 1, 1) == 250
    assert steps_for(10, 1.0, 16, 1, 1) == 1
    assert steps_for(33, 1.0, 4, 2, 2) == 3
    assert steps_for(0, 2.0, 4, 1, 1) == 1
