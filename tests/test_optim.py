"""Optimizer choices (AdamW, or Muon on the hidden matrices + AdamW), the WSD schedule's shape and
extension property, exact resume of Muon's state through Lightning checkpoints, and the recipe's
errors for these fields."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from domainlm.align.fit import train_config as align_train_config
from domainlm.errors import UserError
from domainlm.model.llama import Llama
from domainlm.recipe import RecipeError, TrainConfig, load_recipe
from domainlm.recipe.model import LlamaConfig
from domainlm.train import optim

HIDDEN = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def tiny(tie: bool = True) -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=64, n_layers=2, d_model=16, n_heads=2, n_kv_heads=2,
                             ffn_dim=32, max_seq_len=16, tie_embeddings=tie))


def names_of(model, params) -> set[str]:
    ids = {id(p): n for n, p in model.named_parameters()}
    return {ids[id(p)] for p in params}


# ----------------------------------------------------------------------------- grouping


@pytest.mark.parametrize("tie", [True, False])
def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(tie):
    model = tiny(tie)
    opt = optim.make_optimizer(model, TrainConfig(optimizer="muon"))
    assert isinstance(opt, optim.MuonAdamW)
    muon = names_of(model, [p for g in opt.muon.param_groups for p in g["params"]])
    adamw = names_of(model, [p for g in opt.adamw.param_groups for p in g["params"]])
    assert muon == {f"model.layers.{i}.{part}.{m}.weight" for i in range(2)
                    for part, ms in (("self_attn", HIDDEN & {"q_proj", "k_proj", "v_proj",
                                                               "o_proj"}),
                                     ("mlp", {"gate_proj", "up_proj", "down_proj"}))
                    for m in ms}
    assert "model.embed_tokens.weight" in adamw and "model.norm.weight" in adamw
    assert ("lm_head.weight" in adamw) == (not tie)
    assert not muon & adamw
    every = {n for n, _ in model.named_parameters()}
    assert muon | adamw == every  # nothing left out, a tied weight once
    # The optimizer's groups are the inner optimizers' own: one scheduler scales both.
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[0] == 0.02 and set(lrs[1:]) == {3e-4} and len(lrs) == (2 if tie else 3)


def test_adamw_default_keeps_one_optimizer_over_everything():
    model = tiny()
    opt = optim.make_optimizer(model, TrainConfig())
    assert type(opt) is torch.optim.AdamW
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_lora_factors_and_frozen_weights_never_go_to_muon():
    assert not optim.is_muon_param("model.layers.0.self_attn.q_proj.lora_A.weight",
                                   torch.zeros(4, 16))
    assert optim.is_muon_param("model.layers.0.self_attn.q_proj.weight", torch.zeros(16, 16))
    assert not optim.is_muon_param("model.layers.0.self_attn.q_proj.bias", torch.zeros(16))
    model = tiny()
    for n, p in model.named_parameters():
        p.requires_grad = "mlp" in n
    opt = optim.make_optimizer(model, TrainConfig(optimizer="muon"))
    muon = names_of(model, [p for g in opt.muon.param_groups for p in g["params"]])
    assert muon and all(".mlp." in n for n in muon)


def test_muon_adamw_state_round_trips_and_refuses_an_adamw_state():
    cfg = TrainConfig(optimizer="muon", schedule="wsd")
    model = tiny()
    opt = optim.make_optimizer(model, cfg)
    x = torch.randint(0, 64, (2, 16))
    for _ in range(2):
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
    state = opt.state_dict()
    assert set(state) == {"muon", "adamw"}
    assert any("momentum_buffer" in s for s in state["muon"]["state"].values())
    assert len(opt.state) == len(list(model.parameters()))  # both inner states, merged
    fresh = optim.make_optimizer(model, cfg)
    fresh.load_state_dict(state)
    a, b = opt.state_dict(), fresh.state_dict()
    for part in ("muon", "adamw"):
        for k, v in a[part]["state"].items():
            for name, t in v.items():
                assert torch.equal(torch.as_tensor(t), torch.as_tensor(b[part]["state"][k][name]))
    for group in fresh.param_groups:  # what a scheduler does: it must reach the inner groups
        group["lr"] = 0.5
    assert {g["lr"] for o in (fresh.muon, fresh.adamw) for g in o.param_groups} == {0.5}
    adamw = optim.make_optimizer(model, TrainConfig()).state_dict()
    with pytest.raises(ValueError, match="train.optimizer must stay"):
        fresh.load_state_dict(adamw)


# ----------------------------------------------------------------------------- schedule


def test_wsd_warms_up_stays_flat_and_decays_to_the_floor():
    cfg = TrainConfig(schedule="wsd", decay_fraction=0.25, min_lr_ratio=0.1)
    f = [optim.lr_factor(s, 200, 10, cfg) for s in range(200)]
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warmup
    assert optim.decay_start(cfg, 200, 10) == 150
    assert set(f[9:150]) == {1.0}  # flat at the peak
    decay = f[150:]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))  # strictly decaying
    assert decay[-1] == pytest.approx(0.1)  # ... to the floor at the last step
    assert decay[25] - decay[26] == pytest.approx(decay[1] - decay[2])  # linearly


def test_wsd_steps_before_the_decay_do_not_depend_on_the_length():
    """What lets a longer run reuse a shorter run's checkpoint from before its decay."""
    cfg = TrainConfig(schedule="wsd", decay_fraction=0.2)
    short, long = 100, 400
    start = optim.decay_start(cfg, short, 5)
    assert [optim.lr_factor(s, short, 5, cfg) for s in range(start)] == [
        optim.lr_factor(s, long, 5, cfg) for s in range(start)]
    cosine = dataclasses.replace(cfg, schedule="cosine")
    assert optim.lr_factor(50, short, 5, cosine) != optim.lr_factor(50, long, 5, cosine)


