"""Fine-tuning methods: what trains and what stays bit-identical, LoRA's algebra, PEFT's formats
(peft loads our adapters and we load peft's, with the same logits), adapters, prompt tuning."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from builders import logits_of, random_tokens, sentencepiece_model, tiny_model
from safetensors.torch import load_file

from domainlm.errors import UserError
from domainlm.model.decode import generate
from domainlm.model.hf import save_hf_folder
from domainlm.model.llama import Llama
from domainlm.model.peft import (
    LoRALinear,
    PromptTuned,
    add_adapters,
    add_lora,
    load,
    load_adapters,
    load_lora,
    load_prompt,
    merged,
    prepare,
    save,
    save_adapters,
    save_lora,
    save_prompt,
    set_adapter,
)
from domainlm.recipe.finetune import (
    AdapterConfig,
    FinetuneConfig,
    LoRAConfig,
    PromptTuningConfig,
    SelectiveConfig,
)

VOCAB = 320  # the size of builders.sentencepiece_model, so any model here can be exported
# small_config: 2 layers, d_model 64, 4 query heads, 2 key/value heads (kv width 32), ffn 96.
D, KV, FFN, LAYERS = 64, 32, 96, 2


build, tokens, logits = tiny_model, random_tokens, logits_of


def ft_config() -> FinetuneConfig:
    return FinetuneConfig(
        lora=LoRAConfig(r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"]),
        adapter=AdapterConfig(bottleneck=8, where=["attention", "mlp"]),
        prompt=PromptTuningConfig(virtual_tokens=5),
        selective=SelectiveConfig(top_blocks=1, norms=True),
    )


def train(module: torch.nn.Module, steps: int = 3, lr: float = 1e-2) -> None:
    """A few AdamW steps on random next-token data, over the parameters that require grad."""
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr)
    module.train()
    for step in range(steps):
        idx = tokens(seed=10 + step)
        _, loss = module(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    module.eval()


def randomize_lora(model: torch.nn.Module, name: str, seed: int) -> None:
    """B != 0, so the adapter changes the logits (a fresh one is exactly the base model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear) and name in m.lora_A:
                for w in (m.lora_A[name].weight, m.lora_B[name].weight):
                    w.copy_(torch.randn(w.shape, generator=g) * 0.1)


# --------------------------------------------------------------------------------------------
# Every method: what trains, what does not, and the counts.

ATTN = 2 * D * D + 2 * D * KV  # q, o: d x d; k, v: d x kv
MLP = 3 * D * FFN
HAND_TRAINABLE = {
    "full": None,  # everything: config.num_params()
    "lora": LAYERS * 4 * ((D + D) + (D + KV)),  # q: r x (in + out), v: r x (in + out)
    "adapter": LAYERS * 2 * ((D * 8 + 8) + (8 * D + D)),  # down, up with biases, 2 places
    "prompt": 5 * D,
    "selective": (ATTN + MLP + 2 * D) + 2 * D + D,  # last block; first block's norms; final
}


@pytest.mark.parametrize("method", list(HAND_TRAINABLE))
def test_only_the_methods_parameters_train(method: str) -> None:
    base = build()
    base_before = {k: v.clone() for k, v in base.state_dict().items()}
    module, info = prepare(base, method, ft_config())
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    train(module)

    for name, p in module.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
    # prepare works on a copy: the base it was given is untouched.
    assert all(torch.equal(v, base_before[k]) for k, v in base.state_dict().items())

    config = base.config
    hand = HAND_TRAINABLE[method] or config.num_params()
    assert info.trainable == hand
    extra = 0 if method in ("full", "selective") else hand
    assert info.total == config.num_params() + extra
    assert info.method == method and info.lr == getattr(ft_config(), method).lr


def test_counts_take_a_tied_embedding_once() -> None:
    base = build(tie_embeddings=True)
    _, info = prepare(base, "full", ft_config())
    assert info.total == info.trainable == base.config.num_params()
    assert info.total == sum(p.numel() for p in base.state_dict().values()) - VOCAB * D


