"""Our DPO and IPO losses equal what TRL's DPOTrainer computes on the same models and batch:
two tiny decoders exported to Hugging Face folders (policy and reference), loaded in
transformers for TRL and with our loader for us, TRL's own tokenized and collated batch."""

from __future__ import annotations

import pytest
import torch
from builders import sentencepiece_model, tiny_model
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from domainlm.align.modules import dpo_measures, reference_logps
from domainlm.model.hf import save_hf_folder
from domainlm.model.llama import IGNORE_INDEX
from domainlm.model.load import load_model

ROWS = [
    {"prompt": "The report of the day", "chosen": " was signed by the client.",
     "rejected": " is late"},
    {"prompt": "A ledger", "chosen": " lists every account.", "rejected": " no."},
    {"prompt": "Which market opens", "chosen": " first on Monday?",
     "rejected": " the bond market, then the stock market"},
    {"prompt": [{"role": "user", "content": "Sum the invoices."}],
     "chosen": [{"role": "assistant", "content": "The total is 42."}],
     "rejected": [{"role": "assistant", "content": "No."}]},
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl")
    tok = sentencepiece_model(root / "tok")
    save_hf_folder(tiny_model(0), tok, root / "policy", chat_template=CHAT)
    save_hf_folder(tiny_model(1), tok, root / "reference", chat_template=CHAT)
    return root


CHAT = ("{% for m in messages %}{{ '<|' ~ m['role'] ~ '|>\\n' ~ m['content'] ~ '<|end|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


def trl_batch_and_loss(root, rows, loss_type: str | list, beta: float, weights=None):
    tokenizer = AutoTokenizer.from_pretrained(root / "policy")
    args = DPOConfig(
        output_dir=str(root / "out"), per_device_train_batch_size=len(rows),
        beta=beta, loss_type=[loss_type] if isinstance(loss_type, str) else loss_type,
        loss_weights=weights, report_to=[], use_cpu=True,
        bf16=False,  # TRL would run its reference under bf16 autocast; compare in fp32
        dataloader_num_workers=0, seed=0,
    )
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(root / "policy"),
        ref_model=AutoModelForCausalLM.from_pretrained(root / "reference"),
        args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return batch, float(loss)


def ours(root, batch, kind: str, beta: float, sft_weight: float = 0.0) -> float:
    ids = batch["input_ids"].cpu()
    labels = ids.masked_fill(batch["completion_mask"].cpu() == 0, IGNORE_INDEX)
    ours_batch = {"ids": ids, "labels": labels}
    ref = reference_logps(load_model(root / "reference"), [ours_batch])
    with torch.no_grad():
        return float(dpo_measures(load_model(root / "policy"), {**ours_batch, "ref": ref}, beta,
                                  kind, sft_weight)["loss"])


@pytest.mark.parametrize("rows", [ROWS[:3], ROWS[3:]], ids=["text", "chat"])
def test_dpo_loss_equals_trl(folders, rows):
    batch, expected = trl_batch_and_loss(folders, rows, "sigmoid", beta=0.1)
    assert batch["input_ids"].size(0) == 2 * len(rows)
    got = ours(folders, batch, "sigmoid", beta=0.1)
    assert abs(got - expected) < 1e-5, (got, expected)
    # Not a coincidence of log 2 (policy equal to reference): the models differ.
    assert abs(expected - 0.6931) > 1e-3


def test_ipo_loss_equals_trl(folders):
    batch, expected = trl_batch_and_loss(folders, ROWS[:3], "ipo", beta=0.5)
    got = ours(folders, batch, "ipo", beta=0.5)
    assert abs(got - expected) < 1e-5 * max(1.0, abs(expected)), (got, expected)


def test_dpo_with_the_chosen_nll_equals_trls_sigmoid_plus_sft(folders):
    batch, expected = trl_batch_and_loss(folders, ROWS[:3], ["sigmoid", "sft"], beta=0.1,
                                         weights=[1.0, 0.5])
    got = ours(folders, batch, "sigmoid", beta=0.1, sft_weight=0.5)
    assert abs(got - expected) < 1e-5 * max(1.0, abs(expected)), (got, expected)
    plain = ours(folders, batch, "sigmoid", beta=0.1)
    assert abs(got - plain) > 0.1  # the NLL term is there