def test_scheduler_scales_muon_and_adamw_from_their_own_peaks():
    cfg = TrainConfig(optimizer="muon", schedule="wsd", lr=1e-3, muon_lr=0.05,
                      decay_fraction=0.5, min_lr_ratio=0.0)
    opt = optim.make_optimizer(tiny(), cfg)
    sched = LambdaLR(opt, lambda s: optim.lr_factor(s, 10, 2, cfg))
    assert [g["lr"] for g in opt.muon.param_groups] == [pytest.approx(0.025)]
    for _ in range(7):
        opt.step()
        sched.step()
    f = optim.lr_factor(7, 10, 2, cfg)
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.05 * f)
    assert opt.adamw.param_groups[0]["lr"] == pytest.approx(1e-3 * f)


# ----------------------------------------------------------------------------- recipe


def _recipe(tmp_path: Path, train: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text("corpus:\n  sources:\n    - {name: docs, kind: python-docs}\ntrain:\n" + train)
    return p


@pytest.mark.parametrize(
    "train, match",
    [
        ("  optimizer: sgd\n", r"train\.optimizer.*adamw.*muon"),
        ("  schedule: linear\n", r"train\.schedule.*cosine.*wsd"),
        ("  muon_lr: 0\n", r"train\.muon_lr: must be > 0"),
        ("  muon_momentum: 1.0\n", r"train\.muon_momentum: must be >= 0 and < 1"),
        ("  muon_weight_decay: -0.1\n", r"train\.muon_weight_decay: must be >= 0"),
        ("  decay_fraction: 1.5\n", r"train\.decay_fraction: must be >= 0 and <= 1"),
        ("  optimizer: muon\n  strategy: fsdp\n", r"train\.optimizer: muon needs.*fsdp shards"),
        ("  optimizer: muon\n  strategy: deepspeed\n", r"train\.optimizer:.*deepspeed shards"),
    ],
)
def test_recipe_errors_name_the_field(tmp_path, train, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(_recipe(tmp_path, train))


def test_muon_with_ddp_or_auto_loads(tmp_path):
    r = load_recipe(_recipe(tmp_path, "  optimizer: muon\n  strategy: ddp\n  schedule: wsd\n"))
    assert r.train.optimizer == "muon" and r.train.schedule == "wsd"


def test_a_planned_sharded_strategy_with_muon_is_one_clear_error(tmp_path):
    from domainlm.train.settings import _strategy

    r = load_recipe(_recipe(tmp_path, "  optimizer: muon\n"))

    class Plan:
        strategy = "fsdp"

    with pytest.raises(UserError, match="muon needs.*the plan chose it"):
        _strategy(r, Plan(), "gpu", 8)
    assert _strategy(r, Plan(), "gpu", 1) == "auto"  # one device: nothing is sharded


def test_finetune_and_align_train_with_adamw_under_a_muon_recipe(tmp_path):
    r = load_recipe(_recipe(tmp_path, "  optimizer: muon\n"))
    assert align_train_config(r, 1e-4, 10).optimizer == "adamw"
    source = Path("domainlm/finetune/stage.py").read_text()
    assert 'optimizer="adamw"' in source


def test_a_copy_of_muon_adamw_steps_its_own_weights_after_a_scheduler_wrapped_it():
    import copy

    cfg = TrainConfig(optimizer="muon", schedule="wsd")
    model = tiny()
    opt = optim.make_optimizer(model, cfg)
    LambdaLR(opt, lambda s: 1.0)  # sets a `step` wrapper on the instance
    model2, opt2 = copy.deepcopy((model, opt))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, 64, (2, 16))
    model2(x, x)[1].backward()
    opt2.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # the original is untouched
    moved = [n for n, p in model2.named_parameters() if not torch.equal(p, before[n])]
    assert "model.layers.0.self_attn.q_proj.weight" in moved and "model.norm.weight" in moved