# --------------------------------------------------------------------------------------------
# LoRA.


def test_a_fresh_lora_adapter_changes_nothing() -> None:
    base = build()
    model = copy.deepcopy(base)
    names = add_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "down_proj"]))
    assert names == [
        f"model.layers.{i}.{m}"
        for i in range(LAYERS)
        for m in ("self_attn.q_proj", "mlp.down_proj")
    ]
    assert torch.equal(logits(model, tokens()), logits(base, tokens()))


def test_lora_scaling_and_forward() -> None:
    for rslora, scaling in ((False, 8.0 / 4), (True, 8.0 / 2)):
        model = build()
        add_lora(model, LoRAConfig(r=4, alpha=8.0, dropout=0.0, rslora=rslora))
        layer = model.model.layers[0].self_attn.v_proj
        assert layer.scaling["default"] == scaling
        randomize_lora(model, "default", seed=3)
        x = torch.randn(3, D)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        want = x @ layer.base_layer.weight.T + scaling * (x @ a.T @ b.T)
        torch.testing.assert_close(layer(x), want)


def test_two_adapters_switch_without_touching_the_base() -> None:
    base = build()
    cfg = LoRAConfig(r=4, dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])
    model = copy.deepcopy(base)
    add_lora(model, cfg, "a")
    add_lora(model, LoRAConfig(r=2, dropout=0.0, target_modules=["k_proj", "v_proj"]), "b")
    randomize_lora(model, "a", seed=1)
    randomize_lora(model, "b", seed=2)
    base_weights = {
        n: (p.data_ptr(), p.detach().clone())
        for n, p in model.named_parameters()
        if "lora" not in n
    }
    assert len(base_weights) == len(list(base.parameters()))

    # Each adapter alone on its own copy of the base: the reference for its logits.
    only = {}
    for name in ("a", "b"):
        single = copy.deepcopy(model)
        set_adapter(single, name)
        only[name] = logits(merged(single, name), tokens())

    idx = tokens()
    set_adapter(model, "a")
    with_a = logits(model, idx)
    set_adapter(model, "b")
    with_b = logits(model, idx)
    set_adapter(model, None)
    without = logits(model, idx)
    set_adapter(model, "a")
    assert torch.equal(logits(model, idx), with_a)

    assert torch.equal(without, logits(base, idx))
    assert (with_a - only["a"]).abs().max() <= 1e-5
    assert (with_b - only["b"]).abs().max() <= 1e-5
    assert (with_a - with_b).abs().max() > 1e-2 and (with_a - without).abs().max() > 1e-2
    for n, p in model.named_parameters():
        if n in base_weights:
            assert p.data_ptr() == base_weights[n][0] and torch.equal(p, base_weights[n][1])


def test_merged_equals_the_model_with_its_adapter() -> None:
    model = build()
    add_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "k_proj", "o_proj", "gate_proj"]))
    randomize_lora(model, "default", seed=5)
    plain = merged(model, "default")
    assert type(plain) is Llama
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert list(plain.state_dict()) == list(build().state_dict())
    idx = tokens()
    assert (logits(plain, idx) - logits(model, idx)).abs().max() <= 1e-5
    # The original keeps its adapter.
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)


def test_save_lora_then_load_lora_gives_equal_logits(tmp_path) -> None:
    base = build()
    model = copy.deepcopy(base)
    cfg = LoRAConfig(r=4, alpha=16.0, target_modules=["v_proj", "q_proj"], rslora=True)
    add_lora(model, cfg)
    randomize_lora(model, "default", seed=7)
    save_lora(model, "default", tmp_path / "lora", cfg, base_model="some/base")

    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 16.0, True)
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == "some/base" and config["bias"] == "none"
    keys = set(load_file(tmp_path / "lora" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == LAYERS * 2 * 2

    loaded = copy.deepcopy(base)
    info = load_lora(loaded, tmp_path / "lora", "x")
    assert (info.r, info.alpha, info.rslora, info.target_modules) == (
        4,
        16.0,
        True,
        ["q_proj", "v_proj"],
    )
    assert torch.equal(logits(loaded, tokens()), logits(model, tokens()))
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if "lora" in n)


# --------------------------------------------------------------------------------------------
# PEFT compatibility: peft loads our folders on the transformers model, and we load peft's.


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(our base model, its Hugging Face folder, its tokenizer.model, a function that loads the
    folder in transformers)."""
    root = tmp_path_factory.mktemp("peft")
    tokenizer = sentencepiece_model(root)
    base = build(seed=4)
    folder = save_hf_folder(base, tokenizer, root / "base")

    def hf_model():
        return transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="eager"
        ).eval()

    return base, folder, tokenizer, hf_model


@pytest.mark.parametrize(
    "cfg",
    [
        LoRAConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"]),
        LoRAConfig(
            r=2,
            alpha=4.0,
            rslora=True,
            target_modules=["k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    ],
    ids=["qv", "rslora-rest"],
)
def test_peft_loads_our_lora_with_the_same_logits(exported, tmp_path, cfg) -> None:
    base, folder, _, hf_model = exported
    ours = copy.deepcopy(base)
    add_lora(ours, cfg)
    randomize_lora(ours, "default", seed=11)
    save_lora(ours, "default", tmp_path / "adapter", cfg, base_model=str(folder))

    theirs = peft.PeftModel.from_pretrained(hf_model(), tmp_path / "adapter").eval()
    idx = tokens(length=20)
    with torch.no_grad():
        assert (theirs(input_ids=idx).logits - logits(ours, idx)).abs().max() <= 1e-4
        # The adapter really changes the model, so the agreement above is not the base's.
        with theirs.disable_adapter():
            assert (theirs(input_ids=idx).logits - logits(ours, idx)).abs().max() > 1e-3


def test_autopeft_loads_our_adapters_from_any_working_directory(exported, tmp_path,
                                                                 monkeypatch) -> None:
    """The stages pass the base as a path from the working directory (build/<run>/...); the
    adapter folder records it absolute, so peft's AutoPeftModelForCausalLM, which reads
    base_model_name_or_path, finds the base from anywhere (here: another process in /)."""
    import shutil
    import subprocess
    import sys

    base, folder, _, _ = exported
    shutil.copytree(folder, tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    cfg = LoRAConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
    ours = copy.deepcopy(base)
    add_lora(ours, cfg)
    randomize_lora(ours, "default", seed=3)
    save_lora(ours, "default", tmp_path / "lora", cfg, base_model="base")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    idx = tokens(length=10)
    script = (
        "import sys, json, torch\n"
        "from peft import AutoPeftModelForCausalLM\n"
        "m = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()\n"
        "idx = torch.tensor(json.loads(sys.argv[2]))\n"
        "with torch.no_grad():\n"
        "    print(json.dumps(m(input_ids=idx).logits.tolist()))\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "lora"),
                          json.dumps(idx.tolist())], cwd="/", capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = torch.tensor(json.loads(run.stdout.strip().splitlines()[-1]))
    assert (theirs - logits(ours, idx)).abs().max() <= 1e-4


def test_we_load_a_lora_saved_by_peft_with_the_same_logits(exported, tmp_path) -> None:
    base, _, _, hf_model = exported
    config = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "o_proj", "up_proj"],
        use_rslora=True,
        init_lora_weights=False,  # random A and B: the adapter changes the logits
        task_type="CAUSAL_LM",
    )
    theirs = peft.get_peft_model(hf_model(), config).eval()
    theirs.save_pretrained(tmp_path / "adapter")

    ours = copy.deepcopy(base)
    info = load_lora(ours, tmp_path / "adapter", "default")
    assert (info.r, info.alpha, info.rslora) == (4, 16.0, True)
    assert info.target_modules == ["q_proj", "o_proj", "up_proj"]
    idx = tokens(length=20)
    with torch.no_grad():
        ref = theirs(input_ids=idx).logits
    assert (ref - logits(ours, idx)).abs().max() <= 1e-4
    assert (ref - logits(base, idx)).abs().max() > 1e-3


def test_peft_loads_our_prompt_with_the_same_logits(exported, tmp_path) -> None:
    base, folder, _, hf_model = exported
    ours = PromptTuned(copy.deepcopy(base), 6, seed=2)
    save_prompt(ours, tmp_path / "prompt", base_model=str(folder))
    config = json.loads((tmp_path / "prompt" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 6

    theirs = peft.PeftModel.from_pretrained(hf_model(), tmp_path / "prompt").eval()
    idx = tokens(length=15)
    with torch.no_grad():
        ref = theirs(input_ids=idx).logits[:, 6:]
    assert (ref - logits(ours, idx)).abs().max() <= 1e-4
    assert torch.equal(
        logits(load_prompt(copy.deepcopy(base), tmp_path / "prompt"), idx), logits(ours, idx)
    )


@pytest.mark.parametrize("method", list(HAND_TRAINABLE))
def test_save_then_load_gives_the_trained_logits(exported, tmp_path, method) -> None:
    base, folder, tokenizer, _ = exported
    ft = ft_config()
    module, _ = prepare(base, method, ft)
    train(module)
    save(module, method, tmp_path / method, ft, str(folder), tokenizer)
    loaded = load(base, method, tmp_path / method)
    idx = tokens()
    assert (logits(loaded, idx) - logits(module, idx)).abs().max() <= 1e-6
    assert (logits(loaded, idx) - logits(base, idx)).abs().max() > 1e-3  # it did train


# --------------------------------------------------------------------------------------------
# Bottleneck adapters.


def test_fresh_adapters_change_nothing_and_follow_a_deep_copy(tmp_path) -> None:
    base = build()
    model = copy.deepcopy(base)
    names = add_adapters(model, AdapterConfig(bottleneck=8, where=["mlp"]))
    assert names == [f"model.layers.{i}.mlp_adapter" for i in range(LAYERS)]
    idx = tokens()
    assert torch.equal(logits(model, idx), logits(base, idx))
    # The KV-cache path goes through the hooked attention too.
    add_adapters(attn := copy.deepcopy(base), AdapterConfig(bottleneck=8, where=["attention"]))
    with torch.no_grad():
        torch.nn.init.normal_(attn.model.layers[0].attn_adapter.up.weight)
    assert torch.equal(
        generate(attn, idx, 5, use_cache=True), generate(attn, idx, 5, use_cache=False)
    )
    # A copy's hooks call the copy's adapters, not the original's.
    twin = copy.deepcopy(model)
    with torch.no_grad():
        torch.nn.init.normal_(twin.model.layers[1].mlp_adapter.up.weight)
    assert torch.equal(logits(model, idx), logits(base, idx))
    assert (logits(twin, idx) - logits(base, idx)).abs().max() > 1e-3


def test_adapter_folder_format(tmp_path) -> None:
    model = build()
    cfg = AdapterConfig(bottleneck=8, where=["attention", "mlp"])
    add_adapters(model, cfg)
    save_adapters(model, tmp_path / "a", cfg)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["domainlm_type"] == "bottleneck" and config["bottleneck"] == 8
    assert config["where"] == ["attention", "mlp"]
    keys = set(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert "model.layers.0.attn_adapter.down.weight" in keys and len(keys) == LAYERS * 2 * 4
    # A folder for another shape is refused before the model is touched.
    other = build(d_model=32, n_heads=2, n_kv_heads=1)
    with pytest.raises(UserError, match="d_model"):
        load_adapters(other, tmp_path / "a")
    assert not any("adapter" in n for n, _ in other.named_parameters())


# --------------------------------------------------------------------------------------------
# Prompt tuning.


def test_prompt_forward_is_the_base_on_prepended_embeddings() -> None:
    base = build()
    module = PromptTuned(base, 4, seed=0)
    idx, targets = tokens(), tokens(seed=2)
    targets[0, :5] = -100
    got, loss = module(idx, targets)

    x = torch.cat((module.prompt_embeddings.expand(2, -1, -1), base.model.embed_tokens(idx)), 1)
    want = base(inputs_embeds=x)[0][:, 4:]
    assert got.shape == (2, idx.size(1), VOCAB) and torch.equal(got, want)
    want_loss = F.cross_entropy(want.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, want_loss)
    # Virtual positions have no targets: with every real target ignored, nothing counts.
    assert module(idx, torch.full_like(targets, -100))[1].item() == 0.0
    # The prompt starts as the embeddings of real vocabulary tokens, the same for a seed.
    rows = base.model.embed_tokens.weight
    assert all(any(torch.equal(p, r) for r in rows) for p in module.prompt_embeddings)
    assert torch.equal(PromptTuned(build(), 4, seed=0).prompt_embeddings, module.prompt_embeddings)


def test_prompt_generate_with_and_without_cache_agree() -> None:
    module = PromptTuned(build(), 5, seed=1)
    with torch.no_grad():
        torch.nn.init.normal_(module.prompt_embeddings)  # a prompt that changes the output
    idx = tokens(length=6)
    cached = generate(module, idx, 10, use_cache=True)
    assert torch.equal(cached, generate(module, idx, 10, use_cache=False))
    assert not torch.equal(cached, generate(module.base, idx, 10))
    # Greedy: each new token is the argmax of forward's last logits.
    for t in range(6, 16):
        assert torch.equal(logits(module, cached[:, :t])[:, -1].argmax(-1), cached[:, t])
    # The virtual tokens take positions: 5 + 6 + 53 > 64.
    generate(module, idx, 53)
    with pytest.raises(ValueError, match="virtual tokens"):
        generate(module, idx, 54)


# --------------------------------------------------------------------------------------------
# Mistakes a user can make.


def test_bad_inputs_are_user_errors_that_name_the_fix(tmp_path) -> None:
    ft = ft_config()
    with pytest.raises(UserError, match=r"finetune\.lora\.target_modules.*qproj.*q_proj, k_proj"):
        add_lora(build(), LoRAConfig(target_modules=["q_proj", "qproj"]))
    with pytest.raises(UserError, match=r"finetune\.methods.*'dora'.*full, lora"):
        prepare(build(), "dora", ft)
    with pytest.raises(UserError, match=r"finetune\.selective\.top_blocks"):
        prepare(build(), "selective", FinetuneConfig(selective=SelectiveConfig(top_blocks=3)))

    module, _ = prepare(build(), "lora", ft)
    save(module, "lora", tmp_path / "lora", ft, None, tmp_path / "unused.model")
    (tmp_path / "lora" / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match=r"adapter_model\.safetensors is missing.*save the adapter"):
        load(build(), "lora", tmp_path / "lora")
    with pytest.raises(UserError, match=r"nowhere is not a folder: point to the adapter folder"):
        load(build(), "adapter", tmp_path / "nowhere")
    module, _ = prepare(build(), "adapter", ft)
    save(module, "adapter", tmp_path / "adapter", ft, None, tmp_path / "unused.model")
    (tmp_path / "adapter" / "adapter_config.json").unlink()
    with pytest.raises(UserError, match=r"adapter_config\.json is missing.*save the adapter again"):
        load(build(), "adapter", tmp_path / "adapter")

    module, _ = prepare(build(), "prompt", ft)
    save(module, "prompt", tmp_path / "prompt", ft, None, tmp_path / "unused.model")
    with pytest.raises(UserError, match=r"PROMPT_TUNING adapter, not LORA.*method it was trained"):
        load(build(), "lora", tmp_path / "prompt")
    with pytest.raises(UserError, match=r"shape.*base model it was trained with"):
        load(build(d_model=32, n_heads=2, n_kv_heads=1), "prompt", tmp_path / "prompt")
